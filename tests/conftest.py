"""Session-wide fixtures: one tiny model trained on a small generated corpus, and its bundles."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_TRAINING = dict(
    preset="tiny",
    corpus_size=6000,
    valid_size=200,
    test_size=200,
    vocab_size=400,
    max_tokens=2048,
    steps=400,
    warmup_steps=100,
    peak_lr=3e-3,
    valid_every=200,
    valid_decode=50,
    threads=1,  # one thread: two OpenMP threads stall badly when another process takes a core
)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny Transformer trained for a few hundred steps (the checkpoint directory)."""
    from nmtserve_export.train import TrainSettings, train

    return train(TrainSettings(out=tmp_path_factory.mktemp("tiny-run"), **TINY_TRAINING))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    """The tiny model exported as an fp32 bundle."""
    from nmtserve_export.onnx_export import export_bundle

    return export_bundle(tiny_run, tmp_path_factory.mktemp("bundle") / "fp32")


@pytest.fixture(scope="session")
def tiny_bundle_int8(tiny_run, tmp_path_factory) -> Path:
    """The tiny model exported with int8 weights."""
    from nmtserve_export.onnx_export import export_bundle

    return export_bundle(tiny_run, tmp_path_factory.mktemp("bundle") / "int8", precision="int8")


@pytest.fixture(scope="session")
def default_corpus():
    """The built-in corpus at its default size (English -> German)."""
    from nmtserve_export.corpus import generate_corpus

    return generate_corpus(200_000)
