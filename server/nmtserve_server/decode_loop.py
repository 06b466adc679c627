"""The decode loop, in a process of its own: iteration-level (continuous) batching over one Engine.

The loop owns the ONNX Runtime sessions and the KV-cache rows, in two threads.
The intake thread reads the server's messages as they arrive and starts new
texts at once, beside the decoder step in progress: one encoder run, then the
decoder's first step for those texts alone (Decoder.start), whose first tokens
it reports to the server there and then, so a newcomer's first token waits for
neither the step in progress nor a step of the whole batch. Texts that arrive
while it runs share its next run. It hands the started runs, cancellations and
the stop to the loop's thread in the order the server sent them. Each iteration
of the loop's thread takes them, drops the texts that left (cancelled, deadline
passed), lets the oldest started texts whose beams fit in the free rows join
the batch, then runs one decoder step for all active texts together; a text
that finishes leaves at once and its rows serve the next admission. What the
iterations did goes back to the server as a Report, sent as soon as one has
news for a waiting call (finished, withdrawn, a streamed token) and otherwise
at least every REPORT_INTERVAL or REPORT_STEPS: a step that only adds a token to unary calls is
not worth waking the server for. When the loop is idle the intake waits up to
`max_queue_delay` after the first arrival for more, so that a burst shares one
encoder run.

Why a process: the loop's own Python (the searches, the cache bookkeeping) and
the server's event loop would otherwise share one GIL. Measured on 2 cores, a
Python thread busy 40% of the time beside the loop took a third of its
throughput; the same load in another process took 5%.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from multiprocessing.connection import Connection

from nmtserve.bundle import BundleError, read_bundle

from .config import configure_logging, freeze_startup_objects
from .engine import Decoder, EncodedBatch, Engine
from .pipes import MessageReader, write_message
from .search import BeamSearch, DecodeOptions, Hypothesis

log = logging.getLogger(__name__)

REPORT_INTERVAL = 0.05  # seconds: the longest the server's step metrics lag while nothing else happens
REPORT_STEPS = 32  # and in steps: a small model on a fast machine runs hundreds in REPORT_INTERVAL
LONGEST_WAIT = 3600.0  # seconds: a deadline further off is looked at again then; epoll refuses waits of about 24.8 days


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
    decoder_threads: int  # the decoder step's, as chosen at load


@dataclass(frozen=True)
class LoadFailed:
    """The engine could not be loaded; the reason, for the server's log and exit."""

    reason: str


@dataclass
class Report:
    """What the iterations since the last report did (or the intake's run, its texts' first tokens), for the server
    to hand out and record."""

    started: list[tuple[int, float]] = field(default_factory=list)  # first token made: key, its encoder run's seconds
    admitted: list[tuple[int, float]] = field(default_factory=list)  # key, when it joined the batch (or ended before)
    encoder_runs: list[tuple[int, float]] = field(default_factory=list)  # texts, seconds
    first_steps: list[float] = field(default_factory=list)  # seconds of the intake's first step for an encoder run
    late: list[int] = field(default_factory=list)  # deadline passed: left the queue or the batch
    finished: list[tuple[int, list[Hypothesis]]] = field(default_factory=list)
    streamed: list[tuple[int, int, int]] = field(default_factory=list)  # streamed texts' new tokens: key, position, id
    failed: list[tuple[int, str]] = field(default_factory=list)  # a model run raised: key, the error; the text left
    steps: list[tuple[int, float]] = field(default_factory=list)  # rows, seconds
    active: int | None = None  # texts in the batch and rows free after the iteration (None from the intake)
    rows_free: int | None = None

    def has_news(self) -> bool:
        """Whether a waiting call hears something from this report (beyond the metrics)."""
        return bool(self.started or self.late or self.finished or self.streamed or self.failed)


# Messages from the server, framed by `pipes`: ("submit", list[Text]), ("cancel", list[int]), ("stop", None).


