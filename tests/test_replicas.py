"""Gateway replicas behind a round-robin balancer share what they learn through one store.

Real processes throughout: redis-server, docker-registry, the gateways and haproxy, each on its own port.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from support.clients import skopeo_copy, skopeo_inspect_raw
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import Image, Layer, build_image, write_dir
from support.processes import describe
from support.protocol import (
    push_image_blobs,
    push_monolithic_post,
    push_single_put,
    put_manifest,
)
from support.registry import Registry
from support.services import Haproxy, HaproxyFactory, RedisFactory, RedisServer
from test_enforcement import teach

from proxy.store import ForeignStore, open_store

PASSWORD = "replica-s3cret"
PROPAGATION_LIMIT = 1.0  # seconds, from the issue: learned on replica A, enforced by replica B
PATIENCE = 15.0  # seconds any single wait may take before the test gives up


@dataclass(frozen=True)
class Replicas:
    gateways: tuple[GatewayProcess, ...]
    balancer: Haproxy


@pytest.fixture
def redis(redis_factory: RedisFactory) -> RedisServer:
    return redis_factory(password=PASSWORD)


def start_replicas(
    gateway_factory: GatewayFactory, haproxy_factory: HaproxyFactory, registry: Registry, store: str, count: int
) -> Replicas:
    gateways = tuple(gateway_factory(registry, args=["--log-level", "info"], store=store) for _ in range(count))
    return Replicas(gateways, haproxy_factory([gateway.host_port for gateway in gateways]))


@pytest.fixture
def replicas(
    gateway_factory: GatewayFactory, haproxy_factory: HaproxyFactory, registry: Registry, redis: RedisServer
) -> Replicas:
    return start_replicas(gateway_factory, haproxy_factory, registry, redis.url(), count=3)


@pytest.fixture(params=["redis", "sqlite"])
def shared_replicas(
    request: pytest.FixtureRequest,
    gateway_factory: GatewayFactory,
    haproxy_factory: HaproxyFactory,
    registry: Registry,
    tmp_path: Path,
) -> Replicas:
    """Three replicas on one Redis, or two on one SQLite file (one host)."""
    if request.param == "redis":
        return request.getfixturevalue("replicas")  # type: ignore[no-any-return]
    return start_replicas(gateway_factory, haproxy_factory, registry, f"sqlite://{tmp_path / 'shared.db'}", count=2)


def drops(gateway: GatewayProcess, layer: Layer) -> int:
    return sum(1 for entry in gateway.events("decision") if (entry["digest"], entry["action"]) == (layer.digest, "drop"))


async def seconds_until_dropped(
    http: aiohttp.ClientSession, gateway: GatewayProcess, layer: Layer, *, since: float, patience: float = PATIENCE
) -> float:
    """Push `layer` to `gateway` (a new repository each time) until it drops it; seconds from `since`.

    The push is a monolithic POST: while the gateway does not know the layer, the registry only opens
    a session for it. A completed upload (a single PUT) would be remembered for leak detection, which
    wakes the gateway's sync at once, and so would measure that rather than the replicas' sharing.
    `patience=0` asks for a drop at the first push.
    """
    dropped_before = drops(gateway, layer)
    while True:
        answer = await push_monolithic_post(http, gateway.url, f"probe/{uuid.uuid4().hex}", layer.data)
        if drops(gateway, layer) > dropped_before:
            assert answer.status == 201, answer
            return time.monotonic() - since
        assert time.monotonic() - since <= patience, f"{gateway.url} did not drop {layer.digest} in {patience} s"
        await asyncio.sleep(0.02)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> float:
    """Seconds until `check` holds."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < PATIENCE, f"no {what} after {PATIENCE} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def requests_served(gateway: GatewayProcess) -> list[tuple[str, str]]:
    return [(entry["method"], entry["path"]) for entry in gateway.events("request")]


def upload_session(path: str) -> str | None:
    """The session id of /v2/REPO/blobs/uploads/ID; None for the POST that starts one."""
    head, _, session = path.rpartition("/blobs/uploads/")
    return session or None if head else None


