"""Known foreign layers are dropped, rejected, allowed or audited on every way a blob can be pushed."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from support.fixtures import GatewayFactory, gateway_knowing
from support.gateway import GatewayProcess
from support.images import Image, build_image, write_dir
from support.protocol import (
    Answer,
    call,
    digest_of,
    mount,
    ordinary_blobs,
    push_chunked,
    push_image_blobs,
    push_monolithic_post,
    push_single_put,
    put_manifest,
    start_upload,
    teach,
    upstream_has,
    with_digest,
)
from support.registry import Registry
from yarl import URL

from proxy.store import open_store

BlobPush = Callable[[aiohttp.ClientSession, str, str, bytes], Awaitable[Answer]]


async def _mount_from_seeded(http: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
    return await mount(http, base, repository, digest_of(data), "seed/repo")


PUSHES: dict[str, BlobPush] = {
    "monolithic-post": push_monolithic_post,
    "single-put": push_single_put,
    "chunked-patch-then-put": push_chunked,
    "cross-repository-mount": _mount_from_seeded,
}


@pytest.fixture
def windows_image() -> Image:
    return build_image(20, foreign=2, os="windows")


@pytest.mark.parametrize("way", PUSHES)
@pytest.mark.parametrize("action", ["drop", "reject", "allow", "audit"])
async def test_every_way_of_pushing_a_known_foreign_blob(
    gateway_factory: GatewayFactory,
    registry: Registry,
    http: aiohttp.ClientSession,
    windows_image: Image,
    action: str,
    way: str,
) -> None:
    gateway = await gateway_knowing(
        gateway_factory, registry, http, windows_image, action, seed_for_mount=way == "cross-repository-mount"
    )
    foreign = windows_image.foreign_layers[0]

    answer = await PUSHES[way](http, gateway.url, "win/app", foreign.data)

    stored = await upstream_has(http, registry, "win/app", foreign.digest)
    if action == "drop":
        assert (answer.status, answer.headers["Docker-Content-Digest"]) == (201, foreign.digest), answer
        assert answer.headers["Location"] == f"{gateway.url}/v2/win/app/blobs/{foreign.digest}"
        assert not stored
        await push_image_blobs(http, gateway.url, "win/app", ordinary_blobs(windows_image))
        manifest = await put_manifest(http, gateway.url, "win/app", "1", windows_image.manifest, windows_image.media_type)
        assert manifest.status == 201, manifest
    elif action == "reject":
        assert answer.status == 403, answer
        assert answer.error_codes == ["DENIED"]
        message = answer.json()["errors"][0]["message"]
        assert foreign.digest in message and "win/app" in message
        assert not stored
    else:
        # Passed to the registry, which answers as it always does (distribution 2.8 opens a session
        # for a monolithic POST instead of storing its body).
        assert answer.status == (202 if way == "monolithic-post" else 201), answer
        assert stored == (way != "monolithic-post")
    decisions = gateway.events("decision")
    assert [(entry["action"], entry["digest"]) for entry in decisions] == [(action, foreign.digest)]
    assert decisions[0]["repository"] == "win/app" and decisions[0]["rule"] == "default"
    if way != "cross-repository-mount" and action in {"drop", "reject"}:
        assert not registry.blob_data_path(foreign.digest).exists()


async def test_a_dropped_upload_session_is_cancelled_upstream(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    await teach(http, gateway.url, "win/base", windows_image)
    foreign = windows_image.foreign_layers[0]
    location = await start_upload(http, gateway.url, "win/app")
    uuid = location.path.rsplit("/", 1)[1]
    upstream_session = URL(registry.url + location.raw_path_qs, encoded=True)
    assert (await call(http, "GET", upstream_session)).status == 204
    dropped = await call(http, "PUT", with_digest(location, foreign.digest), data=foreign.data)
    assert dropped.status == 201
    assert (await call(http, "GET", upstream_session)).status == 404
    assert not (registry.root / f"docker/registry/v2/repositories/win/app/_uploads/{uuid}/data").exists()


async def test_rules_pick_the_action_by_repository(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    gateway = gateway_factory(
        registry,
        config={
            "policy": {
                "default": "drop",
                "rules": [
                    {"repository": "mirror/windows/**", "action": "allow"},
                    {"repository": "ci/**", "action": "reject"},
                ],
            }
        },
    )
    await teach(http, gateway.url, "win/base", windows_image)
    foreign = windows_image.foreign_layers[0].data
    assert (await push_single_put(http, gateway.url, "mirror/windows/servercore", foreign)).status == 201
    assert (await push_single_put(http, gateway.url, "ci/team/build", foreign)).status == 403
    assert (await push_single_put(http, gateway.url, "apps/web", foreign)).status == 201
    assert await upstream_has(http, registry, "mirror/windows/servercore", digest_of(foreign))
    assert not await upstream_has(http, registry, "apps/web", digest_of(foreign))
    assert [(entry["repository"], entry["rule"], entry["action"]) for entry in gateway.events("decision")] == [
        ("mirror/windows/servercore", "mirror/windows/**", "allow"),
        ("ci/team/build", "ci/**", "reject"),
        ("apps/web", "default", "drop"),
    ]


async def test_pulls_teach_the_gateway_too(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    await teach(http, registry.url, "win/base", windows_image)  # straight to the registry: the gateway saw nothing
    foreign = windows_image.foreign_layers[0].data
    pulled = await call(
        http, "GET", f"{gateway.url}/v2/win/base/manifests/taught", headers={"Accept": windows_image.media_type}
    )
    assert pulled.body == windows_image.manifest
    assert (await push_single_put(http, gateway.url, "win/app", foreign)).status == 201
    assert not await upstream_has(http, registry, "win/app", digest_of(foreign))
    assert [entry["source"] for entry in gateway.events("learned")] == ["manifest-get", "manifest-get"]


async def test_what_was_learned_is_enforced_after_a_restart(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    first = gateway_factory(registry)
    await teach(http, first.url, "win/base", windows_image)
    await asyncio.to_thread(first.stop)
    second = gateway_factory(registry, store=first.store)
    foreign = windows_image.foreign_layers[1].data
    assert (await push_single_put(http, second.url, "win/app", foreign)).status == 201
    assert not await upstream_has(http, registry, "win/app", digest_of(foreign))


async def test_pretend_present_lets_clients_skip_the_upload(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    gateway = gateway_factory(registry, config={"policy": {"pretend_present": True}})
    await teach(http, gateway.url, "win/base", windows_image)
    foreign = windows_image.foreign_layers[0]
    head = await call(http, "HEAD", f"{gateway.url}/v2/win/app/blobs/{foreign.digest}")
    assert head.status == 200
    assert (head.headers["Content-Length"], head.headers["Docker-Content-Digest"]) == (str(foreign.size), foreign.digest)
    plain = windows_image.layers[2]
    assert (await call(http, "HEAD", f"{gateway.url}/v2/win/app/blobs/{plain.digest}")).status == 404
    for _ in range(4):
        await call(http, "HEAD", f"{gateway.url}/v2/win/app/blobs/{foreign.digest}")
    # Answers, not pushes: no drop, no bytes kept out, in the metrics and the store.
    scraped = (await call(http, "GET", f"{gateway.admin_url}/metrics")).body.decode()
    assert 'foreign_layer_proxy_decisions_total{action="presented",rule="default"} 5.0' in scraped
    assert 'action="dropped"' not in scraped and "foreign_layer_proxy_kept_out_bytes_total 0.0" in scraped
    await asyncio.to_thread(gateway.stop)
    store = open_store(gateway.store)
    try:
        [record] = [record for record in await store.records() if record.layer.digest == foreign.digest]
        assert not record.outcomes and record.bytes_kept_out == 0 and await store.repository_stats() == []
    finally:
        await store.close()


def exchange_with_expect_continue(host_port: str, path: str, body: bytes) -> bytes:
    """Send headers with `Expect: 100-continue`, send the body only if told to continue; the whole answer."""
    host, port = host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/octet-stream\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        first = sock.recv(65536)
        if first.startswith(b"HTTP/1.1 100"):
            sock.sendall(body)
            rest = b""
            while chunk := sock.recv(65536):
                rest += chunk
            return first + rest
        return first


@pytest.mark.parametrize("action", ["drop", "allow"])
async def test_expect_continue_is_answered_before_the_body_only_when_it_is_dropped(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image, action: str
) -> None:
    gateway = gateway_factory(registry, args=["--action", action])
    await teach(http, gateway.url, "win/base", windows_image)
    foreign = windows_image.foreign_layers[0]
    started = await call(http, "POST", f"{gateway.url}/v2/win/app/blobs/uploads/")
    location = started.headers["Location"].removeprefix(gateway.url) + f"&digest={foreign.digest}"
    answer = await asyncio.to_thread(exchange_with_expect_continue, gateway.host_port, location, foreign.data)
    if action == "drop":
        assert answer.startswith(b"HTTP/1.1 201"), answer
    else:
        assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201"), answer
    assert await upstream_has(http, registry, "win/app", foreign.digest) == (action == "allow")


async def test_learn_command_is_enforced_by_a_running_gateway_within_a_second(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession, windows_image: Image, tmp_path: Path
) -> None:
    source = write_dir(windows_image, tmp_path / "image")
    learned = await asyncio.create_subprocess_exec(
        *gateway.process.args[:3], "learn", "--store", gateway.store, f"dir:{source}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await learned.communicate()
    assert learned.returncode == 0, stderr
    assert all(layer.digest in stdout.decode() for layer in windows_image.foreign_layers)
    learned_at = time.monotonic()
    foreign = windows_image.foreign_layers[0].data
    while True:
        answer = await push_single_put(http, gateway.url, f"win/try{int(time.monotonic() * 1000)}", foreign)
        if gateway.events("decision"):
            break
        assert time.monotonic() - learned_at < 5, "the running gateway never enforced the learned digest"
        await asyncio.sleep(0.1)
    assert answer.status == 201
    assert gateway.events("decision")[0]["action"] == "drop"