def run(spec: EngineSpec, inbox: Connection, outbox: Connection, max_queue_delay: float, log_level: str) -> None:
    """The decode process: load and warm up the engine, send Ready (or LoadFailed), then loop until told to stop."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # the server process decides when the loop stops
    configure_logging(log_level)
    try:
        decoder = _load(spec)
        seconds = warm_up(decoder)
        freeze_startup_objects()
    except MemoryError as error:  # the cache rows are the one part of the load that a setting sizes
        write_message(outbox, LoadFailed(f"MemoryError: {error}; the KV cache of --max-batch-size {spec.capacity} rows "
                                         "does not fit: give a smaller one, or the server more memory"))
        return
    except Exception as error:  # the bundle, the device or ONNX Runtime: the server exits with the reason
        write_message(outbox, LoadFailed(f"{type(error).__name__}: {error}"))
        return
    engine = decoder.engine
    write_message(outbox, Ready(engine.device, engine.providers, engine.capacity, seconds, engine.decoder_threads))
    try:
        DecodeLoop(decoder, inbox, outbox, max_queue_delay).run()
    except BrokenPipeError:  # the server process is gone
        return


def _load(spec: EngineSpec) -> Decoder:
    """The engine of the bundle the server verified. The bundle's graph bytes go once ONNX Runtime holds its copy:
    the bundle is this function's alone, and the loop runs for the life of the process."""
    bundle = read_bundle(spec.bundle)
    if bundle.sha256 != spec.sha256:  # the path now holds another bundle (a re-export, a moved symlink)
        raise BundleError(f"{spec.bundle} changed while the server started: its manifest's sha256 is now "
                          f"{bundle.sha256}, the server read {spec.sha256}")
    engine = Engine(bundle, device=spec.device, capacity=spec.capacity, threads=spec.threads or encoder_threads(),
                    decoder_threads=spec.decoder_threads)
    return Decoder(engine)


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
    """Texts the intake encoded and started together, waiting in the loop (whole or in part) for rows in the batch."""

    texts: dict[int, Text]  # by key, in batch order; a text that leaves (or ends at its first step) is taken out
    keys: list[int]  # every key of the batch, in order: the encoded batch's rows
    seconds: float  # the encoder run's
    batch: EncodedBatch | None  # None if the encoder or the first step failed
    first_step_seconds: float = 0.0
    searches: dict[int, BeamSearch] = field(default_factory=dict)  # by key, advanced by the first step
    error: str | None = None


