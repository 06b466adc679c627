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
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from nmtserve_server.engine import engines_for, translate
from nmtserve_server.search import DecodeOptions

from .checkpoint import load_model
from .data import encode_sources
from .decode import greedy_search
from .evaluate import held_out_pairs
from .onnx_export import export_bundle
from .train import default_run


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Define the benchmark's flags."""
    parser.add_argument("checkpoint", type=Path, nargs="?", default=default_run(), help="checkpoint directory (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="sentences decoded together")
    parser.add_argument("--length", type=int, default=32, help="tokens generated per sentence (min = max length)")
    parser.add_argument("--sentences", type=int, default=128, help="test sentences per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per engine, taken in turns; the fastest is kept")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0: all cores)")
    parser.add_argument("--streams", type=int, default=0, help="ONNX Runtime engines decoding side by side (0: one per thread)")
    parser.add_argument("--out", type=Path, default=None, help="where to write bench_engine.json/.png (default: the checkpoint)")


def _seconds(decode, batches: list[list[list[int]]]) -> float:
    start = time.perf_counter()
    for batch in batches:
        decode(batch)
    return time.perf_counter() - start


def run(command: str, args: argparse.Namespace) -> int:
    """Measure and print tokens/s per engine and batch size, and the ratios to PyTorch."""
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    out = Path(args.out or args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)  # before the measurements, not after them
    model, tokenizer, metadata = load_model(args.checkpoint)
    pairs = held_out_pairs(metadata)[: args.sentences]
    sources = encode_sources(tokenizer, [p.source for p in pairs], [p.language for p in pairs])
    streams = args.streams or threads
    engines = {}
    for precision in ("fp32", "int8"):
        bundle_dir = Path(args.checkpoint) / f"bundle-{precision}"
        if not (bundle_dir / "manifest.json").is_file():
            export_bundle(args.checkpoint, bundle_dir, precision=precision)
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
