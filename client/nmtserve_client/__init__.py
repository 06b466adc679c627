"""The Python SDK of nmtserve: blocking and asyncio clients of the nmtserve.v1.Translator gRPC API.

    from nmtserve_client import Client

    with Client("localhost:50051") as client:
        for translation in client.translate(["Friday, May 16, 2003", "It costs $1,234.56."], beam_size=4):
            print(translation.text)
        for piece in client.translate_stream("every Saturday at 10:30 PM"):
            print(piece.text, end="", flush=True)

AsyncClient has the same methods, awaited (translate_stream is an async
iterator). Needs only grpcio and protobuf: the `client` extra (`pip install -e '.[client]'` in the
checkout).
"""

from .aio import AsyncClient, AsyncTranslationStream
from .channel import ClientSettings
from .client import Client, TranslationStream
from .errors import (
    ClientClosedError,
    DeadlineExceededError,
    FieldViolation,
    InvalidInputError,
    MessageTooLargeError,
    NmtserveError,
    OverloadedError,
    RequestCancelledError,
    ServerError,
    UnavailableError,
)
from .results import HealthStatus, Hypothesis, Limits, ModelDimensions, ModelInfo, Piece, Timings, Translation, Usage

__all__ = [
    "AsyncClient",
    "AsyncTranslationStream",
    "Client",
    "ClientClosedError",
    "ClientSettings",
    "DeadlineExceededError",
    "FieldViolation",
    "HealthStatus",
    "Hypothesis",
    "InvalidInputError",
    "Limits",
    "MessageTooLargeError",
    "ModelDimensions",
    "ModelInfo",
    "NmtserveError",
    "OverloadedError",
    "Piece",
    "RequestCancelledError",
    "ServerError",
    "Timings",
    "Translation",
    "TranslationStream",
    "UnavailableError",
    "Usage",
]
