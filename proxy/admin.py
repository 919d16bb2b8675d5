"""The admin listener: metrics, liveness and readiness, on a port of its own so no registry path is shadowed."""

from __future__ import annotations

import asyncio
import json
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.app import GATEWAY, IN_FLIGHT, METRICS, SETTINGS, STORE, WATCHDOG
from proxy.errors import GatewayError
from proxy.metrics import SupervisorMetrics
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
    """503 while draining (a shutdown began), and while a required part is unusable: the upstream with
    `admin.ready_requires_upstream`, the store with `store.required`. Every check is reported either way:
    while the registry is down, a gateway that stays ready answers clients with a clear 502, where one
    taken out of its Service would leave them with refused connections."""
    gateway_app = request.app[GATEWAY_APP]
    settings = gateway_app[SETTINGS]
    upstream, store = await asyncio.gather(upstream_problem(gateway_app), store_problem(gateway_app))
    draining = gateway_app[IN_FLIGHT].draining
    ready = not draining and not (
        (upstream is not None and settings.admin.ready_requires_upstream)
        or (store is not None and settings.store.required)
    )
    checks = {"upstream": upstream or "ok", "store": store or "ok", "shutdown": "draining" if draining else "no"}
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


class Workers(Protocol):
    """What the admin listener of a supervisor needs to know of its workers."""

    count: int
    stopping: bool

    def alive(self) -> int: ...


SUPERVISED = web.AppKey("supervised", Workers)
SUPERVISOR_METRICS = web.AppKey("supervisor_metrics", SupervisorMetrics)


async def supervisor_metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[SUPERVISOR_METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def workers_problem(workers: Workers) -> str | None:
    alive = workers.alive()
    return None if alive == workers.count else f"{alive} of {workers.count} workers running"


async def supervisor_healthz(request: web.Request) -> web.Response:
    """Healthy while every worker runs; one that died is restarted, and the supervisor is healthy again once
    it is back. Each worker watches its own event loop and logs a stall."""
    problem = workers_problem(request.app[SUPERVISED])
    if problem is None:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "unhealthy", "reason": problem}, status=503)


async def supervisor_readyz(request: web.Request) -> web.Response:
    workers = request.app[SUPERVISED]
    problem = workers_problem(workers)
    ready = problem is None and not workers.stopping
    checks = {"workers": problem or "ok", "shutdown": "draining" if workers.stopping else "no"}
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status=200 if ready else 503)  # fmt: skip


def create_supervisor_admin_app(workers: Workers, metrics: SupervisorMetrics) -> web.Application:
    admin = web.Application()
    admin[SUPERVISED] = workers
    admin[SUPERVISOR_METRICS] = metrics
    admin.router.add_get("/metrics", supervisor_metrics)
    admin.router.add_get("/healthz", supervisor_healthz)
    admin.router.add_get("/readyz", supervisor_readyz)
    return admin
