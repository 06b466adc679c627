"""The decode loop, in a process of its own: iteration-level (continuous) batching over one Engine.

The loop owns the ONNX Runtime sessions and the KV-cache rows. Each iteration
takes what the server sent (new texts, cancellations), drops the texts that
left (cancelled, deadline passed), lets the texts of a finished encoder run
join the batch, sends the oldest waiting texts whose beams fit in the free rows
to the next encoder run, then runs one decoder step for all active texts
together; a text that finishes leaves at once and its rows serve the next
admission. The encoder runs in a thread of its own, beside the decoder steps,
so the texts in the batch do not wait for the newcomers' encoding; while a run
outlasts a step (a burst), the loop encodes a few newcomers itself, so that
they do not wait behind it either. What the
iterations did goes back to the server as a Report, sent as soon as one has
news for a waiting call (admitted, finished, withdrawn, a streamed token) and
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
import os
import signal
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from nmtserve.bundle import BundleError, read_bundle

from .config import configure_logging, freeze_startup_objects
from .engine import Decoder, EncodedBatch, Engine
from .pipes import MessageReader
from .search import DecodeOptions, Hypothesis

log = logging.getLogger(__name__)

REPORT_INTERVAL = 0.05  # seconds: the longest the server's step metrics lag while nothing else happens
INLINE_TEXTS = 4  # most texts the loop encodes on its own thread in one iteration (about a millisecond on a CPU)


@dataclass(frozen=True)
class EngineSpec:
    """What the decode process loads: the engine's arguments."""

    bundle: str
    sha256: str  # of the bundle the server read: the decode process must load the same one
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
    stream: bool  # report each new token after every step


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
    streamed: list[tuple[int, int, int]] = field(default_factory=list)  # streamed texts' new tokens: key, position, id
    failed: list[int] = field(default_factory=list)  # a model run raised `error`; these texts left the batch
    error: str | None = None
    steps: list[tuple[int, float]] = field(default_factory=list)  # rows, seconds
    active: int = 0
    rows_free: int = 0

    def has_news(self) -> bool:
        """Whether a waiting call hears something from this report (beyond the step metrics)."""
        return bool(self.admitted or self.late or self.finished or self.streamed or self.failed)


# Messages from the server, framed by `pipes`: ("submit", list[Text]), ("cancel", list[int]), ("stop", None).


def run(spec: EngineSpec, inbox: Connection, outbox: Connection, max_queue_delay: float, log_level: str) -> None:
    """The decode process: load and warm up the engine, send Ready (or LoadFailed), then loop until told to stop."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # the server process decides when the loop stops
    configure_logging(log_level)
    try:
        bundle = read_bundle(spec.bundle)
        if bundle.sha256 != spec.sha256:  # the path now holds another bundle (a re-export, a moved symlink)
            raise BundleError(f"{spec.bundle} changed while the server started: its manifest's sha256 is now "
                              f"{bundle.sha256}, the server read {spec.sha256}")
        engine = Engine(
            bundle, device=spec.device, capacity=spec.capacity, threads=spec.threads or encoder_threads(),
            decoder_threads=spec.decoder_threads,
        )
        decoder = Decoder(engine)
        seconds = warm_up(decoder)
        freeze_startup_objects()
    except Exception as error:  # the bundle, the device or ONNX Runtime: the server exits with the reason
        outbox.send(LoadFailed(f"{type(error).__name__}: {error}"))
        return
    outbox.send(Ready(engine.device, engine.providers, engine.capacity, seconds))
    try:
        DecodeLoop(decoder, inbox, outbox, max_queue_delay).run()
    except (EOFError, BrokenPipeError):  # the server process is gone
        return


def encoder_threads() -> int:
    """The encoder's default threads: a core each, but the one the decoder step keeps busy beside it."""
    return max(1, (os.cpu_count() or 1) - 1)


