"""The ONNX Runtime engine against the PyTorch reference: logits, greedy, beam, n-best, batching."""

from __future__ import annotations

import ctypes.util
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmtserve.bundle import BOS_ID, MANIFEST, BundleError, read_bundle
from nmtserve_export.checkpoint import load_model
from nmtserve_export.data import encode_sources
from nmtserve_export.decode import IncrementalDecoder, beam_search, greedy_search
from nmtserve_export.evaluate import held_out_pairs
from nmtserve_export.train import exact_match
from nmtserve_server.engine import (
    Decoder, DeviceError, EncodedBatch, Engine, Model, _axis_limit, _axis_size, engines_for, preload_cuda_libraries,
    providers_for, translate,
)
from nmtserve_server.search import DecodeOptions, top_candidates


@pytest.fixture(scope="module")
def reference(tiny_run):
    model, tokenizer, metadata = load_model(tiny_run)
    pairs = held_out_pairs(metadata)
    return model, tokenizer, pairs, encode_sources(tokenizer, [p.source for p in pairs])


@pytest.fixture(scope="module")
def engine(tiny_bundle) -> Engine:
    return Engine.from_path(tiny_bundle, device="cpu", capacity=64)


def test_top_candidates_is_a_stable_descending_sort():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scores = rng.integers(0, 5, size=40).astype(np.float32)  # many ties
        n = int(rng.integers(1, 10))
        assert top_candidates(scores, n).tolist() == np.argsort(-scores, kind="stable")[:n].tolist()


def test_log_probs_match_pytorch_at_every_step(reference, engine):
    model, _, _, sources = reference
    for batch in (sources[:1], sources[1:9]):  # batch 1, and a padded batch of mixed lengths
        targets = greedy_search(model, batch, max_length=40)
        steps = max(len(t) for t in targets) + 1
        forced = [[BOS_ID] + t + [t[-1] if t else BOS_ID] * (steps - len(t)) for t in targets]
        decoder = IncrementalDecoder(model, torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in batch], batch_first=True))
        encoded = engine.encode(batch)
        first, _ = engine.first_step(encoded)  # <bos>, outside the cache; the rest in the cache rows it fills
        slots = [own[0] for own in engine.allocate(encoded, [1] * len(batch))]
        try:
            for t in range(steps):
                tokens = [f[t] for f in forced]
                with torch.inference_mode():
                    expected = decoder.step(torch.tensor(tokens)).numpy()
                got = first if t == 0 else engine.step(slots, tokens)[0]
                np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=f"step {t}")
        finally:
            engine.release(slots)


# One length limit on both sides: each search stops at its own default (the model's limit, 128) otherwise.
PARITY_MAX_LENGTH = 128


def test_greedy_outputs_equal_pytorch_on_the_whole_test_set(reference, engine):
    model, _, _, sources = reference
    expected = [o for i in range(0, len(sources), 50) for o in greedy_search(model, sources[i : i + 50], max_length=PARITY_MAX_LENGTH)]
    got = [h[0].tokens for h in translate(engine, sources, DecodeOptions(max_length=PARITY_MAX_LENGTH))]
    assert got == expected


# The sentences the length penalties other than the default are compared on: the first of the test set, enough for
# the scores (divided by length ** length_penalty) and the n-best order they give to differ from the default's.
PENALTY_SOURCES = 30


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 0.6, 2.0])
def test_beam_outputs_n_best_and_scores_equal_pytorch(reference, engine, length_penalty):
    """The default length penalty on the whole test set, the others on its first PENALTY_SOURCES sentences."""
    model, _, _, sources = reference
    if length_penalty != DecodeOptions().length_penalty:
        sources = sources[:PENALTY_SOURCES]
    options = DecodeOptions(beam_size=4, num_hypotheses=4, length_penalty=length_penalty, max_length=PARITY_MAX_LENGTH)
    got = translate(engine, sources, options)
    for source, hypotheses in zip(sources, got):
        expected = beam_search(model, source, beam_size=4, num_hypotheses=4, length_penalty=length_penalty, max_length=PARITY_MAX_LENGTH)
        assert [h.tokens for h in hypotheses] == [h.tokens for h in expected]
        np.testing.assert_allclose([h.score for h in hypotheses], [h.score for h in expected], atol=1e-4)


