"""Checkpoints as safetensors weights plus JSON (no pickle anywhere).

A checkpoint directory holds:
  model.safetensors   the Transformer's weights
  config.json         the model configuration and what produced it (corpus, training, scores)
  tokenizer.json      the shared subword vocabulary
  train_state.safetensors + train_state.json   optimizer and RNG state, for --resume
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from .corpus import file_sha256
from .model import ModelConfig, Transformer
from .tokenizer import load_tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "train_state.safetensors"
STATE_META_FILE = "train_state.json"
FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_FILE, STATE_META_FILE)  # every one a save writes


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _write_json(path: Path, data: Any) -> None:
    # Written beside and renamed, so an interrupted save never leaves a half file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(_json(data))
    tmp.replace(path)


def save_checkpoint(
    directory: Path, model: Transformer, tokenizer: Tokenizer, metadata: dict[str, Any], optimizer: torch.optim.Optimizer,
    step: int, history: list[dict],
) -> None:
    """Write the weights, the tokenizer and config.json (model configuration + metadata), and the optimizer moments,
    the RNG state and the loss history at `step`, for resuming.

    Every file is written beside its place before any is renamed into it, so an interruption leaves the last save
    whole, or a mix of it and this one that the id of the save recorded in each file tells (interrupted_save), even
    where the mix is of two runs that saved at the same step: the tokenizer is told by its sha256.
    """
    directory.mkdir(parents=True, exist_ok=True)
    save = uuid.uuid4().hex
    tag = {"step": str(step), "save": save}
    state = {"rng": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # dropout on a GPU draws from its own generator
        state["cuda_rng"] = torch.cuda.get_rng_state()
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            state[f"{index}.{name}"] = _host(value.reshape(-1) if value.dim() == 0 else value)
    writers = {
        MODEL_FILE: lambda path: save_file({k: _host(v) for k, v in model.state_dict().items()}, str(path), metadata=tag),
        # With the weights, not before: a new run stopped ahead of its first save leaves the old checkpoint whole.
        TOKENIZER_FILE: lambda path: tokenizer.save(str(path)),
        STATE_FILE: lambda path: save_file(state, str(path), metadata=tag),
        CONFIG_FILE: lambda path: path.write_text(_json({"model": model.config.to_dict(), **metadata, "save": save})),
        STATE_META_FILE: lambda path: path.write_text(_json({
            "step": step, "save": save, "tokenizer_sha256": file_sha256(directory / (TOKENIZER_FILE + ".tmp")), "history": history,
        })),
    }
    for name, write in writers.items():  # in this order: train_state.json hashes the tokenizer written before it
        write(directory / (name + ".tmp"))
    mode = (directory / (CONFIG_FILE + ".tmp")).stat().st_mode & 0o777  # as the umask has it
    with _ctrl_c_held():
        for name in writers:
            path = directory / (name + ".tmp")
            path.chmod(mode)  # safetensors writes through a private temporary file (0600): others could not export it
            path.replace(directory / name)


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Take a Ctrl-C (SIGINT) that comes during the block at its end: stopped between renames, a save leaves files of two
    saves, which nothing can load (a process killed there still does; interrupted_save tells it)."""
    # Only the main thread may set a handler, and one installed from C (getsignal: None) could not be put back.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    held: list[FrameType | None] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)  # to the handler there was: Python's, the default, or ignored


