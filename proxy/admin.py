"""The admin listener: metrics, liveness and readiness, on a port of its own so no registry path is shadowed."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.app import GATEWAY, METRICS, SETTINGS, STORE, WATCHDOG
from proxy.errors import GatewayError
from proxy.store import StoreError

GATEWAY_APP = web.AppKey("gateway_app", web.Application)
PROBE_TIMEOUT_SECONDS = 3.0


async def metrics(request: web.Request) -> web.Response:
    body = request.app[GATEWAY_APP][METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """503 once the event loop has been blocked beyond `server.max_loop_lag` (and for a while after), so that
    an orchestrator restarts a process whose loop stalls; a loop blocked for good cannot answer at all."""
    gateway_app = request.app[GATEWAY_APP]
    watchdog, limit = gateway_app[WATCHDOG], gateway_app[SETTINGS].server.max_loop_lag
    now = watchdog.clock()
    lag, worst = watchdog.lag.current(now), watchdog.lag.worst_recent(now)
    body: dict[str, object] = {"status": "ok", "event_loop_lag_seconds": round(lag, 3)}
    if worst.lag <= limit:
        return web.json_response(body)
    when = "was blocked until now" if worst.ended is None else f"was blocked {now - worst.ended:.0f} s ago"
    body |= {"status": "unhealthy",
             "reason": f"the event loop {when} for {worst.lag:.1f} s, beyond server.max_loop_lag ({limit:g} s)"}
    return web.json_response(body, status=503)


async def upstream_problem(app: web.Application) -> str | None:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS), app[GATEWAY].upstream.open("GET", "/v2/", {}) as response:
            if response.status >= 500:
                return f"upstream answered /v2/ with {response.status}"
    except GatewayError as error:
        return str(error)
    except TimeoutError:
        return "upstream did not answer /v2/ in time"
    return None


async def store_problem(app: web.Application) -> str | None:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            await app[STORE].generation()
    except StoreError as error:
        return str(error)
    except TimeoutError:
        return "store did not answer in time"
    return None


async def readyz(request: web.Request) -> web.Response:
    """503 while the upstream is unreachable, or the store unusable and `store.required` is set."""
    gateway_app = request.app[GATEWAY_APP]
    upstream, store = await asyncio.gather(upstream_problem(gateway_app), store_problem(gateway_app))
    ready = upstream is None and (store is None or not gateway_app[SETTINGS].store.required)
    checks = {"upstream": upstream or "ok", "store": store or "ok"}
    return web.Response(
        status=200 if ready else 503,
        text=json.dumps({"status": "ready" if ready else "not ready", "checks": checks}),
        content_type="application/json",
    )


def create_admin_app(gateway_app: web.Application) -> web.Application:
    admin = web.Application()
    admin[GATEWAY_APP] = gateway_app
    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    return admin
