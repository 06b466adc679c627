"""The blocking client: `Client("localhost:50051").translate(["Friday, May 16, 2003"])`."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc

from .calls import (
    HEALTH_CHECK, Closing, Deadline, HealthCheckRequest, HealthCheckResponse, Retries, StreamCall, check_text, chunks, client_settings,
    request_metadata, sent_with, text_list, translate_options,
)
from .channel import SERVICE_NAME, ClientSettings, channel_options, credentials
from .errors import DeadlineExceededError, UnavailableError, from_rpc_error
from .results import HealthStatus, ModelInfo, Piece, Translation, model_info_from, piece_from, translations_from

POLL_SECONDS = 0.2  # between health checks while waiting for a server to be ready


def not_serving(server: str, timeout: float, status: HealthStatus | str) -> UnavailableError:
    """The error of wait_until_serving when the time is up."""
    return UnavailableError(f"{server} was not serving after {timeout:g} s (last: {getattr(status, 'name', status)})")


class TranslationStream(StreamCall):
    """The pieces of one translate_stream call, as they are decoded; iterate once."""

    def __iter__(self) -> Iterator[Piece]:
        return self

    def __next__(self) -> Piece:
        with sent_with(self._request_id), self._closing.calls():
            while True:
                try:
                    message = next(self._call)
                    break
                except grpc.RpcError as error:
                    delay = self._after(error)
                self._closing.sleep(delay, self._wake)
                self._restart()
        self._retries.stop()  # a stream is started again only while it has sent nothing
        return piece_from(message)

    def __enter__(self) -> TranslationStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()  # nothing once the stream has ended; otherwise the server stops decoding


class Client:
    """A blocking client of an nmtserve server; safe to share between threads.

    Client("localhost:50051", timeout=10.0) takes any ClientSettings field as a
    keyword (see help(ClientSettings)), or a whole `settings=ClientSettings(...)`.
    Use it as a context manager, or call close(). Failed calls raise the
    NmtserveError subclasses of nmtserve_client.errors.
    """

    def __init__(self, server: str | None = None, *, settings: ClientSettings | None = None, **changes: Any):
        self.settings = client_settings(server, settings, changes)
        secure, options = credentials(self.settings), channel_options(self.settings)
        target = self.settings.server
        self._channel = grpc.secure_channel(target, secure, options) if secure else grpc.insecure_channel(target, options)
        self._stub = translator_pb2_grpc.TranslatorStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_CHECK, request_serializer=HealthCheckRequest.SerializeToString, response_deserializer=HealthCheckResponse.FromString
        )
        self._closing = Closing()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections; calls in flight, and any made after, raise ClientClosedError (a RequestCancelledError)."""
        self._closing.close()
        self._channel.close()

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self.settings.timeout if timeout is None else timeout)

    def translate(
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
        """Translate texts; one Translation per text, in order.

        A list longer than the client's texts_per_request is sent as several
        requests, up to max_concurrent_requests at a time; the order is kept.

        Args:
            texts: The texts to translate (a list, even for one text).
            beam_size: Beam width, at least 1 (1 for greedy search).
            max_length: Most tokens to generate per text (None: the model's limit).
            min_length: Fewest tokens to generate before the translation may end.
            length_penalty: Scores are divided by length ** length_penalty (None: 1.0).
            num_hypotheses: Hypotheses to return per text, best first (at least 1, at most beam_size).
            return_scores: Fill Hypothesis.score.
            return_alignment: Fill Hypothesis.alignment: a row of attention over source_tokens per generated token, plus
                one for end-of-sentence where the hypothesis ended with it.
            target_language: Language to translate into (None: the model's first, or the language token a text
                already begins with; see model_info()).
            timeout: Seconds the whole call may take, retries included (None: the client's timeout).
            request_id: Sent as x-request-id metadata with each of the call's requests: the server logs them under
                it, and it is each Translation's request_id and an error's (None: the server makes one per request).
                1 to 64 ASCII letters, digits, '.', '_', ':' or '-'.
        """
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
        in_flight: deque[tuple[grpc.Future, pb.TranslateRequest, Retries]] = deque()
        results: list[Translation] = []
        try:
            with sent_with(request_id), self._closing.calls():
                for offset, chunk in chunks(texts, self.settings.texts_per_request):
                    if len(in_flight) == self.settings.max_concurrent_requests:
                        results += self._first_answer(in_flight, deadline, metadata)
                    request = pb.TranslateRequest(texts=chunk, options=options)
                    future = self._stub.Translate.future(request, timeout=deadline.remaining(), metadata=metadata)
                    in_flight.append((future, request, Retries(self.settings, deadline, offset)))
                while in_flight:
                    results += self._first_answer(in_flight, deadline, metadata)
        finally:
            for future, _, _ in in_flight:  # the rest of a call that failed
                future.cancel()
        return results

    def _first_answer(self, in_flight: deque[tuple[grpc.Future, pb.TranslateRequest, Retries]], deadline: Deadline,
                      metadata: tuple[tuple[str, str], ...] | None) -> list[Translation]:
        """The translations of the oldest request in flight, sending it again while a full server refuses it."""
        while True:
            future, request, retries = in_flight[0]
            try:
                response = future.result()
                break
            except grpc.RpcError as error:
                delay = retries.after(error)
            self._closing.sleep(delay)
            in_flight[0] = (self._stub.Translate.future(request, timeout=deadline.remaining(), metadata=metadata), request, retries)
        in_flight.popleft()
        return translations_from(response)

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
    ) -> TranslationStream:
        """Translate one text with greedy search; iterate over the result for the output as it is decoded.

        The pieces' texts concatenate to the translation; the last piece has
        `.final`, the whole Translation. To stop early, use the stream as a
        context manager (`with client.translate_stream(text) as stream:`, or
        `async with` from AsyncClient) or call its cancel().

        Args:
            text: The text to translate.
            max_length: Most tokens to generate (None: the model's limit).
            min_length: Fewest tokens to generate before the translation may end.
            length_penalty: The final score is divided by length ** length_penalty (None: 1.0).
            return_scores: Fill the final hypothesis's score.
            return_alignment: Fill the final hypothesis's alignment (rows as in translate()).
            target_language: Language to translate into (None: the model's first, or the language token the text
                already begins with).
            timeout: Seconds the whole stream may take (None: the client's timeout).
            request_id: Sent as x-request-id metadata: the server logs the stream under it, and it is the final
                Translation's request_id and an error's (None: the server makes one). As in translate().
        """
        options = translate_options(
            max_length=max_length, min_length=min_length, length_penalty=length_penalty, return_scores=return_scores,
            return_alignment=return_alignment, target_language=target_language,
        )
        check_text(text, "text")
        request = pb.TranslateStreamRequest(text=text, options=options)
        metadata = request_metadata(request_id)
        deadline = self._deadline(timeout)

        def start() -> grpc.Call:  # again for each attempt, with the time then left
            return self._stub.TranslateStream(request, timeout=deadline.remaining(), metadata=metadata)

        with sent_with(request_id), self._closing.calls():
            return TranslationStream(start, Retries(self.settings, deadline), self._closing, threading.Event(), request_id)

    def model_info(self, *, timeout: float | None = None, request_id: str | None = None) -> ModelInfo:
        """The model the server hosts, its limits and where it runs (timeout and request_id as in translate())."""
        metadata = request_metadata(request_id)
        deadline = self._deadline(timeout)
        retries = Retries(self.settings, deadline)
        request = pb.GetModelInfoRequest()
        with sent_with(request_id), self._closing.calls():
            while True:
                try:
                    return model_info_from(self._stub.GetModelInfo(request, timeout=deadline.remaining(), metadata=metadata))
                except grpc.RpcError as error:
                    delay = retries.after(error)
                self._closing.sleep(delay)

    def health(self, service: str = SERVICE_NAME, *, timeout: float | None = None) -> HealthStatus:
        """The server's health (grpc.health.v1) for service ("" is the server as a whole); a probe, never retried."""
        with self._closing.calls():
            try:
                return HealthStatus(self._health(HealthCheckRequest(value=service), timeout=self._deadline(timeout).remaining()).value)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:  # how Check answers for a service the server does not know
                    return HealthStatus.SERVICE_UNKNOWN
                raise from_rpc_error(error) from None

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Return once the server reports SERVING (it may still be starting or loading); UnavailableError after timeout seconds."""
        end = time.monotonic() + timeout
        status: HealthStatus | str = "unreachable"
        while True:
            try:
                status = self.health(timeout=max(POLL_SECONDS, end - time.monotonic()))
            except (UnavailableError, DeadlineExceededError) as error:
                status = f"unreachable: {error.message}"  # gRPC's reason: refused, a name that does not resolve, TLS
            if status is HealthStatus.SERVING:
                return
            if time.monotonic() >= end:
                raise not_serving(self.settings.server, timeout, status)
            time.sleep(POLL_SECONDS)
