"""Importing Marian (opus-mt) checkpoints: parity with transformers in PyTorch, ONNX, the engine's searches and
over gRPC, both weight formats, shared and separate vocabularies, and clear refusals.

The checkpoints are built here: a small random MarianMTModel and SentencePiece models trained on the
generated corpus, saved in the Hugging Face layout. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from nmtserve.bundle import MANIFEST, BundleError, read_bundle, sha256_bytes
from nmtserve.cli import main
from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc
from nmtserve_export.corpus import generate_corpus
from nmtserve_export.marian import MarianImportError, load_marian
from nmtserve_server.bench import made_up_texts
from nmtserve_server.engine import Engine, translate
from nmtserve_server.search import DecodeOptions
from nmtserve_server.tokenization import MarianTokenizer as ServerTokenizer

pytestmark = pytest.mark.e2e
MAX_NEW_TOKENS = 24
EOS = 0  # Marian's </s>


def train_spm(texts: list[str], vocab_size: int) -> bytes:
    """A unigram SentencePiece model trained on texts, as bytes."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def pieces(spm_model: bytes) -> list[str]:
    """The ordinary pieces of a SentencePiece model (no <unk>, <s>, </s>)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))]


def marian_vocab(ordinary: list[str], *, pad_last: bool, languages: tuple[str, ...] = ()) -> dict[str, int]:
    """A Marian vocabulary: </s> 0, <unk> 1, a multilingual model's >>lang<< tokens, the pieces, and <pad> last (opus-mt) or
    after <unk>."""
    codes = [f">>{language}<<" for language in languages]
    ordered = ["</s>", "<unk>"] + ([] if pad_last else ["<pad>"]) + codes + list(dict.fromkeys(ordinary)) + (["<pad>"] if pad_last else [])
    return {piece: i for i, piece in enumerate(ordered)}


def build_checkpoint(directory: Path, pairs, *, separate_vocabs: bool, pytorch_bin: bool, languages: tuple[str, ...] = ()) -> Path:
    """A random MarianMTModel with its SentencePiece models and vocabularies, saved as transformers saves it; with
    languages, a multilingual one, asked for each by its >>lang<< source token."""
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    directory.mkdir(parents=True)
    source_spm, target_spm = train_spm([p.source for p in pairs], 200), train_spm([p.target for p in pairs], 300)
    (directory / "source.spm").write_bytes(source_spm)
    (directory / "target.spm").write_bytes(target_spm)
    if separate_vocabs:  # <pad> at one id in both: transformers has a single pad_token_id
        source_vocab = marian_vocab(pieces(source_spm), pad_last=False, languages=languages)
        target_vocab = marian_vocab(pieces(target_spm), pad_last=False)
        (directory / "target_vocab.json").write_text(json.dumps(target_vocab))
    else:
        source_vocab = target_vocab = marian_vocab(pieces(source_spm) + pieces(target_spm), pad_last=True, languages=languages)
    (directory / "vocab.json").write_text(json.dumps(source_vocab))
    pad = target_vocab["<pad>"]
    config = MarianConfig(
        vocab_size=len(source_vocab), decoder_vocab_size=len(target_vocab), share_encoder_decoder_embeddings=not separate_vocabs,
        tie_word_embeddings=separate_vocabs, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        activation_function="swish", scale_embedding=True, pad_token_id=pad, eos_token_id=EOS, decoder_start_token_id=pad,
        forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    model = MarianMTModel(config).eval()
    # transformers' initialisation (std 0.02, zero biases) gives near-uniform, input-blind outputs: use
    # unit-variance layers, random norms and biases, and a bias towards </s> so hypotheses end at varied lengths.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:
                continue
            if "layer_norm.weight" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
            elif "embed_tokens" in name or "shared" in name:
                p.normal_(0, 0.5)
                p[pad] = 0  # as in converted opus-mt models
            elif "lm_head" in name:
                p.normal_(0, 0.2)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
        model.final_logits_bias.normal_(0, 0.5)
        model.final_logits_bias[0, EOS] += 4
        if not separate_vocabs:  # transformers unties these from the shared matrix when the output is untied
            model.model.encoder.embed_tokens.weight.copy_(model.model.shared.weight)
            model.model.decoder.embed_tokens.weight.copy_(model.model.shared.weight)
    model.save_pretrained(directory)
    if pytorch_bin:
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()
    MarianTokenizer(
        str(directory / "source.spm"), str(directory / "target.spm"), str(directory / "vocab.json"),
        target_vocab_file=str(directory / "target_vocab.json") if separate_vocabs else None,
        separate_vocabs=separate_vocabs, source_lang="en", target_lang="mul" if languages else "de",
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def marian_pairs():
    return generate_corpus(1200, seed=5)


@pytest.fixture(scope="session")
def marian_checkpoint(tmp_path_factory, marian_pairs) -> Path:
    """The common opus-mt shape: one vocabulary, shared embeddings, safetensors (here with its own output matrix)."""
    return build_checkpoint(tmp_path_factory.mktemp("marian") / "shared", marian_pairs, separate_vocabs=False, pytorch_bin=False)


@pytest.fixture(scope="session")
def marian_separate(tmp_path_factory, marian_pairs) -> Path:
    """Separate source and target vocabularies and embeddings, output tied to the target's, pytorch_model.bin."""
    return build_checkpoint(tmp_path_factory.mktemp("marian") / "separate", marian_pairs, separate_vocabs=True, pytorch_bin=True)


