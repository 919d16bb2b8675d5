"""Budgets and deadlines that keep one client set from taking the gateway down: connections, upstream
slots per client, memory for buffered manifests, write deadlines and a minimum upload rate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.errors import (
    RETRY_AFTER_SECONDS,
    SERVER_BUSY,
    UPSTREAM_BUSY,
    GatewayError,
    error_body,
)
from proxy.forwarding import RateFloor, StreamAborted, WaitDeadline
from proxy.logs import log_event

logger = logging.getLogger("foreign_layer_proxy.limits")

# A refused connection gets this long to send its request head before it is closed unanswered.
REFUSAL_GRACE_SECONDS = 5.0
HEAD_REFUSAL_LINGER_SECONDS = 2.0
REFUSAL_HEAD_BYTES = 16 * 1024


def raise_open_file_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard limit (as Go's runtime does at start); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


# Connections -----------------------------------------------------------------------------------------


class Connections:
    """The client connections being served, and which of them have a request in progress.

    At `limit`, a new connection takes the place of the oldest one with no request in progress (idle
    keep-alive, or still sending its head); when every connection is busy it is answered 503. A request
    head longer than `max_head_size` is answered 431 and its connection closed."""

    def __init__(self, limit: int, max_head_size: int) -> None:
        self.limit = limit
        self.max_head_size = max_head_size
        self._busy: set[web.RequestHandler] = set()
        self._counted: dict[web.RequestHandler, HeadLimited] = {}  # in the order they were accepted

    def enter(self, handler: web.RequestHandler) -> None:
        self._busy.add(handler)

    def leave(self, handler: web.RequestHandler, body_read: bool) -> None:
        """A request is done; unless its body was left unread (aiohttp then discards it or closes the
        connection), what the connection sends next is a request head again."""
        self._busy.discard(handler)
        counted = self._counted.get(handler)
        if counted is not None and body_read:
            counted.expect_head()

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The listener's protocol factory. Connections are counted here, as they are accepted: aiohttp's
        own count grows only once each connection_made has run, after a whole burst was accepted."""

        def make() -> asyncio.Protocol:
            if len(self._counted) >= self.limit:
                idle = next((handler for handler in self._counted if handler not in self._busy), None)
                if idle is None:
                    return Refusal(SERVER_BUSY_ANSWER)
                self.forget(idle)
                idle.force_close()
            handler = server()
            counted = self._counted[handler] = HeadLimited(handler, self)
            return counted

        return make

    def forget(self, handler: web.RequestHandler) -> None:
        self._busy.discard(handler)
        self._counted.pop(handler, None)


def canned_answer(status_line: bytes, code: str, message: str) -> bytes:
    body = error_body(code, message)
    return (
        b"HTTP/1.1 " + status_line + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Retry-After: %d\r\n"
        b"Connection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s"
    ) % (RETRY_AFTER_SECONDS, len(body), body)


SERVER_BUSY_ANSWER = canned_answer(b"503 Service Unavailable", SERVER_BUSY.code, SERVER_BUSY.message)
HEAD_TOO_LARGE_ANSWER = canned_answer(
    b"431 Request Header Fields Too Large", "SIZE_INVALID", "request head too large for a registry request"
)
HEAD_END = b"\r\n\r\n"


class HeadLimited(asyncio.Protocol):
    """aiohttp's request handler behind a count of request-head bytes: aiohttp bounds each header line, not
    the head, so a hundred unfinished heads could otherwise hold a MiB each."""

    def __init__(self, handler: web.RequestHandler, connections: Connections) -> None:
        self.handler = handler
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.head_bytes: int | None = 0  # None: the head is in, the body (if any) is not counted
        self.tail = b""
        self.closing: asyncio.TimerHandle | None = None

    def expect_head(self) -> None:
        self.head_bytes, self.tail = 0, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if self.head_bytes is not None:
            end = (self.tail + data).find(HEAD_END)
            counted = len(data) if end == -1 else end - len(self.tail)
            self.head_bytes += counted
            if self.head_bytes > self.connections.max_head_size:
                self.refuse(self.transport)
                return
            if end == -1:
                self.tail = data[-3:]
            else:
                self.head_bytes = None
        self.handler.data_received(data)

    def refuse(self, transport: asyncio.Transport) -> None:
        """431 and closed; what the client still sends meanwhile is read and dropped for a moment: a connection
        closed with unread bytes is reset, and the client loses the answer while it is still sending its head."""
        self.transport = None
        transport.write(HEAD_TOO_LARGE_ANSWER)
        if transport.can_write_eof():
            transport.write_eof()
        self.closing = asyncio.get_running_loop().call_later(HEAD_REFUSAL_LINGER_SECONDS, transport.close)

    def eof_received(self) -> None:
        self.handler.eof_received()  # returns nothing: the transport closes, a refused one included

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closing is not None:
            self.closing.cancel()
        self.connections.forget(self.handler)
        self.handler.connection_lost(exc)


class Refusal(asyncio.Protocol):
    """A connection over server.max_connections: once its request head is in, it is answered 503 and closed,
    without a request handler (and its buffers) behind it."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.transport: asyncio.Transport | None = None
        self.received = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_GRACE_SECONDS, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.received = (self.received + data)[-REFUSAL_HEAD_BYTES:]
        if HEAD_END in self.received or len(self.received) >= REFUSAL_HEAD_BYTES:
            self.transport.write(self.answer)
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None


class BudgetedSite(web.BaseSite):
    """A TCP listener whose connections go through `Connections` before aiohttp's request handler."""

    __slots__ = ("_connections", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        connections: Connections,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._connections = connections
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._connections.factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port,
        )


