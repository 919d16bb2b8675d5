"""`server.workers: 2`: one port, two worker processes under a supervisor, in front of a real registry.

Which worker served a request is read from the workers' own log lines (`worker`, `pid`), never from an
answer: the gateway adds nothing to what clients see.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import build_image
from support.protocol import (
    Answer,
    call,
    digest_of,
    patch_held_open,
    push_single_put,
    teach,
)
from support.registry import Registry

WORKERS = 2
CONNECTIONS = 24  # new connections the kernel spreads: all on one worker has odds of 2**-23
PATIENCE = 15.0


async def start_workers(gateway_factory: GatewayFactory, registry: Registry, **config: Any) -> GatewayProcess:
    gateway = gateway_factory(
        registry, args=["--log-level", "info"],
        config={"server": {"workers": WORKERS}, "store": {"sync_interval": 0.2}, **config},
    )  # fmt: skip
    await gateway.wait_for("listening", WORKERS)
    return gateway


async def workers_taught(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, seed: int
) -> tuple[GatewayProcess, bytes]:
    """Workers dropping foreign layers, and a foreign layer they all know (taught through one of them)."""
    gateway = await start_workers(gateway_factory, registry, policy={"default": "drop"})
    image = build_image(seed, foreign=1, os="windows")
    await teach(http, gateway.url, "win/base", image)
    await asyncio.sleep(1.0)  # every worker follows the store (sync_interval 0.2 s)
    return gateway, image.foreign_layers[0].data


def worker_pids(gateway: GatewayProcess) -> set[int]:
    return {entry["pid"] for entry in gateway.events("worker_started")}


async def on_new_connections(count: int, send: Any) -> list[Any]:
    """`send(session)` `count` times, each on a connection of its own."""
    results = []
    for _ in range(count):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            results.append(await send(session))
    return results


def samples(metrics: Answer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics answer, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.body.decode())
        for sample in family.samples
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_requests_are_spread_over_the_workers_and_counted_once_on_the_admin_port(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    gateway = await start_workers(gateway_factory, registry)
    assert (await call(http, "GET", f"{gateway.admin_url}/healthz")).status == 200
    assert (await call(http, "GET", f"{gateway.admin_url}/readyz")).status == 200

    answers = await on_new_connections(CONNECTIONS, lambda session: call(session, "GET", f"{gateway.url}/v2/"))
    assert {answer.status for answer in answers} == {200}
    requests = await gateway.wait_for("request", CONNECTIONS)
    assert {entry["pid"] for entry in requests} == worker_pids(gateway), "both workers served requests"

    scraped = samples(await call(http, "GET", f"{gateway.admin_url}/metrics"))
    served = (("method", "GET"), ("route", "other"), ("status", "200"))
    assert scraped[("foreign_layer_proxy_requests_total", served)] == CONNECTIONS
    assert scraped[("foreign_layer_proxy_workers_alive", ())] == WORKERS


async def test_a_foreign_layer_is_dropped_by_either_worker(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    gateway, foreign = await workers_taught(gateway_factory, registry, http, seed=160)

    pushes = 2 * CONNECTIONS // 3
    answers = await on_new_connections(pushes, lambda session: push_single_put(session, gateway.url, "win/app", foreign))
    assert [answer.status for answer in answers] == [201] * pushes
    assert not registry.committed("win/app", digest_of(foreign))
    deadline = time.monotonic() + PATIENCE
    while len(drops := [entry for entry in gateway.events("decision") if entry["action"] == "drop"]) < pushes:
        assert time.monotonic() < deadline, gateway.process.log_text()
        await asyncio.sleep(0.1)
    assert len(drops) == pushes
    assert {entry["pid"] for entry in drops} == worker_pids(gateway), "both workers dropped it"


async def test_sighup_reaches_every_worker(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    gateway, foreign = await workers_taught(gateway_factory, registry, http, seed=161)

    gateway.config_path.write_text(json.dumps({"server": {"workers": WORKERS}, "store": {"sync_interval": 0.2},
                                               "policy": {"default": "reject"}}))  # fmt: skip
    os.kill(gateway.process.pid, signal.SIGHUP)
    reloaded = await gateway.wait_for("reloaded", WORKERS)
    assert {entry["pid"] for entry in reloaded} == worker_pids(gateway)
    answers = await on_new_connections(CONNECTIONS // 2, lambda session: push_single_put(session, gateway.url, "win/app", foreign))
    assert [answer.status for answer in answers] == [403] * (CONNECTIONS // 2)


async def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    gateway = await start_workers(gateway_factory, registry)
    pids = worker_pids(gateway)
    release = asyncio.Event()
    upload = await patch_held_open(http, gateway.url, "drain/test", release)
    await gateway.wait_for("request")  # the POST's line: the PATCH is under way after it
    await asyncio.sleep(0.3)
    os.kill(gateway.process.pid, signal.SIGTERM)
    await gateway.wait_for("stopping", WORKERS + 1)
    draining = await call(http, "GET", f"{gateway.admin_url}/readyz")
    assert draining.status == 503
    await asyncio.sleep(0.5)
    release.set()
    assert (await upload).status == 202, "the upload in flight still finishes"
    assert await asyncio.to_thread(gateway.process.wait, 30) == 0
    assert not [pid for pid in pids if alive(pid)], "no worker outlives the supervisor"
    assert len(gateway.events("worker_stopped")) == WORKERS
    assert not gateway.events("worker_restarted")


async def test_a_killed_worker_is_restarted(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    gateway = await start_workers(gateway_factory, registry)
    victim = min(worker_pids(gateway))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + PATIENCE
    while (health := await call(http, "GET", f"{gateway.admin_url}/healthz")).status == 200:
        assert time.monotonic() < deadline, "the supervisor stays healthy with a worker gone"
        await asyncio.sleep(0.02)
    assert (health.status, health.json()["reason"]) == (503, f"{WORKERS - 1} of {WORKERS} workers running")
    restarted = await gateway.wait_for("worker_restarted", timeout=PATIENCE)
    assert restarted[0]["pid"] == victim
    await gateway.wait_for("listening", WORKERS + 1, timeout=PATIENCE)
    deadline = time.monotonic() + PATIENCE
    while (await call(http, "GET", f"{gateway.admin_url}/healthz")).status != 200:
        assert time.monotonic() < deadline, "the supervisor stays unhealthy after the restart"
        await asyncio.sleep(0.1)
    assert len(worker_pids(gateway) - {victim}) == WORKERS
    assert samples(await call(http, "GET", f"{gateway.admin_url}/metrics"))[("foreign_layer_proxy_worker_restarts_total", ())] == 1
    answers = await on_new_connections(CONNECTIONS // 2, lambda session: call(session, "GET", f"{gateway.url}/v2/"))
    assert {answer.status for answer in answers} == {200}


async def test_workers_stop_when_their_supervisor_is_killed(
    gateway_factory: GatewayFactory, registry: Registry
) -> None:
    gateway = await start_workers(gateway_factory, registry)
    pids = worker_pids(gateway)
    os.kill(gateway.process.pid, signal.SIGKILL)
    deadline = time.monotonic() + PATIENCE
    while running := [pid for pid in pids if alive(pid)]:
        assert time.monotonic() < deadline, f"workers {running} outlive their supervisor"
        await asyncio.sleep(0.1)
    assert len(gateway.events("stopping")) == WORKERS, "each drained as on SIGTERM"
