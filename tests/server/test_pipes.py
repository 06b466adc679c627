"""The pipes between the server and the decode process: a reader takes only whole messages and never waits for the
rest of one, whichever side wrote it."""

from __future__ import annotations

import array
import fcntl
import os
import signal
import subprocess
import sys
import termios
import time
from multiprocessing.connection import Connection

import pytest

from nmtserve_server.pipes import MessageReader, frame

KIB = 256  # the report's size: four times a pipe's default capacity


def _report(kib: int) -> tuple[str, bytes]:
    return ("report", bytes(range(256)) * 4 * kib)


# The decode process's side, in a process of its own that the test can stop in the middle of a report.
WRITER = """
import sys
from multiprocessing.connection import Connection
from nmtserve_server.pipes import write_message
from test_pipes import _report
write_message(Connection(int(sys.argv[1])), _report(int(sys.argv[2])))
"""


def _bytes_waiting(fd: int) -> int:
    waiting = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, waiting)
    return waiting[0]


def test_a_report_larger_than_the_pipe_arrives_whole_and_its_reader_never_waits_for_the_rest():
    """The decode process loses its core in the middle of a large report: the server's event loop reads what has
    come and goes on, and takes the report once its last byte is there."""
    read_fd, write_fd = os.pipe()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(write_fd), str(KIB)], pass_fds=(write_fd,),
                              env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)})
    os.close(write_fd)
    reader = MessageReader(Connection(read_fd))
    try:
        capacity = fcntl.fcntl(read_fd, fcntl.F_GETPIPE_SZ)
        deadline = time.monotonic() + 30
        while _bytes_waiting(read_fd) < capacity:  # the writer is blocked on a full pipe, in the middle of the report
            assert writer.poll() is None, "the writer ended before filling the pipe"
            assert time.monotonic() < deadline, "the writer never filled the pipe"
            time.sleep(0.01)
        writer.send_signal(signal.SIGSTOP)
        try:
            assert reader.take() == [], "a part of a message was taken as a message"
            assert reader.take() == []  # and it returns at once again: nothing new has come
        finally:
            writer.send_signal(signal.SIGCONT)
        messages = []
        while not messages:
            assert time.monotonic() < deadline, "the rest of the report never came"
            messages = reader.take()
            time.sleep(0.001)
        assert messages == [_report(KIB)]
        assert writer.wait(30) == 0
        with pytest.raises(EOFError):  # the writing end has closed
            reader.take()
    finally:
        writer.kill()
        writer.wait()
        reader.connection.close()


def test_the_last_message_before_the_writer_closes_is_taken_before_the_end():
    """A decode process that fails to load writes LoadFailed and exits: its reason must reach the server, even when the
    message and the end of the pipe are read together."""
    read_fd, write_fd = os.pipe()
    reader = MessageReader(Connection(read_fd))
    try:
        os.write(write_fd, frame(("LoadFailed", "no such bundle")) + frame(("last", 2))[:-1])
        os.close(write_fd)
        assert reader.take() == [("LoadFailed", "no such bundle")]
        with pytest.raises(EOFError):  # and the half-written one after it is not a message
            reader.take()
    finally:
        reader.connection.close()
