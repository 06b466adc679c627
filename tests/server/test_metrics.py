"""Prometheus metrics: every name of the issue exists after traffic, moves as the traffic says, and passes promtool."""

from __future__ import annotations

import shutil
import subprocess
import time

import grpc
import pytest

from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc

pytestmark = pytest.mark.e2e
TIMEOUT = 30

FAMILIES = (
    "nmtserve_requests",  # counter: nmtserve_requests_total
    "nmtserve_request_duration_seconds",
    "nmtserve_queue_wait_seconds",
    "nmtserve_time_to_first_token_seconds",
    "nmtserve_input_tokens",
    "nmtserve_output_tokens",
    "nmtserve_active_sequences",
    "nmtserve_queue_depth",
    "nmtserve_decode_step_batch_size",
    "nmtserve_decode_step_duration_seconds",
    "nmtserve_encoder_batch_size",
    "nmtserve_encoder_duration_seconds",
    "nmtserve_first_step_duration_seconds",
    "nmtserve_kv_cache_free_slots",
    "nmtserve_kv_cache_slots",
    "nmtserve_model_info",
)


@pytest.fixture(scope="module")
def traffic(start_server, test_texts):
    """A fresh server, its metrics before and after 3 two-text Translate calls, one stream and one bad call, and the
    seconds those calls took from the first's start to the last's end."""
    server = start_server()
    before = server.scrape()
    started = time.monotonic()
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        responses = [stub.Translate(pb.TranslateRequest(texts=test_texts[i : i + 2]), timeout=TIMEOUT) for i in (0, 2, 4)]
        *_, final = stub.TranslateStream(pb.TranslateStreamRequest(text=test_texts[6]), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError):
            stub.Translate(pb.TranslateRequest(), timeout=TIMEOUT)
        elapsed = time.monotonic() - started
    usages = [r.usage for r in responses] + [final.final.usage]
    return server, before, server.scrape(), usages, elapsed


def test_every_metric_exists_after_traffic(traffic):
    _, _, after, _, _ = traffic
    missing = [name for name in FAMILIES if name not in after.families]
    assert not missing


def test_metrics_move_with_the_traffic(traffic):
    server, before, after, usages, elapsed = traffic

    def delta(name: str, labels: dict[str, str] | None = None) -> float:
        return (after.value(name, labels) or 0.0) - (before.value(name, labels) or 0.0)

    assert delta("nmtserve_requests_total", {"method": "Translate", "code": "OK"}) == 3
    assert delta("nmtserve_requests_total", {"method": "TranslateStream", "code": "OK"}) == 1
    assert delta("nmtserve_requests_total", {"method": "Translate", "code": "INVALID_ARGUMENT"}) == 1
    assert delta("nmtserve_request_duration_seconds_count", {"method": "Translate"}) == 4
    assert delta("nmtserve_input_tokens_total") == sum(u.input_tokens for u in usages)
    assert delta("nmtserve_output_tokens_total") == sum(u.output_tokens for u in usages)
    for histogram in ("nmtserve_queue_wait_seconds", "nmtserve_time_to_first_token_seconds"):
        assert delta(f"{histogram}_count") == 7  # one per text
    assert delta("nmtserve_encoder_batch_size_sum") == 7
    assert delta("nmtserve_encoder_duration_seconds_count") == delta("nmtserve_encoder_batch_size_count") > 0
    assert delta("nmtserve_first_step_duration_seconds_count") == delta("nmtserve_encoder_batch_size_count")
    assert delta("nmtserve_decode_step_duration_seconds_count") == delta("nmtserve_decode_step_batch_size_count") > 0
    assert delta("nmtserve_decode_step_batch_size_sum") >= sum(u.output_tokens for u in usages)  # a row per token and step
    # The latencies' sums: each took some time, and no more than what holds it. The calls ran one after another; a
    # text's queue wait and time to first token end before its call does (each Translate call held two texts, the
    # stream one); the decode process's steps run one after another, as do its encoder runs with their first steps.
    translate, stream = (delta("nmtserve_request_duration_seconds_sum", {"method": m}) for m in ("Translate", "TranslateStream"))
    assert 0 < translate and 0 < stream and translate + stream <= elapsed
    for histogram in ("nmtserve_queue_wait_seconds", "nmtserve_time_to_first_token_seconds"):
        assert 0 < delta(f"{histogram}_sum") <= 2 * translate + stream, histogram
    assert 0 < delta("nmtserve_decode_step_duration_seconds_sum") <= elapsed
    assert 0 < delta("nmtserve_encoder_duration_seconds_sum")
    assert 0 < delta("nmtserve_first_step_duration_seconds_sum")
    assert delta("nmtserve_encoder_duration_seconds_sum") + delta("nmtserve_first_step_duration_seconds_sum") <= elapsed
    max_batch_size = server.server.settings.max_batch_size
    assert after.value("nmtserve_kv_cache_free_slots") == after.value("nmtserve_kv_cache_slots") == max_batch_size
    assert after.value("nmtserve_active_sequences") == after.value("nmtserve_queue_depth") == 0
    info = server.server.service.model.bundle
    assert after.value("nmtserve_model_info", {"version": info.sha256[:12], "precision": "fp32", "device": "cpu"}) == 1
    # The decode process's own CPU time and memory, beside the server process's process_* series.
    assert after.value("nmtserve_decode_process_cpu_seconds_total") > 0
    assert after.value("nmtserve_decode_process_resident_memory_bytes") > 0


