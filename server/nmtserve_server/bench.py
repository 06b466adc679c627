"""`nmtserve bench-serve`: served tokens/s and time to first token of the gRPC server, against the engine alone.

In one run on one machine, `nmtserve serve` runs as a subprocess on loopback,
and rounds alternate between the two sides: the in-process engine decodes the
texts in batches of 32 for a few seconds (the reference throughput, while the
server idles; one engine, as the server's decode loop runs it), then N
concurrent client streams (asyncio tasks on one channel) each send Translate
calls (greedy, one text) one after another, for a warm-up and then a measured
window. The client streams stand in for callers on other machines: they run in
a process of their own at a lower priority (--client-nice), so that they take
the cores the server leaves rather than half of one it needs.
Alternating cancels the drift of a shared machine's speed, which over a minute
moves either side by more than the gap being measured. Every text is decoded
to a fixed length (min = max length), so both sides do the same work; the
streams start spread over one request's duration, so that requests keep
arriving at a busy server rather than all at once (one request's duration at
the engine's batch-32 pace). Reported: served tokens/s as a ratio of the
engine's (over all rounds, and per round), each request's time to first token
against its budget of three mean decode steps (over the measured windows) plus
its own encoder run, both measured by the server, and the same with the median
encoder run in every budget (a run's wall time includes its waits for a core,
which would widen a starved text's own budget), the whole call's latency as the
client saw it, where the 1% furthest over budget spent their time, and the
cores each process used in the measured windows (psutil):
the engine alone, then the decode process, the server and the client, and the
CPU each generated token cost the engine and the server's two processes; and, on
Linux, the cores' worth of time their threads were ready to run but waited for
a core (the run-queue wait in /proc/PID/task/*/schedstat), which tells how
crowded the machine was, and flags a round whose engine alone waited for one
(another program was running).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import psutil
from matplotlib.figure import Figure
from prometheus_client.parser import text_string_to_metric_families

from nmtserve.settings import decimal
from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc

from .config import DEVICES
from .engine import Engine, translate
from .search import DecodeOptions

DEFAULT_BUNDLE = Path("runs/default/bundle")  # what `make demo` exports (fp32)
ENGINE_BATCH = 32
WORD_START = ("Ġ", "▁")  # how byte-level BPE (tokenizers) and SentencePiece (Marian) mark a word's first piece
START_TIMEOUT = 120.0
# The engine alone runs while the server idles: more wait than this for a core means another program took the cores.
FOREIGN_LOAD_CORES = 0.05


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Define the benchmark's flags."""
    parser.add_argument("bundle", type=Path, nargs="?", default=DEFAULT_BUNDLE, help="model bundle directory (default: %(default)s)")
    parser.add_argument("--streams", type=decimal(int), default=64, help="concurrent client streams")
    parser.add_argument("--rounds", type=decimal(int), default=3, help="rounds of engine alone, then served")
    parser.add_argument("--engine-seconds", type=decimal(float), default=3.0, help="engine-alone measurement per round (whole passes over the texts)")
    parser.add_argument("--seconds", type=decimal(float), default=5.0, help="served window per round (after the warm-up)")
    parser.add_argument("--warm-up-seconds", type=decimal(float), default=1.0, help="load before each served window")
    parser.add_argument("--length", type=decimal(int), default=32, help="tokens generated per text (min = max length)")
    parser.add_argument("--source-tokens", type=decimal(int), default=12, help="words per made-up source text")
    parser.add_argument("--client-nice", type=_niceness, default=10,
                        help="the client streams run in a process this much nicer than the server and the engine alone: "
                             "they stand in for callers on other machines, so they take the cores the server leaves "
                             "(0: the same priority)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where ONNX Runtime runs, for both sides")
    parser.add_argument("--threads", type=decimal(int), default=0, help="ONNX Runtime encoder threads, for both sides (0: each side's default: all cores for the engine alone, "
                             "whose encoder runs between its steps; a core fewer in the server, whose encoder runs beside them)")
    parser.add_argument("--decoder-threads", type=decimal(int), default=0, help="decoder step threads, for both sides (0: the faster of 1 and --threads)")
    parser.add_argument("--max-seconds", type=decimal(float), default=600, help="give up (non-zero exit) after this long")
    parser.add_argument("--out", type=Path, default=None, help="where to write bench_serve.json/.png (default: the bundle's parent)")


