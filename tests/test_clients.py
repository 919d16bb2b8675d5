"""Real registry clients through the gateway, against the real registry.

skopeo and ctr run as subprocesses; the oras and python-dxf SDKs are synchronous and run in a thread
while the test's own aiohttp session teaches the gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import dxf
import oras.provider
import pytest
import requests
from support.clients import (
    Containerd,
    blob_status,
    oras_retry_pauses_skipped,
    skopeo_copy,
    skopeo_inspect_raw,
)
from support.fixtures import GatewayFactory, gateway_knowing
from support.gateway import GatewayProcess
from support.images import (
    Image,
    Layer,
    build_image,
    write_dir,
    write_oci_archive,
    write_oci_layout,
)
from support.processes import describe
from support.protocol import teach
from support.registry import Registry

# A 4xx stops these clients at once, a 5xx makes them retry for a minute or more: a refused push that takes
# longer than this was retried or hung. The bound is generous so that a loaded machine does not fail it.
PROMPT_FAILURE_SECONDS = 10.0


def requests_logged(gateway: GatewayProcess, method: str, path_part: str = "") -> list[dict[str, Any]]:
    """The gateway's access log lines for `method` requests whose path contains `path_part`."""
    return [
        entry for entry in gateway.events("request") if entry["method"] == method and path_part in entry["path"]
    ]


BLOB_ACTIONS = frozenset({"drop", "reject", "allow", "audit"})


def blob_decisions(gateway: GatewayProcess) -> list[tuple[str, str, str, str]]:
    """(action, method, repository, digest) of each decision on a blob push (not those at manifest time)."""
    return sorted(
        (entry["action"], entry["method"], entry["repository"], entry["digest"])
        for entry in gateway.events("decision")
        if entry["action"] in BLOB_ACTIONS
    )


# ctr: learned from a skopeo push, enforced on ctr's push of the same image


@pytest.mark.parametrize("action", ["drop", "reject"])
def test_ctr_push_of_an_image_whose_foreign_layers_the_gateway_learned_from_skopeo(
    gateway_factory: GatewayFactory,
    registry: Registry,
    containerd: Containerd,
    skopeo_cache: Path,
    foreign_image: Image,
    tmp_path: Path,
    action: str,
) -> None:
    gateway = gateway_factory(registry, args=["--action", action])
    source = write_dir(foreign_image, tmp_path / "image")
    taught = skopeo_copy(f"dir:{source}", f"docker://{gateway.host_port}/win/base:1", cache_dir=skopeo_cache)
    assert taught.returncode == 0, describe(taught)
    foreign = {layer.digest for layer in foreign_image.foreign_layers}
    assert {entry["digest"] for entry in gateway.events("learned")} == foreign
    assert not any(registry.blob_data_path(digest).exists() for digest in foreign)  # skopeo skipped them

    containerd.import_archive(write_oci_archive(foreign_image, tmp_path / "image.oci.tar"), "local/win")
    started = time.monotonic()
    pushed = containerd.push("local/win:latest", f"{gateway.host_port}/win/app:1", allow_non_distributable=True)
    if containerd.push_panicked(pushed):  # once more: ctr's own race, not an answer of the gateway's
        started = time.monotonic()
        pushed = containerd.push("local/win:latest", f"{gateway.host_port}/win/app:1", allow_non_distributable=True)
    elapsed = time.monotonic() - started

    output = pushed.stdout + pushed.stderr
    for digest in foreign:
        assert not registry.blob_data_path(digest).exists()
        assert blob_status(registry.url, "win/app", digest) == 404
    if action == "drop":
        assert pushed.returncode == 0, describe(pushed)
        assert blob_decisions(gateway) == sorted(("drop", "PUT", "win/app", digest) for digest in foreign)
        assert skopeo_inspect_raw(f"docker://{gateway.host_port}/win/app:1") == foreign_image.manifest
        plain = foreign_image.layers[2]
        assert blob_status(gateway.url, "win/app", plain.digest) == 200
    else:
        assert pushed.returncode != 0, describe(pushed)
        assert elapsed < PROMPT_FAILURE_SECONDS, f"ctr took {elapsed:.1f} s to give up"
        rejected = [digest for decided, _, _, digest in blob_decisions(gateway) if decided == "reject"]
        assert rejected and {decided for decided, _, _, _ in blob_decisions(gateway)} == {"reject"}
        # What the user reads: the gateway's reason, not just a status code.
        assert "foreign layer" in output, output
        assert any(digest in output for digest in rejected), output
        assert requests_logged(gateway, "PUT", "/v2/win/app/manifests/") == []


