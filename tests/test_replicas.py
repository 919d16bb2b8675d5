"""Gateway replicas behind a round-robin balancer share what they learn through one store.

Real processes throughout: redis-server, docker-registry, the gateways and haproxy, each on its own port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from support.clients import skopeo_copy, skopeo_inspect_raw
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import Image, Layer, build_image, write_dir
from support.processes import describe, require_binaries, run_checked
from support.protocol import (
    push_image_blobs,
    push_monolithic_post,
    push_single_put,
    put_manifest,
    teach,
)
from support.registry import Registry
from support.services import Haproxy, HaproxyFactory, RedisFactory, RedisServer

from proxy.store import ForeignStore, open_store
from proxy.store_redis import parse_redis_url

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
    return sum(1 for entry in gateway.events("decision") if (entry.get("digest"), entry["action"]) == (layer.digest, "drop"))


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


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < PATIENCE, f"no {what} after {PATIENCE} s"
        await asyncio.sleep(0.05)


def requests_served(gateway: GatewayProcess) -> list[tuple[str, str]]:
    return [(entry["method"], entry["path"]) for entry in gateway.events("request")]


def upload_session(path: str) -> str | None:
    """The session id of /v2/REPO/blobs/uploads/ID; None for the POST that starts one."""
    _, marker, session = path.rpartition("/blobs/uploads/")
    return session if marker and session else None


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

    measured = await asyncio.gather(
        *(seconds_until_dropped(http, other, image.foreign_layers[0], since=taught) for other in others)
    )
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
    assert all(f"redis://{redis.host_port}/0: " in entry["error"] for entry in teacher.events("store_error"))
    await push_through(http, replicas.balancer, "team/app", build_image(34))
    for gateway in replicas.gateways:
        await seconds_until_dropped(http, gateway, before.foreign_layers[0], since=time.monotonic(), patience=0)
    await teach(http, teacher.url, "win/during", during)
    await seconds_until_dropped(http, teacher, during.foreign_layers[0], since=time.monotonic(), patience=0)

    # The hardest order: the teacher writes to the new Redis before the others look (frozen meanwhile),
    # so they find a store that has changed, not one that is empty, and must still see that it was reset.
    store = open_store(redis.url())
    with frozen(others):
        await asyncio.to_thread(redis.start)  # on the same port, empty: a failover to a server that had nothing
        await push_single_put(http, teacher.url, "team/wake", os.urandom(1000))  # a completed upload wakes its sync
        await eventually(lambda: stored_all(store, digests(during)), "write of the teacher's unsaved layer")
    thawed = time.monotonic()
    measured = await asyncio.gather(
        *(seconds_until_dropped(http, other, during.foreign_layers[0], since=thawed) for other in others)
    )
    await eventually(lambda: stored_all(store, digests(before) | digests(during)), "refill of the empty Redis")
    refilled = time.monotonic() - thawed
    await store.close()
    print(f"after Redis came back empty: learned in the outage enforced by the others after "
          f"{', '.join(f'{s:.3f}' for s in measured)} s; Redis refilled after {refilled:.3f} s")  # fmt: skip
    for gateway in replicas.gateways:
        await seconds_until_dropped(http, gateway, before.foreign_layers[0], since=time.monotonic(), patience=0)
        assert PASSWORD not in gateway.process.log_text()


@contextlib.contextmanager
def frozen(gateways: Sequence[GatewayProcess]) -> Iterator[None]:
    for gateway in gateways:
        os.kill(gateway.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for gateway in gateways:
            os.kill(gateway.process.pid, signal.SIGCONT)


def digests(image: Image) -> set[str]:
    return {layer.digest for layer in image.foreign_layers}


async def noticed_outage(gateways: Sequence[GatewayProcess]) -> bool:
    return all(gateway.events("store_error") for gateway in gateways)


async def stored_all(store: ForeignStore, wanted: set[str]) -> bool:
    return wanted <= set(await store.known())


async def push_through(http: aiohttp.ClientSession, balancer: Haproxy, repository: str, image: Image) -> None:
    await push_image_blobs(http, balancer.url, repository, image.blobs.values())
    answer = await put_manifest(http, balancer.url, repository, "v1", image.manifest, image.media_type)
    assert answer.status == 201, answer


CONFIG = Path(__file__).resolve().parent.parent / "config"


def haproxy_servers(config: str) -> list[str]:
    return [line.split()[1] for line in config.splitlines() if line.strip().startswith("server ")]


def test_the_compose_example_balances_every_gateway_over_one_redis() -> None:
    require_binaries("haproxy")
    run_checked(["haproxy", "-c", "-q", "-f", CONFIG / "haproxy.cfg"], timeout=30)
    services = yaml.safe_load((CONFIG / "docker-compose.replicas.yaml").read_text())["services"]
    gateways = [name for name, service in services.items() if service["image"].startswith("foreign-layer-proxy")]

    assert haproxy_servers((CONFIG / "haproxy.cfg").read_text()) == gateways
    for name in gateways:
        url = services[name]["environment"]["FOREIGN_LAYER_PROXY_STORE_URL"]
        assert parse_redis_url(url.replace("${REDIS_PASSWORD:?set REDIS_PASSWORD}", "pw")).host in services


def test_the_kubernetes_example_runs_three_replicas_on_the_redis_of_its_secret() -> None:
    documents = {
        (document["kind"], document["metadata"]["name"]): document
        for document in yaml.safe_load_all((CONFIG / "kubernetes/replicas.yaml").read_text())
    }
    secret = documents["Secret", "foreign-layer-proxy-redis"]["stringData"]
    gateway = documents["Deployment", "foreign-layer-proxy"]["spec"]
    (container,) = gateway["template"]["spec"]["containers"]
    (store_url,) = [env for env in container["env"] if env["name"] == "FOREIGN_LAYER_PROXY_STORE_URL"]

    assert gateway["replicas"] == 3
    assert store_url["valueFrom"]["secretKeyRef"] == {"name": "foreign-layer-proxy-redis", "key": "store-url"}
    location = parse_redis_url(secret["store-url"])
    assert (location.host, location.port, location.password) == ("foreign-layer-proxy-redis", 6379, secret["password"])
    assert ("Service", location.host) in documents