def _niceness(value: str) -> int:
    """A --client-nice value: 0 or more (a process may lower its own priority, not raise it)."""
    if not (value.isascii() and value.isdigit()):
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {value!r}")
    return int(value)


def made_up_texts(engine: Engine, count: int, words: int, seed: int = 0) -> list[str]:
    """Texts of whole-word vocabulary entries: throughput depends on lengths, not on meaning."""
    vocabulary = engine.tokenizer.get_vocab()
    whole_words = sorted(token[1:] for token in vocabulary if token[:1] in WORD_START and token[1:].isalpha())
    rng = random.Random(seed)
    return [" ".join(rng.choice(whole_words) for _ in range(words)) for _ in range(count)]


def engine_tokens_per_second(engine: Engine, batches: list[list[list[int]]], length: int, seconds: float) -> float:
    """Generated tokens/s of the engine alone over whole passes of the batches, until `seconds` have passed."""
    options = DecodeOptions(min_length=length, max_length=length)
    tokens, started = 0, time.perf_counter()
    while True:
        for batch in batches:
            translate(engine, batch, options)
            tokens += len(batch) * length
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return tokens / elapsed


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def wait_seconds(pid: int) -> dict[str, float] | None:
    """Time each live thread of the process has spent ready to run but waiting for a core so far (Linux's schedstat),
    by thread id, or None where the system does not tell."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    waits = {}
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/schedstat") as stats:
                waits[thread] = int(stats.read().split()[1]) / 1e9  # run time, run-queue wait, time slices: nanoseconds
        except (OSError, IndexError, ValueError):  # the thread ended meanwhile
            continue
    return waits


class CoreMeter:
    """Cores some processes used, and cores' worth of time their threads waited for one, between start() and stop()."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def start(self) -> None:
        """Begin the window."""
        self._started = time.perf_counter()
        self._cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._wait = {name: wait_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> tuple[dict[str, float], dict[str, float | None]]:
        """End the window: per process, the cores it used and (None where unknown) the cores' worth it waited."""
        elapsed = time.perf_counter() - self._started
        used = {name: (cpu_seconds(pid) - self._cpu[name]) / elapsed for name, pid in self.pids.items()}
        waited: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            before, after = self._wait[name], wait_seconds(pid)
            # Per thread alive at the end: one that ended in the window loses only its wait in it, instead of taking
            # its wait from before the window out of the others'.
            waited[name] = None if before is None or after is None else sum(
                wait - before.get(thread, 0.0) for thread, wait in after.items()) / elapsed
        return used, waited


def _start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """`nmtserve serve` on loopback with free ports; returns the process and its gRPC and metrics ports and its decode
    process's pid, once SERVING.

    The log goes to `log_path` rather than a pipe: a reader of the pipe would be one more thread in the client's process.
    """
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "nmtserve.cli", "serve", "--bundle", str(args.bundle), "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "0", "--device", args.device, "--threads", str(args.threads),
             "--decoder-threads", str(args.decoder_threads),
             "--max-batch-size", str(max(args.streams, ENGINE_BATCH)), "--max-queue-size", str(max(256, args.streams)),
             "--log-level", "info"],
            stderr=log,
        )
    deadline = time.monotonic() + START_TIMEOUT
    text = ""
    while "event=serving" not in text and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        text = log_path.read_text(errors="replace")
    found = {name: int(value) for name, value in re.findall(r"(grpc_port|metrics_port|decode_pid)=(\d+)", text)}
    if "event=serving" not in text or len(found) < 3 or process.poll() is not None:
        process.kill()
        raise RuntimeError(f"nmtserve serve did not start (exit {process.poll()}); see {log_path}")
    return process, found