def test_every_decoder_step_is_counted(traffic, test_texts):
    """The decode loop reports steps in batches, only when a call has news: none may go uncounted."""
    server, *_ = traffic
    length = 12
    before = server.scrape()
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        options = pb.TranslateOptions(min_length=length, max_length=length)
        stub.Translate(pb.TranslateRequest(texts=test_texts[:1], options=options), timeout=TIMEOUT)
    after = server.scrape()
    for name in ("nmtserve_decode_step_duration_seconds_count", "nmtserve_decode_step_batch_size_sum"):
        # One step of one row per token but the first, which its first step beside the batch made.
        assert after.value(name) - before.value(name) == length - 1


def test_a_text_held_in_the_queue_has_waited_at_least_as_long(traffic, test_texts):
    """A text that arrives while the decode process is paused joins the batch, and has its first token, only after the
    process runs again: its queue wait, its time to first token and its call's duration each cover the hold."""
    server, *_ = traffic
    hold = 0.5
    before = server.scrape()
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        with server.paused():
            sent = time.monotonic()
            call = stub.Translate.future(pb.TranslateRequest(texts=test_texts[:1]), timeout=TIMEOUT)
            # A short request's call is counted, its text read and sent to the decode process in one turn of the event loop.
            server.wait_for(lambda: server.server.service.in_flight == 1, what="the text sent")
            queued = time.monotonic()  # the text arrived before this
            time.sleep(hold)  # the time measured, not a wait for anything: nothing can move until the process resumes
            resumed = time.monotonic()  # it is admitted after this
        response = call.result(TIMEOUT)
        answered = time.monotonic()
    after = server.scrape()
    held = resumed - queued
    assert held >= hold

    def delta(name: str, labels: dict[str, str] | None = None) -> float:
        return (after.value(name, labels) or 0.0) - (before.value(name, labels) or 0.0)

    duration = delta("nmtserve_request_duration_seconds_sum", {"method": "Translate"})
    assert held <= duration <= answered - sent  # the server counts a call before it answers
    for histogram in ("nmtserve_queue_wait_seconds", "nmtserve_time_to_first_token_seconds"):
        assert delta(f"{histogram}_count") == 1
        assert held <= delta(f"{histogram}_sum") <= duration, histogram
    assert held <= response.timings.queue_seconds <= response.timings.total_seconds


def test_time_to_first_token_ends_at_the_first_token(traffic, test_texts):
    """A text decoded to the full length is held after its first token (the decode process paused): its time to first
    token is over before the client has that token, and so does not cover the hold or the rest of the decode."""
    server, *_ = traffic
    hold = 0.5

    def first_piece() -> tuple:
        """The metrics before, when the text was sent, its stream, and when its first piece came."""
        before = server.scrape()
        sent = time.monotonic()  # the text arrives, and the server's clock for it starts, after this
        stream = stub.TranslateStream(pb.TranslateStreamRequest(text=test_texts[0], options=server.long_options()), timeout=TIMEOUT)
        assert next(stream).piece.tokens
        return before, sent, stream, time.monotonic()

    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        with server.paused_mid_decode(  # held with the rest of its decode still to run, however fast that would be
            first_piece, lambda: server.metric("nmtserve_active_sequences") == 1, "the text decoding",
        ) as (before, sent, stream, first):
            time.sleep(hold)  # the time measured, not a wait for anything: nothing moves until the process resumes
        *_, final = stream
        assert final.WhichOneof("event") == "final"
    after = server.scrape()
    assert after.value("nmtserve_time_to_first_token_seconds_count") - before.value("nmtserve_time_to_first_token_seconds_count") == 1
    time_to_first_token = after.value("nmtserve_time_to_first_token_seconds_sum") - before.value("nmtserve_time_to_first_token_seconds_sum")
    assert 0 < time_to_first_token <= first - sent


def test_calls_their_deadline_ended_are_counted_apart_from_those_cancelled(traffic, test_texts):
    """The client's deadline passes just before the server's (which starts on arrival), so its cancellation reaches
    the server first: still DEADLINE_EXCEEDED. A call the client cancels well before its deadline is CANCELLED."""
    server, *_ = traffic
    calls = 8
    before = server.scrape()
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        with server.paused():  # nothing finishes: each call ends by its deadline or its cancellation

            def sent(timeout: float) -> grpc.Future:
                """A call sent once the one before is in the server: none waits for the server to read it, which would start
                the server's deadline later than the slack allows."""
                in_flight = server.server.service.in_flight  # counted, read and sent in one turn of the event loop
                call = stub.Translate.future(pb.TranslateRequest(texts=test_texts[:1]), timeout=timeout)
                server.wait_for(lambda: server.server.service.in_flight > in_flight, what="the text sent")
                return call

            late = [sent(timeout=3.0) for _ in range(calls)]  # all sent well before the first deadline
            cancelled = [sent(timeout=TIMEOUT) for _ in range(calls)]
            for call in cancelled:
                call.cancel()
            assert all(call.exception(TIMEOUT).code() == grpc.StatusCode.DEADLINE_EXCEEDED for call in late)
            server.wait_for(lambda: server.server.service.in_flight == 0, what="the server to end the calls")
    after = server.scrape()
    for code in ("DEADLINE_EXCEEDED", "CANCELLED"):
        labels = {"method": "Translate", "code": code}
        assert (after.value("nmtserve_requests_total", labels) or 0) - (before.value("nmtserve_requests_total", labels) or 0) == calls, code


def test_promtool_check_metrics_is_clean(traffic):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: it comes with Debian's 'prometheus' package (apt-get install prometheus)")
    _, _, after, _, _ = traffic
    result = subprocess.run([promtool, "check", "metrics"], input=after.text, capture_output=True, text=True, timeout=TIMEOUT)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
