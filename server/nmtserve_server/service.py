"""The gRPC service `nmtserve.v1.Translator`: validation, the scheduler, and one place mapping errors to status codes."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from nmtserve import __version__
from nmtserve.v1 import REQUEST_ID_KEY, REQUEST_ID_PATTERN
from nmtserve.v1 import translator_pb2 as pb

from .config import ServeSettings, logfmt
from .engine import Model
from .metrics import Metrics
from .scheduler import DeadlineError, Job, QueueFullError, Scheduler, UnavailableError
from .search import DecodeOptions, Hypothesis, describe, listed

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Translator"].full_name
# The server's deadline runs from a call's arrival, the client's from its sending: the client's passes first, and the
# cancellation it sends then finds the server's this close to passing.
DEADLINE_SLACK = 0.1
INLINE_TOKENIZING_CHARACTERS = 4096  # a request with more characters is tokenized off the event loop (a few ms of work)
_INCOMPLETE = "\ufffd"  # what byte-level decoding shows for a multi-byte character cut short


class ValidationError(Exception):
    """A request the server will not run; each violation names its field."""

    def __init__(self, violations: list[tuple[str, str]]):
        self.violations = listed(violations)
        super().__init__(describe(self.violations))


class TooManyCallsError(Exception):
    """The server is already handling --max-concurrent-rpcs calls."""


class MalformedRequest(NamedTuple):
    """Request bytes that do not parse as the method's message (e.g. a string field that is not UTF-8)."""

    error: str


