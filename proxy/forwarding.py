"""The only upstream I/O: one pooled client session, and aiohttp's errors translated at this boundary."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, cast

import aiohttp
from aiohttp import payload, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict
from yarl import URL

from proxy import splice
from proxy.config import ConfigError, UpstreamSettings
from proxy.errors import (
    UPSTREAM_BROKEN,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNREACHABLE,
    GatewayError,
)

# Read size on both sides. Larger reads mean fewer Python iterations per GiB, but every upload in flight
# may hold about twice this much: 128 KiB keeps 32 concurrent uploads well within 100 MiB.
STREAM_BUFFER_BYTES = 128 * 1024
# Headers aiohttp would otherwise add on its own; the upstream sees only what the client sent.
SKIPPED_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

Body = aiohttp.StreamReader | AsyncIterator[bytes] | payload.Payload | bytes | None


class StreamAborted(Exception):
    """A body stopped half-way after the response had started: only closing the connection is left."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


def client_ssl_context(ca_file: Path | None, insecure: bool) -> ssl.SSLContext:
    """TLS 1.2 or newer to a registry; certificate checks are off only when asked for explicitly.

    A CA file that is no PEM bundle is a one-line ConfigError."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except ssl.SSLError as error:
        raise ConfigError(f"{ca_file}: not a PEM CA bundle ({(error.reason or str(error)).lower()})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def create_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,  # waiting for a connection is bounded by proxy.limits.UpstreamSlots, with a 503 rather than a 504
        ssl=client_ssl_context(settings.ca_file, settings.insecure),
        enable_cleanup_closed=True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=SKIPPED_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
        ),
        read_bufsize=STREAM_BUFFER_BYTES,
        trust_env=False,
    )


def translate(error: BaseException) -> GatewayError:
    """What failed, for the client; the upstream's address and the library's own words only for the log."""
    cause = " ".join(str(error).split()) or error.__class__.__name__
    if isinstance(error, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return GatewayError(
            UPSTREAM_TIMEOUT, f"upstream registry did not answer in time ({error.__class__.__name__})", cause=cause
        )
    if isinstance(error, aiohttp.ClientSSLError):
        return GatewayError(UPSTREAM_UNREACHABLE, "upstream registry is unreachable: TLS handshake failed", cause=cause)
    if isinstance(error, aiohttp.ClientConnectorError):
        errno = error.os_error.errno
        reason = os.strerror(errno).lower() if errno else error.os_error.__class__.__name__
        return GatewayError(UPSTREAM_UNREACHABLE, f"upstream registry is unreachable: {reason}", cause=cause)
    return GatewayError(UPSTREAM_BROKEN, f"upstream registry connection failed: {error.__class__.__name__}", cause=cause)


@dataclass(frozen=True, slots=True)
class Upstream:
    origin: URL
    session: aiohttp.ClientSession
    _origin_text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_origin_text", str(self.origin))  # str(URL) is not cached: once, not per request

    @property
    def authority(self) -> str:
        return self.origin.raw_authority

    def url(self, raw_path_and_query: str) -> URL:
        """The upstream URL for a request target, byte-for-byte: yarl must not re-encode `_state` tokens."""
        return URL(self._origin_text + raw_path_and_query, encoded=True)

    def open(
        self, method: str, raw_path_and_query: str, headers: Mapping[str, str] | CIMultiDict[str], body: Body = None
    ) -> Exchange:
        """An upstream response whose body is still to be read; redirects are never followed."""
        return Exchange(self.session.request(
            method, self.url(raw_path_and_query), headers=headers, data=body, allow_redirects=False
        ))  # fmt: skip


class Exchange:
    """`async with` an upstream response (`Upstream.open`): aiohttp's errors, while it is opened, read, or
    released, become the gateway's. A class rather than a contextlib.asynccontextmanager generator, which
    costs about 3 us more a request."""

    __slots__ = ("_response",)

    def __init__(self, response: AbstractAsyncContextManager[aiohttp.ClientResponse]) -> None:
        self._response = response

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            return await self._response.__aenter__()
        except (TimeoutError, aiohttp.ClientError) as error:
            raise_translated(error)

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            await self._response.__aexit__(kind, error, traceback)
        except (TimeoutError, aiohttp.ClientError) as failure:
            raise_translated(failure)
        if isinstance(error, TimeoutError | aiohttp.ClientError):
            raise_translated(error)


def raise_translated(error: TimeoutError | aiohttp.ClientError) -> NoReturn:
    if isinstance(error.__cause__, StreamAborted):
        raise error.__cause__ from None  # the client's body failed while aiohttp was sending it
    raise translate(error) from error


def request_body(request: web.BaseRequest) -> aiohttp.StreamReader | None:
    """A request's body stream; None for a request without a body, so that aiohttp's shared empty stream,
    whose readchunk() answers (b"", True) forever once it has been read, is never read at all."""
    return request.content if request.body_exists else None


async def next_chunk(content: aiohttp.StreamReader | None) -> bytes:
    """The next piece of a body as it arrived, b"" at its end; unlike readany(), never joins buffered pieces.

    The only read loop of the gateway: each turn returns data, consumes an HTTP chunk boundary or awaits the
    peer. The end is at_eof(), never readchunk's end-of-HTTP-chunk flag: an empty stream raises it forever."""
    if content is None:
        return b""
    while True:
        chunk, _ = await content.readchunk()
        if chunk or content.at_eof():
            return chunk