async def test_a_push_through_the_balancer_is_spread_over_every_replica(
    replicas: Replicas, registry: Registry, skopeo_cache: Path, tmp_path: Path
) -> None:
    image = build_image(30, layer_sizes=(4096,) * 8)
    source = write_dir(image, tmp_path / "source")
    reference = f"docker://{replicas.balancer.host_port}/team/app:v1"

    pushed = await asyncio.to_thread(skopeo_copy, f"dir:{source}", reference, cache_dir=skopeo_cache)

    assert pushed.returncode == 0, describe(pushed)
    assert await asyncio.to_thread(skopeo_inspect_raw, f"docker://{registry.host_port}/team/app:v1") == image.manifest
    served = [requests_served(gateway) for gateway in replicas.gateways]
    print("requests per replica:", [len(requests) for requests in served])
    session_replicas: dict[str, set[int]] = {}
    for index, requests in enumerate(served):
        for _, path in requests:
            if session := upload_session(path):
                session_replicas.setdefault(session, set()).add(index)
    assert all(
        any(method in {"PATCH", "PUT"} and upload_session(path) for method, path in requests) for requests in served
    ), served
    assert any(len(indexes) > 1 for indexes in session_replicas.values()), session_replicas


async def test_a_layer_learned_on_one_replica_is_enforced_by_the_others_within_a_second(
    shared_replicas: Replicas, http: aiohttp.ClientSession
) -> None:
    image = build_image(31, foreign=1, os="windows")
    teacher, *others = shared_replicas.gateways

    await teach(http, teacher.url, "win/base", image)
    taught = time.monotonic()

    measured = [await seconds_until_dropped(http, other, image.foreign_layers[0], since=taught) for other in others]
    print(f"learned on one replica, enforced by the others after {', '.join(f'{s:.3f}' for s in measured)} s")
    assert max(measured) < PROPAGATION_LIMIT


async def test_replicas_keep_enforcing_through_a_redis_outage_and_refill_an_empty_redis(
    replicas: Replicas, redis: RedisServer, http: aiohttp.ClientSession
) -> None:
    before, during = build_image(32, foreign=1, os="windows"), build_image(33, foreign=1, os="windows")
    teacher, *others = replicas.gateways
    await teach(http, teacher.url, "win/before", before)
    for other in others:
        await seconds_until_dropped(http, other, before.foreign_layers[0], since=time.monotonic())

    await asyncio.to_thread(redis.stop)
    await eventually(lambda: noticed_outage(replicas.gateways), "store_error logged by every replica")
    await push_through(http, replicas.balancer, "team/app", build_image(34))
    for gateway in replicas.gateways:
        await seconds_until_dropped(http, gateway, before.foreign_layers[0], since=time.monotonic(), patience=0)
    await teach(http, teacher.url, "win/during", during)
    await seconds_until_dropped(http, teacher, during.foreign_layers[0], since=time.monotonic(), patience=0)

    await asyncio.to_thread(redis.start)  # on the same port, empty: a failover to a server that had nothing
    back = time.monotonic()
    # A completed upload wakes the teacher's sync at once, so that it most likely writes to the new Redis
    # before the others look: they must still notice that the store was reset.
    await push_single_put(http, teacher.url, "team/wake", os.urandom(1000))
    measured = [await seconds_until_dropped(http, other, during.foreign_layers[0], since=back) for other in others]
    store = open_store(redis.url())
    everything = {layer.digest for layer in (*before.foreign_layers, *during.foreign_layers)}
    await eventually(lambda: stored_all(store, everything), "refill of the empty Redis")
    refilled = time.monotonic() - back
    await store.close()
    print(f"after Redis came back empty: learned in the outage enforced by the others after "
          f"{', '.join(f'{s:.3f}' for s in measured)} s; Redis refilled after {refilled:.3f} s")  # fmt: skip
    for gateway in replicas.gateways:
        await seconds_until_dropped(http, gateway, before.foreign_layers[0], since=time.monotonic(), patience=0)
        assert PASSWORD not in gateway.process.log_text()


async def noticed_outage(gateways: Sequence[GatewayProcess]) -> bool:
    return all(gateway.events("store_error") for gateway in gateways)


async def stored_all(store: ForeignStore, digests: set[str]) -> bool:
    return digests <= set(await store.known())


async def push_through(http: aiohttp.ClientSession, balancer: Haproxy, repository: str, image: Image) -> None:
    await push_image_blobs(http, balancer.url, repository, image.blobs.values())
    answer = await put_manifest(http, balancer.url, repository, "v1", image.manifest, image.media_type)
    assert answer.status == 201, answer
