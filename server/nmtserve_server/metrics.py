"""Every Prometheus metric of the server, defined here and nowhere else.

Names follow the Prometheus conventions: the `nmtserve_` prefix, base units
in the name (`_seconds`, `_total`), and labels of low cardinality (the RPC
method and status code; the model's name, version, precision and device).
Each server owns a `Metrics` with its own registry, so several servers in one
process (the tests) keep separate counts.
"""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector, start_http_server

# Latencies from a fraction of a decoder step to a long beam search.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The server's metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter("nmtserve_requests", "Finished RPCs by method and gRPC status code.", ["method", "code"], registry=r)
        self.request_duration = Histogram(
            "nmtserve_request_duration_seconds", "Time from an RPC's arrival to its end, by method.", ["method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "nmtserve_queue_wait_seconds", "Time from a text's arrival until it joined the decode batch.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.time_to_first_token = Histogram(
            "nmtserve_time_to_first_token_seconds", "Time from a text's arrival to its first generated token.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.input_tokens = Counter("nmtserve_input_tokens", "Source tokens of the texts decoding started for.", registry=r)
        self.output_tokens = Counter("nmtserve_output_tokens", "Tokens generated for the texts that finished decoding, every hypothesis, end-of-sentence excluded.", registry=r)
        self.active_sequences = Gauge("nmtserve_active_sequences", "Texts being decoded.", registry=r)
        self.queue_depth = Gauge("nmtserve_queue_depth", "Texts waiting for free KV-cache rows.", registry=r)
        self.decode_step_batch_size = Histogram(
            "nmtserve_decode_step_batch_size", "Rows decoded together in one decoder step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.decode_step_duration = Histogram(
            "nmtserve_decode_step_duration_seconds", "Time of one decoder step over the whole batch.",
            buckets=STEP_BUCKETS, registry=r,
        )
        self.encoder_batch_size = Histogram(
            "nmtserve_encoder_batch_size", "Texts encoded together in one encoder run.", buckets=BATCH_BUCKETS, registry=r
        )
        self.encoder_duration = Histogram(
            "nmtserve_encoder_duration_seconds", "Time of one encoder run.", buckets=STEP_BUCKETS, registry=r,
        )
        self.first_step_duration = Histogram(
            "nmtserve_first_step_duration_seconds",
            "Time of the first decoder step for an encoder run's texts, run beside the batch's steps.",
            buckets=STEP_BUCKETS, registry=r,
        )
        self.kv_cache_free_slots = Gauge("nmtserve_kv_cache_free_slots", "KV-cache rows not held by a text.", registry=r)
        self.kv_cache_slots = Gauge("nmtserve_kv_cache_slots", "KV-cache rows in all (--max-batch-size).", registry=r)
        self.model_info = Gauge(
            "nmtserve_model_info", "The model being served (always 1).", ["name", "version", "precision", "device"], registry=r
        )

    def watch_decode_process(self, pid: Callable[[], int | None]) -> None:
        """Also export the decode process's CPU time, memory and open files (nmtserve_decode_process_*), which the
        process_* series, the server process's own, leave out: it does the model's work. No series while pid() is None."""
        ProcessCollector(namespace="nmtserve_decode", pid=pid, registry=self.registry)

    def serve_http(self, host: str, port: int) -> WSGIServer:
        """Expose the registry over HTTP in a daemon thread (port 0: any free port, see `.server_port`)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server