class WaitDeadline:
    """Cuts a task off when one of its waits (`waiting` ... `done`) lasts `seconds`; `expired()` then tells
    the CancelledError this caused from any other. One timer per `seconds` of activity rather than a
    timeout armed and cancelled around every chunk: on a stream, the wait is that per-chunk cost."""

    __slots__ = ("_expired", "_handle", "_loop", "_task", "seconds", "since")

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.since: float | None = None  # when the current wait began; None between waits
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False

    def waiting(self) -> float:
        # The task that waits now: a body may be read by the handler first, then by the client's writer task.
        self._task = asyncio.current_task()
        self.since = now = self._loop.time()
        if self._handle is None:
            self._handle = self._loop.call_at(now + self.seconds, self._check)
        return now

    def done(self) -> float:
        """The end of a wait; returns how long it lasted."""
        since, self.since = self.since, None
        return self._loop.time() - since if since is not None else 0.0

    def expired(self) -> bool:
        """Whether the wait that was just cancelled was cancelled by this deadline; it is then ended."""
        if not self._expired:
            return False
        self._expired = False
        if self._task is not None:
            self._task.uncancel()
        return True

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        if self.since is None:
            return  # not waiting: the next wait arms the timer again
        due = self.since + self.seconds
        if self._loop.time() >= due and self._task is not None:
            self._expired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._check)


class RateFloor:
    """At least `rate` bytes a second from a client, over every `window` seconds spent waiting for it: a client
    trickling a few bytes now and then holds an upstream connection for nothing. 0: no minimum."""

    __slots__ = ("rate", "received", "waited", "window")

    def __init__(self, rate: int, window: float):
        self.rate, self.window = rate, window
        self.waited, self.received = 0.0, 0

    def add(self, waited: float, received: int) -> None:
        """`received` bytes came after waiting `waited` seconds; raises StreamAborted once a window was too slow."""
        if not self.rate:
            return
        self.waited += waited
        self.received += received
        if self.waited >= self.window:
            if self.received < self.rate * self.waited:
                raise StreamAborted(f"client sent {self.received} bytes in {self.waited:.0f} s (minimum {self.rate} B/s)")
            self.waited, self.received = 0.0, 0


async def client_body(content: aiohttp.StreamReader | None, idle_timeout: float) -> AsyncIterator[bytes]:
    """A request body as it arrives; a client that stops sending it for `idle_timeout` seconds is cut off.

    Only the wait for the client is timed, not the time the upstream takes to accept what it was sent."""
    deadline = WaitDeadline(idle_timeout)
    try:
        while True:
            deadline.waiting()
            try:
                chunk = await next_chunk(content)
            except asyncio.CancelledError:
                if deadline.expired():
                    raise StreamAborted(f"client sent no body bytes for {idle_timeout:g} s") from None
                raise
            except ConnectionError:
                raise StreamAborted("client closed the connection mid-body") from None
            deadline.done()
            if not chunk:
                return
            yield chunk
    finally:
        deadline.close()


