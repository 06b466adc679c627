"""The server's configuration: one dataclass, one field per knob, flags with `NMTSERVE_*` environment fallbacks."""

from __future__ import annotations

import gc
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nmtserve.bundle import DEVICES
from nmtserve.settings import flag

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "time=%(asctime)s.%(msecs)03d level=%(levelname)s logger=%(name)s %(message)s"  # one key=value line per event
LOG_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
MAX_PORT = 65535
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC takes message limits as a C int
MAX_GRPC_MILLISECONDS = 2**31 - 1  # and durations as milliseconds in one (about 24 days)
STALL_WARM_UPS = 4  # the decode process is taken for hung only after this many times its warm-up without a word
MAX_QUEUE_DELAY_MS = 60_000.0  # a wait far beyond any use; epoll's own limit (about 25 days) would end the decode process


class LogfmtFormatter(logging.Formatter):
    """LOG_FORMAT's one line per event; an exception's traceback is that line's last field (traceback="…"), quoted."""

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return "traceback=" + logfmt(super().formatException(ei))

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " ")  # the line break logging puts before the traceback


def configure_logging(level: str) -> None:
    """Log one key=value line per event to stderr at `level`: the server and its decode process alike."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(LOG_FORMAT, LOG_TIME_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def logfmt(value: object) -> str:
    """A value as a key=value log line holds it: as it is where it has no space, quote or =, else double-quoted."""
    text = str(value)
    return text if text and not any(c in text for c in ' "=\\') and text.isprintable() else json.dumps(text, ensure_ascii=False)


def freeze_startup_objects() -> None:
    """Keep what start-up made (modules, the model, the servers) out of the garbage collector's future passes.

    They live as long as the process; scanning them made each full collection under load pause the process for
    tens of milliseconds (25 ms measured in the server), every call in flight waiting.
    """
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class ServeSettings:
    """Everything `nmtserve serve` can be told; `--help` lists each field with its help text."""

    bundle: Path | None = field(default=None, metadata={"help": "model bundle directory (from 'nmtserve export'); required"})
    host: str = field(default="0.0.0.0", metadata={"help": "address the gRPC (and health and metrics) ports listen on"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0: any free port, logged at start)"})
    health_port: int | None = field(
        default=None,
        metadata={"help": "also serve grpc.health.v1 in plaintext on this port, for probes when the main port uses TLS "
                          "(0: any free port; unset: health only on the main port)"},
    )
    metrics_port: int = field(default=8000, metadata={"help": "Prometheus metrics HTTP port (0: any free port, logged at start)"})
    tls_cert: Path | None = field(default=None, metadata={"help": "PEM certificate chain: serve the main port over TLS"})
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: Path | None = field(
        default=None, metadata={"help": "PEM CA bundle: require client certificates signed by it (mutual TLS)"}
    )
    device: str = field(default="auto", metadata={"help": "where ONNX Runtime runs", "choices": DEVICES})
    threads: int = field(
        default=0,
        metadata={"help": "ONNX Runtime intra-op threads of the encoder, which runs beside the decoder steps (0: one per "
                          "core but the one the decoder step keeps busy)"},
    )
    decoder_threads: int = field(
        default=0,
        metadata={"help": "ONNX Runtime intra-op threads of the decoder step (0: on the CPU, time a step with 1 and "
                          "with --threads at start and keep the faster)"},
    )
    max_batch_size: int = field(
        default=64, metadata={"help": "KV-cache rows decoded together; a text takes beam-size rows"}
    )
    max_queue_size: int = field(
        default=256, metadata={"help": "texts that may wait for free rows; beyond it requests get RESOURCE_EXHAUSTED"}
    )
    max_queue_delay_ms: float = field(
        default=2.0, metadata={"help": "when the decoder is idle, wait this long for more arrivals to encode together"}
    )
    max_texts_per_request: int = field(default=64, metadata={"help": "most texts in one Translate request"})
    max_beam_size: int = field(default=8, metadata={"help": "widest beam a request may ask for"})
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "largest gRPC message received or sent"})
    max_concurrent_rpcs: int = field(
        default=1024,
        metadata={"help": "Translator calls handled at once (health and reflection aside); beyond it calls get RESOURCE_EXHAUSTED"},
    )
    grace_seconds: float = field(
        default=30.0, metadata={"help": "on SIGTERM/SIGINT, time calls in flight get to finish before they are cancelled"}
    )
    decode_stall_seconds: float = field(
        default=60.0,
        metadata={"help": "with texts waiting or decoding, a decode process that reports nothing for this long is taken "
                          "for hung (a stuck model run, a wedged GPU): it is killed, health turns NOT_SERVING and the "
                          f"server exits 1, for its supervisor to restart it; at least {STALL_WARM_UPS} times the warm-up "
                          "(which runs the longest model runs once) and twice --max-queue-delay-ms, logged at start (0: "
                          "never)"},
    )
    max_connection_age_seconds: float = field(
        default=0.0,
        metadata={"help": "close each client connection after about this long, once its calls in flight have finished "
                          "(GOAWAY), so that clients reconnect and reach replicas added since (0: never)"},
    )
    log_level: str = field(
        default="info",
        metadata={"help": "logging threshold of the per-call and decode lines (the configuration, start, drain and stop "
                          "are logged at every level)", "choices": LOG_LEVELS},
    )

    def problems(self) -> list[str]:
        """What is wrong with the settings, one sentence per problem (empty when they can be served)."""
        found = []
        if self.bundle is None:
            found.append("--bundle is required")
        for name in ("max_batch_size", "max_queue_size", "max_texts_per_request", "max_beam_size", "max_message_bytes",
                     "max_concurrent_rpcs"):
            if getattr(self, name) < 1:
                found.append(f"{flag(name)} must be at least 1")
        if self.max_beam_size > self.max_batch_size:
            found.append(f"--max-beam-size {self.max_beam_size} cannot exceed --max-batch-size {self.max_batch_size}")
        if self.max_texts_per_request > self.max_queue_size:
            found.append(f"--max-texts-per-request {self.max_texts_per_request} cannot exceed --max-queue-size {self.max_queue_size}")
        for name in ("max_queue_delay_ms", "grace_seconds", "decode_stall_seconds", "max_connection_age_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                found.append(f"{flag(name)} must be a number of at least 0, not {value}")
        if self.max_connection_age_seconds * 1000 > MAX_GRPC_MILLISECONDS:
            found.append(f"--max-connection-age-seconds cannot exceed {MAX_GRPC_MILLISECONDS // 1000} (gRPC's limit)")
        if self.max_queue_delay_ms > MAX_QUEUE_DELAY_MS:
            found.append(f"--max-queue-delay-ms cannot exceed {MAX_QUEUE_DELAY_MS:.0f}, not {self.max_queue_delay_ms:g}")
        if min(self.threads, self.decoder_threads) < 0:
            found.append("--threads and --decoder-threads cannot be negative")
        for name in ("port", "health_port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_PORT:
                found.append(f"{flag(name)} {value} is not a port (0 to {MAX_PORT})")
        if self.max_message_bytes > MAX_MESSAGE_BYTES:
            found.append(f"--max-message-bytes cannot exceed {MAX_MESSAGE_BYTES} (gRPC's limit)")
        if (self.tls_cert is None) != (self.tls_key is None):
            found.append("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            found.append("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return found
