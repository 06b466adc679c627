"""The decode loop through the real server: batching changes nothing, continuous batching, queue limits, leaving early."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc
from nmtserve_server.decode_loop import REPORT_STEPS

pytestmark = pytest.mark.e2e
TIMEOUT = 60  # seconds, per call


def _stub(server) -> tuple[grpc.Channel, translator_pb2_grpc.TranslatorStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, translator_pb2_grpc.TranslatorStub(channel)


def _bucket(server, name: str, le: float) -> float:
    return server.metric(f"{name}_bucket", {"le": str(float(le))})


def test_64_concurrent_requests_equal_the_same_requests_one_at_a_time(server, stub, test_texts):
    requests = [
        pb.TranslateRequest(texts=[text], options=pb.TranslateOptions(beam_size=1 + i % 3, num_hypotheses=1 + i % 3))
        for i, text in enumerate(test_texts[:64])
    ]
    alone = [stub.Translate(r, timeout=TIMEOUT) for r in requests]
    steps_before = server.metric("nmtserve_decode_step_batch_size_count")
    wide_before = steps_before - _bucket(server, "nmtserve_decode_step_batch_size", 8)
    futures = [stub.Translate.future(r, timeout=TIMEOUT) for r in requests]
    together = [f.result() for f in futures]
    for a, t in zip(alone, together):
        assert [(list(h.tokens), h.text) for h in a.translations[0].hypotheses] == [
            (list(h.tokens), h.text) for h in t.translations[0].hypotheses
        ]
    wide = server.metric("nmtserve_decode_step_batch_size_count") - _bucket(server, "nmtserve_decode_step_batch_size", 8)
    assert wide > wide_before, "the concurrent requests were never decoded more than 8 rows at a time"


def test_a_short_request_joins_the_running_batch_and_finishes_first(start_server, test_texts):
    server = start_server()
    channel, stub = _stub(server)
    with channel:
        finished: list[str] = []  # in the order the answers came, whenever the test's own thread gets to look
        # The short text arrives while the long ones are mid-decode, however fast they run.
        with server.paused_mid_decode(
            lambda: [stub.Translate.future(pb.TranslateRequest(texts=[t], options=server.long_options()), timeout=TIMEOUT) for t in test_texts[:8]],
            lambda: server.metric("nmtserve_active_sequences") == 8, "8 long texts decoding",
        ) as long:
            for f in long:
                f.add_done_callback(lambda _: finished.append("long"))
            joined_before = _bucket(server, "nmtserve_decode_step_batch_size", 16) - _bucket(server, "nmtserve_decode_step_batch_size", 8)
            pending = stub.Translate.future(pb.TranslateRequest(texts=[test_texts[9]], options=pb.TranslateOptions(max_length=3)), timeout=TIMEOUT)
            pending.add_done_callback(lambda _: finished.append("short"))
            # A short request's call is counted, its text read and sent to the decode process in one turn of the event loop.
            server.wait_for(lambda: server.server.service.in_flight == 9, what="the short text sent")
        short = pending.result()
        assert len(short.translations[0].hypotheses[0].tokens) <= 3
        joined = _bucket(server, "nmtserve_decode_step_batch_size", 16) - _bucket(server, "nmtserve_decode_step_batch_size", 8)
        assert joined > joined_before, "no decoder step ran the short text together with the 8 long ones"
        limit = server.server.service.model.max_target_length
        assert all(len(f.result().translations[0].hypotheses[0].tokens) == limit for f in long)
        server.wait_for(lambda: len(finished) == 9, timeout=5, what="every answer's callback")
        assert finished[0] == "short", "a long translation finished before the short one"


def test_queue_full_rejects_exactly_the_overflow(start_server, test_texts):
    server = start_server(max_batch_size=4, max_queue_size=4)
    channel, stub = _stub(server)
    with channel:
        with server.paused_mid_decode(  # the loop stays busy through the burst
            lambda: [stub.Translate.future(pb.TranslateRequest(texts=[test_texts[0]], options=server.long_options(beam_size=4)), timeout=TIMEOUT)],
            lambda: server.metric("nmtserve_kv_cache_free_slots") == 0, "all rows taken",
        ) as (busy,):
            burst = [stub.Translate.future(pb.TranslateRequest(texts=[t], options=pb.TranslateOptions(max_length=2)), timeout=TIMEOUT)
                     for t in test_texts[1:8]]
            server.wait_for(lambda: sum(f.done() for f in burst) >= 3, what="the overflow's answers")
            assert server.metric("nmtserve_queue_depth") == 4 and sum(f.done() for f in burst) == 3
        codes = [f.exception().code() if f.exception() else grpc.StatusCode.OK for f in burst]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 3
        assert codes.count(grpc.StatusCode.OK) == 4
        assert busy.result().translations
    assert server.metric("nmtserve_requests_total", {"method": "Translate", "code": "RESOURCE_EXHAUSTED"}) == 3


def test_texts_that_fit_in_free_rows_take_no_place_in_the_queue(start_server, test_texts):
    """The queue bounds the texts waiting for rows: a burst that free rows take at once is not refused as queue full,
    however fast it comes (it is sent to the decode process before the process can report any text admitted)."""
    server = start_server(max_batch_size=24, max_queue_size=8, max_texts_per_request=8, max_queue_delay_ms=0)
    channel, stub = _stub(server)
    with channel:
        requests = [pb.TranslateRequest(texts=test_texts[i : i + 8], options=pb.TranslateOptions(max_length=2)) for i in (0, 8, 16)]
        burst = [stub.Translate.future(r, timeout=TIMEOUT) for r in requests]
        assert all(len(f.result().translations) == 8 for f in burst)
        # One more burst than the rows and the queue hold between them: the last request's 8 texts are refused.
        with server.paused_mid_decode(
            lambda: [stub.Translate.future(pb.TranslateRequest(texts=test_texts[i : i + 8], options=server.long_options()), timeout=TIMEOUT)
                     for i in (0, 8, 16)],
            lambda: server.metric("nmtserve_kv_cache_free_slots") == 0, "all rows taken",
        ) as busy:
            queued = stub.Translate.future(pb.TranslateRequest(texts=test_texts[24:32], options=pb.TranslateOptions(max_length=2)), timeout=TIMEOUT)
            server.wait_for(lambda: server.metric("nmtserve_queue_depth") == 8, what="8 texts waiting")
            with pytest.raises(grpc.RpcError) as refused:
                stub.Translate(pb.TranslateRequest(texts=test_texts[32:33]), timeout=TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details().startswith("queue full: 8 of 8 places taken, 1 needed")
        assert all(len(f.result().translations) == 8 for f in busy) and len(queued.result().translations) == 8
    assert server.metric("nmtserve_requests_total", {"method": "Translate", "code": "RESOURCE_EXHAUSTED"}) == 1


def test_calls_beyond_max_concurrent_rpcs_are_refused_by_name_and_counted(start_server, test_texts):
    server = start_server(max_concurrent_rpcs=2)
    channel, stub = _stub(server)
    with channel:
        with server.paused_mid_decode(  # both calls stay in flight while the third comes
            lambda: [stub.Translate.future(pb.TranslateRequest(texts=[t], options=server.long_options()), timeout=TIMEOUT) for t in test_texts[:2]],
            lambda: server.metric("nmtserve_active_sequences") == 2, "2 long texts decoding",
        ) as busy:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Translate(pb.TranslateRequest(texts=[test_texts[2]]), timeout=TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent-rpcs" in refused.value.details()
        assert all(f.result().translations for f in busy)
        stub.Translate(pb.TranslateRequest(texts=[test_texts[2]]), timeout=TIMEOUT)  # room again
    assert server.metric("nmtserve_requests_total", {"method": "Translate", "code": "RESOURCE_EXHAUSTED"}) == 1


def test_a_beam_takes_beam_size_rows(start_server, test_texts):
    server = start_server(max_batch_size=8)
    channel, stub = _stub(server)
    with channel:
        with server.paused_mid_decode(  # the gauges are read one after another: nothing may finish in between
            lambda: stub.Translate.future(
                pb.TranslateRequest(texts=test_texts[:4], options=server.long_options(beam_size=4)), timeout=TIMEOUT),
            lambda: server.metric("nmtserve_active_sequences") == 2, "two beams decoding",
        ) as four:
            assert server.metric("nmtserve_kv_cache_free_slots") == 0
            assert server.metric("nmtserve_queue_depth") == 2
        assert len(four.result().translations) == 4


def test_idle_arrivals_share_an_encoder_run(start_server, test_texts):
    # An idle loop's intake gathers arrivals until the batch's rows are spoken for or the delay ends: here the 16th
    # text fills the rows long before a delay no machine's arrivals would outlast.
    server = start_server(max_batch_size=16, max_queue_delay_ms=20_000)
    channel, stub = _stub(server)
    with channel:
        started = time.monotonic()
        futures = [stub.Translate.future(pb.TranslateRequest(texts=[t]), timeout=TIMEOUT) for t in test_texts[:16]]
        assert all(f.result().translations for f in futures)
        assert time.monotonic() - started < 15, "the intake waited out the delay with the rows already spoken for"
    assert server.metric("nmtserve_encoder_batch_size_sum") == 16
    assert server.metric("nmtserve_encoder_batch_size_count") == 1


def _steps(server) -> float:
    """Decoder steps the server has heard of."""
    return server.metric("nmtserve_decode_step_duration_seconds_count")


# Steps the decode process may have run before a pause without having reported them yet: it reports the step metrics at
# least every REPORT_STEPS steps (and the step in progress at the pause is not reported either).
REPORT_LAG = REPORT_STEPS
# Steps the loop's thread may run after the pause before its intake thread, woken at the same time, has read the
# withdrawal from the pipe: on a loaded 2-core machine the intake waits for a core (9 steps seen in CI).
INTAKE_LAG = 16


def _left_at_the_next_step(server, started_at: float, withdrawn_at: float) -> None:
    """A text withdrawn while the decode process was paused (the server had heard of `withdrawn_at` steps then) left the
    batch at the next step: its rows came free within the steps not yet reported at the pause and the few the loop ran
    before its intake had read the withdrawal, where decoding on would have taken the rest of its fixed length."""
    server.wait_for(lambda: _all_rows_free(server), timeout=10, what="the rows to be freed")
    remaining = server.server.service.model.max_target_length - (withdrawn_at - started_at)  # at least, by the reports
    assert remaining > 2 * REPORT_LAG + INTAKE_LAG, "the text was nearly done when withdrawn; the test proves nothing"
    after = _steps(server) - withdrawn_at  # decoding on: at least remaining - REPORT_LAG > REPORT_LAG + INTAKE_LAG
    assert after <= REPORT_LAG + INTAKE_LAG, f"{after} steps after the text was withdrawn: it did not leave at the next step"


def _all_rows_free(server) -> bool:
    return (
        server.metric("nmtserve_kv_cache_free_slots") == server.server.settings.max_batch_size
        and server.metric("nmtserve_active_sequences") == 0
    )


def test_deadline_mid_decode_frees_the_rows(start_server, test_texts):
    server = start_server(max_batch_size=8)
    channel, stub = _stub(server)
    request = pb.TranslateRequest(texts=[test_texts[0]], options=server.long_options(beam_size=4))
    with channel:
        for _ in range(3):  # a decode that ends between the test seeing it and pausing it is tried again
            started_at = _steps(server)
            late = stub.Translate.future(request, timeout=2.0)
            server.wait_for(lambda: server.metric("nmtserve_kv_cache_free_slots") <= 4 or late.done(), what="the text decoding")
            with server.paused():  # held mid-decode, so the deadline passes during it however fast the machine
                server.reports_read()
                if not late.done() and server.metric("nmtserve_kv_cache_free_slots") == 4:
                    assert late.exception(timeout=TIMEOUT).code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    withdrawn_at = _steps(server)
                    break
            late.exception(timeout=TIMEOUT)
        else:
            pytest.fail("the text finished each time before the decode process was paused")
        _left_at_the_next_step(server, started_at, withdrawn_at)
        assert stub.Translate(pb.TranslateRequest(texts=[test_texts[1]]), timeout=TIMEOUT).translations  # still serving


def test_a_lost_decode_process_fails_every_text_and_clears_the_batch_gauges(start_server, test_texts):
    server = start_server(max_batch_size=2)
    channel, stub = _stub(server)
    with channel:
        call = stub.Translate.future(pb.TranslateRequest(texts=test_texts[:5], options=server.long_options()), timeout=TIMEOUT)
        server.wait_for(lambda: server.metric("nmtserve_active_sequences") == 2 and server.metric("nmtserve_queue_depth") == 3,
                        what="two texts decoding and three queued")
        os.kill(server.server.scheduler.decode_pid, signal.SIGKILL)
        assert call.exception(timeout=TIMEOUT).code() == grpc.StatusCode.UNAVAILABLE
        # No longer serving: health says so, and a new call is refused as retryable.
        health = health_pb2_grpc.HealthStub(channel)
        server.wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                        == health_pb2.HealthCheckResponse.NOT_SERVING, what="health NOT_SERVING")
        with pytest.raises(grpc.RpcError) as refused:
            stub.Translate(pb.TranslateRequest(texts=[test_texts[0]]), timeout=TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # Nothing is decoding, waiting or holding a row any more, and the gauges say so (they kept the last report's values before).
    server.wait_for(lambda: server.metric("nmtserve_active_sequences") == 0 and server.metric("nmtserve_queue_depth") == 0
                    and _all_rows_free(server), timeout=10, what="the gauges to clear")


def _cancelled(server, method: str) -> float:
    return server.metric("nmtserve_requests_total", {"method": method, "code": "CANCELLED"})


def test_cancelled_stream_and_call_free_the_rows(start_server, test_texts):
    server = start_server(max_batch_size=8)
    channel, stub = _stub(server)
    with channel:
        started_at: list[float] = []  # the step count when each attempt of paused_mid_decode started its text
        with server.paused_mid_decode(  # cancelled mid-decode, however fast the rest of it would run
            lambda: started_at.append(_steps(server)) or [
                stub.TranslateStream(pb.TranslateStreamRequest(text=test_texts[0], options=server.long_options()), timeout=TIMEOUT)],
            lambda: server.metric("nmtserve_active_sequences") == 1, "the stream decoding",
        ) as (stream,):
            assert next(stream).piece.tokens
            withdrawn_at = _steps(server)
            stream.cancel()
            server.wait_for(lambda: _cancelled(server, "TranslateStream") == 1, timeout=10, what="the stream counted as cancelled")
        _left_at_the_next_step(server, started_at[-1], withdrawn_at)
        with server.paused_mid_decode(
            lambda: started_at.append(_steps(server)) or [stub.Translate.future(
                pb.TranslateRequest(texts=[test_texts[1]], options=server.long_options(beam_size=4)), timeout=TIMEOUT)],
            lambda: server.metric("nmtserve_kv_cache_free_slots") == 4, "the text decoding",
        ) as (call,):
            withdrawn_at = _steps(server)
            call.cancel()
            server.wait_for(lambda: _cancelled(server, "Translate") == 1, timeout=10, what="the call counted as cancelled")
        _left_at_the_next_step(server, started_at[-1], withdrawn_at)


def test_the_server_answers_while_the_decode_loop_reads_nothing(start_server, test_texts):
    """Requests that fill the pipe to a decode loop that is not reading it (here: stopped) wait in the server; its
    event loop never blocks on the pipe, so it keeps answering, and the loop takes them all once it reads again."""
    server = start_server(max_queue_size=1024)
    model = server.server.service.model
    words = " ".join(test_texts).split()
    while len(model.encode_texts([" ".join(words)])[0]) > model.max_source_length - 1:  # room for a language token
        words = words[: len(words) * 9 // 10]
    texts = [" ".join(words)] * server.server.settings.max_texts_per_request
    request = pb.TranslateRequest(texts=texts, options=pb.TranslateOptions(max_length=2))
    channel, stub = _stub(server)
    with channel:
        with server.paused():
            calls = [stub.Translate.future(request, timeout=TIMEOUT) for _ in range(8)]
            beyond_the_rows = 8 * len(texts) - server.server.settings.max_batch_size
            server.wait_for(lambda: server.metric("nmtserve_queue_depth") == beyond_the_rows, what="every text queued")
            assert server.server.scheduler.pending_bytes > 0, "the requests did not fill the pipe"
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).name
        assert all(len(call.result().translations) == len(texts) for call in calls)
