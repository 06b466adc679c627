"""Connecting the way gRPC users expect: retries with back-off, round robin over several servers, TLS and mutual TLS."""

from __future__ import annotations

import asyncio
import collections
import datetime
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc
from nmtserve_client import AsyncClient, Client, OverloadedError, UnavailableError, calls
from nmtserve_client.channel import ClientSettings, service_config

pytestmark = pytest.mark.e2e
TIMEOUT = 60
TRANSLATED = {"method": "Translate", "code": "OK"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_settings_are_checked_and_calls_spread_round_robin():
    assert service_config() == {"loadBalancingConfig": [{"round_robin": {}}]}  # and no gRPC retry policy: the SDK retries
    # keepalive_time 5: the server would end a long call with GOAWAY "too_many_pings", and gRPC would send it again.
    # An infinite or NaN timeout would reach gRPC as a deadline already passed.
    for bad in (dict(max_attempts=6), dict(max_attempts=0), dict(initial_backoff=0), dict(client_cert=Path("c.pem")), dict(timeout=0),
                dict(timeout=math.inf), dict(timeout=math.nan), dict(keepalive_time=5), dict(initial_backoff=math.nan),
                dict(max_backoff=math.nan), dict(backoff_multiplier=math.nan), dict(keepalive_time=math.nan),
                dict(keepalive_timeout=math.inf)):
        with pytest.raises(ValueError):
            Client("localhost:1", **bad)
    with Client("localhost:1") as client:
        for timeout in (-1.0, math.inf, math.nan):
            with pytest.raises(ValueError, match="timeout must be a positive, finite number"):
                client.translate(["Friday"], timeout=timeout)


def test_settings_and_timeouts_of_the_wrong_type_are_refused_naming_the_type():
    for bad, problem in [
        (dict(texts_per_request=2.5), "texts_per_request must be an int, not float 2.5"),
        (dict(timeout="5"), "timeout must be a number or None, not str '5'"),
        (dict(max_attempts=True), "max_attempts must be an int, not bool True"),  # a bool is not a number here
        (dict(tls="yes"), "tls must be True or False, not str 'yes'"),
        (dict(tls_ca=3), "tls_ca must be a path (str or Path) or None, not int 3"),
    ]:
        assert ClientSettings(**bad).problems() == [problem]
        with pytest.raises(ValueError, match=re.escape(problem)):
            Client("localhost:1", **bad)
    assert ClientSettings(timeout=5, initial_backoff=1, tls_ca=None).problems() == []  # an int is a number
    with Client("localhost:1") as client:
        for timeout in ("5", True):
            with pytest.raises(TypeError, match=f"timeout must be a number of seconds .*, not {type(timeout).__name__}"):
                client.translate(["Friday"], timeout=timeout)


def test_a_call_survives_a_server_that_comes_back_within_the_retry_budget(start_server, monkeypatch):
    port = _free_port()
    # Every back-off its longest: retries 1, 3, 7 and 15 s after the first attempt, against a server that is back
    # (listening, then loading) within a few seconds; drawn at random, all four could fall before it.
    backoffs: list[float] = []  # each retry's back-off, as drawn
    monkeypatch.setattr(calls.random, "uniform", lambda low, high: backoffs.append(high) or high)
    with Client(f"127.0.0.1:{port}", initial_backoff=1.0, max_backoff=8.0) as client, ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.translate, ["Friday"])
        refused_by = time.monotonic() + 30
        while not backoffs:  # the first attempt, refused: the server is not there yet
            assert time.monotonic() < refused_by, "the first attempt was never refused"
            time.sleep(0.01)
        server = start_server(port=port)
        (translation,) = call.result(timeout=TIMEOUT)
    assert translation.text and backoffs
    server.wait_for(lambda: server.metric("nmtserve_requests_total", TRANSLATED) == 1, timeout=5, what="the call counted")


def test_retries_give_up_after_the_budget(monkeypatch):
    backoffs: list[float] = []  # each retry's back-off, as drawn: its longest
    monkeypatch.setattr(calls.random, "uniform", lambda low, high: backoffs.append(high) or high)
    with Client(f"127.0.0.1:{_free_port()}", max_attempts=3, initial_backoff=0.2, max_backoff=0.2) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="Connection refused|failed to connect|Failed to connect"):
            client.translate(["Friday"])
    elapsed = time.monotonic() - started
    assert backoffs == [0.2, 0.2]  # three attempts: two retries, and no third
    assert 0.4 <= elapsed < 0.4 + 2.0  # both back-offs waited out, plus slack for a busy machine


