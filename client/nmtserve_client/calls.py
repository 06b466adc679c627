"""What both clients share: settings from keywords, request messages from a call's data and options, and how a failed attempt ends."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

from nmtserve.v1 import translator_pb2 as pb

from .channel import ClientSettings
from .errors import (
    ClientClosedError, DeadlineExceededError, FieldViolation, InvalidInputError, NmtserveError, RequestCancelledError, is_too_large,
    texts_error,
)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# grpc.health.v1's HealthCheckRequest {string service = 1} and HealthCheckResponse {ServingStatus status = 1}
# have the wire format of these well-known wrappers, so the health check needs no grpcio-health-checking.
HealthCheckRequest = wrappers_pb2.StringValue
HealthCheckResponse = wrappers_pb2.Int32Value


class Deadline:
    """The time left of one SDK call that may make several RPCs."""

    def __init__(self, timeout: float | None):
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (None: no deadline); DeadlineExceededError once none are."""
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError(f"the call's {self.timeout:g} s deadline passed", code=grpc.StatusCode.DEADLINE_EXCEEDED)
        return left

    def allows(self, seconds: float) -> bool:
        """Whether the deadline leaves more than this many seconds."""
        return self._end is None or time.monotonic() + seconds < self._end


class Retries:
    """The SDK's own retries of one Translate or TranslateStream call that a full server refused (RESOURCE_EXHAUSTED).

    gRPC's retry policy matches status codes only, and would also retry gRPC's
    own RESOURCE_EXHAUSTED for a message above the size limit, which can never
    succeed; so the SDK retries that code itself, on gRPC's schedule: attempt
    n + 1 after random(0, min(initial_backoff * backoff_multiplier ** (n - 1), max_backoff)).
    Each attempt may itself be retried by gRPC on UNAVAILABLE: max_attempts bounds each code's retries, the deadline both.
    """

    def __init__(self, settings: ClientSettings, deadline: Deadline, offset: int = 0):
        self._settings = settings
        self._deadline = deadline
        self._offset = offset  # the call's request carries texts[offset:] of the caller's list
        self._stopped = False
        self.attempt = 1

    def after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt after error (counting it); raises the SDK exception where the call fails with it."""
        s = self._settings
        overloaded = error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not is_too_large(error)
        if overloaded and not self._stopped and self.attempt < s.max_attempts:
            delay = random.uniform(0, min(s.initial_backoff * s.backoff_multiplier ** (self.attempt - 1), s.max_backoff))
            if self._deadline.allows(delay):  # the server's "overloaded" says more than a deadline passed during back-off
                self.attempt += 1
                return delay
        raise texts_error(error, self._offset) from None

    def stop(self) -> None:
        """Make no more attempts: a stream is started again only while it has sent nothing and was not cancelled."""
        self._stopped = True


def task_cancelling() -> bool:
    """Whether the running asyncio task is itself being cancelled (not only a call it awaits)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Closing:
    """Whether a client was closed; once it was, the calls that closing ended say so, and none sleeps out a back-off."""

    def __init__(self) -> None:
        self._woken = threading.Event()  # by close(): a blocking call's back-off ends
        self._woken_async = asyncio.Event()  # the same for the asyncio client's (bound to its loop at the first wait)

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._woken.is_set()

    def close(self) -> None:
        """Mark the client closed and wake the calls that wait to retry."""
        self._woken.set()
        self._woken_async.set()

    def sleep(self, seconds: float) -> None:
        """Wait out a retry's back-off; ClientClosedError as soon as the client is closed."""
        if self._woken.wait(seconds):
            raise _closed_error()

    async def sleep_async(self, seconds: float) -> None:
        """sleep(), for the asyncio client."""
        try:
            await asyncio.wait_for(self._woken_async.wait(), seconds)
        except TimeoutError:
            return
        raise _closed_error()

    @contextmanager
    def calls(self) -> Iterator[None]:
        """Turn the failure closing the client causes inside into ClientClosedError."""
        try:
            yield
        except (Exception, asyncio.CancelledError) as error:
            if not (self.closed and _ended_by_close(error)):
                raise
            raise _closed_error() from None