# Upstream slots --------------------------------------------------------------------------------------


class UpstreamSlots:
    """Requests that may use the upstream at once: in all (0: no limit, as nginx) and per client address.

    Waiting for a slot is bounded: past `queue_timeout` the client is told to come back (503 + Retry-After)."""

    def __init__(self, total: int, per_client: int, queue_timeout: float) -> None:
        self._total = asyncio.Semaphore(total) if total else None
        self._per_client_limit = per_client
        self._per_client: dict[str, asyncio.Semaphore] = {}
        self._holders: dict[str, int] = {}
        self.queue_timeout = queue_timeout

    @property
    def unlimited(self) -> bool:
        """No limit at all (the default): nothing to hold, and a request need not go through `hold`."""
        return self._total is None and not self._per_client_limit

    @contextlib.asynccontextmanager
    async def hold(self, client: str | None) -> AsyncIterator[None]:
        key = client or ""
        own = self._per_client_semaphore(key)
        async with contextlib.AsyncExitStack() as stack:
            self._holders[key] = self._holders.get(key, 0) + 1
            stack.callback(self._forget, key)
            try:
                async with asyncio.timeout(self.queue_timeout):
                    if own is not None:
                        await stack.enter_async_context(own)
                    if self._total is not None:
                        await stack.enter_async_context(self._total)
            except TimeoutError:
                raise GatewayError(
                    UPSTREAM_BUSY, f"no upstream connection free within {self.queue_timeout:g} s"
                ) from None
            yield

    def _per_client_semaphore(self, key: str) -> asyncio.Semaphore | None:
        if not self._per_client_limit:
            return None
        semaphore = self._per_client.get(key)
        if semaphore is None:
            semaphore = self._per_client[key] = asyncio.Semaphore(self._per_client_limit)
        return semaphore

    def _forget(self, key: str) -> None:
        remaining = self._holders[key] - 1
        if remaining:
            self._holders[key] = remaining
        else:
            del self._holders[key]
            self._per_client.pop(key, None)


# Memory for buffered manifests ----------------------------------------------------------------------


class MemoryBudget:
    """Bytes the gateway may hold in manifests and configs it reads whole; beyond it, 503 + Retry-After."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def fits(self, size: int) -> bool:
        return self.used + size <= self.limit

    @contextlib.contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        if not self.fits(size):
            log_event(logger, logging.WARNING, "memory_budget_used", used=self.used, wanted=size, limit=self.limit)
            raise GatewayError(SERVER_BUSY, "the gateway's memory budget for manifests is in use, try again")
        self.used += size
        try:
            yield
        finally:
            self.used -= size


# Deadlines --------------------------------------------------------------------------------------------


async def at_least(body: AsyncIterator[bytes], rate: int, window: float) -> AsyncIterator[bytes]:
    """`body` as it comes, cut off when, over `window` seconds spent waiting for the client, it sent fewer
    than `rate` bytes a second (RateFloor). Time the upstream takes to accept the bytes is not counted."""
    if not rate:
        async for chunk in body:
            yield chunk
        return
    chunks = aiter(body)
    floor = RateFloor(rate, window)
    while True:
        started = time.monotonic()
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        floor.add(time.monotonic() - started, len(chunk))
        yield chunk


class DeadlineResponse(web.StreamResponse):
    """A streamed answer the client must keep reading: a write that cannot go out within `write_timeout`
    seconds (the client stopped reading, or reads a few bytes now and then) cuts the client off, which
    frees the upstream connection it was holding.

    A write waits only while the transport's buffer is above its high-water mark. A short answer that fits
    in what is left below the mark, as it is prepared, never waits: it goes out untimed (a timer per answer
    costs 4 % of a small request's work)."""

    def __init__(self, *, write_timeout: float, body_size: int | None = None, **kwargs: Any) -> None:
        """`body_size`: the body bytes, when known to be few; the head then goes out with them in one write
        (as aiohttp's own Response does) rather than in a write of its own as soon as it is prepared."""
        super().__init__(**kwargs)
        self.write_timeout = write_timeout
        self.body_size = body_size
        self.untimed = False
        self._deadline: WaitDeadline | None = None
        if body_size is not None:
            self._send_headers_immediately = False

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        starting = not self.prepared  # aiohttp calls prepare() again once the handler returned the answer
        writer = await super().prepare(request)
        if starting:
            self.untimed = self.body_size is not None and self._fits(request, self.body_size)
        return writer

    def _fits(self, request: web.BaseRequest, body_size: int) -> bool:
        transport = request.transport
        if transport is None or request.protocol.writing_paused:
            return False
        # The head as written is at most 4 bytes a character (UTF-8), with its line ends and status line.
        head = sum(len(name) + len(value) + 4 for name, value in self.headers.items()) * 4 + 64
        return transport.get_write_buffer_size() + head + body_size <= transport.get_write_buffer_limits()[1]

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.untimed:
            await super().write(data)
        else:
            await self._timed(super().write(data))

    async def write_eof(self, data: bytes = b"") -> None:
        if self.untimed:
            await super().write_eof(data)
            return
        try:
            await self._timed(super().write_eof(data))
        finally:
            if self._deadline is not None:
                self._deadline.close()

    async def _timed(self, sending: Coroutine[Any, Any, None]) -> None:
        deadline = self._deadline
        if deadline is None:
            deadline = self._deadline = WaitDeadline(self.write_timeout)
        deadline.waiting()
        try:
            await sending
        except asyncio.CancelledError:
            if deadline.expired():
                raise StreamAborted(f"client read too little for {self.write_timeout:g} s") from None
            raise
        finally:
            deadline.done()
