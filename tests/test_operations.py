"""What an operator runs it by: metrics, health and readiness, logs, reload on SIGHUP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import Image, build_image
from support.protocol import call, push_single_put, start_upload, teach
from support.registry import Registry, RegistryConfig, RegistryFactory, make_htpasswd


async def scrape(http: aiohttp.ClientSession, gateway: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by name and sorted labels."""
    answer = await call(http, "GET", f"{gateway.admin_url}/metrics")
    assert answer.status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.body.decode())
        for sample in family.samples
    }


async def test_metrics_move_with_a_push(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(40, foreign=1, os="windows")
    before = await scrape(http, gateway)
    await teach(http, gateway.url, "win/base", image)
    foreign = image.foreign_layers[0]
    assert (await push_single_put(http, gateway.url, "win/app", foreign.data)).status == 201
    after = await scrape(http, gateway)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    prefix = "foreign_layer_proxy"
    assert moved(f"{prefix}_decisions_total", action="dropped", rule="default") == 1
    assert moved(f"{prefix}_kept_out_bytes_total") == foreign.size
    assert moved(f"{prefix}_learned_digests_total", source="manifest-put") == 1
    assert moved(f"{prefix}_requests_total", method="PUT", route="manifest_put", status="201") == 1
    assert moved(f"{prefix}_requests_total", method="PUT", route="blob_upload", status="201") == len(image.blobs)
    assert moved(f"{prefix}_streamed_bytes_total", direction="up") >= sum(len(blob) for blob in image.blobs.values())
    assert after[(f"{prefix}_known_foreign_digests", ())] == 1
    assert not any("win/" in str(labels) for _, labels in after)


@pytest.mark.parametrize("required", [False, True], ids=["upstream-reported", "upstream-required"])
async def test_readiness_reports_the_upstream_and_fails_on_it_only_when_required(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, required: bool
) -> None:
    gateway = gateway_factory(registry, config={"admin": {"ready_requires_upstream": required}})
    up = await call(http, "GET", f"{gateway.admin_url}/readyz")
    assert (up.status, up.json()["checks"]["upstream"]) == (200, "ok")
    await asyncio.to_thread(registry.stop)
    down = await call(http, "GET", f"{gateway.admin_url}/readyz")
    assert down.status == (503 if required else 200)
    assert down.json()["checks"]["upstream"] != "ok"
    # A ready gateway tells clients what is wrong, instead of their connections being refused.
    answer = await call(http, "GET", f"{gateway.url}/v2/")
    assert (answer.status, answer.error_codes) == (502, ["UNAVAILABLE"])
    assert (await call(http, "GET", f"{gateway.admin_url}/healthz")).status == 200
    await asyncio.to_thread(registry.start)
    assert (await call(http, "GET", f"{gateway.admin_url}/readyz")).status == 200


async def test_readiness_is_503_while_draining(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"x" * 1024
        await release.wait()
        yield b"y" * 1024

    location = await start_upload(http, gateway.url, "drain/test")
    upload = asyncio.create_task(call(http, "PATCH", location, data=slow_body()))
    await gateway.wait_for("request")  # the POST's line: the PATCH is under way after it
    await asyncio.sleep(0.2)
    assert (await call(http, "GET", f"{gateway.admin_url}/readyz")).status == 200
    os.kill(gateway.process.pid, signal.SIGTERM)
    await gateway.wait_for("stopping")
    draining = await call(http, "GET", f"{gateway.admin_url}/readyz")
    release.set()
    assert (draining.status, draining.json()["checks"]["shutdown"]) == (503, "draining")
    assert (await upload).status == 202, "the upload in flight still finishes"
    assert await asyncio.to_thread(gateway.process.wait, 30) == 0


async def test_logs_never_carry_credentials_even_at_debug(
    registry_factory: RegistryFactory, gateway_factory: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    registry = registry_factory(RegistryConfig(htpasswd=make_htpasswd(tmp_path / "htpasswd", "bob", "hunter2")))
    gateway = gateway_factory(registry, args=["--log-level", "debug"])
    authorization = aiohttp.encode_basic_auth("bob", "hunter2")
    started = await call(
        http, "POST", f"{gateway.url}/v2/secret/repo/blobs/uploads/", headers={"Authorization": authorization}
    )
    assert started.status == 202
    state = started.headers["Location"].split("_state=")[1]
    requests = await gateway.wait_for("request")
    assert requests[-1]["path"] == "/v2/secret/repo/blobs/uploads/"
    log = gateway.process.log_text()
    for secret in (authorization, authorization.split()[1], "hunter2", state):
        assert secret not in log


async def test_sighup_changes_the_rule_for_the_next_request(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image: Image = build_image(41, foreign=1, os="windows")
    gateway = gateway_factory(registry, config={"policy": {"default": "drop"}})
    await teach(http, gateway.url, "win/base", image)
    foreign = image.foreign_layers[0].data
    assert (await push_single_put(http, gateway.url, "win/a", foreign)).status == 201

    gateway.config_path.write_text(json.dumps({"policy": {"default": "reject"}}))
    os.kill(gateway.process.pid, signal.SIGHUP)
    await gateway.wait_for("reloaded")
    assert (await push_single_put(http, gateway.url, "win/b", foreign)).status == 403

    gateway.config_path.write_text(json.dumps({"policy": {"default": "sometimes"}}))
    os.kill(gateway.process.pid, signal.SIGHUP)
    await gateway.wait_for("reload_refused")
    assert "policy.default" in gateway.events("reload_refused")[0]["error"]
    assert (await push_single_put(http, gateway.url, "win/c", foreign)).status == 403