def interrupted_save(directory: Path) -> str | None:
    """Why the checkpoint in `directory` is not one whole save (its last save was interrupted between renames), or None
    where it is; files from before saves were identified are taken as they are, and so is a model whose training state
    was removed (no save leaves both files out: it renames train_state.safetensors before config.json)."""
    if (directory / STATE_FILE).is_file() and not (directory / STATE_META_FILE).is_file():
        return f"{directory}: its last save was interrupted before {STATE_META_FILE} was written"
    meta = json.loads((directory / STATE_META_FILE).read_text()) if (directory / STATE_META_FILE).is_file() else {}
    tags = {name: _tag(directory / name) for name in (MODEL_FILE, STATE_FILE) if (directory / name).is_file()}
    steps = {**{name: tag.get("step") for name, tag in tags.items()}, STATE_META_FILE: str(meta["step"]) if meta else None}
    saves = {**{name: tag.get("save") for name, tag in tags.items()}, STATE_META_FILE: meta.get("save"),
             CONFIG_FILE: read_metadata(directory).get("save")}
    for what, found in (("steps", steps), ("saves", saves)):
        if len({value for value in found.values() if value is not None}) > 1:
            return (f"{directory}: its last save was interrupted, and its files are of different {what} ("
                    + ", ".join(f"{name}: {value}" for name, value in found.items() if value is not None) + ")")
    recorded = meta.get("tokenizer_sha256")
    if recorded is not None and recorded != file_sha256(directory / TOKENIZER_FILE):
        return f"{directory}: its last save was interrupted, and its {TOKENIZER_FILE} is not the one its training state was saved with"
    return None


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as a file takes it: in host memory, contiguous (a no-op for one already so)."""
    return tensor.detach().to("cpu").contiguous()


class NotACheckpointError(FileNotFoundError):
    """A directory given as a checkpoint holds none."""


def read_metadata(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise NotACheckpointError(f"{directory} is not a checkpoint: {CONFIG_FILE} is missing (train one with 'nmtserve train')")
    return json.loads(path.read_text())


def update_metadata(directory: Path, **entries: Any) -> None:
    """Merge entries into config.json (e.g. evaluation scores)."""
    metadata = read_metadata(directory)
    metadata.update(entries)
    _write_json(Path(directory) / CONFIG_FILE, metadata)


def are_missing(names: list[str]) -> str:
    """A sentence's end naming missing files: "a is missing", "a, b and c are missing"."""
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{listed} {'is' if len(names) == 1 else 'are'} missing"


def load_model(directory: Path, device: torch.device | str = "cpu") -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """The trained model (in eval mode, on `device`), its tokenizer and its metadata; NotACheckpointError where a file is
    missing or the files are not of one save (interrupted_save)."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    if missing := [name for name in (MODEL_FILE, TOKENIZER_FILE) if not (directory / name).is_file()]:
        raise NotACheckpointError(f"{directory} is not a checkpoint: {are_missing(missing)} (train one with 'nmtserve train')")
    if problem := interrupted_save(directory):  # weights of one save, configuration or tokenizer of another
        raise NotACheckpointError(f"{problem}; train again")
    model = Transformer(ModelConfig(**metadata["model"]))
    model.load_state_dict(load_file(str(directory / MODEL_FILE)))
    model.to(device).eval()
    return model, load_tokenizer(directory / TOKENIZER_FILE), metadata


def load_train_state(directory: Path, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Restore the training state save_checkpoint wrote; returns the step and history. Raises ValueError where the
    checkpoint is not one whole save (interrupted_save)."""
    problem = interrupted_save(directory)
    if problem:
        raise ValueError(f"{problem}; it cannot be resumed: train again")
    meta = json.loads((directory / STATE_META_FILE).read_text())
    tensors = load_file(str(directory / STATE_FILE))
    torch.set_rng_state(tensors.pop("rng"))
    cuda_rng = tensors.pop("cuda_rng", None)
    if cuda_rng is not None and torch.cuda.is_available():  # a run resumed on the CPU has no use for it
        torch.cuda.set_rng_state(cuda_rng)
    state_dict = optimizer.state_dict()
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state_dict["state"].setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
    optimizer.load_state_dict(state_dict)
    return meta["step"], meta["history"]


def _tag(path: Path) -> dict[str, str]:
    """What a safetensors file of a checkpoint says of the save that wrote it: its "step" and its "save" id (neither
    in a file from before they were recorded)."""
    with safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}