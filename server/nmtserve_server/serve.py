"""`nmtserve serve`: the gRPC server's lifecycle.

Start: listen at once with health NOT_SERVING (so probes get an answer while
the model loads), verify and load the bundle, warm up, then report SERVING.
A bundle that fails verification never reaches SERVING: the process exits 1.
SIGTERM or SIGINT: health NOT_SERVING, new calls UNAVAILABLE, calls in flight
get --grace-seconds to finish (`TranslationServer.stop`), then exit 0; what is
still open then (calls past the grace, health Watch streams) is cancelled. A
second signal cancels the calls in flight at once, exit 1. If the
decode process (see `decode_loop.py`) dies on its own: health NOT_SERVING,
calls in flight fail with UNAVAILABLE, exit 1, for the orchestrator to restart.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict

# gRPC's core logs through absl, not Python's logging, in its own format: at its default here it wrote a line for every
# failed TLS handshake (a scanner could fill the log), whatever --log-level said. ERROR is gRPC's documented default;
# it is read once, as grpc is imported. GRPC_VERBOSITY set in the environment still wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # only now that GRPC_VERBOSITY is set
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nmtserve.bundle import BundleError
from nmtserve.pem import certificate_problems, chain_problems
from nmtserve.settings import add_settings_arguments, flag, settings_from_args

from .config import ServeSettings, configure_logging, freeze_startup_objects, logfmt
from .decode_loop import EngineSpec
from .engine import Model, providers_for
from .metrics import Metrics
from .scheduler import Scheduler
from .service import SERVICE_NAME, TranslatorService

log = logging.getLogger(__name__)

FINISH_SECONDS = 1.0  # once the last call has its answer: time for gRPC to send it before what is left is cancelled


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Define one flag per ServeSettings field."""
    add_settings_arguments(parser, ServeSettings)


def _listen(flag: str, address: str, add: Callable[..., int], *credentials: grpc.ServerCredentials) -> int:
    """Add a listening port to a gRPC server (add_insecure_port, or add_secure_port and its credentials); a failure
    names the flag that set it."""
    try:
        return add(address, *credentials)
    except RuntimeError as error:  # gRPC's says "Failed to bind to address A; set GRPC_VERBOSITY=debug ..." only
        raise OSError(f"{flag}: cannot listen on {address} ({_why_not_bound(address)})") from error


