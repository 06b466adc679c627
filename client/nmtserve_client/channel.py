"""How the SDK connects: one settings dataclass, and the gRPC channel options and credentials made from it.

Load balancing is gRPC's own, set through the channel's service config
(https://github.com/grpc/grpc/blob/master/doc/service_config.md): round robin
spreads calls over every address the target resolves to (e.g. the pods behind
a headless Kubernetes Service). Calls are retried by the SDK (calls.Retries),
not by a gRPC retry policy, when a server is unavailable or full: max_attempts
in all, waiting random(0, min(initial_backoff * backoff_multiplier ** (n - 1),
max_backoff)) before attempt n + 1, within the call's deadline.
"""

from __future__ import annotations

import json
import math
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from nmtserve.pem import certificate_problems, chain_problems
from nmtserve.v1 import translator_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Translator"].full_name
DEFAULT_SERVER = "localhost:50051"
MAX_ATTEMPTS_LIMIT = 5  # as gRPC caps its retry policies: more attempts only add load to a fleet that is refusing calls
# The server's grpc.http2.min_ping_interval_without_data_ms: it answers faster pings during a long call with GOAWAY
# "too_many_pings", which ends the call, and gRPC sends it again from the start.
MIN_KEEPALIVE_TIME = 10.0


@dataclass(frozen=True)
class ClientSettings:
    """Where the server is and how to reach it; every field is also a keyword of Client and AsyncClient."""

    server: str = field(default=DEFAULT_SERVER, metadata={
        "help": "gRPC target: host:port, dns:///name:port (every address, round robin) or ipv4:a:p,b:q"})
    timeout: float | None = field(default=60.0, metadata={
        "help": "deadline of each call in seconds, retries included (unset, None in Python: no deadline)"})
    tls: bool = field(default=False, metadata={"help": "connect with TLS, trusting the system's root certificates"})
    tls_ca: Path | None = field(default=None, metadata={
        "help": "PEM root certificates to trust instead of the system's (implies TLS)"})
    client_cert: Path | None = field(default=None, metadata={
        "help": "PEM client certificate chain for mutual TLS (with --client-key; implies TLS)"})
    client_key: Path | None = field(default=None, metadata={"help": "PEM private key of --client-cert"})
    tls_server_name: str | None = field(default=None, metadata={
        "help": "name the server's certificate must carry, when it differs from the target's host"})
    max_attempts: int = field(default=5, metadata={
        "help": f"attempts per call when the server answers UNAVAILABLE or RESOURCE_EXHAUSTED (1: no retries; at most {MAX_ATTEMPTS_LIMIT})"})
    initial_backoff: float = field(default=0.5, metadata={"help": "seconds: the first retry waits up to this long"})
    max_backoff: float = field(default=5.0, metadata={"help": "seconds: no retry or reconnection waits longer than this"})
    backoff_multiplier: float = field(default=2.0, metadata={"help": "each retry may wait this many times longer than the one before"})
    keepalive_time: float = field(default=30.0, metadata={
        "help": f"seconds between keep-alive pings while calls are active, to notice a dead connection (0: off; at least {MIN_KEEPALIVE_TIME:g}, the server's limit)"})
    keepalive_timeout: float = field(default=10.0, metadata={"help": "seconds to wait for a ping's answer before the connection counts as dead"})
    texts_per_request: int = field(default=32, metadata={
        "help": "translate() sends a longer list as requests of this many texts (at most the server's max_texts_per_request)"})
    max_concurrent_requests: int = field(default=4, metadata={"help": "requests translate() keeps in flight at once"})

    def problems(self, called: Callable[[str], str] = str) -> list[str]:
        """What is wrong with the settings, one sentence per problem (empty when they are usable), each setting named
        as called(field) names it: the keyword as it is, or the command line's flag."""
        found = _type_problems(self, called)
        if found:
            return found  # the checks below compare values, which needs them of the right types
        for field_name in ("initial_backoff", "max_backoff", "backoff_multiplier", "keepalive_time", "keepalive_timeout"):
            if not math.isfinite(getattr(self, field_name)):
                found.append(f"{called(field_name)} must be a finite number, not {getattr(self, field_name)}")
        if found:
            return found  # and the comparisons below, finite numbers
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            found.append(f"{called('max_attempts')} must be between 1 and {MAX_ATTEMPTS_LIMIT}, not {self.max_attempts}")
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff or self.backoff_multiplier < 1:
            found.append(f"retries need {called('initial_backoff')} > 0, {called('max_backoff')} >= "
                         f"{called('initial_backoff')} and {called('backoff_multiplier')} >= 1")
        if self.timeout is not None and not 0 < self.timeout < math.inf:
            found.append(f"{called('timeout')} must be a positive, finite number of seconds (unset, None in Python: no "
                         f"deadline), not {self.timeout}")
        if self.keepalive_time < 0 or self.keepalive_timeout <= 0:
            found.append(f"{called('keepalive_time')} cannot be negative and {called('keepalive_timeout')} must be positive")
        elif 0 < self.keepalive_time < MIN_KEEPALIVE_TIME:
            found.append(f"{called('keepalive_time')} must be 0 (off) or at least {MIN_KEEPALIVE_TIME:g} s, the server's "
                         f"limit, not {self.keepalive_time:g}")
        if self.texts_per_request < 1 or self.max_concurrent_requests < 1:
            found.append(f"{called('texts_per_request')} and {called('max_concurrent_requests')} must be at least 1")
        if (self.client_cert is None) != (self.client_key is None):
            found.append(f"{called('client_cert')} and {called('client_key')} go together")
        files = {}  # the TLS files that are there, by setting
        for name in ("tls_ca", "client_cert", "client_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                found.append(f"{called(name)} {path}: no such file")
            elif path is not None:
                files[name] = path
        # gRPC reads the files only when it connects: one it cannot use fails every attempt as UNAVAILABLE, with the
        # reason on stderr alone. The ssl module reads PEM files as gRPC does, and says here what is wrong.
        if "tls_ca" in files:
            found += certificate_problems(called("tls_ca"), files["tls_ca"])
        if "client_cert" in files and "client_key" in files:
            cert, key = files["client_cert"], files["client_key"]
            found += chain_problems(called("client_cert"), cert, called("client_key"), key)
        if self.tls_server_name and not self.secure:
            found.append(f"{called('tls_server_name')} applies to TLS only (with {called('tls')}, {called('tls_ca')} or "
                         f"{called('client_cert')})")
        return found

    @property
    def secure(self) -> bool:
        """Whether the channel uses TLS."""
        return self.tls or self.tls_ca is not None or self.client_cert is not None


# What a field of each type takes, and how a problem names it. An int is a number; a bool, though Python makes it an int,
# is not (timeout=True is a typo, not one second).
_KINDS: dict[type, tuple[tuple[type, ...], str]] = {
    str: ((str,), "a str"),
    int: ((int,), "an int"),
    float: ((int, float), "a number"),
    bool: ((bool,), "True or False"),
    Path: ((str, os.PathLike), "a path (str or Path)"),
}


def _type_problems(settings: ClientSettings, called: Callable[[str], str]) -> list[str]:
    """A sentence per field whose value is not of the field's type, named as called(field) names it."""
    found = []
    for name, hint in typing.get_type_hints(ClientSettings).items():
        value = getattr(settings, name)
        kinds = typing.get_args(hint) or (hint,)
        optional = type(None) in kinds
        kind = next(k for k in kinds if k is not type(None))
        accepted, description = _KINDS[kind]
        if optional and value is None:
            continue
        if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
            found.append(f"{called(name)} must be {description}{' or None' if optional else ''}, not {type(value).__name__} {value!r}")
    return found


def service_config() -> dict[str, Any]:
    """The channel's service config: round robin over every address the target resolves to."""
    return {"loadBalancingConfig": [{"round_robin": {}}]}


def channel_options(settings: ClientSettings) -> list[tuple[str, Any]]:
    """gRPC channel arguments: service config, reconnection back-off, message size, keep-alive, TLS name override."""
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config())),
        # A server that went away is reconnected to on the retries' schedule, not gRPC's default (1 s, up to 120 s).
        ("grpc.initial_reconnect_backoff_ms", int(settings.initial_backoff * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(settings.max_backoff * 1000)),
        # The server bounds its answers (--max-message-bytes, a larger one refused up front with INVALID_ARGUMENT);
        # gRPC's 4 MiB default here would drop, after all the decoding, an answer the server was allowed to send.
        ("grpc.max_receive_message_length", -1),
    ]
    if settings.keepalive_time > 0:
        options += [
            ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging through a long decode that sends nothing yet
        ]
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    return options


def credentials(settings: ClientSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials from the certificate paths (a client certificate makes it mutual TLS); None for plaintext."""
    if not settings.secure:
        return None
    def read(path: Path | str | None) -> bytes | None:
        return Path(path).read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(settings.tls_ca), private_key=read(settings.client_key), certificate_chain=read(settings.client_cert),
    )
