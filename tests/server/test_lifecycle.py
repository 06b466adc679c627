"""`nmtserve serve` as a process: start-up, refusal of bad bundles and devices, graceful SIGTERM, TLS, configuration."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import fields

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc
from nmtserve_server.config import ServeSettings
from nmtserve_server.engine import DeviceError, providers_for

pytestmark = pytest.mark.e2e
TIMEOUT = 60
# Time for the server to read what the decode process reported before it was stopped: the server reads each report as
# it comes, in well under a millisecond unless the machine is loaded.
REPORTS_READ_SECONDS = 0.5


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _decode_pid(server) -> int:
    return int(re.search(r"decode_pid=(\d+)", server.wait_for_event("warmed_up")).group(1))


def _long_calls(stub: translator_pb2_grpc.TranslatorStub, texts: list[str], beam_size: int = 1) -> list[grpc.Future]:
    """One call per text, each decoding for the model's full target length."""
    limit = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).limits.max_target_tokens
    long = pb.TranslateOptions(beam_size=beam_size, min_length=limit, max_length=limit)
    return [stub.Translate.future(pb.TranslateRequest(texts=[t], options=long), timeout=TIMEOUT) for t in texts]


def _stopped_mid_decode(server, decode_pid: int, start, decoding, attempts: int = 3) -> list[grpc.Future]:
    """The calls start() began, still unanswered, with the decode process stopped (SIGSTOP) while decoding() holds.

    On a loaded machine a whole decode can end between seeing it run and the stop: once the server has had time to
    read the reports sent before the stop (REPORTS_READ_SECONDS), calls already answered make the attempt void, and
    start() is called again once the process runs and has answered them, up to `attempts` times.
    """
    for _ in range(attempts):
        calls = start()
        server.wait_for(decoding, what="texts decoding")
        os.kill(decode_pid, signal.SIGSTOP)
        time.sleep(REPORTS_READ_SECONDS)
        if not any(call.done() for call in calls):
            return calls
        os.kill(decode_pid, signal.SIGCONT)
        for call in calls:
            call.exception(TIMEOUT)  # answered, one way or the other
    pytest.fail(f"the calls were answered before the decode process was stopped, in each of {attempts} attempts")


def test_sigterm_lets_calls_in_flight_finish_refuses_new_ones_and_exits_0(serve_process, tiny_bundle, test_texts):
    server = serve_process("--bundle", str(tiny_bundle), "--health-port", "0", "--grace-seconds", "30", "--max-batch-size", "16")
    decode_pid = _decode_pid(server)
    server.wait_for_event("serving")
    address, health_address = f"127.0.0.1:{server.port('grpc_port')}", f"127.0.0.1:{server.port('health_port')}"
    assert _health(health_address) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        limit = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).limits.max_target_tokens
        long = pb.TranslateOptions(beam_size=4, min_length=limit, max_length=limit)
        in_flight = [stub.Translate.future(pb.TranslateRequest(texts=[t], options=long), timeout=TIMEOUT) for t in test_texts[:4]]
        server.wait_for(lambda: server.scrape().value("nmtserve_active_sequences") == 4, what="4 texts decoding")
        os.kill(decode_pid, signal.SIGSTOP)  # the calls stay in flight through the checks, however slow the machine
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_event("draining")
        assert _health(health_address) == health_pb2.HealthCheckResponse.NOT_SERVING
        # No longer listening: behind a Service, new connections (and, after GOAWAY, new calls) go to other replicas.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port("grpc_port")), timeout=10).close()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Translate(pb.TranslateRequest(texts=["Friday"]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not any(f.done() for f in in_flight), "a call ended before the signal; the test proves nothing"
        os.kill(decode_pid, signal.SIGCONT)
        results = [f.result() for f in in_flight]
    assert all(len(r.translations[0].hypotheses[0].tokens) == limit for r in results)
    assert server.wait() == 0, server.log
    assert "event=stopped" in server.log


