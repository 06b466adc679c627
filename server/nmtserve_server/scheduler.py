"""The decode loop: a bounded queue in front of a Decoder, with iteration-level (continuous) batching.

The loop runs in its own thread, which owns the Engine and the Decoder and
never waits for the event loop: ONNX Runtime releases the GIL, so the event
loop keeps answering RPCs while the model runs, and the model keeps running
while the event loop answers. Each iteration drops the texts that left
(cancelled, deadline passed), admits waiting texts, oldest first, while their
beams fit in the free KV-cache rows, encodes the admitted ones in one encoder
run, then runs one decoder step for all active texts together; a text that
finishes leaves at once and its rows serve the next admission. What an
iteration did goes back to the event loop, which owns every future, stream
and metric. When the decoder is idle the loop waits up to `max_queue_delay`
after the first arrival for more, so that a burst shares one encoder run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from .engine import Decoder, Engine
from .metrics import Metrics
from .search import DecodeOptions, Hypothesis

log = logging.getLogger(__name__)

_keys = itertools.count()


class QueueFullError(Exception):
    """The queue has no room for the request's texts."""


class UnavailableError(Exception):
    """The scheduler is not accepting work: still starting, draining or stopped."""


class DeadlineError(Exception):
    """A text's deadline passed before it finished."""


@dataclass(eq=False)
class Job:
    """One text on its way through the scheduler, and where its result goes."""

    source: list[int]
    options: DecodeOptions
    future: asyncio.Future[list[Hypothesis]]
    deadline: float | None = None  # time.monotonic() after which it leaves
    pieces: asyncio.Queue[list[int] | None] | None = None  # streaming: new token ids per step, None at the end
    key: int = field(default_factory=lambda: next(_keys))
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    encode_seconds: float = 0.0  # the encoder run that took it
    first_token: float | None = None
    streamed: int = 0  # tokens already put in `pieces`

    def finish(self, result: list[Hypothesis] | Exception | None) -> None:
        """Hand the result, the error, or (None) the cancellation to the waiting RPC, once."""
        if not self.future.done():
            if result is None:
                self.future.cancel()
            elif isinstance(result, Exception):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)
        if self.pieces is not None:
            self.pieces.put_nowait(None)


@dataclass
class Iteration:
    """What one iteration of the decode thread did, for the event loop to hand out and record."""

    admitted: list[Job] = field(default_factory=list)
    late: list[Job] = field(default_factory=list)  # deadline passed: left the queue or the batch
    finished: list[tuple[Job, list[Hypothesis]]] = field(default_factory=list)
    prefixes: list[tuple[Job, list[int]]] = field(default_factory=list)  # streamed texts: best prefix so far (a copy)
    failed: list[Job] = field(default_factory=list)  # a model run raised `error`; these texts left the batch
    error: Exception | None = None
    active: int = 0
    rows_free: int = 0
    waiting: int = 0
    encode_seconds: float = 0.0
    step_rows: int = 0
    step_seconds: float = 0.0