async def read_capped(content: aiohttp.StreamReader | None, cap: int) -> bytes | None:
    """The whole body, or None (with the body partly consumed) when it is longer than `cap`."""
    parts: list[bytes] = []
    total = 0
    while chunk := await next_chunk(content):
        total += len(chunk)
        if total > cap:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def discard_body(content: aiohttp.StreamReader | None, cap: int, idle_timeout: float) -> bool:
    """Read and throw away a body of at most `cap` bytes; False when it is longer, or its sender stalls or
    leaves: then only closing the connection after the answer is left."""
    total = 0
    try:
        async for chunk in client_body(content, idle_timeout):
            total += len(chunk)
            if total > cap:
                return False
    except StreamAborted:
        return False
    return True


async def relay_body(source: aiohttp.ClientResponse, sink: web.StreamResponse) -> int:
    """Copy an upstream body to the client; returns the number of body bytes copied."""
    content = source.content
    copied = 0
    while True:
        try:
            chunk = await next_chunk(content)
        except (TimeoutError, aiohttp.ClientError) as error:
            raise StreamAborted(f"upstream failed mid-body: {translate(error)}") from error
        if not chunk:
            return copied
        try:
            await sink.write(chunk)
        except ConnectionError as error:
            raise StreamAborted("client closed the connection") from error
        copied += len(chunk)


# Splicing: large bodies between two plain TCP sockets, moved in the kernel (proxy.splice)


@dataclass(frozen=True, slots=True)
class Splicing:
    """Which bodies are spliced (at least `min_bytes` long), and the deadlines a copied body would have."""

    min_bytes: int
    idle_timeout: float
    write_timeout: float
    read_timeout: float
    min_body_rate: int
    body_rate_window: float


def plain_socket(transport: asyncio.BaseTransport | None) -> int | None:
    """The descriptor of the TCP socket a transport reads and writes unencrypted; None under TLS."""
    if transport is None or transport.is_closing() or transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in {socket.AF_INET, socket.AF_INET6} or sock.type != socket.SOCK_STREAM:
        return None
    fd: int = sock.fileno()
    return fd


def known_length(headers: Mapping[str, str], length: int | None, splicing: Splicing) -> int | None:
    """The body's length when it is framed by Content-Length alone and long enough to splice."""
    if length is None or length < splicing.min_bytes or "Transfer-Encoding" in headers:
        return None
    return length


async def splice_download(
    source: aiohttp.ClientResponse, client: asyncio.BaseTransport | None, splicing: Splicing,
    spliced: Callable[[int], None],
) -> int | None:  # fmt: skip
    """Relay an upstream body to the client (whose answer's head is written) with splice: what aiohttp
    already read of it, then the rest from socket to socket; `spliced` is told how many bytes went that way,
    however it ended. Returns the body's length; None, with nothing read, where it cannot be spliced (a side
    under TLS, no Content-Length, shorter than Splicing.min_bytes).

    The upstream connection is closed after: its parser never saw the body's end. The client's stays open
    for its next request: its answer is exactly the Content-Length announced."""
    content, connection = source.content, source.connection
    length = known_length(source.headers, source.content_length, splicing)
    if length is None or connection is None or connection.protocol is None or content.exception() is not None:
        return None
    remaining = length - content.total_bytes
    client_fd, upstream_fd = plain_socket(client), plain_socket(connection.transport)
    if remaining <= 0 or client_fd is None or upstream_fd is None or content.is_eof():
        return None
    buffered = content.read_nowait()  # then no more: aiohttp's reading stops before the loop runs again
    connection.protocol.pause_reading()
    reads, writes = WaitDeadline(splicing.read_timeout), WaitDeadline(splicing.write_timeout)
    transfer: splice.Transfer | None = None
    try:
        with splice.duplicates(upstream_fd, client_fd) as (upstream, downstream), splice.Pipe() as pipe:
            await splice.flushed(cast(asyncio.WriteTransport, client), downstream, writes)
            await splice.send_all(downstream, buffered, writes)
            transfer = splice.Transfer(upstream, downstream, pipe)
            await transfer.move(remaining, reads, writes)
    except splice.SpliceStopped as stopped:
        raise download_aborted(stopped, splicing) from None
    finally:
        reads.close()
        writes.close()
        source.close()
        spliced(transfer.delivered if transfer is not None else 0)
    return length


