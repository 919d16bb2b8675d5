"""The gateway in front of a real registry behaves, for every client, like the registry itself."""

from __future__ import annotations

import asyncio
import filecmp
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from support.clients import skopeo_copy
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import Image, write_dir
from support.processes import describe, free_port
from support.protocol import (
    absolute,
    call,
    digest_of,
    mount,
    push_chunked,
    push_single_put,
    push_streamed,
    put_manifest,
    start_upload,
    with_digest,
)
from support.registry import Registry, RegistryConfig, RegistryFactory, make_htpasswd


def test_skopeo_push_and_pull_through_the_gateway_are_byte_for_byte(
    gateway: GatewayProcess, plain_image: Image, skopeo_cache: Path, tmp_path: Path
) -> None:
    source = write_dir(plain_image, tmp_path / "source")
    pushed = skopeo_copy(f"dir:{source}", f"docker://{gateway.host_port}/team/app:v1", cache_dir=skopeo_cache)
    assert pushed.returncode == 0, describe(pushed)
    pulled = skopeo_copy(
        f"docker://{gateway.host_port}/team/app:v1", f"dir:{tmp_path / 'pulled'}", cache_dir=skopeo_cache
    )
    assert pulled.returncode == 0, describe(pulled)
    for blob in source.iterdir():
        assert filecmp.cmp(blob, tmp_path / "pulled" / blob.name, shallow=False), blob.name