@dataclass
class Call:
    """One RPC being handled: what its log line and metrics report."""

    method: str
    request_id: str
    started: float = field(default_factory=time.monotonic)
    fields: dict[str, Any] = field(default_factory=dict)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The gRPC status code and rich status of an error: the one place errors become status codes."""
    if isinstance(error, ValidationError):
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in error.violations]
        ))
        return grpc.StatusCode.INVALID_ARGUMENT, status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(error), details=[detail])
    code, rpc_code, message = {
        QueueFullError: (grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED, None),
        TooManyCallsError: (grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED, None),
        UnavailableError: (grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE, None),
        DeadlineError: (grpc.StatusCode.DEADLINE_EXCEEDED, code_pb2.DEADLINE_EXCEEDED, None),
    }.get(type(error), (grpc.StatusCode.INTERNAL, code_pb2.INTERNAL, "internal error; see the server log"))
    return code, status_pb2.Status(code=rpc_code, message=message or str(error))


def _less(name: str) -> str:
    """What to ask for less of when the answer to a request with this texts field ("texts" or "text") is too large."""
    return "fewer texts or hypotheses" if name == "texts" else "a shorter text"


def _lenient(message: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    """A request parser that hands malformed bytes to the handler (INVALID_ARGUMENT) instead of failing in gRPC (INTERNAL)."""

    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message.FromString(data)
        except DecodeError as error:
            # "Error parsing message with type 'nmtserve.v1.TranslateRequest': String field had bad UTF-8": the reason only.
            return MalformedRequest(str(error).rpartition("': ")[2])

    return parse


class TranslatorService:
    """`nmtserve.v1.Translator`: Translate, TranslateStream, GetModelInfo."""

    def __init__(self, settings: ServeSettings, scheduler: Scheduler, metrics: Metrics):
        self.settings = settings
        self.scheduler = scheduler
        self.metrics = metrics
        self._model: Model | None = None
        self._model_info: pb.ModelInfo | None = None
        self.in_flight = 0  # calls of this service being handled
        self._idle = asyncio.Event()
        self._idle.set()

    async def idle(self) -> None:
        """Return once no call of this service is being handled."""
        await self._idle.wait()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the three methods on server."""
        handlers = {
            "Translate": grpc.unary_unary_rpc_method_handler(
                self.Translate, _lenient(pb.TranslateRequest), pb.TranslateResponse.SerializeToString
            ),
            "TranslateStream": grpc.unary_stream_rpc_method_handler(
                self.TranslateStream, _lenient(pb.TranslateStreamRequest), pb.TranslateStreamResponse.SerializeToString
            ),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, _lenient(pb.GetModelInfoRequest), pb.ModelInfo.SerializeToString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    def ready(self, model: Model, device: str) -> None:
        """Serve this model, now that the decode process has loaded and warmed it up on `device`."""
        manifest, dims, s = model.bundle.manifest, model.bundle.dims, self.settings
        self._model_info = pb.ModelInfo(
            name=manifest["name"],
            version=model.bundle.sha256[:12],
            server_version=__version__,
            source_language=manifest["languages"]["source"],
            target_languages=manifest["languages"]["target"],
            dimensions=pb.ModelDimensions(**vars(dims)),
            limits=pb.Limits(
                max_source_tokens=model.max_source_length,
                max_target_tokens=model.max_target_length,
                max_texts_per_request=s.max_texts_per_request,
                max_beam_size=s.max_beam_size,
                max_batch_size=s.max_batch_size,
                max_queue_size=s.max_queue_size,
                max_message_bytes=s.max_message_bytes,
            ),
            bundle_sha256=model.bundle.sha256,
            device=device,
            precision=model.bundle.precision,
        )
        self.metrics.model_info.labels(
            name=manifest["name"], version=self._model_info.version, precision=model.bundle.precision, device=device
        ).set(1)
        self._model = model

    @asynccontextmanager
    async def _call(self, method: str, request: Message | MalformedRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Call]:
        """Run one RPC: request id, error -> status mapping, the requests metric and one log line."""
        given = dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY)
        # The client's id is logged as is only when it cannot forge log fields; otherwise the server makes one.
        call = Call(method, given if isinstance(given, str) and REQUEST_ID_PATTERN.fullmatch(given) else uuid.uuid4().hex[:16])
        code = grpc.StatusCode.OK
        recorded = False
        self.in_flight += 1
        self._idle.clear()
        try:
            if isinstance(request, MalformedRequest):
                raise ValidationError([("request", f"not a valid {method} request: {request.error}")])
            if self._model is None or not self.scheduler.accepting:
                raise UnavailableError(f"server is {self.scheduler.state}")
            # Here rather than gRPC's own limit, which refuses calls before any handler runs: uncounted and unlogged.
            if self.in_flight > self.settings.max_concurrent_rpcs:
                raise TooManyCallsError(f"the server is handling its limit of {self.settings.max_concurrent_rpcs} calls "
                                        "(--max-concurrent-rpcs); retry later")
            yield call
        except (asyncio.CancelledError, GeneratorExit):  # gRPC ends the handler: the client went away or its deadline passed
            remaining = context.time_remaining()
            ended_by_deadline = remaining is not None and remaining <= DEADLINE_SLACK
            code = grpc.StatusCode.DEADLINE_EXCEEDED if ended_by_deadline else grpc.StatusCode.CANCELLED
            raise
        except Exception as error:
            code, status = status_for(error)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("event=rpc_failed method=%s request_id=%s error=%s", method, call.request_id, logfmt(repr(error)))
            rich = rpc_status.to_status(status)
            self._record(call, code)  # before the client hears of it, so a scrape right after the answer counts it
            recorded = True
            await context.abort_with_status(rich._replace(trailing_metadata=(*rich.trailing_metadata, (REQUEST_ID_KEY, call.request_id))))
        finally:
            if not recorded:
                self._record(call, code)
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    def _record(self, call: Call, code: grpc.StatusCode) -> None:
        """Count the call in the requests metrics and log its one line."""
        seconds = time.monotonic() - call.started
        self.metrics.requests.labels(method=call.method, code=code.name).inc()
        self.metrics.request_duration.labels(method=call.method).observe(seconds)
        log.info(
            "event=rpc method=%s request_id=%s code=%s seconds=%.4f%s",
            call.method, call.request_id, code.name, seconds, "".join(f" {k}={v}" for k, v in call.fields.items()),
        )

    @property
    def model(self) -> Model:
        """The model being served; only called inside `_call`, which refuses calls before it is ready."""
        assert self._model is not None
        return self._model

    def _options(self, options: pb.TranslateOptions, violations: list[tuple[str, str]]) -> DecodeOptions:
        """DecodeOptions from the request's options (zero means the default); adds a violation per bad field."""
        model = self.model
        beam_size = options.beam_size or 1
        max_length = options.max_length or model.max_target_length
        num_hypotheses = options.num_hypotheses or 1
        length_penalty = options.length_penalty if options.HasField("length_penalty") else 1.0
        decode = DecodeOptions(beam_size, max_length, options.min_length, length_penalty, num_hypotheses, options.return_alignment)
        if beam_size > self.settings.max_beam_size:
            violations.append(("options.beam_size", f"{beam_size} is above the server's limit of {self.settings.max_beam_size}"))
        violations += decode.problems(model.max_target_length)  # as `nmtserve translate --bundle` checks them
        if options.target_language and (problem := model.language_problem(options.target_language)) is not None:
            violations.append(("options.target_language", problem))
        return decode

    async def _sources(self, texts: list[str], name: str, target_language: str, violations: list[tuple[str, str]]) -> list[list[int]]:
        """Source ids of each text, target-language token first where the model needs one; adds a violation per bad text."""
        model = self.model
        language = target_language if target_language in model.language_prefixes else None  # a bad one is _options' violation
        read = functools.partial(model.read_sources, texts, language)
        # A long request is tokenized in a thread: on the event loop, 64 texts of 4,096 characters held every other
        # call up for about 0.2 s. A short one is tokenized here, where it costs less than the hand-over.
        lengthy = sum(len(text) for text in texts) > INLINE_TOKENIZING_CHARACTERS
        sources, wrong = await asyncio.to_thread(read) if lengthy else read()
        violations += [(f"{name}[{index}]" if name == "texts" else name, problem) for index, problem in wrong.items()]
        return sources

    def _check_alignment_fits(self, sources: list[list[int]], options: DecodeOptions, name: str,
                              violations: list[tuple[str, str]]) -> None:
        """Adds a violation where the alignments alone, at the shortest output the options allow, would exceed the
        answer's limit: such a request is refused before it takes rows and memory to decode."""
        if not options.return_alignment:
            return
        # Each hypothesis has at least min_length tokens, each with a row of 4-byte weights, one per source token.
        least = options.num_hypotheses * options.min_length * 4 * sum(len(source) for source in sources)
        limit = self.settings.max_message_bytes
        if least > limit:
            violations.append(("options.return_alignment", f"the alignments alone would be at least {least} bytes "
                               f"({options.num_hypotheses} hypotheses of at least min_length {options.min_length} tokens, "
                               f"4 bytes per source token each), above the {limit} the server sends (--max-message-bytes): "
                               f"ask for {_less(name)}, a smaller min_length, or no alignment"))

    def _check_size(self, response: Message, options: pb.TranslateOptions, name: str) -> None:
        """Refuse a response larger than the server may send, naming what made it so, rather than let gRPC drop it."""
        size, limit = response.ByteSize(), self.settings.max_message_bytes
        if size > limit:
            field_name = "options.return_alignment" if options.return_alignment else name
            alignment = ", or no alignment" if options.return_alignment else ""
            raise ValidationError([(field_name, f"the answer would be {size} bytes, above the {limit} the server sends "
                                                f"(--max-message-bytes): ask for {_less(name)}, a smaller max_length{alignment}")])

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    def _hypothesis(self, hypothesis: Hypothesis, text: str, options: pb.TranslateOptions) -> pb.Hypothesis:
        result = pb.Hypothesis(text=text, tokens=hypothesis.tokens)
        if options.return_scores:
            result.score = hypothesis.score
        for weights in hypothesis.alignment if hypothesis.alignment is not None else ():
            result.alignment.add(weights=weights.tolist())  # a list converts faster than the array's row
        return result

    def _timings(self, call: Call, jobs: list[Job]) -> pb.Timings:
        now = time.monotonic()
        admitted = [job.admitted for job in jobs if job.admitted is not None]
        first = [job.first_token for job in jobs if job.first_token is not None]
        return pb.Timings(
            queue_seconds=(max(admitted) - call.started) if admitted else 0.0,
            first_token_seconds=(min(first) - call.started) if first else 0.0,
            total_seconds=now - call.started,
            encode_seconds=max(job.encode_seconds for job in jobs),
        )

    async def Translate(self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext) -> pb.TranslateResponse:
        """Translate every text of the request; answer when all are done."""
        async with self._call("Translate", request, context) as call:
            violations: list[tuple[str, str]] = []
            texts = list(request.texts)
            if not texts:
                violations.append(("texts", "at least one text is required"))
            elif len(texts) > self.settings.max_texts_per_request:
                violations.append(("texts", f"{len(texts)} texts, at most {self.settings.max_texts_per_request} per request"))
            options = self._options(request.options, violations)
            tokenize = 0 < len(texts) <= self.settings.max_texts_per_request
            sources = await self._sources(texts, "texts", request.options.target_language, violations) if tokenize else []
            self._check_alignment_fits(sources, options, "texts", violations)
            if violations:
                raise ValidationError(violations)
            jobs = self.scheduler.submit(sources, options, deadline=self._deadline(context))
            try:
                # gather: the call fails at its first failed text, and the errors of the others are read, not logged.
                results = await asyncio.gather(*(job.future for job in jobs))
            finally:
                self.scheduler.cancel(jobs)  # the ones still unfinished: the client went away or a sibling failed
            model = self.model
            response = pb.TranslateResponse(request_id=call.request_id)
            for source, hypotheses in zip(sources, results):
                outputs = model.decode_ids([h.tokens for h in hypotheses])
                translation = response.translations.add(source_tokens=source)
                translation.hypotheses.extend(self._hypothesis(h, o, request.options) for h, o in zip(hypotheses, outputs))
            response.usage.input_tokens = sum(len(s) for s in sources)
            response.usage.output_tokens = sum(len(h.tokens) for hypotheses in results for h in hypotheses)
            response.timings.CopyFrom(self._timings(call, jobs))
            self._check_size(response, request.options, "texts")
            call.fields.update(texts=len(texts), beam_size=options.beam_size, input_tokens=response.usage.input_tokens,
                               output_tokens=response.usage.output_tokens)
            return response

    async def TranslateStream(
        self, request: pb.TranslateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TranslateStreamResponse]:
        """Translate one text greedily, streaming the new tokens and text after every decoder step, then the final result."""
        async with self._call("TranslateStream", request, context) as call:
            violations: list[tuple[str, str]] = []
            options = self._options(request.options, violations)
            if options.beam_size != 1:  # in place of any other beam_size violation: this one says what to send
                violations[:] = [v for v in violations if v[0] != "options.beam_size"]
                violations.append(("options.beam_size", f"{options.beam_size}: streaming decodes greedily (0 or 1)"))
            sources = await self._sources([request.text], "text", request.options.target_language, violations)
            self._check_alignment_fits(sources, options, "text", violations)
            if violations:
                raise ValidationError(violations)
            model = self.model
            (job,) = self.scheduler.submit(sources, options, deadline=self._deadline(context), stream=True)
            tokens: list[int] = []
            sent = ""
            try:
                async for new in self.scheduler.pieces(job):
                    tokens += new
                    text = model.decode_ids([tokens])[0].rstrip(_INCOMPLETE)
                    piece = text[len(sent) :] if text.startswith(sent) else ""
                    sent += piece
                    yield pb.TranslateStreamResponse(piece=pb.TranslationPiece(tokens=new, text=piece))
                (hypothesis,) = await job.future
            finally:
                self.scheduler.cancel([job])
            final_text = model.decode_ids([hypothesis.tokens])[0]
            if final_text.startswith(sent) and len(final_text) > len(sent):  # what the last pieces held back
                yield pb.TranslateStreamResponse(piece=pb.TranslationPiece(text=final_text[len(sent) :]))
            final = pb.TranslationFinal(
                hypothesis=self._hypothesis(hypothesis, final_text, request.options),
                source_tokens=sources[0],
                usage=pb.Usage(input_tokens=len(sources[0]), output_tokens=len(hypothesis.tokens)),
                timings=self._timings(call, [job]),
                request_id=call.request_id,
            )
            call.fields.update(input_tokens=final.usage.input_tokens, output_tokens=final.usage.output_tokens)
            message = pb.TranslateStreamResponse(final=final)
            self._check_size(message, request.options, "text")
            yield message

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """The model, its limits, and where it runs."""
        async with self._call("GetModelInfo", request, context):
            assert self._model_info is not None
            return self._model_info