class _Fleet(NamedTuple):
    """Two real servers that refuse every call, as a fleet with one replica draining (UNAVAILABLE) and another full
    (RESOURCE_EXHAUSTED) answers."""

    draining: Any  # conftest's InProcessServer
    full: Any

    def target(self, *names: str) -> str:
        """A target of the named servers ("draining", "full"): with both, the SDK's round robin spreads the attempts over
        the two, as over a fleet's replicas."""
        return "ipv4:" + ",".join(getattr(self, name).address for name in names)

    def counted(self) -> collections.Counter[tuple[str, str]]:
        """Every call the two servers have counted in nmtserve_requests_total, by method and code."""
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for server in self:
            for family in server.server.metrics.registry.collect():
                for sample in family.samples:
                    if sample.name == "nmtserve_requests_total":
                        counts[sample.labels["method"], sample.labels["code"]] += int(sample.value)
        return counts


@pytest.fixture(scope="module")
def fleet(start_server) -> Iterator[_Fleet]:
    """A draining server and a full one, for the module's tests; both stopped at its end."""
    draining = start_server()
    # The drain TranslationServer.stop() begins, without its closing of the port: each call still reaches the service,
    # as one on its way when a replica begins to drain does, and is refused and counted there.
    drained = threading.Event()
    draining._loop.call_soon_threadsafe(lambda: (draining.server.scheduler.drain(), drained.set()))
    assert drained.wait(TIMEOUT)
    # One call at a time, and one held in flight: every other call is refused. The held call waits for a paused decode
    # process, which the watchdog must not take for hung (decode_stall_seconds 0) however long the module runs.
    full = start_server(max_concurrent_rpcs=1, decode_stall_seconds=0)
    with grpc.insecure_channel(full.address) as channel:
        with full.paused():
            stub = translator_pb2_grpc.TranslatorStub(channel)
            held = stub.Translate.future(pb.TranslateRequest(texts=["Friday"]))  # no deadline: held until the module's end
            try:
                full.wait_for(lambda: full.server.service.in_flight == 1, timeout=TIMEOUT, what="the held call in the server")
                yield _Fleet(draining, full)
                assert not held.done(), "the held call ended: the full server was not full throughout"
            finally:
                held.cancel()
        full.wait_for(lambda: full.server.service.in_flight == 0, timeout=TIMEOUT, what="the held call ended")
    draining.stop()
    full.stop()


def _every_call(target: str, **settings: object) -> dict[str, Callable[[], object]]:
    """Each SDK call that the SDK retries, blocking and asyncio, as a function that makes it once."""

    async def translate_async() -> None:
        async with AsyncClient(target, **settings) as client:
            await client.translate(["Friday"])

    async def model_info_async() -> None:
        async with AsyncClient(target, **settings) as client:
            await client.model_info()

    def blocking(call: Callable[[Client], object]) -> Callable[[], object]:
        def make() -> object:
            with Client(target, **settings) as client:
                return call(client)
        return make

    return {"translate": blocking(lambda client: client.translate(["Friday"])),
            "stream": blocking(lambda client: list(client.translate_stream("Friday"))),
            "model info": blocking(Client.model_info),
            "async translate": lambda: asyncio.run(translate_async()), "async model info": lambda: asyncio.run(model_info_async())}


# The method each of _every_call's calls makes.
METHODS = {"translate": "Translate", "stream": "TranslateStream", "model info": "GetModelInfo",
           "async translate": "Translate", "async model info": "GetModelInfo"}
REFUSED_BY = {"draining": "UNAVAILABLE", "full": "RESOURCE_EXHAUSTED"}


@pytest.mark.parametrize("servers", [["draining"], ["full"], ["draining", "full"]],
                         ids=["unavailable", "resource-exhausted", "alternating"])
def test_max_attempts_bounds_every_call_whichever_codes_refuse_it(fleet, servers):
    """Each kind of SDK call makes max_attempts attempts in all, counted by the servers that refused them, whether a
    draining server, a full one, or both by turns refuse it."""
    codes: set[str] = set()  # the codes the calls met
    for name, call in _every_call(fleet.target(*servers), max_attempts=3, initial_backoff=0.01, max_backoff=0.01).items():
        before = fleet.counted()
        with pytest.raises((UnavailableError, OverloadedError)):
            call()
        # Exact, with no wait: the service counts a refusal before the client hears of it.
        attempts = fleet.counted() - before
        assert sum(attempts.values()) == 3, f"{name}: {attempts}"
        assert {method for method, _ in attempts} == {METHODS[name]}, f"{name}: {attempts}"
        codes |= {code for _, code in attempts}
    # Each server refused every method with its own code; with both, round robin took the attempts to both.
    assert codes == {REFUSED_BY[server] for server in servers}


