"""The decode loop, in a process of its own: iteration-level (continuous) batching over one Engine.

The loop owns the ONNX Runtime sessions and the KV-cache rows. Each iteration
takes what the server sent (new texts, cancellations), drops the texts that
left (cancelled, deadline passed), admits waiting texts, oldest first, while
their beams fit in the free rows, encodes the admitted ones in one encoder
run, then runs one decoder step for all active texts together; a text that
finishes leaves at once and its rows serve the next admission. What the
iterations did goes back to the server as a Report, sent as soon as one has
news for a waiting call (admitted, finished, withdrawn, a streamed prefix) and
otherwise at least every REPORT_INTERVAL: a step that only adds a token to
unary calls is not worth waking the server for. When the decoder is idle
the loop waits up to `max_queue_delay` after the first arrival for more, so
that a burst shares one encoder run.

Why a process: the loop's own Python (the searches, the cache bookkeeping) and
the server's event loop would otherwise share one GIL. Measured on 2 cores, a
Python thread busy 40% of the time beside the loop took a third of its
throughput; the same load in another process took 5%.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from .config import configure_logging
from .engine import Decoder, Engine
from .search import DecodeOptions, Hypothesis

log = logging.getLogger(__name__)

REPORT_INTERVAL = 0.05  # seconds: the longest the server's step metrics lag while nothing else happens


@dataclass(frozen=True)
class EngineSpec:
    """What the decode process loads: the engine's arguments."""

    bundle: str
    device: str
    capacity: int
    threads: int
    decoder_threads: int


@dataclass(frozen=True)
class Text:
    """One text sent to the loop."""

    key: int
    source: list[int]
    options: DecodeOptions
    deadline: float | None  # time.monotonic() after which it leaves (the clock is the same in both processes)
    arrived: float  # time.monotonic() when the server queued it
    stream: bool  # report its best prefix after every step


@dataclass(frozen=True)
class Ready:
    """The engine loaded and warmed up."""

    device: str
    providers: list[str]
    capacity: int
    warm_up_seconds: float


@dataclass(frozen=True)
class LoadFailed:
    """The engine could not be loaded; the reason, for the server's log and exit."""

    reason: str


@dataclass
class Report:
    """What the iterations since the last report did, for the server to hand out and record."""

    admitted: list[tuple[int, float, float]] = field(default_factory=list)  # key, when admitted, its encoder run's seconds
    encoder_runs: list[tuple[int, float]] = field(default_factory=list)  # texts, seconds
    late: list[int] = field(default_factory=list)  # deadline passed: left the queue or the batch
    finished: list[tuple[int, list[Hypothesis]]] = field(default_factory=list)
    prefixes: list[tuple[int, list[int]]] = field(default_factory=list)  # streamed texts: best prefix so far
    failed: list[int] = field(default_factory=list)  # a model run raised `error`; these texts left the batch
    error: str | None = None
    steps: list[tuple[int, float]] = field(default_factory=list)  # rows, seconds
    active: int = 0
    rows_free: int = 0

    def has_news(self) -> bool:
        """Whether a waiting call hears something from this report (beyond the step metrics)."""
        return bool(self.admitted or self.late or self.finished or self.prefixes or self.failed)


# Messages from the server: ("submit", list[Text]), ("cancel", list[int]), ("stop", None).