def warm_up(decoder: Decoder) -> float:
    """Run every shape class once (1 and all rows, shortest and longest source, every cache size up to the longest
    output) so no request pays first-run costs, and no position the model advertises fails first in a request."""
    started = time.perf_counter()
    engine = decoder.engine
    runs = [(rows, length, 2) for rows in sorted({1, engine.capacity}) for length in sorted({1, engine.max_source_length})]
    for rows, length, steps in [*runs, (1, 1, engine.max_target_length)]:
        source = [engine.tokens.unk] * (length - 1) + [engine.tokens.eos]
        keys = [("warm-up", rows, length, i) for i in range(rows)]
        decoder.add(keys, [source] * rows, [DecodeOptions(min_length=steps, max_length=steps)] * rows)
        while decoder.active:
            decoder.step()
    return time.perf_counter() - started


@dataclass
class EncoderRun:
    """Texts taken from the queue and being encoded, in the encoder's thread, while the decoder steps."""

    texts: dict[int, Text]  # by key, in batch order; a text withdrawn meanwhile is taken out
    keys: list[int]  # every key of the batch, in order
    started: float  # time.monotonic()
    result: Future[tuple[EncodedBatch, float]]  # the encoded batch and the run's seconds


class DecodeLoop:
    """The loop's state: texts waiting for rows, texts being encoded, texts in the batch, and the pipes to the server."""

    def __init__(self, decoder: Decoder, inbox: Connection, outbox: Connection, max_queue_delay: float):
        self.decoder = decoder
        self.inbox = MessageReader(inbox)
        self.outbox = outbox
        self.max_queue_delay = max_queue_delay
        self.waiting: deque[Text] = deque()
        self.encoding: EncoderRun | None = None
        self.running: dict[int, Text] = {}
        self.stopping = False
        self.report = Report()  # what the iterations since the last report did
        self.sent = time.monotonic()  # when the last report went
        self.rows_free_sent: int | None = None  # the free rows it told
        self.last_step = 0.0  # seconds the last decoder step took
        # One encoder run at a time, beside the decoder steps: ONNX Runtime releases the GIL while either runs.
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="encoder")

    def run(self) -> None:
        """Iterate until the server says stop."""
        try:
            while self.iterate():
                pass
        finally:
            self.encoder.shutdown()

    def iterate(self) -> bool:
        """Take the server's messages (waiting for one when there is nothing to do), drop late texts, admit, step, and
        report; False once the server has said stop."""
        self._receive(wait=not (self.waiting or self.encoding or self.decoder.active))
        if self.waiting and not (self.encoding or self.decoder.active):
            self._gather()
        if self.stopping:
            return False
        report = self.report
        try:
            self._expire(report)
            self._admit(report)
            self._step(report)
        except Exception as error:  # a model run failed: fail its batch, keep serving the queue
            log.exception("event=decode_failed active=%d", len(self.running))
            report.failed.extend(self.running)
            report.error = f"{type(error).__name__}: {error}"
            for key in self.running:
                self.decoder.remove(key)
            self.running.clear()
        rows_free = self._rows_free()
        # Rows freed by a cancellation are news too (the free-rows gauge); an idle loop sends before it waits.
        if (report.has_news() or rows_free != self.rows_free_sent or not self.decoder.active
                or time.monotonic() - self.sent >= REPORT_INTERVAL):
            report.active, report.rows_free = len(self.running), rows_free
            self.outbox.send(report)
            self.report, self.sent, self.rows_free_sent = Report(), time.monotonic(), rows_free
        return True

    def _receive(self, wait: bool, timeout: float | None = None) -> None:
        """Take the server's messages: wait for some first if `wait` (up to `timeout`), then take what has arrived."""
        if wait:
            self.inbox.wait(timeout)
        for kind, payload in self.inbox.take():
            if kind == "submit":
                self.waiting.extend(payload)
            elif kind == "cancel":
                self._withdraw(set(payload))
            else:
                self.stopping = True
                return

    def _withdraw(self, keys: set[int]) -> None:
        """Take texts out (cancelled, or past their deadline): out of the queue, the encoder run (its result for them is
        dropped), or the batch with their rows freed."""
        self.waiting = deque(text for text in self.waiting if text.key not in keys)
        if self.encoding is not None:
            for key in keys & self.encoding.texts.keys():
                del self.encoding.texts[key]
        for key in keys & self.running.keys():
            del self.running[key]
            self.decoder.remove(key)

    def _rows_free(self) -> int:
        """KV-cache rows neither in use nor kept for the encoder run in flight."""
        kept = sum(t.options.beam_size for t in self.encoding.texts.values()) if self.encoding is not None else 0
        return self.decoder.rows_free() - kept

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
        encoding = self.encoding.texts.values() if self.encoding is not None else ()
        late = [t.key for t in (*self.running.values(), *encoding, *self.waiting) if t.deadline is not None and t.deadline <= now]
        if late:
            report.late.extend(late)
            self._withdraw(set(late))

    def _admit(self, report: Report) -> None:
        """Texts whose encoder run has ended join the batch; then the oldest waiting texts whose beams fit in the rows
        left go to the encoder, to join at a later step.

        While a run lasts longer than a decoder step (a burst of texts), a few newcomers at a time are encoded on the
        loop's own thread instead, and join at once. With no text to step, the loop waits for the run in flight.
        """
        if self.encoding is not None:
            if self.decoder.active and not self.encoding.result.done():
                if time.monotonic() - self.encoding.started > self.last_step:  # a long run: no newcomer waits for it
                    self._encode_here(report)
                return
            ended, self.encoding = self.encoding, None
            self._join(ended, report)
        taken = self._take(self.decoder.rows_free(), len(self.waiting))
        if taken:
            result = self.encoder.submit(_timed_encode, self.decoder.engine, [t.source for t in taken])
            self.encoding = EncoderRun({t.key: t for t in taken}, [t.key for t in taken], time.monotonic(), result)

    def _take(self, rows_free: int, most: int) -> list[Text]:
        """The oldest waiting texts, at most `most`, while their beams fit in `rows_free` rows."""
        taken: list[Text] = []
        while self.waiting and len(taken) < most and self.waiting[0].options.beam_size <= rows_free:
            text = self.waiting.popleft()
            rows_free -= text.options.beam_size
            taken.append(text)
        return taken

    def _encode_here(self, report: Report) -> None:
        """A few waiting texts are encoded on the loop's own thread and join at once, not waiting behind a long run."""
        taken = self._take(self._rows_free(), INLINE_TEXTS)
        if not taken:
            return
        started, result = time.monotonic(), Future()
        try:
            result.set_result(_timed_encode(self.decoder.engine, [t.source for t in taken]))
        except Exception as error:  # _join fails these texts with the reason, as for the encoder thread's runs
            result.set_exception(error)
        self._join(EncoderRun({t.key: t for t in taken}, [t.key for t in taken], started, result), report)

    def _join(self, run: EncoderRun, report: Report) -> None:
        """The texts of a finished encoder run take their rows and join the batch (or fail with the run)."""
        rows = [i for i, key in enumerate(run.keys) if key in run.texts]  # not withdrawn while it ran
        texts = [run.texts[run.keys[i]] for i in rows]
        try:
            batch, seconds = run.result.result()
            if texts:
                kept = batch if len(rows) == len(run.keys) else batch.select(rows)
                self.decoder.insert([t.key for t in texts], kept, [t.options for t in texts])
        except Exception as error:  # the encoder failed: the run's texts fail, the batch decodes on
            log.exception("event=encode_failed texts=%d", len(texts))
            report.failed.extend(t.key for t in texts)
            report.error = f"{type(error).__name__}: {error}"
            return
        report.encoder_runs.append((len(run.keys), seconds))
        for text in texts:
            self.running[text.key] = text
        report.admitted.extend((text.key, run.started, seconds) for text in texts)

    def _step(self, report: Report) -> None:
        """One decoder step for every active text."""
        if not self.decoder.active:
            return
        rows = sum(sentence.search.rows for sentence in self.decoder.active)
        started = time.perf_counter()
        finished = self.decoder.step()
        self.last_step = time.perf_counter() - started
        report.steps.append((rows, self.last_step))
        for key, hypotheses in finished:
            del self.running[key]
            report.finished.append((key, hypotheses))
        for sentence in self.decoder.active:
            if self.running[sentence.key].stream:  # greedy: a step adds one token to a text it does not finish
                prefix = sentence.search.prefixes[0]
                report.streamed.append((sentence.key, len(prefix) - 1, prefix[-1]))


def _timed_encode(engine: Engine, sources: list[list[int]]) -> tuple[EncodedBatch, float]:
    """One encoder run, and its seconds."""
    started = time.perf_counter()
    batch = engine.encode(sources)
    return batch, time.perf_counter() - started