async def _client_streams(
    port: int, metrics_port: int, texts: list[str], request_seconds: float, meter: CoreMeter, args: argparse.Namespace
) -> tuple[float, list[dict], int, tuple[dict[str, float], dict[str, float | None]], dict[str, float]]:
    """Run the client streams for one round; returns the window's length, the timings of the requests that ended in it,
    their tokens, the meter's reading over the window (cores used, cores' worth waited for a core), and how much the
    server's step and encoder counters grew in it.

    Stream i starts i/N of a request's duration late, then sends unary Translate calls one after another until the
    window ends. Timings are the server's own (TranslateResponse.timings), and the call's latency as the client saw it.
    """
    options = pb.TranslateOptions(min_length=args.length, max_length=args.length)
    timings: list[dict] = []
    received = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        start = time.perf_counter() + args.warm_up_seconds
        stop = start + args.seconds

        async def one_stream(index: int) -> None:
            nonlocal received
            await asyncio.sleep(request_seconds * index / args.streams)
            sent = 0
            while time.perf_counter() < stop:
                text = texts[(index + sent * args.streams) % len(texts)]
                called = time.perf_counter()
                response = await stub.Translate(pb.TranslateRequest(texts=[text], options=options))
                answered = time.perf_counter()
                sent += 1
                if start <= answered <= stop:
                    t = response.timings
                    timings.append({"first_token_seconds": t.first_token_seconds, "encode_seconds": t.encode_seconds,
                                    "client_seconds": answered - called})
                    received += response.usage.output_tokens

        async def window() -> tuple[tuple[dict[str, float], dict[str, float | None]], dict[str, float]]:
            await asyncio.sleep(start - time.perf_counter())
            meter.start()
            before = await asyncio.to_thread(_server_totals, metrics_port)  # a thread: the streams go on meanwhile
            await asyncio.sleep(stop - time.perf_counter())
            cores = meter.stop()
            after = await asyncio.to_thread(_server_totals, metrics_port)
            return cores, {name: after[name] - before[name] for name in after}

        (cores, grown), *_ = await asyncio.gather(window(), *(one_stream(i) for i in range(args.streams)))
        return stop - start, timings, received, cores, grown


def _client_round(
    port: int, metrics_port: int, texts: list[str], request_seconds: float, pids: dict[str, int], load: argparse.Namespace,
    timeout: float,
) -> tuple[float, list[dict], int, tuple[dict[str, float], dict[str, float | None]], dict[str, float]]:
    """One round of client streams, run in the client process: what _client_streams returns, the cores read for pids."""
    streams = _client_streams(port, metrics_port, texts, request_seconds, CoreMeter(pids), load)
    return asyncio.run(asyncio.wait_for(streams, timeout))


# The server's histograms whose means the report uses: decode-step and encoder durations and batch sizes.
_MEANS = {"decode_step_seconds": "nmtserve_decode_step_duration_seconds", "encoder_seconds": "nmtserve_encoder_duration_seconds",
          "decode_step_batch_size": "nmtserve_decode_step_batch_size", "encoder_batch_size": "nmtserve_encoder_batch_size"}


def _server_totals(metrics_port: int) -> dict[str, float]:
    """The _sum and _count so far of the histograms in _MEANS, from the server's own metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        samples = {s.name: s.value for f in text_string_to_metric_families(response.read().decode()) for s in f.samples if not s.labels}
    return {f"{metric}_{part}": samples[f"{metric}_{part}"] for metric in _MEANS.values() for part in ("sum", "count")}


def _server_means(grown: list[dict[str, float]]) -> dict[str, float]:
    """The means of the histograms in _MEANS over the measured windows only (not the warm-ups): what the counters grew."""
    total = {name: sum(window[name] for window in grown) for name in grown[0]}
    return {key: total[f"{metric}_sum"] / max(total[f"{metric}_count"], 1) for key, metric in _MEANS.items()}


def _mean_known(values: list[float | None]) -> float | None:
    """The mean, or None if any value is unknown."""
    return None if None in values else float(np.mean(values))


def _waits_known(report: dict) -> bool:
    """Whether the system told every process's wait for a core."""
    return report["engine_waiting_cores"] is not None and None not in report["served_waiting_cores"].values()