class Scheduler:
    """Owns the engine (in the decode thread), the queue and the decode loop."""

    def __init__(self, metrics: Metrics, *, max_batch_size: int, max_queue_size: int, max_queue_delay: float):
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_queue_delay = max_queue_delay
        self.state = "starting"  # -> serving -> draining -> stopped
        self._decoder: Decoder | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Shared with the decode thread, under _condition: the queue, the keys that left, the stop flag.
        self._condition = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._leaving: list[int] = []
        self._stopping = False
        self._running: dict[int, Job] = {}  # the decode thread's own: texts in the batch

    async def start(self, load: Callable[[], Engine]) -> Engine:
        """Load the engine and warm it up off the event loop, then start the decode thread and accept work."""
        engine = await asyncio.to_thread(load)
        self._decoder = Decoder(engine)
        seconds = await asyncio.to_thread(self._warm_up)
        log.info("event=warmed_up seconds=%.3f", seconds)
        self.metrics.kv_cache_slots.set(engine.capacity)
        self.metrics.kv_cache_free_slots.set(engine.capacity)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="nmtserve-decode", daemon=True)
        self._thread.start()
        self.state = "serving"
        return engine

    @property
    def accepting(self) -> bool:
        """Whether new work is taken (only between warm-up and drain)."""
        return self.state == "serving"

    def _warm_up(self) -> float:
        """Run every shape class once (1 and all rows, shortest and longest source) so no request pays first-run costs."""
        started = time.perf_counter()
        assert self._decoder is not None
        engine = self._decoder.engine
        for rows in sorted({1, engine.capacity}):
            for length in sorted({1, engine.max_source_length}):
                source = [engine.tokens.unk] * (length - 1) + [engine.tokens.eos]
                keys = [("warm-up", rows, length, i) for i in range(rows)]
                self._decoder.add(keys, [source] * rows, [DecodeOptions(min_length=2, max_length=2)] * rows)
                while self._decoder.active:
                    self._decoder.step()
        return time.perf_counter() - started

    def submit(
        self, sources: Sequence[list[int]], options: DecodeOptions, *, deadline: float | None = None, stream: bool = False
    ) -> list[Job]:
        """Queue the texts of one request, all or none; raises UnavailableError or QueueFullError."""
        if not self.accepting:
            raise UnavailableError(f"server is {self.state}")
        loop = asyncio.get_running_loop()
        jobs = [
            Job(list(source), options, loop.create_future(), deadline, asyncio.Queue() if stream else None)
            for source in sources
        ]
        with self._condition:
            if len(self._waiting) + len(jobs) > self.max_queue_size:
                raise QueueFullError(
                    f"queue full: {len(self._waiting)} of {self.max_queue_size} places taken, {len(jobs)} asked; retry later"
                )
            self._waiting.extend(jobs)
            self.metrics.queue_depth.set(len(self._waiting))
            self._condition.notify()
        return jobs

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Withdraw unfinished jobs (the client went away); their rows are freed at the next iteration."""
        unfinished = [job for job in jobs if not job.future.done()]
        if not unfinished:
            return
        with self._condition:
            for job in unfinished:
                if job in self._waiting:
                    self._waiting.remove(job)
                else:
                    self._leaving.append(job.key)  # in the batch, or about to be: the decode thread drops it
            self.metrics.queue_depth.set(len(self._waiting))
            self._condition.notify()
        for job in unfinished:
            job.finish(None)

    async def pieces(self, job: Job) -> AsyncIterator[list[int]]:
        """New token ids of a streamed job as they are decoded; ends when the job does.

        A reader that falls behind gets the steps it missed as one piece, so a busy server sends fewer, larger messages.
        """
        assert job.pieces is not None
        while (tokens := await job.pieces.get()) is not None:
            while not job.pieces.empty():
                more = job.pieces.get_nowait()
                if more is None:
                    yield tokens
                    return
                tokens = tokens + more
            yield tokens

    def drain(self) -> None:
        """Refuse new work; jobs already queued or running go on."""
        self.state = "draining"

    async def stop(self) -> None:
        """Stop the decode thread, fail whatever is left."""
        self.state = "stopped"
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        for job in [*self._waiting, *self._running.values()]:
            job.finish(UnavailableError("server stopped"))
        self._waiting.clear()
        self._running.clear()

    # The decode thread.

    def _run(self) -> None:
        decoder = self._decoder
        assert decoder is not None and self._loop is not None
        while True:
            with self._condition:
                while not (self._waiting or self._leaving or decoder.active or self._stopping):
                    self._condition.wait()
                if self._stopping:
                    return
                if self._waiting and not decoder.active:
                    self._gather(decoder.rows_free())
                leaving, self._leaving = self._leaving, []
            iteration = Iteration()
            for key in leaving:
                self._running.pop(key, None)
                decoder.remove(key)
            self._expire(iteration, decoder)
            try:
                self._iterate(iteration, decoder)
            except Exception as error:  # a model run failed: fail its batch, keep serving the queue
                log.exception("event=decode_failed active=%d", len(self._running))
                iteration.failed, iteration.error = list(self._running.values()), error
                for key in list(self._running):
                    decoder.remove(key)
                self._running.clear()
            iteration.active, iteration.rows_free = len(self._running), decoder.rows_free()
            iteration.waiting = len(self._waiting)
            try:
                self._loop.call_soon_threadsafe(self._deliver, iteration)
            except RuntimeError:  # the event loop has closed: nobody is left to answer
                return

    def _gather(self, rows_free: int) -> None:
        """The decoder is idle: wait up to max_queue_delay after the oldest arrival for more, to encode them together."""
        end = self._waiting[0].arrived + self.max_queue_delay
        while self._waiting and not self._stopping and sum(job.options.beam_size for job in self._waiting) < rows_free:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            self._condition.wait(remaining)

    def _expire(self, iteration: Iteration, decoder: Decoder) -> None:
        """Texts whose deadline has passed leave the queue now, and the batch at this iteration."""
        now = time.monotonic()
        for job in [job for job in self._running.values() if job.deadline is not None and job.deadline <= now]:
            del self._running[job.key]
            decoder.remove(job.key)
            iteration.late.append(job)
        with self._condition:
            late = [job for job in self._waiting if job.deadline is not None and job.deadline <= now]
            for job in late:
                self._waiting.remove(job)
        iteration.late += late

    def _iterate(self, iteration: Iteration, decoder: Decoder) -> None:
        """Admit waiting texts into the free rows, encode them in one run, one decoder step for all."""
        rows_free = decoder.rows_free()
        with self._condition:
            while self._waiting and self._waiting[0].options.beam_size <= rows_free:
                job = self._waiting.popleft()
                rows_free -= job.options.beam_size
                iteration.admitted.append(job)
        if iteration.admitted:
            started = time.perf_counter()
            for job in iteration.admitted:
                job.admitted = time.monotonic()
                self._running[job.key] = job
            decoder.add([job.key for job in iteration.admitted], [job.source for job in iteration.admitted],
                        [job.options for job in iteration.admitted])
            iteration.encode_seconds = time.perf_counter() - started
            for job in iteration.admitted:
                job.encode_seconds = iteration.encode_seconds
        if decoder.active:
            iteration.step_rows = sum(sentence.search.rows for sentence in decoder.active)
            started = time.perf_counter()
            finished = decoder.step()
            iteration.step_seconds = time.perf_counter() - started
            iteration.finished = [(self._running.pop(key), hypotheses) for key, hypotheses in finished]
            iteration.prefixes = [
                (self._running[s.key], list(s.search.prefixes[0])) for s in decoder.active if self._running[s.key].pieces is not None
            ]

    # Back on the event loop.

    def _deliver(self, iteration: Iteration) -> None:
        """Record the iteration, stream new tokens, hand finished texts their hypotheses."""
        now = time.monotonic()
        m = self.metrics
        for job in iteration.late:
            job.finish(DeadlineError("deadline exceeded before the translation finished"))
        for job in iteration.failed:
            assert iteration.error is not None
            job.finish(iteration.error)
        for job in iteration.admitted:
            assert job.admitted is not None
            m.queue_wait.observe(job.admitted - job.arrived)
            m.input_tokens.inc(len(job.source))
            if not iteration.failed:
                job.first_token = now
                m.time_to_first_token.observe(now - job.arrived)
        if iteration.admitted:
            m.encoder_batch_size.observe(len(iteration.admitted))
            m.encoder_duration.observe(iteration.encode_seconds)
        if iteration.step_rows:
            m.decode_step_batch_size.observe(iteration.step_rows)
            m.decode_step_duration.observe(iteration.step_seconds)
        for job, prefix in iteration.prefixes:
            if job.pieces is not None and not job.future.done() and len(prefix) > job.streamed:
                job.pieces.put_nowait(prefix[job.streamed :])
                job.streamed = len(prefix)
        for job, hypotheses in iteration.finished:
            if job.future.done():
                continue  # withdrawn while this iteration ran
            if job.pieces is not None and len(hypotheses[0].tokens) > job.streamed:
                job.pieces.put_nowait(hypotheses[0].tokens[job.streamed :])
            m.output_tokens.inc(sum(len(h.tokens) for h in hypotheses))
            job.finish(hypotheses)
        m.active_sequences.set(iteration.active)
        m.kv_cache_free_slots.set(iteration.rows_free)
        m.queue_depth.set(iteration.waiting)
