"""Moving a body between two sockets with splice(2): socket -> pipe -> socket, in the kernel, no copy
through Python. Only file descriptors and the event loop's readiness callbacks; no HTTP in here.

Each socket is owned by an asyncio transport, and event loops refuse to poll a descriptor a transport
owns: the relay polls a duplicate (os.dup) of it, which shares the socket (and its O_NONBLOCK). The
transports must not read or write meanwhile: their caller pauses reading and leaves the writing alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from typing import Protocol, Self

SUPPORTED = hasattr(os, "splice")
# Bytes a pipe holds between the two splices: at most this much of a body is in flight per transfer. On
# loopback 64 KiB, 256 KiB and 1 MiB cost the same CPU a GiB within noise (system time, the TCP stack's,
# is most of it); an unprivileged user's pipes share 64 MiB (fs.pipe-user-pages-soft), 256 of these.
PIPE_BYTES = 256 * 1024
_MOVE = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if SUPPORTED else 0
_MORE = os.SPLICE_F_MORE if SUPPORTED else 0


class Waits(Protocol):
    """A deadline over the waits for one side (proxy.forwarding.WaitDeadline)."""

    def waiting(self) -> float: ...

    def done(self) -> float: ...

    def expired(self) -> bool: ...


class SpliceStopped(Exception):
    """The relay could not go on. `side`: "source" or "sink"; `reason`: "closed" (its end of the
    stream before `count` bytes), "timeout" (its deadline ran out), or the system's word for an error."""

    def __init__(self, side: str, reason: str):
        super().__init__(f"{side} {reason}")
        self.side = side
        self.reason = reason


class Pipe:
    """A non-blocking pipe of about PIPE_BYTES; both ends closed on exit, whatever happened."""

    def __init__(self, size: int = PIPE_BYTES) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            pass  # over the user's pipe allowance: the default size works too, only with more turns
        self.size = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def duplicates(*fds: int) -> Iterator[tuple[int, ...]]:
    """Descriptors of the same sockets the event loop may poll; closed on exit."""
    opened: list[int] = []
    try:
        for fd in fds:
            opened.append(os.dup(fd))
        yield tuple(opened)
    finally:
        for fd in opened:
            os.close(fd)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def wait_ready(fd: int, writable: bool, waits: Waits, side: str) -> float:
    """Until `fd` is readable (or writable), within `waits`' deadline; returns the seconds waited."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    if writable:
        loop.add_writer(fd, _wake, future)
    else:
        loop.add_reader(fd, _wake, future)
    waits.waiting()
    try:
        await future
    except asyncio.CancelledError:
        if waits.expired():
            raise SpliceStopped(side, "timeout") from None
        raise
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
    return waits.done()


async def flushed(transport: asyncio.WriteTransport, fd: int, waits: Waits) -> None:
    """Until `transport` has written out all it holds to its socket (`fd`, a duplicate), so that what goes
    to the socket next comes after it."""
    while transport.get_write_buffer_size():
        await wait_ready(fd, True, waits, "sink")


async def send_all(fd: int, data: bytes, waits: Waits) -> None:
    """Write `data` to a non-blocking socket, waiting (within `waits`) while it is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await wait_ready(fd, True, waits, "sink")
        except OSError as error:
            raise SpliceStopped("sink", _reason(error)) from error


class Transfer:
    """A body's way from socket `source` to socket `sink` through `pipe`; `delivered`: the bytes the sink
    took so far, however the transfer ends."""

    def __init__(self, source: int, sink: int, pipe: Pipe) -> None:
        self.source, self.sink, self.pipe = source, sink, pipe
        self.delivered = 0

    async def move(
        self, count: int, source_waits: Waits, sink_waits: Waits,
        source_waited: Callable[[float, int], None] | None = None,
    ) -> None:  # fmt: skip
        """Move exactly `count` bytes more. Waits only when no splice can make progress: for the sink while
        the pipe holds bytes it refuses, else for the source. `source_waited(seconds, bytes)` is told after
        each wait for the source how long it took and how many bytes came since the previous one (a minimum
        rate is checked there)."""
        source, sink, pipe = self.source, self.sink, self.pipe
        end = self.delivered + count
        received = self.delivered
        fresh = 0
        ended: str | None = None  # why the source gave no more: what the pipe holds still goes to the sink
        while self.delivered < end:
            held = received - self.delivered
            if ended is None and received < end and held < pipe.size:
                try:
                    moved = os.splice(source, pipe.write_fd, min(end - received, pipe.size - held), flags=_MOVE)
                except BlockingIOError:
                    pass  # no data yet, or no pipe slot left: told apart below by what the pipe holds
                except OSError as error:
                    ended = _reason(error)
                else:
                    if moved == 0:
                        ended = "closed"
                    received += moved
                    fresh += moved
                    held += moved
            if held:
                try:
                    sent = os.splice(pipe.read_fd, sink, held, flags=_MOVE | (_MORE if received < end else 0))
                except BlockingIOError:
                    await wait_ready(sink, True, sink_waits, "sink")
                    continue
                except OSError as error:
                    raise SpliceStopped("sink", _reason(error)) from error
                if sent == 0:
                    raise SpliceStopped("sink", "closed")
                self.delivered += sent
            elif ended is not None:
                raise SpliceStopped("source", ended)
            else:
                waited = await wait_ready(source, False, source_waits, "source")
                if source_waited is not None:
                    source_waited(waited, fresh)
                fresh = 0


def _reason(error: OSError) -> str:
    return error.strerror.lower() if error.strerror else error.__class__.__name__
