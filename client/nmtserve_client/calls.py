"""What both clients share: settings from keywords, request messages from a call's data and options, and how a failed attempt ends."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

from nmtserve.v1 import REQUEST_ID_KEY, REQUEST_ID_PATTERN
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
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
            raise TypeError(f"timeout must be a number of seconds (or None for the client's), not {type(timeout).__name__} {timeout!r}")
        if timeout is not None and not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive, finite number of seconds (or None for the client's), not {timeout}")
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
    """The retries of one request: UNAVAILABLE (a server starting, draining or out of reach) and a full server's
    RESOURCE_EXHAUSTED, max_attempts in all, within the call's deadline.

    The SDK makes them rather than gRPC's retry policy, which matches status
    codes only: it would also retry gRPC's own RESOURCE_EXHAUSTED for a message
    above the size limit, which can never succeed, and it waits out back-offs
    the deadline cuts short, ending in DEADLINE_EXCEEDED where the server's
    own answer says more. Attempt n + 1 follows gRPC's schedule: after
    random(0, min(initial_backoff * backoff_multiplier ** (n - 1), max_backoff)).
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
        code = error.code()
        retryable = code == grpc.StatusCode.UNAVAILABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and not is_too_large(error))
        if retryable and not self._stopped and self.attempt < s.max_attempts:
            delay = random.uniform(0, min(s.initial_backoff * s.backoff_multiplier ** (self.attempt - 1), s.max_backoff))
            if self._deadline.allows(delay):  # the server's own answer says more than a deadline passed during back-off
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
        self._closed = threading.Event()
        # The events of the calls waiting out a back-off: close() sets them all, as a stream's cancel() sets its own.
        self._sleepers: set[threading.Event | asyncio.Event] = set()

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed.is_set()

    def check(self) -> None:
        """ClientClosedError where the client was closed: for a call that would make no RPC to find it out by."""
        if self.closed:
            raise _closed_error()

    def close(self) -> None:
        """Mark the client closed and wake the calls that wait to retry."""
        self._closed.set()
        for sleeper in list(self._sleepers):
            sleeper.set()

    def sleep(self, seconds: float, wake: threading.Event | None = None) -> None:
        """Wait out a retry's back-off, or until `wake` is set; ClientClosedError as soon as the client is closed."""
        wake = wake or threading.Event()
        self._sleepers.add(wake)
        try:
            if not self.closed:
                wake.wait(seconds)
        finally:
            self._sleepers.discard(wake)
        if self.closed:
            raise _closed_error()

    async def sleep_async(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """sleep(), for the asyncio client."""
        wake = wake or asyncio.Event()
        self._sleepers.add(wake)
        try:
            if not self.closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), seconds)
        finally:
            self._sleepers.discard(wake)
        if self.closed:
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
    """What the streams of both clients share: the TranslateStream call, started again while the server refuses it
    before its first piece (Retries), and cancel(), which also ends a back-off."""

    def __init__(self, start: Callable[[], grpc.Call | grpc.aio.UnaryStreamCall], retries: Retries, closing: Closing,
                 wake: threading.Event | asyncio.Event, request_id: str | None):
        self._start = start
        self._retries = retries
        self._closing = closing
        self._wake = wake  # set by cancel(): a back-off in progress ends at once
        self._request_id = request_id  # what the stream was sent with, for its errors
        self._call = start()
        self._cancelled = False

    def _restart(self) -> None:
        """Start the call again after a back-off; a stream cancelled during it ends instead."""
        if self._cancelled:
            raise self.cancelled_error()
        self._call = self._start()
        if self._cancelled:  # cancel() came from another thread while the call started
            self._call.cancel()

    def cancel(self) -> None:
        """Stop the call (the server stops decoding); the read that waits for a piece, or any later one, raises RequestCancelledError."""
        self._cancelled = True
        self._retries.stop()
        self._call.cancel()
        self._wake.set()

    def _after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before starting the stream again after error; raises the SDK exception where it ends the stream."""
        try:
            return self._retries.after(error)
        except NmtserveError:
            self._retries.stop()  # the stream has failed for good: a read after this raises the same error again
            # Whatever answer was already on its way (gRPC's "Locally cancelled by application!", a refusal that
            # crossed the cancel): the caller asked for the stream to end, and a read after cancel() says so.
            if self._cancelled:
                raise self.cancelled_error() from None
            raise

    @staticmethod
    def cancelled_error() -> RequestCancelledError:
        """What a read of a stream that cancel() ended raises, in both clients."""
        return RequestCancelledError("the stream was cancelled", code=grpc.StatusCode.CANCELLED)


def request_metadata(request_id: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that sends request_id (None: none; the server makes an id); InvalidInputError for an id the
    server would log under one of its own instead, TypeError where it is not a str."""
    if request_id is None:
        return None
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, not {type(request_id).__name__}")
    if not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise invalid_input("request_id", f"{request_id!r} is not 1 to 64 ASCII letters, digits, '.', '_', ':' or '-'")
    return ((REQUEST_ID_KEY, request_id),)


