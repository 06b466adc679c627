"""The asyncio client (grpc.aio): the same methods as Client, awaited: `await AsyncClient(...).translate([...])`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import grpc

from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc

from .calls import (
    HEALTH_CHECK, Closing, Deadline, HealthCheckRequest, HealthCheckResponse, Retries, StreamCall, check_text, chunks, client_settings,
    request_metadata, sent_with, task_cancelling, text_list, translate_options,
)
from .channel import SERVICE_NAME, ClientSettings, channel_options, credentials
from .client import POLL_SECONDS, Client, not_serving
from .errors import DeadlineExceededError, UnavailableError, from_rpc_error
from .results import HealthStatus, ModelInfo, Piece, Translation, model_info_from, piece_from, translations_from

F = TypeVar("F", bound=Callable[..., Any])


def _documented_as(method: Callable[..., Any]) -> Callable[[F], F]:
    """Give an AsyncClient method the docstring of its Client twin: one text for both."""

    def decorate(function: F) -> F:
        function.__doc__ = method.__doc__
        return function

    return decorate


class AsyncTranslationStream(StreamCall):
    """The pieces of one translate_stream call, as they are decoded: `async for piece in stream`; iterate once.
    Cancelling a task that waits for a piece cancels the stream: a later read raises RequestCancelledError."""

    def __aiter__(self) -> AsyncIterator[Piece]:
        return self

    async def __anext__(self) -> Piece:
        with sent_with(self._request_id), self._closing.calls():
            while True:
                try:
                    message = await self._call.read()
                    break
                except grpc.RpcError as error:
                    delay = self._after(error)
                except asyncio.CancelledError:
                    if task_cancelling():  # this task's cancellation (asyncio.timeout, TaskGroup) ends the call for good
                        self._cancelled = True
                        self._retries.stop()
                        raise
                    # cancel(), or the cancellation of an earlier read, ended the call, not this task: a CancelledError
                    # here would read as the task's own cancellation to TaskGroup and asyncio.timeout. As the sync
                    # client says it:
                    raise self.cancelled_error() from None
                await self._closing.sleep_async(delay, self._wake)
                self._restart()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        self._retries.stop()  # a stream is started again only while it has sent nothing
        return piece_from(message)

    async def __aenter__(self) -> AsyncTranslationStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()  # nothing once the stream has ended; otherwise the server stops decoding


class AsyncClient:
    """An asyncio client of an nmtserve server, for use inside a running event loop.

    `async with AsyncClient("localhost:50051", timeout=10.0) as client:` takes
    the same keywords as Client (any ClientSettings field, or `settings=`).
    Failed calls raise the NmtserveError subclasses of nmtserve_client.errors;
    cancelling the awaiting task cancels the call on the server.
    """

    def __init__(self, server: str | None = None, *, settings: ClientSettings | None = None, **changes: Any):
        self.settings = client_settings(server, settings, changes)
        secure, options = credentials(self.settings), channel_options(self.settings)
        target = self.settings.server
        self._channel = grpc.aio.secure_channel(target, secure, options) if secure else grpc.aio.insecure_channel(target, options)
        self._stub = translator_pb2_grpc.TranslatorStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_CHECK, request_serializer=HealthCheckRequest.SerializeToString, response_deserializer=HealthCheckResponse.FromString
        )
        self._closing = Closing()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @_documented_as(Client.close)
    async def close(self) -> None:
        self._closing.close()
        await self._channel.close()

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self.settings.timeout if timeout is None else timeout)

    @_documented_as(Client.translate)
    async def translate(
        self,
        texts: Sequence[str],
        *,
        beam_size: int = 1,
        max_length: int | None = None,
        min_length: int = 0,
        length_penalty: float | None = None,
        num_hypotheses: int = 1,
        return_scores: bool = False,
        return_alignment: bool = False,
        target_language: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> list[Translation]:
        texts = text_list(texts)
        options = translate_options(
            beam_size=beam_size, max_length=max_length, min_length=min_length, length_penalty=length_penalty,
            num_hypotheses=num_hypotheses, return_scores=return_scores, return_alignment=return_alignment,
            target_language=target_language,
        )
        metadata = request_metadata(request_id)
        with sent_with(request_id):
            self._closing.check()  # an empty list makes no RPC that would say so
        deadline = self._deadline(timeout)
        slots = asyncio.Semaphore(self.settings.max_concurrent_requests)

        async def send(offset: int, chunk: list[str]) -> list[Translation]:
            async with slots:
                request = pb.TranslateRequest(texts=chunk, options=options)
                retries = Retries(self.settings, deadline, offset)
                while True:
                    try:
                        return translations_from(await self._stub.Translate(request, timeout=deadline.remaining(), metadata=metadata))
                    except grpc.RpcError as error:
                        delay = retries.after(error)
                    await self._closing.sleep_async(delay)

        tasks = [asyncio.create_task(send(offset, chunk)) for offset, chunk in chunks(texts, self.settings.texts_per_request)]
        try:
            with sent_with(request_id), self._closing.calls():
                # In order, as in the blocking client: a failed call raises the error of its first request that failed, not of the
                # one that failed soonest.
                results = [await task for task in tasks]
        finally:
            for task in tasks:  # the rest of a call that failed
                if not task.cancel() and not task.cancelled():
                    task.exception()  # a later request's failure, not raised: retrieved, so asyncio does not log it
        return [translation for chunk in results for translation in chunk]

    @_documented_as(Client.translate_stream)
    def translate_stream(
        self,
        text: str,
        *,
        max_length: int | None = None,
        min_length: int = 0,
        length_penalty: float | None = None,
        return_scores: bool = False,
        return_alignment: bool = False,
        target_language: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> AsyncTranslationStream:
        options = translate_options(
            max_length=max_length, min_length=min_length, length_penalty=length_penalty, return_scores=return_scores,
            return_alignment=return_alignment, target_language=target_language,
        )
        check_text(text, "text")
        request = pb.TranslateStreamRequest(text=text, options=options)
        metadata = request_metadata(request_id)
        deadline = self._deadline(timeout)

        def start() -> grpc.aio.UnaryStreamCall:  # again for each attempt, with the time then left
            return self._stub.TranslateStream(request, timeout=deadline.remaining(), metadata=metadata)

        with sent_with(request_id), self._closing.calls():
            return AsyncTranslationStream(start, Retries(self.settings, deadline), self._closing, asyncio.Event(), request_id)

    @_documented_as(Client.model_info)
    async def model_info(self, *, timeout: float | None = None, request_id: str | None = None) -> ModelInfo:
        metadata = request_metadata(request_id)
        deadline = self._deadline(timeout)
        retries = Retries(self.settings, deadline)
        request = pb.GetModelInfoRequest()
        with sent_with(request_id), self._closing.calls():
            while True:
                try:
                    return model_info_from(await self._stub.GetModelInfo(request, timeout=deadline.remaining(), metadata=metadata))
                except grpc.RpcError as error:
                    delay = retries.after(error)
                await self._closing.sleep_async(delay)

    @_documented_as(Client.health)
    async def health(self, service: str = SERVICE_NAME, *, timeout: float | None = None) -> HealthStatus:
        with self._closing.calls():
            try:
                response = await self._health(HealthCheckRequest(value=service), timeout=self._deadline(timeout).remaining())
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:  # how Check answers for a service the server does not know
                    return HealthStatus.SERVICE_UNKNOWN
                raise from_rpc_error(error) from None
        return HealthStatus(response.value)

    @_documented_as(Client.wait_until_serving)
    async def wait_until_serving(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        status: HealthStatus | str = "unreachable"
        while True:
            try:
                status = await self.health(timeout=max(POLL_SECONDS, end - time.monotonic()))
            except (UnavailableError, DeadlineExceededError) as error:
                status = f"unreachable: {error.message}"  # gRPC's reason: refused, a name that does not resolve, TLS
            if status is HealthStatus.SERVING:
                return
            if time.monotonic() >= end:
                raise not_serving(self.settings.server, timeout, status)
            await asyncio.sleep(POLL_SECONDS)
