"""What the SDK returns: small dataclasses made from the API's messages, so callers never touch protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nmtserve.v1 import translator_pb2 as pb


@dataclass(frozen=True)
class Hypothesis:
    """One translation of a text."""

    text: str  # the translated text
    tokens: list[int]  # generated token ids, without begin- and end-of-sentence
    score: float | None = None  # log-probability / length ** length_penalty; set with return_scores=True
    # A row of attention over source_tokens per generated token, plus one for end-of-sentence where the hypothesis ended
    # with it (tokens leaves it out); set with return_alignment=True.
    alignment: list[list[float]] | None = None


@dataclass(frozen=True)
class Timings:
    """Where a request's time went on the server, in seconds."""

    queue_seconds: float  # arrival until the request's last text joined the decode batch (after its first token)
    first_token_seconds: float  # arrival to the first generated token
    total_seconds: float  # arrival to the response
    encode_seconds: float  # the encoder run that took the request's texts (the longest, where several did)


@dataclass(frozen=True)
class Usage:
    """Tokens a request read and wrote."""

    input_tokens: int  # source tokens over all its texts, end-of-sentence included
    output_tokens: int  # generated tokens of the returned hypotheses, end-of-sentence excluded


@dataclass(frozen=True)
class Translation:
    """The hypotheses of one text, best first."""

    hypotheses: list[Hypothesis]
    source_tokens: list[int]  # the source token ids the model read, end-of-sentence included
    request_id: str  # the id the server logged the request under (texts sent together share it)
    timings: Timings  # of the request this text was sent in
    usage: Usage  # of the request this text was sent in

    @property
    def text(self) -> str:
        """The best hypothesis's text."""
        return self.hypotheses[0].text

    @property
    def score(self) -> float | None:
        """The best hypothesis's score (None unless return_scores=True)."""
        return self.hypotheses[0].score


@dataclass(frozen=True)
class Piece:
    """Output of translate_stream decoded since the previous piece; the last piece carries the whole result."""

    text: str  # new text; the pieces' texts concatenate to the final text (may be "" mid-character)
    tokens: list[int]  # new token ids
    final: Translation | None = None  # set on the last piece only (whose text and tokens are empty)


@dataclass(frozen=True)
class ModelDimensions:
    """The model's architecture."""

    vocab_size: int  # shared source and target subword vocabulary
    d_model: int  # width of embeddings and every sublayer's output
    d_ff: int  # inner width of the feed-forward networks
    n_heads: int  # attention heads per layer
    d_k: int  # width of each head's keys and values
    n_encoder_layers: int
    n_decoder_layers: int


@dataclass(frozen=True)
class Limits:
    """Limits a request must keep to."""

    max_source_tokens: int  # per text, end-of-sentence included
    max_target_tokens: int  # most tokens generated per text (max_length)
    max_texts_per_request: int  # most texts in one request (keep texts_per_request at or below it)
    max_beam_size: int  # widest beam_size
    max_batch_size: int  # KV-cache rows decoded together; a text takes beam_size rows
    max_queue_size: int  # texts that may wait before the server answers "overloaded"
    max_message_bytes: int  # largest request or response message


@dataclass(frozen=True)
class ModelInfo:
    """The model a server hosts."""

    name: str
    version: str  # first 12 hex digits of bundle_sha256
    server_version: str
    source_language: str  # BCP 47 code, e.g. "en"
    target_languages: list[str]  # what target_language may name
    dimensions: ModelDimensions
    limits: Limits
    bundle_sha256: str  # identifies the model bundle exactly
    device: str  # "cpu" or "cuda"
    precision: str  # "fp32", "fp16" or "int8"


class HealthStatus(enum.Enum):
    """A service's state in the standard gRPC health protocol (grpc.health.v1)."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2  # loading the model or shutting down
    SERVICE_UNKNOWN = 3


def hypothesis_from(message: pb.Hypothesis) -> Hypothesis:
    """A Hypothesis from its message."""
    return Hypothesis(
        text=message.text,
        tokens=list(message.tokens),
        score=message.score if message.HasField("score") else None,
        alignment=[list(step.weights) for step in message.alignment] or None,
    )


def timings_from(message: pb.Timings) -> Timings:
    """Timings from their message."""
    return Timings(message.queue_seconds, message.first_token_seconds, message.total_seconds, message.encode_seconds)


def usage_from(message: pb.Usage) -> Usage:
    """Usage from its message."""
    return Usage(message.input_tokens, message.output_tokens)


def translations_from(response: pb.TranslateResponse) -> list[Translation]:
    """The Translations of a TranslateResponse, in request order."""
    timings, usage = timings_from(response.timings), usage_from(response.usage)
    return [
        Translation([hypothesis_from(h) for h in t.hypotheses], list(t.source_tokens), response.request_id, timings, usage)
        for t in response.translations
    ]


def piece_from(message: pb.TranslateStreamResponse) -> Piece:
    """A Piece from one TranslateStream message."""
    if message.WhichOneof("event") == "final":
        final = message.final
        translation = Translation([hypothesis_from(final.hypothesis)], list(final.source_tokens), final.request_id,
                                  timings_from(final.timings), usage_from(final.usage))
        return Piece("", [], translation)
    return Piece(message.piece.text, list(message.piece.tokens))


def model_info_from(message: pb.ModelInfo) -> ModelInfo:
    """ModelInfo from its message."""
    return ModelInfo(
        name=message.name,
        version=message.version,
        server_version=message.server_version,
        source_language=message.source_language,
        target_languages=list(message.target_languages),
        dimensions=ModelDimensions(**{f.name: getattr(message.dimensions, f.name) for f in pb.ModelDimensions.DESCRIPTOR.fields}),
        limits=Limits(**{f.name: getattr(message.limits, f.name) for f in pb.Limits.DESCRIPTOR.fields}),
        bundle_sha256=message.bundle_sha256,
        device=message.device,
        precision=message.precision,
    )
