"""The training-side subcommands, end to end on tiny settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch


def nmtserve(*args: str, **environment: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "nmtserve.cli", *map(str, args)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **environment})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_corpus_writes_three_splits(tmp_path):
    nmtserve("corpus", "--corpus-size", "500", "--valid-size", "50", "--test-size", "50", "--out", tmp_path)
    lengths = {name: len((tmp_path / f"{name}.tsv").read_text().splitlines()) for name in ("train", "valid", "test")}
    assert lengths == {"train": 400, "valid": 50, "test": 50}


def refused(*args: str) -> list[str]:
    """The stderr lines of a command that must fail; its exit status first."""
    result = subprocess.run([sys.executable, "-m", "nmtserve.cli", *map(str, args)], capture_output=True, text=True, timeout=120)
    return [str(result.returncode), *result.stderr.splitlines()]


def test_train_refuses_settings_that_cannot_train_before_any_work(tmp_path):
    assert refused("train", "--out", tmp_path / "run", "--warmup-steps", "0", "--valid-every", "0", "--target-lang", "xx") == [
        "2", "nmtserve train: --warmup-steps must be at least 1", "nmtserve train: --valid-every must be at least 1",
        "nmtserve train: --target-lang: unknown locale 'xx' (a Babel locale such as de, fr_CA or zh_Hant)"]
    assert not (tmp_path / "run").exists()


def test_mistakes_end_in_one_line_naming_them(tmp_path):
    assert refused("corpus", "--corpus-size", "500", "--out", tmp_path) == [
        "2", "nmtserve corpus: --corpus-size 500 leaves no training pairs after --valid-size 1000 and --test-size 1000"]
    assert refused("corpus", "--target-lang", "de,fr", "--out", tmp_path) == [
        "2", "nmtserve corpus: --target-lang de,fr: a TSV file holds one target language; write one directory per language"]
    assert refused("train", "--target-lang", "de,de", "--out", tmp_path / "run") == [
        "2", "nmtserve train: --target-lang de,de: a language is named twice"]
    assert refused("train", "--vocab-size", "100", "--out", tmp_path / "run") == [
        "2", "nmtserve train: --vocab-size must be at least 260 (the 256 bytes and the 4 special tokens), not 100"]
    assert refused("evaluate", tmp_path, "--beam-sizes", "1", "0", "--limit", "-5", "--threads", "-1") == [
        "2", "nmtserve evaluate: --beam-sizes 0: a beam holds at least 1 hypothesis",
        "nmtserve evaluate: --limit must be 0 (all) or a number of pairs, not -5",
        "nmtserve evaluate: --threads must be 0 (all cores) or a number of threads, not -1"]
    assert refused("evaluate", tmp_path) == [
        "1", f"nmtserve evaluate: {tmp_path} is not a checkpoint: config.json is missing (train one with 'nmtserve train')"]
    assert refused("train", "--corpus", tmp_path / "missing.tsv", "--out", tmp_path / "run") == [
        "2", f"nmtserve train: --corpus {tmp_path / 'missing.tsv'}: no such file"]
    (tmp_path / "my.tsv").write_text("Friday\tFreitag\n")
    assert refused("train", "--corpus", tmp_path / "my.tsv", "--target-lang", "de,fr", "--out", tmp_path / "run") == [
        "2", "nmtserve train: --target-lang de,fr: a --corpus file has one target language (several need the built-in corpus)"]
    assert not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_is_refused_in_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("notes")
    assert refused("corpus", "--out", afile) == [
        "2", f"nmtserve corpus: --out {afile} is a file; name a directory for train.tsv, valid.tsv and test.tsv"]
    assert refused("train", "--out", afile) == ["2", f"nmtserve train: --out {afile} is a file; name a directory for the checkpoint"]
    assert refused("bench-engine", tmp_path, "--out", afile) == [
        "2", f"nmtserve bench-engine: --out {afile} is a file; name a directory for bench_engine.json and bench_engine.png"]
    inside = afile / "run"  # a path through a file: mkdir would fail with NotADirectoryError
    assert refused("corpus", "--out", inside) == [
        "2", f"nmtserve corpus: --out {inside} is inside {afile}, a file; name a directory for train.tsv, valid.tsv and test.tsv"]
    assert refused("train", "--out", inside) == [
        "2", f"nmtserve train: --out {inside} is inside {afile}, a file; name a directory for the checkpoint"]
    assert afile.read_text() == "notes"


def test_a_checkpoint_missing_a_file_is_named_in_one_line(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "model.safetensors").unlink()
    missing = f"{run} is not a checkpoint: model.safetensors is missing (train one with 'nmtserve train')"
    assert refused("export", run, "--out", tmp_path / "bundle") == ["1", f"nmtserve export: {missing}"]
    assert refused("evaluate", run, "--limit", "5") == ["1", f"nmtserve evaluate: {missing}"]
    assert refused("plot", run) == ["1", f"nmtserve plot: {missing}"]


def test_a_checkpoint_whose_last_save_was_interrupted_is_refused_as_resume_refuses_it(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "save": "another"}))  # the configuration of another save
    for command in ("export", "evaluate"):
        status, line = refused(command, run, *(["--out", tmp_path / "bundle"] if command == "export" else []))
        assert status == "1" and line.startswith(f"nmtserve {command}: {run}: its last save was interrupted, and its files "
                                                 "are of different saves (model.safetensors: ")
        assert line.endswith(", config.json: another); train again")
    assert line.replace("nmtserve evaluate: ", "nmtserve train: --resume: ") in refused("train", "--out", run, "--resume")
    (run / "config.json").write_text(json.dumps(config))
    (run / "tokenizer.json").write_text((run / "tokenizer.json").read_text() + " ")
    assert refused("evaluate", run) == ["1", f"nmtserve evaluate: {run}: its last save was interrupted, and its tokenizer.json "
                                             "is not the one its training state was saved with; train again"]
    assert not (tmp_path / "bundle").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a PyTorch that sees no GPU")
def test_a_gpu_that_pytorch_cannot_see_is_refused_before_any_work(tmp_path):
    reason = (f"--device cuda: PyTorch sees no usable GPU (torch {torch.__version__}, "
              + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build")
              + "); use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU")
    assert refused("train", "--device", "cuda", "--out", tmp_path / "run") == ["2", f"nmtserve train: {reason}"]
    assert refused("evaluate", tmp_path, "--device", "cuda") == ["2", f"nmtserve evaluate: {reason}"]
    # With a bundle it is ONNX Runtime that decodes, and that names the GPU it cannot use.
    status, line = refused("evaluate", tmp_path, "--bundle", tmp_path, "--device", "cuda")
    assert status == "2" and line.startswith("nmtserve evaluate: --device cuda: no usable GPU (ONNX Runtime providers: ")
    assert not (tmp_path / "run").exists()


def test_train_then_evaluate(tmp_path):
    run = tmp_path / "run"
    nmtserve("train", "--out", run, "--preset", "tiny", "--corpus-size", "800", "--valid-size", "50", "--test-size", "50",
             "--vocab-size", "300", "--steps", "6", "--valid-every", "3", "--valid-decode", "5", "--max-tokens", "512")
    assert (run / "model.safetensors").stat().st_size > 0
    history = json.loads((run / "train_state.json").read_text())["history"]
    assert [r["step"] for r in history] == [3, 6]
    result = nmtserve("evaluate", run, "--limit", "10", "--json")
    scores = json.loads(result.stdout)
    assert scores["test_pairs"] == 10 and set(scores) >= {"greedy", "beam4"}
    assert 0 <= scores["greedy"]["exact_match"] <= 1 and scores["greedy"]["tokens_per_second"] > 0
    assert "scores" not in json.loads((run / "config.json").read_text())  # a part of the test set: not the checkpoint's scores
    scores = json.loads(nmtserve("evaluate", run, "--beam-sizes", "1", "--json").stdout)
    assert scores["test_pairs"] == 50
    assert json.loads((run / "config.json").read_text())["scores"]["greedy"]["bleu"] == scores["greedy"]["bleu"]
    beam = json.loads(nmtserve("evaluate", run, "--beam-sizes", "2", "--json").stdout)
    stored = json.loads((run / "config.json").read_text())["scores"]
    assert stored["greedy"] == scores["greedy"] and stored["beam2"] == beam["beam2"]  # another beam size adds its own


def test_ctrl_c_during_training_says_in_one_line_where_the_last_save_is(tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "nmtserve.cli", "train", "--out", str(run), "--preset", "tiny", "--corpus-size", "800",
         "--valid-size", "50", "--test-size", "50", "--vocab-size", "300", "--steps", "100000", "--valid-every", "5",
         "--valid-decode", "0", "--max-tokens", "512", "--threads", "1"],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "train_state.json").is_file():
            assert process.poll() is None and time.monotonic() < deadline, "no save"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    step = json.loads((run / "train_state.json").read_text())["step"]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1] == f"nmtserve train: interrupted; the last save is step {step} in {run}; continue with --resume"


def test_a_bundle_that_cannot_be_written_or_read_ends_in_one_line(tiny_run, tiny_bundle, tmp_path):
    (tmp_path / "notes.txt").write_text("not a bundle")
    assert refused("export", tiny_run, "--out", tmp_path) == [
        "1", f"nmtserve export: {tmp_path}: exists and is not a bundle; export into a new or empty directory, or over an "
             "earlier bundle"]
    assert (tmp_path / "notes.txt").read_text() == "not a bundle"
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "encoder.onnx").write_bytes(b"")
    status, line = refused("evaluate", tiny_run, "--bundle", broken, "--limit", "5")
    assert (status, line) == ("1", "nmtserve evaluate: encoder.onnx: 0 bytes, the manifest says "
                                   f"{(tiny_bundle / 'encoder.onnx').stat().st_size}")


def test_evaluate_refuses_a_bundle_of_another_run_and_takes_one_of_another_save(tiny_run, tiny_bundle, tmp_path):
    """Another model's scores on this test set, which it may have trained on, would pass for this one's; a bundle of the
    same run's other save held out the same pairs."""
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    bundles = {"other-save": {"checkpoint_save": "another"},
               "other-run": {"corpus": {**manifest["training"]["corpus"], "seed": -1}}}
    for name, training in bundles.items():
        shutil.copytree(tiny_bundle, tmp_path / name)
        (tmp_path / name / "manifest.json").write_text(json.dumps({**manifest, "training": {**manifest["training"], **training}}))
    other = tmp_path / "other-run"
    status, line = refused("evaluate", tiny_run, "--bundle", other, "--limit", "5")
    assert (status, line) == ("1", f"nmtserve evaluate: {other} was not exported from the run of {tiny_run}: its model was "
                                   f"trained on another corpus; export this checkpoint (nmtserve export {tiny_run} --out DIR), "
                                   f"or evaluate the one {other} was exported from")
    for bundle in (tiny_bundle, tmp_path / "other-save"):
        scores = json.loads(nmtserve("evaluate", tiny_run, "--bundle", bundle, "--beam-sizes", "1", "--limit", "5", "--json").stdout)
        assert scores["test_pairs"] == 5 and scores["decoder"] == f"onnxruntime:{bundle}"


