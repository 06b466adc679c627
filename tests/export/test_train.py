"""Training, checkpoints, resuming, the tokenizer."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

import babel
import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from nmtserve.bundle import BOS_ID, EOS_ID
from nmtserve_export import checkpoint
from nmtserve_export.checkpoint import NotACheckpointError, load_model, read_metadata
from nmtserve_export.corpus import CorpusError, Pair, file_sha256, generate_corpus
from nmtserve_export.data import encode_sources, encode_targets, make_batch, token_batches
from nmtserve_export.decode import greedy_search
from nmtserve_export.evaluate import held_out_pairs
from nmtserve_export.tokenizer import train_tokenizer
from nmtserve_export.model import Transformer, model_config
from nmtserve_export.train import TrainingInterrupted, TrainSettings, TrainSettingsError, learning_rate, load_splits, optimizer_step, train, validate


def test_learning_rate_warms_up_then_decays_as_the_paper():
    peak, warmup = 2e-3, 100
    assert learning_rate(50, peak, warmup) == peak / 2
    assert learning_rate(100, peak, warmup) == peak
    assert abs(learning_rate(400, peak, warmup) - peak / 2) < 1e-12  # 1/sqrt(step) decay


def test_token_batches_respect_the_budget_and_cover_everything():
    import random

    sources = [[5] * n for n in range(1, 60)] * 3
    targets = [[5] * (n + 2) for n in range(1, 60)] * 3
    batches = token_batches(sources, targets, max_tokens=200, rng=random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(len(sources)))
    for batch in batches:
        assert len(batch) * max(max(len(sources[i]), len(targets[i])) for i in batch) <= 200 or len(batch) == 1


def test_tokenizer_round_trip_is_lossless_on_the_generated_corpus(default_corpus):
    texts = [text for pair in default_corpus for text in (pair.source, pair.target)]
    tokenizer = train_tokenizer(texts[:20000], vocab_size=1000)
    decoded = tokenizer.decode_batch([e.ids for e in tokenizer.encode_batch(texts)])
    mismatches = [(t, d) for t, d in zip(texts, decoded) if t != d]
    assert not mismatches, mismatches[:5]
    assert tokenizer.token_to_id("<pad>") == 0 and tokenizer.token_to_id("<unk>") == 3
    assert tokenizer.encode("1234").tokens == ["1", "2", "3", "4"]  # digits one by one
    # Special tokens' names in a corpus are text, as the server reads them, not ids that end or blank a sentence.
    assert not {0, 1, 2, 3} & set(tokenizer.encode("see <eos> or <pad>").ids)


def test_tiny_model_overfits_a_small_corpus(tmp_path):
    pairs = generate_corpus(2000, seed=3)[:32]
    corpus = tmp_path / "small.tsv"
    corpus.write_text("".join(f"{p.source}\t{p.target}\n" for p in pairs))
    settings = TrainSettings(
        out=tmp_path / "run", preset="tiny", corpus=corpus, valid_size=1, test_size=1, vocab_size=300,
        max_tokens=4096, steps=500, warmup_steps=50, peak_lr=4e-3, valid_every=1000, valid_decode=0, threads=1,
    )
    model, tokenizer, _ = load_model(train(settings))
    train_pairs = load_splits(settings).train
    outputs = tokenizer.decode_batch(greedy_search(model, encode_sources(tokenizer, [p.source for p in train_pairs])))
    assert outputs == [p.target for p in train_pairs]


def test_a_reloaded_checkpoint_scores_as_it_did_when_saved(tiny_run):
    model, tokenizer, metadata = load_model(tiny_run)
    settings = TrainSettings(**metadata["training"]["settings"])
    valid = load_splits(settings).valid
    scores = validate(model, tokenizer, valid, encode_sources(tokenizer, [p.source for p in valid], [p.language for p in valid]),
                      encode_targets(tokenizer, [p.target for p in valid]), n_decode=0, max_tokens=settings.max_tokens)
    saved = json.loads((tiny_run / "train_state.json").read_text())["history"][-1]  # validated just before the last save
    assert scores["valid_loss"] == pytest.approx(saved["valid_loss"], rel=1e-5)


def test_training_is_reproducible_and_resumable(tmp_path):
    # Two batches a step: a resumed run must replay both of each step before it.
    common = dict(preset="tiny", corpus_size=1500, valid_size=50, test_size=50, vocab_size=300, max_tokens=512, accumulate=2,
                  warmup_steps=10, valid_every=10, valid_decode=0, threads=1)
    straight = train(TrainSettings(out=tmp_path / "straight", steps=20, **common))
    first_half = json.loads((train(TrainSettings(out=tmp_path / "resumed", steps=10, **common)) / "train_state.json").read_text())
    resumed = train(TrainSettings(out=tmp_path / "resumed", steps=20, resume=True, **common))
    # It went on from step 10 (the same weights could also come of starting again with the same seed).
    assert json.loads((resumed / "train_state.json").read_text())["history"][:1] == first_half["history"]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # A resumed run keeps its start's settings: another seed would replay other batches on these weights.
    other_seed = TrainSettings(out=resumed, steps=30, resume=True, **{**common, "seed": 1})
    (problem,) = other_seed.resume_problems()
    assert problem.startswith("--resume: --seed is 1, but the run in") and "started with 0" in problem
    with pytest.raises(ValueError, match="--seed is 1"):
        train(other_seed)
    # A save cut short between its renames, refused before any work: first a tokenizer other than the state's,
    again = TrainSettings(out=resumed, steps=30, resume=True, **common)
    tokenizer = (resumed / "tokenizer.json").read_bytes()
    (resumed / "tokenizer.json").write_bytes(tokenizer + b" ")
    assert again.resume_problems() == [f"--resume: {resumed}: its last save was interrupted, and its tokenizer.json is not "
                                       "the one its training state was saved with; train again"]
    (resumed / "tokenizer.json").write_bytes(tokenizer)
    # then the weights of another run's save at the same step (a new run into this --out),
    (straight / "model.safetensors").replace(resumed / "model.safetensors")
    (problem,) = again.resume_problems()
    assert "its last save was interrupted, and its files are of different saves (model.safetensors: " in problem
    # then weights of step 20 beside a training state of step 10.
    state = resumed / "train_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 10}))
    with pytest.raises(ValueError, match=r"its last save was interrupted.*model.safetensors: 20.*train_state.json: 10"):
        train(again)
    # Every file of a checkpoint is as readable as the umask lets config.json be (safetensors' own were private).
    modes = {path.name: path.stat().st_mode & 0o777 for path in straight.iterdir() if path.is_file()}
    assert set(modes.values()) == {modes["config.json"]}, modes


def test_training_steps_with_the_papers_adam(tmp_path):
    """Adam with beta1 0.9, beta2 0.98 and eps 1e-9 (the paper's section 5.3; DESIGN.md): seen on the optimizer that
    train() steps with, over every parameter, and in the moments it saves after one step."""
    stepped = []

    def record(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        stepped.append((type(optimizer), [(group["betas"], group["eps"]) for group in optimizer.param_groups],
                        sum(p.numel() for group in optimizer.param_groups for p in group["params"])))

    hook = register_optimizer_step_pre_hook(record)  # PyTorch's own hook on every optimizer's step(): nothing replaced
    try:
        run = train(TrainSettings(out=tmp_path / "run", preset="tiny", corpus_size=300, valid_size=20, test_size=20,
                                  vocab_size=300, max_tokens=512, steps=1, warmup_steps=1, valid_every=1, valid_decode=0,
                                  threads=1))
    finally:
        hook.remove()
    parameters = sum(p.numel() for p in load_model(run)[0].parameters())
    assert stepped == [(torch.optim.Adam, [((0.9, 0.98), 1e-9)], parameters)]
    # After one step of gradient g, m = (1 - beta1) g and v = (1 - beta2) g^2: m^2 / v = 0.1^2 / 0.02 = 0.5.
    state = load_file(str(run / "train_state.safetensors"))
    m = torch.cat([state[key].flatten() for key in sorted(state) if key.endswith(".exp_avg")])
    v = torch.cat([state[key].flatten() for key in sorted(state) if key.endswith(".exp_avg_sq")])
    moved = v > 1e-30  # a gradient, and one whose square float32 holds
    assert m.numel() == v.numel() == parameters and moved.sum() > parameters // 2
    assert torch.allclose(m[moved] ** 2, 0.5 * v[moved], rtol=1e-4, atol=0.0)


def test_accumulated_batches_make_the_step_of_one_batch_holding_them_all():
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=40, dropout=0.0))
    twin, before = copy.deepcopy(model), copy.deepcopy(model)
    sources = [[5, 6, 7, EOS_ID], [8, EOS_ID], [9, 10, 11, 12, 13, EOS_ID]]
    targets = [[BOS_ID, 14, 15, EOS_ID], [BOS_ID, 16, 17, 18, 19, 20, EOS_ID], [BOS_ID, 21, EOS_ID]]
    # Batches of different sizes and padding: a plain mean of their losses would weight their tokens unequally.
    split = [make_batch(sources[:1], targets[:1]), make_batch(sources[1:], targets[1:])]
    whole = make_batch(sources, targets)
    summed = optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.5), split, label_smoothing=0.1, clip_norm=0.0)
    single = optimizer_step(twin, torch.optim.SGD(twin.parameters(), lr=0.5), [whole], label_smoothing=0.1, clip_norm=0.0)
    assert summed == pytest.approx(single, rel=1e-5)
    for (name, accumulated), (_, one) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.allclose(accumulated, one, atol=1e-6), name
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))  # the step moved them


def test_settings_that_cannot_train_are_named():
    settings = TrainSettings(warmup_steps=0, valid_size=0, label_smoothing=1.0, corpus_size=100, test_size=100)
    assert settings.problems() == [
        "--valid-size must be at least 1", "--warmup-steps must be at least 1",
        "--label-smoothing must be in [0, 1), not 1.0",
        "--corpus-size 100 leaves no training pairs after --valid-size 0 and --test-size 100",
    ]
    assert TrainSettings().problems() == []


def test_a_tsv_too_small_to_hold_out_from_is_named(tmp_path):
    corpus = tmp_path / "small.tsv"
    corpus.write_text("".join(f"source {i}\ttarget {i}\n" for i in range(3)), encoding="utf-8")
    with pytest.raises(TrainSettingsError) as caught:
        load_splits(TrainSettings(corpus=corpus, valid_size=2, test_size=1))
    assert caught.value.problems == [f"--corpus {corpus} has 3 pairs, which leaves none for training after --valid-size 2 "
                                     "and --test-size 1: give more pairs or hold out fewer"]


def test_a_pair_longer_than_max_length_is_refused_by_its_line(tmp_path):
    """One long TSV line made the positional table twice its length and a batch of its own: a 40,000-character pair
    took gigabytes in attention."""
    lines = [f"source {i}\ttarget {i}" for i in range(40)]
    lines[6] = "many words " * 40 + "\tviele Wörter"
    lines[30] = "few words\t" + "wenige Wörter " * 40
    corpus = tmp_path / "long.tsv"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = dict(preset="tiny", corpus=corpus, valid_size=2, test_size=2, vocab_size=300, steps=1, valid_decode=0, threads=1)
    with pytest.raises(TrainSettingsError) as caught:
        train(TrainSettings(out=tmp_path / "refused", max_length=64, **common))
    (problem,) = caught.value.problems
    assert re.fullmatch(rf"2 pair\(s\) longer than --max-length 64 tokens, which the model cannot read or write: "
                        rf"{re.escape(str(corpus))}:7 \(source, \d+ tokens\), {re.escape(str(corpus))}:31 \(target, \d+ tokens\); "
                        r"split or remove them, or raise --max-length", problem), problem
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    # Long enough, the pairs train, and the limit is the model's (its positional table, the bundle's limits).
    model, _, _ = load_model(train(TrainSettings(out=tmp_path / "trained", max_length=200, **common)))
    assert model.config.max_len == 200


def test_resume_refuses_a_corpus_file_that_is_not_the_one_the_run_started_on(tmp_path, monkeypatch):
    from nmtserve_export.corpus import write_tsv

    data = tmp_path / "data"
    data.mkdir()
    write_tsv(generate_corpus(300, seed=1), data / "my.tsv")
    common = dict(out=tmp_path / "run", preset="tiny", valid_size=20, test_size=20, vocab_size=300, max_tokens=512,
                  valid_every=2, valid_decode=0, threads=1)
    monkeypatch.chdir(data)
    train(TrainSettings(corpus="my.tsv", steps=2, **common))
    corpus = read_metadata(tmp_path / "run")["corpus"]
    assert (corpus["source_lang"], corpus["target_lang"]) == ("und", "und")  # a file's languages, not given: undetermined
    monkeypatch.chdir(tmp_path)  # the same file by another path: resumable
    assert TrainSettings(corpus="data/my.tsv", steps=4, resume=True, **common).resume_problems() == []
    (problem,) = TrainSettings(corpus="data/my.tsv", target_lang="fr", steps=4, resume=True, **common).resume_problems()
    assert problem.startswith(f"--resume: --target-lang is 'fr', but the run in {tmp_path / 'run'} was started with 'und'")
    (tmp_path / "copy.tsv").write_bytes((data / "my.tsv").read_bytes())  # the same bytes, another file
    (problem,) = TrainSettings(corpus="copy.tsv", steps=4, resume=True, **common).resume_problems()
    assert problem == f"--resume: --corpus {tmp_path / 'copy.tsv'} is not {data / 'my.tsv'}, the file the run in {tmp_path / 'run'} was started on"
    with (data / "my.tsv").open("a") as corpus:
        corpus.write("one more line\teine Zeile mehr\n")
    (problem,) = TrainSettings(corpus="data/my.tsv", steps=4, resume=True, **common).resume_problems()
    assert problem.startswith(f"--resume: {data / 'my.tsv'} has changed since the run in {tmp_path / 'run'} was started on it")
    (problem,) = TrainSettings(steps=4, resume=True, **common).resume_problems()
    assert problem.startswith(f"--resume: the run in {tmp_path / 'run'} was started on {data / 'my.tsv'}, not the built-in corpus")


def test_a_run_started_before_max_length_was_saved_resumes_with_its_models_length(tmp_path):
    """Its model's length was its own (twice its longest pair, at least 256): a resume must keep it, not take the default
    --max-length, which would silently give its weights another positional table."""
    common = dict(out=tmp_path / "run", preset="tiny", corpus_size=300, valid_size=20, test_size=20, vocab_size=300,
                  max_tokens=512, valid_every=2, valid_decode=0, threads=1)
    run = train(TrainSettings(steps=2, max_length=200, **common))
    config = json.loads((run / "config.json").read_text())
    config["training"]["settings"].pop("max_length", None)  # as the older code saved them
    (run / "config.json").write_text(json.dumps(config))
    assert TrainSettings(steps=4, resume=True, **common).resume_problems() == [
        f"--resume: --max-length is 256, but the run in {run} was started with 200; a resumed run keeps its corpus, model "
        "and optimisation (give the same, or a new --out)"]
    model, _, metadata = load_model(train(TrainSettings(steps=4, resume=True, max_length=200, **common)))
    assert model.config.max_len == 200 and metadata["training"]["settings"]["max_length"] == 200


def test_a_built_in_corpus_made_by_another_babel_is_not_made_again_in_its_place(tmp_path):
    """CLDR data changes between Babel releases: the corpus, and the held-out split, made again from another release's
    would not be the run's, and its test set could hold sentences the model trained on."""
    common = dict(out=tmp_path / "run", preset="tiny", corpus_size=300, valid_size=20, test_size=20, vocab_size=300,
                  max_tokens=512, valid_every=2, valid_decode=0, threads=1)
    run = train(TrainSettings(steps=2, **common))
    config = json.loads((run / "config.json").read_text())
    assert config["corpus"]["babel"] == babel.__version__
    assert held_out_pairs(config)  # made again here, by the same release
    config["corpus"]["babel"] = "2.0.0"
    (run / "config.json").write_text(json.dumps(config))
    problem = (f"the built-in corpus was generated with Babel 2.0.0, and this machine has Babel {babel.__version__}, whose "
               "CLDR data can make other pairs and splits: install the same (pip install 'babel==2.0.0')")
    assert TrainSettings(steps=4, resume=True, **common).resume_problems() == [f"--resume: {problem}, or start a new --out"]
    with pytest.raises(CorpusError, match=re.escape(problem)):
        held_out_pairs(config)


def test_a_run_started_before_the_split_rules_were_recorded_resumes_by_its_own(tmp_path):
    """Such a run's corpus metadata lacks the rules: a resume reads its file leniently (a bare CR, CSV quoting) and groups
    sources as written, as it was started, and records no rules that would have evaluate rebuild other splits."""
    lines = [f"Sentence {i}\tSatz {i}" for i in range(40)] + [f"Sentence\xa0{i} \tSatz {i}" for i in range(40)]
    corpus = tmp_path / "old.tsv"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = dict(out=tmp_path / "run", preset="tiny", corpus=corpus, valid_size=10, test_size=10, vocab_size=300,
                  max_tokens=512, valid_every=2, valid_decode=0, threads=1)
    run = train(TrainSettings(steps=2, **common))
    # What the older code had trained on: a file the new code reads strictly.
    lines += ["a bare\rCR\tein CR", '"He said ""hi""."\tEr sagte „hi“.']
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = json.loads((run / "config.json").read_text())
    config["corpus"].pop("split", None)
    config["corpus"]["sha256"] = file_sha256(corpus)
    (run / "config.json").write_text(json.dumps(config))

    model, tokenizer, metadata = load_model(train(TrainSettings(steps=4, resume=True, **common)))
    assert "split" not in metadata["corpus"]  # evaluate keeps rebuilding the old splits
    # Every source as written is distinct: the old rule held out the first 10 in sha1 order for test, the next 10 for valid.
    targets = dict(line.split("\t") for line in lines)
    in_order = sorted(targets, key=lambda s: hashlib.sha1(s.encode("utf-8")).digest())
    valid = [Pair(source, targets[source], "tsv") for source in in_order[10:20]]
    scores = validate(model, tokenizer, valid, encode_sources(tokenizer, [p.source for p in valid]),
                      encode_targets(tokenizer, [p.target for p in valid]), n_decode=0, max_tokens=512)
    saved = json.loads((run / "train_state.json").read_text())["history"][-1]
    assert saved["step"] == 4 and scores["valid_loss"] == pytest.approx(saved["valid_loss"], rel=1e-5)


def test_a_new_run_replaces_nothing_of_an_old_checkpoint_before_its_first_save(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}

    def interrupted(*args, **kwargs):  # Ctrl-C once the new tokenizer is trained, before the first step
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.optim, "Adam", interrupted)
    common = dict(preset="tiny", corpus_size=1500, valid_size=50, test_size=50, vocab_size=300, threads=1)
    with pytest.raises(TrainingInterrupted, match=re.escape(f"interrupted before this run's first save; {run} holds the "
                                                            "checkpoint it held before")):
        train(TrainSettings(out=run, **common))
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    with pytest.raises(TrainingInterrupted, match=re.escape(f"interrupted before the first save; nothing is saved in {tmp_path / 'new'}")):
        train(TrainSettings(out=tmp_path / "new", **common))


