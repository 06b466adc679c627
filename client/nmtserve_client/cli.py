"""`nmtserve translate`: translate through a server with the SDK, or in-process with a model bundle (--bundle).

Texts come as arguments or one per line on stdin; one translation per line
comes out (or one per hypothesis with --n-best), in input order, a blank line
for a blank one. Long input is translated and printed a chunk at a time (as
many texts as the client keeps in flight), each chunk within the deadline, and
lines typed at a terminal one at a time. Exit status:
0 done, 1 the server (or bundle) could not be used, 2 the input or the options
were refused, 130 interrupted (Ctrl-C), 141 the reader of the output went away
(`| head`), as for a command that SIGPIPE ends.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from nmtserve.bundle import DEVICES
from nmtserve.cli import install_hint
from nmtserve.normalize import is_blank
from nmtserve.settings import add_settings_arguments, decimal, flag, settings_from_args

from .channel import ClientSettings
from .calls import check_text, invalid_input
from .client import Client
from .errors import FieldViolation, InvalidInputError, NmtserveError, UnavailableError, text_index
from .results import Hypothesis


H = TypeVar("H")  # a hypothesis: the SDK's, or the engine's in-process
POLL_SECONDS = 0.2  # the longest a Ctrl-C waits while no input arrives
READ_BYTES = 1 << 16


class InProcessError(Exception):
    """The bundle or device cannot be used for in-process translation."""


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Define the flags of `nmtserve translate`: the texts, decoding options, output, and how to reach the server."""
    parser.add_argument("texts", nargs="*", help="texts to translate (default: one per line on stdin)")
    parser.add_argument("--beam-size", type=decimal(int), default=1, help="beam width (1: greedy search)")
    parser.add_argument("--n-best", type=decimal(int), default=1, help="hypotheses per text, best first (at most --beam-size)")
    parser.add_argument("--max-length", type=decimal(int), default=None, help="most tokens to generate per text (default: the model's limit)")
    parser.add_argument("--min-length", type=decimal(int), default=0, help="fewest tokens to generate before a translation may end")
    parser.add_argument("--length-penalty", type=decimal(float), default=None, help="scores are divided by length ** this (default: 1.0)")
    parser.add_argument("--target-language", default=None, help="language to translate into (default: the model's first)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per text, with scores (with --stream, one per piece, then the text's)")
    parser.add_argument("--stream", action="store_true", help="print each translation as it is decoded (greedy search)")
    parser.add_argument("--show-source", action="store_true", help="print each source before its translation")
    parser.add_argument("--wait", type=decimal(float), default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the server to report SERVING (default: do not wait)")
    connection = parser.add_argument_group("server connection")
    add_settings_arguments(connection, ClientSettings)
    in_process = parser.add_argument_group("in-process translation (needs the 'serve' extra; no server)")
    in_process.add_argument("--bundle", default=None, help="translate in this process with a model bundle directory instead of a server")
    in_process.add_argument("--device", choices=DEVICES, default=None,
                            help="with --bundle: where ONNX Runtime runs (default: auto, CUDA where a usable GPU is)")


def _print_result(source: str, hypotheses: list[Hypothesis], args: argparse.Namespace) -> None:
    """Print a text's hypotheses; a blank text (never sent) prints as blank, as many lines as a translation would."""
    if is_blank(source) and not args.json:
        print("\n" * (args.n_best - 1))
    elif args.json:
        print(json.dumps({"source": source, "hypotheses": [{"text": h.text, "score": h.score} for h in hypotheses]}, ensure_ascii=False))
    else:
        for hypothesis in hypotheses:
            print(f"{source}  ->  {hypothesis.text}" if args.show_source else hypothesis.text)


def _options(args: argparse.Namespace) -> dict:
    return dict(max_length=args.max_length, min_length=args.min_length, length_penalty=args.length_penalty,
                target_language=args.target_language, return_scores=args.json)


def _skipping_blanks(texts: list[str], translate: Callable[[list[str]], list[list[H]]]) -> Iterator[tuple[str, list[H]]]:
    """Each text with its hypotheses, translating only the texts that are not blank (a blank one has none)."""
    sent = [text for text in texts if not is_blank(text)]
    results = iter(translate(sent) if sent else [])
    return ((text, [] if is_blank(text) else next(results)) for text in texts)


def _arriving_lines(fd: int) -> Iterator[bytes]:
    """The lines read from a file descriptor as they arrive, each with its end.

    The wait for input wakes every POLL_SECONDS. The kernel may hand a Ctrl-C to any thread, gRPC's included, and
    then Python only marks it pending: a main thread blocked in read() would never raise KeyboardInterrupt.
    """
    pending = b""
    while True:
        if not select.select([fd], [], [], POLL_SECONDS)[0]:
            continue
        chunk = os.read(fd, READ_BYTES)
        if not chunk:
            break
        *complete, pending = (pending + chunk).split(b"\n")
        yield from (line + b"\n" for line in complete)
    if pending:
        yield pending


def _stdin_lines() -> Iterable[bytes]:
    """stdin's lines as they arrive; as Python reads them where select() cannot wait for it (pipes outside POSIX, a
    stdin replaced by an in-memory stream); none where there is no stdin (closed: `<&-`)."""
    if sys.stdin is None:
        return ()
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return sys.stdin.buffer
    return _arriving_lines(fd) if os.name == "posix" else sys.stdin.buffer


def _lines(stream: Iterable[bytes]) -> Iterator[str]:
    """The lines of a byte stream without their ends, nor the byte-order mark that Windows tools put first;
    InvalidInputError naming the first one that is not UTF-8."""
    for number, line in enumerate(stream, 1):
        try:
            yield line.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            description = f"not UTF-8 text (byte {error.start + 1} of the line)"
            raise invalid_input(f"line {number}", description) from None


def _placed(error: InvalidInputError, numbers: list[int], place: str) -> InvalidInputError:
    """error with the request's texts[i] named by where text i came from in the input (e.g. "line 12"), and its texts,
    too many for the server, by the flag that sets how many go in one request."""

    def rename(field: str) -> str:
        if field == "texts":
            return flag("texts_per_request")
        return field if (index := text_index(field)) is None else f"{place} {numbers[index]}"

    return error.renamed(rename)


def _through_server(client: Client, texts: Iterable[str], args: argparse.Namespace, *, place: str, typed: bool = False) -> None:
    # Lines typed at a terminal are translated one at a time, as they come, not once a whole chunk has been typed.
    chunk = 1 if typed else client.settings.texts_per_request * client.settings.max_concurrent_requests
    options = dict(beam_size=args.beam_size, num_hypotheses=args.n_best, **_options(args))
    remaining, start = iter(texts), 1
    while batch := list(itertools.islice(remaining, chunk)):
        numbers = [start + index for index, text in enumerate(batch) if not is_blank(text)]  # the input's, of the texts sent
        try:
            translated = _skipping_blanks(batch, lambda sent: [t.hypotheses for t in client.translate(sent, **options)])
        except InvalidInputError as error:
            raise _placed(error, numbers, place) from None
        for text, hypotheses in translated:
            _print_result(text, hypotheses, args)
        sys.stdout.flush()
        start += len(batch)


def _stream(client: Client, texts: Iterable[str], args: argparse.Namespace, *, place: str) -> None:
    for number, text in enumerate(texts, 1):
        if is_blank(text):
            _print_result(text, [], args)
            continue
        if args.show_source and not args.json:
            print(f"{text}  ->  ", end="", flush=True)
        try:
            for piece in client.translate_stream(text, **_options(args)):
                if piece.final is not None:
                    if args.json:
                        _print_result(text, piece.final.hypotheses, args)
                elif args.json:
                    print(json.dumps({"text": piece.text, "tokens": piece.tokens}, ensure_ascii=False), flush=True)
                else:
                    print(piece.text, end="", flush=True)
        except InvalidInputError as error:
            raise error.renamed(lambda field: f"{place} {number}" if field == "text" else field) from None
        if not args.json:
            print(flush=True)


def _in_process(texts: list[str], args: argparse.Namespace, *, place: str) -> None:
    """Translate with the ONNX Runtime engine in this process, after the server's checks of the texts, in its words;
    imports the server package only here."""
    from nmtserve.bundle import BundleError
    from nmtserve_server.engine import DeviceError, Engine, translate
    from nmtserve_server.search import DecodeOptions, describe, listed

    try:
        engine = Engine.from_path(args.bundle, device=args.device or "auto")
    except (BundleError, DeviceError) as error:
        raise InProcessError(str(error)) from error
    options = DecodeOptions(
        beam_size=args.beam_size, num_hypotheses=args.n_best,
        max_length=args.max_length or engine.max_target_length,  # 0: the model's limit, as the API reads it
        min_length=args.min_length, length_penalty=1.0 if args.length_penalty is None else args.length_penalty,
    )
    sent = [number for number, text in enumerate(texts) if not is_blank(text)]
    if not sent:  # as through a server: with no text to send, there is no request to refuse
        for text in texts:
            _print_result(text, [], args)
        return
    problems = options.problems(engine.max_target_length)
    language = args.target_language or None  # empty: the model's first, as the server reads it
    if language is not None and (problem := engine.language_problem(language)) is not None:
        problems.append(("options.target_language", problem))
        language = None
    sources, wrong = engine.read_sources([texts[number] for number in sent], language)
    problems += [(f"{place} {sent[index] + 1}", problem) for index, problem in wrong.items()]
    if problems := listed(problems):
        raise InvalidInputError(describe(problems), [FieldViolation(*p) for p in problems])
    for text, hypotheses in _skipping_blanks(texts, lambda _: translate(engine, sources, options)):
        outputs = engine.decode_ids([h.tokens for h in hypotheses])
        _print_result(text, [Hypothesis(o, h.tokens, h.score) for o, h in zip(outputs, hypotheses)], args)


def run(command: str, args: argparse.Namespace) -> int:
    """Translate the texts and print the results; a clear message and a non-zero status when that fails."""
    try:
        return _run(command, args)
    except BrokenPipeError:
        # Stop quietly, and give stdout somewhere to go: Python flushes it again at exit and would complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE
    except KeyboardInterrupt:
        return 128 + 2  # SIGINT


def _run(command: str, args: argparse.Namespace) -> int:
    def fail(status: int, message: str) -> int:
        print(f"nmtserve {command}: {message}", file=sys.stderr)
        return status

    texts, place = (args.texts, "argument") if args.texts else (_lines(_stdin_lines()), "line")
    settings = settings_from_args(ClientSettings, args)
    try:
        wrong = [f"--{flag} must be at least 1, not {value}" for flag, value in (("beam-size", args.beam_size), ("n-best", args.n_best))
                 if value < 1]
        if wrong:
            return fail(2, "; ".join(wrong))
        if args.bundle is not None:
            if args.stream:
                return fail(2, "--stream needs a server (--server), not --bundle")
            texts = list(texts)
            for number, text in enumerate(texts, 1):
                check_text(text, f"{place} {number}")
            try:
                _in_process(texts, args, place=place)
            except InProcessError as error:
                return fail(1, str(error))
            except ImportError as error:
                if (error.name or "").startswith("nmtserve"):
                    raise  # our own code is broken: not a missing extra
                return fail(2, f"--bundle needs the 'serve' extra (missing {error.name!r}): {install_hint('serve')}")
            except ValueError as error:
                if isinstance(error, InvalidInputError):
                    raise
                return fail(2, str(error))
            return 0
        if args.device is not None:
            return fail(2, "--device needs --bundle: a server runs on the device it was started with")
        if args.stream and (args.beam_size != 1 or args.n_best != 1):
            return fail(2, "--stream decodes greedily: it takes no --beam-size or --n-best")
        if problems := settings.problems(flag):
            return fail(2, "; ".join(problems))
        with Client(settings=settings) as client:
            if args.wait > 0:
                client.wait_until_serving(args.wait)
            if args.stream:
                _stream(client, texts, args, place=place)
            else:
                _through_server(client, texts, args, place=place, typed=not args.texts and sys.stdin is not None and sys.stdin.isatty())
    except InvalidInputError as error:
        # With a status code, the server's answer; without, refused here before anything was sent.
        return fail(2, f"{'the server refused the input' if error.code else 'invalid input'}: {error.message}")
    except UnavailableError as error:
        return fail(1, f"no serving nmtserve at {settings.server}: {error.message}")
    except NmtserveError as error:
        return fail(1, f"{error.code.name if error.code else 'error'}: {error.message}")
    return 0
