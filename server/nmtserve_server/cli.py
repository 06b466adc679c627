"""The serving-side subcommands of `nmtserve`: translate in-process with a bundle."""

from __future__ import annotations

import argparse
import json
import sys

from nmtserve.bundle import BundleError

from .engine import DEVICES, DeviceError, Engine, translate
from .search import DecodeOptions


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Define the flags of one subcommand."""
    parser.add_argument("texts", nargs="*", help="texts to translate (default: one per line on stdin)")
    parser.add_argument("--bundle", required=True, help="model bundle directory (from 'nmtserve export')")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where ONNX Runtime runs (default: %(default)s)")
    parser.add_argument("--beam-size", type=int, default=1, help="beam width (1: greedy search)")
    parser.add_argument("--n-best", type=int, default=1, help="hypotheses per text, best first")
    parser.add_argument("--max-length", type=int, default=128, help="most tokens to generate per text")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="scores are divided by length ** this")
    parser.add_argument("--json", action="store_true", help="one JSON object per text, with scores")
    parser.add_argument("--show-source", action="store_true", help="print each source before its translation")


def run(command: str, args: argparse.Namespace) -> int:
    """Translate the texts and print one line per text (or per hypothesis with --n-best)."""
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin]
    if args.n_best > args.beam_size:
        print(f"nmtserve translate: --n-best {args.n_best} cannot exceed --beam-size {args.beam_size}", file=sys.stderr)
        return 2
    try:
        engine = Engine.from_path(args.bundle, device=args.device)
    except (BundleError, DeviceError) as error:
        print(f"nmtserve translate: {error}", file=sys.stderr)
        return 1
    options = DecodeOptions(beam_size=args.beam_size, num_hypotheses=args.n_best, max_length=args.max_length, length_penalty=args.length_penalty)
    try:
        results = translate(engine, engine.encode_texts(texts), options)
    except ValueError as error:
        print(f"nmtserve translate: {error}", file=sys.stderr)
        return 2
    for text, hypotheses in zip(texts, results):
        outputs = engine.decode_ids([h.tokens for h in hypotheses])
        if args.json:
            print(json.dumps({"source": text, "hypotheses": [{"text": o, "score": h.score} for o, h in zip(outputs, hypotheses)]}, ensure_ascii=False))
        else:
            print("\n".join(f"{text}  ->  {o}" if args.show_source else o for o in outputs))
    return 0
