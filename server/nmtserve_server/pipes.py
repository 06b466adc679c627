"""The server's messages to the decode loop, framed so that neither side ever waits on the pipe between them.

The server writes on its event loop, which must never block: a full pipe (the
loop busy in a step while a burst of texts arrives) keeps the rest of a message
for the event loop to write when the pipe has room. The decode loop writes its
reports whole, waiting while the pipe is full, since the server reads them as
they come. Both readers take whatever has arrived and only whole messages, never
waiting for the rest of one half written: the server's event loop must not wait
for a decode process that lost its core in the middle of a large report. A
message on the pipe is its pickle's length (8 bytes, big-endian), then the
pickle.
"""

from __future__ import annotations

import asyncio
import os
import pickle
from multiprocessing.connection import Connection
from typing import Any

HEADER_BYTES = 8
READ_BYTES = 1 << 16  # a Linux pipe's default capacity


def frame(message: Any) -> bytes:
    """A message as written to the pipe: the length of its pickle, then the pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(HEADER_BYTES, "big") + data


class MessageWriter:
    """The server's end: writes messages in order and never blocks the event loop; what a full pipe does not take
    now, the event loop writes as the pipe drains."""

    def __init__(self, connection: Connection, loop: asyncio.AbstractEventLoop):
        self.connection = connection
        self._fd = connection.fileno()
        self._loop = loop
        self._pending = bytearray()  # written to no one yet: the pipe was full
        os.set_blocking(self._fd, False)

    @property
    def pending_bytes(self) -> int:
        """Bytes waiting for room in the pipe."""
        return len(self._pending)

    def send(self, message: Any) -> None:
        """Write a message, or keep the part the pipe has no room for to write as it drains; raises OSError
        (BrokenPipeError) where the write finds the reader gone (a later flush drops what waits instead)."""
        data = frame(message)
        if self._pending:  # behind earlier bytes, in order
            self._pending += data
            return
        written = self._write(data)
        if written < len(data):
            self._pending += data[written:]
            self._loop.add_writer(self._fd, self._flush)

    def close(self) -> None:
        """Drop what is still waiting, and close the pipe."""
        if self._pending:
            self._loop.remove_writer(self._fd)
            self._pending.clear()
        self.connection.close()

    def _write(self, data: bytes | bytearray) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0

    def _flush(self) -> None:
        """The pipe has room: write what waits (called by the event loop)."""
        try:
            written = self._write(self._pending)
        except OSError:  # the reader has gone; its own pipe's end tells the server (Scheduler._lost)
            written = len(self._pending)
        del self._pending[:written]
        if not self._pending:
            self._loop.remove_writer(self._fd)


def write_message(connection: Connection, message: Any) -> None:
    """Write a message whole, waiting while the pipe is full (the decode loop's reports); raises BrokenPipeError where
    the reader has gone."""
    fd = connection.fileno()
    with memoryview(frame(message)) as data:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])


class MessageReader:
    """A reading end (the decode loop's inbox, the server's reports): the messages that have arrived whole, never
    waiting for the rest of one."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self._fd = connection.fileno()
        self._buffer = bytearray()  # received, not yet a whole message
        self._closed = False  # the writing end has closed
        os.set_blocking(self._fd, False)

    def take(self) -> list[Any]:
        """The whole messages received so far, in order; raises EOFError once the writing end is closed and every
        message written before has been taken."""
        while not self._closed:
            try:
                chunk = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                break
            self._buffer += chunk
            self._closed = not chunk
        messages, start = [], 0
        with memoryview(self._buffer) as view:  # released before the buffer is cut: a bytearray in view cannot resize
            while len(view) - start >= HEADER_BYTES:
                end = start + HEADER_BYTES + int.from_bytes(view[start : start + HEADER_BYTES], "big")
                if end > len(view):
                    break
                messages.append(pickle.loads(view[start + HEADER_BYTES : end]))
                start = end
        del self._buffer[:start]
        if self._closed and not messages:  # a writer's last message (LoadFailed, say) is taken before its end
            raise EOFError("the writing end closed the pipe")
        return messages
