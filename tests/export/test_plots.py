"""`nmtserve plot` on a checkpoint whose translations run to the model's length limit, as an early one's do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nmtserve.bundle import EOS_ID
from nmtserve_export.checkpoint import save_checkpoint
from nmtserve_export.model import Transformer, model_config
from nmtserve_export.tokenizer import train_tokenizer

MAX_LEN = 12


@pytest.fixture(scope="module")
def endless_run(tmp_path_factory) -> Path:
    """An untrained tiny model that never ends a translation (its <eos> logit is -1e9), saved as a checkpoint."""
    tokenizer = train_tokenizer(["Friday", "Freitag", "May 16, 2003", "16. Mai 2003"], vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=tokenizer.get_vocab_size(), max_len=MAX_LEN, logits_bias=True))
    with torch.no_grad():
        model.logits_bias[EOS_ID] = -1e9
    run = tmp_path_factory.mktemp("endless-run")
    optimizer = torch.optim.Adam(model.parameters())
    save_checkpoint(run, model, tokenizer, {"corpus": {"kind": "cldr", "source_lang": "en", "target_lang": "de"}}, optimizer, 0, [])
    return run


def plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nmtserve.cli", "plot", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_a_translation_cut_at_the_length_limit_is_drawn_without_an_eos_row(endless_run):
    from nmtserve_export.checkpoint import load_model
    from nmtserve_export.plots import plot_attention

    model, tokenizer, _ = load_model(endless_run)
    plot_attention(model, tokenizer, "Friday", endless_run)
    # A row per generated token (MAX_LEN of them, the last never fed), none for an <eos> that never came.
    assert model.decoder_layers[-1].src_attn.attention.shape[2] == MAX_LEN
    result = plot(endless_run, "--sentence", "Friday")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (endless_run / "alignment.png").stat().st_size > 0


def test_a_sentence_longer_than_the_model_reads_is_refused_in_one_line(endless_run):
    result = plot(endless_run, "--sentence", "Friday " * 20)
    assert (result.returncode, result.stderr) == (2, "nmtserve plot: --sentence: 40 tokens, the model reads at most 12\n")
