"""The server's side of the decode loop: admission of texts, handed to the loop's process, and the results back.

The decode loop (`decode_loop.py`) runs in a process of its own, owns the
engine and does the batching; this side owns every future, stream and metric,
on the event loop. A request's texts are admitted here (at most
`max_queue_size` of them waiting for rows, reckoned from what the loop last
reported) and sent to the loop at once; the loop starts them and admits them between decoder
steps as rows come free, and reports what each iteration did, which the event
loop reads off the pipe as they come.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from . import decode_loop
from .config import STALL_WARM_UPS
from .decode_loop import EngineSpec, LoadFailed, Ready, Report, Text
from .metrics import Metrics
from .pipes import MessageReader, MessageWriter
from .search import DecodeOptions, Hypothesis

log = logging.getLogger(__name__)

_keys = itertools.count()

STOP_TIMEOUT = 30.0  # seconds the decode process gets to stop before it is killed
FORCED_STOP_TIMEOUT = 1.0  # the same after a second signal


class EngineFailed(RuntimeError):
    """The decode process could not load the engine, or a model run failed for a text (the process serves on)."""


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


def _exit_status(exitcode: int | None) -> str:
    """A process's exit as log fields: its code, or the signal that ended it."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal={signal.Signals(-exitcode).name}"
        except ValueError:  # a real-time signal has no name
            return f"signal={-exitcode}"
    return f"exitcode={exitcode}"


