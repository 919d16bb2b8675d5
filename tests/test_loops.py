"""No read loop can spin: one long-lived gateway does the same bodiless exchange again and again, and still
answers a liveness probe within a second after every step; the event-loop watchdog reports what it saw."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support.fixtures import GatewayFactory, gateway_knowing
from support.gateway import GatewayProcess
from support.images import Image, build_image
from support.protocol import (
    Answer,
    absolute,
    call,
    push_chunked,
    push_streamed,
    put_manifest,
    start_upload,
    teach,
)
from support.registry import Registry

from proxy.admin import create_admin_app
from proxy.app import SETTINGS, WATCHDOG
from proxy.config import ServerSettings, Settings
from proxy.logs import EVENT_FIELD
from proxy.watchdog import LoopLag, LoopWatchdog, lag_after_sleep

# A step that never answers is a frozen gateway: the bound is generous, the healthy answer takes milliseconds.
STEP_SECONDS = 10.0
PROBE_SECONDS = 1.0
REPEATS = 4


@pytest.fixture
def windows_image() -> Image:
    return build_image(60, foreign=2, os="windows")


async def assert_alive(http: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    """The admin /healthz and the registry API's /v2/ both answer within a second."""
    async with asyncio.timeout(PROBE_SECONDS):
        health = await call(http, "GET", f"{gateway.admin_url}/healthz")
        api = await call(http, "GET", f"{gateway.url}/v2/")
    assert health.status == 200, health
    assert api.status == 200, api


async def step(http: aiohttp.ClientSession, gateway: GatewayProcess, exchange: Awaitable[Answer]) -> Answer:
    try:
        async with asyncio.timeout(STEP_SECONDS):
            answer = await exchange
    except TimeoutError:
        raise AssertionError(f"the gateway did not answer in {STEP_SECONDS:g} s: its event loop is stuck") from None
    await assert_alive(http, gateway)
    return answer