@pytest.mark.parametrize("server, refusal", [("draining", (UnavailableError, "server is draining")),
                                             ("full", (OverloadedError, "--max-concurrent-rpcs"))], ids=["draining", "full"])
def test_the_servers_refusal_is_raised_at_once_where_the_next_back_off_would_pass_the_deadline(fleet, monkeypatch, server, refusal):
    """Each kind of SDK call raises the server's own refusal after one attempt, where waiting to retry would outlast
    the call's deadline."""
    # Every back-off 30 s, the deadline 10 s: the call ends with what the server said, not in waiting for DEADLINE_EXCEEDED.
    monkeypatch.setattr(calls.random, "uniform", lambda low, high: high)
    error, words = refusal
    for name, call in _every_call(fleet.target(server), timeout=10.0, initial_backoff=30.0, max_backoff=30.0).items():
        before = fleet.counted()
        started = time.monotonic()
        with pytest.raises(error, match=re.escape(words)):
            call()
        assert time.monotonic() - started < 5, name
        assert fleet.counted() - before == {(METHODS[name], REFUSED_BY[server]): 1}, name


def test_a_stream_that_failed_stays_failed_when_read_again(fleet, monkeypatch):
    """A read of a stream that failed raises its error again, and sends nothing: the server counts one attempt."""
    # The first back-off would pass the deadline, so the stream fails with the server's refusal; a later read drew a
    # back-off of its own, which fitted, and started the stream again (a second refusal, counted).
    backoffs = iter([30.0])
    monkeypatch.setattr(calls.random, "uniform", lambda low, high: next(backoffs, 0.01))
    before = fleet.counted()
    with Client(fleet.target("draining"), timeout=10.0, initial_backoff=30.0, max_backoff=30.0) as client:
        stream = client.translate_stream("Friday")
        for _ in range(2):
            with pytest.raises(UnavailableError, match="server is draining"):
                next(stream)
    assert fleet.counted() - before == {("TranslateStream", "UNAVAILABLE"): 1}


def test_an_answer_above_grpcs_default_limit_arrives_from_a_server_allowed_to_send_it(start_server):
    server = start_server(max_message_bytes=16 * 1024 * 1024)
    model = server.server.service.model
    text = "Friday"
    while len(model.encode_texts([text + " Friday"])[0]) <= 200:
        text += " Friday"
    length = model.max_target_length
    # Each text's alignment: a row of about 200 source weights per generated token: about 5 MB in all.
    with Client(server.address) as client:
        translations = client.translate([text] * 24, min_length=length, max_length=length, return_alignment=True)
    assert sum(len(step) for t in translations for step in t.hypotheses[0].alignment) * 4 > 4 * 1024 * 1024


def test_round_robin_spreads_calls_over_every_address(start_server):
    first, second = start_server(), start_server()
    target = f"ipv4:127.0.0.1:{first.server.port},127.0.0.1:{second.server.port}"
    before = [first.metric("nmtserve_requests_total", TRANSLATED), second.metric("nmtserve_requests_total", TRANSLATED)]
    with Client(target) as client:
        for _ in range(20):
            client.translate(["Friday"])

    def moved() -> list[float]:
        return [first.metric("nmtserve_requests_total", TRANSLATED) - before[0], second.metric("nmtserve_requests_total", TRANSLATED) - before[1]]

    first.wait_for(lambda: sum(moved()) == 20, timeout=5, what="20 calls counted")  # a call is counted just after its answer
    assert min(moved()) >= 5, moved()


