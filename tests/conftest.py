"""Session-wide fixtures: one tiny model trained on a small generated corpus, its bundles, and real gRPC
servers on 127.0.0.1 (any free port) serving it, for every test package."""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nmtserve.bundle import read_bundle
from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc
from nmtserve_server.config import ServeSettings
from nmtserve_server.serve import TranslationServer

TINY_TRAINING = dict(
    preset="tiny",
    corpus_size=6000,
    valid_size=200,
    test_size=200,
    vocab_size=400,
    max_tokens=2048,
    steps=400,
    warmup_steps=100,
    peak_lr=3e-3,
    valid_every=200,
    valid_decode=50,
    threads=1,  # one thread: two OpenMP threads stall badly when another process takes a core
)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny Transformer trained for a few hundred steps (the checkpoint directory)."""
    from nmtserve_export.train import TrainSettings, train

    return train(TrainSettings(out=tmp_path_factory.mktemp("tiny-run"), **TINY_TRAINING))


@pytest.fixture(scope="session")
def multilingual_run(tmp_path_factory) -> Path:
    """A tiny Transformer trained as tiny_run is, for two target languages (German and French) at once."""
    from nmtserve_export.train import TrainSettings, train

    return train(TrainSettings(out=tmp_path_factory.mktemp("multilingual-run"), **{**TINY_TRAINING, "target_lang": "de,fr"}))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    """The tiny model exported as an fp32 bundle."""
    from nmtserve_export.onnx_export import export_bundle

    return export_bundle(tiny_run, tmp_path_factory.mktemp("bundle") / "fp32")


@pytest.fixture(scope="session")
def tiny_bundle_int8(tiny_run, tmp_path_factory) -> Path:
    """The tiny model exported with int8 weights."""
    from nmtserve_export.onnx_export import export_bundle

    return export_bundle(tiny_run, tmp_path_factory.mktemp("bundle") / "int8", precision="int8")


@pytest.fixture(scope="session")
def tiny_bundle_fp16(tiny_run, tmp_path_factory) -> Path:
    """The tiny model exported with fp16 weights."""
    from nmtserve_export.onnx_export import export_bundle

    return export_bundle(tiny_run, tmp_path_factory.mktemp("bundle") / "fp16", precision="fp16")


@pytest.fixture(scope="session")
def default_corpus():
    """The built-in corpus at its default size (English -> German)."""
    from nmtserve_export.corpus import generate_corpus

    return generate_corpus(200_000)


START_TIMEOUT = 60.0
T = TypeVar("T")


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until condition() holds; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class InProcessServer:
    """A TranslationServer on its own event loop in a thread, driven from the test's (synchronous) side."""

    def __init__(self, settings: ServeSettings, grace: float = 5.0):
        self.settings = settings
        self.server: TranslationServer  # made on the server's own event loop, which gRPC binds to
        self.grace = grace
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="test-server", daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self.server = TranslationServer(self.settings)
        try:
            await self.server.start()
        except BaseException as error:
            self._error = error
            self._ready.set()
            await self.server.stop(0)
            return
        self._ready.set()
        await self._stop.wait()
        await self.server.stop(self.grace)

    def start(self) -> InProcessServer:
        self._thread.start()
        assert self._ready.wait(START_TIMEOUT), "server did not start in time"
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample in the server's registry (0 where absent)."""
        value = self.server.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def scrape(self) -> Scrape:
        return Scrape(self.server.metrics_port)

    def long_options(self, **fields) -> pb.TranslateOptions:
        """Options that make a text decode for the model's full target length (min = max length)."""
        limit = self.server.service.model.max_target_length
        return pb.TranslateOptions(min_length=limit, max_length=limit, **fields)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The decode process stopped for the block: nothing in the batch advances or finishes, however slow the machine."""
        pid = self.server.scheduler.decode_pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def reports_read(self) -> None:
        """With the decode process paused: wait until the server has taken in every report it sent before the pause
        (none is left in the pipe, and the event loop has finished reading the last)."""
        connection = self.server.scheduler._from_loop
        waiting = array.array("i", [0])
        deadline = time.monotonic() + 10
        while True:
            fcntl.ioctl(connection.fileno(), termios.FIONREAD, waiting)
            if waiting[0] == 0:
                break
            assert time.monotonic() < deadline, "the server did not read the decode process's reports"
            time.sleep(0.005)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self._loop).result(10)  # a report being read when it emptied

    @contextlib.contextmanager
    def paused_mid_decode(self, start: Callable[[], T], decoding: Callable[[], bool], what: str, attempts: int = 3) -> Iterator[T]:
        """paused(), with what start() began still decoding: decoding() holds once the reports sent before the pause
        are read.

        On a loaded machine a whole decode can end between seeing it run and the pause: start() is then called
        again, once the server is idle, up to `attempts` times.
        """
        for _ in range(attempts):
            began = start()
            self.wait_for(decoding, what=what)
            with self.paused():
                self.reports_read()
                if decoding():
                    yield began
                    return
            self.wait_for(lambda: self.metric("nmtserve_active_sequences") == 0 and self.metric("nmtserve_queue_depth") == 0,
                          timeout=60, what="the server idle after the attempt before")
        pytest.fail(f"{what}: it ended before the pause in each of {attempts} attempts")

    wait_for = staticmethod(wait_for)


@pytest.fixture(scope="session")
def serve_settings(tiny_bundle) -> ServeSettings:
    """Settings of a test server: loopback, free ports, CPU."""
    return ServeSettings(bundle=Path(tiny_bundle), host="127.0.0.1", port=0, metrics_port=0, device="cpu", grace_seconds=5.0)


@pytest.fixture(scope="session")
def start_server(serve_settings) -> Iterator[Callable[..., InProcessServer]]:
    """Start servers with some settings changed; each is stopped at the end of the session at the latest."""
    started: list[InProcessServer] = []

    def start(**changes) -> InProcessServer:
        server = InProcessServer(replace(serve_settings, **changes)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> InProcessServer:
    """One server with the default limits, shared by the tests that only send it traffic."""
    return start_server()


@pytest.fixture()
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture()
def stub(channel) -> translator_pb2_grpc.TranslatorStub:
    return translator_pb2_grpc.TranslatorStub(channel)


@pytest.fixture(scope="session")
def test_texts(tiny_bundle) -> list[str]:
    """Source sentences of the tiny model's held-out test split."""
    from nmtserve_export.evaluate import held_out_pairs

    return [pair.source for pair in held_out_pairs(read_bundle(tiny_bundle).manifest["training"])]