class DecodeLoop:
    """The loop's state: texts read and not yet encoded (the intake's), texts encoded and waiting for rows, texts in
    the batch, the pipes to the server, and the intake thread (see the module's docstring)."""

    def __init__(self, decoder: Decoder, inbox: Connection, outbox: Connection, max_queue_delay: float):
        self.decoder = decoder
        self.inbox = MessageReader(inbox)
        self.outbox = outbox
        self.max_queue_delay = max_queue_delay
        self.pending: deque[Text] = deque()  # the intake's: read, not yet encoded, oldest first
        self.ready: deque[EncoderRun] = deque()  # the loop's: encoded, waiting for rows, oldest first
        self.running: dict[int, Text] = {}
        self.stopping = False
        self.report = Report()  # what the iterations since the last report did
        self.sent = time.monotonic()  # when the last report went
        self.rows_free_sent: int | None = None  # the free rows it told
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()  # from the intake, in order
        self.idle = threading.Event()  # set while the loop waits with nothing to do: the intake may gather a burst
        # It starts with nothing to do. Clear until its thread first waited, the first texts after the start had been
        # started one by one, and the rest of their burst then waited out --max-queue-delay-ms for rows already free.
        self.idle.set()
        # The intake starts only texts the batch has free rows for, counting those started and waiting: a first token
        # then means the text joins at the next step (not a wait for rows, unseen by the time-to-first-token figures),
        # and encoder output held stays bounded. The rest wait in its queue until the loop wakes it.
        self.free_rows = decoder.engine.capacity  # the batch's, after the loop's last iteration (both, under `lock`)
        self.ahead = 0  # rows of texts started and not yet joined or gone (both threads, under `lock`)
        self.starved = False  # the intake waits for room (under `lock`)
        self.lock = threading.Lock()
        self.sending = threading.Lock()  # both threads send reports: one message at a time in the pipe
        self._wake_reader, self._wake_writer = os.pipe()  # the loop wakes a starved intake
        self.intake = threading.Thread(target=self._intake, name="intake", daemon=True)

    def run(self) -> None:
        """Iterate until the server says stop (or its end of the pipe closes)."""
        self.start()
        try:
            while self.iterate():
                pass
        finally:
            self.close()

    def start(self) -> None:
        """Start the intake thread."""
        self.intake.start()

    def close(self) -> None:
        """After the stop: wait for the intake thread to end, then close the wake-up pipe."""
        self.intake.join(timeout=10)
        if not self.intake.is_alive():  # else the process is ending anyway; the thread may still select on it
            os.close(self._wake_reader)
            os.close(self._wake_writer)

    def iterate(self) -> bool:
        """Take the intake's news (waiting for some when there is nothing to do), drop late texts, admit, step, and
        report; False once the server has said stop."""
        self._receive(wait=not (self.ready or self.decoder.active))
        if self.stopping:
            return False
        report = self.report
        try:
            self._expire(report)
            self._admit(report)
            self._step(report)
        except Exception as error:  # a model run failed: fail its batch, keep serving the queue
            log.exception("event=decode_failed active=%d", len(self.running))
            report.failed += [(key, f"{type(error).__name__}: {error}") for key in self.running]
            for key in self.running:
                self.decoder.remove(key)
            self.running.clear()
        rows_free = self.decoder.rows_free()
        self._publish_free_rows(rows_free)
        # Rows freed by a cancellation are news too (the free-rows gauge); an idle loop sends before it waits.
        if (report.has_news() or rows_free != self.rows_free_sent or not self.decoder.active
                or time.monotonic() - self.sent >= REPORT_INTERVAL or len(report.steps) >= REPORT_STEPS):
            report.active, report.rows_free = len(self.running), rows_free
            with self.sending:
                write_message(self.outbox, report)
            self.report, self.sent, self.rows_free_sent = Report(), time.monotonic(), rows_free
        return True

    # The loop's thread.

    def _receive(self, wait: bool) -> None:
        """Take what the intake passed on: wait for something first if `wait`."""
        if wait:
            if self.events.empty():
                self.idle.set()
            event = self.events.get()
            self.idle.clear()
            self._handle(event)
        while not self.stopping:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            self._handle(event)

    def _handle(self, event: tuple[str, Any]) -> None:
        """Act on one of the intake's events."""
        kind, payload = event
        if kind == "encoded":
            self.ready.append(payload)
            if payload.batch is not None:
                self.report.encoder_runs.append((len(payload.keys), payload.seconds))
        elif kind == "cancel":
            self._withdraw(set(payload))
        elif kind == "late":  # left the intake's queue before its encoder run
            self.report.late.extend(payload)
        else:  # "stop", or the server's end of the pipe closed
            self.stopping = True

    def _withdraw(self, keys: set[int]) -> None:
        """Take texts out (cancelled, or past their deadline): out of the runs waiting for rows, or out of the batch
        with their rows freed."""
        left = 0
        for run in self.ready:
            for key in keys & run.texts.keys():
                left += run.texts.pop(key).options.beam_size
        self._release_ahead(left)
        for key in keys & self.running.keys():
            del self.running[key]
            self.decoder.remove(key)

    def _expire(self, report: Report) -> None:
        """Texts whose deadline has passed leave now, waiting or in the batch."""
        now = time.monotonic()
        waiting = (t for run in self.ready for t in run.texts.values())
        late = [t.key for t in (*self.running.values(), *waiting) if t.deadline is not None and t.deadline <= now]
        if late:
            report.late.extend(late)
            self._withdraw(set(late))

    def _admit(self, report: Report) -> None:
        """The oldest encoded texts whose beams fit in the free rows join the batch; the texts of a run that failed (in
        the encoder, or taking its rows) fail with the reason, and the batch decodes on."""
        rows_free = self.decoder.rows_free()
        while self.ready:
            run = self.ready[0]
            if run.batch is None:  # the encoder or the first step failed
                self._fail(run, run.error or "the encoder or the first decoder step failed", report)
                continue
            joining: list[Text] = []
            for text in run.texts.values():
                if text.options.beam_size > rows_free:
                    break
                rows_free -= text.options.beam_size
                joining.append(text)
            try:
                row = {key: i for i, key in enumerate(run.keys)}  # each text's row in its encoder run's batch
                self.decoder.join(run.batch, [run.searches[key] for key in run.keys], [row[t.key] for t in joining],
                                  [t.key for t in joining])
            except Exception as error:
                log.exception("event=admit_failed texts=%d", len(run.texts))
                self._fail(run, f"{type(error).__name__}: {error}", report)
                continue
            joined = time.monotonic()
            for text in joining:
                del run.texts[text.key]
                self.running[text.key] = text
            report.admitted.extend((text.key, joined) for text in joining)
            self._release_ahead(sum(t.options.beam_size for t in joining), joined=True)
            if run.texts:  # the rest wait for rows
                return
            self.ready.popleft()

    def _fail(self, run: EncoderRun, error: str, report: Report) -> None:
        """The texts left in the run at the head of `ready` fail with the reason; the batch decodes on."""
        if run.texts:
            report.failed += [(key, error) for key in run.texts]
        self._release_ahead(sum(t.options.beam_size for t in run.texts.values()))
        self.ready.popleft()

    def _release_ahead(self, rows: int, joined: bool = False) -> None:
        """Texts started ahead joined the batch (taking as many of its free rows) or left (the intake may start as
        many rows more)."""
        if not rows:
            return
        with self.lock:
            self.ahead -= rows
            if joined:
                self.free_rows -= rows
                return
            wake, self.starved = self.starved, False
        if wake:
            os.write(self._wake_writer, b"\0")

    def _publish_free_rows(self, rows: int) -> None:
        """Tell the intake the batch's free rows after an iteration; wake it if it waits and rows came free."""
        with self.lock:
            wake = self.starved and rows > self.free_rows
            self.free_rows = rows
            if wake:
                self.starved = False
        if wake:
            os.write(self._wake_writer, b"\0")

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
        for sentence in self.decoder.active:
            if self.running[sentence.key].stream:  # greedy: a step adds one token to a text it does not finish
                prefix = sentence.search.prefixes[0]
                report.streamed.append((sentence.key, len(prefix) - 1, prefix[-1]))

    # The intake thread.

    def _intake(self) -> None:
        """Read the server's messages as they arrive, encode new texts as rows ahead allow, and pass on, in order,
        the encoder runs, the cancellations, the texts late before their run, and the stop."""
        selector = selectors.DefaultSelector()
        selector.register(self.inbox.connection, selectors.EVENT_READ)
        selector.register(self._wake_reader, selectors.EVENT_READ)
        try:
            while self._intake_once(selector):
                pass
        except (EOFError, OSError):  # the server process is gone
            self.events.put(("stop", None))
        except Exception:  # the loop stops too, and the server fails the calls with "the decode process ended"
            log.exception("event=intake_failed")
            self.events.put(("stop", None))
        finally:
            selector.close()

    def _intake_once(self, selector: selectors.BaseSelector) -> bool:
        """Wait for news, read it, and encode what fits; False after the stop."""
        self._wait(selector, self._intake_timeout())
        if not self._read():
            return False
        if self.pending and self.idle.is_set() and self.max_queue_delay > 0 and not self._gather(selector):
            return False
        self._expire_pending()
        taken = self._take()
        if taken:
            run = _start(self.decoder, taken)
            if run.batch is not None:
                self._report_started(run)
            self.events.put(("encoded", run))
        return True

    def _report_started(self, run: EncoderRun) -> None:
        """Send the server the first tokens of a started run's texts now; those that the first step ended leave the
        run (they never join the batch)."""
        report, now, ended_rows = Report(first_steps=[run.first_step_seconds]), time.monotonic(), 0
        for key in run.keys:
            text, search = run.texts[key], run.searches[key]
            report.started.append((key, run.seconds))
            if search.done:
                report.admitted.append((key, now))
                report.finished.append((key, search.results()))
                ended_rows += text.options.beam_size
                del run.texts[key]
            elif text.stream:
                report.streamed.append((key, 0, search.prefixes[0][-1]))
        if ended_rows:
            with self.lock:  # no need to wake the intake: this is it
                self.ahead -= ended_rows
        with self.sending:
            write_message(self.outbox, report)

    def _intake_timeout(self) -> float | None:
        """How long the intake may wait: not at all while a text can be started, else until the next queued text's
        deadline (None: until a message or the loop wakes it)."""
        if not self.pending:
            return None
        with self.lock:
            if self.pending[0].options.beam_size <= self.free_rows - self.ahead:
                return 0
            self.starved = True
        deadlines = [t.deadline for t in self.pending if t.deadline is not None]
        return min(max(0.0, min(deadlines) - time.monotonic()), LONGEST_WAIT) if deadlines else None

    def _read(self) -> bool:
        """Take the messages that have arrived: queue the texts, drop the cancelled ones and pass the cancellation
        on (the loop may hold some of them), pass the stop on; False after the stop."""
        for kind, payload in self.inbox.take():
            if kind == "submit":
                self.pending.extend(payload)
                continue
            if kind == "cancel":
                keys = set(payload)
                self.pending = deque(t for t in self.pending if t.key not in keys)
            self.events.put((kind, payload))
            if kind == "stop":
                return False
        return True

    def _gather(self, selector: selectors.BaseSelector) -> bool:
        """The loop is idle: wait up to max_queue_delay after the first arrival for more, to encode them together;
        False after the stop."""
        end = self.pending[0].arrived + self.max_queue_delay
        while self.pending and sum(t.options.beam_size for t in self.pending) < self._room():
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            self._wait(selector, remaining)
            if not self._read():
                return False
        return True

    def _room(self) -> int:
        """Rows the intake may still start texts for: the batch's free rows less those held for texts started ahead."""
        with self.lock:
            return self.free_rows - self.ahead

    def _wait(self, selector: selectors.BaseSelector, timeout: float | None) -> None:
        """Wait up to `timeout` for a message or the loop's wake-up, and take the wake-up's bytes, which would
        otherwise end every later wait at once."""
        for key, _ in selector.select(timeout):
            if key.fileobj == self._wake_reader:
                os.read(self._wake_reader, 4096)

    def _expire_pending(self) -> None:
        """Queued texts whose deadline has passed leave before their encoder run; the loop reports them late."""
        now = time.monotonic()
        late = {t.key for t in self.pending if t.deadline is not None and t.deadline <= now}
        if late:
            self.pending = deque(t for t in self.pending if t.key not in late)
            self.events.put(("late", sorted(late)))

    def _take(self) -> list[Text]:
        """The oldest queued texts whose beams fit in the batch's free rows not yet held for texts started ahead;
        counted as ahead."""
        taken: list[Text] = []
        with self.lock:
            room = self.free_rows - self.ahead
            while self.pending and self.pending[0].options.beam_size <= room:
                text = self.pending.popleft()
                room -= text.options.beam_size
                taken.append(text)
            self.ahead = self.free_rows - room
        return taken


def _start(decoder: Decoder, texts: list[Text]) -> EncoderRun:
    """One encoder run for texts (timed), then their first decoder step; a failure is kept for the loop to report."""
    keys, searches, batch, error, seconds, first_step_seconds = [t.key for t in texts], {}, None, None, 0.0, 0.0
    started = time.perf_counter()
    try:
        encoded = decoder.engine.encode([t.source for t in texts])
        seconds = time.perf_counter() - started
        searches = dict(zip(keys, decoder.start(encoded, [t.options for t in texts])))
        batch, first_step_seconds = encoded, time.perf_counter() - started - seconds
    except Exception as failure:  # the loop fails these texts with the reason; the batch decodes on
        log.exception("event=start_failed texts=%d", len(texts))
        error = f"{type(failure).__name__}: {failure}"
    return EncoderRun({t.key: t for t in texts}, keys, seconds, batch, first_step_seconds, searches, error)