@pytest.fixture(scope="session")
def marian_bundle(marian_checkpoint, tmp_path_factory) -> Path:
    """The shared checkpoint imported with the command, checked against transformers on the way."""
    out = tmp_path_factory.mktemp("marian-bundle") / "bundle"
    assert main(["import-marian", str(marian_checkpoint), "--out", str(out), "--check-reference"]) == 0
    return out


@pytest.fixture(scope="session")
def marian_texts() -> list[str]:
    return [p.source for p in generate_corpus(300, seed=17)]


def reference(checkpoint: Path):
    """transformers' model and tokenizer for a checkpoint."""
    from transformers import MarianMTModel, MarianTokenizer

    return MarianMTModel.from_pretrained(str(checkpoint), local_files_only=True).eval(), MarianTokenizer.from_pretrained(str(checkpoint))


def generate(checkpoint: Path, texts: list[str], beams: int) -> list[list[int]]:
    """transformers' generate with the search rules of our engine: ids without start and </s>."""
    model, tokenizer = reference(checkpoint)
    pad = model.config.pad_token_id
    rows = []
    for i in range(0, len(texts), 100):
        batch = tokenizer(texts[i : i + 100], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **batch, num_beams=beams, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, length_penalty=1.0,
                bad_words_ids=[[pad]], forced_eos_token_id=None, **({"early_stopping": True} if beams > 1 else {}),
            )
        for row in out.tolist():
            row = row[1:]  # the start token
            row = row[: row.index(EOS)] if EOS in row else row
            rows.append([t for t in row if t != pad])  # <pad> is never generated: only the batch's filler
    return rows


@pytest.fixture(scope="session")
def generated(marian_checkpoint, marian_texts) -> dict[int, list[list[int]]]:
    """transformers' generate, greedy and beam 4."""
    return {beams: generate(marian_checkpoint, marian_texts, beams) for beams in (1, 4)}


def teacher_forced(checkpoint: Path, pairs):
    """A padded batch of real pairs: transformers' inputs, the decoder inputs, and which target positions are real."""
    model, tokenizer = reference(checkpoint)
    batch = tokenizer([p.source for p in pairs], text_target=[p.target for p in pairs], return_tensors="pt", padding=True)
    c = model.config
    labels = batch["labels"]
    decoder_input = torch.cat([torch.full((len(pairs), 1), c.decoder_start_token_id), labels[:, :-1]], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input).logits
    return batch, decoder_input, labels != c.pad_token_id, logits.log_softmax(dim=-1)


