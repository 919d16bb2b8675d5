"""The only upstream I/O: one pooled client session, and aiohttp's errors translated at this boundary."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

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

Body = aiohttp.StreamReader | AsyncIterator[bytes] | bytes | None


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
