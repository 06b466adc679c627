"""`nmtserve bench-serve` end to end on the tiny bundle: rounds of the engine alone, then a real server under a short load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from nmtserve_server import bench


@pytest.mark.e2e
def test_bench_serve_measures_the_engine_and_the_server(tiny_bundle, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nmtserve.cli", "bench-serve", str(tiny_bundle), "--streams", "4", "--seconds", "1",
         "--warm-up-seconds", "0.5", "--length", "4", "--rounds", "2", "--engine-seconds", "0.2", "--client-nice", "3",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench_serve.json").read_text())
    assert report["engine_tokens_per_second"] > 0 and report["served_tokens_per_second"] > 0
    # The client streams gave way to the server, which (with its decode process) kept the priority it started with.
    niceness = report["niceness"]
    assert niceness["decode process"] == niceness["server"] and niceness["client"] == min(19, niceness["server"] + 3)
    cost = report["cpu_ms_per_1000_tokens"]
    assert set(cost) == {"engine alone", "decode process", "server"} and all(ms > 0 for ms in cost.values())
    assert report["requests"] == len(report["time_to_first_token_seconds"]) > 0
    assert len(report["rounds"]) == 2 and report["requests"] == sum(r["requests"] for r in report["rounds"])
    assert all(r["engine_tokens_per_second"] > 0 and r["ratio"] > 0 for r in report["rounds"])
    assert all(r["foreign_load"] == (r["engine_waiting_cores"] is not None and r["engine_waiting_cores"] > bench.FOREIGN_LOAD_CORES)
               for r in report["rounds"])
    assert report["served_tokens_per_second"] == pytest.approx(report["requests"] * 4 / report["seconds"])  # 4 tokens each
    assert 0 < report["p50_time_to_first_token_seconds"] <= report["p99_time_to_first_token_seconds"]
    # The server's means cover the measured windows, where 4 streams keep at most 4 rows in a step.
    assert report["server"]["decode_step_seconds"] > 0 and 1 <= report["server"]["decode_step_batch_size"] <= 4
    assert 1 <= report["server"]["encoder_batch_size"] <= 4
    assert report["p99_ttft_over_budget_with_median_encoder_run"] > 0
    assert 0 < report["client_seconds_p50"] <= report["client_seconds_p99"]
    worst = report["furthest_over_budget_1_percent_means"]
    assert set(worst) == {"first_token_seconds", "encode_seconds", "budget_seconds"}
    assert worst["first_token_seconds"] > worst["encode_seconds"] > 0 and worst["budget_seconds"] > worst["encode_seconds"]
    # Cores each process used in the windows: the decode process and the server worked, none above the machine.
    assert set(report["served_cores"]) == {"decode process", "server", "client"}
    assert report["served_cores"]["decode process"] > 0 and report["served_cores"]["server"] > 0
    assert 0 < report["engine_cores"] <= report["cpu_count"] + 0.1
    assert sum(report["served_cores"].values()) <= report["cpu_count"] + 0.1
    # And the time each waited for a core, where the system tells (as Linux does).
    assert set(report["served_waiting_cores"]) == set(report["served_cores"])
    if sys.platform == "linux":
        assert report["engine_waiting_cores"] >= 0 and all(cores >= 0 for cores in report["served_waiting_cores"].values())
    assert (tmp_path / "bench_serve.png").stat().st_size > 0


def test_wait_seconds_counts_the_time_a_process_waits_for_a_core():
    """Three busy processes held to one core: each is running or waiting for it all the time, mostly waiting."""
    if bench.wait_seconds(os.getpid()) is None:
        pytest.skip("this system does not report run-queue waits (/proc/PID/task/*/schedstat)")
    core = min(os.sched_getaffinity(0))
    # Each pins itself before it says so and spins: the window below sees only the three on their core.
    busy = (f"import os, time\nos.sched_setaffinity(0, {{{core}}})\nprint('ready', flush=True)\n"
            "end = time.monotonic() + 10\nwhile time.monotonic() < end: pass")
    processes = [subprocess.Popen([sys.executable, "-c", busy], stdout=subprocess.PIPE) for _ in range(3)]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        meter = bench.CoreMeter({str(p.pid): p.pid for p in processes})
        meter.start()
        time.sleep(0.8)
        used, waited = meter.stop()
    finally:
        for process in processes:
            process.kill()
            process.wait(10)
    # Other work on the same core may take some of it (a busy CI machine), but never more than the one core is used,
    # and a process that spins is at every moment either running or waiting for the core.
    assert sum(used.values()) <= 1.1
    assert all(used[name] + waited[name] == pytest.approx(1.0, abs=0.15) for name in used)
    assert all(cores > 0.4 for cores in waited.values())  # each waited while the other two ran: about 2/3 of a core


def test_a_thread_that_ends_in_the_window_takes_no_earlier_wait_out_of_it():
    """Three threads of one process share one core; one ends 0.6 s into a 1 s window. The two that stay waited about
    1.2 cores' worth in it (2/3 of the core each while three shared it, 1/2 after): the ended thread's wait from before
    the window used to be taken out of theirs (0.54 measured)."""
    if bench.wait_seconds(os.getpid()) is None:
        pytest.skip("this system does not report run-queue waits (/proc/PID/task/*/schedstat)")
    core = min(os.sched_getaffinity(0))
    threads = (f"import hashlib, os, threading, time\nos.sched_setaffinity(0, {{{core}}})\ndata = b'x' * (1 << 20)\n"
               "def spin(seconds):\n    end = time.monotonic() + seconds\n    while time.monotonic() < end:\n"
               "        hashlib.sha256(data).digest()  # releases the GIL: the threads contend for the core itself\n"
               "for seconds in (4.0, 4.0, 1.6):\n    threading.Thread(target=spin, args=(seconds,)).start()\n"
               "time.sleep(1.0)\nprint('window', flush=True)\n")
    process = subprocess.Popen([sys.executable, "-c", threads], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline() == b"window\n"
        meter = bench.CoreMeter({"threads": process.pid})
        meter.start()
        time.sleep(1.0)
        _, waited = meter.stop()
    finally:
        process.kill()
        process.wait(10)
    assert waited["threads"] > 0.9
