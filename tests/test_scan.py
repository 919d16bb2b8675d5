"""`learn --scan`: learning every foreign digest a registry already holds."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
from support.images import Image, build_image, build_index
from support.protocol import push_image_blobs, put_manifest
from support.registry import Registry

FOREIGN_EVERY = 3  # one repository in three holds a Windows-like image


async def fill(http: aiohttp.ClientSession, registry: Registry, repositories: int) -> set[str]:
    """Repositories of mixed images, some foreign, one as a manifest list; returns the foreign digests."""
    foreign: set[str] = set()
    for number in range(repositories):
        repository = f"team{number % 5}/app{number}"
        image = build_image(1000 + number, foreign=2 if number % FOREIGN_EVERY == 0 else 0, os="windows")
        await push_image(http, registry, repository, image, "v1")
        foreign |= {layer.digest for layer in image.foreign_layers}
    windows, linux = build_image(2000, foreign=1, os="windows"), build_image(2001)
    index = build_index([windows, linux])
    for image in index.images:
        await push_image(http, registry, "multi/platform", image, None)
    answer = await put_manifest(http, registry.url, "multi/platform", "v1", index.manifest, index.media_type)
    assert answer.status == 201, answer
    return foreign | {layer.digest for layer in windows.foreign_layers}


async def push_image(
    http: aiohttp.ClientSession, registry: Registry, repository: str, image: Image, tag: str | None
) -> None:
    foreign = {layer.digest for layer in image.foreign_layers}
    await push_image_blobs(http, registry.url, repository, [d for k, d in image.blobs.items() if k not in foreign])
    answer = await put_manifest(http, registry.url, repository, tag or image.manifest_digest, image.manifest, image.media_type)
    assert answer.status == 201, answer


async def learn(store: str, state: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "learn", "--store", store, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"XDG_STATE_HOME": str(state), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def learned(stdout: str, status: str) -> set[str]:
    return {line.split()[1] for line in stdout.splitlines() if line.startswith(status)}


async def test_scan_learns_exactly_the_foreign_digests_and_a_rerun_nothing_new(
    registry: Registry, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    expected = await fill(http, registry, 50)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    status, stdout, stderr = await learn(store, tmp_path, "--scan", f"docker://{registry.host_port}/", "--concurrency", "8")
    assert status == 0, stderr
    assert learned(stdout, "new") == expected
    assert "scan done: 51 repositories" in stderr

    status, stdout, stderr = await learn(store, tmp_path, "--scan", f"docker://{registry.host_port}/")
    assert status == 0, stderr
    assert learned(stdout, "new") == set()
    assert learned(stdout, "known") == expected


async def test_scan_filters_repositories_and_resumes(
    registry: Registry, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    await fill(http, registry, 6)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    progress = tmp_path / "foreign-layer-proxy" / f"scan-{registry.host_port.replace(':', '_')}.json"
    progress.parent.mkdir(parents=True)
    progress.write_text(json.dumps({"done": ["team0/app0"]}))
    status, _, stderr = await learn(
        store, tmp_path, "--scan", f"docker://{registry.host_port}/", "--repository", "team0/**", "--repository", "team1/*"
    )
    assert status == 0, stderr
    scanned = {line.split()[1].rstrip(":") for line in stderr.splitlines() if line.startswith("scanned ")}
    assert scanned == {"team1/app1", "team0/app5"}, stderr
    assert "resuming: 1 repositories already scanned" in stderr
    assert not progress.exists()