def test_length_options_are_respected(reference, engine):
    _, _, _, sources = reference
    for hypotheses in translate(engine, sources[:10], DecodeOptions(min_length=12, max_length=12, beam_size=2)):
        assert len(hypotheses[0].tokens) == 12
    for hypotheses in translate(engine, sources[:10], DecodeOptions(max_length=3)):
        assert len(hypotheses[0].tokens) <= 3


def test_sentence_alone_equals_sentence_in_a_batch(reference, engine):
    _, _, _, sources = reference
    batched = translate(engine, sources[:40], DecodeOptions(beam_size=2, num_hypotheses=2))
    for source, in_batch in zip(sources[:40], batched):
        alone = translate(engine, [source], DecodeOptions(beam_size=2, num_hypotheses=2))[0]
        assert [h.tokens for h in alone] == [h.tokens for h in in_batch]


def test_sentences_joining_and_leaving_a_running_batch_decode_as_alone(reference, engine):
    """Continuous batching: texts added between steps, one withdrawn, rows freed mid-batch are compacted away."""
    _, _, _, sources = reference
    options = [DecodeOptions(beam_size=(1, 3)[i % 2], num_hypotheses=1, max_length=8 + 5 * (i % 4)) for i in range(24)]
    decoder, results, waves = Decoder(engine), {}, [range(0, 6), range(6, 12), range(12, 18), range(18, 24)]
    steps = 0
    while waves or decoder.active:
        if waves and steps % 3 == 0:
            wave = list(waves.pop(0))
            results.update(decoder.add(wave, [sources[i] for i in wave], [options[i] for i in wave]))
        if steps == 4:
            assert decoder.remove(1)
        results.update(decoder.step())
        steps += 1
        decoder.compact()  # as the next step will: the rows in use are then exactly rows [0, n)
        in_use = engine.capacity - decoder.rows_free()
        assert sorted(slot for sentence in decoder.active for slot in sentence.slots) == list(range(in_use))
    assert sorted(results) == [i for i in range(24) if i != 1]
    for i, hypotheses in results.items():
        alone = translate(engine, [sources[i]], options[i])[0]
        assert hypotheses[0].tokens == alone[0].tokens
        assert hypotheses[0].score == pytest.approx(alone[0].score, abs=1e-4)