@contextmanager
def sent_with(request_id: str | None) -> Iterator[None]:
    """Give an SDK error raised inside the request id the call was sent with, where no answer of the server named one
    (the call's own deadline, a server out of reach, a closed client)."""
    try:
        yield
    except NmtserveError as error:
        if error.request_id is None:
            error.request_id = request_id
        raise


def client_settings(server: str | None, settings: ClientSettings | None, changes: dict[str, Any]) -> ClientSettings:
    """The settings a client is made with: `settings` (or the defaults) with the server and keyword changes applied."""
    settings = replace(settings or ClientSettings(), **changes)
    if server is not None:
        settings = replace(settings, server=server)
    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return settings


# Options whose 0 the API reads as unset, that is 1: refused as the CLI refuses them, since a call asks for the default
# with None and 0 is a mistake.
AT_LEAST_ONE = ("beam_size", "num_hypotheses")


def translate_options(**values: Any) -> pb.TranslateOptions:
    """TranslateOptions from a call's keyword options; a value the message cannot hold is an InvalidInputError."""
    options = pb.TranslateOptions()
    for name, value in values.items():
        if value is None:  # the server's default
            continue
        field = f"options.{name}"
        if name in AT_LEAST_ONE and isinstance(value, int) and value < 1:
            raise invalid_input(field, f"must be at least 1, not {value}")
        try:
            setattr(options, name, value)
        except (TypeError, ValueError) as error:
            raise invalid_input(field, str(error)) from None
    return options


def invalid_input(field: str, description: str) -> InvalidInputError:
    """The error of an argument refused before anything was sent."""
    return InvalidInputError(f"{field}: {description}", [FieldViolation(field, description)])


def text_list(texts: Sequence[str]) -> list[str]:
    """texts as a list; a single string is refused rather than translated character by character, and a text that is
    not Unicode text (InvalidInputError) before anything is sent."""
    if isinstance(texts, (str, bytes, bytearray)):
        raise TypeError("translate() takes a list of texts; for one text, pass [text] or use translate_stream(text)")
    texts = list(texts)
    for index, text in enumerate(texts):
        check_text(text, f"texts[{index}]")
    return texts


def check_text(text: str, field: str) -> None:
    """InvalidInputError where text cannot be sent as UTF-8: a lone surrogate, as Python decodes bytes that are not UTF-8
    with errors="surrogateescape" (file names, stdin under a C locale); TypeError where it is not a str at all."""
    if not isinstance(text, str):
        raise TypeError(f"{field} must be a str, not {type(text).__name__} (decode bytes first, e.g. data.decode('utf-8'))")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        description = f"not valid Unicode text: {error.reason} at character {error.start} (was the input UTF-8?)"
        raise invalid_input(field, description) from None


def chunks(texts: list[str], size: int) -> list[tuple[int, list[str]]]:
    """texts cut into consecutive requests of at most size texts, each with the place of its first text in texts."""
    return [(start, texts[start : start + size]) for start in range(0, len(texts), size)]