@pytest.mark.parametrize("variant", ["marian_checkpoint", "marian_separate"])
def test_pytorch_log_probs_match_transformers(variant, request, marian_pairs):
    checkpoint = request.getfixturevalue(variant)
    model = load_marian(checkpoint).model
    batch, decoder_input, real, expected = teacher_forced(checkpoint, marian_pairs[:16])
    with torch.inference_mode():
        got = model(batch["input_ids"], decoder_input)
    assert (got - expected)[real].abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["marian_checkpoint", "marian_separate"])
def test_tokenizer_matches_transformers(variant, request, marian_pairs, marian_texts):
    checkpoint = request.getfixturevalue(variant)
    _, tokenizer = reference(checkpoint)
    files = load_marian(checkpoint).tokenizer_files
    config = load_marian(checkpoint).model.config
    from nmtserve.bundle import SpecialTokens

    ours = ServerTokenizer(files["source_spm"], files["target_spm"], files["vocab"], files.get("target_vocab"),
                           SpecialTokens(pad=config.pad_id, bos=config.bos_id, eos=config.eos_id, unk=config.unk_id))
    texts = marian_texts + [">>deu<< Friday", "Friday >>x<<", "", "  spaced  out  ", "unseen ☃ characters", "5:27\u202fPM",
                            "Friday\n"]
    assert ours.encode_batch(texts) == [tokenizer(t).input_ids for t in texts]
    # SentencePiece reads white space as nmtserve's own models do (nmtserve.normalize), with no help.
    assert ours.encode_batch(["5:27\u202fPM", "Friday\n"]) == ours.encode_batch(["5:27 PM", "Friday"])
    targets = tokenizer(text_target=[p.target for p in marian_pairs[:200]]).input_ids
    assert ours.decode_batch(targets) == tokenizer.batch_decode(targets, skip_special_tokens=True)


def test_bundle_holds_the_marian_tokenizer_and_ids(marian_bundle, marian_checkpoint):
    bundle = read_bundle(marian_bundle)
    config = json.loads((marian_checkpoint / "config.json").read_text())
    assert bundle.tokenizer_kind == "marian"
    assert set(bundle.files) == {"encoder", "decoder_step", "source_spm", "target_spm", "vocab"}
    assert (bundle.tokens.pad, bundle.tokens.bos, bundle.tokens.eos) == (config["pad_token_id"], config["decoder_start_token_id"], EOS)
    assert bundle.manifest["languages"] == {"source": "en", "target": ["de"]}
    assert bundle.manifest["training"]["transformers_max_log_prob_difference"] < 1e-5


def test_a_vocabulary_unlike_the_manifests_special_ids_is_refused(marian_bundle, tmp_path):
    bundle = shutil.copytree(marian_bundle, tmp_path / "bundle")
    vocab = json.loads((bundle / "vocab.json").read_text())
    vocab["<unk>"] = 5
    data = json.dumps(vocab).encode()
    (bundle / "vocab.json").write_bytes(data)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["vocab"].update(sha256=sha256_bytes(data), bytes=len(data))  # as a careful forger would
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest\.json: tokens\.unk is 1, but vocab\.json gives '<unk>' the id 5"):
        read_bundle(bundle)