def _why_not_bound(address: str) -> str:
    """Why the system refuses to bind `address` (host:port), asked again directly since gRPC does not say."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"{host!r}: {error.strerror}"
    for family, kind, protocol, _, socket_address in found:
        try:
            with socket.socket(family, kind, protocol) as probe:  # a family the host lacks fails here
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind(socket_address)
        except OSError as error:
            return error.strerror or str(error)
    return "refused by gRPC; GRPC_VERBOSITY=debug says why"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _credentials(settings: ServeSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the main port, requiring client certificates when a client CA is given (mutual TLS); raises
    OSError naming the flag whose file is unusable."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    problems = chain_problems("--tls-cert", settings.tls_cert, "--tls-key", settings.tls_key)
    if settings.tls_client_ca is not None:
        problems += certificate_problems("--tls-client-ca", settings.tls_client_ca)
    if problems:
        raise OSError("; ".join(problems))
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None,
        require_client_auth=settings.tls_client_ca is not None,
    )


class TranslationServer:
    """The gRPC server (plus an optional plaintext health port), its scheduler and its metrics endpoint."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            self.metrics,
            max_queue_size=settings.max_queue_size,
            max_queue_delay=settings.max_queue_delay_ms / 1000,
            stall_seconds=settings.decode_stall_seconds,
        )
        self.metrics.watch_decode_process(lambda: self.scheduler.decode_pid)
        self.service = TranslatorService(settings, self.scheduler, self.metrics)
        self.health = health.aio.HealthServicer()
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port already taken is an error, not a silently shared socket
            # Keep-alive pings up to every 10 s are welcome (the SDK's default is 30 s); gRPC's default, one per
            # 5 minutes, would answer a faster client with GOAWAY "too_many_pings" during a long decode.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        # gRPC spreads each connection's age by ±10%, so they do not all go at once; its grace for the calls still open
        # on an aged connection is unlimited by default, and stays so: a long translation is not cut for its connection's age.
        if settings.max_connection_age_seconds:
            options.append(("grpc.max_connection_age_ms", round(settings.max_connection_age_seconds * 1000)))
        self.grpc = grpc.aio.server(options=options)  # --max-concurrent-rpcs: TranslatorService counts its own calls
        self.service.add_to_server(self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.health_grpc: grpc.aio.Server | None = None
        if settings.health_port is not None:
            self.health_grpc = grpc.aio.server(options=options)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
        self.port = self.health_port = self.metrics_port = 0
        self._metrics_http = None
        self._watch: asyncio.Task[None] | None = None

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", SERVICE_NAME):  # "" is the server as a whole
            await self.health.set(service, status)

    async def start(self) -> None:
        """Listen, load and warm up the bundle, then report SERVING; raises BundleError, DeviceError, EngineFailed, or OSError
        for an address or TLS file that cannot be used."""
        s = self.settings
        providers_for(s.device)  # --device cuda without a GPU fails here, before anything is loaded
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        credentials = _credentials(s)
        address = _address(s.host, s.port)
        if credentials:
            self.port = _listen(flag("port"), address, self.grpc.add_secure_port, credentials)
        else:
            self.port = _listen(flag("port"), address, self.grpc.add_insecure_port)
        await self.grpc.start()
        if self.health_grpc is not None:
            self.health_port = _listen(flag("health_port"), _address(s.host, s.health_port or 0), self.health_grpc.add_insecure_port)
            await self.health_grpc.start()
        try:
            self._metrics_http = self.metrics.serve_http(s.host.removeprefix("[").removesuffix("]"), s.metrics_port)
        except OSError as error:  # its own message names no address: "[Errno 98] Address already in use"
            raise OSError(f"{flag('metrics_port')}: cannot listen on {_address(s.host, s.metrics_port)} ({error.strerror or error})") from error
        self.metrics_port = self._metrics_http.server_port
        log.info(
            "event=listening grpc_port=%d tls=%s mtls=%s health_port=%s metrics_port=%d",
            self.port, credentials is not None, s.tls_client_ca is not None, self.health_port or "main", self.metrics_port,
        )
        assert s.bundle is not None  # ServeSettings.problems() requires it
        model = await asyncio.to_thread(Model.from_path, s.bundle)  # verified here first: a bad bundle fails fast
        spec = EngineSpec(str(s.bundle), model.bundle.sha256, s.device, s.max_batch_size, s.threads, s.decoder_threads)
        ready = await self.scheduler.start(spec, log_level=s.log_level)
        self.service.ready(model, ready.device)
        freeze_startup_objects()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watch = asyncio.create_task(self._watch_engine())
        # The settings chosen at start, here too: this line is logged at every --log-level.
        log.info(
            "event=serving model=%s bundle_sha256=%s device=%s precision=%s providers=%s decoder_threads=%d decode_stall_seconds=%g",
            logfmt(model.bundle.manifest["name"]), model.bundle.sha256, ready.device, model.bundle.precision, ",".join(ready.providers),
            ready.decoder_threads, self.scheduler.stall_seconds,
        )

    async def _watch_engine(self) -> None:
        """If the decode process ends while serving, report NOT_SERVING: calls can no longer be answered."""
        await self.scheduler.lost.wait()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float, force: asyncio.Event | None = None) -> bool:
        """Report NOT_SERVING, stop listening (GOAWAY), give calls in flight up to `grace` seconds (until `force` is set),
        then cancel what is left (late calls, health Watch streams, which would otherwise hold the drain) and close;
        whether the stop was not clean: `force` cut calls short, or the decode process had to be killed."""
        await self.health.enter_graceful_shutdown()
        self.scheduler.drain()
        # gRPC stops listening and sends GOAWAY now, so clients take new calls to another replica (behind a Service,
        # a kept-open connection would otherwise bring them here to be refused until the end). Its grace outlasts
        # ours: the stop below decides when the calls still open are cancelled, and shortens this one.
        closing = asyncio.ensure_future(self.grpc.stop(grace + FINISH_SECONDS))
        log.info("event=draining grace_seconds=%s calls=%d", grace, self.service.in_flight)
        waits = [asyncio.ensure_future(self.service.idle())]
        if force is not None:
            waits.append(asyncio.ensure_future(force.wait()))
        await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        forced, left = force is not None and force.is_set(), self.service.in_flight
        if left:
            log.warning("event=drain_cut_short calls=%d by=%s", left, "signal" if forced else "grace_seconds")
            # The calls end UNAVAILABLE (retryable elsewhere) through their own handlers, so that their log lines and
            # the requests metric say what the clients hear, before gRPC cancels whatever is left.
            self.scheduler.cut("the server stopped before the translation finished: "
                               + ("a second signal" if forced else f"its --grace-seconds {grace:g} ended"))
            finishing = asyncio.ensure_future(self.service.idle())
            await asyncio.wait([finishing], timeout=FINISH_SECONDS)
            finishing.cancel()
        await self.grpc.stop(0 if left else FINISH_SECONDS)
        await closing
        killed = await self.scheduler.stop(force)
        if self._watch is not None:
            self._watch.cancel()
        if self.health_grpc is not None:
            await self.health_grpc.stop(None)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("event=stopped")
        return (forced and left > 0) or killed


async def serve(settings: ServeSettings) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a clean drain, 1 if it cannot serve, loses its decode process, a second
    signal cuts calls short, or the decode process does not stop and is killed."""
    log.info("event=config %s", " ".join(f"{key}={logfmt(value)}" for key, value in asdict(settings).items()))
    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: (force if stop.is_set() else stop).set())  # a second one: no more waiting
    server = TranslationServer(settings)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    try:
        if starting.done():
            starting.result()
            lost = asyncio.create_task(server.scheduler.lost.wait())
            await asyncio.wait((stopping, lost), return_when=asyncio.FIRST_COMPLETED)
            if lost.done() and not stopping.done():
                stopping.cancel()
                await server.stop(0)
                return 1
            lost.cancel()
        else:
            log.info("event=signal_during_start")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    except Exception as error:
        if isinstance(error, (BundleError, RuntimeError, OSError)):  # DeviceError, a port gRPC cannot bind, ORT load
            log.error("event=startup_failed error=%s", logfmt(error))
        else:  # unforeseen: where it came from too; stopping still matters, or gRPC's threads keep the process alive
            log.exception("event=startup_failed error=%s", logfmt(error))
        stopping.cancel()
        await server.stop(0)
        return 1
    unclean = await server.stop(settings.grace_seconds, force)
    return 1 if server.scheduler.lost.is_set() or unclean else 0


def run(command: str, args: argparse.Namespace) -> int:
    """Check the settings, set up logging, and serve until stopped."""
    settings = settings_from_args(ServeSettings, args)
    problems = settings.problems()
    if problems:
        for problem in problems:
            print(f"nmtserve {command}: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    log.setLevel(min(logging.INFO, log.getEffectiveLevel()))  # the lifecycle lines (configuration, start, stop): always
    return asyncio.run(serve(settings))