async def test_chunked_upload_then_head_get_delete_of_the_blob(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(50_000)
    committed = await push_chunked(http, gateway.url, "chunks/repo", data, chunk_size=16_384)
    assert committed.status == 201, committed
    assert committed.headers["Docker-Content-Digest"] == digest_of(data)
    blob_url = f"{gateway.url}/v2/chunks/repo/blobs/{digest_of(data)}"

    head = await call(http, "HEAD", blob_url)
    assert (head.status, head.headers["Content-Length"], head.body) == (200, str(len(data)), b"")
    assert (await call(http, "GET", blob_url)).body == data
    assert registry.blob_data_path(digest_of(data)).read_bytes() == data
    assert (await call(http, "DELETE", blob_url)).status == 202
    assert (await call(http, "HEAD", blob_url)).status == 404


async def test_patch_in_chunked_transfer_encoding_streams_through(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    chunks = [os.urandom(100_000) for _ in range(5)]
    committed = await push_streamed(http, gateway.url, "streamed/repo", chunks)
    assert committed.status == 201, committed
    assert registry.blob_data_path(digest_of(b"".join(chunks))).read_bytes() == b"".join(chunks)


async def test_single_put_upload_and_cross_repository_mount(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(10_000)
    assert (await push_single_put(http, gateway.url, "origin/repo", data)).status == 201
    mounted = await mount(http, gateway.url, "other/repo", digest_of(data), "origin/repo")
    assert mounted.status == 201, mounted
    assert (await call(http, "HEAD", f"{gateway.url}/v2/other/repo/blobs/{digest_of(data)}")).status == 200


async def test_manifest_put_head_get_delete_and_tags(
    gateway: GatewayProcess, plain_image: Image, http: aiohttp.ClientSession
) -> None:
    for blob in plain_image.blobs.values():
        assert (await push_single_put(http, gateway.url, "mani/repo", blob)).status == 201
    put = await put_manifest(http, gateway.url, "mani/repo", "v1", plain_image.manifest, plain_image.media_type)
    assert put.status == 201, put
    assert put.headers["Docker-Content-Digest"] == plain_image.manifest_digest
    by_digest = f"{gateway.url}/v2/mani/repo/manifests/{plain_image.manifest_digest}"
    head = await call(http, "HEAD", by_digest, headers={"Accept": plain_image.media_type})
    assert (head.status, head.headers["Content-Length"]) == (200, str(len(plain_image.manifest)))
    got = await call(http, "GET", f"{gateway.url}/v2/mani/repo/manifests/v1", headers={"Accept": plain_image.media_type})
    assert got.body == plain_image.manifest
    assert (await call(http, "GET", f"{gateway.url}/v2/mani/repo/tags/list")).json()["tags"] == ["v1"]
    assert (await call(http, "DELETE", by_digest)).status == 202
    assert (await call(http, "GET", by_digest, headers={"Accept": plain_image.media_type})).status == 404


async def test_catalog_pagination_link_leads_back_through_the_gateway(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    for name in ("cat/a", "cat/b", "cat/c"):
        assert (await push_single_put(http, gateway.url, name, name.encode())).status == 201
    seen: list[str] = []
    url = f"{gateway.url}/v2/_catalog?n=1"
    while url:
        page = await call(http, "GET", url)
        assert page.status == 200
        seen += page.json()["repositories"]
        link = page.headers.get("Link")
        url = str(absolute(gateway.url, link.split(";")[0].strip("<>"))) if link else ""
        assert not url or url.startswith(gateway.url)
    assert seen == ["cat/a", "cat/b", "cat/c"]


async def test_upload_locations_never_lead_around_the_gateway(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    """An upstream that sees its own Host builds absolute Locations to itself; the client must get ours."""
    gateway = gateway_factory(
        registry, config={"upstream": {"pass_host": False}, "forwarded": {"x_forwarded": False, "forwarded": False}}
    )
    started = await call(http, "POST", f"{gateway.url}/v2/loc/repo/blobs/uploads/")
    assert started.headers["Location"].startswith(f"{gateway.url}/v2/loc/repo/blobs/uploads/"), started.headers
    data = os.urandom(30_000)
    committed = await push_chunked(http, gateway.url, "loc/repo", data, chunk_size=10_000)
    assert committed.status == 201
    assert committed.headers["Location"].startswith(gateway.url)
    assert registry.blob_data_path(digest_of(data)).exists()


async def test_basic_auth_challenge_and_credentials_pass_through(
    registry_factory: RegistryFactory, gateway_factory: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    registry = registry_factory(RegistryConfig(htpasswd=make_htpasswd(tmp_path / "htpasswd", "alice", "s3cret")))
    gateway = gateway_factory(registry)
    challenge = await call(http, "GET", f"{gateway.url}/v2/")
    assert challenge.status == 401
    assert challenge.headers["WWW-Authenticate"].startswith("Basic realm=")
    authorized = await call(http, "GET", f"{gateway.url}/v2/", headers={"Authorization": aiohttp.encode_basic_auth("alice", "s3cret")})
    assert authorized.status == 200
    assert "s3cret" not in gateway.process.log_text()
    assert aiohttp.encode_basic_auth("alice", "s3cret") not in gateway.process.log_text()


async def test_tls_on_both_sides(
    registry_factory: RegistryFactory, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    registry = registry_factory(RegistryConfig(tls_cert=cert_file, tls_key=key_file))
    gateway = gateway_factory(
        registry,
        args=["--upstream-ca", str(ca_file), "--tls-cert", str(cert_file), "--tls-key", str(key_file)],
        tls=True,
    )
    client_context = ssl.create_default_context(cafile=str(ca_file))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as session:
        data = os.urandom(20_000)
        assert (await push_single_put(session, gateway.url, "tls/repo", data)).status == 201
        assert (await call(session, "GET", f"{gateway.url}/v2/tls/repo/blobs/{digest_of(data)}")).body == data
    untrusted = gateway_factory(registry, args=["--upstream-ca", str(ca_file).replace("ca.pem", "cert.pem")])
    async with aiohttp.ClientSession() as session:
        refused = await call(session, "GET", f"{untrusted.url}/v2/")
    assert refused.status == 502
    assert refused.error_codes == ["UNAVAILABLE"]


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_upstream_down_gives_a_json_502(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, method: str
) -> None:
    gateway = gateway_factory(f"http://127.0.0.1:{free_port()}")
    answer = await call(http, method, f"{gateway.url}/v2/x/blobs/uploads/1?digest=sha256:00", data=b"abc")
    assert answer.status == 502
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.error_codes == ["UNAVAILABLE"]


def raw_exchange(host_port: str, payload: bytes, timeout: float = 5.0) -> bytes:
    host, port = host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), id="tls-client-hello"),
        pytest.param(b"GET http://example.invalid/v2/ HTTP/1.1\r\nHost: example.invalid\r\nConnection: close\r\n\r\n", id="absolute-form"),
        pytest.param(b"CONNECT example.invalid:443 HTTP/1.1\r\nHost: example.invalid:443\r\nConnection: close\r\n\r\n", id="connect"),
    ],
)
def test_non_registry_requests_are_answered_at_once_and_never_forwarded(
    gateway: GatewayProcess, registry: Registry, payload: bytes
) -> None:
    answer = raw_exchange(gateway.host_port, payload)
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == b"400", answer
    assert "example.invalid" not in registry.log_text()


async def test_sigterm_lets_an_upload_in_flight_finish(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    location = await start_upload(http, gateway.url, "graceful/repo")
    parts = [os.urandom(64 * 1024) for _ in range(8)]
    sent_first = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        for index, part in enumerate(parts):
            yield part
            if index == 0:
                sent_first.set()
                await asyncio.sleep(0.5)

    upload = asyncio.create_task(
        call(http, "PUT", with_digest(location, digest_of(b"".join(parts))), data=slow_body())
    )
    await sent_first.wait()
    os.kill(gateway.process.pid, signal.SIGTERM)
    answer = await upload
    assert answer.status == 201, answer
    assert await asyncio.to_thread(gateway.process.wait, 10) == 0
    assert registry.blob_data_path(digest_of(b"".join(parts))).exists()


async def test_a_client_leaving_mid_upload_aborts_the_upstream_request(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    location = await start_upload(http, gateway.url, "gone/repo")
    host, port = gateway.host_port.split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"PATCH {location.raw_path_qs} HTTP/1.1\r\nHost: {gateway.host_port}\r\nContent-Length: 10000000\r\n"
        "Content-Type: application/octet-stream\r\n\r\n".encode() + os.urandom(100_000)
    )
    await writer.drain()
    await asyncio.sleep(0.5)  # let the gateway open the upstream PATCH before the client goes
    writer.close()
    for _ in range(200):
        if "client disconnected during blob PATCH" in registry.log_text():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"the registry never saw the upload end:\n{registry.log_text()[-2000:]}")
    assert (await call(http, "GET", f"{gateway.url}/v2/")).status == 200
