"""`policy.inspect_content` follows the registry: only the bytes it accepted are inspected, only for sessions the
gateway saw open, off the event loop and within bounds; an upload it could not follow is refused at its closing PUT.
Proof against a real registry's storage, as in test_pushes.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import random
import time
import uuid
import zlib

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import Image, build_image
from support.protocol import (
    Answer,
    absolute,
    call,
    digest_of,
    start_upload,
    teach,
    with_digest,
)
from support.registry import Registry
from yarl import URL

from proxy.inspection import LayerInspector, UploadInspections, matches_range

HYPOTHESIS = settings(derandomize=True, database=None, max_examples=60, deadline=None)

# The inspector by itself ---------------------------------------------------------------------------------


def fed(chunks: list[bytes]) -> LayerInspector:
    inspector = LayerInspector()
    for chunk in chunks:
        inspector.feed(chunk)
    return inspector


@given(st.binary(max_size=4000), st.lists(st.integers(0, 4000), max_size=6), st.integers(1, 3))
@HYPOTHESIS
def test_any_split_of_a_multi_member_gzip_gives_its_digests(payload: bytes, cuts: list[int], members: int) -> None:
    blob = b"".join(gzip.compress(payload[i::members], mtime=0) for i in range(members))
    edges = sorted({0, len(blob), *(cut % (len(blob) + 1) for cut in cuts)})
    inspector = fed([blob[a:b] for a, b in itertools.pairwise(edges)])
    inflated = b"".join(payload[i::members] for i in range(members))
    assert inspector.digest() == digest_of(blob)
    assert inspector.diff_id() == digest_of(inflated)


def test_a_copy_is_fed_apart_from_its_original() -> None:
    layer = random.Random(1).randbytes(5000)
    blob = gzip.compress(layer, mtime=0)
    original = fed([blob[:100]])
    twin = original.copy()
    twin.feed(blob[100:])
    assert original.size == 100 and original.diff_id() is None
    assert twin.diff_id() == digest_of(layer)
    original.feed(blob[100:])
    assert original.digest() == twin.digest()


def gzip_bomb(compressed_bytes: int) -> bytes:
    """Members of 64 MiB of zeros each, about 1000:1."""
    member = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=9, mtime=0)
    return member * max(1, compressed_bytes // len(member))


def test_a_gzip_bomb_is_past_the_limits_and_has_no_diff_id() -> None:
    bomb = gzip_bomb(1024 * 1024)
    inspector = fed([bomb[i : i + 131072] for i in range(0, len(bomb), 131072)])
    assert inspector.past_limits and inspector.diff_id() is None
    assert inspector.inflated < 100 * 1024 * 1024
    assert inspector.digest() == digest_of(bomb)


def test_an_ordinary_layer_is_within_the_limits(foreign_image: Image) -> None:
    layer = foreign_image.layers[0].data
    inspector = fed([layer])
    assert not inspector.past_limits and inspector.diff_id() is not None


def test_bytes_that_are_not_gzip_have_only_a_digest() -> None:
    inspector = fed([b"plain tar bytes" * 10])
    assert inspector.not_gzip and inspector.diff_id() is None and inspector.digest() == digest_of(b"plain tar bytes" * 10)


@pytest.mark.parametrize(
    ("size", "header", "matches"),
    [(0, "0-0", True), (1, "0-0", True), (10, "0-9", True), (10, "bytes=0-9", True), (10, "0-10", False),
     (10, None, False), (10, "0-x", False), (10, "", False)],
)  # fmt: skip
def test_the_registrys_range_is_compared_with_what_was_inspected(size: int, header: str | None, matches: bool) -> None:
    assert matches_range(fed([b"x" * size]), header) is matches


def test_inspections_are_bounded_by_refusing_not_by_forgetting() -> None:
    inspections = UploadInspections(capacity=2)
    for name in ("a", "b"):
        assert inspections.reserve()
        inspections.open(("repo", name))
    assert not inspections.reserve()
    assert inspections.get(("repo", "made-up")) is None and len(inspections) == 2
    assert inspections.get(("repo", "a")) is not None and inspections.get(("repo", "b")) is not None
    inspections.finish(("repo", "a"))
    assert inspections.reserve()
    inspections.release()
    assert inspections.reserve() and not inspections.reserve()


def test_idle_uploads_give_their_place_back() -> None:
    inspections = UploadInspections(capacity=1, idle=0.0)
    assert inspections.reserve()
    inspections.open(("repo", "a"))
    time.sleep(0.01)
    assert inspections.reserve()


# Against the real registry --------------------------------------------------------------------------------

OCTETS = {"Content-Type": "application/octet-stream"}
MADE_UP_SESSIONS = 1000



@pytest.fixture(scope="module")
def registry(module_registry: Registry) -> Registry:
    return module_registry

@pytest.fixture
def windows_image() -> Image:
    return build_image(1201, layer_sizes=(40_000, 6_000), foreign=1, os="windows")


async def inspecting_gateway(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, image: Image, action: str,
    **policy: object,
) -> GatewayProcess:  # fmt: skip
    gateway = gateway_factory(registry, config={"policy": {"default": action, "inspect_content": True, **policy}})
    await teach(http, gateway.url, "win/base", image)
    return gateway


def sha512_of(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


def assert_kept_out(registry: Registry, repository: str, data: bytes, answer: Answer) -> None:
    """Neither linked (by its sha256 or sha512) nor stored, and refused as the reject rule says."""
    for digest in (digest_of(data), sha512_of(data)):
        assert not registry.links(repository, digest), f"{digest[:20]} linked into {repository}"
    assert not registry.blob_data_path(digest_of(data)).exists()
    assert (answer.status, answer.error_codes) == (403, ["DENIED"]), answer


async def close_as_sha512(http: aiohttp.ClientSession, base: str, patched: Answer, data: bytes) -> Answer:
    return await call(http, "PUT", with_digest(absolute(base, patched.headers["Location"]), sha512_of(data)))


async def patch(http: aiohttp.ClientSession, location: URL, data: bytes, headers: dict[str, str]) -> Answer:
    return await call(http, "PATCH", location, data=data, headers=headers)


async def test_patches_the_registry_refuses_are_not_inspected(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    gateway = await inspecting_gateway(gateway_factory, registry, http, windows_image, "reject")
    foreign = windows_image.foreign_layers[0].data
    location = await start_upload(http, gateway.url, "win/refused-patches")

    wrong_type = await patch(http, location, foreign, {"Content-Type": "text/plain"})
    assert wrong_type.status >= 400, wrong_type
    bad_state = URL(str(location).replace("_state=", "_state=x"), encoded=True)
    bad_session = await patch(http, bad_state, foreign, OCTETS)
    assert bad_session.status >= 400, bad_session
    accepted = await patch(http, location, foreign, OCTETS)
    assert accepted.status == 202, accepted
    answer = await close_as_sha512(http, gateway.url, accepted, foreign)

    assert_kept_out(registry, "win/refused-patches", foreign, answer)


async def test_patches_to_made_up_sessions_do_not_displace_a_real_one(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    # Room for the real upload and one more: made-up sessions must take none of it (on main, 4200 of them
    # evicted the real inspector, whose upload then went through uninspected).
    gateway = await inspecting_gateway(gateway_factory, registry, http, windows_image, "reject", inspect_max_uploads=2)
    foreign = windows_image.foreign_layers[0].data
    location = await start_upload(http, gateway.url, "win/flooded")
    accepted = await patch(http, location, foreign, OCTETS)
    assert accepted.status == 202, accepted

    limit = asyncio.Semaphore(16)

    async def made_up() -> int:
        async with limit:
            target = f"{gateway.url}/v2/win/flooded/blobs/uploads/{uuid.uuid4()}?_state=made-up"
            return (await patch(http, URL(target), b"x", OCTETS)).status

    statuses = await asyncio.gather(*(made_up() for _ in range(MADE_UP_SESSIONS)))
    assert all(status >= 400 for status in statuses)
    other = await call(http, "POST", f"{gateway.url}/v2/win/other/blobs/uploads/")
    assert other.status == 202, other  # the second place is still free
    answer = await close_as_sha512(http, gateway.url, accepted, foreign)

    assert_kept_out(registry, "win/flooded", foreign, answer)


async def test_a_gzip_bomb_neither_blocks_the_gateway_nor_gets_committed(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    gateway = await inspecting_gateway(gateway_factory, registry, http, windows_image, "drop")
    bomb = gzip_bomb(8 * 1024 * 1024)
    location = await start_upload(http, gateway.url, "win/bomb")
    upload = asyncio.ensure_future(patch(http, location, bomb, OCTETS))
    probes = 0
    while not upload.done() or probes < 3:
        started = time.monotonic()
        probe = await asyncio.wait_for(call(http, "GET", f"{gateway.url}/v2/"), timeout=1.0)
        assert probe.status == 200 and time.monotonic() - started < 1.0
        probes += 1
        await asyncio.sleep(0.05)
    accepted = await upload
    assert accepted.status == 202, accepted
    session = absolute(gateway.url, accepted.headers["Location"])

    answer = await call(http, "PUT", with_digest(session, digest_of(bomb)))

    assert (answer.status, answer.error_codes) == (400, ["BLOB_UPLOAD_INVALID"]), answer
    assert "inflates past the inspection limits" in answer.json()["errors"][0]["message"]
    assert not registry.links("win/bomb", digest_of(bomb)) and not registry.blob_data_path(digest_of(bomb)).exists()
    upstream_session = URL(registry.url + session.raw_path_qs, encoded=True)
    assert (await call(http, "GET", upstream_session)).status == 404  # cancelled


async def test_an_upload_the_gateway_did_not_see_open_is_refused_and_cancelled(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    gateway = await inspecting_gateway(gateway_factory, registry, http, windows_image, "drop")
    ordinary = windows_image.layers[1].data
    direct = await start_upload(http, registry.url, "win/unseen")  # straight at the registry
    through_gateway = URL(gateway.url + direct.raw_path_qs, encoded=True)

    answer = await call(http, "PUT", with_digest(through_gateway, digest_of(ordinary)), data=ordinary, headers=OCTETS)

    assert not registry.links("win/unseen", digest_of(ordinary))
    assert (answer.status, answer.error_codes) == (400, ["BLOB_UPLOAD_INVALID"]), answer
    assert (await call(http, "GET", direct)).status == 404  # cancelled
    again = await start_upload(http, gateway.url, "win/unseen")
    stored = await call(http, "PUT", with_digest(again, digest_of(ordinary)), data=ordinary, headers=OCTETS)
    assert stored.status == 201 and registry.links("win/unseen", digest_of(ordinary))


def recompressed(data: bytes) -> bytes:
    """What podman and buildah upload: the same tar, gzip'd anew (another digest, the same diff_id)."""
    return gzip.compress(zlib.decompress(data, 16 + zlib.MAX_WBITS), compresslevel=1, mtime=1)


