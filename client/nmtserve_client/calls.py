"""What both clients send: settings from keywords, request messages from a call's data and options."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from google.protobuf import wrappers_pb2

from nmtserve.v1 import translator_pb2 as pb

from .channel import ClientSettings
from .errors import FieldViolation, InvalidInputError

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# grpc.health.v1's HealthCheckRequest {string service = 1} and HealthCheckResponse {ServingStatus status = 1}
# have the wire format of these well-known wrappers, so the health check needs no grpcio-health-checking.
HealthCheckRequest = wrappers_pb2.StringValue
HealthCheckResponse = wrappers_pb2.Int32Value


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


def chunks(texts: list[str], size: int) -> list[list[str]]:
    """texts cut into consecutive requests of at most size texts."""
    return [texts[start : start + size] for start in range(0, len(texts), size)]
