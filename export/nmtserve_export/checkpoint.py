"""Checkpoints as safetensors weights plus JSON (no pickle anywhere).

A checkpoint directory holds:
  model.safetensors   the Transformer's weights
  config.json         the model configuration and what produced it (corpus, training, scores)
  tokenizer.json      the shared subword vocabulary
  train_state.safetensors + train_state.json   optimizer and RNG state, for --resume
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from .model import ModelConfig, Transformer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "train_state.safetensors"
STATE_META_FILE = "train_state.json"


def _write_json(path: Path, data: Any) -> None:
    # Written beside and renamed, so an interrupted save never leaves a half file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


def save_model(directory: Path, model: Transformer, metadata: dict[str, Any]) -> None:
    """Write the weights and config.json (model configuration + metadata)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (MODEL_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(directory / MODEL_FILE)
    _write_json(directory / CONFIG_FILE, {"model": model.config.to_dict(), **metadata})


def read_metadata(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint: {CONFIG_FILE} is missing (train one with 'nmtserve train')")
    return json.loads(path.read_text())


def update_metadata(directory: Path, **entries: Any) -> None:
    """Merge entries into config.json (e.g. evaluation scores)."""
    metadata = read_metadata(directory)
    metadata.update(entries)
    _write_json(Path(directory) / CONFIG_FILE, metadata)


def load_model(directory: Path) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """The trained model (in eval mode), its tokenizer and its metadata."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    model = Transformer(ModelConfig(**metadata["model"]))
    model.load_state_dict(load_file(str(directory / MODEL_FILE)))
    model.eval()
    return model, Tokenizer.from_file(str(directory / TOKENIZER_FILE)), metadata


def save_train_state(directory: Path, optimizer: torch.optim.Optimizer, step: int, history: list[dict]) -> None:
    """Optimizer moments, the step, the RNG state and the loss history, for resuming."""
    tensors = {"rng": torch.get_rng_state()}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"{index}.{name}"] = value.reshape(-1) if value.dim() == 0 else value
    tmp = directory / (STATE_FILE + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(directory / STATE_FILE)
    _write_json(directory / STATE_META_FILE, {"step": step, "history": history})


def load_train_state(directory: Path, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Restore what save_train_state wrote; returns the step and history."""
    tensors = load_file(str(directory / STATE_FILE))
    torch.set_rng_state(tensors.pop("rng"))
    state_dict = optimizer.state_dict()
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state_dict["state"].setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
    optimizer.load_state_dict(state_dict)
    meta = json.loads((directory / STATE_META_FILE).read_text())
    return meta["step"], meta["history"]
