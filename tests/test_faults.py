"""Faults around the gateway: a registry that refuses, resets, stalls, talks garbage or restarts; a broken store; a soak.

Every test runs a real `docker-registry` and the gateway as a real process; network faults come from
support.faulty, a fault injector between the two that relays everything else to the real registry.
After each fault the gateway must answer a clear OCI error (502/504 UNAVAILABLE), keep serving the
others, hold no more file descriptors than before, and take a retried push.

The soak's size comes from the environment (defaults fit CI's 2 cores):
    SOAK_PUSHERS  concurrent pushes of different images          (default 50;  the issue: 200)
    SOAK_PULLERS  concurrent manifest-and-blob pulls              (default 200; the issue: 1000)
    SOAK_SECONDS  how long both keep going                        (default 20;  the issue: 60)
Each pusher takes every push form of support.protocol.PUSH_FORMS in turn.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.faulty import Fault, FaultyUpstream, open_fds, rss_bytes, sockets_to
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import Image, build_image
from support.processes import ManagedProcess, require_binaries
from support.protocol import (
    PUSH_FORMS,
    Answer,
    call,
    digest_of,
    push_image_blobs,
    push_single_put,
    put_manifest,
    start_upload,
    teach,
    upstream_has,
    with_digest,
)
from support.registry import Registry
from support.services import RedisFactory

SHORT_READ_TIMEOUT = {"upstream": {"read_timeout": 2, "connect_timeout": 2}}
# Sockets that may legitimately come and go between two counts: pooled keep-alive connections.
FD_SLACK = 4


# Helpers ------------------------------------------------------------------------------------------


@pytest.fixture
async def fresh_http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that closes every connection after its answer, so the gateway's fd count is its own."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session


@pytest.fixture
def injector(registry: Registry) -> Iterator[FaultyUpstream]:
    with FaultyUpstream(registry.host_port) as faulty:
        yield faulty


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.1)


async def metric_samples(http: aiohttp.ClientSession, gateway: GatewayProcess) -> dict[str, float]:
    """Every sample of the admin /metrics, keyed as `name{label="value",...}` with sorted labels."""
    answer = await call(http, "GET", f"{gateway.admin_url}/metrics")
    assert answer.status == 200, answer
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def settled(http: aiohttp.ClientSession, gateway: GatewayProcess, baseline_fds: int) -> None:
    """Nothing left in flight and no more descriptors than `baseline_fds` (plus pooled connections)."""
    pid = gateway.process.pid

    async def idle() -> bool:
        samples = await metric_samples(http, gateway)
        return samples.get("foreign_layer_proxy_uploads_in_flight", 0.0) == 0.0

    await eventually(idle, "uploads_in_flight back to 0")
    await eventually(
        lambda: open_fds(pid) <= baseline_fds + FD_SLACK,
        f"gateway fds back to {baseline_fds} (+{FD_SLACK}); now {open_fds(pid)}: {sorted(os.listdir(f'/proc/{pid}/fd'))}",
    )


async def warmed_up(http: aiohttp.ClientSession, gateway: GatewayProcess) -> int:
    """A few ordinary exchanges first (pool, store and metrics open), then the fd count to compare with."""
    for _ in range(3):
        assert (await call(http, "GET", f"{gateway.url}/v2/")).status == 200
    await metric_samples(http, gateway)
    await asyncio.sleep(0.6)  # one store sync round
    return open_fds(gateway.process.pid)


def assert_unavailable(answer: Answer, status: int) -> None:
    assert answer.status == status, answer
    assert answer.headers["Content-Type"].startswith("application/json"), answer
    assert answer.error_codes == ["UNAVAILABLE"], answer


async def push_and_check(http: aiohttp.ClientSession, base: str, registry: Registry, repository: str, data: bytes) -> None:
    answer = await push_single_put(http, base, repository, data)
    assert answer.status == 201, answer
    assert await upstream_has(http, registry, repository, digest_of(data))


# The upstream refuses, resets, stalls, answers garbage, restarts ------------------------------------


async def test_refused_connections_give_a_502_and_the_retried_push_succeeds(
    gateway_factory: GatewayFactory, registry: Registry, fresh_http: aiohttp.ClientSession
) -> None:
    gateway = gateway_factory(registry, config=SHORT_READ_TIMEOUT)
    baseline = await warmed_up(fresh_http, gateway)
    data = os.urandom(200_000)
    location = await start_upload(fresh_http, gateway.url, "refused/app")
    await asyncio.to_thread(registry.stop)

    assert_unavailable(await call(fresh_http, "PUT", with_digest(location, digest_of(data)), data=data), 502)
    assert_unavailable(await call(fresh_http, "POST", f"{gateway.url}/v2/refused/app/blobs/uploads/"), 502)
    assert_unavailable(await call(fresh_http, "GET", f"{gateway.url}/v2/refused/app/tags/list"), 502)

    await asyncio.to_thread(registry.start)
    await push_and_check(fresh_http, gateway.url, registry, "refused/app", data)
    await settled(fresh_http, gateway, baseline)


async def test_a_reset_in_the_middle_of_an_upload_gives_a_502_and_the_retried_push_succeeds(
    gateway_factory: GatewayFactory, registry: Registry, injector: FaultyUpstream, fresh_http: aiohttp.ClientSession
) -> None:
    gateway = gateway_factory(injector.url, config=SHORT_READ_TIMEOUT)
    baseline = await warmed_up(fresh_http, gateway)
    data = os.urandom(2 * 1024 * 1024)
    injector.arm(Fault.RESET, "PUT /v2/reset/", after_bytes=256 * 1024)

    pushes = await asyncio.gather(
        push_single_put(fresh_http, gateway.url, "reset/app", data),
        push_single_put(fresh_http, gateway.url, "calm/app", data[:100_000]),
    )
    assert_unavailable(pushes[0], 502)
    assert pushes[1].status == 201, pushes[1]
    assert injector.faulted == 1
    assert not await upstream_has(fresh_http, registry, "reset/app", digest_of(data))

    injector.disarm()
    await push_and_check(fresh_http, gateway.url, registry, "reset/app", data)
    await settled(fresh_http, gateway, baseline)


async def test_a_stalled_upstream_gives_a_504_and_the_others_are_served(
    gateway_factory: GatewayFactory, registry: Registry, injector: FaultyUpstream, fresh_http: aiohttp.ClientSession
) -> None:
    gateway = gateway_factory(injector.url, config=SHORT_READ_TIMEOUT)
    baseline = await warmed_up(fresh_http, gateway)
    injector.arm(Fault.STALL, "/v2/stall/")
    data = os.urandom(300_000)

    stalled = [
        asyncio.create_task(call(fresh_http, "GET", f"{gateway.url}/v2/stall/app/manifests/latest")),
        asyncio.create_task(call(fresh_http, "GET", f"{gateway.url}/v2/stall/app/blobs/{digest_of(data)}")),
        asyncio.create_task(call(fresh_http, "POST", f"{gateway.url}/v2/stall/app/blobs/uploads/")),
    ]
    for index in range(5):
        await push_and_check(fresh_http, gateway.url, registry, f"calm/app{index}", data[index:])
    for answer in await asyncio.gather(*stalled):
        assert_unavailable(answer, 504)
    assert injector.faulted == len(stalled)

    injector.disarm()
    await push_and_check(fresh_http, gateway.url, registry, "stall/app", data)
    await settled(fresh_http, gateway, baseline)


async def test_an_upload_whose_answer_never_comes_gives_a_504_and_the_retry_succeeds(
    gateway_factory: GatewayFactory, registry: Registry, injector: FaultyUpstream, fresh_http: aiohttp.ClientSession
) -> None:
    gateway = gateway_factory(injector.url, config=SHORT_READ_TIMEOUT)
    baseline = await warmed_up(fresh_http, gateway)
    data = os.urandom(1024 * 1024)
    injector.arm(Fault.STALL, "PUT /v2/slow/")

    assert_unavailable(await push_single_put(fresh_http, gateway.url, "slow/app", data), 504)

    injector.disarm()
    await push_and_check(fresh_http, gateway.url, registry, "slow/app", data)
    await settled(fresh_http, gateway, baseline)


async def test_an_upstream_stalling_mid_download_cuts_the_download_and_nothing_else(
    gateway_factory: GatewayFactory, registry: Registry, injector: FaultyUpstream, fresh_http: aiohttp.ClientSession
) -> None:
    gateway = gateway_factory(injector.url, config=SHORT_READ_TIMEOUT)
    data = os.urandom(4 * 1024 * 1024)
    await push_and_check(fresh_http, gateway.url, registry, "cut/app", data)
    baseline = await warmed_up(fresh_http, gateway)
    injector.arm(Fault.STALL_BODY, f"GET /v2/cut/app/blobs/{digest_of(data)}", after_bytes=1024 * 1024)

    async with fresh_http.get(f"{gateway.url}/v2/cut/app/blobs/{digest_of(data)}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(data))
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += chunk
    assert len(received) < len(data)
    assert received == data[: len(received)]

    await push_and_check(fresh_http, gateway.url, registry, "cut/other", data[:1000])
    await eventually(lambda: bool(gateway.events("stream_aborted")), "a stream_aborted event")
    injector.disarm()
    assert (await call(fresh_http, "GET", f"{gateway.url}/v2/cut/app/blobs/{digest_of(data)}")).body == data
    await settled(fresh_http, gateway, baseline)


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_an_upstream_answering_garbage_gives_a_502(
    gateway_factory: GatewayFactory, registry: Registry, injector: FaultyUpstream, fresh_http: aiohttp.ClientSession,
    method: str,
) -> None:  # fmt: skip
    gateway = gateway_factory(injector.url, config=SHORT_READ_TIMEOUT)
    baseline = await warmed_up(fresh_http, gateway)
    injector.arm(Fault.GARBAGE, f"{method} /v2/garbage/")
    data = os.urandom(100_000)

    if method == "GET":
        answer = await call(fresh_http, "GET", f"{gateway.url}/v2/garbage/app/manifests/latest")
    else:
        answer = await push_single_put(fresh_http, gateway.url, "garbage/app", data)
    assert_unavailable(answer, 502)
    assert b"SSH-2.0" not in answer.body

    injector.disarm()
    await push_and_check(fresh_http, gateway.url, registry, "garbage/app", data)
    await settled(fresh_http, gateway, baseline)


async def test_a_registry_restart_during_a_push_gives_a_502_and_the_retried_push_succeeds(
    gateway_factory: GatewayFactory, registry: Registry, fresh_http: aiohttp.ClientSession
) -> None:
    gateway = gateway_factory(registry, config=SHORT_READ_TIMEOUT)
    baseline = await warmed_up(fresh_http, gateway)
    parts = [os.urandom(256 * 1024) for _ in range(8)]
    data = b"".join(parts)
    first_part_sent = asyncio.Event()
    registry_stopped = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        for index, part in enumerate(parts):
            yield part
            if index == 0:
                first_part_sent.set()
                await registry_stopped.wait()

    location = await start_upload(fresh_http, gateway.url, "restart/app")
    upload = asyncio.create_task(
        call(fresh_http, "PUT", with_digest(location, digest_of(data)), data=slow_body(),
             headers={"Content-Type": "application/octet-stream"})
    )  # fmt: skip
    await first_part_sent.wait()
    await asyncio.to_thread(registry.stop)
    registry_stopped.set()
    await asyncio.to_thread(registry.start)

    try:
        interrupted: Answer | None = await upload
    except aiohttp.ClientError:
        interrupted = None  # the gateway may close the connection while the body is still coming
    if interrupted is not None:
        assert_unavailable(interrupted, 502)
    assert not registry.blob_data_path(digest_of(data)).exists()
    assert gateway.events("gateway_error") or gateway.events("stream_aborted")

    await push_and_check(fresh_http, gateway.url, registry, "restart/app", data)
    await settled(fresh_http, gateway, baseline)


# The store is unavailable, read-only or corrupt ---------------------------------------------------


StoreFault = Callable[[GatewayFactory, Registry, Path], Awaitable[GatewayProcess]]


@pytest.fixture
def confined_gateways() -> Iterator[list[GatewayProcess]]:
    """Gateways started by hand (not by gateway_factory), stopped by PID at the end."""
    started: list[GatewayProcess] = []
    yield started
    for gateway in reversed(started):
        gateway.stop()


def gateway_with_read_only_folder(workdir: Path, registry: Registry, store: str, folder: Path) -> GatewayProcess:
    """The gateway in a mount namespace of its own where `folder` is mounted read-only (root ignores file modes)."""
    require_binaries("unshare")
    gateway = GatewayProcess(workdir, registry.url, store=store)
    gateway.process = ManagedProcess(
        ["unshare", "--mount", "--propagation", "private", "--",
         "sh", "-c", 'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", folder, *gateway.process.args],
        log_path=gateway.process.log_path,
    )  # fmt: skip
    return gateway


async def store_errors(http: aiohttp.ClientSession, gateway: GatewayProcess) -> float:
    return (await metric_samples(http, gateway)).get("foreign_layer_proxy_store_errors_total", 0.0)


async def assert_enforces_in_memory_despite_the_store(
    http: aiohttp.ClientSession, gateway: GatewayProcess, registry: Registry, seed: int
) -> None:
    """Pushes work, a layer learned now is enforced, and the store's failures are logged and counted."""
    plain = os.urandom(50_000)
    await push_and_check(http, gateway.url, registry, "store/plain", plain)
    image = build_image(seed, foreign=1, os="windows")
    await teach(http, gateway.url, "store/base", image)
    foreign = image.foreign_layers[0]
    assert (await push_single_put(http, gateway.url, "store/app", foreign.data)).status == 201
    assert not await upstream_has(http, registry, "store/app", foreign.digest)
    assert foreign.digest in [entry["digest"] for entry in gateway.events("learned")]
    await eventually(lambda: bool(gateway.events("store_error")), "a store_error event in the log")
    assert await store_errors(http, gateway) > 0


