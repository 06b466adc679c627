"""The decode loop: a bounded queue in front of a Decoder, with iteration-level (continuous) batching.

One asyncio task drives the loop; every Engine and Decoder call runs in one
worker thread (ONNX Runtime releases the GIL), so the event loop keeps
answering RPCs while the model runs. Each iteration hands the worker one job:
drop the texts that left (cancelled, deadline passed), encode the texts
admitted from the queue in one encoder run, then run one decoder step for all
active texts together. Between two iterations the loop admits waiting texts,
oldest first, while their beams fit in the free KV-cache rows; a text that
finishes leaves at once and its rows serve the next admission. When the
decoder is idle the loop waits up to `max_queue_delay` for more arrivals, so
that a burst shares one encoder run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nmtserve.bundle import EOS_ID, UNK_ID

from .engine import Decoder, Engine
from .metrics import Metrics
from .search import DecodeOptions, Hypothesis

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    """What one worker job did."""

    finished: list[tuple[Any, list[Hypothesis]]]
    prefixes: dict[Any, list[int]]  # streamed texts: best prefix so far
    rows_free: int
    encoded: int = 0
    encode_seconds: float = 0.0
    step_rows: int = 0
    step_seconds: float = 0.0


class Scheduler:
    """Owns the engine (in its worker thread), the queue and the decode loop."""

    def __init__(self, metrics: Metrics, *, max_batch_size: int, max_queue_size: int, max_queue_delay: float):
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_queue_delay = max_queue_delay
        self.state = "starting"  # -> serving -> draining -> stopped
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmtserve-decode")
        self._decoder: Decoder | None = None
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._leaving: list[int] = []  # keys to drop from the decoder at the next iteration
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _in_worker(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def start(self, load: Callable[[], Engine]) -> Engine:
        """Load the engine in the worker thread, warm it up, then start the loop and accept work."""
        engine = await self._in_worker(load)
        self._decoder = Decoder(engine)
        seconds = await self._in_worker(self._warm_up)
        log.info("event=warmed_up seconds=%.3f", seconds)
        self.metrics.kv_cache_slots.set(engine.capacity)
        self.metrics.kv_cache_free_slots.set(engine.capacity)
        self._task = asyncio.create_task(self._loop(), name="nmtserve-decode-loop")
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
                source = [UNK_ID] * (length - 1) + [EOS_ID]
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
        if len(self._waiting) + len(sources) > self.max_queue_size:
            raise QueueFullError(
                f"queue full: {len(self._waiting)} of {self.max_queue_size} places taken, {len(sources)} asked; retry later"
            )
        loop = asyncio.get_running_loop()
        jobs = [
            Job(list(source), options, loop.create_future(), deadline, asyncio.Queue() if stream else None)
            for source in sources
        ]
        self._waiting.extend(jobs)
        self.metrics.queue_depth.set(len(self._waiting))
        self._wake.set()
        return jobs

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Withdraw unfinished jobs (the client went away); their rows are freed at the next iteration."""
        withdrawn = False
        for job in jobs:
            if job.key in self._running:
                del self._running[job.key]
                self._leaving.append(job.key)
            elif job in self._waiting:
                self._waiting.remove(job)
            else:
                continue
            job.finish(None)
            withdrawn = True
        if withdrawn:
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.set()

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
        """Stop the loop, fail whatever is left, and release the worker thread."""
        self.state = "stopped"
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in [*self._waiting, *self._running.values()]:
            job.finish(UnavailableError("server stopped"))
        self._waiting.clear()
        self._running.clear()
        await asyncio.to_thread(self._executor.shutdown)

    def _rows_free(self) -> int:
        return self.max_batch_size - sum(job.options.beam_size for job in self._running.values())

    async def _loop(self) -> None:
        while True:
            while not (self._waiting or self._running or self._leaving):
                self._wake.clear()
                await self._wake.wait()
            if self._waiting and not self._running:
                await self._gather()
            self._expire()
            admitted = self._admit()
            leaving, self._leaving = self._leaving, []
            streamed = {job.key for job in self._running.values() if job.pieces is not None}
            try:
                iteration = await self._in_worker(self._iterate, leaving, admitted, streamed)
            except Exception as error:  # a model run failed: fail its batch, keep serving the queue
                log.exception("event=decode_failed active=%d", len(self._running))
                self._fail_running(error)
                continue
            self._deliver(iteration, admitted)

    def _fail_running(self, error: Exception) -> None:
        """Fail every text in the batch and drop them from the decoder at the next iteration."""
        for key, job in self._running.items():
            self._leaving.append(key)
            job.finish(error)
        self._running.clear()

    async def _gather(self) -> None:
        """The decoder is idle: wait up to max_queue_delay after the oldest arrival for more, to encode them together."""
        end = self._waiting[0].arrived + self.max_queue_delay
        while sum(job.options.beam_size for job in self._waiting) < self._rows_free():
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _expire(self) -> None:
        """Texts whose deadline has passed leave the queue now, and the batch at this iteration."""
        now = time.monotonic()
        late = [job for job in [*self._waiting, *self._running.values()] if job.deadline is not None and job.deadline <= now]
        for job in late:
            if job.key in self._running:
                del self._running[job.key]
                self._leaving.append(job.key)
            else:
                self._waiting.remove(job)
            job.finish(DeadlineError("deadline exceeded before the translation finished"))

    def _admit(self) -> list[Job]:
        """Move waiting texts, oldest first, into the batch while their beams fit in the free rows."""
        admitted: list[Job] = []
        rows_free = self._rows_free()
        while self._waiting and self._waiting[0].options.beam_size <= rows_free:
            job = self._waiting.popleft()
            rows_free -= job.options.beam_size
            job.admitted = time.monotonic()
            self._running[job.key] = job
            admitted.append(job)
            self.metrics.queue_wait.observe(job.admitted - job.arrived)
            self.metrics.input_tokens.inc(len(job.source))
        self.metrics.queue_depth.set(len(self._waiting))
        return admitted

    def _iterate(self, leaving: list[int], admitted: list[Job], streamed: set[int]) -> Iteration:
        """The worker's job: drop leavers, encode the admitted texts in one run, one decoder step for all."""
        decoder = self._decoder
        assert decoder is not None
        for key in leaving:
            decoder.remove(key)
        iteration = Iteration([], {}, decoder.rows_free())
        if admitted:
            started = time.perf_counter()
            decoder.add([job.key for job in admitted], [job.source for job in admitted], [job.options for job in admitted])
            iteration.encoded, iteration.encode_seconds = len(admitted), time.perf_counter() - started
        if decoder.active:
            iteration.step_rows = sum(sentence.search.rows for sentence in decoder.active)
            started = time.perf_counter()
            iteration.finished = decoder.step()
            iteration.step_seconds = time.perf_counter() - started
            iteration.prefixes = {s.key: s.search.prefixes[0] for s in decoder.active if s.key in streamed}
        iteration.rows_free = decoder.rows_free()
        return iteration

    def _deliver(self, iteration: Iteration, admitted: list[Job]) -> None:
        """Record the iteration, stream new tokens, hand finished texts their hypotheses."""
        now = time.monotonic()
        m = self.metrics
        if iteration.encoded:
            m.encoder_batch_size.observe(iteration.encoded)
            m.encoder_duration.observe(iteration.encode_seconds)
        if iteration.step_rows:
            m.decode_step_batch_size.observe(iteration.step_rows)
            m.decode_step_duration.observe(iteration.step_seconds)
        for job in admitted:
            job.first_token = now
            m.time_to_first_token.observe(now - job.arrived)
        for key, prefix in iteration.prefixes.items():
            job = self._running.get(key)
            if job is not None and job.pieces is not None and len(prefix) > job.streamed:
                job.pieces.put_nowait(prefix[job.streamed :])
                job.streamed = len(prefix)
        for key, hypotheses in iteration.finished:
            job = self._running.pop(key, None)
            if job is None:
                continue  # withdrawn while this iteration ran
            if job.pieces is not None and len(hypotheses[0].tokens) > job.streamed:
                job.pieces.put_nowait(hypotheses[0].tokens[job.streamed :])
            m.output_tokens.inc(sum(len(h.tokens) for h in hypotheses))
            job.finish(hypotheses)
        m.active_sequences.set(len(self._running))
        m.kv_cache_free_slots.set(iteration.rows_free)