class Scheduler:
    """Starts the decode process, queues texts for it, and hands its reports out on the event loop."""

    def __init__(self, metrics: Metrics, *, max_queue_size: int, max_queue_delay: float, stall_seconds: float = 0.0):
        self.metrics = metrics
        self.max_queue_size = max_queue_size
        self.max_queue_delay = max_queue_delay
        self.stall_seconds = stall_seconds  # 0: never take the decode process for hung
        self.state = "starting"  # -> serving -> draining -> stopped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._to_loop: Connection | None = None
        self._writer: MessageWriter | None = None  # on _to_loop, once the loop reads it
        self._from_loop: Connection | None = None
        self._reports: MessageReader | None = None  # on _from_loop
        self._loaded: asyncio.Future[Ready | LoadFailed | None] | None = None  # the first message (None: none came)
        self._jobs: dict[int, Job] = {}  # every text sent to the loop and not yet ended
        self._unadmitted: dict[int, Job] = {}  # of those, the ones the loop has not reported admitted, in arrival order
        self._rows_held = 0  # KV-cache rows of the admitted ones (a beam of k holds k)
        self._capacity = 0  # KV-cache rows the decode process holds, once it is ready
        self.lost = asyncio.Event()  # set if the decode process ends while serving
        self._heard = time.monotonic()  # when the decode process last reported, or last had nothing to report
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self, spec: EngineSpec, *, log_level: str) -> Ready:
        """Start the decode process and wait until it has loaded and warmed up the engine; raises EngineFailed."""
        context = multiprocessing.get_context("spawn")  # no fork: gRPC's threads must not be copied into the child
        loop_inbox, self._to_loop = context.Pipe(duplex=False)
        self._from_loop, loop_outbox = context.Pipe(duplex=False)
        self._process = context.Process(
            target=decode_loop.run, name="nmtserve-decode", daemon=True,
            args=(spec, loop_inbox, loop_outbox, self.max_queue_delay, log_level),
        )
        self._process.start()
        loop_inbox.close()  # the child holds these ends now; closing ours lets either side see the other end
        loop_outbox.close()
        self._loop = asyncio.get_running_loop()
        self._loaded = self._loop.create_future()
        self._reports = MessageReader(self._from_loop)
        self._loop.add_reader(self._from_loop.fileno(), self._read_reports)
        ready = await self._loaded
        if ready is None:
            await asyncio.to_thread(self._process.join, STOP_TIMEOUT)
            status = _exit_status(self._process.exitcode)
            if self.state == "stopped":  # stop() ended it
                ready = LoadFailed(f"the server stopped while the decode process was loading ({status})")
            elif self._process.exitcode == -signal.SIGKILL:
                ready = LoadFailed(f"the decode process was killed while loading ({status}), most often for want of "
                                   "memory: a smaller --max-batch-size needs less")
            else:
                ready = LoadFailed(f"the decode process ended while loading ({status})")
        if isinstance(ready, LoadFailed):
            await asyncio.to_thread(self._process.join, STOP_TIMEOUT)
            raise EngineFailed(ready.reason)
        if self.stall_seconds:  # the warm-up ran the longest model runs once: a healthy one may take that long again
            self.stall_seconds = max(self.stall_seconds, STALL_WARM_UPS * ready.warm_up_seconds, 2 * self.max_queue_delay)
        log.info("event=warmed_up seconds=%.3f decode_pid=%d decode_stall_seconds=%g", ready.warm_up_seconds,
                 self._process.pid, self.stall_seconds)
        self._capacity = ready.capacity
        self.metrics.kv_cache_slots.set(ready.capacity)
        self.metrics.kv_cache_free_slots.set(ready.capacity)
        self._writer = MessageWriter(self._to_loop, self._loop)
        self.state = "serving"
        if self.stall_seconds:
            self._watchdog = asyncio.create_task(self._watch_for_stalls())
        return ready

    @property
    def decode_pid(self) -> int | None:
        """The decode process's id, once started."""
        return self._process.pid if self._process is not None else None

    @property
    def pending_bytes(self) -> int:
        """Bytes of messages for the decode loop waiting for room in the pipe."""
        return self._writer.pending_bytes if self._writer is not None else 0

    @property
    def accepting(self) -> bool:
        """Whether new work is taken (only between warm-up and drain)."""
        return self.state == "serving"

    def submit(
        self, sources: Sequence[list[int]], options: DecodeOptions, *, deadline: float | None = None, stream: bool = False
    ) -> list[Job]:
        """Queue the texts of one request, all or none; raises UnavailableError or QueueFullError. A draining scheduler
        still takes the texts of calls that arrived before the drain (they may come once tokenized, in a thread):
        new calls are refused before they get here (`accepting`)."""
        if self.state not in ("serving", "draining"):
            raise UnavailableError(f"server is {self.state}")
        if (after := self._waiting(len(sources), options.beam_size)) > self.max_queue_size:
            waiting = self._waiting()
            raise QueueFullError(
                f"queue full: {waiting} of {self.max_queue_size} places taken, {after - waiting} needed; retry later"
            )
        loop = asyncio.get_running_loop()
        if not self._jobs:  # the decode process had nothing to report until now
            self._heard = time.monotonic()
        jobs = [
            Job(list(source), options, loop.create_future(), asyncio.Queue() if stream else None)
            for source in sources
        ]
        self._send("submit", [Text(job.key, job.source, options, deadline, job.arrived, stream) for job in jobs])
        for job in jobs:
            self._jobs[job.key] = self._unadmitted[job.key] = job
        self.metrics.queue_depth.set(after)
        return jobs

    def _waiting(self, arriving: int = 0, beam_size: int = 1) -> int:
        """How many unadmitted texts, and then `arriving` texts of this beam width, must wait for rows: the loop admits
        in arrival order into the rows the admitted texts leave free, as far as the server has heard."""
        free = self._capacity - self._rows_held
        for taken, job in enumerate(self._unadmitted.values()):
            if job.options.beam_size > free:  # in order: once one waits, all behind it wait
                return len(self._unadmitted) - taken + arriving
            free -= job.options.beam_size
        return max(0, arriving - free // beam_size)

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Withdraw unfinished jobs (the client went away); the loop frees their rows at its next iteration."""
        # Not `job.future.done()`: cancelling a handler's task also cancels the future it awaits, job unfinished.
        unfinished = [job for job in jobs if job.key in self._jobs]
        if not unfinished:
            return
        for job in unfinished:
            self._forget(job)
            job.finish(None)
        try:
            self._send("cancel", [job.key for job in unfinished])
        except UnavailableError:
            pass  # the decode process is gone, and the rows with it
        self.metrics.queue_depth.set(self._waiting())

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
        """Refuse new work; jobs already queued or running go on (a scheduler still starting stays so: stop() ends it)."""
        if self.state == "serving":
            self.state = "draining"

    def cut(self, reason: str) -> None:
        """End every text still waiting or decoding with UnavailableError(reason): the server stops without them."""
        self._fail_all(UnavailableError(reason))

    async def stop(self, force: asyncio.Event | None = None) -> bool:
        """Stop the decode process and fail whatever is left; whether the process, once serving, had to be killed (it did
        not stop within STOP_TIMEOUT, or `force` was set first)."""
        self.state = "stopped"
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._loaded is not None and not self._loaded.done():  # start() waiting: it reports the process's end
            self._loaded.set_result(None)
        killed = False
        if self._process is not None and self._process.is_alive():
            if self._writer is not None:  # the loop reads its messages: ask it to stop
                try:
                    self._send("stop", None)
                except UnavailableError:
                    pass
                joined = asyncio.ensure_future(asyncio.to_thread(self._process.join, STOP_TIMEOUT))
                forced = asyncio.ensure_future(force.wait()) if force is not None else joined
                await asyncio.wait({joined, forced}, return_when=asyncio.FIRST_COMPLETED)
                forced.cancel()
                if not joined.done():  # a second signal: a loop that stops at all does so between two steps
                    await asyncio.wait({joined}, timeout=FORCED_STOP_TIMEOUT)
                killed = self._process.is_alive()
            if killed:
                log.warning("event=decode_process_killed reason=%s",
                            "a_second_signal" if force is not None and force.is_set() else f"not_stopped_within_{STOP_TIMEOUT:g}s")
            if self._process.is_alive():  # still loading, or stuck: nothing it holds needs saving
                self._process.kill()
            await asyncio.to_thread(self._process.join)
        if self.lost.is_set() and self._process is not None:
            log.error("event=decode_process_exited %s", _exit_status(self._process.exitcode))
        if self._loop is not None and self._from_loop is not None:
            self._loop.remove_reader(self._from_loop.fileno())
        if self._writer is not None:
            self._writer.close()
            self._writer = None  # its file descriptor's number may be reused
        for connection in (self._to_loop, self._from_loop):
            if connection is not None:
                connection.close()
        self._fail_all(UnavailableError("server stopped"))
        return killed

    def _send(self, kind: str, payload: object) -> None:
        """Send a message to the decode loop without blocking the event loop (see pipes.py)."""
        if self._writer is None:
            raise UnavailableError("the decode process is not running")
        try:
            self._writer.send((kind, payload))
        except OSError as error:
            raise UnavailableError("the decode process has stopped") from error

    def _forget(self, job: Job) -> None:
        """The job has ended here: stop counting it."""
        if self._jobs.pop(job.key, None) is None:
            return
        if job.admitted is None:
            del self._unadmitted[job.key]
        else:
            self._rows_held -= job.options.beam_size

    def _fail_all(self, error: Exception) -> None:
        """End every job with `error`: the decode process has stopped or is gone, and its batch with it."""
        for job in list(self._jobs.values()):
            self._forget(job)
            job.finish(error)
        self.metrics.queue_depth.set(self._waiting())
        self.metrics.active_sequences.set(0)
        self.metrics.kv_cache_free_slots.set(self._capacity)  # no text holds a row any more

    # The decode process's reports, read on the event loop.

    def _read_reports(self) -> None:
        """The pipe from the decode process is readable: deliver every report that has arrived whole (the first message
        is Ready or LoadFailed)."""
        assert self._from_loop is not None and self._loop is not None
        assert self._reports is not None and self._loaded is not None
        self._heard = time.monotonic()
        try:
            messages = self._reports.take()
        except (EOFError, OSError):  # the decode process has ended
            self._loop.remove_reader(self._from_loop.fileno())
            if not self._loaded.done():  # while loading: start() reports it
                self._loaded.set_result(None)
            else:
                self._lost()
            return
        for message in messages:
            if isinstance(message, Report):
                self._deliver(message)
            elif not self._loaded.done():
                self._loaded.set_result(message)

    async def _watch_for_stalls(self) -> None:
        """Kill a decode process that has texts to work on and reports nothing for stall_seconds: hung (a stuck model
        run, a wedged GPU), it would otherwise hold every call, and health would say SERVING. Its end is then _lost's."""
        while self.state in ("serving", "draining"):
            await asyncio.sleep(min(1.0, self.stall_seconds / 4))
            silent = time.monotonic() - self._heard
            if self._jobs and silent > self.stall_seconds and self._process is not None and self._process.is_alive():
                log.error("event=decode_process_stalled seconds=%.1f texts=%d", silent, len(self._jobs))
                self._process.kill()
                return

    def _lost(self) -> None:
        """The decode process ended: expected after stop(), reported by start() while loading, a failure otherwise (its
        exit status is logged once stop() has reaped it: the pipe closes before the process has exited)."""
        if self.state not in ("stopped", "starting"):
            log.error("event=decode_process_lost texts=%d", len(self._jobs))
            self.state = "stopped"
            self._fail_all(UnavailableError("the decode process ended unexpectedly; see the server log"))
            self.lost.set()

    def _deliver(self, report: Report) -> None:
        """Record the iteration, stream new tokens, hand finished texts their hypotheses."""
        now = time.monotonic()
        m = self.metrics
        jobs = self._jobs  # texts no longer here were withdrawn while the iteration ran
        for key in report.late:
            if (job := jobs.get(key)) is not None:
                self._forget(job)
                job.finish(DeadlineError("deadline exceeded before the translation finished"))
        for key, error in report.failed:
            if (job := jobs.get(key)) is not None:
                self._forget(job)
                job.finish(EngineFailed(error))
        for key, encode_seconds in report.started:
            if (job := jobs.get(key)) is None:
                continue
            job.first_token, job.encode_seconds = now, encode_seconds
            m.time_to_first_token.observe(now - job.arrived)
            m.input_tokens.inc(len(job.source))
        for key, admitted in report.admitted:
            if (job := jobs.get(key)) is None:
                continue
            job.admitted = admitted
            del self._unadmitted[key]
            self._rows_held += job.options.beam_size
            m.queue_wait.observe(admitted - job.arrived)
        for texts, seconds in report.encoder_runs:
            m.encoder_batch_size.observe(texts)
            m.encoder_duration.observe(seconds)
        for seconds in report.first_steps:
            m.first_step_duration.observe(seconds)
        for rows, seconds in report.steps:
            m.decode_step_batch_size.observe(rows)
            m.decode_step_duration.observe(seconds)
        for key, position, token in report.streamed:
            job = jobs.get(key)
            if job is not None and job.pieces is not None and position == job.streamed:
                job.pieces.put_nowait([token])
                job.streamed += 1
        for key, hypotheses in report.finished:
            if (job := jobs.get(key)) is None:
                continue
            self._forget(job)
            if job.pieces is not None and len(hypotheses[0].tokens) > job.streamed:
                job.pieces.put_nowait(hypotheses[0].tokens[job.streamed :])
            m.output_tokens.inc(sum(len(h.tokens) for h in hypotheses))
            job.finish(hypotheses)
        if report.active is not None:  # else the intake's report: the batch's gauges stay as the loop last told
            m.active_sequences.set(report.active)
            m.kv_cache_free_slots.set(report.rows_free)
        m.queue_depth.set(self._waiting())