# skopeo: an OCI nondistributable layer without urls, whose blob the registry needs


@pytest.mark.parametrize("manifest_check", [False, True], ids=["registry-refuses", "gateway-refuses"])
def test_skopeo_push_of_a_dropped_layer_without_urls_fails_promptly_at_the_manifest(
    gateway_factory: GatewayFactory,
    registry: Registry,
    skopeo_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    manifest_check: bool,
) -> None:
    image = build_image(40, flavour="oci", foreign=1, foreign_urls=False, os="windows")
    foreign = image.foreign_layers[0]
    layout = write_oci_layout(image, tmp_path / "layout")
    gateway = gateway_factory(
        registry, args=["--action", "drop"], config={"policy": {"manifest_check": manifest_check}}
    )

    first = skopeo_copy(f"oci:{layout}:latest", f"docker://{gateway.host_port}/win/first:1", cache_dir=skopeo_cache)

    # Nothing was known: the blob went through, and the manifest taught the gateway.
    assert blob_status(registry.url, "win/first", foreign.digest) == 200
    assert {(entry["digest"], entry["repository"], entry["source"]) for entry in gateway.events("learned")} == {
        (foreign.digest, "win/first", "manifest-put")
    }
    assert blob_decisions(gateway) == []
    leaks = {
        (entry["repository"], entry["digest"]) for entry in gateway.events("decision") if entry["action"] == "leaked"
    }
    assert leaks == {("win/first", foreign.digest)}
    if manifest_check:
        # The drop rule keeps foreign layers out of win/first, and without urls nobody could fetch this one
        # elsewhere: the gateway refuses the manifest already on first sight, saying why.
        assert first.returncode != 0, describe(first)
        assert foreign.digest in first.stderr and "no urls" in first.stderr, describe(first)
    else:
        assert first.returncode == 0, describe(first)  # the registry has the blob, so it takes the manifest

    # A fresh blob-info cache, so that skopeo uploads the layer again instead of mounting it from win/first.
    fresh_cache = tmp_path_factory.mktemp("skopeo-cache")
    started = time.monotonic()
    second = skopeo_copy(
        f"oci:{layout}:latest", f"docker://{gateway.host_port}/win/second:1", cache_dir=fresh_cache, timeout=60
    )
    elapsed = time.monotonic() - started

    assert second.returncode != 0, describe(second)
    assert elapsed < PROMPT_FAILURE_SECONDS, f"skopeo took {elapsed:.1f} s to give up"
    assert blob_decisions(gateway) == [("drop", "PUT", "win/second", foreign.digest)]
    assert blob_status(registry.url, "win/second", foreign.digest) == 404
    error_lines = [line for line in second.stderr.splitlines() if "level=fatal" in line]
    assert len(error_lines) == 1, describe(second)
    assert "writing manifest" in error_lines[0], describe(second)
    if manifest_check:
        assert foreign.digest in error_lines[0] and "no urls" in error_lines[0], describe(second)
    else:
        assert "manifest blob unknown" in error_lines[0], describe(second)
    # Refused with a 4xx, and not retried: skopeo tries the OCI form, and at most once more converted to
    # the docker form when told the manifest is invalid.
    manifest_puts = requests_logged(gateway, "PUT", "/v2/win/second/manifests/")
    assert 1 <= len(manifest_puts) <= 2 and all(entry["status"] // 100 == 4 for entry in manifest_puts), manifest_puts


# skopeo: cross-repository mounts


def test_skopeo_mounts_blobs_it_has_seen_through_the_gateway(
    gateway: GatewayProcess, registry: Registry, skopeo_cache: Path, plain_image: Image, tmp_path: Path
) -> None:
    source = write_dir(plain_image, tmp_path / "image")
    for repository in ("apps/a", "apps/b"):
        result = skopeo_copy(f"dir:{source}", f"docker://{gateway.host_port}/{repository}:1", cache_dir=skopeo_cache)
        assert result.returncode == 0, describe(result)

    mounts = [entry for entry in requests_logged(gateway, "POST") if "mount=" in (entry.get("query") or "")]
    assert mounts, "skopeo never mounted: the test does not show what it claims to"
    assert all((entry["repository"], entry["status"]) == ("apps/b", 201) for entry in mounts), mounts
    assert all("from=apps/a" in entry["query"] for entry in mounts), mounts
    assert gateway.events("decision") == []
    assert skopeo_inspect_raw(f"docker://{registry.host_port}/apps/b:1") == plain_image.manifest
    for digest in plain_image.blobs:
        assert blob_status(registry.url, "apps/b", digest) == 200


def test_skopeo_mount_of_a_known_foreign_blob_is_answered_by_the_gateway(
    gateway: GatewayProcess, registry: Registry, skopeo_cache: Path, tmp_path: Path
) -> None:
    image = build_image(41, flavour="oci", foreign=1, foreign_urls=False, os="windows")
    foreign = image.foreign_layers[0]
    layout = write_oci_layout(image, tmp_path / "layout")
    seeded = skopeo_copy(f"oci:{layout}:latest", f"docker://{registry.host_port}/win/seed:1", cache_dir=skopeo_cache)
    assert seeded.returncode == 0, describe(seeded)  # straight to the registry: the gateway saw nothing
    assert gateway.events("learned") == []
    # skopeo's blob-info cache is keyed by registry host: the blobs it pushed to the registry's port are not
    # candidates for a mount through the gateway's. Pulling through the gateway records them there, and the
    # gateway learns the foreign layer from the manifest it passes on.
    pulled = skopeo_copy(
        f"docker://{gateway.host_port}/win/seed:1", f"oci:{tmp_path / 'pulled'}:latest", cache_dir=skopeo_cache
    )
    assert pulled.returncode == 0, describe(pulled)
    assert [(entry["digest"], entry["source"]) for entry in gateway.events("learned")] == [
        (foreign.digest, "manifest-get")
    ]

    pushed = skopeo_copy(f"oci:{layout}:latest", f"docker://{gateway.host_port}/win/c:1", cache_dir=skopeo_cache)

    assert blob_decisions(gateway) == [("drop", "POST", "win/c", foreign.digest)]
    [mount] = [
        entry for entry in requests_logged(gateway, "POST") if f"mount={foreign.digest}" in (entry.get("query") or "")
    ]
    assert (mount["repository"], mount["status"], mount["decision"]) == ("win/c", 201, "drop")
    assert "from=win/seed" in mount["query"]
    assert blob_status(registry.url, "win/c", foreign.digest) == 404
    for layer in image.layers[1:]:
        assert blob_status(registry.url, "win/c", layer.digest) == 200  # mounted for real
    # Without its blob and without urls nobody could pull that layer, so the manifest is refused (by the gateway's
    # manifest check, or else by the registry): the push ends there.
    assert pushed.returncode != 0, describe(pushed)
    assert "writing manifest" in pushed.stderr, describe(pushed)


# SDKs: oras and python-dxf


@pytest.fixture
def windows_image() -> Image:
    return build_image(42, foreign=2, os="windows")


@pytest.fixture
def layer_file(windows_image: Image, tmp_path: Path) -> Path:
    path = tmp_path / "foreign-layer.tar.gz"
    path.write_bytes(windows_image.foreign_layers[0].data)
    return path


def oras_layer(layer: Layer) -> dict[str, Any]:
    return {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}


@pytest.mark.parametrize("chunked", [False, True], ids=["post-then-put", "patch-chunks-then-put"])
@pytest.mark.parametrize("action", ["drop", "reject"])
async def test_oras_sdk_upload_of_a_known_foreign_blob(
    gateway_factory: GatewayFactory,
    registry: Registry,
    http: aiohttp.ClientSession,
    windows_image: Image,
    layer_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    action: str,
    chunked: bool,
) -> None:
    retry_pauses = oras_retry_pauses_skipped(monkeypatch)
    gateway = gateway_factory(registry, args=["--action", action])
    await teach(http, gateway.url, "win/base", windows_image)
    foreign = windows_image.foreign_layers[0]
    client = oras.provider.Registry(gateway.host_port, insecure=True)

    def upload() -> Any:
        return client.upload_blob(
            str(layer_file), f"{gateway.host_port}/win/app:1", oras_layer(foreign), do_chunked=chunked, chunk_size=4096
        )

    if action == "drop":
        response = await asyncio.to_thread(upload)
        assert response.status_code == 201, response.text
        assert retry_pauses == []
    else:
        # oras takes every 403 for an authentication challenge: with no Www-Authenticate to answer, it retries
        # the PUT five times (pausing 3+5+11+29+83 s when not skipped) and then raises this, never showing the
        # gateway's message, which the gateway's log has.
        with pytest.raises(ValueError, match="Cannot respond to request for authentication"):
            await asyncio.to_thread(upload)
        errors = gateway.events("gateway_error")
        assert errors and {entry["code"] for entry in errors} == {"DENIED"}
        assert all(f"foreign layer {foreign.digest}" in entry["message"] for entry in errors)
    assert {(decided, digest) for decided, _, _, digest in blob_decisions(gateway)} == {(action, foreign.digest)}
    if chunked:
        patches = requests_logged(gateway, "PATCH", "/v2/win/app/")
        assert len(patches) == -(-foreign.size // 4096), patches  # really sent in chunks
    assert blob_status(registry.url, "win/app", foreign.digest) == 404
    assert not registry.blob_data_path(foreign.digest).exists()


def chunks_of(data: bytes, size: int = 4096) -> Iterator[bytes]:
    """A generator, so that requests sends it with chunked transfer encoding."""
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


DxfPush = Callable[[dxf.DXF, Layer, Path], str]

DXF_PUSHES: dict[str, DxfPush] = {
    "file-put": lambda client, layer, path: client.push_blob(str(path)),
    "streamed-put": lambda client, layer, path: client.push_blob(data=chunks_of(layer.data), digest=layer.digest),
    "mount": lambda client, layer, path: client.mount_blob("seed/repo", layer.digest),
}


@pytest.mark.parametrize("way", DXF_PUSHES)
@pytest.mark.parametrize("action", ["drop", "reject"])
async def test_python_dxf_push_of_a_known_foreign_blob(
    gateway_factory: GatewayFactory,
    registry: Registry,
    http: aiohttp.ClientSession,
    windows_image: Image,
    layer_file: Path,
    action: str,
    way: str,
) -> None:
    gateway = await gateway_knowing(gateway_factory, registry, http, windows_image, action, seed_for_mount=way == "mount")
    foreign = windows_image.foreign_layers[0]
    client = dxf.DXF(gateway.host_port, "win/app", insecure=True)

    def push() -> str:
        return DXF_PUSHES[way](client, foreign, layer_file)

    if action == "drop":
        assert await asyncio.to_thread(push) == foreign.digest
    else:
        with pytest.raises(requests.HTTPError) as raised:
            await asyncio.to_thread(push)
        answer = raised.value.response
        assert answer is not None and answer.status_code == 403, raised.value
        [error] = answer.json()["errors"]
        assert error["code"] == "DENIED"
        assert f"foreign layer {foreign.digest}" in error["message"] and "win/app" in error["message"]
    assert blob_decisions(gateway) == [(action, "POST" if way == "mount" else "PUT", "win/app", foreign.digest)]
    assert blob_status(registry.url, "win/app", foreign.digest) == 404
    if way != "mount":
        assert not registry.blob_data_path(foreign.digest).exists()


def test_skopeo_stops_at_once_on_a_reject_and_prints_why(
    gateway_factory: GatewayFactory, registry: Registry, skopeo_cache: Path, tmp_path: Path
) -> None:
    """skopeo uploads an OCI foreign layer that has no urls; a known one in a reject repository stops it."""
    image = build_image(41, flavour="oci", foreign=1, foreign_urls=False, os="windows")
    foreign = image.foreign_layers[0]
    digest_file = tmp_path / "foreign.txt"
    digest_file.write_text(f"# Windows base layer\n{foreign.digest}\n")
    gateway = gateway_factory(registry, args=["--action", "reject"], config={"foreign": {"digest_files": [str(digest_file)]}})
    layout = write_oci_layout(image, tmp_path / "layout")

    started = time.monotonic()
    pushed = skopeo_copy(f"oci:{layout}:latest", f"docker://{gateway.host_port}/win/app:1", cache_dir=skopeo_cache)
    elapsed = time.monotonic() - started

    assert pushed.returncode != 0, describe(pushed)
    assert elapsed < PROMPT_FAILURE_SECONDS, f"skopeo took {elapsed:.1f} s to give up"
    assert f"foreign layer {foreign.digest} may not be pushed to win/app" in pushed.stderr, describe(pushed)
    assert blob_status(registry.url, "win/app", foreign.digest) == 404
