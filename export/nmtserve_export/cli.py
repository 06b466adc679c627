"""The training-side subcommands of `nmtserve`: corpus, train, evaluate, plot, export, import-marian."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nmtserve.settings import add_settings_arguments, decimal, directory_problem, settings_from_args

from .devices import DEVICES
from .train import TrainSettings, default_run


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Define the flags of one subcommand."""
    if command == "corpus":
        from .corpus import CorpusSettings

        parser.add_argument("--out", type=Path, default=Path("data"), help="directory for train.tsv, valid.tsv, test.tsv")
        add_settings_arguments(parser, CorpusSettings)
    elif command == "train":
        add_settings_arguments(parser, TrainSettings)
    elif command == "evaluate":
        parser.add_argument("checkpoint", type=Path, nargs="?", default=default_run(), help="checkpoint directory (default: %(default)s)")
        parser.add_argument("--beam-sizes", type=decimal(int), nargs="+", default=[1, 4], help="beam sizes to decode with (1: greedy)")
        parser.add_argument("--limit", type=decimal(int), default=0,
                            help="decode only the first N test pairs (0: all; the scores of a part are not stored in the checkpoint)")
        parser.add_argument("--threads", type=decimal(int), default=0, help="torch CPU threads (0: all cores)")
        parser.add_argument("--bundle", type=Path, default=None, help="decode with the ONNX Runtime engine and this bundle instead of PyTorch")
        parser.add_argument("--device", choices=DEVICES, default="auto",
                            help="where to decode, with PyTorch or ONNX Runtime: auto (a CUDA GPU where there is one), cpu or cuda")
        parser.add_argument("--json", action="store_true", help="print the full results as JSON")
    elif command == "plot":
        parser.add_argument("checkpoint", type=Path, nargs="?", default=default_run(), help="checkpoint directory (default: %(default)s)")
        parser.add_argument("--sentence", default=None, help="source sentence for the attention maps (default: the first test sentence)")
    elif command == "export":
        parser.add_argument("checkpoint", type=Path, nargs="?", default=default_run(), help="checkpoint directory (default: %(default)s)")
        parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
        parser.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                            help="fp32; fp16 (for GPUs); int8 (dynamic quantization, for CPUs)")
        parser.add_argument("--name", default=None, help="model name in the manifest (default: nmtserve-SRC-TGT)")
    elif command == "import-marian":
        parser.add_argument("checkpoint", type=Path, help="a Marian checkpoint directory in the Hugging Face layout (read locally, nothing is downloaded)")
        parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
        parser.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                            help="fp32; fp16 (for GPUs); int8 (dynamic quantization, for CPUs)")
        parser.add_argument("--name", default=None, help="model name in the manifest (default: marian-DIRNAME)")
        parser.add_argument("--check-reference", action="store_true",
                            help="also compare log-probabilities with transformers' MarianMTModel (needs transformers)")


def run(command: str, args: argparse.Namespace) -> int:
    """Run one subcommand; a corpus that cannot be read (a malformed TSV line, a file changed since training), a
    checkpoint that is not there, a bundle that fails verification or graphs that fail export's checks end it with one
    line naming the file or the check, exit 1."""
    from nmtserve.bundle import BundleError

    from .checkpoint import NotACheckpointError
    from .corpus import CorpusError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nmtserve_export").setLevel(logging.INFO)  # ours, not the exporter libraries' chatter
    try:
        return _run(command, args)
    except (CorpusError, NotACheckpointError, BundleError) as error:  # BundleError: export's checks too
        print(f"nmtserve {command}: {error}", file=sys.stderr)
        return 1


def _refuse(command: str, problems: list[str]) -> int:
    """Print each problem with the options on its own line; exit status 2."""
    for problem in problems:
        print(f"nmtserve {command}: {problem}", file=sys.stderr)
    return 2


def _evaluate_device_problems(device: str, bundle: Path | None) -> list[str]:
    """Why `evaluate --device` cannot decode here: with PyTorch, or with ONNX Runtime for a --bundle."""
    if bundle is None:
        from .devices import device_problem

        return [problem] if (problem := device_problem(device)) else []
    from nmtserve_server.engine import DeviceError, providers_for

    try:
        providers_for(device)
    except DeviceError as error:
        return [str(error)]
    return []


