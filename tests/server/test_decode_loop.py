"""The decode loop driven one iteration at a time over real pipes and a real engine, its intake thread running: a
newcomer is encoded without the loop's thread and joins at the next step, an idle loop gathers a burst into one encoder
run, the intake encodes no more than a batch ahead, a text withdrawn or late before it joins never takes rows, a text
whose encoding fails fails alone, and the loop stops on the server's stop or when its pipe closes."""

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

from nmtserve.bundle import read_bundle
from nmtserve_server.decode_loop import DecodeLoop, EngineSpec, Report, Text
from nmtserve_server.engine import Decoder, Engine, translate
from nmtserve_server.metrics import Metrics
from nmtserve_server.pipes import MessageReader, frame
from nmtserve_server.scheduler import EngineFailed, Scheduler
from nmtserve_server.search import DecodeOptions

CAPACITY = 8


@dataclass
class Harness:
    """A decode loop and the server's ends of its pipes."""

    loop: DecodeLoop
    to_loop: Connection
    from_loop: MessageReader

    def send(self, message: tuple) -> None:
        """Write a message as the server does (small ones: the pipe always has room)."""
        os.write(self.to_loop.fileno(), frame(message))

    def submit(self, key: int, source: list[int], length: int) -> None:
        options = DecodeOptions(min_length=length, max_length=length)
        self.send(("submit", [Text(key, source, options, None, time.monotonic(), stream=False)]))

    def reports(self) -> list[Report]:
        return self.from_loop.take()

    def iterate_until(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "the loop never got there"
            assert self.loop.iterate()


def _harness(tiny_bundle, max_queue_delay: float) -> Iterator[Harness]:
    engine = Engine.from_path(tiny_bundle, device="cpu", capacity=CAPACITY, threads=1)
    loop_inbox, to_loop = multiprocessing.Pipe(duplex=False)
    from_loop, loop_outbox = multiprocessing.Pipe(duplex=False)
    loop = DecodeLoop(Decoder(engine), loop_inbox, loop_outbox, max_queue_delay=max_queue_delay)
    loop.start()
    yield Harness(loop, to_loop, MessageReader(from_loop))
    to_loop.close()  # the intake reads the end of the pipe and stops
    loop.close()
    assert not loop.intake.is_alive()


@pytest.fixture()
def harness(tiny_bundle) -> Iterator[Harness]:
    yield from _harness(tiny_bundle, max_queue_delay=0.0)


@pytest.fixture()
def gathering_harness(tiny_bundle) -> Iterator[Harness]:
    yield from _harness(tiny_bundle, max_queue_delay=GATHER_SECONDS)


# A queue delay no machine's arrivals outlast: a gather ends by itself, once its texts speak for every free row.
GATHER_SECONDS = 60.0


def _handed_over(loop: DecodeLoop, events: int = 1, timeout: float = 10.0) -> None:
    """Wait, without iterating the loop, until the intake has handed it this many events."""
    _wait_for(lambda: loop.events.qsize() >= events, timeout)


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "it never happened"
        time.sleep(0.001)


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


def test_a_newcomer_is_started_without_the_loops_thread_and_joins_at_the_next_step(harness, test_texts):
    h, loop = harness, harness.loop
    engine = loop.decoder.engine
    first, second = engine.encode_texts(test_texts[:2])
    _start_long_text(h, first)
    (running,) = loop.decoder.active
    steps = running.search.step
    h.reports()  # text 0's
    h.submit(1, second, 5)
    _handed_over(loop)  # encoded and its first step run by the intake while the loop's thread did nothing
    started = h.reports()
    assert [key for r in started for key, _ in r.started] == [1], "the intake did not report the first token at once"
    assert all(r.active is None and not r.steps for r in started)
    assert loop.iterate()
    assert 1 in loop.running, "the started newcomer did not join at the next step"
    assert running.search.step == steps + 1 and len(loop.decoder.active) == 2
    assert loop.decoder.active[1].search.step == 2  # its first step, then the batch's
    assert 1 in [key for r in [*h.reports(), loop.report] for key, _ in r.admitted]
    finished = _finish(h, 2)
    alone = translate(engine, [second], DecodeOptions(min_length=5, max_length=5))[0]
    assert [hyp.tokens for hyp in finished[1]] == [hyp.tokens for hyp in alone]
    assert loop.decoder.rows_free() == CAPACITY


def test_a_text_its_first_step_ends_never_takes_rows(harness, test_texts):
    h, loop = harness, harness.loop
    (source,) = loop.decoder.engine.encode_texts(test_texts[:1])
    h.submit(1, source, 1)
    _handed_over(loop)
    reports = h.reports()  # the intake's, at once
    (finished,) = [hypotheses for r in reports for key, hypotheses in r.finished if key == 1]
    assert [key for r in reports for key, _ in r.admitted] == [1]
    options = DecodeOptions(min_length=1, max_length=1)
    assert [hyp.tokens for hyp in finished] == [hyp.tokens for hyp in translate(loop.decoder.engine, [source], options)[0]]
    assert loop.iterate()
    assert not loop.running and not loop.ready and loop.ahead == 0 and loop.decoder.rows_free() == CAPACITY


def test_an_idle_loop_gathers_a_burst_into_one_encoder_run(gathering_harness, test_texts):
    """The intake of an idle loop holds the first text of a burst for the rest, and encodes them in one run: here a
    burst that speaks for every row, which ends the gather at its last text, long before the delay."""
    h, loop = gathering_harness, gathering_harness.loop
    sources = loop.decoder.engine.encode_texts(test_texts[:CAPACITY])
    first_iteration = threading.Thread(target=loop.iterate)  # idle: it waits for the intake
    first_iteration.start()
    assert loop.idle.wait(10)
    h.submit(0, sources[0], 3)
    # Read by the intake and held: one that did not gather would have encoded it alone by now.
    _wait_for(lambda: len(loop.pending) == 1)
    for key, source in enumerate(sources[1:], start=1):
        h.submit(key, source, 3)
    first_iteration.join(GATHER_SECONDS / 2)
    assert not first_iteration.is_alive(), "the gather did not end when the burst spoke for every row"
    runs = [run for r in h.reports() for run in r.encoder_runs]
    assert [texts for texts, _ in runs] == [CAPACITY], "the burst was not encoded together"
    assert sorted(_finish(h, CAPACITY)) == list(range(CAPACITY))


def test_the_intake_starts_only_texts_the_batch_has_free_rows_for(harness, test_texts):
    """A first token means the text joins at the next step: texts past the free rows wait unstarted."""
    h, loop = harness, harness.loop
    first, *sources = loop.decoder.engine.encode_texts(test_texts[: CAPACITY + 5])
    _start_long_text(h, first)  # one row taken
    for key, source in enumerate(sources, start=1):
        h.submit(key, source, 3)
    _wait_for(lambda: len(loop.pending) == 5 and loop.ahead == CAPACITY - 1)  # the loop's thread has not taken any
    time.sleep(0.1)
    assert len(loop.pending) == 5 and loop.ahead == CAPACITY - 1, "the intake started texts the batch has no rows for"
    finished = _finish(h, CAPACITY + 5)  # rows coming free: the loop wakes the intake for the rest
    assert sorted(finished) == list(range(CAPACITY + 5))
    assert loop.ahead == 0 and not loop.pending and loop.decoder.rows_free() == CAPACITY


def test_a_text_waiting_for_rows_may_have_a_deadline_months_away(harness, test_texts):
    """Its deadline bounds the intake's wait: one beyond what epoll takes (about 24.8 days) must not end the intake."""
    h, loop = harness, harness.loop
    first, second = loop.decoder.engine.encode_texts(test_texts[:2])
    _start_long_text(h, first)  # one row taken: a beam as wide as the batch waits
    options = DecodeOptions(beam_size=CAPACITY, min_length=3, max_length=3)
    h.send(("submit", [Text(1, second, options, time.monotonic() + 90 * 86400, time.monotonic(), stream=False)]))
    _wait_for(lambda: loop.starved)
    time.sleep(0.1)
    assert loop.intake.is_alive() and loop.events.empty(), "the intake stopped"
    assert sorted(_finish(h, 2)) == [0, 1]


def test_a_text_cancelled_while_queued_is_never_encoded(harness, test_texts):
    h, loop = harness, harness.loop
    first, second = loop.decoder.engine.encode_texts(test_texts[:2])
    _start_long_text(h, first)
    h.reports()  # text 0's
    options = DecodeOptions(min_length=5, max_length=5)
    submit = frame(("submit", [Text(1, second, options, None, time.monotonic(), stream=False)]))
    os.write(h.to_loop.fileno(), submit + frame(("cancel", [1])))  # read together: the cancel finds it queued
    _handed_over(loop)
    assert loop.iterate()
    reports = [*h.reports(), loop.report]
    assert not any(r.encoder_runs for r in reports), "the cancelled text was encoded"
    assert 1 not in loop.running and loop.decoder.rows_free() == CAPACITY - 1 and loop.ahead == 0


def test_a_text_withdrawn_after_its_encoder_run_never_takes_rows(harness, test_texts):
    h, loop = harness, harness.loop
    first, second = loop.decoder.engine.encode_texts(test_texts[:2])
    _start_long_text(h, first)
    h.reports()  # text 0's
    h.submit(1, second, 5)
    _handed_over(loop)  # encoded, not yet taken by the loop
    h.send(("cancel", [1]))
    _handed_over(loop, events=2)
    assert loop.iterate()
    assert 1 not in loop.running and loop.decoder.rows_free() == CAPACITY - 1 and loop.ahead == 0
    reports = [*h.reports(), loop.report]  # the iteration had no news to send at once
    assert [texts for r in reports for texts, _ in r.encoder_runs] == [1]
    assert not any(key == 1 for r in reports for key, *_ in r.admitted)


def test_a_text_late_before_it_joins_leaves_as_late(harness, test_texts):
    h, loop = harness, harness.loop
    first, second = loop.decoder.engine.encode_texts(test_texts[:2])
    _start_long_text(h, first)
    options = DecodeOptions(min_length=5, max_length=5)
    h.send(("submit", [Text(1, second, options, time.monotonic(), time.monotonic(), stream=False)]))  # already past
    reports: list[Report] = []
    h.iterate_until(lambda: bool(reports.extend(h.reports())) or any(1 in r.late for r in reports))
    assert not any(key == 1 for r in reports for key, *_ in r.admitted)
    assert 1 not in loop.running and not loop.ready and loop.decoder.rows_free() == CAPACITY - 1


def test_a_text_late_after_its_first_token_leaves_as_late_without_taking_rows(harness, test_texts):
    h, loop = harness, harness.loop
    (source,) = loop.decoder.engine.encode_texts(test_texts[:1])
    options = DecodeOptions(min_length=5, max_length=5)
    deadline = time.monotonic() + 2.0
    h.send(("submit", [Text(1, source, options, deadline, time.monotonic(), stream=True)]))
    _handed_over(loop)  # started by the intake: its first token is out
    started = h.reports()
    assert [key for r in started for key, _ in r.started] == [1] and [s[0] for r in started for s in r.streamed] == [1]
    time.sleep(max(0.0, deadline - time.monotonic()) + 0.05)  # its deadline passes before the loop's thread takes it
    assert loop.iterate()
    reports = [*h.reports(), loop.report]
    assert [key for r in reports for key in r.late] == [1]
    assert not any(r.admitted or r.finished for r in reports)
    assert not loop.running and not loop.ready and loop.ahead == 0 and loop.decoder.rows_free() == CAPACITY


def test_a_text_whose_encoding_fails_fails_alone(harness, test_texts):
    h, loop = harness, harness.loop
    engine = loop.decoder.engine
    first, second = engine.encode_texts(test_texts[:2])
    _start_long_text(h, first)
    too_long = second * (engine.max_source_length // len(second) + 1)  # past the server's checks: the encoder refuses it
    h.submit(2, too_long, 5)
    failed: list[Report] = []
    h.iterate_until(lambda: bool(failed.extend(r for r in h.reports() if r.failed)) or bool(failed))
    ((key, error),) = failed[0].failed
    assert key == 2 and "longer than the model's limit" in error
    assert 0 in loop.running and 2 not in loop.running, "the batch did not decode on"
    h.iterate_until(lambda: not loop.running)
    assert loop.decoder.rows_free() == CAPACITY


@pytest.mark.parametrize("how", ["stop message", "pipe closed"])
def test_the_loop_stops_on_the_servers_stop_or_when_its_pipe_closes(harness, test_texts, how):
    h, loop = harness, harness.loop
    (source,) = loop.decoder.engine.encode_texts(test_texts[:1])
    _start_long_text(h, source)
    if how == "stop message":
        h.send(("stop", None))
    else:
        h.to_loop.close()
    deadline = time.monotonic() + 10
    while loop.iterate():
        assert time.monotonic() < deadline, "the loop did not stop"
    loop.intake.join(10)
    assert not loop.intake.is_alive()


def test_a_message_half_written_waits_for_its_rest(harness, test_texts):
    """The server writes what a full pipe takes and the rest later: the intake takes only whole messages."""
    h, loop = harness, harness.loop
    (source,) = loop.decoder.engine.encode_texts(test_texts[:1])
    options = DecodeOptions(min_length=3, max_length=3)
    data = frame(("submit", [Text(1, source, options, None, time.monotonic(), stream=False)]))
    os.write(h.to_loop.fileno(), data[:5])  # not even the whole length
    time.sleep(0.05)
    os.write(h.to_loop.fileno(), data[5:-1])
    time.sleep(0.05)
    assert loop.events.empty(), "the intake acted on part of a message"
    os.write(h.to_loop.fileno(), data[-1:] + frame(("cancel", [2])))
    _handed_over(loop, events=2)  # the cancel, passed on at once, and the encoder run
    assert loop.iterate() and 1 in loop.running
    assert [hyp.tokens for hyp in _finish(h, 1)[1]] == [hyp.tokens for hyp in translate(loop.decoder.engine, [source], options)[0]]


def test_the_decode_process_refuses_a_bundle_other_than_the_servers(tiny_bundle):
    """The server reads the bundle, then its decode process reads it again by path: had the path changed between the
    two (a re-export into it, a moved symlink), they would serve different models."""
    spec = EngineSpec(str(tiny_bundle), "0" * 64, "cpu", CAPACITY, 1, 1)
    scheduler = Scheduler(Metrics(), max_queue_size=4, max_queue_delay=0.0)
    with pytest.raises(EngineFailed, match="changed while the server started: its manifest's sha256 is now [0-9a-f]{64}"):
        asyncio.run(scheduler.start(spec, log_level="warning"))
    asyncio.run(scheduler.stop())  # closes the pipes


def test_a_stop_while_the_decode_process_loads_ends_the_start(tiny_bundle):
    """A server stopped while its decode process loads: start() must end, not wait for a message that never comes."""
    spec = EngineSpec(str(tiny_bundle), read_bundle(tiny_bundle).sha256, "cpu", CAPACITY, 1, 1)

    async def main() -> None:
        scheduler = Scheduler(Metrics(), max_queue_size=4, max_queue_delay=0.0)
        starting = asyncio.create_task(scheduler.start(spec, log_level="warning"))
        await asyncio.sleep(0)  # start() has started the process and waits for it
        await scheduler.stop()
        with pytest.raises(EngineFailed, match=r"the server stopped while the decode process was loading \(signal=SIGKILL\)"):
            await asyncio.wait_for(starting, 30)

    asyncio.run(main())


def test_a_draining_scheduler_still_takes_the_texts_of_calls_admitted_before_the_drain(tiny_bundle):
    """A call admitted before SIGTERM may send its texts after it, once tokenized in a thread: they are served."""
    bundle = read_bundle(tiny_bundle)
    spec = EngineSpec(str(tiny_bundle), bundle.sha256, "cpu", CAPACITY, 1, 1)

    async def main() -> None:
        scheduler = Scheduler(Metrics(), max_queue_size=4, max_queue_delay=0.0)
        await scheduler.start(spec, log_level="warning")
        try:
            scheduler.drain()
            assert not scheduler.accepting  # a new call is refused before it gets here
            (job,) = scheduler.submit([[bundle.tokens.unk, bundle.tokens.eos]], DecodeOptions(min_length=3, max_length=3))
            (hypothesis,) = await asyncio.wait_for(job.future, 30)  # decoded, not refused as "server is draining"
            assert 2 <= len(hypothesis.tokens) <= 3  # <eos> at the third step, or none
        finally:
            await scheduler.stop()

    asyncio.run(main())
