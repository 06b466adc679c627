"""`nmtserve bench-engine` end to end on the tiny model: every engine measured, ratios and picture written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def test_bench_engine_measures_pytorch_and_both_bundles(tiny_run, tiny_bundle, tiny_bundle_int8, tmp_path):
    checkpoint = tmp_path / "run"
    shutil.copytree(tiny_run, checkpoint)
    shutil.copytree(tiny_bundle, checkpoint / "bundle-fp32")  # the command exports these where they are missing
    shutil.copytree(tiny_bundle_int8, checkpoint / "bundle-int8")
    result = subprocess.run(
        [sys.executable, "-m", "nmtserve.cli", "bench-engine", str(checkpoint), "--batch-sizes", "1", "4",
         "--sentences", "8", "--length", "4", "--repeats", "2", "--threads", "1", "--streams", "2", "--out", str(tmp_path / "figures")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
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