def test_buffers_replaced_mid_batch_decode_as_alone(reference, engine):
    """The cache's time axis and the source axis grow and shrink while texts decode (the step's I/O binding is remade)."""
    _, _, _, sources = reference
    short = sorted(sources, key=len)[:4]
    long_source = [token for source in sorted(sources, key=len)[-3:] for token in source[:-1]][:40] + [short[0][-1]]
    assert len(long_source) > 2 * max(map(len, short))  # joining doubles the source axis at least once
    options = {0: DecodeOptions(min_length=40, max_length=40), "long": DecodeOptions(beam_size=2, max_length=6)}
    decoder, results = Decoder(engine), {}
    results.update(decoder.add([0, 1, 2, 3], short, [options[0], DecodeOptions(), DecodeOptions(), DecodeOptions()]))
    for step in range(40):
        if step == 5:
            results.update(decoder.add(["long"], [long_source], [options["long"]]))
        results.update(decoder.step())
    assert not decoder.active and sorted(results, key=str) == [0, 1, 2, 3, "long"]
    for key, source in [*enumerate(short), ("long", long_source)]:
        alone = translate(engine, [source], options.get(key, DecodeOptions()))[0]
        assert [h.tokens for h in results[key]] == [h.tokens for h in alone]
        assert results[key][0].score == pytest.approx(alone[0].score, abs=1e-4)


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 1024), needs=st.lists(st.integers(1, 1024), min_size=1, max_size=12))
def test_cache_axes_are_always_sixteen_times_a_power_of_two(limit, needs):
    """A row decodes as alone only at such widths (see first_step), also under a limit that is not one of them."""
    largest, size = _axis_limit(limit), 16
    assert largest >= limit and (largest // 16) & (largest // 16 - 1) == 0 and largest % 16 == 0, (limit, largest)
    for needed in (min(n, limit) for n in needs):
        size = _axis_size(needed, size, largest)
        assert size >= needed and size % 16 == 0 and (size // 16) & (size // 16 - 1) == 0, (limit, needed, size)


def test_engines_side_by_side_decode_as_one(reference, engine, tiny_bundle):
    """translate() over two engines, each decoding its share in its own thread, gives one engine's outputs exactly."""
    _, _, _, sources = reference
    engines = engines_for(tiny_bundle, 2, device="cpu", capacity=8)
    assert [e.capacity for e in engines] == [4, 4]  # the cache rows shared out
    for options in (DecodeOptions(), DecodeOptions(beam_size=3, num_hypotheses=2)):
        together, alone = translate(engines, sources[:25], options), translate(engine, sources[:25], options)
        assert [[(h.tokens, h.score) for h in r] for r in together] == [[(h.tokens, h.score) for h in r] for r in alone]
    assert translate(engines, sources[:1], DecodeOptions()) == translate(engine, sources[:1], DecodeOptions())


def test_engines_and_models_keep_no_copy_of_the_graphs(engine, tiny_bundle):
    """ONNX Runtime holds the graphs: their bytes kept beside it would double a large model's memory, and the server's
    own Model never runs them."""
    assert set(engine.bundle.files) == {"tokenizer"}
    model = Model.from_path(tiny_bundle)
    assert set(model.bundle.files) == {"tokenizer"}
    assert model.bundle.sha256 == engine.bundle.sha256 == read_bundle(tiny_bundle).sha256


GRAPH_DIMENSIONS = {  # manifest field -> what loading says once it is doubled: the file, the tensor, found against expected
    "n_heads": r"encoder\.onnx: output 'memory_key_0' is .*; dimension 1 is {old}, the manifest says n_heads={new}",
    "d_k": r"encoder\.onnx: output 'memory_key_0' is .*; dimension 3 is {old}, the manifest says d_k={new}",
    "vocab_size": r"decoder_step\.onnx: output 'log_probs' is .*; dimension 1 is {old}, the manifest says vocab_size={new}",
    "n_decoder_layers": r"encoder\.onnx: graph outputs are .*; the manifest says n_decoder_layers={new}",
}


@pytest.mark.parametrize("field", list(GRAPH_DIMENSIONS))
def test_a_manifest_unlike_its_graphs_is_refused_at_load(tiny_bundle, tmp_path, field):
    """Each number the engine sizes its buffers and names its tensors by is checked against the graphs when the bundle is
    read: such a bundle is refused at load, by name, not by an ONNX Runtime shape error in the first request."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    assert Engine.from_path(bundle, device="cpu", capacity=2, decoder_threads=1).capacity == 2  # the copy loads as is
    # Every file keeps its listed sha256, and the manifest's own hash is computed on reading: the edit still verifies.
    manifest = json.loads((bundle / MANIFEST).read_text())
    old = manifest["model"][field]
    manifest["model"][field] = old * 2
    if field in ("n_heads", "d_k"):
        manifest["model"]["d_model"] *= 2  # still n_heads × d_k, so the graphs are what the check finds wrong
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=GRAPH_DIMENSIONS[field].format(old=old, new=old * 2)):
        Engine.from_path(bundle, device="cpu", capacity=2, decoder_threads=1)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_alignment_is_the_models_source_attention_along_each_hypothesis(reference, engine, beam_size):
    # The last decoder layer's encoder-decoder attention, mean over heads, for each generated token (and <eos>) as
    # PyTorch computes it with the hypothesis teacher-forced: a beam's alignment must follow its own path.
    model, _, _, sources = reference
    results = translate(engine, sources[:4], DecodeOptions(beam_size=beam_size, num_hypotheses=beam_size, return_alignment=True))
    for source, hypotheses in zip(sources[:4], results):
        for hypothesis in hypotheses:
            with torch.no_grad():
                model(torch.tensor([source]), torch.tensor([[BOS_ID, *hypothesis.tokens]]))
            expected = model.decoder_layers[-1].src_attn.attention.mean(dim=1)[0].numpy()  # (tokens + 1, source)
            assert hypothesis.alignment.shape == (len(hypothesis.tokens) + 1, len(source))  # + <eos>
            np.testing.assert_allclose(hypothesis.alignment, expected, atol=1e-4)


def test_more_sentences_than_cache_rows_all_finish(reference, tiny_bundle):
    _, _, _, sources = reference
    small = Engine.from_path(tiny_bundle, device="cpu", capacity=8)
    results = translate(small, sources[:30], DecodeOptions(beam_size=4))
    big = translate(Engine.from_path(tiny_bundle, device="cpu", capacity=64), sources[:30], DecodeOptions(beam_size=4))
    assert [r[0].tokens for r in results] == [r[0].tokens for r in big]
    assert len(small.free_slots) == 8


def test_int8_bundle_keeps_quality(reference, engine, tiny_bundle_int8, capsys):
    _, tokenizer, pairs, sources = reference
    int8 = Engine.from_path(tiny_bundle_int8, device="cpu")
    references = [p.target for p in pairs]
    fp32 = engine.decode_ids([h[0].tokens for h in translate(engine, sources, DecodeOptions())])
    int8_outputs = int8.decode_ids([h[0].tokens for h in translate(int8, sources, DecodeOptions())])
    fp32_em, int8_em = exact_match(fp32, references), exact_match(int8_outputs, references)
    same = sum(a == b for a, b in zip(fp32, int8_outputs)) / len(fp32)
    with capsys.disabled():
        print(f"\n[tiny model] exact match fp32 {100 * fp32_em:.1f}%, int8 {100 * int8_em:.1f}%; int8 output = fp32's: {100 * same:.1f}%")
    assert int8_em >= fp32_em - 0.10
    # The tiny model gets few sentences right, so the score alone would let int8 lose most of them: most outputs must be
    # fp32's own (93% here; int8's kernels differ by CPU, so not all).
    assert same >= 0.80


def test_a_batch_that_fails_to_fit_gives_its_rows_back(reference, tiny_bundle):
    _, _, _, sources = reference
    small = Engine.from_path(tiny_bundle, device="cpu", capacity=8)
    batch = small.encode(sources[:2])
    searches = Decoder(small).start(batch, [DecodeOptions(beam_size=3)] * 2)
    misshapen = EncodedBatch([m[..., :-1] for m in batch.memory], batch.source_mask, batch.source_lengths, batch.first_step)
    with pytest.raises(ValueError):
        Decoder(small).insert(["a", "b"], misshapen, searches)
    assert len(small.free_slots) == 8
    assert [h[0].tokens for h in translate(small, sources[:4], DecodeOptions(beam_size=2))] == [
        h[0].tokens for h in translate(Engine.from_path(tiny_bundle, device="cpu", capacity=8), sources[:4], DecodeOptions(beam_size=2))
    ]


@pytest.mark.parametrize("beam_size", [0, 65])
def test_beam_that_cannot_fit_the_cache_is_refused(reference, engine, beam_size):
    _, _, _, sources = reference
    with pytest.raises(ValueError, match=f"beam size {beam_size} must be between 1 and the engine's 64 cache rows"):
        translate(engine, sources[:1], DecodeOptions(beam_size=beam_size))


def test_source_longer_than_the_model_limit_is_refused(engine):
    with pytest.raises(ValueError, match="longer than the model's limit"):
        engine.encode([[5] * (engine.max_source_length + 1)])
    with pytest.raises(ValueError, match="an empty source"):
        engine.encode([[5, engine.tokens.eos], []])


def test_options_the_engine_cannot_decode_are_refused_before_any_model_run(reference, engine):
    """Past the model's positions a step fails, and in the decode loop the whole batch with it: the decoder refuses first."""
    _, _, _, sources = reference
    decoder = Decoder(engine)
    too_long = DecodeOptions(min_length=engine.max_target_length + 1, max_length=engine.max_target_length + 1)
    limit = engine.max_target_length
    with pytest.raises(ValueError, match=rf"options\.max_length: {limit + 1} is above the model's limit of {limit} tokens"):
        decoder.add(["a"], sources[:1], [too_long])
    with pytest.raises(ValueError, match="beam size 0 must be between 1"):
        decoder.add(["a"], sources[:1], [DecodeOptions(beam_size=0)])
    # What the server refuses, for a Python caller too: more hypotheses than the beam keeps.
    with pytest.raises(ValueError, match="options.num_hypotheses: 3 is above beam_size 2"):
        decoder.add(["a"], sources[:1], [DecodeOptions(beam_size=2, num_hypotheses=3)])
    assert not decoder.active and decoder.rows_free() == engine.capacity


def test_a_translate_that_fails_midway_gives_its_rows_back(reference, tiny_bundle):
    """A source past the model's limit, found only when its turn came, left the rows of the others held: the next
    translate() on the engine waited for ever for rows."""
    _, _, _, sources = reference
    engine = Engine.from_path(tiny_bundle, device="cpu", capacity=2, threads=1)
    too_long = [5] * engine.max_source_length + [engine.tokens.eos]
    with pytest.raises(ValueError, match="longer than the model's limit"):
        translate(engine, [sources[0], sources[1], too_long], DecodeOptions(max_length=30))
    assert sorted(engine.free_slots) == [0, 1]
    (hypotheses,) = translate(engine, sources[:1], DecodeOptions(beam_size=2))  # both rows: it waited for ever
    assert hypotheses


def test_cuda_without_a_gpu_fails_fast():
    try:
        providers = providers_for("cuda")
    except DeviceError as error:
        assert "no usable GPU" in str(error)
    else:
        assert providers[0] == "CUDAExecutionProvider"  # this machine has one


def test_missing_cuda_libraries_are_named_in_the_log(caplog):
    if ctypes.util.find_library("cublas"):
        pytest.skip("this machine has CUDA's cuBLAS")
    preload_cuda_libraries.cache_clear()
    with caplog.at_level(logging.WARNING, logger="nmtserve_server.engine"):
        failures = preload_cuda_libraries()
    assert any("libcublas" in failure for failure in failures)
    assert sum("event=cuda_library_missing" in r.getMessage() for r in caplog.records) == len(failures)
    assert preload_cuda_libraries() is failures  # once per process


def test_engine_and_bundle_reader_never_import_torch(tiny_bundle):
    code = (
        "import sys\n"
        "from nmtserve_server.engine import Engine, translate\n"
        f"engine = Engine.from_path({str(tiny_bundle)!r}, device='cpu')\n"
        "translate(engine, engine.encode_texts(['Friday']))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decoder_threads_are_as_set_or_timed_at_load(tiny_bundle):
    fixed = Engine.from_path(tiny_bundle, device="cpu", capacity=8, threads=2, decoder_threads=2)
    assert fixed.decoder_threads == 2
    assert fixed.decoder.get_session_options().intra_op_num_threads == 2
    chosen = Engine.from_path(tiny_bundle, device="cpu", capacity=8, threads=2)  # timed at load: 1 or 2
    assert chosen.decoder_threads in (1, 2)
    assert chosen.decoder.get_session_options().intra_op_num_threads == chosen.decoder_threads
    assert chosen.encoder.get_session_options().intra_op_num_threads == 2


def test_a_row_is_released_once(tiny_bundle):
    """A second release of a row would put it in the free list twice, and two sentences could then share it."""
    engine = Engine.from_path(tiny_bundle, device="cpu", capacity=4, threads=1)
    assert Decoder(engine).add([], [], []) == []  # nothing to start: no encoder run of no sources
    batch = engine.encode([[5, engine.tokens.eos]])
    engine.first_step(batch)  # what allocated rows start from
    (slots,) = engine.allocate(batch, [2])
    engine.release(slots)
    with pytest.raises(ValueError, match=r"rows \[0, 1\] are not all held: rows \[0, 1\] are free already"):
        engine.release(slots)
    assert sorted(engine.free_slots) == [0, 1, 2, 3]