def test_onnx_log_probs_match_transformers(marian_bundle, marian_checkpoint, marian_pairs):
    batch, decoder_input, real, expected = teacher_forced(marian_checkpoint, marian_pairs[:8])
    engine = Engine.from_path(marian_bundle, device="cpu", capacity=8)
    sources = [ids[mask].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"].bool())]
    encoded = engine.encode(sources)
    assert (decoder_input[:, 0] == engine.tokens.bos).all()
    first, _ = engine.first_step(encoded)  # the start token, outside the cache; the rest in the rows it fills
    slots = [own[0] for own in engine.allocate(encoded, [1] * len(sources))]
    for t in range(decoder_input.size(1)):
        log_probs = first if t == 0 else engine.step(slots, decoder_input[:, t].tolist())[0]
        rows = real[:, t].numpy()
        np.testing.assert_allclose(log_probs[rows], expected[:, t][rows].numpy(), atol=1e-4, rtol=0, err_msg=f"step {t}")


@pytest.mark.parametrize("beam_size", [1, 4])
def test_searches_equal_transformers_generate(beam_size, marian_bundle, marian_checkpoint, marian_texts, generated):
    engine = Engine.from_path(marian_bundle, device="cpu", capacity=64)
    results = translate(engine, engine.encode_texts(marian_texts), DecodeOptions(beam_size=beam_size, max_length=MAX_NEW_TOKENS))
    expected = generated[beam_size]
    assert [h[0].tokens for h in results] == expected
    lengths = {len(tokens) for tokens in expected}
    assert min(lengths) < MAX_NEW_TOKENS and MAX_NEW_TOKENS in lengths  # both ways of ending are exercised
    _, tokenizer = reference(marian_checkpoint)
    assert engine.decode_ids(expected) == tokenizer.batch_decode(expected, skip_special_tokens=True)


def test_grpc_server_serves_the_marian_bundle(start_server, marian_bundle, marian_checkpoint, marian_texts, generated):
    server = start_server(bundle=Path(marian_bundle))
    _, tokenizer = reference(marian_checkpoint)
    texts = marian_texts[:40]
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        for beam_size in (1, 4):
            options = pb.TranslateOptions(beam_size=beam_size, max_length=MAX_NEW_TOKENS)
            response = stub.Translate(pb.TranslateRequest(texts=texts, options=options), timeout=60)
            expected = generated[beam_size][: len(texts)]
            assert [list(t.hypotheses[0].tokens) for t in response.translations] == expected
            assert [t.hypotheses[0].text for t in response.translations] == tokenizer.batch_decode(expected, skip_special_tokens=True)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert info.name == "marian-shared" and info.dimensions.d_model == 32


def test_a_multilingual_checkpoint_serves_each_target_language(start_server, marian_pairs, marian_texts, tmp_path, capsys,
                                                                monkeypatch):
    checkpoint = build_checkpoint(tmp_path / "multilingual", marian_pairs, separate_vocabs=False, pytorch_bin=False,
                                  languages=("fr", "de", "es"))
    bundle = tmp_path / "bundle"
    assert main(["import-marian", str(checkpoint), "--out", str(bundle)]) == 0
    tokens = {"fr": ">>fr<<", "de": ">>de<<", "es": ">>es<<"}
    assert read_bundle(bundle).manifest["languages"] == {"source": "en", "target": ["fr", "de", "es"], "target_tokens": tokens}
    vocab = json.loads((checkpoint / "vocab.json").read_text())
    texts = marian_texts[:12]
    server = start_server(bundle=bundle)
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert list(info.target_languages) == ["fr", "de", "es"]

        def ask(texts: list[str], language: str = "") -> list[pb.Translation]:
            options = pb.TranslateOptions(max_length=MAX_NEW_TOKENS, target_language=language)
            return list(stub.Translate(pb.TranslateRequest(texts=texts, options=options), timeout=60).translations)

        outputs, words = {}, {}
        for language in ("de", "es"):
            # As transformers is asked: the language's token typed before the text.
            expected = generate(checkpoint, [f"{tokens[language]} {text}" for text in texts], beams=1)
            translations = ask(texts, language)
            assert [list(t.hypotheses[0].tokens) for t in translations] == expected
            assert {t.source_tokens[0] for t in translations} == {vocab[tokens[language]]}
            outputs[language], words[language] = expected, [t.hypotheses[0].text for t in translations]
        assert outputs["de"] != outputs["es"]  # the token steers the model
        # No target_language: the model's first, unless the text begins with a language token of its own.
        default, typed = ask([texts[0], f">>es<< {texts[1]}"])
        assert default.source_tokens[0] == vocab[">>fr<<"] and list(default.hypotheses[0].tokens) == generate(checkpoint, [f">>fr<< {texts[0]}"], 1)[0]
        assert typed.source_tokens == ask([texts[1]], "es")[0].source_tokens and list(typed.hypotheses[0].tokens) == outputs["es"][1]
        with pytest.raises(grpc.RpcError) as caught:
            ask(texts[:1], "it")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "options.target_language: 'it' is not one of this model's target languages (fr, de, es)" in caught.value.details()
    # In-process, the same choice: the engine, and the command that uses it.
    engine = Engine.from_path(bundle, device="cpu", capacity=16)
    in_process = translate(engine, engine.encode_texts(texts, "es"), DecodeOptions(max_length=MAX_NEW_TOKENS))
    assert [h[0].tokens for h in in_process] == outputs["es"]
    capsys.readouterr()
    assert main(["translate", "--bundle", str(bundle), "--target-language", "de", "--max-length", str(MAX_NEW_TOKENS), *texts[:3]]) == 0
    assert capsys.readouterr().out.splitlines() == words["de"][:3]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(texts[:3]).encode())))  # no file descriptor
    assert main(["translate", "--bundle", str(bundle), "--target-language", "de", "--max-length", str(MAX_NEW_TOKENS)]) == 0
    assert capsys.readouterr().out.splitlines() == words["de"][:3]
    assert main(["translate", "--bundle", str(bundle), "--target-language", "it", texts[0]]) == 2
    assert "'it' is not one of this model's target languages (fr, de, es)" in capsys.readouterr().err


