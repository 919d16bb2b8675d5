"""The registry push protocol spoken by hand, one way of pushing a blob per function."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from .images import Image
from .registry import Registry


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_codes(self) -> list[str]:
        return [error["code"] for error in self.json()["errors"]]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def call(
    session: aiohttp.ClientSession, method: str, url: str | URL, *, data: Any = None, headers: dict[str, str] | None = None
) -> Answer:
    async with session.request(method, url, data=data, headers=headers, allow_redirects=False) as response:
        return Answer(response.status, response.headers, await response.read())


def absolute(base: str, location: str) -> URL:
    """A Location as the client follows it, kept encoded (distribution's `_state` holds `%3D`)."""
    target = URL(location, encoded=True)
    return target if target.is_absolute() else URL(base).join(target)


def with_digest(location: URL, digest: str) -> URL:
    return location.update_query({"digest": digest})


async def start_upload(session: aiohttp.ClientSession, base: str, repository: str) -> URL:
    answer = await call(session, "POST", f"{base}/v2/{repository}/blobs/uploads/")
    assert answer.status == 202, answer
    return absolute(base, answer.headers["Location"])


async def patch_held_open(
    session: aiohttp.ClientSession, base: str, repository: str, release: asyncio.Event
) -> asyncio.Task[Answer]:
    """An upload in flight: a PATCH that sends 1 KiB, then its last 1 KiB only once `release` is set."""

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"x" * 1024
        await release.wait()
        yield b"y" * 1024

    location = await start_upload(session, base, repository)
    return asyncio.create_task(call(session, "PATCH", location, data=slow_body()))


async def push_chunked(
    session: aiohttp.ClientSession, base: str, repository: str, data: bytes, chunk_size: int = 4096
) -> Answer:
    """POST, PATCH with Content-Range per chunk, then an empty PUT ?digest."""
    location = await start_upload(session, base, repository)
    for offset in range(0, len(data), chunk_size):
        chunk = data[offset : offset + chunk_size]
        answer = await call(
            session,
            "PATCH",
            location,
            data=chunk,
            headers={
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                "Content-Type": "application/octet-stream",
            },
        )
        assert answer.status == 202, answer
        location = absolute(base, answer.headers["Location"])
    return await call(session, "PUT", with_digest(location, digest_of(data)))


async def push_streamed(
    session: aiohttp.ClientSession, base: str, repository: str, chunks: Iterable[bytes]
) -> Answer:
    """POST, one PATCH in chunked transfer encoding (as docker and podman send it), then PUT ?digest."""
    parts = list(chunks)

    async def body() -> Any:
        for part in parts:
            yield part

    location = await start_upload(session, base, repository)
    answer = await call(session, "PATCH", location, data=body(), headers={"Content-Type": "application/octet-stream"})
    assert answer.status == 202, answer
    location = absolute(base, answer.headers["Location"])
    return await call(session, "PUT", with_digest(location, digest_of(b"".join(parts))))


async def push_single_put(session: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
    """POST, then one PUT ?digest carrying the whole blob (ctr, oras, python-dxf)."""
    location = await start_upload(session, base, repository)
    return await call(
        session, "PUT", with_digest(location, digest_of(data)), data=data,
        headers={"Content-Type": "application/octet-stream"},
    )  # fmt: skip


async def push_monolithic_post(session: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
    """POST ?digest with the body (the spec's monolithic upload; distribution 2.8 opens a session instead)."""
    return await call(
        session, "POST", URL(f"{base}/v2/{repository}/blobs/uploads/").with_query(digest=digest_of(data)),
        data=data, headers={"Content-Type": "application/octet-stream"},
    )  # fmt: skip


async def mount(session: aiohttp.ClientSession, base: str, repository: str, digest: str, source: str) -> Answer:
    return await call(
        session, "POST", URL(f"{base}/v2/{repository}/blobs/uploads/").with_query(mount=digest, **{"from": source})
    )


async def put_manifest(
    session: aiohttp.ClientSession, base: str, repository: str, reference: str, body: bytes, media_type: str
) -> Answer:
    return await call(
        session, "PUT", f"{base}/v2/{repository}/manifests/{reference}", data=body,
        headers={"Content-Type": media_type},
    )  # fmt: skip


async def push_image_blobs(session: aiohttp.ClientSession, base: str, repository: str, blobs: Iterable[bytes]) -> None:
    for blob in blobs:
        answer = await push_single_put(session, base, repository, blob)
        assert answer.status == 201, answer


async def teach(http: aiohttp.ClientSession, base: str, repository: str, image: Image) -> None:
    """Push an image the way skopeo does when foreign layers carry urls: every blob but those, then the manifest."""
    await push_image_blobs(http, base, repository, ordinary_blobs(image))
    answer = await put_manifest(http, base, repository, "taught", image.manifest, image.media_type)
    assert answer.status == 201, answer


def ordinary_blobs(image: Image) -> list[bytes]:
    foreign = {layer.digest for layer in image.foreign_layers}
    return [data for digest, data in image.blobs.items() if digest not in foreign]


async def upstream_has(http: aiohttp.ClientSession, registry: Registry, repository: str, digest: str) -> bool:
    answer = await call(http, "HEAD", f"{registry.url}/v2/{repository}/blobs/{digest}")
    return answer.status == 200


async def push_monolithic_post_or_put(session: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
    """A monolithic POST; where the registry opens a session instead (distribution), the single PUT clients then send."""
    answer = await push_monolithic_post(session, base, repository, data)
    if answer.status != 202:
        return answer
    return await call(
        session, "PUT", with_digest(absolute(base, answer.headers["Location"]), digest_of(data)), data=data,
        headers={"Content-Type": "application/octet-stream"},
    )  # fmt: skip


async def push_patch_then_empty_put(session: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
    """POST, one PATCH with the whole blob (Content-Length), then an empty PUT ?digest (docker, crane, skopeo)."""
    return await push_chunked(session, base, repository, data, chunk_size=max(len(data), 1))


async def push_chunked_encoding(session: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
    return await push_streamed(session, base, repository, (data[offset : offset + 4096] for offset in range(0, len(data), 4096)))


PushForm = Callable[[aiohttp.ClientSession, str, str, bytes], Awaitable[Answer]]

# Every way of pushing a blob's bytes: each answers 201 once the blob is stored (or dropped).
PUSH_FORMS: dict[str, PushForm] = {
    "monolithic-post": push_monolithic_post_or_put,
    "single-put": push_single_put,
    "patch-then-empty-put": push_patch_then_empty_put,
    "patch-chunks-with-content-range": push_chunked,
    "chunked-encoding-patch": push_chunked_encoding,
}
