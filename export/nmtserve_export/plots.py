"""Pictures of a trained model, written as PNG next to it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from matplotlib.figure import Figure  # the object API: files only, no GUI backend
from tokenizers import Tokenizer

from nmtserve.bundle import BOS_ID

from .checkpoint import STATE_META_FILE, load_model
from .corpus import target_languages
from .data import encode_sources
from .decode import greedy_search
from .evaluate import held_out_pairs
from .model import PositionalEncoding, Transformer


def plot_positional_encoding(d_model: int, path: Path, max_len: int = 100) -> Path:
    """Heatmap of the sinusoidal positional encoding (positions x dimensions)."""
    pe = PositionalEncoding(d_model, max_len).pe.numpy()
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    image = ax.imshow(pe, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    ax.set(xlabel="dimension", ylabel="position", title=f"Sinusoidal positional encoding (d_model={d_model})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_training(history: list[dict], path: Path) -> Path:
    """Training and validation loss against steps, and validation exact match against training minutes."""
    fig = Figure(figsize=(11, 4))
    loss_ax, em_ax = fig.subplots(1, 2)
    steps = [r["step"] for r in history]
    loss_ax.plot(steps, [r["train_loss"] for r in history], label="training (label-smoothed)")
    loss_ax.plot(steps, [r["valid_loss"] for r in history], label="validation (cross-entropy)")
    loss_ax.set(xlabel="step", ylabel="loss per target token", title="Loss", yscale="log")
    loss_ax.legend()
    minutes = [r["seconds"] / 60 for r in history if "valid_exact_match" in r]
    em_ax.plot(minutes, [100 * r["valid_exact_match"] for r in history if "valid_exact_match" in r], marker="o")
    em_ax.axhline(98, color="grey", linestyle="--", linewidth=1, label="98% target")
    em_ax.set(xlabel="training time (minutes)", ylabel="exact match (%)", title="Validation exact match (greedy)", ylim=(0, 100))
    em_ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


class SentenceError(ValueError):
    """A sentence the model cannot read: longer than its source limit."""


def _pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False) or tokenizer.id_to_token(i) for i in ids]


@torch.inference_mode()
def plot_attention(model: Transformer, tokenizer: Tokenizer, sentence: str, directory: Path, language: str = "") -> list[Path]:
    """Encoder self-attention of every head (last layer) and the encoder-decoder attention (alignment); `language`:
    the target a multilingual model is asked for."""
    source = encode_sources(tokenizer, [sentence], [language])[0]
    if len(source) > model.config.max_len:  # past the positional table; in the words `translate` refuses it with
        raise SentenceError(f"{len(source)} tokens, the model reads at most {model.config.max_len}")
    output = greedy_search(model, [source])[0]
    # A row per generated token, as the search fed it, and one for <eos> where the search ended with it: a translation
    # cut at the model's limit has no <eos>, and its last token was never fed (nor has it a position to be fed at).
    ended = len(output) < model.config.max_len
    target_in = torch.tensor([[BOS_ID] + (output if ended else output[:-1])])  # (1, T)
    model(torch.tensor([source]), target_in)  # fills each MultiHeadAttention's .attention
    src_labels = _pieces(tokenizer, source)
    tgt_labels = _pieces(tokenizer, output) + (["<eos>"] if ended else [])

    encoder_attention = model.encoder_layers[-1].self_attn.attention[0]  # (h, S, S)
    h = encoder_attention.size(0)
    fig = Figure(figsize=(4 * h, 4.4))
    axes = fig.subplots(1, h)
    for head, ax in enumerate(axes):
        ax.imshow(encoder_attention[head].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(src_labels)), src_labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(src_labels)), src_labels, fontsize=7)
        ax.set_title(f"head {head + 1}")
    fig.suptitle(f"Encoder self-attention, layer {len(model.encoder_layers)}")
    fig.tight_layout()
    encoder_path = directory / "encoder_self_attention.png"
    fig.savefig(encoder_path, dpi=110)

    alignment = model.decoder_layers[-1].src_attn.attention[0].mean(0)  # (T, S), averaged over heads
    fig = Figure(figsize=(0.45 * len(src_labels) + 2, 0.45 * len(tgt_labels) + 2))
    ax = fig.subplots()
    ax.imshow(alignment.numpy(), cmap="Greys", vmin=0, vmax=1)
    ax.set_xticks(range(len(src_labels)), src_labels, rotation=90)
    ax.set_yticks(range(len(tgt_labels)), tgt_labels)
    ax.set(xlabel="source", ylabel="target (generated)", title="Encoder-decoder attention (last layer, mean of heads)")
    fig.tight_layout()
    alignment_path = directory / "alignment.png"
    fig.savefig(alignment_path, dpi=110)
    return [encoder_path, alignment_path]


def plot_all(checkpoint_dir: Path, *, sentence: str | None = None) -> list[Path]:
    """Every picture for a checkpoint; returns the files written."""
    checkpoint_dir = Path(checkpoint_dir)
    model, tokenizer, metadata = load_model(checkpoint_dir)
    paths = [plot_positional_encoding(model.config.d_model, checkpoint_dir / "positional_encoding.png")]
    state = checkpoint_dir / STATE_META_FILE
    if state.is_file():
        paths.append(plot_training(json.loads(state.read_text())["history"], checkpoint_dir / "training.png"))
    targets = target_languages(metadata["corpus"].get("target_lang", ""))
    language = targets[0] if len(targets) > 1 else ""  # a multilingual model's first, the server's default
    if sentence is None:
        sources = [p.source for p in held_out_pairs(metadata) if p.language == language]
        # A few words draw a readable map; a corpus of unspaced text (Chinese, Japanese) or short entries may have none.
        sentence = next((source for source in sources if len(source.split()) >= 4), sources[0])
    paths += plot_attention(model, tokenizer, sentence, checkpoint_dir, language)
    return paths