def download_aborted(stopped: splice.SpliceStopped, splicing: Splicing) -> StreamAborted:
    if stopped.side == "sink":
        if stopped.reason == "timeout":
            return StreamAborted(f"client read too little for {splicing.write_timeout:g} s")
        return StreamAborted("client closed the connection")
    if stopped.reason == "timeout":
        return StreamAborted(f"upstream failed mid-body: upstream registry sent nothing for {splicing.read_timeout:g} s")
    return StreamAborted(f"upstream failed mid-body: upstream connection {stopped.reason}")


class SplicedBody(payload.Payload):
    """A client's request body of known length, sent upstream with splice once aiohttp has written the request
    head: what the gateway's server already read of it, then the rest from socket to socket, with the
    deadlines and minimum rate of a copied body. Copied from `fallback` where a side is under TLS.

    Once it splices, `bypassed` is set: the server's parser on the client connection never sees the body's
    end, so that connection must be closed after the answer; `finished` once the whole body went up."""

    def __init__(self, request: web.Request, fallback: AsyncIterator[bytes], splicing: Splicing):
        super().__init__(None)
        self._size = request.content_length
        self.request = request
        self.fallback = fallback
        self.splicing = splicing
        self.bypassed = self.finished = False
        self.spliced = 0
        # The server reads no more of the body than it holds now, while the upstream connection is opened: a
        # spliced upload holds at most one read of it (bounded memory per upload), not the stream's buffer.
        self.held = not request.content.is_eof()
        if self.held:
            request.protocol.pause_reading()

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a spliced body is never held")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        self._consumed = True  # a client's body is sent once: aiohttp must not retry the request with it
        request, content = self.request, self.request.content
        remaining = (self._size or 0) - content.total_bytes
        upstream_transport = writer.transport
        client_fd, upstream_fd = plain_socket(request.transport), plain_socket(upstream_transport)
        if (remaining <= 0 or client_fd is None or upstream_fd is None or upstream_transport is None
                or content.is_eof() or content.exception() is not None):  # fmt: skip
            if self.held:
                request.protocol.resume_reading()
            async for chunk in self.fallback:
                await writer.write(chunk)
            return
        self.bypassed = True
        writer.send_headers()
        buffered = content.read_nowait()  # then no more: the server's reading stops before the loop runs again
        request.protocol.pause_reading()
        splicing = self.splicing
        idle, writes = WaitDeadline(splicing.idle_timeout), WaitDeadline(splicing.read_timeout)
        floor = RateFloor(splicing.min_body_rate, splicing.body_rate_window)
        transfer: splice.Transfer | None = None
        try:
            with splice.duplicates(client_fd, upstream_fd) as (downstream, upstream), splice.Pipe() as pipe:
                await splice.flushed(upstream_transport, upstream, writes)
                await splice.send_all(upstream, buffered, writes)
                transfer = splice.Transfer(downstream, upstream, pipe)
                await transfer.move(remaining, idle, writes, floor.add)
            self.finished = True
        except splice.SpliceStopped as stopped:
            if stopped.side == "sink":
                # The client may still be sending what the upstream did not take: the server reads and drops it
                # for a moment before closing (aiohttp's lingering close), so that the client gets the answer
                # rather than a reset.
                request.protocol.resume_reading()
            raise upload_aborted(stopped, splicing) from None
        finally:
            idle.close()
            writes.close()
            self.spliced = transfer.delivered if transfer is not None else 0
            # Counted as received, as if the server had read them: the access log's and the metrics' bytes in.
            content.total_bytes += self.spliced


def upload_aborted(stopped: splice.SpliceStopped, splicing: Splicing) -> Exception:
    """A client's failure as StreamAborted (the answer is a closed connection), the upstream's as aiohttp's own
    errors would be (Upstream.open makes them a 502 or 504)."""
    if stopped.side == "source":
        if stopped.reason == "timeout":
            return StreamAborted(f"client sent no body bytes for {splicing.idle_timeout:g} s")
        return StreamAborted("client closed the connection mid-body")
    if stopped.reason == "timeout":
        return TimeoutError(f"upstream registry accepted no body bytes for {splicing.read_timeout:g} s")
    return ConnectionResetError(f"upstream connection {stopped.reason}")
