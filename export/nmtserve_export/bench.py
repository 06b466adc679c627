"""`nmtserve bench-engine`: generated tokens/s of the ONNX Runtime engine (fp32, int8) against PyTorch eager.

Every engine decodes the same test sentences greedily with a fixed output
length (min = max length), so each does the same work; the figures are ratios
measured in one run on one machine. PyTorch spreads each operator over the
threads; the ONNX Runtime engine runs its one-thread decoder step in several
engines side by side (`--streams`, one per core by default), each decoding
its share of a batch in a thread of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from nmtserve.bundle import BundleError, read_bundle
from nmtserve.settings import decimal, directory_problem
from nmtserve_server.engine import engines_for, translate
from nmtserve_server.search import DecodeOptions

from .checkpoint import NotACheckpointError, load_model
from .corpus import CorpusError
from .data import encode_sources
from .decode import greedy_search
from .evaluate import held_out_pairs
from .onnx_export import export_bundle, not_exported_from
from .train import default_run


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Define the benchmark's flags."""
    parser.add_argument("checkpoint", type=Path, nargs="?", default=default_run(), help="checkpoint directory (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=decimal(int), nargs="+", default=[1, 32], help="sentences decoded together")
    parser.add_argument("--length", type=decimal(int), default=32, help="tokens generated per sentence (min = max length)")
    parser.add_argument("--sentences", type=decimal(int), default=128, help="test sentences per measurement")
    parser.add_argument("--repeats", type=decimal(int), default=5, help="measurements per engine, taken in turns; the fastest is kept")
    parser.add_argument("--threads", type=decimal(int), default=0, help="CPU threads for torch and ONNX Runtime (0: all cores)")
    parser.add_argument("--streams", type=decimal(int), default=0, help="ONNX Runtime engines decoding side by side (0: one per thread)")
    parser.add_argument("--out", type=Path, default=None, help="where to write bench_engine.json/.png (default: the checkpoint)")


def _seconds(decode, batches: list[list[list[int]]]) -> float:
    start = time.perf_counter()
    for batch in batches:
        decode(batch)
    return time.perf_counter() - start


def _problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the flags' numbers and --out, one sentence each."""
    found = [f"--batch-sizes {size}: a batch holds at least 1 sentence" for size in args.batch_sizes if size < 1]
    found += [f"--{name} must be at least 1, not {value}" for name, value in
              (("length", args.length), ("sentences", args.sentences), ("repeats", args.repeats)) if value < 1]
    if args.threads < 0:
        found.append(f"--threads must be 0 (all cores) or a number of threads, not {args.threads}")
    if args.streams < 0:
        found.append(f"--streams must be 0 (one engine per thread) or a number of engines, not {args.streams}")
    if args.out is not None and (problem := directory_problem("--out", args.out, "bench_engine.json and bench_engine.png")):
        found.append(problem)
    return found


def _bundle_problem(bundle_dir: Path, precision: str, checkpoint: Path, metadata: dict) -> str | None:
    """Why the bundle in bundle_dir is not this checkpoint's at this precision (none there, another model's, one
    that fails verification); None where it is."""
    if not bundle_dir.exists():
        return "not there yet"
    try:
        manifest = read_bundle(bundle_dir).manifest
    except BundleError as error:
        return str(error)
    if manifest["precision"] != precision:
        return f"its precision is {manifest['precision']}"
    problem = not_exported_from(manifest, checkpoint, metadata)
    return f"not exported from this checkpoint: {problem}" if problem else None


def run(command: str, args: argparse.Namespace) -> int:
    """Measure and print tokens/s per engine and batch size, and the ratios to PyTorch; flags out of range end it with a
    line each, exit 2, and a checkpoint, corpus or bundle that cannot be used with one line naming it, exit 1."""
    if problems := _problems(args):
        for problem in problems:
            print(f"nmtserve {command}: {problem}", file=sys.stderr)
        return 2
    try:
        return _run(command, args)
    except (CorpusError, NotACheckpointError, BundleError) as error:  # BundleError: export's checks too
        print(f"nmtserve {command}: {error}", file=sys.stderr)
        return 1


def _run(command: str, args: argparse.Namespace) -> int:
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    checkpoint = Path(args.checkpoint)
    model, tokenizer, metadata = load_model(checkpoint)  # before making --out: a mistyped checkpoint leaves nothing
    if args.length > model.config.max_len:
        print(f"nmtserve {command}: --length {args.length}: the model writes at most {model.config.max_len} tokens", file=sys.stderr)
        return 2
    pairs = held_out_pairs(metadata)[: args.sentences]
    sources = encode_sources(tokenizer, [p.source for p in pairs], [p.language for p in pairs])
    out = Path(args.out or checkpoint)
    out.mkdir(parents=True, exist_ok=True)  # before the measurements, not after them
    streams = args.streams or threads
    engines = {}
    for precision in ("fp32", "int8"):
        bundle_dir = checkpoint / f"bundle-{precision}"
        # A bundle left there from an earlier model in this directory would measure that model, not this one.
        if problem := _bundle_problem(bundle_dir, precision, checkpoint, metadata):
            print(f"{bundle_dir}: {problem}; exporting it", file=sys.stderr)
            export_bundle(checkpoint, bundle_dir, precision=precision)
        engines[precision] = engines_for(bundle_dir, streams, device="cpu", capacity=max(args.batch_sizes), threads=threads)

    fixed = DecodeOptions(min_length=args.length, max_length=args.length)
    deciders = {
        "pytorch": lambda batch: greedy_search(model, batch, min_length=args.length, max_length=args.length),
        **{f"onnxruntime-{p}": (lambda batch, e=e: translate(e, batch, fixed)) for p, e in engines.items()},
    }
    for decode in deciders.values():
        decode(sources[:streams])  # warm-up: a sentence for each engine, whose first run would count otherwise
    # The engines take turns, repeat by repeat, so a busy moment on a shared machine falls on all of them alike;
    # each keeps its fastest repeat.
    best: dict[str, dict[str, float]] = {name: {str(b): float("inf") for b in args.batch_sizes} for name in deciders}
    with tqdm(total=len(deciders) * len(args.batch_sizes) * args.repeats, desc="bench-engine", unit="run") as progress:
        for batch_size in args.batch_sizes:
            batches = [sources[i : i + batch_size] for i in range(0, len(sources), batch_size)]
            for _ in range(args.repeats):
                for name, decode in deciders.items():
                    progress.set_postfix_str(f"{name} batch {batch_size}")
                    best[name][str(batch_size)] = min(best[name][str(batch_size)], _seconds(decode, batches))
                    progress.update(1)
    results = {name: {b: len(sources) * args.length / seconds for b, seconds in r.items()} for name, r in best.items()}

    report = {"threads": threads, "streams": streams, "decoder_threads": {p: e[0].decoder_threads for p, e in engines.items()},
              "length": args.length, "sentences": len(sources), "tokens_per_second": results,
              "ratio_to_pytorch": {name: {b: v / results["pytorch"][b] for b, v in r.items()} for name, r in results.items()}}
    (out / "bench_engine.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"generated tokens/s, greedy, {args.length} tokens per sentence, {threads} threads; ONNX Runtime: {streams} engines "
          f"side by side (decoder step threads: {', '.join(f'{p} {e[0].decoder_threads}' for p, e in engines.items())})")
    print(f"{'engine':<20}" + "".join(f"{'batch ' + str(b):>14}" for b in args.batch_sizes))
    for name, r in results.items():
        cells = "".join(f"{r[str(b)]:>9.0f} ({r[str(b)] / results['pytorch'][str(b)]:.2f}x)" for b in args.batch_sizes)
        print(f"{name:<20}{cells}")

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(args.batch_sizes))], [r[str(b)] for b in args.batch_sizes], width, label=name)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(args.batch_sizes))], [f"batch {b}" for b in args.batch_sizes])
    ax.set(ylabel="generated tokens/s", title=f"Decoding throughput ({threads} CPU threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench_engine.png", dpi=120)
    print(f"wrote {out / 'bench_engine.json'} and bench_engine.png")
    return 0