def _write_safetensors_with(directory: Path, name: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(directory / "model.safetensors"))
    save_file({**weights, name: tensor}, str(directory / "model.safetensors"))


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("change, message", [
    (lambda d: _edit_config(d, activation_function="gelu"), r"activation_function 'gelu' is not supported"),
    (lambda d: _edit_config(d, normalize_before=True), r"pre-norm layers \(normalize_before\) is not supported"),
    (lambda d: _edit_config(d, model_type="bart"), r"model_type is 'bart'; only 'marian'"),
    (lambda d: _write_safetensors_with(d, "model.encoder.layer_norm.weight", torch.ones(32)),
     r"weights of an unsupported variant: model\.encoder\.layer_norm\.weight"),
    (lambda d: (d / "source.spm").unlink(), r"source\.spm: missing"),
    (lambda d: (d / "vocab.json").unlink(), r"vocab\.json: missing"),
    (lambda d: (d / "config.json").unlink(), r"config\.json: missing"),
    (lambda d: (d / "model.safetensors").unlink(), r"no weights; expected model\.safetensors or pytorch_model\.bin"),
    (lambda d: ((d / "model.safetensors").unlink(), torch.save({"code": argparse.Namespace()}, d / "pytorch_model.bin")),
     r"pytorch_model\.bin: holds more than tensors, refused"),
    (lambda d: _edit_config(d, vocab_size=None), r"config\.json: vocab_size must be a number, got None"),
], ids=["activation", "pre-norm", "model-type", "extra-weights", "source-spm", "vocab", "config", "weights", "pickled-object",
        "no-vocab-size"])
def test_unsupported_checkpoints_are_refused_naming_what(change, message, marian_checkpoint, tmp_path):
    copy = tmp_path / "checkpoint"
    shutil.copytree(marian_checkpoint, copy)
    change(copy)
    with pytest.raises(MarianImportError, match=message):
        load_marian(copy)


def test_import_command_reports_a_refusal(marian_checkpoint, tmp_path, capsys):
    copy = tmp_path / "checkpoint"
    shutil.copytree(marian_checkpoint, copy)
    _edit_config(copy, activation_function="gelu_new")
    assert main(["import-marian", str(copy), "--out", str(tmp_path / "bundle")]) == 1
    assert "activation_function 'gelu_new' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()


def test_bench_serve_makes_its_texts_from_a_marian_vocabulary(marian_bundle):
    engine = Engine.from_path(marian_bundle, device="cpu", capacity=1)
    texts = made_up_texts(engine, 4, 5)
    assert len(texts) == 4 and all(len(text.split()) == 5 for text in texts)