def _run(command: str, args: argparse.Namespace) -> int:
    if command == "corpus":
        from .corpus import CorpusSettings, target_languages, write_tsv

        settings = settings_from_args(CorpusSettings, args)
        problems = settings.problems()
        if len(target_languages(settings.target_lang)) > 1:
            problems.append(f"--target-lang {settings.target_lang}: a TSV file holds one target language; write one "
                            "directory per language")
        if problem := directory_problem("--out", args.out, "train.tsv, valid.tsv and test.tsv"):
            problems.append(problem)
        if problems:
            return _refuse(command, problems)
        splits = settings.splits()
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("train", "valid", "test"):
            write_tsv(getattr(splits, name), args.out / f"{name}.tsv")
            print(f"{args.out / name}.tsv: {len(getattr(splits, name))} pairs")
    elif command == "train":
        from .train import TrainingInterrupted, TrainSettingsError, train

        try:
            out = train(settings_from_args(TrainSettings, args))  # checks the settings before any work
        except TrainSettingsError as error:
            return _refuse(command, error.problems)
        except TrainingInterrupted as interrupted:
            print(f"nmtserve {command}: {interrupted}", file=sys.stderr)
            return 128 + 2  # SIGINT
        print(f"checkpoint written to {out}")
    elif command == "evaluate":
        from .evaluate import evaluate

        problems = [f"--beam-sizes {size}: a beam holds at least 1 hypothesis" for size in args.beam_sizes if size < 1]
        if args.limit < 0:
            problems.append(f"--limit must be 0 (all) or a number of pairs, not {args.limit}")
        if args.threads < 0:
            problems.append(f"--threads must be 0 (all cores) or a number of threads, not {args.threads}")
        problems += _evaluate_device_problems(args.device, args.bundle)
        if problems:
            return _refuse(command, problems)

        from nmtserve_server.engine import DeviceError  # the engine's, as evaluate --bundle decodes with it

        try:
            results = evaluate(args.checkpoint, beam_sizes=tuple(args.beam_sizes), limit=args.limit, threads=args.threads,
                               bundle=args.bundle, device=args.device)
        except DeviceError as error:  # ONNX Runtime listed its CUDA provider but could not start it
            print(f"nmtserve {command}: {error}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(results, indent=2, ensure_ascii=False))
        else:
            print(f"{results['test_pairs']} test pairs, decoded with {results['decoder']}")
            for name, r in results.items():
                if isinstance(r, dict):
                    print(f"{name:>7}: exact match {100 * r['exact_match']:.2f}%  BLEU {r['bleu']:.2f} ({r['bleu_tokenize']})  chrF {r['chrf']:.2f}  "
                          f"{r['tokens_per_second']:.0f} tokens/s")
                    worst = sorted(r["exact_match_by_category"].items(), key=lambda kv: kv[1])[:3]
                    print("         weakest categories: " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in worst))
                    for language, s in r.get("by_language", {}).items():
                        print(f"{'into ' + language:>14}: exact match {100 * s['exact_match']:.2f}%  BLEU {s['bleu']:.2f} "
                              f"({s['bleu_tokenize']})  chrF {s['chrf']:.2f}")
    elif command == "export":
        from .onnx_export import export_bundle

        print(f"bundle written to {export_bundle(args.checkpoint, args.out, precision=args.precision, name=args.name)}")
    elif command == "import-marian":
        from .marian import MarianImportError, import_marian

        try:
            out = import_marian(args.checkpoint, args.out, precision=args.precision, name=args.name, check_reference=args.check_reference)
        except MarianImportError as error:
            print(f"nmtserve import-marian: {error}", file=sys.stderr)
            return 1
        print(f"bundle written to {out}")
    elif command == "plot":
        from .plots import SentenceError, plot_all

        try:
            paths = plot_all(args.checkpoint, sentence=args.sentence)
        except SentenceError as error:
            return _refuse(command, [f"--sentence: {error}"])
        for path in paths:
            print(path)
    return 0