def test_a_tsv_corpus_is_found_from_any_directory_and_a_changed_one_is_refused(tmp_path):
    from nmtserve_export.corpus import generate_corpus, write_tsv

    write_tsv(generate_corpus(300, seed=1), tmp_path / "my.tsv")
    run = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "nmtserve.cli", "train", "--out", "run", "--corpus", "my.tsv", "--preset", "tiny",
         "--valid-size", "20", "--test-size", "20", "--vocab-size", "300", "--steps", "2", "--valid-every", "2",
         "--valid-decode", "0", "--max-tokens", "512"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads(nmtserve("evaluate", run, "--beam-sizes", "1", "--json").stdout)["test_pairs"] == 20  # from elsewhere
    with (tmp_path / "my.tsv").open("a") as corpus:  # one more line: the splits would move
        corpus.write("one more line\teine Zeile mehr\n")
    result = subprocess.run([sys.executable, "-m", "nmtserve.cli", "evaluate", str(run)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"nmtserve evaluate: {(tmp_path / 'my.tsv').resolve()} has changed since the model was trained on it")


def test_plot_writes_every_picture(tiny_run):
    result = nmtserve("plot", NMTSERVE_OUT=str(tiny_run))  # where train wrote, by the same variable
    for name in ("positional_encoding.png", "training.png", "encoder_self_attention.png", "alignment.png"):
        path = tiny_run / name
        assert str(path) in result.stdout
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_export_then_translate_in_process(tiny_run, tmp_path):
    bundle = tmp_path / "bundle"
    nmtserve("export", tiny_run, "--out", bundle)
    result = nmtserve("translate", "--bundle", bundle, "--device", "cpu", "--beam-size", "2", "--n-best", "2", "--json", "Friday", "May 2003")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["source"] for line in lines] == ["Friday", "May 2003"]
    assert all(len(line["hypotheses"]) == 2 for line in lines)
