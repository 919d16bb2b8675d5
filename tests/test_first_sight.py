"""A foreign blob pushed before anything marked it, and clear answers at manifest time."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from support.clients import Podman
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import Image, Layer, build_image, descriptor, write_dir
from support.processes import describe
from support.protocol import (
    call,
    digest_of,
    push_chunked,
    push_image_blobs,
    push_single_put,
    push_streamed,
    put_manifest,
    start_upload,
    teach,
    upstream_has,
)
from support.registry import (
    Registry,
    RegistryConfig,
    RegistryFactory,
    TokenAuth,
    make_htpasswd,
)
from support.token_server import TokenServer, challenged_token

ORDINARY_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


async def push_everything(http: aiohttp.ClientSession, base: str, repository: str, image: Image) -> int:
    """A client that uploads foreign blobs too (Docker 28+, folder uploaders); returns the manifest status."""
    await push_image_blobs(http, base, repository, image.blobs.values())
    answer = await put_manifest(http, base, repository, "1", image.manifest, image.media_type)
    return answer.status


async def wait_until_absent(http: aiohttp.ClientSession, registry: Registry, repository: str, digest: str) -> bool:
    for _ in range(100):
        if not await upstream_has(http, registry, repository, digest):
            return True
        await asyncio.sleep(0.05)
    return False


def disguised(image: Image) -> Image:
    """The image as a client that recompresses foreign layers and lists them as ordinary ones pushes it."""
    layers = tuple(
        replace(layer, data=gzip.compress(gzip.decompress(layer.data), compresslevel=1, mtime=0),
                media_type=ORDINARY_LAYER, urls=())
        if layer.foreign else layer
        for layer in image.layers
    )  # fmt: skip
    document = json.loads(image.manifest)
    document["layers"] = [layer.descriptor() for layer in layers]
    return replace(image, layers=layers, manifest=json.dumps(document).encode())


async def test_first_sight_push_is_detected_learned_and_cleaned_up(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(50, foreign=2, os="windows")
    gateway = gateway_factory(registry, config={"cleanup": {"delete_leaked": True}})
    assert await push_everything(http, gateway.url, "win/first", image) == 201

    leaked = {entry["digest"] for entry in gateway.events("decision") if entry["action"] == "leaked"}
    assert leaked == {layer.digest for layer in image.foreign_layers}
    for layer in image.foreign_layers:
        assert await wait_until_absent(http, registry, "win/first", layer.digest), "leaked blob not cleaned up"
    assert {entry["digest"] for entry in gateway.events("decision") if entry["action"] == "cleaned"} == leaked
    pulled = await call(http, "GET", f"{gateway.url}/v2/win/first/manifests/1", headers={"Accept": image.media_type})
    assert pulled.status == 200 and pulled.body == image.manifest

    assert await push_everything(http, gateway.url, "win/second", image) == 201
    for layer in image.foreign_layers:
        assert not await upstream_has(http, registry, "win/second", layer.digest)
    dropped = [entry["digest"] for entry in gateway.events("decision") if entry["action"] == "drop"]
    assert sorted(dropped) == sorted(leaked)


async def test_without_delete_leaked_the_leak_is_only_reported(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(51, foreign=1, os="windows")
    assert await push_everything(http, gateway.url, "win/first", image) == 201
    assert [entry["action"] for entry in gateway.events("decision")] == ["leaked"]
    assert await upstream_has(http, registry, "win/first", image.foreign_layers[0].digest)


async def test_cleanup_uses_its_own_credentials_on_a_protected_registry(
    registry_factory: RegistryFactory, gateway_factory: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    htpasswd = make_htpasswd(tmp_path / "htpasswd", "pusher", "push-secret")
    registry = registry_factory(RegistryConfig(htpasswd=htpasswd))
    htpasswd.write_text(htpasswd.read_text() + make_htpasswd(tmp_path / "cleaner", "cleaner", "clean-secret").read_text())
    gateway = gateway_factory(
        registry, config={"cleanup": {"delete_leaked": True, "username": "cleaner", "password": "clean-secret"}}
    )
    image = build_image(52, foreign=1, os="windows")
    async with aiohttp.ClientSession(
        headers={"Authorization": aiohttp.encode_basic_auth("pusher", "push-secret")}
    ) as pusher:
        assert await push_everything(pusher, gateway.url, "win/auth", image) == 201
        digest = image.foreign_layers[0].digest
        for _ in range(100):
            if (await call(pusher, "HEAD", f"{registry.url}/v2/win/auth/blobs/{digest}")).status == 404:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"leaked blob still there:\n{gateway.process.log_text()}")
    assert "clean-secret" not in gateway.process.log_text()


async def test_cleanup_gets_its_own_delete_token_from_the_registrys_token_server(
    registry_factory: RegistryFactory, gateway_factory: GatewayFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    users = {"pusher": "push-secret", "cleaner": "clean-secret"}
    with TokenServer(tmp_path_factory.mktemp("token-server"), users) as tokens:
        registry = registry_factory(RegistryConfig(token_auth=TokenAuth(tokens.realm, tokens.cert_path)))
        gateway = gateway_factory(
            registry, config={"cleanup": {"delete_leaked": True, "username": "cleaner", "password": "clean-secret"}}
        )
        image = build_image(53, foreign=1, os="windows")
        digest = image.foreign_layers[0].digest
        async with aiohttp.ClientSession() as anonymous:
            push_token = await challenged_token(
                anonymous, "POST", f"{gateway.url}/v2/win/token/blobs/uploads/", "pusher", "push-secret"
            )
            pull_token = await challenged_token(
                anonymous, "HEAD", f"{registry.url}/v2/win/token/blobs/{digest}", "pusher", "push-secret"
            )
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {push_token}"}) as pusher:
            assert await push_everything(pusher, gateway.url, "win/token", image) == 201
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {pull_token}"}) as puller:
            for _ in range(100):
                if (await call(puller, "HEAD", f"{registry.url}/v2/win/token/blobs/{digest}")).status == 404:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(
                    f"leaked blob still there:\n{gateway.process.log_text()}\n{registry.log_text()}\n{tokens.requests()}"
                )
            manifest = await call(
                puller, "GET", f"{registry.url}/v2/win/token/manifests/1", headers={"Accept": image.media_type}
            )
            assert manifest.status == 200 and manifest.body == image.manifest
        assert {"user": "cleaner", "authenticated": True, "service": "test-registry",
                "scopes": ["repository:win/token:delete"]} in tokens.requests()  # fmt: skip
        assert [entry["action"] for entry in gateway.events("decision")] == ["leaked", "cleaned"]
    assert "clean-secret" not in gateway.process.log_text()


async def test_a_known_foreign_layer_listed_as_ordinary_gets_a_clear_error(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(53, foreign=1, os="windows")
    await teach(http, gateway.url, "win/base", image)
    foreign = image.foreign_layers[0]
    document = json.loads(image.manifest)
    document["layers"][0] = descriptor(ORDINARY_LAYER, foreign.data)
    await push_single_put(http, registry.url, "win/app", foreign.data)  # the registry has it: only the gateway objects
    await push_image_blobs(http, gateway.url, "win/app", [image.config, *(layer.data for layer in image.layers[1:])])
    answer = await put_manifest(http, gateway.url, "win/app", "1", json.dumps(document).encode(), image.media_type)
    assert answer.status == 400
    assert answer.error_codes == ["MANIFEST_INVALID"]
    message = answer.json()["errors"][0]["message"]
    assert foreign.digest in message and "foreign" in message and "urls" in message
    assert (await call(http, "GET", f"{registry.url}/v2/win/app/manifests/1")).status == 404


async def test_a_foreign_layer_without_urls_gets_a_clear_error(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(54, foreign=1, os="windows", foreign_urls=False)
    assert await push_everything(http, gateway.url, "win/nourls", image) == 400
    refused = gateway.events("decision")
    assert [(entry["action"], entry.get("reason")) for entry in refused if entry["action"] == "refused"] == [
        ("refused", "foreign-without-urls")
    ]
    assert image.foreign_layers[0].digest in {entry["digest"] for entry in gateway.events("learned")}


async def test_the_registrys_url_refusal_comes_with_the_fix(
    registry_factory: RegistryFactory, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    registry = registry_factory(RegistryConfig(allow_foreign_urls=False))
    gateway = gateway_factory(registry)
    image = build_image(55, foreign=1, os="windows")
    await push_image_blobs(http, gateway.url, "win/strict", [image.config, *(layer.data for layer in image.layers[1:])])
    answer = await put_manifest(http, gateway.url, "win/strict", "1", image.manifest, image.media_type)
    direct = await put_manifest(http, registry.url, "win/strict", "2", image.manifest, image.media_type)
    assert answer.status == direct.status == 500
    assert "validation" in answer.json()["errors"][0]["message"]
    assert [error["code"] for error in answer.json()["errors"]] == direct.error_codes


async def test_recompressed_foreign_layers_are_recognised_by_diff_id(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(56, foreign=1, os="windows")
    gateway = gateway_factory(registry, config={"policy": {"manifest_check": False}, "cleanup": {"delete_leaked": True}})
    await teach(http, gateway.url, "win/base", image)
    rewritten = disguised(image)
    recompressed: Layer = rewritten.layers[0]
    assert recompressed.digest != image.layers[0].digest

    assert await push_everything(http, gateway.url, "win/podman", rewritten) == 201
    learned = {entry["digest"]: entry for entry in gateway.events("learned")}
    assert learned[recompressed.digest]["diff_id"] == image.layers[0].diff_id
    assert [entry["digest"] for entry in gateway.events("decision") if entry["action"] == "leaked"] == [
        recompressed.digest
    ]
    assert await wait_until_absent(http, registry, "win/podman", recompressed.digest)
    assert (await push_single_put(http, gateway.url, "win/again", recompressed.data)).status == 201
    assert not await upstream_has(http, registry, "win/again", recompressed.digest)


async def test_podman_push_of_a_windows_image_is_caught(
    gateway: GatewayProcess, registry: Registry, podman: Podman, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = build_image(57, foreign=1, os="windows")
    await teach(http, gateway.url, "win/base", image)
    local = await asyncio.to_thread(podman.pull, f"dir:{write_dir(image, tmp_path / 'image')}")
    pushed = await asyncio.to_thread(podman.push, local, f"docker://{gateway.host_port}/win/podman:1")
    assert pushed.returncode != 0, describe(pushed)
    assert "foreign" in pushed.stderr and "urls" in pushed.stderr, describe(pushed)
    original = image.foreign_layers[0]
    recompressed = [
        entry for entry in gateway.events("learned")
        if entry["diff_id"] == original.diff_id and entry["digest"] != original.digest
    ]  # fmt: skip
    leaked = {entry["digest"] for entry in gateway.events("decision") if entry["action"] == "leaked"}
    assert recompressed and {entry["digest"] for entry in recompressed} <= leaked


@pytest.mark.parametrize("way", ["chunked", "single-put", "streamed-patch"])
async def test_inspect_content_stops_a_recompressed_foreign_layer_at_its_closing_put(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, way: str
) -> None:
    image = build_image(58, layer_sizes=(300_000, 8_000), foreign=1, os="windows")
    gateway = gateway_factory(registry, config={"policy": {"inspect_content": True}})
    await teach(http, gateway.url, "win/base", image)
    recompressed = disguised(image).layers[0].data
    ordinary = image.layers[1].data
    pushes = {
        "chunked": lambda data: push_chunked(http, gateway.url, "win/inspected", data, chunk_size=65_536),
        "single-put": lambda data: push_single_put(http, gateway.url, "win/inspected", data),
        "streamed-patch": lambda data: push_streamed(
            http, gateway.url, "win/inspected", [data[i : i + 50_000] for i in range(0, len(data), 50_000)]
        ),
    }
    dropped = await pushes[way](recompressed)
    assert (dropped.status, dropped.headers["Docker-Content-Digest"]) == (201, digest_of(recompressed))
    assert not await upstream_has(http, registry, "win/inspected", digest_of(recompressed))
    assert not registry.blob_data_path(digest_of(recompressed)).exists()
    assert [(entry["action"], entry["digest"]) for entry in gateway.events("decision")] == [
        ("drop", digest_of(recompressed))
    ]
    passed = await pushes[way](ordinary)
    assert passed.status == 201
    assert registry.blob_data_path(digest_of(ordinary)).read_bytes() == ordinary


async def test_inspect_content_recognises_a_foreign_layer_named_by_another_digest_algorithm(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(59, foreign=1, os="windows")
    gateway = gateway_factory(registry, config={"policy": {"inspect_content": True}})
    await teach(http, gateway.url, "win/base", image)
    foreign = image.foreign_layers[0]
    sha512 = "sha512:" + hashlib.sha512(foreign.data).hexdigest()
    location = await start_upload(http, gateway.url, "win/sha512")
    answer = await call(http, "PUT", location.update_query(digest=sha512), data=foreign.data)
    assert (answer.status, answer.headers["Docker-Content-Digest"]) == (201, sha512)
    assert not await upstream_has(http, registry, "win/sha512", foreign.digest)
    assert not registry.blob_data_path(foreign.digest).exists()