async def test_a_corrupt_store_file_leaves_pushes_and_enforcement_working(
    gateway_factory: GatewayFactory, registry: Registry, fresh_http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    database = tmp_path / "corrupt.db"
    garbage = b"this is not an SQLite database " * 300
    database.write_bytes(garbage)
    gateway = gateway_factory(registry, store=f"sqlite:///{database}")

    await assert_enforces_in_memory_despite_the_store(fresh_http, gateway, registry, 70)
    assert "corrupt.db" in gateway.events("store_error")[0]["error"]
    assert database.read_bytes() == garbage


async def test_a_read_only_store_leaves_pushes_and_enforcement_working(
    registry: Registry, fresh_http: aiohttp.ClientSession, tmp_path: Path, confined_gateways: list[GatewayProcess]
) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    gateway = gateway_with_read_only_folder(tmp_path, registry, f"sqlite:///{folder / 'foreign-layers.db'}", folder)
    confined_gateways.append(gateway)
    gateway.start()

    await assert_enforces_in_memory_despite_the_store(fresh_http, gateway, registry, 71)
    assert list(folder.iterdir()) == []


async def test_a_read_only_store_still_enforces_what_it_holds(
    gateway_factory: GatewayFactory, registry: Registry, fresh_http: aiohttp.ClientSession, tmp_path: Path,
    confined_gateways: list[GatewayProcess],
) -> None:  # fmt: skip
    """A store learned by one gateway, then mounted read-only (a shared, frozen volume) for the next."""
    folder = tmp_path / "store"
    folder.mkdir()
    store = f"sqlite:///{folder / 'foreign-layers.db'}"
    image = build_image(72, foreign=1, os="windows")
    learner = gateway_factory(registry, store=store)
    await teach(fresh_http, learner.url, "store/base", image)
    await asyncio.to_thread(learner.stop)
    (tmp_path / "confined").mkdir()
    gateway = gateway_with_read_only_folder(tmp_path / "confined", registry, store, folder)
    confined_gateways.append(gateway)
    gateway.start()

    foreign = image.foreign_layers[0]
    answer = await push_single_put(fresh_http, gateway.url, "store/app", foreign.data)
    assert answer.status == 201, answer
    assert not await upstream_has(fresh_http, registry, "store/app", foreign.digest), (
        "a foreign layer held by the read-only store reached the registry; the gateway logged: "
        f"{[entry['error'] for entry in gateway.events('store_error')][:1]}"
    )


async def test_a_redis_store_going_away_leaves_pushes_and_enforcement_working(
    gateway_factory: GatewayFactory, registry: Registry, redis_factory: RedisFactory,
    fresh_http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    redis = redis_factory()
    gateway = gateway_factory(registry, store=redis.url())
    before = build_image(73, foreign=1, os="windows")
    await teach(fresh_http, gateway.url, "store/before", before)
    await asyncio.to_thread(redis.stop)

    await assert_enforces_in_memory_despite_the_store(fresh_http, gateway, registry, 74)
    first = before.foreign_layers[0]
    assert (await push_single_put(fresh_http, gateway.url, "store/again", first.data)).status == 201
    assert not await upstream_has(fresh_http, registry, "store/again", first.digest)
    ready = await call(fresh_http, "GET", f"{gateway.admin_url}/readyz")
    assert ready.status == 200, ready
    assert ready.json()["checks"]["store"] != "ok"


# Soak ---------------------------------------------------------------------------------------------

SOAK_PUSHERS = int(os.environ.get("SOAK_PUSHERS", "50"))
SOAK_PULLERS = int(os.environ.get("SOAK_PULLERS", "200"))
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
SOAK_MAX_ROUNDS = 100_000  # per worker: the loops are bounded in count as well as in time
SOAK_PULL_TARGETS = 8
SOAK_REQUEST_TIMEOUT_SECONDS = 30.0
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# Growth of the gateway's memory from the soak's first half to its end that still counts as stable.
RSS_GROWTH_LIMIT = 48 * 1024 * 1024
UPSTREAM_POOL_LIMIT = 256  # upstream.max_connections


def soak_image(worker: int, round_: int, foreign: Image | None) -> tuple[bytes, dict[str, bytes]]:
    """A small image of its own (manifest, blobs by digest); with a known foreign layer listed first when given."""
    layer = f"soak {worker} {round_} ".encode() + random.randbytes(2048)
    layers = []
    diff_ids = []
    if foreign is not None:
        known = foreign.foreign_layers[0]
        layers.append(known.descriptor())
        diff_ids.append(known.diff_id)
    layers.append({"mediaType": DOCKER_LAYER, "digest": digest_of(layer), "size": len(layer)})
    diff_ids.append(digest_of(layer))
    config = json.dumps({"os": "windows" if foreign else "linux", "architecture": "amd64",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": layers,
    }).encode()  # fmt: skip
    blobs = {digest_of(config): config, digest_of(layer): layer}
    if foreign is not None:
        blobs[foreign.foreign_layers[0].digest] = foreign.foreign_layers[0].data  # a client that uploads them too
    return manifest, blobs


async def test_soak_concurrent_pushes_and_pulls(
    gateway_factory: GatewayFactory, registry: Registry, tmp_path: Path
) -> None:
    gateway = gateway_factory(registry, args=["--log-level", "warning"])
    pid = gateway.process.pid
    connector = aiohttp.TCPConnector(limit=SOAK_PUSHERS + SOAK_PULLERS + 8)
    # Bounded, so that a gateway that stops answering fails the soak instead of hanging it.
    timeout = aiohttp.ClientTimeout(total=SOAK_REQUEST_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False, timeout=timeout) as http:
        foreign_images = [build_image(80 + index, foreign=1, os="windows") for index in range(4)]
        for index, image in enumerate(foreign_images):
            await teach(http, gateway.url, f"soak/base{index}", image)
        targets = [build_image(90 + index) for index in range(SOAK_PULL_TARGETS)]
        for index, image in enumerate(targets):
            await push_image_blobs(http, gateway.url, f"soak/pull{index}", image.blobs.values())
            assert (await put_manifest(http, gateway.url, f"soak/pull{index}", "v1", image.manifest,
                                       image.media_type)).status == 201  # fmt: skip
        baseline_rss, baseline_fds = rss_bytes(pid), open_fds(pid)

        deadline = time.monotonic() + SOAK_SECONDS
        halfway = time.monotonic() + SOAK_SECONDS / 2
        failures: list[str] = []
        pushes = pulls = 0
        pushes_by_form = dict.fromkeys(PUSH_FORMS, 0)
        samples: list[tuple[float, int, int]] = []

        async def pusher(worker: int) -> None:
            nonlocal pushes
            for round_ in range(SOAK_MAX_ROUNDS):
                if time.monotonic() > deadline:
                    return
                foreign = foreign_images[round_ % len(foreign_images)] if (worker + round_) % 3 == 0 else None
                manifest, blobs = soak_image(worker, round_, foreign)
                repository = f"soak/push{worker}"
                # Every push form in turn, so each one meets known foreign blobs, and bodiless closing PUTs pile up.
                form = list(PUSH_FORMS)[(worker + round_) % len(PUSH_FORMS)]
                for data in blobs.values():
                    answer = await PUSH_FORMS[form](http, gateway.url, repository, data)
                    if answer.status != 201:
                        failures.append(f"{form} blob push to {repository}: {answer.status} {answer.body[:200]!r}")
                answer = await put_manifest(http, gateway.url, repository, f"r{round_}", manifest, DOCKER_MANIFEST)
                if answer.status != 201:
                    failures.append(f"manifest push to {repository}: {answer.status} {answer.body[:200]!r}")
                pushes += 1
                pushes_by_form[form] += 1

        async def puller(worker: int) -> None:
            nonlocal pulls
            for round_ in range(SOAK_MAX_ROUNDS):
                if time.monotonic() > deadline:
                    return
                index = (worker + round_) % len(targets)
                image = targets[index]
                got = await call(http, "GET", f"{gateway.url}/v2/soak/pull{index}/manifests/v1",
                                 headers={"Accept": image.media_type})  # fmt: skip
                if got.status != 200 or digest_of(got.body) != image.manifest_digest:
                    failures.append(f"manifest pull {index}: {got.status} {got.body[:200]!r}")
                    continue
                for digest in image.blobs:
                    blob = await call(http, "GET", f"{gateway.url}/v2/soak/pull{index}/blobs/{digest}")
                    if blob.status != 200 or digest_of(blob.body) != digest:
                        failures.append(f"blob pull {digest}: {blob.status}, {len(blob.body)} bytes")
                pulls += 1

        async def sampler() -> None:
            while time.monotonic() < deadline:
                samples.append((time.monotonic(), rss_bytes(pid), open_fds(pid)))
                await asyncio.sleep(0.5)

        await asyncio.gather(
            *(pusher(worker) for worker in range(SOAK_PUSHERS)),
            *(puller(worker) for worker in range(SOAK_PULLERS)),
            sampler(),
        )
    assert failures == [], f"{len(failures)} failures, e.g. {failures[:5]}"
    assert pushes >= SOAK_PUSHERS and pulls >= SOAK_PULLERS, (pushes, pulls)
    assert all(pushes_by_form.values()), pushes_by_form

    for image in foreign_images:
        assert not registry.blob_data_path(image.foreign_layers[0].digest).exists()
    assert [entry for entry in gateway.events("decision") if entry.get("action") == "leaked"] == []

    half_rss = max(rss for at, rss, _ in samples if at <= halfway)
    end_rss = max(rss for _, rss, _ in samples)
    peak_fds = max(fds for _, _, fds in samples)
    pooled = sockets_to(pid, registry.port)  # idle keep-alive connections to the registry, closed after 15 s
    assert pooled <= UPSTREAM_POOL_LIMIT
    await eventually(lambda: open_fds(pid) - sockets_to(pid, registry.port) <= baseline_fds + FD_SLACK,
                     f"gateway fds (less pooled upstream connections) back to {baseline_fds} after the soak; "
                     f"now {open_fds(pid)}, of which {sockets_to(pid, registry.port)} to the registry")  # fmt: skip
    after_rss = rss_bytes(pid)
    mib = 1024 * 1024
    figures = (
        f"soak {SOAK_PUSHERS} pushers + {SOAK_PULLERS} pullers for {SOAK_SECONDS:g} s: {pushes} pushes "
        f"({', '.join(f'{form} {count}' for form, count in pushes_by_form.items())}), {pulls} pulls; "
        f"gateway VmRSS {baseline_rss / mib:.1f} MiB before, {half_rss / mib:.1f} at half time, "
        f"{end_rss / mib:.1f} peak, {after_rss / mib:.1f} after; fds {baseline_fds} before, {peak_fds} peak, "
        f"{open_fds(pid)} after, of which {pooled} idle pooled connections to the registry"
    )
    print(figures, file=sys.stderr)
    (tmp_path / "soak-figures.txt").write_text(figures + "\n")
    assert end_rss - half_rss < RSS_GROWTH_LIMIT, figures
