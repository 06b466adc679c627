"""`nmtserve bench-engine` end to end on the tiny model: every engine measured, ratios and picture written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def bench_engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nmtserve.cli", "bench-engine", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_bench_engine_measures_pytorch_and_both_bundles(tiny_run, tiny_bundle, tiny_bundle_int8, tmp_path):
    checkpoint = tmp_path / "run"
    shutil.copytree(tiny_run, checkpoint)
    shutil.copytree(tiny_bundle, checkpoint / "bundle-fp32")  # the command exports these where they are missing
    shutil.copytree(tiny_bundle_int8, checkpoint / "bundle-int8")
    # One left from another model in the directory (its weights of another save) is measured no more: it is exported again.
    stale = checkpoint / "bundle-int8" / "manifest.json"
    manifest = json.loads(stale.read_text())
    stale.write_text(json.dumps({**manifest, "training": {**manifest["training"], "checkpoint_save": "another"}}))
    result = bench_engine(checkpoint, "--batch-sizes", "1", "4", "--sentences", "8", "--length", "4", "--repeats", "2",
                          "--threads", "1", "--streams", "2", "--out", tmp_path / "figures")
    assert result.returncode == 0, result.stderr
    assert f"{checkpoint / 'bundle-int8'}: not exported from this checkpoint: its weights are of another save" in result.stderr
    assert "bundle-fp32" not in result.stderr  # the checkpoint's own is kept
    saved = json.loads((checkpoint / "config.json").read_text())["save"]
    assert json.loads(stale.read_text())["training"]["checkpoint_save"] == saved
    report = json.loads((tmp_path / "figures" / "bench_engine.json").read_text())  # --out is made where missing
    assert set(report["tokens_per_second"]) == {"pytorch", "onnxruntime-fp32", "onnxruntime-int8"}
    for rates in report["tokens_per_second"].values():
        assert set(rates) == {"1", "4"} and all(rate > 0 for rate in rates.values())
    rates = report["tokens_per_second"]
    for name, ratios in report["ratio_to_pytorch"].items():  # each engine's rate over PyTorch's, batch size by batch size
        assert ratios == {b: pytest.approx(rates[name][b] / rates["pytorch"][b]) for b in ("1", "4")}
    assert report["decoder_threads"] == {"fp32": 1, "int8": 1}  # --threads 1: nothing to choose between
    assert report["streams"] == 2
    assert (tmp_path / "figures" / "bench_engine.png").stat().st_size > 0
    assert "onnxruntime-int8" in result.stdout


def test_bench_engine_refuses_what_it_cannot_measure_in_one_line(tiny_run, tmp_path):
    result = bench_engine(tmp_path / "nosuch")
    assert (result.returncode, result.stderr) == (
        1, f"nmtserve bench-engine: {tmp_path / 'nosuch'} is not a checkpoint: config.json is missing (train one with "
           "'nmtserve train')\n")
    assert not (tmp_path / "nosuch").exists()
    result = bench_engine(tmp_path, "--batch-sizes", "0", "4", "--repeats", "0", "--sentences", "0", "--threads", "-1")
    assert (result.returncode, result.stderr.splitlines()) == (2, [
        "nmtserve bench-engine: --batch-sizes 0: a batch holds at least 1 sentence",
        "nmtserve bench-engine: --sentences must be at least 1, not 0",
        "nmtserve bench-engine: --repeats must be at least 1, not 0",
        "nmtserve bench-engine: --threads must be 0 (all cores) or a number of threads, not -1"])
    result = bench_engine(tiny_run, "--length", "257", "--out", tmp_path / "figures")
    assert (result.returncode, result.stderr) == (2, "nmtserve bench-engine: --length 257: the model writes at most 256 tokens\n")
    assert not (tmp_path / "figures").exists()