class Scrape:
    """One scrape of a metrics endpoint, as Prometheus sees it."""

    def __init__(self, port: int):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            self.text = response.read().decode()
        self.families = {family.name: family for family in text_string_to_metric_families(self.text)}

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value, or None where there is none."""
        for family in self.families.values():
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    return s.value
        return None


class ServeProcess:
    """`nmtserve serve` as a subprocess; its log (stderr) is read line by line to learn ports and events."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nmtserve.cli", "serve", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_event(self, event: str, timeout: float = START_TIMEOUT) -> str:
        """The first log line of an event; fails if the process exits or the time runs out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if f"event={event}" in line:
                    return line
            if self.process.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"server exited with {self.process.returncode} before event={event}:\n{self.log}")
            time.sleep(0.02)
        pytest.fail(f"no event={event} within {timeout}s:\n{self.log}")

    def port(self, name: str) -> int:
        match = re.search(rf"{name}=(\d+)", self.wait_for_event("listening"))
        assert match, self.log
        return int(match.group(1))

    def scrape(self) -> Scrape:
        return Scrape(self.port("metrics_port"))

    wait_for = staticmethod(wait_for)

    def wait(self, timeout: float = START_TIMEOUT) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """Kill the server and its processes: a decode process a failed test left stopped (SIGSTOP) would not see the
        server go, and would outlive the test run."""
        if self.process.poll() is None:
            children = psutil.Process(self.process.pid).children(recursive=True)
            self.process.kill()
            self.process.wait(10)
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()


@pytest.fixture()
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    """Run `nmtserve serve` subprocesses; any still running at the end of the test is killed."""
    processes: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        process = ServeProcess("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--device", "cpu", *args)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()
