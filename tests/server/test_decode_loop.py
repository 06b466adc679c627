"""The decode loop driven one iteration at a time over real pipes and a real engine: the encoder runs beside the
decoder steps, newcomers do not wait behind a long encoder run, a text withdrawn during its encoder run never takes rows,
and a text whose encoding fails fails alone."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

import pytest

from nmtserve_server.decode_loop import DecodeLoop, EngineSpec, Report, Text
from nmtserve_server.engine import Decoder, Engine, translate
from nmtserve_server.metrics import Metrics
from nmtserve_server.pipes import frame
from nmtserve_server.scheduler import EngineFailed, Scheduler
from nmtserve_server.search import DecodeOptions

CAPACITY = 8


@dataclass
class Harness:
    """A decode loop and the server's ends of its pipes."""

    loop: DecodeLoop
    to_loop: Connection
    from_loop: Connection

    def send(self, message: tuple) -> None:
        """Write a message as the server does (small ones: the pipe always has room)."""
        os.write(self.to_loop.fileno(), frame(message))

    def submit(self, key: int, source: list[int], length: int) -> None:
        options = DecodeOptions(min_length=length, max_length=length)
        self.send(("submit", [Text(key, source, options, None, time.monotonic(), stream=False)]))

    def reports(self) -> list[Report]:
        reports = []
        while self.from_loop.poll(0):
            reports.append(self.from_loop.recv())
        return reports

    def iterate_until(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "the loop never got there"
            assert self.loop.iterate()


@pytest.fixture()
def harness(tiny_bundle) -> Iterator[Harness]:
    engine = Engine.from_path(tiny_bundle, device="cpu", capacity=CAPACITY, threads=1)
    loop_inbox, to_loop = multiprocessing.Pipe(duplex=False)
    from_loop, loop_outbox = multiprocessing.Pipe(duplex=False)
    loop = DecodeLoop(Decoder(engine), loop_inbox, loop_outbox, max_queue_delay=0.0)
    yield Harness(loop, to_loop, from_loop)
    loop.encoder.shutdown()


def _finish(h: Harness, texts: int) -> dict[int, list]:
    """Iterate until `texts` texts have finished; their hypotheses by key."""
    finished: dict[int, list] = {}

    def all_finished() -> bool:
        finished.update((key, hypotheses) for r in h.reports() for key, hypotheses in r.finished)
        return len(finished) >= texts

    h.iterate_until(all_finished)
    return finished


def _start_long_text(h: Harness, source: list[int]) -> None:
    """Submit text 0, as long as the model allows, and iterate until it is in the batch."""
    h.submit(0, source, h.loop.decoder.engine.max_target_length)
    h.iterate_until(lambda: 0 in h.loop.running)


def test_the_batch_steps_while_a_newcomer_is_encoded_then_the_newcomer_joins(harness, test_texts):
    h, loop = harness, harness.loop
    engine = loop.decoder.engine
    first, second = engine.encode_texts(test_texts[:2])
    _start_long_text(h, first)
    (running,) = loop.decoder.active
    steps = running.search.step
    h.submit(1, second, 5)
    assert loop.iterate()
    assert loop.encoding is not None and list(loop.encoding.texts) == [1], "the newcomer did not go to the encoder"
    assert 1 not in loop.running and running.search.step == steps + 1, "the batch did not step beside the encoder run"
    h.iterate_until(lambda: 1 in loop.running)
    finished = _finish(h, 2)
    alone = translate(engine, [second], DecodeOptions(min_length=5, max_length=5))[0]
    assert [hyp.tokens for hyp in finished[1]] == [hyp.tokens for hyp in alone]
    assert loop.decoder.rows_free() == CAPACITY


def test_a_newcomer_does_not_wait_behind_a_long_encoder_run(harness, test_texts):
    h, loop = harness, harness.loop
    engine = loop.decoder.engine
    first, second, third = engine.encode_texts(test_texts[:3])
    _start_long_text(h, first)
    release = threading.Event()
    loop.encoder.submit(release.wait, 30)  # the encoder thread is busy: the next run stays in flight until released
    try:
        h.submit(1, second, 5)
        assert loop.iterate()
        assert loop.encoding is not None and list(loop.encoding.texts) == [1]
        time.sleep(10 * loop.last_step)  # the run in flight now outlasts a step
        h.submit(2, third, 5)
        assert loop.iterate()
        assert 2 in loop.running and 1 not in loop.running, "the newcomer waited behind the run in flight"
    finally:
        release.set()
    h.iterate_until(lambda: 1 in loop.running)
    finished = _finish(h, 3)
    for key, source in ((1, second), (2, third)):
        alone = translate(engine, [source], DecodeOptions(min_length=5, max_length=5))[0]
        assert [hyp.tokens for hyp in finished[key]] == [hyp.tokens for hyp in alone]


def test_a_text_withdrawn_during_its_encoder_run_never_takes_rows(harness, test_texts):
    h, loop = harness, harness.loop
    first, second = loop.decoder.engine.encode_texts(test_texts[:2])
    _start_long_text(h, first)
    h.submit(1, second, 5)
    assert loop.iterate()
    assert loop.encoding is not None and 1 in loop.encoding.texts
    assert h.reports()[-1].rows_free == CAPACITY - 2, "the rows kept for the encoder run were reported free"
    h.send(("cancel", [1]))
    h.iterate_until(lambda: loop.encoding is None)
    assert 1 not in loop.running and loop.decoder.rows_free() == CAPACITY - 1
    reports = h.reports()
    assert not any(key == 1 for r in reports for key, *_ in r.admitted)
    assert reports[-1].rows_free == CAPACITY - 1


@pytest.mark.parametrize("where", ["encoder thread", "loop thread"])
def test_a_text_whose_encoding_fails_fails_alone(harness, test_texts, where):
    h, loop = harness, harness.loop
    engine = loop.decoder.engine
    first, second = engine.encode_texts(test_texts[:2])
    _start_long_text(h, first)
    too_long = second * (engine.max_source_length // len(second) + 1)  # past the server's checks: the encoder refuses it
    release = threading.Event()
    if where == "loop thread":  # a long run in flight: the loop encodes the newcomer itself
        loop.encoder.submit(release.wait, 30)
        h.submit(1, second, 5)
        assert loop.iterate()
        time.sleep(10 * loop.last_step)
    try:
        h.submit(2, too_long, 5)
        h.iterate_until(lambda: any(2 in r.failed for r in h.reports()))
    finally:
        release.set()
    assert 0 in loop.running and 2 not in loop.running, "the batch did not decode on"
    h.iterate_until(lambda: not loop.running and not loop.encoding)
    assert loop.decoder.rows_free() == CAPACITY


def test_a_message_half_written_waits_for_its_rest(harness, test_texts):
    """The server writes what a full pipe takes and the rest later: the loop takes only whole messages."""
    h, loop = harness, harness.loop
    (source,) = loop.decoder.engine.encode_texts(test_texts[:1])
    options = DecodeOptions(min_length=3, max_length=3)
    data = frame(("submit", [Text(1, source, options, None, time.monotonic(), stream=False)]))
    os.write(h.to_loop.fileno(), data[:5])  # not even the whole length
    assert loop.iterate() and not loop.waiting and not loop.encoding and not loop.running
    os.write(h.to_loop.fileno(), data[5:-1])
    assert loop.iterate() and not loop.waiting and not loop.encoding and not loop.running
    os.write(h.to_loop.fileno(), data[-1:] + frame(("cancel", [2])))
    assert loop.iterate()
    assert 1 in loop.running or (loop.encoding is not None and 1 in loop.encoding.texts)
    assert [hyp.tokens for hyp in _finish(h, 1)[1]] == [hyp.tokens for hyp in translate(loop.decoder.engine, [source], options)[0]]


def test_the_decode_process_refuses_a_bundle_other_than_the_servers(tiny_bundle):
    """The server reads the bundle, then its decode process reads it again by path: had the path changed between the
    two (a re-export into it, a moved symlink), they would serve different models."""
    spec = EngineSpec(str(tiny_bundle), "0" * 64, "cpu", CAPACITY, 1, 1)
    scheduler = Scheduler(Metrics(), max_queue_size=4, max_queue_delay=0.0)
    with pytest.raises(EngineFailed, match="changed while the server started: its manifest's sha256 is now [0-9a-f]{64}"):
        asyncio.run(scheduler.start(spec, log_level="warning"))
    asyncio.run(scheduler.stop())  # closes the pipes
