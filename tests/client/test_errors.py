"""Each SDK exception is raised for the server condition it names, blocking and asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc
from nmtserve_client import (
    AsyncClient,
    Client,
    ClientClosedError,
    DeadlineExceededError,
    InvalidInputError,
    MessageTooLargeError,
    OverloadedError,
    RequestCancelledError,
    UnavailableError,
)
from nmtserve_client import calls
from nmtserve_client.errors import FieldViolation

pytestmark = pytest.mark.e2e
TIMEOUT = 60
QUICK_RETRIES = dict(initial_backoff=0.05, max_backoff=0.05)


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(beam_size=9), "options.beam_size"),
        (dict(beam_size=2, num_hypotheses=3), "options.num_hypotheses"),
        (dict(min_length=10, max_length=5), "options.min_length"),
        (dict(target_language="xx"), "options.target_language"),
        # Refused before they are sent: the server reads 0 as unset, and would decode with 1.
        (dict(beam_size=-1), "options.beam_size"),
        (dict(beam_size=0), "options.beam_size"),
        (dict(beam_size=4, num_hypotheses=0), "options.num_hypotheses"),
    ],
)
def test_invalid_options_name_the_field(server, options, field):
    with Client(server.address) as client, pytest.raises(InvalidInputError) as caught:
        client.translate(["Friday"], **options)
    assert caught.value.field == field
    if 0 in options.values():
        assert caught.value.message == f"{field}: must be at least 1, not 0" and caught.value.code is None
    assert caught.value.message.startswith(f"{field}: ")
    assert isinstance(caught.value, ValueError)


def test_a_refusal_no_retry_could_change_is_sent_once_in_both_clients(server):
    """INVALID_ARGUMENT: the same request would be refused again, so no client sends it a second time, though each
    may make 5 attempts (max_attempts' default) at a call the server refuses as unavailable or full."""
    beams = dict(beam_size=2, num_hypotheses=3)  # each checked by the server, not the SDK
    lengths = dict(min_length=10, max_length=5)

    async def translate_async() -> None:
        async with AsyncClient(server.address, **QUICK_RETRIES) as client:
            await client.translate(["Friday"], **beams)

    def blocking(call):
        def make() -> None:
            with Client(server.address, **QUICK_RETRIES) as client:
                call(client)
        return make

    refusals = {
        "translate": ("Translate", "options.num_hypotheses", blocking(lambda client: client.translate(["Friday"], **beams))),
        "stream": ("TranslateStream", "options.min_length", blocking(lambda client: list(client.translate_stream("Friday", **lengths)))),
        "async translate": ("Translate", "options.num_hypotheses", lambda: asyncio.run(translate_async())),
    }
    sent = {}  # how many times the server refused each call
    for name, (method, field, call) in refusals.items():
        refused = {"method": method, "code": "INVALID_ARGUMENT"}
        before = server.metric("nmtserve_requests_total", refused)
        with pytest.raises(InvalidInputError) as caught:
            call()
        assert (caught.value.code, caught.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, field), name
        # Exact, with no wait: the service counts a refusal before the client hears of it.
        sent[name] = server.metric("nmtserve_requests_total", refused) - before
    assert sent == dict.fromkeys(refusals, 1)


def test_a_bad_text_is_named_by_its_place_in_the_callers_list(server):
    texts = ["Friday"] * 10 + [" "] + ["Friday"] * 5
    with Client(server.address, texts_per_request=4) as client, pytest.raises(InvalidInputError) as caught:
        client.translate(texts)
    assert caught.value.violations == [FieldViolation("texts[10]", "empty text")]
    assert caught.value.message == "texts[10]: empty text" and caught.value.request_id

    async def main():
        async with AsyncClient(server.address, texts_per_request=4) as client:
            await client.translate(texts)

    with pytest.raises(InvalidInputError) as caught:
        asyncio.run(main())
    assert caught.value.field == "texts[10]"
    with Client(server.address) as client, pytest.raises(InvalidInputError) as caught:
        list(client.translate_stream("Friday " * 400))
    assert caught.value.field == "text" and "tokens, the model reads at most" in caught.value.violations[0].description


# A client where googleapis-common-protos is not installed (the client extra is grpcio and protobuf only): google.rpc
# cannot be imported. It prints the violations of a call refused for two fields.
WITHOUT_GOOGLE_RPC = """
import json
import sys

sys.modules["google.rpc"] = None  # every import of it, and of what is in it, raises ImportError
from nmtserve_client import Client, InvalidInputError, errors

assert errors.status_pb2 is None, "google.rpc was imported"
with Client(sys.argv[1]) as client:
    try:
        client.translate(["Friday", ""], beam_size=2, num_hypotheses=3)
    except InvalidInputError as error:
        print(json.dumps([[violation.field, violation.description] for violation in error.violations]))
"""


def test_violations_are_read_from_the_message_without_googleapis_common_protos(server):
    with Client(server.address) as client, pytest.raises(InvalidInputError) as caught:  # from the BadRequest detail
        client.translate(["Friday", ""], beam_size=2, num_hypotheses=3)
    from_the_detail = [[violation.field, violation.description] for violation in caught.value.violations]
    assert from_the_detail == [["options.num_hypotheses", "3 is above beam_size 2"], ["texts[1]", "empty text"]]
    without = subprocess.run([sys.executable, "-c", WITHOUT_GOOGLE_RPC, server.address], capture_output=True, text=True, timeout=TIMEOUT)
    assert without.returncode == 0, without.stderr
    assert json.loads(without.stdout) == from_the_detail


@contextlib.contextmanager
def _full_queue(server, texts: list[str]) -> Iterator[None]:
    """Every row taken by one text and the queue full behind it, for as long as the block runs (it must be short)."""
    beam = server.long_options(beam_size=4)  # a text takes every row: the queue empties one text per whole decode
    with grpc.insecure_channel(server.address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        # Paused, the decode process can neither finish the busy text nor admit a queued one, however slow the block;
        # the server queues texts without it, so the queue fills inside the pause.
        with server.paused_mid_decode(
            lambda: [stub.Translate.future(pb.TranslateRequest(texts=texts[:1], options=beam), timeout=TIMEOUT)],
            lambda: server.metric("nmtserve_kv_cache_free_slots") == 0, "all rows taken",
        ) as (busy,):
            queued = stub.Translate.future(pb.TranslateRequest(texts=texts[1:5], options=beam), timeout=TIMEOUT)
            server.wait_for(lambda: server.metric("nmtserve_queue_depth") == 4, what="a full queue")
            yield
            assert not queued.done(), "the queue emptied during the test; it proves nothing"
        busy.cancel()
        queued.cancel()
    server.wait_for(lambda: server.metric("nmtserve_kv_cache_free_slots") == 4 and server.metric("nmtserve_queue_depth") == 0,
                    what="rows and queue free again")


def test_a_full_queue_is_overloaded_after_exactly_the_retry_budget(start_server, test_texts):
    server = start_server(max_batch_size=4, max_queue_size=4, max_texts_per_request=4)
    refused = {"method": "Translate", "code": "RESOURCE_EXHAUSTED"}
    with _full_queue(server, test_texts), Client(server.address, max_attempts=1) as client, pytest.raises(OverloadedError) as once:
        client.translate(test_texts[5:9])  # 4 texts: refused while any text waits
    # The server counts a call just after answering it: wait for the count rather than race it.
    server.wait_for(lambda: server.metric("nmtserve_requests_total", refused) == 1, timeout=5, what="one refusal")
    assert once.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with _full_queue(server, test_texts), Client(server.address, max_attempts=3, **QUICK_RETRIES) as client, pytest.raises(OverloadedError):
        client.translate(test_texts[5:9])
    server.wait_for(lambda: server.metric("nmtserve_requests_total", refused) == 1 + 3, timeout=5, what="three more refusals")

    async def main():
        async with AsyncClient(server.address, max_attempts=3, **QUICK_RETRIES) as client:
            await client.translate(test_texts[5:9])

    with _full_queue(server, test_texts), pytest.raises(OverloadedError):
        asyncio.run(main())
    server.wait_for(lambda: server.metric("nmtserve_requests_total", refused) == 1 + 3 + 3, timeout=5, what="three async refusals")
    refused_streams = {"method": "TranslateStream", "code": "RESOURCE_EXHAUSTED"}
    with _full_queue(server, test_texts), Client(server.address, max_attempts=3, **QUICK_RETRIES) as client, pytest.raises(OverloadedError):
        list(client.translate_stream(test_texts[5]))
    server.wait_for(lambda: server.metric("nmtserve_requests_total", refused_streams) == 3, timeout=5, what="three stream refusals")


def test_a_call_fails_with_its_first_failed_requests_error_in_both_clients(start_server, test_texts):
    """The first request is refused by a full queue after its retries; the second, with an empty text, at once: both
    clients raise the first request's error, as they return results, in order."""
    server = start_server(max_batch_size=4, max_queue_size=4, max_texts_per_request=4)
    texts = test_texts[5:9] + [" "] + test_texts[9:12]
    settings = dict(max_attempts=3, texts_per_request=4, max_concurrent_requests=2, **QUICK_RETRIES)

    async def main():
        async with AsyncClient(server.address, **settings) as client:
            await client.translate(texts)

    with _full_queue(server, test_texts), Client(server.address, **settings) as client, pytest.raises(OverloadedError):
        client.translate(texts)
    with _full_queue(server, test_texts), pytest.raises(OverloadedError):
        asyncio.run(main())


BACK_OFF = 5.0


@pytest.mark.parametrize("ending", ["close the client", "cancel the stream"])
def test_a_back_off_ends_at_once_when_the_call_is_ended(ending, start_server, test_texts, monkeypatch):
    """A call waiting to send again after a full server's refusal ends as soon as its client closes (or, for a stream,
    its cancel() comes), not when its back-off would have."""
    server = start_server(max_batch_size=4, max_queue_size=4, max_texts_per_request=4)
    monkeypatch.setattr(calls.random, "uniform", lambda low, high: high)  # every back-off its longest
    slow = dict(max_attempts=5, initial_backoff=BACK_OFF, max_backoff=BACK_OFF)
    streaming = ending == "cancel the stream"
    refused = {"method": "TranslateStream" if streaming else "Translate", "code": "RESOURCE_EXHAUSTED"}
    error, says = (RequestCancelledError, "the stream was cancelled") if streaming else (ClientClosedError, "the client was closed")

    with _full_queue(server, test_texts), ThreadPoolExecutor(1) as pool:
        client = Client(server.address, **slow)
        if streaming:
            stream = client.translate_stream(test_texts[5])
            running, end = pool.submit(list, stream), stream.cancel
        else:
            running, end = pool.submit(client.translate, test_texts[5:9]), client.close
        server.wait_for(lambda: server.metric("nmtserve_requests_total", refused) >= 1, timeout=5, what="the first refusal")
        ended = time.monotonic()
        end()
        with pytest.raises(error, match=says):
            running.result(TIMEOUT)
        assert time.monotonic() - ended < BACK_OFF / 2, "slept out the back-off"
        client.close()

    async def main() -> float:
        async with AsyncClient(server.address, **slow) as client:
            if streaming:
                stream = client.translate_stream(test_texts[5])
                running, end = asyncio.create_task(anext(stream)), stream.cancel
            else:
                running, end = asyncio.create_task(client.translate(test_texts[5:9])), client.close
            deadline = time.monotonic() + 5
            while server.metric("nmtserve_requests_total", refused) < 2:
                assert time.monotonic() < deadline, "no refusal"
                await asyncio.sleep(0.01)
            ended = time.monotonic()
            if inspect.isawaitable(closing := end()):
                await closing
            with pytest.raises(error, match=says):
                await running
            return time.monotonic() - ended

    with _full_queue(server, test_texts):
        assert asyncio.run(main()) < BACK_OFF / 2, "slept out the back-off"
    if streaming:
        assert server.metric("nmtserve_requests_total", refused) == 2, "a cancelled stream was started again"


def test_a_stream_cancelled_after_its_refusal_arrived_reads_as_cancelled(start_server, test_texts):
    """A refusal already received when cancel() comes does not outrun it: the read says the stream was cancelled."""
    server = start_server(max_batch_size=4, max_queue_size=4, max_texts_per_request=4)
    refused = {"method": "TranslateStream", "code": "RESOURCE_EXHAUSTED"}
    with _full_queue(server, test_texts), Client(server.address, max_attempts=5) as client:
        stream = client.translate_stream(test_texts[5])  # the call starts now; nothing reads it yet
        # The refusal has reached the client's channel, which takes in a call's status without a reader: the gRPC call
        # under the stream (the SDK's own, private) is done. Only then does cancel() come after it.
        server.wait_for(lambda: stream._call.done(), timeout=5, what="the refusal at the client")
        assert stream._call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stream.cancel()
        with pytest.raises(RequestCancelledError, match="the stream was cancelled"):
            next(stream)
    assert server.metric("nmtserve_requests_total", refused) == 1, "a cancelled stream was started again"


def test_a_request_above_the_message_limit_fails_at_once_and_says_so(start_server, monkeypatch):
    server = start_server(max_message_bytes=4096)
    text = "Friday " * 1000  # 7,000 bytes: gRPC refuses the message before the service sees it
    # Every back-off its longest: a single retry would wait 10 s, far beyond the bound below however busy the machine.
    monkeypatch.setattr(calls.random, "uniform", lambda low, high: high)
    slow = dict(max_attempts=5, initial_backoff=10.0, max_backoff=10.0)

    async def main():
        async with AsyncClient(server.address, **slow) as client:
            await client.translate([text])

    with Client(server.address, **slow) as client:
        for call in (lambda: client.translate([text]), lambda: list(client.translate_stream(text)), lambda: asyncio.run(main())):
            started = time.monotonic()
            with pytest.raises(MessageTooLargeError) as caught:
                call()
            assert time.monotonic() - started < 5.0, "retried"
            assert isinstance(caught.value, InvalidInputError) and "send fewer or shorter texts" in caught.value.message
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_passed_deadline_is_deadline_exceeded(server, test_texts):
    long = dict(beam_size=4, min_length=server.long_options().min_length)

    async def main():
        async with AsyncClient(server.address, timeout=0.05) as client:
            await client.translate(test_texts[:8], **long)

    # With the decode process paused, however fast the machine: a tiny model's whole greedy stream once took under 50 ms.
    with Client(server.address) as client, server.paused():
        with pytest.raises(DeadlineExceededError) as caught:
            client.translate(test_texts[:8], timeout=0.05, **long)
        assert isinstance(caught.value, TimeoutError)
        with pytest.raises(DeadlineExceededError):
            list(client.translate_stream(test_texts[0], min_length=long["min_length"], timeout=0.05))
        with pytest.raises(DeadlineExceededError):
            asyncio.run(main())


def test_errors_carry_the_request_id_the_call_was_sent_with(server, test_texts):
    long = dict(min_length=server.long_options().min_length)

    async def main():
        async with AsyncClient(server.address, timeout=0.05) as client:
            await client.translate(test_texts[:1], request_id="late-async", **long)

    with Client(server.address) as client:
        with pytest.raises(InvalidInputError) as refused:  # the server's refusal, which names the id it logged
            client.translate(["Friday", " "], request_id="refused-1")
        assert refused.value.request_id == "refused-1"
        # The call's own deadline, with no answer from the server (its decode process paused) to name an id.
        with server.paused():
            with pytest.raises(DeadlineExceededError) as late:
                client.translate(test_texts[:1], timeout=0.05, request_id="late-1", **long)
            assert late.value.request_id == "late-1"
            with pytest.raises(DeadlineExceededError) as late:
                list(client.translate_stream(test_texts[0], timeout=0.05, request_id="late-2", **long))
            assert late.value.request_id == "late-2"
            with pytest.raises(DeadlineExceededError) as late:
                asyncio.run(main())
            assert late.value.request_id == "late-async"
    with Client("127.0.0.1:1", max_attempts=1) as client:  # nothing listens there: no server to name an id
        with pytest.raises(UnavailableError) as unreached:
            client.model_info(request_id="unreached-1")
        assert unreached.value.request_id == "unreached-1"

    async def closed_async() -> None:
        client = AsyncClient(server.address)
        await client.close()
        await client.translate(["Friday"], request_id="closed-async")

    # A closed client's refusal, every call.
    client = Client(server.address)
    client.close()
    for name, call in {"closed-translate": client.translate, "closed-stream": client.translate_stream}.items():
        with pytest.raises(ClientClosedError) as closed:
            call(["Friday"] if name == "closed-translate" else "Friday", request_id=name)
        assert closed.value.request_id == name
    with pytest.raises(ClientClosedError) as closed:
        asyncio.run(closed_async())
    assert closed.value.request_id == "closed-async"


def test_a_stopped_server_is_unavailable(start_server):
    server = start_server()
    address = server.address
    server.stop()
    with Client(address, max_attempts=2, **QUICK_RETRIES) as client:
        for call in (lambda: client.translate(["Friday"]), client.model_info, client.health, lambda: list(client.translate_stream("Friday"))):
            with pytest.raises(UnavailableError):
                call()
        with pytest.raises(UnavailableError, match="was not serving after 0.3 s"):
            client.wait_until_serving(timeout=0.3)

    async def main():
        async with AsyncClient(address, max_attempts=2, **QUICK_RETRIES) as client:
            await client.translate(["Friday"])

    with pytest.raises(UnavailableError):
        asyncio.run(main())


def test_a_stream_cancelled_from_another_thread_is_request_cancelled(server, test_texts):
    with Client(server.address) as client:
        stream = client.translate_stream(test_texts[0], min_length=server.long_options().min_length)
        assert next(stream).tokens
        threading.Thread(target=stream.cancel).start()
        with pytest.raises(RequestCancelledError) as caught:
            for _ in stream:
                pass
    assert caught.value.code == grpc.StatusCode.CANCELLED
