"""The `nmtserve` command: one entry point, one subcommand per job.

Each subcommand lives in the package of its role and is imported only when it
runs, so `nmtserve serve` never loads torch and a missing extra is named
instead of a bare ImportError.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # defines add_arguments(parser) and run(args) -> int
    extra: str  # the pip extra that provides its dependencies
    help: str


COMMANDS: dict[str, Command] = {
    "corpus": Command("nmtserve_export.cli", "train", "write the generated CLDR corpus as TSV splits"),
    "train": Command("nmtserve_export.cli", "train", "train a Transformer (the default model with no arguments)"),
    "evaluate": Command("nmtserve_export.cli", "train", "decode the held-out test set; exact match, BLEU, chrF"),
    "plot": Command("nmtserve_export.cli", "train", "draw positional encoding, loss curves and attention maps"),
    "export": Command("nmtserve_export.cli", "train", "export a checkpoint to a verified ONNX model bundle"),
    "import-marian": Command("nmtserve_export.cli", "train", "import a local Marian (opus-mt) checkpoint as a model bundle"),
    "bench-engine": Command("nmtserve_export.bench", "train", "tokens/s of the ONNX Runtime engine against PyTorch"),
    "translate": Command("nmtserve_client.cli", "client", "translate texts through a server (or in-process with --bundle)"),
    "serve": Command("nmtserve_server.serve", "serve", "serve a model bundle over gRPC, with Prometheus metrics"),
    "bench-serve": Command("nmtserve_server.bench", "bench", "tokens/s and latency of the gRPC server against the engine"),
}


def install_hint(extra: str) -> str:
    """How to add an extra's dependencies: nmtserve installs from its source tree (it is not on PyPI)."""
    return f"pip install -e '.[{extra}]' in the nmtserve checkout"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmtserve",
        description="Train, export and serve a Transformer translation model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<14}{c.help}" for name, c in COMMANDS.items())
        + "\n\nRun 'nmtserve COMMAND --help' for a command's options.",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one nmtserve subcommand."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        _parser().parse_args(argv)  # prints usage, or the error for an unknown command
        return 2
    name, command = argv[0], COMMANDS[argv[0]]
    try:
        module = importlib.import_module(command.module)
    except ImportError as error:
        if (error.name or "").startswith("nmtserve"):
            raise  # our own code is broken: not a missing extra
        print(
            f"nmtserve {name}: missing dependency {error.name!r}; "
            f"install the '{command.extra}' extra: {install_hint(command.extra)}",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(prog=f"nmtserve {name}", description=command.help)
    module.add_arguments(name, parser)
    args = parser.parse_args(argv[1:])
    return module.run(name, args) or 0


if __name__ == "__main__":
    sys.exit(main())