@pytest.mark.parametrize("removed", [["train_state.safetensors"], ["train_state.safetensors", "train_state.json"]])
def test_resume_refuses_a_checkpoint_without_its_training_state_rather_than_train_over_it(tiny_run, tmp_path, removed):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in removed:
        (run / name).unlink()
    weights = (run / "model.safetensors").read_bytes()
    settings = TrainSettings(out=run, preset="tiny", corpus_size=1500, valid_size=50, test_size=50, vocab_size=300, threads=1,
                             resume=True)
    with pytest.raises(TrainSettingsError) as caught:
        train(settings)
    assert caught.value.problems == [
        f"--resume: {run} holds a model that cannot be resumed: {' and '.join(removed)} {'is' if len(removed) == 1 else 'are'} "
        "missing; without --resume, a new run would replace it (to keep it, give another --out)"]
    assert (run / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("left", [[], ["tokenizer.json"], ["model.safetensors", "tokenizer.json"],
                                  ["model.safetensors", "tokenizer.json", "train_state.safetensors", "config.json"]],
                         ids=["mistyped", "older-codes-first-step", "first-save-cut-short", "first-save-cut-before-its-last-file"])
def test_resume_with_no_model_to_resume_starts_a_new_run_and_says_so(tiny_run, tmp_path, caplog, left):
    """Nothing there, or what a run stopped before its first whole save left (no configuration to go with weights): no
    model to lose, and `make demo`, which trains with --resume, must go on."""
    run = tmp_path / "run"
    if left:
        run.mkdir()
        for name in left:
            (run / name).write_bytes((tiny_run / name).read_bytes())
    with caplog.at_level("WARNING", logger="nmtserve_export"):
        train(TrainSettings(out=run, preset="tiny", corpus_size=300, valid_size=20, test_size=20, vocab_size=300, max_tokens=512,
                            steps=1, valid_every=1, valid_decode=0, threads=1, resume=True))
    assert f"nothing to resume in {run}; starting a new run" in caplog.messages
    assert json.loads((run / "train_state.json").read_text())["step"] == 1


def test_a_tsv_whose_repeated_sources_cannot_be_held_out_is_refused_before_training(tmp_path):
    """20 sentences, 60 copies each: no group fits in 50 pairs, and an empty validation split divided by zero at the
    first validation."""
    corpus = tmp_path / "repeated.tsv"
    corpus.write_text("".join(f"source {i}\ttarget {i}\n" for _ in range(60) for i in range(20)), encoding="utf-8")
    with pytest.raises(TrainSettingsError) as caught:
        load_splits(TrainSettings(corpus=corpus, valid_size=50, test_size=50))
    assert caught.value.problems == [
        f"--corpus {corpus}: nothing is held out for --{name}-size 50: all copies of a source go to one split, and its sources "
        f"repeat in groups of more than 50 pairs (the smallest left has 60); give --{name}-size 60 or more, or a corpus with "
        "fewer repeats" for name in ("test", "valid")]
    splits = load_splits(TrainSettings(corpus=corpus, valid_size=60, test_size=60))
    assert (len(splits.valid), len(splits.test)) == (60, 60)


def test_a_model_without_its_training_state_is_loaded_as_it_is(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ("train_state.safetensors", "train_state.json"):  # as a model is shipped: no save leaves both out
        (run / name).unlink()
    assert load_model(run)[2]["save"] == read_metadata(tiny_run)["save"]
    (run / "train_state.safetensors").write_bytes((tiny_run / "train_state.safetensors").read_bytes())
    with pytest.raises(NotACheckpointError, match="its last save was interrupted before train_state.json was written; train again"):
        load_model(run)


def test_a_ctrl_c_between_a_saves_renames_is_taken_once_the_save_is_whole(tiny_run, tmp_path, monkeypatch):
    """A save stopped between its renames would leave files of two saves that nothing loads; the Ctrl-C waits."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    model, tokenizer, metadata = load_model(run)
    optimizer = torch.optim.Adam(model.parameters())
    replace, renamed = Path.replace, []

    def renaming(self: Path, target: Path) -> Path:
        renamed.append(self.name)
        if len(renamed) == 2:  # the weights and the tokenizer in place, the rest not yet
            os.kill(os.getpid(), signal.SIGINT)
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", renaming)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: `make test &` ignores it
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save_checkpoint(run, model, tokenizer, {k: v for k, v in metadata.items() if k != "model"}, optimizer, 7, [])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(renamed) == len(checkpoint.FILES) and checkpoint.interrupted_save(run) is None
    assert json.loads((run / "train_state.json").read_text())["step"] == 7
