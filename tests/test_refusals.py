"""Refusals that stop every client at once: a rejected push reaches its client as the DENIED error, whatever
the body and framing of the refused request, never as a 5xx; and nothing of it reaches the registry."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import oras.provider
import pytest
from aiohttp.test_utils import make_mocked_request
from support.clients import Containerd
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import Image, build_image, write_oci_archive
from support.processes import describe
from support.protocol import (
    Answer,
    absolute,
    call,
    push_chunked,
    start_upload,
    teach,
    with_digest,
)
from support.registry import Registry
from yarl import URL

from proxy.cleanup import Cleaner
from proxy.config import ConfigError, Settings, load_settings
from proxy.forwarding import StreamAborted, Upstream, create_session
from proxy.gateway import REQUEST_ID, Gateway
from proxy.known import KnownForeign
from proxy.metrics import Metrics
from proxy.store import open_store

# A refusal that takes longer than this was retried or hung: the bound is generous for a loaded machine.
PROMPT_FAILURE_SECONDS = 30.0
CTR_PUSHES = 8
# A connection the gateway announced it closes is closed within its lingering time (2 s); aiohttp's default kept it 10 s.
CLOSE_SECONDS = 5.0


@pytest.fixture
def windows_image() -> Image:
    return build_image(70, layer_sizes=(256 * 1024, 512 * 1024, 4096), foreign=2, os="windows")


async def rejecting_gateway(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, image: Image, **policy: Any
) -> GatewayProcess:
    gateway = gateway_factory(registry, config={"policy": {"default": "reject", **policy}})
    await teach(http, gateway.url, "win/base", image)
    return gateway


def server_errors(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return [entry for entry in gateway.events("request") if entry["status"] >= 500]


def assert_nothing_committed(registry: Registry, repository: str, image: Image) -> None:
    for layer in image.foreign_layers:
        assert not registry.committed(repository, layer.digest), (repository, layer.digest)


@pytest.mark.parametrize(
    ("value", "expected"), [("403", 403), (403, 403), ("400", 400), (400, 400), (" 400 ", 400),
                            ("401", None), (404, None), ("", None), (True, None), ("DENIED", None)],
)  # fmt: skip
def test_reject_status_is_403_or_400(value: object, expected: int | None) -> None:
    environ = {"FOREIGN_LAYER_PROXY_POLICY_REJECT_STATUS": str(value)} if isinstance(value, str) else {}
    overrides = {} if isinstance(value, str) else {"policy.reject_status": value}
    if expected is None:
        with pytest.raises(ConfigError, match="policy.reject_status"):
            load_settings(overrides=overrides, environ=environ)
    else:
        assert load_settings(overrides=overrides, environ=environ).policy.reject_status == expected
    assert load_settings(environ={}).policy.reject_status == 403


# ctr: the closing PUT carries the whole blob


async def test_ctr_push_whose_closing_put_carries_a_foreign_blob_is_denied_with_the_gateways_message(
    gateway_factory: GatewayFactory,
    registry: Registry,
    http: aiohttp.ClientSession,
    containerd: Containerd,
    tmp_path: Path,
) -> None:
    """ctr sends its closing PUT's body while it waits for the answer, and pushes the other layers meanwhile.
    Answered before the body was read, it hung, panicked ("send on closed channel") or lost the refusal
    ("failed to copy: io: read/write on closed pipe") in some of its pushes, and the other uploads it then
    broke off were logged and counted as upstream failures, answered 502 ("upstream registry connection
    failed: ClientConnectionResetError")."""
    image = build_image(73, layer_sizes=(4 << 20, 4 << 20) + (300_000,) * 10, foreign=2, os="windows")
    gateway = await rejecting_gateway(gateway_factory, registry, http, image)
    containerd.import_archive(write_oci_archive(image, tmp_path / "image.oci.tar"), "local/win")
    panicked = 0
    for attempt in range(CTR_PUSHES):
        repository = f"win/ctr{attempt}"
        started = time.monotonic()
        try:
            pushed = await asyncio.to_thread(
                containerd.push, "local/win:latest", f"{gateway.host_port}/{repository}:1",
                allow_non_distributable=True, timeout=PROMPT_FAILURE_SECONDS,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise AssertionError(f"ctr hung on push {attempt} for {PROMPT_FAILURE_SECONDS:g} s") from None
        elapsed = time.monotonic() - started
        output = pushed.stdout + pushed.stderr
        last_line = output.strip().splitlines()[-1]
        assert pushed.returncode != 0, describe(pushed)
        assert elapsed < PROMPT_FAILURE_SECONDS, f"ctr took {elapsed:.1f} s to give up"
        assert_nothing_committed(registry, repository, image)
        if containerd.push_panicked(pushed):
            panicked += 1
            continue
        assert "unexpected status: 403 foreign layer sha256:" in last_line, (attempt, last_line)
        assert f"may not be pushed to {repository}" in last_line, (attempt, last_line)
    assert panicked * 2 <= CTR_PUSHES, f"ctr panicked in {panicked} of {CTR_PUSHES} pushes"
    assert server_errors(gateway) == []
    rejected = [entry for entry in gateway.events("decision") if entry["action"] == "reject"]
    assert rejected and {entry["method"] for entry in rejected} == {"PUT"}


# Raw pushes: every framing of a refused request


async def _body_with_length(http: aiohttp.ClientSession, url: URL, data: bytes) -> Answer:
    return await call(http, "PUT", url, data=data, headers={"Content-Type": "application/octet-stream"})


async def _chunked_body(http: aiohttp.ClientSession, url: URL, data: bytes) -> Answer:
    async def pieces() -> AsyncIterator[bytes]:
        for offset in range(0, len(data), 65536):
            yield data[offset : offset + 65536]

    return await call(http, "PUT", url, data=pieces(), headers={"Content-Type": "application/octet-stream"})


async def _no_body(http: aiohttp.ClientSession, url: URL, data: bytes) -> Answer:
    """The blob went up in a PATCH the gateway passed on (nothing names it there); the closing PUT is empty."""
    patched = await call(http, "PATCH", url.with_query(None).update_query(
        {key: value for key, value in url.query.items() if key != "digest"}), data=data)
    assert patched.status == 202, patched
    return await call(http, "PUT", with_digest(absolute(str(url.origin()), patched.headers["Location"]),
                                               url.query["digest"]))


FRAMINGS = {"content-length": _body_with_length, "chunked": _chunked_body, "no-body": _no_body}


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("reject_status", [403, 400])
async def test_a_refused_closing_put_gets_the_denied_error_in_every_framing(
    gateway_factory: GatewayFactory, registry: Registry, windows_image: Image, framing: str, reject_status: int
) -> None:
    # One connection: what follows the refusal on it shows whether the gateway and the client still agree
    # where one request ends and the next begins.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), auto_decompress=False) as http:
        settings = {} if reject_status == 403 else {"reject_status": reject_status}  # 403: the default
        gateway = await rejecting_gateway(gateway_factory, registry, http, windows_image, **settings)
        for layer in windows_image.foreign_layers:
            location = await start_upload(http, gateway.url, "win/app")
            async with asyncio.timeout(PROMPT_FAILURE_SECONDS):
                answer = await FRAMINGS[framing](http, with_digest(location, layer.digest), layer.data)
            assert answer.status == reject_status, answer
            assert answer.error_codes == ["DENIED"], answer
            assert f"foreign layer {layer.digest} may not be pushed to win/app" in answer.json()["errors"][0]["message"]
            assert (await call(http, "GET", f"{gateway.url}/v2/")).status == 200
        assert_nothing_committed(registry, "win/app", windows_image)
        assert server_errors(gateway) == []


def refused_with_expect_continue(host_port: str, path: str, size: int) -> tuple[bytes, bytes]:
    """Headers with `Expect: 100-continue` and no body (a client waits for the 100); then, on the same
    connection unless the answer closes it, a GET /v2/. Both answers as read."""
    host, port = host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=PROMPT_FAILURE_SECONDS) as sock:
        sock.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Length: {size}\r\n"
            "Content-Type: application/octet-stream\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        answer = sock.recv(65536)
        head, _, _ = answer.partition(b"\r\n\r\n")
        if b"connection: close" in head.lower():
            sock.settimeout(CLOSE_SECONDS)
            return answer, sock.recv(65536)  # b"": closed, as announced
        sock.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n".encode())
        return answer, sock.recv(65536)


async def test_a_refusal_of_a_client_waiting_for_100_continue_closes_the_connection(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    gateway = await rejecting_gateway(gateway_factory, registry, http, windows_image)
    layer = windows_image.foreign_layers[0]
    location = await start_upload(http, gateway.url, "win/app")
    target = with_digest(location, layer.digest)
    answer, after = await asyncio.to_thread(refused_with_expect_continue, gateway.host_port, target.raw_path_qs, layer.size)
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert json.loads(body)["errors"][0]["code"] == "DENIED"
    # Never 100 Continue, and no GET swallowed as the body that never came: the connection is closed.
    assert b"connection: close" in head.lower() and after == b"", (answer, after)
    assert_nothing_committed(registry, "win/app", windows_image)


async def test_a_refused_chunked_patch_push_leaves_nothing_in_the_registry(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image
) -> None:
    gateway = await rejecting_gateway(gateway_factory, registry, http, windows_image)
    for layer in windows_image.foreign_layers:
        answer = await push_chunked(http, gateway.url, "win/app", layer.data, chunk_size=65536)
        assert (answer.status, answer.error_codes) == (403, ["DENIED"]), answer
    assert_nothing_committed(registry, "win/app", windows_image)


# oras-py: takes a 403 for an authentication challenge and retries it; a 400 stops it at once


async def test_oras_stops_at_once_on_a_400_refusal_and_shows_why(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, windows_image: Image,
    tmp_path: Path,
) -> None:
    gateway = await rejecting_gateway(gateway_factory, registry, http, windows_image, reject_status=400)
    layer = windows_image.foreign_layers[0]
    blob = tmp_path / "layer.tar.gz"
    blob.write_bytes(layer.data)
    client = oras.provider.Registry(gateway.host_port, insecure=True)

    def push() -> Any:
        return client.push(target=f"{gateway.host_port}/win/oras:1", files=[str(blob)], disable_path_validation=True)

    started = time.monotonic()
    with pytest.raises(ValueError) as raised:
        await asyncio.to_thread(push)
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT_FAILURE_SECONDS, f"oras took {elapsed:.1f} s to give up"
    assert f"foreign layer {layer.digest} may not be pushed to win/oras" in str(raised.value), raised.value
    assert not registry.committed("win/oras", layer.digest)
    assert server_errors(gateway) == []


# A client that leaves while its answer is being written is no upstream failure


async def test_a_client_that_left_is_not_reported_as_an_upstream_failure(registry: Registry) -> None:
    """Writing to a client whose connection is closing raises aiohttp's ClientConnectionResetError inside
    Upstream.open, which took it for the upstream's and answered 502 "upstream registry connection failed:
    ClientConnectionResetError"."""
    settings = Settings()
    session = create_session(settings.upstream)
    upstream = Upstream(URL(registry.url), session)
    store = open_store("memory://")
    gateway = Gateway(settings, upstream, KnownForeign(store), Metrics(),
                      Cleaner(upstream.origin, settings.upstream, settings.cleanup))  # fmt: skip
    writer = mock.Mock()
    writer.write_headers = mock.AsyncMock(
        side_effect=aiohttp.ClientConnectionResetError("Cannot write to closing transport")
    )
    request = make_mocked_request("GET", "/v2/", headers={"Host": registry.host_port}, writer=writer)
    request[REQUEST_ID] = "test-1"
    gateway.see_client(request)
    try:
        with pytest.raises(StreamAborted, match="client closed the connection"):
            await gateway.forward(request)
    finally:
        await session.close()
        await store.close()
