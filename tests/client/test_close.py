"""Closing a client while its calls are in flight, blocking and asyncio: each call raises RequestCancelledError saying so."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from nmtserve_client import AsyncClient, AsyncTranslationStream, Client, ClientClosedError, Piece, RequestCancelledError

pytestmark = pytest.mark.e2e
TIMEOUT = 60
CLOSED = "the client was closed"


def _decoding(server) -> Callable[[], bool]:
    return lambda: server.metric("nmtserve_active_sequences") > 0


def _idle(server) -> Callable[[], bool]:
    return lambda: server.metric("nmtserve_active_sequences") == 0 and server.metric("nmtserve_queue_depth") == 0


async def _until(condition: Callable[[], bool], what: str) -> None:
    """wait_for without blocking the event loop, which sends the asyncio client's calls."""
    end = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def _read_all(stream: AsyncTranslationStream) -> list[Piece]:
    return [piece async for piece in stream]


def _said_closed(error: RequestCancelledError) -> None:
    assert isinstance(error, ClientClosedError) and error.message == CLOSED and error.code == grpc.StatusCode.CANCELLED


def test_closing_a_client_ends_its_calls_in_flight_as_closed(server, test_texts):
    long = dict(min_length=server.long_options().min_length, timeout=TIMEOUT)
    server.wait_for(_idle(server), what="an idle server")
    client = Client(server.address, texts_per_request=8, max_concurrent_requests=2)
    with ThreadPoolExecutor(1) as pool:
        translating = pool.submit(client.translate, test_texts[:64], beam_size=4, **long)  # 8 requests of long decodes
        server.wait_for(_decoding(server), what="the translation decoding")
        with server.paused():  # however slow the machine, the translation is still decoding when the client closes
            client.close()
            with pytest.raises(RequestCancelledError) as translate_error:
                translating.result(TIMEOUT)
        server.wait_for(_idle(server), timeout=10, what="the translation's rows freed")

        client = Client(server.address)
        stream = client.translate_stream(test_texts[0], **long)
        assert next(stream).tokens
        with server.paused():
            reading = pool.submit(list, stream)  # waits for each piece in turn until close() ends it
            client.close()
            with pytest.raises(RequestCancelledError) as stream_error:
                reading.result(TIMEOUT)
    _said_closed(translate_error.value)
    _said_closed(stream_error.value)
    # A call begun after close(), or a stream read after it, is refused the same way, not with gRPC's ValueError.
    for call in (lambda: client.translate(["Friday"]), lambda: client.translate([]), lambda: client.translate_stream("Friday"),
                 client.model_info, client.health, lambda: next(stream)):
        with pytest.raises(RequestCancelledError) as caught:
            call()
        _said_closed(caught.value)


def test_closing_an_async_client_ends_its_calls_in_flight_as_closed(server, test_texts):
    long = dict(min_length=server.long_options().min_length, timeout=TIMEOUT)
    server.wait_for(_idle(server), what="an idle server")

    async def main() -> None:
        client = AsyncClient(server.address, texts_per_request=8, max_concurrent_requests=2)
        translating = asyncio.create_task(client.translate(test_texts[:64], beam_size=4, **long))
        await _until(_decoding(server), "the translation decoding")
        with server.paused():  # however slow the machine, the translation is still decoding when the client closes
            await client.close()
            with pytest.raises(RequestCancelledError) as caught:  # not CancelledError: the task was not cancelled
                await translating
        _said_closed(caught.value)
        await _until(_idle(server), "the translation's rows freed")

        client = AsyncClient(server.address)
        stream = client.translate_stream(test_texts[0], **long)
        assert (await anext(stream)).tokens
        with server.paused():
            reading = asyncio.create_task(_read_all(stream))  # waits for each piece in turn until close() ends it
            await asyncio.sleep(0)
            await client.close()
            with pytest.raises(RequestCancelledError) as caught:
                await reading
        _said_closed(caught.value)
        for call in (lambda: client.translate(["Friday"]), lambda: client.translate([]), client.model_info, client.health,
                     lambda: anext(stream)):
            with pytest.raises(RequestCancelledError) as caught:
                await call()
            _said_closed(caught.value)
        with pytest.raises(RequestCancelledError) as caught:
            client.translate_stream("Friday")
        _said_closed(caught.value)

        # A task cancelled as its client closes stays cancelled, as TaskGroup and asyncio.timeout expect.
        await _until(_idle(server), "the stream's row freed")
        client = AsyncClient(server.address)
        translating = asyncio.create_task(client.translate(test_texts[:8], **long))
        await _until(_decoding(server), "the translation decoding")
        translating.cancel()
        await client.close()
        with pytest.raises(asyncio.CancelledError):
            await translating

    asyncio.run(asyncio.wait_for(main(), 3 * TIMEOUT))