def gauge(exposition: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", exposition, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def loop_lag(http: aiohttp.ClientSession, gateway: GatewayProcess) -> tuple[float, float]:
    """The watchdog's latest and largest event-loop lag, in seconds."""
    exposition = (await call(http, "GET", f"{gateway.admin_url}/metrics")).body.decode()
    return (
        gauge(exposition, "foreign_layer_proxy_event_loop_lag_seconds"),
        gauge(exposition, "foreign_layer_proxy_event_loop_lag_max_seconds"),
    )


PushForm = Callable[[aiohttp.ClientSession, str, str, bytes], Awaitable[Answer]]


async def _one_patch_then_empty_put(http: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
    """docker, crane and skopeo: POST, one PATCH with the whole blob (Content-Length), an empty PUT ?digest."""
    return await push_chunked(http, base, repository, data, chunk_size=len(data))


async def _chunked_patch_then_empty_put(http: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
    return await push_streamed(http, base, repository, [data[i : i + 4096] for i in range(0, len(data), 4096)])


PUSH_FORMS: dict[str, PushForm] = {
    "patch-then-empty-put": _one_patch_then_empty_put,
    "chunked-patch-then-empty-put": _chunked_patch_then_empty_put,
}


async def test_the_bodiless_closing_put_of_a_dropped_upload_never_freezes_the_gateway(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    gateway = await gateway_knowing(gateway_factory, registry, http, windows_image, "drop")
    await assert_alive(http, gateway)
    started = time.monotonic()
    for round_number in range(REPEATS):
        for form, push in PUSH_FORMS.items():
            for layer in windows_image.foreign_layers:
                repository = f"win/app{round_number}"
                answer = await step(http, gateway, push(http, gateway.url, repository, layer.data))
                assert (answer.status, answer.headers.get("Docker-Content-Digest")) == (201, layer.digest), (form, answer)
                assert not registry.committed(repository, layer.digest), (form, repository)
    elapsed = time.monotonic() - started
    drops = [entry for entry in gateway.events("decision") if entry["action"] == "drop"]
    assert len(drops) == REPEATS * len(PUSH_FORMS) * len(windows_image.foreign_layers)
    latest, largest = await loop_lag(http, gateway)
    print(f"\n{len(drops)} drops in {elapsed:.2f} s; event-loop lag: latest {latest * 1000:.1f} ms, "
          f"max {largest * 1000:.1f} ms")  # fmt: skip
    assert largest < PROBE_SECONDS, "the event loop was blocked for longer than a probe waits"


async def test_bodiless_upstream_answers_are_relayed_again_and_again(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    """A 204 (DELETE of an upload session) and a 304 (conditional manifest GET) have no body to read."""
    await teach(http, gateway.url, "win/base", windows_image)
    for _ in range(REPEATS):
        location = await start_upload(http, gateway.url, "win/app")
        deleted = await step(http, gateway, call(http, "DELETE", location))
        assert deleted.status == 204, deleted
        assert (await call(http, "GET", absolute(registry.url, location.raw_path_qs))).status == 404
    manifest_url = f"{gateway.url}/v2/win/base/manifests/taught"
    for _ in range(REPEATS):
        conditional = {"Accept": windows_image.media_type, "If-None-Match": f'"{windows_image.manifest_digest}"'}
        unchanged = await step(http, gateway, call(http, "GET", manifest_url, headers=conditional))
        assert (unchanged.status, unchanged.body) == (304, b""), unchanged
    pushed = await put_manifest(http, gateway.url, "win/base", "again", windows_image.manifest, windows_image.media_type)
    assert pushed.status == 201, pushed


async def test_the_watchdog_exports_the_loop_lag_and_a_healthy_loop_is_healthy(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    await asyncio.sleep(0.6)  # a couple of watchdog ticks
    latest, largest = await loop_lag(http, gateway)
    assert 0 <= latest <= largest < PROBE_SECONDS
    health = await call(http, "GET", f"{gateway.admin_url}/healthz")
    assert health.status == 200 and health.json()["status"] == "ok", health
    assert health.json()["event_loop_lag_seconds"] == pytest.approx(latest, abs=0.5)


# The watchdog in this test's own process: the test blocks its own event loop, as a runaway loop would


async def test_a_blocked_loop_is_logged_while_it_lasts_and_makes_healthz_unhealthy_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway_app = web.Application()
    gateway_app[SETTINGS] = Settings(server=ServerSettings(max_loop_lag=0.5))
    watchdog = gateway_app[WATCHDOG] = LoopWatchdog(interval=0.05, warning=0.2)
    ticking = asyncio.create_task(watchdog.run())
    async with TestClient(TestServer(create_admin_app(gateway_app))) as admin:
        await asyncio.sleep(0.2)
        assert (await admin.get("/healthz")).status == 200
        with caplog.at_level("WARNING", logger="foreign_layer_proxy.watchdog"):
            time.sleep(1.0)  # noqa: ASYNC251  (on purpose: the loop runs nothing for a second)
            blocked_while_it_lasted = [r for r in caplog.records if r.getMessage() == "event_loop_blocked"]
            answer = await admin.get("/healthz")
            body = await answer.json()
        await asyncio.sleep(0.2)
        later = await admin.get("/healthz")
    ticking.cancel()
    assert blocked_while_it_lasted, "the watchdog thread did not see the stall while it lasted"
    assert answer.status == 503 and body["status"] == "unhealthy", body
    assert "server.max_loop_lag" in body["reason"], body
    assert later.status == 503, "a stall must stay visible for a while after the loop runs again"
    lags = [getattr(r, EVENT_FIELD)["lag_seconds"] for r in caplog.records if r.getMessage() == "event_loop_lag"]
    assert lags and max(lags) >= 0.9, lags
    assert 0.9 <= watchdog.lag.largest(watchdog.clock()) < 5.0


# The pure parts of the watchdog


@pytest.mark.parametrize(
    ("interval", "slept", "expected"),
    [
        (0.25, 0.25, 0.0),
        (0.25, 0.2501, 0.0001),
        (0.25, 0.24, 0.0),  # a clock that ran early is no lag
        (0.25, 1.25, 1.0),
        (0.25, 30.25, 30.0),
    ],
)
def test_lag_is_the_overshoot_of_a_sleep(interval: float, slept: float, expected: float) -> None:
    assert lag_after_sleep(interval, slept) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("ticks", "now", "expected_current", "expected_max", "unhealthy"),
    [
        # tick times (0.25 s apart when the loop keeps time) with their lags; the time of the check
        ([(0.25, 0.0), (0.5, 0.0)], 0.6, 0.0, 0.0, False),
        ([(0.25, 0.0), (3.0, 2.5)], 3.1, 2.5, 2.5, True),  # the loop came back after a 2.5 s stall
        ([(0.25, 0.0), (3.0, 2.5), (3.25, 0.0)], 3.3, 0.0, 2.5, True),  # keeps time again, still reported
        ([(0.25, 0.0), (3.0, 2.5), (3.25, 0.0), (40.0, 0.0)], 40.1, 0.0, 2.5, False),  # ... until the hold ends
        ([(0.25, 0.0), (3.0, 1.5)], 3.1, 1.5, 1.5, False),  # lagged, but not beyond the limit
        ([(0.25, 0.0)], 5.0, 4.5, 4.5, True),  # stalled now: no tick for 4.75 s of a 0.25 s interval
        ([(0.25, 0.0)], 0.45, 0.0, 0.0, False),  # a tick is not late before its interval is over
    ],
)
def test_lag_seen_from_outside_the_loop(
    ticks: list[tuple[float, float]], now: float, expected_current: float, expected_max: float, unhealthy: bool
) -> None:
    lag = LoopLag(interval=0.25, started=0.0, hold=30.0)
    for at, overshoot in ticks:
        lag.tick(at, overshoot)
    assert lag.current(now) == pytest.approx(expected_current)
    assert lag.largest(now) == pytest.approx(expected_max)
    assert lag.blocked_beyond(2.0, now) == unhealthy