def test_a_dns_target_resolves(server):
    with Client(f"dns:///localhost:{server.server.port}") as client:
        assert client.translate(["Friday"])[0].text


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, name: str, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """ca.pem; server.pem/.key for the name localhost only; client.pem/.key for client authentication; all signed by the CA."""
    directory = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, *extensions: tuple[x509.ExtensionType, bool]) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name("nmtserve test CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256())

    _write(directory, "ca", ca_key, certificate("nmtserve test CA", ca_key, (x509.BasicConstraints(ca=True, path_length=None), True)))
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    _write(directory, "server", server_key, certificate(
        "localhost", server_key, (x509.SubjectAlternativeName([x509.DNSName("localhost")]), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
    ))
    _write(directory, "client", client_key, certificate("client", client_key, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)))
    return directory


def test_tls_with_the_servers_ca(start_server, certificates):
    d = certificates
    server = start_server(tls_cert=d / "server.pem", tls_key=d / "server.key")
    with Client(f"localhost:{server.server.port}", tls_ca=d / "ca.pem") as client:
        assert client.translate(["Friday"])[0].text
    for wrong in (dict(), dict(tls=True)):  # plaintext; TLS trusting only the system's roots
        with Client(server.address, max_attempts=1, **wrong) as client, pytest.raises(UnavailableError):
            client.translate(["Friday"])
    with Client(server.address, tls=True) as client, pytest.raises(UnavailableError) as waited:
        client.wait_until_serving(timeout=0.5)
    assert re.search("handshake|certificate", waited.value.message, re.IGNORECASE), "the cause is not told"


def test_mutual_tls_with_a_client_certificate(start_server, certificates):
    d = certificates
    server = start_server(tls_cert=d / "server.pem", tls_key=d / "server.key", tls_client_ca=d / "ca.pem")
    tls = dict(tls_ca=d / "ca.pem", tls_server_name="localhost")  # the address is 127.0.0.1; the certificate names localhost
    with Client(server.address, client_cert=d / "client.pem", client_key=d / "client.key", **tls) as client:
        assert client.translate(["Friday"])[0].text
    as_strings = dict(tls_ca=str(d / "ca.pem"), client_cert=str(d / "client.pem"), client_key=str(d / "client.key"))
    with Client(server.address, tls_server_name="localhost", **as_strings) as client:  # paths as str work too
        assert client.translate(["Friday"])[0].text
    with Client(server.address, max_attempts=1, **tls) as client, pytest.raises(UnavailableError):
        client.translate(["Friday"])


def test_tls_files_gRPC_cannot_use_are_refused_naming_the_file_and_what_is_wrong(certificates, tmp_path):
    d = certificates
    client_key = serialization.load_pem_private_key((d / "client.key").read_bytes(), password=None)
    (tmp_path / "encrypted.key").write_bytes(client_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")))
    (tmp_path / "ca.der").write_bytes(x509.load_pem_x509_certificate((d / "ca.pem").read_bytes()).public_bytes(serialization.Encoding.DER))
    (tmp_path / "notes.txt").write_text("not a certificate\n")
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc)
    (tmp_path / "crl.pem").write_bytes(  # a revocation list alone: PEM, but no certificate to trust
        x509.CertificateRevocationListBuilder().issuer_name(_name("nmtserve test CA")).last_update(now)
        .next_update(now + datetime.timedelta(days=1)).sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    mutual = dict(client_cert=d / "client.pem", client_key=d / "client.key")
    assert ClientSettings(tls_ca=d / "ca.pem", **mutual).problems() == []
    for wrong, problem in [
        (dict(tls_ca=tmp_path / "ca.der"), f"tls_ca {tmp_path / 'ca.der'}: holds no PEM certificate"),
        (dict(tls_ca=tmp_path / "notes.txt"), f"tls_ca {tmp_path / 'notes.txt'}: holds no PEM certificate"),
        (dict(tls_ca=tmp_path / "crl.pem"), f"tls_ca {tmp_path / 'crl.pem'}: holds no PEM certificate"),
        (dict(mutual, client_cert=d / "client.key"), f"client_cert {d / 'client.key'}: holds no PEM certificate"),
        (dict(mutual, client_key=d / "client.pem"), f"client_key {d / 'client.pem'}: holds no PEM private key"),
        (dict(mutual, client_key=d / "server.key"),
         f"client_key {d / 'server.key'}: not the private key of client_cert {d / 'client.pem'}"),
        # Refused by name, never a passphrase prompt on the terminal.
        (dict(mutual, client_key=tmp_path / "encrypted.key"),
         f"client_key {tmp_path / 'encrypted.key'}: encrypted, and gRPC takes no passphrase"),
    ]:
        assert [p for p in ClientSettings(**wrong).problems() if problem in p], (wrong, ClientSettings(**wrong).problems())
        with pytest.raises(ValueError, match=re.escape(problem)):
            Client("localhost:1", **wrong)

