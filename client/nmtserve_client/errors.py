"""What can go wrong in a call, as exceptions: one class per gRPC status a caller handles differently.

    NmtserveError                 any failed call (.code, .message, .request_id)
    ├── InvalidInputError         INVALID_ARGUMENT: fix the request (.field, .violations); also a ValueError
    │   └── MessageTooLargeError  RESOURCE_EXHAUSTED from gRPC itself: a request above the server's size limit; never retried
    ├── OverloadedError           RESOURCE_EXHAUSTED: the server's queue is full; retry later
    ├── UnavailableError          UNAVAILABLE: unreachable, starting or shutting down
    ├── DeadlineExceededError     DEADLINE_EXCEEDED: the call's timeout passed; also a TimeoutError
    ├── RequestCancelledError     CANCELLED: the call was cancelled before it finished
    │   └── ClientClosedError     the client was closed while the call was in flight, or before it began
    └── ServerError               any other status (INTERNAL, UNIMPLEMENTED, ...)

The server names every bad field in a google.rpc.BadRequest detail. Where the
googleapis-common-protos package is installed (it comes with grpcio-status), the
violations are read from that detail; otherwise from the status message, which
lists the same violations as "field: description; field: description".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from nmtserve.v1 import REQUEST_ID_KEY

try:
    from google.rpc import error_details_pb2, status_pb2
except ImportError:  # the client extra is grpcio and protobuf only
    error_details_pb2 = status_pb2 = None

STATUS_DETAILS_KEY = "grpc-status-details-bin"
_TEXT_FIELD = re.compile(r"^texts\[(\d+)\]")
_VIOLATION_START = re.compile(r"(?:^|; )(?=[\w.\[\]]+: )")  # where one "field: description" begins
# gRPC's own RESOURCE_EXHAUSTED for a message above a limit: "Received (or Sent) message larger than max (N vs. M)".
_TOO_LARGE = re.compile(r"message larger than max \(")


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request."""

    field: str  # e.g. "texts[3]" or "options.beam_size"
    description: str  # what is wrong with it


class NmtserveError(Exception):
    """A call that failed; the subclass says why."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, request_id: str | None = None):
        super().__init__(message)
        self.message = message  # the server's (or gRPC's) explanation
        self.code = code  # the gRPC status code, where the failure came from gRPC
        self.request_id = request_id  # the id the call was sent with (request_id=), else the one the server logged it under


class InvalidInputError(NmtserveError, ValueError):
    """The server refused the request's content (INVALID_ARGUMENT); `.violations` names each bad field."""

    def __init__(self, message: str, violations: list[FieldViolation], **kwargs):
        super().__init__(message, **kwargs)
        self.violations = violations

    def shifted(self, offset: int) -> InvalidInputError:
        """The same error for a request that was texts[offset:] of the caller's list: texts[i] becomes texts[offset + i]."""
        if offset == 0:
            return self
        return self.renamed(lambda field: _TEXT_FIELD.sub(lambda m: f"texts[{offset + int(m[1])}]", field))

    def renamed(self, rename: Callable[[str], str]) -> InvalidInputError:
        """The same error with each violation's field renamed, e.g. after the place of the text in the caller's input."""
        violations = [FieldViolation(rename(v.field), v.description) for v in self.violations]
        message = "; ".join(f"{v.field}: {v.description}" for v in violations) or self.message
        return type(self)(message, violations, code=self.code, request_id=self.request_id)

    @property
    def field(self) -> str | None:
        """The first bad field, e.g. "texts[0]"."""
        return self.violations[0].field if self.violations else None


class MessageTooLargeError(InvalidInputError):
    """A request was larger than the server accepts (RESOURCE_EXHAUSTED from gRPC itself): send fewer or shorter texts.

    An answer that would be too large is refused by the server before it is sent, as an InvalidInputError naming the
    option that made it so; the client accepts answers of any size.
    """


class OverloadedError(NmtserveError):
    """The server's queue is full (RESOURCE_EXHAUSTED) and stayed full through the retries: try again later."""


class UnavailableError(NmtserveError):
    """The server cannot be reached, is starting, or is shutting down (UNAVAILABLE), through the retries."""


class DeadlineExceededError(NmtserveError, TimeoutError):
    """The call's deadline passed before it finished (DEADLINE_EXCEEDED)."""


class RequestCancelledError(NmtserveError):
    """The call was cancelled before it finished (CANCELLED)."""


class ClientClosedError(RequestCancelledError):
    """The client was closed while the call was in flight or waiting to retry, or before it began."""


class ServerError(NmtserveError):
    """Any other failure: a bug or misconfiguration on the server (INTERNAL, UNIMPLEMENTED, ...)."""


_CLASSES: dict[grpc.StatusCode, type[NmtserveError]] = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}


def _violations(message: str, metadata: dict[str, str | bytes]) -> list[FieldViolation]:
    """The bad fields: from the BadRequest detail where it can be decoded, else from the message."""
    details = metadata.get(STATUS_DETAILS_KEY)
    if status_pb2 is not None and isinstance(details, bytes):
        found = []
        for detail in status_pb2.Status.FromString(details).details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                found += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
        if found:
            return found
    parts = [part for part in _VIOLATION_START.split(message) if part]
    return [FieldViolation(*part.split(": ", 1)) for part in parts if ": " in part]


def text_index(field: str) -> int | None:
    """i, for a violation of the request's texts[i]; None for any other field."""
    found = _TEXT_FIELD.match(field)
    return int(found[1]) if found else None


def is_too_large(error: grpc.RpcError) -> bool:
    """Whether error is gRPC refusing a message above its size limit, which no retry can get through."""
    return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and bool(_TOO_LARGE.search(error.details() or ""))


def from_rpc_error(error: grpc.RpcError) -> NmtserveError:
    """The SDK exception for a failed gRPC call (sync or asyncio)."""
    code = error.code()
    message = error.details() or (code.name if code else "unknown error")
    metadata = dict(error.trailing_metadata() or ())
    request_id = metadata.get(REQUEST_ID_KEY)
    kwargs = dict(code=code, request_id=request_id if isinstance(request_id, str) else None)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInputError(message, _violations(message, metadata), **kwargs)
    if is_too_large(error):
        advice = "the request is larger than the server accepts (its --max-message-bytes): send fewer or shorter texts"
        return MessageTooLargeError(f"{advice} ({message})", [], **kwargs)
    return _CLASSES.get(code, ServerError)(message, **kwargs)


def texts_error(error: grpc.RpcError, offset: int) -> NmtserveError:
    """The SDK exception for a failed request that carried texts[offset:] of the caller's list."""
    found = from_rpc_error(error)
    return found.shifted(offset) if isinstance(found, InvalidInputError) else found
