"""App wiring: typed state, resources with cleanup contexts, the catch-all route and the request middleware."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger, AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE, RawRequestMessage, StreamWriter
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from proxy.cleanup import Cleaner
from proxy.config import ConfigError, Settings, require_upstream
from proxy.errors import NOT_A_FORWARD_PROXY, GatewayError, error_response
from proxy.forwarding import (
    STREAM_BUFFER_BYTES,
    StreamAborted,
    Upstream,
    create_session,
)
from proxy.gateway import (
    BODY_BYTES_OUT,
    DECISION,
    REQUEST_ID,
    ROUTE,
    Gateway,
    no_automatic_continue,
    settle_body,
)
from proxy.known import KnownForeign
from proxy.limits import Connections, UpstreamSlots
from proxy.logs import ACCESS_LOGGER, log_event, redacted_query
from proxy.manifests import ForeignLayer, digest_lines, is_digest
from proxy.metrics import Metrics, route_label
from proxy.routes import match_route
from proxy.store import ForeignStore, StoreError, open_store
from proxy.watchdog import LoopWatchdog

logger = logging.getLogger("foreign_layer_proxy.app")
access_logger = logging.getLogger(ACCESS_LOGGER)

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", ForeignStore)
KNOWN = web.AppKey("known", KnownForeign)
UPSTREAM = web.AppKey("upstream", Upstream)
GATEWAY = web.AppKey("gateway", Gateway)


class InFlight:
    """Requests being handled, so that a shutdown can wait for them.

    aiohttp's own graceful shutdown stops reading request bodies at once, which would cut every
    upload in progress; the gateway stops listening, lets these finish, and only then cleans up.
    """

    def __init__(self) -> None:
        self.count = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


class RequestIds:
    """Request ids unique across replicas and restarts: a random prefix per process, then a counter
    (cheaper per request than a uuid4, which asks the kernel for randomness every time)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"


IN_FLIGHT = web.AppKey("in_flight", InFlight)
WATCHDOG = web.AppKey("watchdog", LoopWatchdog)
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
METRICS = web.AppKey("metrics", Metrics)
CONNECTIONS = web.AppKey("connections", Connections)
UPSTREAM_SLOTS = web.AppKey("upstream_slots", UpstreamSlots)
LINGERING_SECONDS = 2.0
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

def read_digest_files(paths: tuple[Path, ...]) -> dict[str, ForeignLayer]:
    """Digests listed in config files (foreign.digest_files)."""
    layers: dict[str, ForeignLayer] = {}
    for path in paths:
        try:
            text = path.read_text()
        except OSError as error:
            raise ConfigError(f"{path}: cannot read digest file: {error.strerror}") from None
        for digest in digest_lines(text):
            if not is_digest(digest):
                raise ConfigError(f"{path}: not a digest: {digest[:80]!r}")
            layers[digest] = ForeignLayer(digest=digest, media_type="", size=0)
    return layers