def test_a_call_reaching_a_draining_server_is_refused_unavailable_and_counted(start_server):
    # After SIGTERM the main port stops listening, so the test above meets a refused connection; a call already on its
    # way (or on a connection gRPC has not closed yet) reaches the service, which must refuse it, not serve it.
    server = start_server()
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        assert stub.Translate(pb.TranslateRequest(texts=["Friday"]), timeout=TIMEOUT).translations  # connected
        drained = threading.Event()
        server._loop.call_soon_threadsafe(lambda: (server.server.scheduler.drain(), drained.set()))
        assert drained.wait(TIMEOUT)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Translate(pb.TranslateRequest(texts=["Friday"]), timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and refused.value.details() == "server is draining"
    assert server.metric("nmtserve_requests_total", {"method": "Translate", "code": "UNAVAILABLE"}) == 1


def test_a_health_watch_does_not_hold_the_drain_and_a_second_signal_ends_it(serve_process, tiny_bundle, test_texts):
    # A health Watch stream never ends by itself: the drain no longer waits the grace period out for it.
    server = serve_process("--bundle", str(tiny_bundle), "--grace-seconds", "60")
    server.wait_for_event("serving")
    with grpc.insecure_channel(f"127.0.0.1:{server.port('grpc_port')}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, server.log
        assert time.monotonic() - started < 15, "the drain waited for the health Watch stream"
    # A second signal during the drain cancels the calls in flight at once.
    server = serve_process("--bundle", str(tiny_bundle), "--grace-seconds", "60")
    decode_pid = _decode_pid(server)
    server.wait_for_event("serving")
    with grpc.insecure_channel(f"127.0.0.1:{server.port('grpc_port')}") as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        # No call can finish before the second signal cuts them short.
        in_flight = _stopped_mid_decode(server, decode_pid, lambda: _long_calls(stub, test_texts[:8], beam_size=4),
                                        lambda: server.scrape().value("nmtserve_active_sequences") > 0)
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_event("draining")
        assert not any(f.done() for f in in_flight), "a call ended before the second signal; the test proves nothing"
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_event("drain_cut_short")
        os.kill(decode_pid, signal.SIGCONT)  # so that it reads the server's request to stop
        assert server.wait(30) == 1, server.log
        assert time.monotonic() - started < 15
        assert "event=drain_cut_short calls=8 by=signal" in server.log
        assert {f.exception().code() for f in in_flight} == {grpc.StatusCode.UNAVAILABLE}, "every call was cut short"
        # As the clients heard it (any lines before: the answers of a void attempt of _stopped_mid_decode).
        assert _codes_logged(server.log, "Translate")[-8:] == ["UNAVAILABLE"] * 8


def _codes_logged(log: str, method: str) -> list[str]:
    """The status code of each call of `method` in the server's log, in its one line per call."""
    return re.findall(rf"event=rpc method={method} request_id=\S+ code=(\w+)", log)


def test_calls_still_open_when_the_grace_period_ends_end_unavailable_and_it_exits_0(serve_process, tiny_bundle, test_texts):
    server = serve_process("--bundle", str(tiny_bundle), "--grace-seconds", "1")
    decode_pid = _decode_pid(server)
    server.wait_for_event("serving")
    with grpc.insecure_channel(f"127.0.0.1:{server.port('grpc_port')}") as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        # No call can finish within the grace period.
        in_flight = _stopped_mid_decode(server, decode_pid, lambda: _long_calls(stub, test_texts[:4]),
                                        lambda: server.scrape().value("nmtserve_active_sequences") == 4)
        server.process.send_signal(signal.SIGTERM)
        assert "by=grace_seconds" in server.wait_for_event("drain_cut_short")
        os.kill(decode_pid, signal.SIGCONT)  # so that it reads the server's request to stop
        assert server.wait(30) == 0, server.log  # the grace period ran its course: a normal stop
        assert "event=drain_cut_short calls=4 by=grace_seconds" in server.log and "event=stopped" in server.log
        # Cut short, retryable: behind a Service another replica can answer them.
        assert {f.exception().code() for f in in_flight} == {grpc.StatusCode.UNAVAILABLE}
        assert {f.exception().details() for f in in_flight} == {
            "the server stopped before the translation finished: its --grace-seconds 1 ended"}
        # As the clients heard it (any lines before: the answers of a void attempt of _stopped_mid_decode).
        assert _codes_logged(server.log, "Translate")[-4:] == ["UNAVAILABLE"] * 4


def test_a_second_signal_with_no_call_left_to_cut_still_exits_0(serve_process, tiny_bundle):
    server = serve_process("--bundle", str(tiny_bundle), "--grace-seconds", "60")
    server.wait_for_event("serving")
    with grpc.insecure_channel(f"127.0.0.1:{server.port('grpc_port')}") as channel:
        # The open Watch keeps the server in its last second of closing, when the second signal comes.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_event("draining")
        server.process.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, server.log
    assert "event=drain_cut_short" not in server.log and "event=stopped" in server.log


def test_a_hung_decode_process_is_killed_and_the_server_stops_serving(serve_process, tiny_bundle):
    server = serve_process("--bundle", str(tiny_bundle), "--decode-stall-seconds", "2")
    decode_pid = _decode_pid(server)
    server.wait_for_event("serving")
    with grpc.insecure_channel(f"127.0.0.1:{server.port('grpc_port')}") as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        time.sleep(3)  # idle for longer than the stall limit: that is no stall
        assert stub.Translate(pb.TranslateRequest(texts=["Friday"]), timeout=TIMEOUT).translations
        os.kill(decode_pid, signal.SIGSTOP)  # hung, as a stuck model run would leave it
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            stub.Translate(pb.TranslateRequest(texts=["Friday"]), timeout=TIMEOUT)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # retryable: another replica can answer it
    assert 2 <= time.monotonic() - started < 30
    assert server.wait(TIMEOUT) == 1, server.log
    assert re.search(r"event=decode_process_stalled seconds=[\d.]+ texts=1", server.log), server.log
    # A healthy model run may take as long as the warm-up's longest: the limit is never below 4 warm-ups.
    warm_up, limit = map(float, re.search(r"event=warmed_up seconds=([\d.]+) .*decode_stall_seconds=([\d.e+]+)", server.log).groups())
    # The warm-up is logged to the millisecond, the limit to six figures.
    assert limit == pytest.approx(max(2.0, 4 * warm_up), abs=4 * 0.0005, rel=1e-5)
    assert "event=decode_process_exited signal=SIGKILL" in server.log


def test_a_decode_process_that_does_not_stop_is_killed_and_the_exit_says_so(serve_process, tiny_bundle):
    server = serve_process("--bundle", str(tiny_bundle))
    decode_pid = _decode_pid(server)
    server.wait_for_event("serving")
    os.kill(decode_pid, signal.SIGSTOP)  # stuck: it never reads the request to stop
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_event("draining")
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)  # rather than wait for it the 30 s it would otherwise get
    assert server.wait(30) == 1, server.log
    assert time.monotonic() - started < 15
    assert "event=decode_process_killed reason=a_second_signal" in server.log and "event=stopped" in server.log
    with pytest.raises(ProcessLookupError):
        os.kill(decode_pid, 0)


@pytest.mark.parametrize("when", ["serving", "draining"])
def test_a_lost_decode_process_stops_serving_and_exits_non_zero(serve_process, tiny_bundle, test_texts, when):
    # Two rows: the third text waits for one, so the call lasts two whole decodes, however long the scrapes take.
    server = serve_process("--bundle", str(tiny_bundle), "--grace-seconds", "30", "--max-batch-size", "2", "--max-beam-size", "2")
    decode_pid = _decode_pid(server)
    server.wait_for_event("serving")
    address = f"127.0.0.1:{server.port('grpc_port')}"
    with grpc.insecure_channel(address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        limit = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).limits.max_target_tokens
        long = pb.TranslateOptions(min_length=limit, max_length=limit)
        in_flight = stub.Translate.future(pb.TranslateRequest(texts=test_texts[:3], options=long), timeout=TIMEOUT)
        server.wait_for(lambda: server.scrape().value("nmtserve_active_sequences") == 2, what="the texts decoding")
        os.kill(decode_pid, signal.SIGSTOP)  # the texts stay in flight however long the drain takes to begin
        assert not in_flight.done(), "the texts finished before the decode process was paused"
        if when == "draining":
            server.process.send_signal(signal.SIGTERM)
            server.wait_for_event("draining")
        os.kill(decode_pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as failed:
            in_flight.result()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # retryable: another replica can answer it
    assert server.wait(TIMEOUT) == 1, server.log
    assert "event=decode_process_lost texts=3" in server.log  # the three texts of the call
    assert "event=decode_process_exited signal=SIGKILL" in server.log  # its exit status, once reaped
    # The call failed with its first text; its other texts' errors were read, not left for asyncio to log.
    assert "exception was never retrieved" not in server.log


def test_every_call_is_one_log_line_with_its_request_id(serve_process, tiny_bundle):
    server = serve_process("--bundle", str(tiny_bundle))
    server.wait_for_event("serving")
    with grpc.insecure_channel(f"127.0.0.1:{server.port('grpc_port')}") as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        answered = stub.Translate(pb.TranslateRequest(texts=["Friday"]), timeout=TIMEOUT, metadata=(("x-request-id", "trace-42"),))
        assert answered.request_id == "trace-42"
        with pytest.raises(grpc.RpcError) as refused:
            stub.Translate(pb.TranslateRequest(texts=[""]), timeout=TIMEOUT, metadata=(("x-request-id", "trace-43"),))
        assert ("x-request-id", "trace-43") in refused.value.trailing_metadata()
        # An id that would forge a log field (a space, an '=') is replaced by one of the server's own.
        forged = stub.Translate(pb.TranslateRequest(texts=["Friday"]), timeout=TIMEOUT, metadata=(("x-request-id", "a code=INTERNAL"),))
        assert re.fullmatch(r"[0-9a-f]{16}", forged.request_id)
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.log
    calls = [line for line in server.log.splitlines() if "event=rpc " in line]
    assert len(calls) == 3, calls
    assert re.search(r"event=rpc method=Translate request_id=trace-42 code=OK seconds=\S+ texts=1\b", calls[0]), calls[0]
    assert "event=rpc method=Translate request_id=trace-43 code=INVALID_ARGUMENT " in calls[1], calls[1]
    assert f"request_id={forged.request_id} code=OK" in calls[2] and "a code=INTERNAL" not in server.log


def test_tampered_bundle_never_serves_and_exits_non_zero(serve_process, tiny_bundle, tmp_path):
    tampered = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, tampered)
    graph = tampered / "decoder_step.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    server = serve_process("--bundle", str(tampered))
    assert server.wait(TIMEOUT) == 1
    assert "decoder_step.onnx: sha256" in server.log and "does not match the manifest" in server.log
    assert "event=startup_failed" in server.log
    assert "event=serving" not in server.log


def test_a_verified_bundle_that_fails_to_load_exits_non_zero(serve_process, tiny_bundle, tmp_path):
    # Every hash matches and the special tokens are the manifest's, but the tokenizer's model is none that `tokenizers`
    # knows: the server and in-process translation both say so.
    broken = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, broken)
    garbage = json.dumps({**json.loads((broken / "tokenizer.json").read_text()), "model": {"type": "NoSuchModel"}}).encode()
    (broken / "tokenizer.json").write_bytes(garbage)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["files"]["tokenizer"].update(sha256=hashlib.sha256(garbage).hexdigest(), bytes=len(garbage))
    (broken / "manifest.json").write_text(json.dumps(manifest))
    server = serve_process("--bundle", str(broken))
    assert server.wait(TIMEOUT) == 1, server.log
    assert "event=startup_failed" in server.log and "the tokenizers tokenizer's files do not load" in server.log
    assert "event=serving" not in server.log
    result = subprocess.run([sys.executable, "-m", "nmtserve.cli", "translate", "--bundle", str(broken), "Friday"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1 and "the tokenizers tokenizer's files do not load" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bundle_promising_longer_outputs_than_its_model_can_make_never_serves(serve_process, tiny_bundle, tmp_path):
    # The manifest's output limit is past the model's positional encoding table: warm-up decodes to the limit.
    longer = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, longer)
    manifest = json.loads((longer / "manifest.json").read_text())
    manifest["limits"]["max_target_length"] += 64
    (longer / "manifest.json").write_text(json.dumps(manifest))
    server = serve_process("--bundle", str(longer))
    assert server.wait(TIMEOUT) == 1, server.log
    assert "event=startup_failed" in server.log and "event=serving" not in server.log


def test_device_cuda_without_a_gpu_fails_fast(serve_process, tiny_bundle):
    try:
        providers_for("cuda")
    except DeviceError:
        pass
    else:
        pytest.skip("this machine has a usable GPU")
    server = serve_process("--bundle", str(tiny_bundle), "--device", "cuda")
    assert server.wait(20) == 1
    assert "no usable GPU" in server.log
    assert "event=listening" not in server.log  # refused before binding a port or loading the bundle


@pytest.mark.parametrize(
    ("flag", "cause"),
    [(flag, f"{flag}: cannot listen on 127.0.0.1:{{port}} (Address already in use)")
     for flag in ("--port", "--health-port", "--metrics-port")],
)
def test_a_port_already_taken_fails_the_start_with_the_reason(serve_process, tiny_bundle, flag, cause):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = serve_process("--bundle", str(tiny_bundle), flag, str(port))
        assert server.wait(20) == 1, server.log  # before the bundle is loaded: no waiting for the model
    failed = [line for line in server.lines if "event=startup_failed" in line]
    assert failed and cause.format(port=port) in failed[0], server.log
    assert "event=serving" not in server.log


@pytest.mark.parametrize(
    ("host", "cause"),
    [("192.0.2.1", "cannot listen on 192.0.2.1:{port} (Cannot assign requested address)"),  # TEST-NET-1: no machine's
     ("no-such-host.invalid", "cannot listen on no-such-host.invalid:{port} ('no-such-host.invalid': ")],
)
def test_a_host_this_machine_cannot_listen_on_is_named_with_the_reason(serve_process, tiny_bundle, host, cause):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    server = serve_process("--bundle", str(tiny_bundle), "--host", host, "--port", str(port))
    assert server.wait(20) == 1, server.log
    (failed,) = [line for line in server.lines if "event=startup_failed" in line]
    assert cause.format(port=port) in failed, failed


def test_help_documents_every_setting_and_its_environment_variable():
    result = subprocess.run([sys.executable, "-m", "nmtserve.cli", "serve", "--help"], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for f in fields(ServeSettings):
        # argparse wraps the help, and breaks a long word at a hyphen: compare without the line breaks.
        help_text = " ".join(f.metadata["help"].replace("%%", "%").split())
        assert f"[env NMTSERVE_{f.name.upper()}; default: " in text
        assert f"--{f.name.replace('_', '-')}" in text and help_text.replace("- ", "-") in text.replace("- ", "-"), f.name


def test_missing_bundle_and_inconsistent_settings_are_refused():
    result = subprocess.run([sys.executable, "-m", "nmtserve.cli", "serve", "--tls-key", "k.pem"], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "--bundle is required" in result.stderr and "--tls-cert and --tls-key go together" in result.stderr


@pytest.mark.parametrize(
    ("flags", "environment", "message"),
    [
        (["--max-queue-delay-ms", "inf"], {}, "argument --max-queue-delay-ms: invalid float value: 'inf'"),
        ([], {"NMTSERVE_GRACE_SECONDS": "nan"}, "NMTSERVE_GRACE_SECONDS='nan' is not a valid float"),
        (["--port", "70000"], {}, "--port 70000 is not a port (0 to 65535)"),
        (["--max-message-bytes", str(2**31)], {}, "--max-message-bytes cannot exceed 2147483647"),
        (["--max-queue-delay-ms", "1e10"], {}, "--max-queue-delay-ms cannot exceed 60000, not 1e+10"),
        (["--max-connection-age-seconds", "-1"], {}, "--max-connection-age-seconds must be a number of at least 0, not -1.0"),
        (["--max-connection-age-seconds", "3e6"], {}, "--max-connection-age-seconds cannot exceed 2147483"),
        ([], {"NMTSERVE_LOG_LEVEL": "verbose"}, "NMTSERVE_LOG_LEVEL='verbose' is not one of debug, info, warning, error"),
        ([], {"NMTSERVE_PORT": "fifty"}, "NMTSERVE_PORT='fifty' is not a valid int"),
    ],
)
def test_settings_that_would_fail_later_are_refused_at_once(tiny_bundle, flags, environment, message):
    """Each used to pass the checks and then crash the server (a dead decode process, a traceback at start)."""
    result = subprocess.run(
        [sys.executable, "-m", "nmtserve.cli", "serve", "--bundle", str(tiny_bundle), *flags],
        capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **environment},
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_quiet_log_level_drops_the_call_lines_but_not_the_lifecycle(serve_process, tiny_bundle):
    server = serve_process("--bundle", str(tiny_bundle), "--log-level", "warning")
    server.wait_for_event("serving")
    with grpc.insecure_channel(f"127.0.0.1:{server.port('grpc_port')}") as channel:
        assert translator_pb2_grpc.TranslatorStub(channel).Translate(pb.TranslateRequest(texts=["Friday"]), timeout=TIMEOUT)
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(TIMEOUT) == 0, server.log
    events = re.findall(r"event=(\w+)", server.log)
    assert {"config", "listening", "serving", "draining", "stopped"} <= set(events), events
    assert "rpc" not in events and "log_level=warning" in server.log
    # What start chose, on a line every level logs.
    assert re.search(r"event=serving .* decoder_threads=[1-9]\d* decode_stall_seconds=[\d.e+]+\n", server.log), server.log


def test_environment_variables_configure_the_server_and_the_config_is_logged(serve_process, tiny_bundle, monkeypatch):
    monkeypatch.setenv("NMTSERVE_BUNDLE", str(tiny_bundle))
    monkeypatch.setenv("NMTSERVE_MAX_QUEUE_SIZE", "77")
    for unset in ("NMTSERVE_HEALTH_PORT", "NMTSERVE_TLS_CERT", "NMTSERVE_TLS_KEY"):  # empty: as if not there
        monkeypatch.setenv(unset, "")
    server = serve_process()
    line = server.wait_for_event("config")
    assert "max_queue_size=77" in line and f"bundle={tiny_bundle}" in line
    assert "health_port=None" in line and "tls_cert=None" in line
    server.wait_for_event("serving")
    with grpc.insecure_channel(f"127.0.0.1:{server.port('grpc_port')}") as channel:
        info = translator_pb2_grpc.TranslatorStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.limits.max_queue_size == 77
    server.process.send_signal(signal.SIGINT)
    assert server.wait() == 0


def test_a_decode_process_killed_while_loading_fails_the_start_naming_the_likely_cause(serve_process, tiny_bundle):
    server = serve_process("--bundle", str(tiny_bundle))
    decode_pid = _decode_pid_started(server)
    os.kill(decode_pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    assert server.wait(TIMEOUT) == 1, server.log
    (failed,) = [line for line in server.lines if "event=startup_failed" in line]
    assert "the decode process was killed while loading (signal=SIGKILL)" in failed and "--max-batch-size" in failed
    assert "event=serving" not in server.log and "event=decode_process_lost" not in server.log


def test_a_signal_while_the_model_loads_stops_the_server_at_once(serve_process, tiny_bundle):
    server = serve_process("--bundle", str(tiny_bundle))
    decode_pid = _decode_pid_started(server)
    os.kill(decode_pid, signal.SIGSTOP)  # still loading, however fast this machine loads
    # It listens already, so probes get an answer: not serving yet, and calls are refused as retryable.
    address = f"127.0.0.1:{server.port('grpc_port')}"
    assert _health(address) == _health(address, "nmtserve.v1.Translator") == health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
        translator_pb2_grpc.TranslatorStub(channel).Translate(pb.TranslateRequest(texts=["Friday"]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "server is starting" in refused.value.details()
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(TIMEOUT) == 0, server.log
    assert time.monotonic() - signalled < 10, "waited for a decode process that was never told to stop"
    assert "event=signal_during_start" in server.log and "event=serving" not in server.log
    with pytest.raises(ProcessLookupError):
        os.kill(decode_pid, 0)


def _decode_pid_started(server) -> int:
    """The decode process's id, as soon as the server has started it (before it has loaded the model)."""

    def spawned() -> list[psutil.Process]:
        return [child for child in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(child.cmdline())]

    server.wait_for(spawned, what="the decode process started")
    return spawned()[0].pid


def test_a_bad_tls_key_is_named_and_not_taken_for_a_busy_port(serve_process, tiny_bundle, certificates):
    d = certificates
    server = serve_process("--bundle", str(tiny_bundle), "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "client.key"))
    assert server.wait(TIMEOUT) == 1, server.log
    (failed,) = [line for line in server.lines if "event=startup_failed" in line]
    assert f'error="--tls-key {d / "client.key"}: not the private key of --tls-cert {d / "server.pem"}' in failed
    assert "cannot listen" not in failed


def test_a_client_ca_with_no_certificate_is_named(serve_process, tiny_bundle, certificates, tmp_path):
    d = certificates
    (tmp_path / "ca.txt").write_text("not a certificate\n")
    server = serve_process("--bundle", str(tiny_bundle), "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key"),
                           "--tls-client-ca", str(tmp_path / "ca.txt"))
    assert server.wait(TIMEOUT) == 1, server.log
    (failed,) = [line for line in server.lines if "event=startup_failed" in line]
    assert f'error="--tls-client-ca {tmp_path / "ca.txt"}: holds no PEM certificate' in failed


def test_an_encrypted_tls_key_is_refused_without_asking_for_its_passphrase(serve_process, tiny_bundle, certificates):
    d = certificates
    _openssl("pkey", "-in", str(d / "server.key"), "-aes256", "-passout", "pass:secret", "-out", str(d / "encrypted.key"))
    server = serve_process("--bundle", str(tiny_bundle), "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "encrypted.key"))
    assert server.wait(TIMEOUT) == 1, server.log
    (failed,) = [line for line in server.lines if "event=startup_failed" in line]
    assert f'error="--tls-key {d / "encrypted.key"}: encrypted, and gRPC takes no passphrase' in failed
    assert "pass phrase" not in server.log


def test_failed_tls_handshakes_do_not_fill_the_log(serve_process, tiny_bundle, certificates):
    d = certificates
    server = serve_process("--bundle", str(tiny_bundle), "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key"))
    server.wait_for_event("serving")
    for _ in range(3):  # plaintext clients on the TLS port, as a port scanner would
        with pytest.raises(grpc.RpcError):
            _health(f"127.0.0.1:{server.port('grpc_port')}")
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(TIMEOUT) == 0, server.log
    assert "Handshake failed" not in server.log
    assert all(line.startswith("time=") for line in server.lines), server.log


def test_a_bracketed_ipv6_host_serves_every_port(serve_process, tiny_bundle):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    server = serve_process("--bundle", str(tiny_bundle), "--host", "[::1]")
    server.wait_for_event("serving")
    assert _health(f"[::1]:{server.port('grpc_port')}") == health_pb2.HealthCheckResponse.SERVING
    with socket.create_connection(("::1", server.port("metrics_port")), timeout=10):
        pass
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(TIMEOUT) == 0


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA, a server certificate for localhost and a client certificate, all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl command (Debian package openssl)")
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=nmtserve test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={'localhost' if name == 'server' else 'client'}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        extensions = d / f"{name}.ext"
        extensions.write_text("subjectAltName=DNS:localhost\n" if name == "server" else "extendedKeyUsage=clientAuth\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "1", "-extfile", str(extensions), "-out", str(d / f"{name}.pem"))
    return d


def _secure_translate(address: str, credentials: grpc.ChannelCredentials) -> pb.TranslateResponse:
    options = (("grpc.ssl_target_name_override", "localhost"),)
    with grpc.secure_channel(address, credentials, options=options) as channel:
        return translator_pb2_grpc.TranslatorStub(channel).Translate(pb.TranslateRequest(texts=["Friday"]), timeout=10)


def test_mutual_tls_on_the_main_port_with_plaintext_health(start_server, certificates):
    d = certificates
    server = start_server(tls_cert=d / "server.pem", tls_key=d / "server.key", tls_client_ca=d / "ca.pem", health_port=0)
    address = server.address
    ca = (d / "ca.pem").read_bytes()
    client = grpc.ssl_channel_credentials(ca, (d / "client.key").read_bytes(), (d / "client.pem").read_bytes())
    assert _secure_translate(address, client).translations
    with pytest.raises(grpc.RpcError) as no_client_certificate:
        _secure_translate(address, grpc.ssl_channel_credentials(ca))
    assert no_client_certificate.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as plaintext:
        _health(address)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _health(f"127.0.0.1:{server.server.health_port}", "nmtserve.v1.Translator") == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("age", [0.0, 1.0])
def test_connections_are_closed_after_the_maximum_age_and_clients_reconnect(start_server, age):
    # Behind a Kubernetes Service a client keeps its connection, and its calls, on the pods it first reached: closing
    # connections by age makes clients resolve again and spread over pods added since.
    server = start_server(max_connection_age_seconds=age, grace_seconds=1)  # the grace after a signal is not the call's
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(server.address) as channel:
        channel.subscribe(states.append)
        stub = translator_pb2_grpc.TranslatorStub(channel)
        with server.paused():  # a call outlasting its connection's age: it finishes on it, it is not cut
            call = stub.Translate.future(pb.TranslateRequest(texts=["Friday"]), timeout=TIMEOUT)
            time.sleep(2.5)
        assert call.result().translations
        time.sleep(3)  # gRPC ages a connection out within ±10% of the maximum, once its calls have ended
        assert stub.Translate(pb.TranslateRequest(texts=["Friday"]), timeout=TIMEOUT).translations  # on a new one
    # A connection the server closes takes the channel from READY to IDLE, and the next call opens another.
    went_idle = [a == grpc.ChannelConnectivity.READY and b == grpc.ChannelConnectivity.IDLE for a, b in zip(states, states[1:])]
    assert any(went_idle) == (age > 0), states


def test_the_server_never_imports_torch():
    code = (
        "import sys\n"
        "import nmtserve_server.serve, nmtserve_server.bench\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=TIMEOUT)