def _plot(report: dict, path: Path) -> None:
    fig = Figure(figsize=(14, 4))
    throughput, latency, cpu = fig.subplots(1, 3)
    rounds = np.arange(len(report["rounds"]))
    for offset, key, label, color in ((-0.2, "engine_tokens_per_second", f"engine alone, batch {ENGINE_BATCH}", "tab:gray"),
                                      (0.2, "served_tokens_per_second", f"gRPC, {report['streams']} streams", "tab:blue")):
        throughput.bar(rounds + offset, [r[key] for r in report["rounds"]], 0.4, label=label, color=color)
    throughput.set_xticks(rounds, [f"round {i + 1}{' (!)' if r['foreign_load'] else ''}\n{r['ratio']:.2f}x"
                                   for i, r in enumerate(report["rounds"])])
    flagged = "; (!) another program ran" if any(r["foreign_load"] for r in report["rounds"]) else ""
    throughput.set(ylabel="generated tokens/s", title=f"Throughput (served / engine = {report['ratio']:.2f}){flagged}")
    throughput.legend(loc="lower right")
    over_budget = np.sort(np.array(report["time_to_first_token_seconds"]) / np.array(report["ttft_budget_seconds"]))
    latency.plot(over_budget, np.arange(1, len(over_budget) + 1) / len(over_budget))
    latency.axvline(1.0, color="tab:red", linestyle="--", label="budget: 3 steps + its encoder run")
    latency.axvline(report["p99_ttft_over_budget"], color="tab:green", linestyle=":", label="p99")
    latency.set(xlabel="time to first token / budget", ylabel="fraction of requests", title="Time to first token")
    latency.legend()
    colors = {"decode process": "tab:blue", "server": "tab:orange", "client": "tab:green"}
    bottom = 0.0
    for name, cores in report["served_cores"].items():
        cpu.bar(1, cores, 0.6, bottom=bottom, label=name, color=colors[name])
        bottom += cores
    cpu.bar(0, report["engine_cores"], 0.6, color="tab:gray")
    waiting = report["served_waiting_cores"]
    if _waits_known(report):
        # Hatched on top: time ready to run without a core, so the whole bar is what the processes asked for.
        cpu.bar(0, report["engine_waiting_cores"], 0.6, bottom=report["engine_cores"], color="tab:gray", alpha=0.4, hatch="//")
        for name, cores in waiting.items():
            cpu.bar(1, cores, 0.6, bottom=bottom, color=colors[name], alpha=0.4, hatch="//")
            bottom += cores
        cpu.bar(1, 0, 0.6, color="white", edgecolor="black", hatch="//", label="waiting for a core")
    cpu.axhline(report["cpu_count"], color="tab:red", linestyle="--", label=f"{report['cpu_count']} cores")
    cpu.set_xticks([0, 1], ["engine alone", "served"])
    cpu.set(ylabel="cores (mean over the windows)", title="CPU used, and waited for",
            ylim=(0, max(1.4 * report["cpu_count"], 1.15 * bottom)))
    cpu.legend(loc="upper left", fontsize="small")
    nicer = report["niceness"]["client"] - report["niceness"]["server"]
    fig.suptitle(f"nmtserve bench-serve: {report['device']}, {report['length']} tokens per text, client nice +{nicer}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(command: str, args: argparse.Namespace) -> int:
    """Alternate the engine alone and the server under load for some rounds; print, and write JSON and PNG."""
    out = args.out or args.bundle.resolve().parent
    engine = Engine.from_path(
        args.bundle, device=args.device, capacity=ENGINE_BATCH, threads=args.threads, decoder_threads=args.decoder_threads
    )
    # Whole batches only: a last, smaller one would lower the engine's "batch 32" reference.
    texts = made_up_texts(engine, ENGINE_BATCH * math.ceil(max(4 * args.streams, ENGINE_BATCH) / ENGINE_BATCH), args.source_tokens)
    sources = engine.encode_texts(texts)
    batches = [sources[i : i + ENGINE_BATCH] for i in range(0, len(sources), ENGINE_BATCH)]
    translate(engine, batches[0], DecodeOptions(min_length=args.length, max_length=args.length))  # warm-up, a whole batch

    out.mkdir(parents=True, exist_ok=True)
    print("starting nmtserve serve ...", flush=True)
    process, found = _start_server(args, out / "bench_serve.log")
    port, metrics_port = found["grpc_port"], found["metrics_port"]
    load = argparse.Namespace(**{name: getattr(args, name) for name in ("streams", "length", "warm_up_seconds", "seconds")})
    deadline = time.monotonic() + args.max_seconds
    rounds: list[dict] = []
    timings: list[dict] = []
    grown: list[dict[str, float]] = []
    # The client streams run in a process of their own, niced before it starts a thread (Linux sets a nice value per
    # thread, and new threads take their creator's), while the engine's reference keeps this process's priority.
    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=os.nice,
                                  initargs=(args.client_nice,))
    try:
        pids = {"decode process": found["decode_pid"], "server": process.pid, "client": clients.submit(os.getpid).result()}
        niceness = {name: psutil.Process(pid).nice() for name, pid in pids.items()}
        alone = CoreMeter({"engine alone": os.getpid()})
        for index in range(args.rounds):
            alone.start()
            engine_rate = engine_tokens_per_second(engine, batches, args.length, args.engine_seconds)
            used, waited = alone.stop()
            engine_cores, engine_waiting = used["engine alone"], waited["engine alone"]
            request_seconds = args.length * ENGINE_BATCH / engine_rate  # one text's decode at the engine's batch-32 pace
            seconds, round_timings, received, (cores, waiting), round_grown = clients.submit(
                _client_round, port, metrics_port, texts, request_seconds, pids, load, deadline - time.monotonic()
            ).result()
            grown.append(round_grown)
            rounds.append({"engine_tokens_per_second": engine_rate, "served_tokens_per_second": received / seconds,
                           "ratio": received / seconds / engine_rate, "seconds": seconds, "requests": len(round_timings),
                           "tokens": received, "engine_cores": engine_cores, "served_cores": cores,
                           "engine_waiting_cores": engine_waiting, "served_waiting_cores": waiting,
                           # The engine alone waited for a core: another program was running, and the ratio is suspect.
                           "foreign_load": engine_waiting is not None and engine_waiting > FOREIGN_LOAD_CORES})
            timings += round_timings
            print(f"round {index + 1}/{args.rounds}: engine alone {engine_rate:.0f}, served {received / seconds:.0f} "
                  f"generated tokens/s ({rounds[-1]['ratio']:.2f}x)", flush=True)
    finally:
        clients.shutdown(cancel_futures=True)
        process.terminate()
        process.wait(60)
    means = _server_means(grown)
    seconds = sum(r["seconds"] for r in rounds)
    served_rate = sum(r["tokens"] for r in rounds) / seconds
    engine_rate = float(np.mean([r["engine_tokens_per_second"] for r in rounds]))
    first_token = np.array([t["first_token_seconds"] for t in timings])
    encoder_runs = np.array([t["encode_seconds"] for t in timings])
    budgets = 3 * means["decode_step_seconds"] + encoder_runs
    # An encoder run's wall time includes its waits for a core, so a starved run widens its own text's budget: the same
    # figure with the median run in every budget shows how much that matters.
    typical_budgets = 3 * means["decode_step_seconds"] + np.median(encoder_runs)
    client_seconds = np.array([t["client_seconds"] for t in timings])
    p99 = float(np.percentile(first_token, 99))
    # Where the 1% furthest over budget spent their time: their own encoder run, and the rest (waiting for the decode
    # process's intake, the first step, and the report's way to the server's event loop).
    worst = np.argsort(first_token / budgets)[-max(1, len(timings) // 100) :]
    worst_parts = {"first_token_seconds": float(np.mean(first_token[worst])),
                   "encode_seconds": float(np.mean([timings[i]["encode_seconds"] for i in worst])),
                   "budget_seconds": float(np.mean(budgets[worst]))}
    report = {
        "device": engine.device, "streams": args.streams, "niceness": niceness, "seconds": seconds, "requests": len(timings),
        "length": args.length, "threads": args.threads, "engine_decoder_threads": engine.decoder_threads, "rounds": rounds,
        "engine_tokens_per_second": engine_rate, "served_tokens_per_second": served_rate,
        "ratio": served_rate / engine_rate, "p50_time_to_first_token_seconds": float(np.percentile(first_token, 50)),
        "p99_time_to_first_token_seconds": p99, "p99_ttft_over_budget": float(np.percentile(first_token / budgets, 99)),
        "median_ttft_budget_seconds": float(np.median(budgets)),
        "p99_ttft_over_budget_with_median_encoder_run": float(np.percentile(first_token / typical_budgets, 99)),
        "client_seconds_p50": float(np.percentile(client_seconds, 50)), "client_seconds_p99": float(np.percentile(client_seconds, 99)),
        "server": means,
        "furthest_over_budget_1_percent_means": worst_parts, "cpu_count": os.cpu_count(),
        "engine_cores": float(np.mean([r["engine_cores"] for r in rounds])),
        "served_cores": {name: float(np.mean([r["served_cores"][name] for r in rounds])) for name in pids},
        "engine_waiting_cores": _mean_known([r["engine_waiting_cores"] for r in rounds]),
        "served_waiting_cores": {name: _mean_known([r["served_waiting_cores"][name] for r in rounds]) for name in pids},
        # What each generated token cost in CPU: the server's overhead on the model's own work, whoever else ran.
        "cpu_ms_per_1000_tokens": {
            "engine alone": float(np.mean([r["engine_cores"] / r["engine_tokens_per_second"] for r in rounds])) * 1e6,
            **{name: float(np.mean([r["served_cores"][name] / r["served_tokens_per_second"] for r in rounds])) * 1e6
               for name in ("decode process", "server")},
        },
        "time_to_first_token_seconds": first_token.tolist(), "ttft_budget_seconds": budgets.tolist(),
    }
    (out / "bench_serve.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "bench_serve.png")
    print(f"engine alone, batch {ENGINE_BATCH}:   {engine_rate:9.0f} generated tokens/s (mean of {len(rounds)} rounds)")
    nicer = niceness["client"] - niceness["server"]
    print(f"served, {args.streams} streams:    {served_rate:9.0f} generated tokens/s  ({report['ratio']:.2f}x the engine; target >= 0.85; "
          f"rounds {min(r['ratio'] for r in rounds):.2f}-{max(r['ratio'] for r in rounds):.2f}x; client at nice +{nicer})")
    print(f"time to first token:  p50 {report['p50_time_to_first_token_seconds'] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
          f"p99 of each over its budget (3 steps + its encoder run, median {report['median_ttft_budget_seconds'] * 1000:.1f} ms): "
          f"{report['p99_ttft_over_budget']:.2f}x (target <= 1); "
          f"{report['p99_ttft_over_budget_with_median_encoder_run']:.2f}x with the median encoder run in every budget")
    print(f"whole call as the client saw it (its own waits for a core included): p50 {report['client_seconds_p50'] * 1000:.1f} ms, "
          f"p99 {report['client_seconds_p99'] * 1000:.1f} ms")
    print(f"the 1% of first tokens furthest over budget, means: {worst_parts['first_token_seconds'] * 1000:.1f} ms, their "
          f"own encoder run {worst_parts['encode_seconds'] * 1000:.1f} ms of it (budget {worst_parts['budget_seconds'] * 1000:.1f} ms)")
    print(f"server means over the windows: step {means['decode_step_seconds'] * 1000:.2f} ms over {means['decode_step_batch_size']:.1f} rows, "
          f"encoder {means['encoder_seconds'] * 1000:.2f} ms over {means['encoder_batch_size']:.1f} texts")
    served_cores = ", ".join(f"{name} {cores:.2f}" for name, cores in report["served_cores"].items())
    print(f"cores used (of {report['cpu_count']}): engine alone {report['engine_cores']:.2f}; served: {served_cores}")
    cost = report["cpu_ms_per_1000_tokens"]
    print(f"CPU per 1000 generated tokens: engine alone {cost['engine alone']:.1f} ms; served: decode process "
          f"{cost['decode process']:.1f} ms + server {cost['server']:.1f} ms "
          f"({(cost['decode process'] + cost['server']) / cost['engine alone']:.2f}x the engine's)")
    if _waits_known(report):
        served_waiting = ", ".join(f"{name} {cores:.2f}" for name, cores in report["served_waiting_cores"].items())
        print(f"cores' worth of time ready to run but waiting for a core: engine alone {report['engine_waiting_cores']:.2f}; "
              f"served: {served_waiting}")
    for index, r in enumerate(rounds, 1):
        if r["foreign_load"]:
            print(f"warning: in round {index} the engine alone waited {r['engine_waiting_cores']:.2f} cores' worth for a core: "
                  "something else was running on this machine, so that round's ratio is suspect")
    print(f"wrote {out / 'bench_serve.json'} and bench_serve.png")
    return 0