def run(spec: EngineSpec, inbox: Connection, outbox: Connection, max_queue_delay: float, log_level: str) -> None:
    """The decode process: load and warm up the engine, send Ready (or LoadFailed), then loop until told to stop."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # the server process decides when the loop stops
    configure_logging(log_level)
    try:
        engine = Engine.from_path(
            spec.bundle, device=spec.device, capacity=spec.capacity, threads=spec.threads, decoder_threads=spec.decoder_threads
        )
        decoder = Decoder(engine)
        seconds = warm_up(decoder)
    except Exception as error:  # the bundle, the device or ONNX Runtime: the server exits with the reason
        outbox.send(LoadFailed(f"{type(error).__name__}: {error}"))
        return
    outbox.send(Ready(engine.device, engine.providers, engine.capacity, seconds))
    try:
        DecodeLoop(decoder, inbox, outbox, max_queue_delay).run()
    except (EOFError, BrokenPipeError):  # the server process is gone
        return


def warm_up(decoder: Decoder) -> float:
    """Run every shape class once (1 and all rows, shortest and longest source) so no request pays first-run costs."""
    started = time.perf_counter()
    engine = decoder.engine
    for rows in sorted({1, engine.capacity}):
        for length in sorted({1, engine.max_source_length}):
            source = [engine.tokens.unk] * (length - 1) + [engine.tokens.eos]
            keys = [("warm-up", rows, length, i) for i in range(rows)]
            decoder.add(keys, [source] * rows, [DecodeOptions(min_length=2, max_length=2)] * rows)
            while decoder.active:
                decoder.step()
    return time.perf_counter() - started


class DecodeLoop:
    """The loop's state: texts waiting for rows, texts in the batch, and the pipes to the server."""

    def __init__(self, decoder: Decoder, inbox: Connection, outbox: Connection, max_queue_delay: float):
        self.decoder = decoder
        self.inbox = inbox
        self.outbox = outbox
        self.max_queue_delay = max_queue_delay
        self.waiting: deque[Text] = deque()
        self.running: dict[int, Text] = {}
        self.stopping = False

    def run(self) -> None:
        """Iterate until the server says stop."""
        report, sent, rows_free_sent = Report(), time.monotonic(), None
        while True:
            self._receive(wait=not (self.waiting or self.decoder.active))
            if self.waiting and not self.decoder.active:
                self._gather()
            if self.stopping:
                return
            try:
                self._expire(report)
                self._admit(report)
                self._step(report)
            except Exception as error:  # a model run failed: fail its batch, keep serving the queue
                log.exception("event=decode_failed active=%d", len(self.running))
                report.failed, report.error = list(self.running), f"{type(error).__name__}: {error}"
                for key in self.running:
                    self.decoder.remove(key)
                self.running.clear()
            rows_free = self.decoder.rows_free()
            # Rows freed by a cancellation are news too (the free-rows gauge); an idle loop sends before it waits.
            if (report.has_news() or rows_free != rows_free_sent or not self.decoder.active
                    or time.monotonic() - sent >= REPORT_INTERVAL):
                report.active, report.rows_free = len(self.running), rows_free
                self.outbox.send(report)
                report, sent, rows_free_sent = Report(), time.monotonic(), rows_free

    def _receive(self, wait: bool, timeout: float | None = None) -> None:
        """Take the server's messages: block for the first one if `wait` (up to `timeout`), then take what has arrived."""
        ready = self.inbox.poll(timeout) if wait else self.inbox.poll(0)
        while ready:
            kind, payload = self.inbox.recv()
            if kind == "submit":
                self.waiting.extend(payload)
            elif kind == "cancel":
                self._withdraw(set(payload))
            else:
                self.stopping = True
                return
            ready = self.inbox.poll(0)

    def _withdraw(self, keys: set[int]) -> None:
        """Take texts out (cancelled, or past their deadline): out of the queue, or out of the batch with their rows freed."""
        self.waiting = deque(text for text in self.waiting if text.key not in keys)
        for key in keys & self.running.keys():
            del self.running[key]
            self.decoder.remove(key)

    def _gather(self) -> None:
        """The decoder is idle: wait up to max_queue_delay after the oldest arrival for more, to encode them together."""
        end = self.waiting[0].arrived + self.max_queue_delay
        while self.waiting and not self.stopping and sum(t.options.beam_size for t in self.waiting) < self.decoder.rows_free():
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            self._receive(wait=True, timeout=remaining)

    def _expire(self, report: Report) -> None:
        """Texts whose deadline has passed leave the queue and the batch now."""
        now = time.monotonic()
        late = [t.key for t in (*self.running.values(), *self.waiting) if t.deadline is not None and t.deadline <= now]
        if late:
            report.late.extend(late)
            self._withdraw(set(late))

    def _admit(self, report: Report) -> None:
        """Admit waiting texts, oldest first, while their beams fit in the free rows, and encode them in one run."""
        rows_free = self.decoder.rows_free()
        admitted: list[Text] = []
        while self.waiting and self.waiting[0].options.beam_size <= rows_free:
            text = self.waiting.popleft()
            rows_free -= text.options.beam_size
            admitted.append(text)
        if not admitted:
            return
        started = time.perf_counter()
        now = time.monotonic()
        for text in admitted:
            self.running[text.key] = text
        self.decoder.add([t.key for t in admitted], [t.source for t in admitted], [t.options for t in admitted])
        seconds = time.perf_counter() - started
        report.admitted.extend((text.key, now, seconds) for text in admitted)
        report.encoder_runs.append((len(admitted), seconds))

    def _step(self, report: Report) -> None:
        """One decoder step for every active text."""
        if not self.decoder.active:
            return
        rows = sum(sentence.search.rows for sentence in self.decoder.active)
        started = time.perf_counter()
        finished = self.decoder.step()
        report.steps.append((rows, time.perf_counter() - started))
        for key, hypotheses in finished:
            del self.running[key]
            report.finished.append((key, hypotheses))
        report.prefixes = [(s.key, list(s.search.prefixes[0])) for s in self.decoder.active if self.running[s.key].stream]
