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
    DECISION,
    REQUEST_ID,
    ROUTE,
    Gateway,
    no_automatic_continue,
    settle_body,
)
from proxy.known import KnownForeign
from proxy.logs import log_event, redacted_query
from proxy.manifests import ForeignLayer, digest_lines, is_digest
from proxy.metrics import Metrics, route_label
from proxy.routes import match_route
from proxy.store import ForeignStore, StoreError, open_store
from proxy.watchdog import LoopWatchdog

logger = logging.getLogger("foreign_layer_proxy.access")

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
    request[REQUEST_ID] = request.headers.get("X-Request-Id") or request.app[REQUEST_IDS].next()
    route = request[ROUTE] = match_route(request.path)
    metrics, in_flight = request.app[METRICS], request.app[IN_FLIGHT]
    route_kind = route_label(request.method, route.kind)
    uploads = metrics.uploads_in_flight if route_kind == "blob_upload" else None
    in_flight.enter()
    if uploads is not None:
        uploads.inc()
    response: web.StreamResponse | None = None
    status = 0
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
                  request_id=request[REQUEST_ID])
        response = error_response(error)
        if not await settle_body(request, request.app[SETTINGS].server.idle_timeout):
            response.force_close()
    except StreamAborted as aborted:
        status = 499
        metrics.upstream_errors.labels("stream_aborted").inc()
        log_event(logger, logging.WARNING, "stream_aborted", cause=aborted.cause, request_id=request[REQUEST_ID])
        if request.transport is not None:
            request.transport.close()
        raise
    finally:
        in_flight.leave()
        if uploads is not None:
            uploads.dec()
        duration = time.perf_counter() - started
        status = response.status if response is not None else status
        bytes_in, bytes_out = request.content.total_bytes, response.body_length if response is not None else 0
        method = request.method if request.method in METRIC_METHODS else "OTHER"
        metrics.observe_request(method, route_kind, status, duration, bytes_in, bytes_out)
        if logger.isEnabledFor(logging.INFO):
            decision = request.get(DECISION)
            log_event(
                logger,
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
        store = open_store(app[SETTINGS].store.url)
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
    return await request.app[GATEWAY].handle(request)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[exchange])
    app[SETTINGS] = settings
    app[IN_FLIGHT] = InFlight()
    app[REQUEST_IDS] = RequestIds()
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend([watchdog_context, store_context, known_context, upstream_context])
    app.router.add_route("*", "/{tail:.*}", dispatch, expect_handler=no_automatic_continue)
    return app


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.server.tls_cert is None or settings.server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.server.tls_cert, settings.server.tls_key)
    return context


def runner_for(app: web.Application, settings: Settings) -> web.AppRunner:
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        auto_decompress=False,
        read_bufsize=STREAM_BUFFER_BYTES,
        keepalive_timeout=settings.server.idle_timeout,
        shutdown_timeout=settings.server.shutdown_timeout,
        # An answer whose request body was left unread (see gateway.settle_body) closes the connection once
        # sent, instead of aiohttp reading on for up to 10 s what may be the client's next request.
        lingering_time=0,
    )
