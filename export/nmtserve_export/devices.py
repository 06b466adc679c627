"""Where PyTorch trains and decodes: --device auto|cpu|cuda."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEVICES = ("auto", "cpu", "cuda")  # auto: the GPU where PyTorch sees one, else the CPU


def device_problem(name: str) -> str | None:
    """Why --device `name` cannot run here, as a sentence (None when it can)."""
    if name not in DEVICES:
        return f"--device must be one of {', '.join(DEVICES)}, not {name!r}"
    if name == "cuda" and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"--device cuda: PyTorch sees no usable GPU (torch {torch.__version__}, {built}); "
                "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU")
    return None


def torch_device(name: str) -> torch.device:
    """The torch device for --device `name` (auto: cuda where available); raises ValueError where it cannot run."""
    if problem := device_problem(name):
        raise ValueError(problem)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@contextmanager
def training_precision(device: torch.device) -> Iterator[None]:
    """Within it, float32 matrix products on a GPU use TensorFloat-32 where it has them (training only: the reference
    searches of `evaluate` keep full precision)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # several times faster; ample precision for gradient steps
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