@web.middleware
async def exchange(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Per request: id, route, the forward-proxy guard, OCI error bodies, metrics and the one access log line."""
    started = time.perf_counter()
    app = request.app  # a property chain through the match info: looked up once
    request[REQUEST_ID] = request.headers.get("X-Request-Id") or app[REQUEST_IDS].next()
    route = request[ROUTE] = match_route(request.path)
    metrics, in_flight = app[METRICS], app[IN_FLIGHT]
    route_kind = route_label(request.method, route.kind)
    uploads = metrics.uploads_in_flight if route_kind == "blob_upload" else None
    in_flight.enter()
    if uploads is not None:
        uploads.inc()
    response: web.StreamResponse | None = None
    status = 0
    connections = app[CONNECTIONS]
    connections.enter(request.protocol)
    try:
        if request.method == "CONNECT" or not request.raw_path.startswith("/"):
            raise GatewayError(NOT_A_FORWARD_PROXY)
        response = await handler(request)
        if in_flight.draining:
            response.force_close()
    except GatewayError as error:
        if error.kind.upstream:
            metrics.upstream_errors.labels(error.kind.name).inc()
        log_event(logger, logging.WARNING, "gateway_error", code=error.kind.code, message=str(error),
                  cause=error.cause, request_id=request[REQUEST_ID])  # fmt: skip
        response = error_response(error)
        # A refusal reads what is left of the body, so that the client reads the answer; a limit's answer (a
        # client holding or trickling a body among them) or upstream trouble goes out at once, closing.
        if error.kind.status >= 429 or not await settle_body(request, app[SETTINGS].server.idle_timeout):
            response.force_close()
    except StreamAborted as aborted:
        status = 499
        metrics.upstream_errors.labels("stream_aborted").inc()
        log_event(logger, logging.WARNING, "stream_aborted", cause=aborted.cause, request_id=request[REQUEST_ID])
        if request.transport is not None:
            request.transport.close()
        raise
    finally:
        connections.leave(request.protocol, request.content.is_eof())
        in_flight.leave()
        if uploads is not None:
            uploads.dec()
        duration = time.perf_counter() - started
        status = response.status if response is not None else status
        bytes_in, bytes_out = request.content.total_bytes, body_bytes_out(request, response)
        method = request.method if request.method in METRIC_METHODS else "OTHER"
        metrics.observe_request(method, route_kind, status, duration, bytes_in, bytes_out)
        if access_logger.isEnabledFor(logging.INFO):
            decision = request.get(DECISION)
            log_event(
                access_logger,
                logging.INFO,
                "request",
                method=request.method,
                path=request.path,
                query=redacted_query(request.rel_url.query) or None,
                status=status,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                duration_ms=round(duration * 1000, 1),
                repository=route.repository,
                decision=decision.action.value if decision else None,
                client=request.remote,
                user_agent=request.headers.get("User-Agent"),
                request_id=request[REQUEST_ID],
            )
    return response


def body_bytes_out(request: web.Request, response: web.StreamResponse | None) -> int:
    """Body bytes sent, without headers or chunk framing: counted by the relay, or the gateway's own body."""
    if response is None or request.method == "HEAD":
        return 0
    counted: int | None = request.get(BODY_BYTES_OUT)
    return response.content_length or 0 if counted is None else counted


def unparsed_requests_logger(metrics: Metrics) -> type[AbstractAccessLogger]:
    """aiohttp's access-log hook, for the one kind of request the middleware never sees: one aiohttp could
    not parse (it answers 400 itself). Those get a request line and a count like any other."""

    class UnparsedRequests(AbstractAccessLogger):
        def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
            if REQUEST_ID in request:
                return
            metrics.observe_request("OTHER", "other", response.status, time, 0, 0)
            log_event(access_logger, logging.INFO, "request", method=None, status=response.status, bytes_in=0,
                      bytes_out=0, duration_ms=round(time * 1000, 1), client=request.remote,
                      error="unparsable request")  # fmt: skip

        @property
        def enabled(self) -> bool:
            return True

    return UnparsedRequests


async def _without_own_server_header(headers: CIMultiDict[str]) -> None:
    if headers.get("Server") == SERVER_SOFTWARE:
        del headers["Server"]


def without_own_server_header(runner: web.BaseRunner) -> None:
    """aiohttp adds `Server: Python/3.x aiohttp/x` to every answer, its own 400s included, and has no switch
    for it. The registry sends none: every answer (after setup()) is written by a writer that removes it,
    leaving an upstream's own Server header as it was."""
    server = runner.server
    assert server is not None, "runner.setup() first"
    make_request = server.request_factory

    def request_factory(
        message: RawRequestMessage, payload: StreamReader, protocol: RequestHandler, writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:  # fmt: skip
        quiet = StreamWriter(protocol, asyncio.get_running_loop(), on_headers_sent=_without_own_server_header)
        return make_request(message, payload, protocol, quiet, task)

    server.request_factory = request_factory
async def watchdog_context(app: web.Application) -> AsyncIterator[None]:
    watchdog = app[WATCHDOG] = LoopWatchdog()
    app[METRICS].track_loop_lag(watchdog.lag, watchdog.clock)
    task = asyncio.create_task(watchdog.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def store_context(app: web.Application) -> AsyncIterator[None]:
    try:
        store = open_store(app[SETTINGS].store.url, app[SETTINGS].store.tls)
    except ValueError as error:
        raise ConfigError(f"store.url: {error}") from None
    app[STORE] = store
    yield
    await store.close()


async def known_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    known = KnownForeign(
        app[STORE], read_digest_files(settings.foreign.digest_files), settings.store.sync_interval,
        on_store_error=metrics.store_errors.inc,
    )  # fmt: skip
    metrics.track_known(lambda: len(known.layers))
    try:
        await known.resync()
    except StoreError as error:
        metrics.store_errors.inc()
        log_event(logger, logging.WARNING, "store_error", error=str(error), note="enforcing digest files only until the store answers")
    app[KNOWN] = known
    task = asyncio.create_task(known.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with contextlib.suppress(StoreError):
        await known.flush()


async def upstream_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    origin = require_upstream(settings)
    session = create_session(settings.upstream)
    app[UPSTREAM] = Upstream(origin, session)
    metrics = app[METRICS]
    cleaner = Cleaner(
        app[UPSTREAM].origin, settings.upstream, settings.cleanup,
        on_result=lambda outcome: metrics.decisions.labels(outcome, "cleanup").inc(),
    )  # fmt: skip
    app[GATEWAY] = Gateway(settings, app[UPSTREAM], app[KNOWN], metrics, cleaner)
    yield
    await cleaner.close()
    await session.close()


async def dispatch(request: web.Request) -> web.StreamResponse:
    app = request.app
    gateway, slots = app[GATEWAY], app[UPSTREAM_SLOTS]
    view = gateway.see_client(request)
    if slots.unlimited:
        return await gateway.handle(request)
    async with slots.hold(view.address):
        return await gateway.handle(request)


def create_app(settings: Settings, shared_metrics: bool = False) -> web.Application:
    """`shared_metrics`: a worker of `server.workers`, whose metrics the supervisor sums."""
    app = web.Application(middlewares=[exchange])
    app[SETTINGS] = settings
    app[IN_FLIGHT] = InFlight()
    app[REQUEST_IDS] = RequestIds()
    app[METRICS] = Metrics(shared=shared_metrics)
    app[CONNECTIONS] = Connections(settings.server.max_connections, settings.server.max_head_size)
    upstream = settings.upstream
    app[UPSTREAM_SLOTS] = UpstreamSlots(upstream.max_connections, upstream.max_connections_per_client,
                                        upstream.queue_timeout)  # fmt: skip
    app.cleanup_ctx.extend([watchdog_context, store_context, known_context, upstream_context])
    app.router.add_route("*", "/{tail:.*}", dispatch, expect_handler=no_automatic_continue)
    return app


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.server.tls_cert is None or settings.server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_certificate(context, settings.server.tls_cert, settings.server.tls_key, "server.tls_cert", "server.tls_key")
    return context


def load_certificate(context: ssl.SSLContext, cert: Path, key: Path, cert_setting: str, key_setting: str) -> None:
    """Load a certificate and its key (for connections made from now on), or a one-line ConfigError naming
    which of the two is wrong."""
    try:
        context.load_cert_chain(cert, key)
    except OSError as error:
        if not isinstance(error, ssl.SSLError):
            raise ConfigError(f"{cert_setting}: cannot read {error.filename or cert}: {error.strerror}") from None
        if b"-----BEGIN CERTIFICATE-----" not in _read_bytes(cert):
            raise ConfigError(f"{cert_setting}: {cert} is not a PEM certificate") from None
        if b"PRIVATE KEY-----" not in _read_bytes(key):
            raise ConfigError(f"{key_setting}: {key} is not a PEM private key") from None
        reason = (error.reason or str(error)).lower().replace("_", " ")
        raise ConfigError(f"{key_setting}: {key} is not a usable key for {cert} ({reason})") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def runner_for(app: web.Application, settings: Settings) -> web.AppRunner:
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=access_logger,
        access_log_class=unparsed_requests_logger(app[METRICS]),
        handler_cancellation=True,
        auto_decompress=False,
        read_bufsize=STREAM_BUFFER_BYTES,
        keepalive_timeout=settings.server.idle_timeout,
        shutdown_timeout=settings.server.shutdown_timeout,
        # An answer whose request body was left unread (see gateway.settle_body) closes the connection after
        # reading on for this long, not aiohttp's 10 s: closing at once with unread bytes would reset the
        # connection, and the client could lose the answer it has not read yet.
        lingering_time=LINGERING_SECONDS,
    )