def _closed_error() -> ClientClosedError:
    return ClientClosedError("the client was closed", code=grpc.StatusCode.CANCELLED)


def _ended_by_close(error: BaseException) -> bool:
    """Whether error is how gRPC ends a call when its channel closes, rather than a failure of the call's own.

    gRPC says it in the channel's words: CANCELLED ("Channel closed!", which the SDK maps to RequestCancelledError)
    or a cancelled future for a call in flight, a ValueError or UsageError for one begun after, and in the asyncio
    client a CancelledError, which TaskGroup and asyncio.timeout would take for the task's own cancellation.
    """
    if isinstance(error, asyncio.CancelledError):
        return not task_cancelling()
    if isinstance(error, grpc.RpcError):
        return error.code() == grpc.StatusCode.CANCELLED
    if isinstance(error, NmtserveError):  # the SDK's own mapping: only a cancellation is the channel's doing
        return isinstance(error, RequestCancelledError)
    return isinstance(error, (grpc.FutureCancelledError, ValueError, grpc.aio.UsageError))


class StreamCall:
    """What the streams of both clients share: the TranslateStream call, started again after a full server's refusal, and cancel()."""

    def __init__(self, start: Callable[[], grpc.Call | grpc.aio.UnaryStreamCall], retries: Retries, closing: Closing):
        self._start = start
        self._retries = retries
        self._closing = closing
        self._call = start()
        self._cancelled = False

    def _restart(self) -> None:
        self._call = self._start()
        if self._cancelled:  # cancel() came during the back-off, to the call before
            self._call.cancel()

    def cancel(self) -> None:
        """Stop the call (the server stops decoding); the read that waits for a piece, or any later one, raises RequestCancelledError."""
        self._cancelled = True
        self._retries.stop()
        self._call.cancel()

    def _after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before starting the stream again after error; raises the SDK exception where it ends the stream."""
        if self._cancelled and error.code() == grpc.StatusCode.CANCELLED:
            raise self.cancelled_error() from None  # in the SDK's words, not gRPC's "Locally cancelled by application!"
        return self._retries.after(error)

    @staticmethod
    def cancelled_error() -> RequestCancelledError:
        """What a read of a stream that cancel() ended raises, in both clients."""
        return RequestCancelledError("the stream was cancelled", code=grpc.StatusCode.CANCELLED)


def client_settings(server: str | None, settings: ClientSettings | None, changes: dict[str, Any]) -> ClientSettings:
    """The settings a client is made with: `settings` (or the defaults) with the server and keyword changes applied."""
    settings = replace(settings or ClientSettings(), **changes)
    if server is not None:
        settings = replace(settings, server=server)
    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return settings


def translate_options(**values: Any) -> pb.TranslateOptions:
    """TranslateOptions from a call's keyword options; a value the message cannot hold is an InvalidInputError."""
    options = pb.TranslateOptions()
    for name, value in values.items():
        if value is None:  # the server's default
            continue
        try:
            setattr(options, name, value)
        except (TypeError, ValueError) as error:
            field = f"options.{name}"
            raise InvalidInputError(f"{field}: {error}", [FieldViolation(field, str(error))]) from None
    return options


def text_list(texts: Sequence[str]) -> list[str]:
    """texts as a list; a single string is refused rather than translated character by character."""
    if isinstance(texts, str):
        raise TypeError("translate() takes a list of texts; for one text, pass [text] or use translate_stream(text)")
    return list(texts)


def chunks(texts: list[str], size: int) -> list[tuple[int, list[str]]]:
    """texts cut into consecutive requests of at most size texts, each with the place of its first text in texts."""
    return [(start, texts[start : start + size]) for start in range(0, len(texts), size)]