@pytest.mark.parametrize("named", ["recompressed", "sha512"])
async def test_a_disguised_foreign_layer_pushed_in_chunks_is_never_committed(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image, named: str
) -> None:
    gateway = await inspecting_gateway(gateway_factory, registry, http, windows_image, "reject")
    foreign = windows_image.foreign_layers[0].data
    data = recompressed(foreign) if named == "recompressed" else foreign
    location = await start_upload(http, gateway.url, f"win/{named}")
    for offset in range(0, len(data), 10_000):
        chunk = data[offset : offset + 10_000]
        headers = {**OCTETS, "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
        accepted = await patch(http, location, chunk, headers)
        assert accepted.status == 202, accepted
        location = absolute(gateway.url, accepted.headers["Location"])
    digest = digest_of(data) if named == "recompressed" else sha512_of(data)

    answer = await call(http, "PUT", with_digest(location, digest))

    assert_kept_out(registry, f"win/{named}", data, answer)


async def test_past_the_inspection_capacity_new_uploads_wait_with_429(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    gateway = await inspecting_gateway(
        gateway_factory, registry, http, windows_image, "drop", inspect_max_uploads=2,
        rules=[{"repository": "open/**", "action": "allow"}],
    )  # fmt: skip
    sessions = [await start_upload(http, gateway.url, "win/busy") for _ in range(2)]

    refused = await call(http, "POST", f"{gateway.url}/v2/win/busy/blobs/uploads/")

    assert (refused.status, refused.error_codes) == (429, ["TOOMANYREQUESTS"]), refused
    assert int(refused.headers["Retry-After"]) > 0
    assert (await call(http, "POST", f"{gateway.url}/v2/open/app/blobs/uploads/")).status == 202  # not inspected
    cancelled = await call(http, "DELETE", sessions[0])
    assert cancelled.status == 204
    assert (await call(http, "POST", f"{gateway.url}/v2/win/busy/blobs/uploads/")).status == 202


async def test_a_monolithic_post_is_answered_with_a_session_whose_upload_is_inspected(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    """A registry that takes monolithic POSTs would commit a body nobody inspected: the gateway asks for a session
    instead (as a registry without them answers, distribution always), and the blob then sent again is inspected."""
    gateway = await inspecting_gateway(gateway_factory, registry, http, windows_image, "reject")
    foreign, ordinary = windows_image.foreign_layers[0].data, windows_image.layers[1].data
    for repository, data in (("win/monolithic", foreign), ("win/monolithic-ordinary", ordinary)):
        start = with_digest(URL(f"{gateway.url}/v2/{repository}/blobs/uploads/"), sha512_of(data))
        opened = await call(http, "POST", start, data=data, headers=OCTETS)
        assert opened.status == 202 and "digest=" not in opened.headers["Location"], opened
        assert not registry.links(repository, digest_of(data)) and not registry.links(repository, sha512_of(data))
        session = absolute(gateway.url, opened.headers["Location"])
        closed = await call(http, "PUT", with_digest(session, digest_of(data)), data=data, headers=OCTETS)
        if data is foreign:
            assert_kept_out(registry, repository, data, closed)
        else:
            assert closed.status == 201 and registry.links(repository, digest_of(data)), closed
    assert (await call(http, "GET", f"{gateway.url}/v2/")).status == 200
