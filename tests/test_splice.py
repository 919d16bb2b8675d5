"""Large blob bodies relayed with splice(2) where both sides are plain TCP (server.splice): through a gateway
process in front of a real registry, verified by digest and in the registry's storage, with the metric
foreign_layer_proxy_spliced_bytes_total telling which path a body took. The fallbacks (TLS on either side,
chunked uploads, inspected uploads, short bodies, splice turned off) copy; the deadlines of copied bodies
(write_timeout, idle_timeout, min_body_rate, the upstream's read_timeout) cut spliced ones too, while
others are served; no descriptor (pipe or duplicate) outlives its transfer.

The clients here are raw sockets, so that what goes over each connection is seen as it is: a download keeps
its connection for the next request; a spliced upload's answer says `Connection: close` and closes it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from support.clients import skopeo_copy
from support.faulty import Fault, FaultyUpstream, open_fds, sockets_to
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import build_image, write_dir
from support.protocol import (
    call,
    push_chunked_encoding,
    push_single_put,
    start_upload,
    with_digest,
)
from support.registry import Registry, RegistryConfig, RegistryFactory
from yarl import URL

from proxy import splice
from proxy.forwarding import RateFloor, StreamAborted, WaitDeadline

MiB = 1024 * 1024
HOST = "127.0.0.1"
SPLICED = "foreign_layer_proxy_spliced_bytes_total"
STREAMED = "foreign_layer_proxy_streamed_bytes_total"


def metric(gateway: GatewayProcess, name: str, direction: str) -> float:
    """One sample of the gateway's /metrics; a missing one fails (the counters exist from the start)."""
    with urllib.request.urlopen(f"{gateway.admin_url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("direction") == direction:
                return float(sample.value)
    raise AssertionError(f"no {name}{{direction={direction!r}}} in /metrics")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Raw:
    """One client connection spoken by hand: requests written as given, answers read by Content-Length."""

    def __init__(self, port: int, receive_buffer: int | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        self.host = f"{HOST}:{port}"
        self.pending = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body or method in {"PUT", "PATCH", "POST"}:
            lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before an answer")
            self.pending += chunk
        head, _, self.pending = self.pending.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        return int(status_line.split()[1]), headers

    def body(self, length: int) -> bytes:
        parts, received = [self.pending[:length]], len(self.pending[:length])
        self.pending = self.pending[length:]
        while received < length:
            chunk = self.sock.recv(min(1024 * 1024, length - received))
            if not chunk:
                raise ConnectionError(f"closed after {received} of {length} body bytes")
            parts.append(chunk)
            received += len(chunk)
        return b"".join(parts)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = self.head()
        return status, headers, self.body(int(headers.get("content-length", "0")))

    def drained(self, timeout: float) -> tuple[int, bool]:
        """Bytes that came until the gateway closed the connection; False when it held it past `timeout`."""
        self.sock.settimeout(timeout)
        received = len(self.pending)
        try:
            while chunk := self.sock.recv(1024 * 1024):
                received += len(chunk)
        except TimeoutError:
            return received, False
        except ConnectionError:
            pass
        return received, True


def probe(gateway: GatewayProcess) -> float:
    """Seconds a fresh client waits for /v2/ (fails unless it is answered)."""
    started = time.monotonic()
    with Raw(gateway.port, timeout=5) as client:
        client.send("GET", "/v2/")
        status, _, _ = client.answer()
    assert status == 200
    return time.monotonic() - started


def descriptors(pid: int, upstream_port: int) -> tuple[int, int]:
    """(descriptors but pooled upstream connections, pipes) the gateway process holds."""
    pipes = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            pipes += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    return open_fds(pid) - sockets_to(pid, upstream_port), pipes


async def settled(gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession) -> tuple[int, tuple[int, int]]:
    """The gateway's pid and its descriptors once it served a probe and the test's own keep-alive connection."""
    probe(gateway)
    await start_upload(http, gateway.url, "splice/settled")
    return gateway.process.pid, descriptors(gateway.process.pid, registry.port)


async def freed(pid: int, upstream_port: int, baseline: tuple[int, int]) -> None:
    """Until the gateway holds no more descriptors than `baseline`, and exactly its pipes (its own)."""
    deadline = time.monotonic() + 10
    while (now := descriptors(pid, upstream_port))[0] > baseline[0] or now[1] != baseline[1]:
        assert time.monotonic() < deadline, f"(descriptors, pipes) {now}, were {baseline}"
        await asyncio.sleep(0.1)


async def pushed(http: aiohttp.ClientSession, registry: Registry, repository: str, size: int) -> bytes:
    """A random blob put straight into the registry, for downloads through the gateway."""
    blob = os.urandom(size)
    assert (await push_single_put(http, registry.url, repository, blob)).status == 201
    return blob


def upload(client: Raw, method: str, target: str, blob: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    client.send(method, target, blob, {"Content-Type": "application/octet-stream", **(headers or {})})
    status, answer_headers, _ = client.answer()
    return status, answer_headers


async def test_a_blob_download_is_spliced_whole_and_its_connection_serves_the_next_request(
    registry: Registry, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    blob = await pushed(http, registry, "splice/down", 8 * MiB)
    gateway = gateway_factory(registry, args=["--log-level", "info"])
    with Raw(gateway.port) as client:
        for _ in range(2):
            client.send("GET", f"/v2/splice/down/blobs/{sha256(blob)}")
            status, headers, body = client.answer()
            assert (status, sha256(body)) == (200, sha256(blob))
            assert headers.get("connection", "keep-alive").lower() != "close"
        client.send("GET", "/v2/")
        assert client.answer()[0] == 200  # the third request, on the same connection
    spliced = metric(gateway, SPLICED, "down")
    assert 2 * len(blob) - 2 * MiB <= spliced <= 2 * len(blob)  # what aiohttp had read first was copied
    assert metric(gateway, STREAMED, "down") >= 2 * len(blob)
    lines = [line for line in await gateway.wait_for("request", 3) if line["method"] == "GET" and "blobs" in line["path"]]
    assert [line["bytes_out"] for line in lines] == [len(blob), len(blob)]


@pytest.mark.parametrize("form", ["PUT", "PATCH", "POST"])
async def test_an_upload_is_spliced_into_the_registry_and_its_connection_closed_after_the_answer(
    registry: Registry, gateway_factory: GatewayFactory, http: aiohttp.ClientSession, form: str
) -> None:
    """A monolithic PUT, a PATCH with Content-Length (then an empty PUT), a monolithic POST ?digest= (which
    distribution 2.8 answers with a session, before reading the body: then a PUT)."""
    gateway = gateway_factory(registry, args=["--log-level", "info"])
    blob, repository = os.urandom(8 * MiB), f"splice/up-{form.lower()}"
    location = await start_upload(http, gateway.url, repository)
    with Raw(gateway.port) as client:
        if form == "PUT":
            status, headers = upload(client, "PUT", str(with_digest(location, sha256(blob)).raw_path_qs), blob)
        elif form == "PATCH":
            status, headers = upload(client, "PATCH", location.raw_path_qs, blob, {"Content-Range": f"0-{len(blob) - 1}"})
            assert status == 202
        else:
            status, headers = upload(client, "POST", f"/v2/{repository}/blobs/uploads/?digest={sha256(blob)}", blob)
        assert headers["connection"].lower() == "close"
        assert client.drained(5) == (0, True)
    if form == "PATCH":
        closing = with_digest(gateway_location(gateway, headers["location"]), sha256(blob))
        status = (await call(http, "PUT", closing)).status
    if form == "POST" and status == 202:  # distribution 2.8 opens a session instead, unread body and all
        with Raw(gateway.port) as client:
            target = with_digest(gateway_location(gateway, headers["location"]), sha256(blob)).raw_path_qs
            status, headers = upload(client, "PUT", target, blob)
            assert headers["connection"].lower() == "close"
    assert status == 201
    assert sha256(registry.blob_data_path(sha256(blob)).read_bytes()) == sha256(blob)
    assert registry.links(repository, sha256(blob))
    assert len(blob) - MiB <= metric(gateway, SPLICED, "up") <= (2 if form == "POST" else 1) * len(blob)
    carried = "PATCH" if form == "PATCH" else "PUT"  # the request whose body the registry took
    line = next(line for line in await gateway.wait_for("request", 2) if line["method"] == carried)
    assert line["bytes_in"] == len(blob)


def gateway_location(gateway: GatewayProcess, location: str) -> URL:
    return URL(location if location.startswith("http") else gateway.url + location, encoded=True)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(CA, certificate chain, key) for 127.0.0.1."""
    authority = trustme.CA()
    issued = authority.issue_cert(HOST, "localhost")
    ca, chain, key = tmp_path / "ca.pem", tmp_path / "chain.pem", tmp_path / "key.pem"
    authority.cert_pem.write_to_path(str(ca))
    issued.cert_chain_pems[0].write_to_path(str(chain))
    issued.private_key_pem.write_to_path(str(key))
    return ca, chain, key


@pytest.mark.parametrize("case", ["client TLS", "upstream TLS", "chunked upload", "inspected", "short", "off"])
async def test_bodies_that_cannot_or_must_not_be_spliced_are_copied(
    registry_factory: RegistryFactory, gateway_factory: GatewayFactory, certificate: tuple[Path, Path, Path], case: str
) -> None:
    ca, chain, key = certificate
    size = 512 * 1024 if case == "short" else 4 * MiB
    config: dict[str, Any] = {"server": {"splice": False}} if case == "off" else {}
    args: list[str] = []
    client_ssl: ssl.SSLContext | bool = False
    registry = registry_factory(RegistryConfig(tls_cert=chain, tls_key=key) if case == "upstream TLS" else RegistryConfig())
    if case == "upstream TLS":
        args = ["--upstream-ca", str(ca)]
    if case == "client TLS":
        args, client_ssl = ["--tls-cert", str(chain), "--tls-key", str(key)], ssl.create_default_context(cafile=str(ca))
    if case == "inspected":
        config = {"policy": {"inspect_content": True}}
    gateway = gateway_factory(registry, args=args, config=config, tls=case == "client TLS")
    blob = os.urandom(size)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as session:
        if case == "chunked upload":
            answer = await push_chunked_encoding(session, gateway.url, "splice/copied", blob)
        elif case == "inspected":
            location = await start_upload(session, gateway.url, "splice/copied")
            patched = await call(session, "PATCH", location, data=blob, headers={"Content-Type": "application/octet-stream"})
            assert patched.status == 202, patched
            answer = await call(session, "PUT", with_digest(gateway_location(gateway, patched.headers["Location"]), sha256(blob)))
        else:
            answer = await push_single_put(session, gateway.url, "splice/copied", blob)
        assert answer.status == 201, answer
        fetched = await call(session, "GET", f"{gateway.url}/v2/splice/copied/blobs/{sha256(blob)}")
    assert sha256(fetched.body) == sha256(blob)
    assert registry.committed("splice/copied", sha256(blob))
    assert metric(gateway, SPLICED, "up") == 0
    # Only the upload of those two is not spliced: their blobs come back as any other.
    assert (metric(gateway, SPLICED, "down") > 0) is (case in {"chunked upload", "inspected"})
    assert metric(gateway, STREAMED, "up") >= len(blob)


def aborted(gateway: GatewayProcess) -> list[str]:
    return [line["cause"] for line in gateway.events("stream_aborted")]


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0,
                     log: Callable[[], object] = str) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} ({log()})")
        await asyncio.sleep(0.1)


async def test_a_reader_that_stops_is_cut_off_by_write_timeout_while_others_are_served(
    registry: Registry, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    blob = await pushed(http, registry, "splice/slow", 32 * MiB)
    gateway = gateway_factory(registry, config={"server": {"write_timeout": 2}})
    with Raw(gateway.port, receive_buffer=16 * 1024) as stalled:
        stalled.send("GET", f"/v2/splice/slow/blobs/{sha256(blob)}")
        assert stalled.head()[0] == 200
        started = time.monotonic()
        probes = []
        while time.monotonic() - started < 3:  # not reading, past the 2 s deadline
            probes.append(probe(gateway))
            await asyncio.sleep(0.2)
        received, closed = stalled.drained(10)
    assert closed and received < len(blob)
    assert max(probes) < 1.0
    assert any(cause == "client read too little for 2 s" for cause in aborted(gateway)), aborted(gateway)
    assert 0 < metric(gateway, SPLICED, "down") < len(blob)


@pytest.mark.parametrize("limit", ["idle_timeout", "min_body_rate"])
async def test_a_writer_that_stops_or_trickles_is_cut_off_mid_splice_while_others_are_served(
    registry: Registry, gateway_factory: GatewayFactory, http: aiohttp.ClientSession, limit: str
) -> None:
    server = ({"idle_timeout": 2, "min_body_rate": 0} if limit == "idle_timeout"
              else {"idle_timeout": 30, "min_body_rate": 64 * 1024, "body_rate_window": 2})  # fmt: skip
    gateway = gateway_factory(registry, config={"server": server})
    location = await start_upload(http, gateway.url, "splice/trickle")
    with Raw(gateway.port) as writer:
        writer.sock.sendall(f"PATCH {location.raw_path_qs} HTTP/1.1\r\nHost: x\r\nContent-Length: {8 * MiB}\r\n"
                            f"Content-Type: application/octet-stream\r\n\r\n".encode() + os.urandom(2 * MiB))  # fmt: skip
        started = time.monotonic()
        probes = []
        while time.monotonic() - started < 6 and not gateway.events("stream_aborted"):
            if limit == "min_body_rate":
                writer.sock.sendall(b"x" * 1024)
            probes.append(probe(gateway))
            await asyncio.sleep(0.2)
        _, closed = writer.drained(5)
    assert closed
    assert max(probes) < 1.0
    expected = "client sent no body bytes for 2 s" if limit == "idle_timeout" else "(minimum 65536 B/s)"
    assert any(expected in cause for cause in aborted(gateway)), aborted(gateway)
    assert MiB < metric(gateway, SPLICED, "up") <= 2 * MiB + 64 * 1024


async def test_a_client_leaving_mid_download_frees_everything(
    registry: Registry, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    blob = await pushed(http, registry, "splice/leave", 32 * MiB)
    gateway = gateway_factory(registry)
    pid, baseline = await settled(gateway, registry, http)
    for _ in range(3):
        with Raw(gateway.port, receive_buffer=64 * 1024) as leaving:
            leaving.send("GET", f"/v2/splice/leave/blobs/{sha256(blob)}")
            assert leaving.head()[0] == 200
            leaving.body(2 * MiB)
    await freed(pid, registry.port, baseline)
    assert probe(gateway) < 1.0
    assert 0 < metric(gateway, SPLICED, "down") < 3 * len(blob)
    with Raw(gateway.port) as whole:
        whole.send("GET", f"/v2/splice/leave/blobs/{sha256(blob)}")
        assert sha256(whole.answer()[2]) == sha256(blob)


class DyingUpstream:
    """An upstream that answers one request with a 200 announcing `length` bytes, sends `sent` of them and
    closes the connection: a registry that crashed mid-body."""

    def __init__(self, length: int, sent: int) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.length, self.sent = length, sent
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                               b"Content-Length: %d\r\n\r\n" % self.length + os.urandom(self.sent))  # fmt: skip
            connection.shutdown(socket.SHUT_WR)
            connection.recv(1)  # until the gateway closes its end

    def stop(self) -> None:
        self.listener.close()
        self.thread.join(10)


class DeafUpstream(DyingUpstream):
    """An upstream that reads a request's head and then nothing more: a registry stuck taking an upload."""

    def __init__(self) -> None:
        self.released = threading.Event()
        super().__init__(0, 0)

    def stop(self) -> None:
        self.released.set()
        super().stop()

    def serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            self.released.wait(20)  # reads nothing more


async def test_an_upstream_that_stops_taking_an_upload_is_answered_504_by_read_timeout(
    gateway_factory: GatewayFactory
) -> None:
    deaf = DeafUpstream()
    try:
        gateway = gateway_factory(deaf.url, config={"upstream": {"read_timeout": 2}})
        body = os.urandom(48 * MiB)  # more than the kernel's buffers on the way hold

        def push() -> int:
            with Raw(gateway.port, timeout=15) as client:
                try:
                    return upload(client, "PUT", f"/v2/splice/deaf/blobs/uploads/x?digest={sha256(body)}", body)[0]
                except OSError:
                    return 0  # answered and closed while the rest was still being sent

        status = await asyncio.to_thread(push)
    finally:
        deaf.stop()
    errors = await gateway.wait_for("gateway_error")
    assert status in {504, 0}
    assert errors[0]["message"].startswith("upstream registry did not answer in time"), errors
    assert MiB < metric(gateway, SPLICED, "up") < len(body)


async def test_an_upstream_that_stalls_mid_body_is_cut_off_by_read_timeout_while_others_are_served(
    registry: Registry, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    blob = await pushed(http, registry, "splice/stalls", 16 * MiB)
    with FaultyUpstream(registry.host_port) as faulty:
        gateway = gateway_factory(faulty.url, config={"upstream": {"read_timeout": 2}})
        faulty.arm(Fault.STALL_BODY, "/blobs/sha256:", after_bytes=4 * MiB)
        with Raw(gateway.port) as client:
            client.send("GET", f"/v2/splice/stalls/blobs/{sha256(blob)}")
            assert client.head()[0] == 200
            client.body(2 * MiB)
            assert probe(gateway) < 1.0  # while this download waits for its upstream
            received, closed = client.drained(10)
        assert closed and 2 * MiB + received < len(blob)
    expected = "upstream failed mid-body: upstream registry sent nothing for 2 s"
    await eventually(lambda: expected in aborted(gateway), f"{expected!r} logged", log=lambda: aborted(gateway))
    assert 0 < metric(gateway, SPLICED, "down") < len(blob)


async def test_an_upstream_that_dies_mid_body_cuts_the_download_off(gateway_factory: GatewayFactory) -> None:
    dying = DyingUpstream(16 * MiB, 4 * MiB)
    try:
        gateway = gateway_factory(dying.url)
        with Raw(gateway.port) as client:
            client.send("GET", f"/v2/splice/dies/blobs/sha256:{'0' * 64}")
            assert client.head()[0] == 200
            received, closed = client.drained(10)
    finally:
        dying.stop()
    assert closed and received == 4 * MiB
    expected = "upstream failed mid-body: upstream connection closed"
    await eventually(lambda: expected in aborted(gateway), f"{expected!r} logged", log=lambda: aborted(gateway))
    assert 0 < metric(gateway, SPLICED, "down") < 4 * MiB


async def test_no_descriptor_outlives_many_spliced_transfers(
    registry: Registry, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    blob = await pushed(http, registry, "splice/many", 2 * MiB)
    gateway = gateway_factory(registry)
    pid, baseline = await settled(gateway, registry, http)
    with Raw(gateway.port) as client:
        for _ in range(30):
            client.send("GET", f"/v2/splice/many/blobs/{sha256(blob)}")
            assert sha256(client.answer()[2]) == sha256(blob)
    for index in range(10):
        location = await start_upload(http, gateway.url, f"splice/many{index}")
        with Raw(gateway.port) as uploader:
            assert upload(uploader, "PUT", str(with_digest(location, sha256(blob)).raw_path_qs), blob)[0] == 201
    await freed(pid, registry.port, baseline)
    assert metric(gateway, SPLICED, "down") > 30 * MiB
    assert metric(gateway, SPLICED, "up") > 10 * MiB


async def test_sigterm_lets_spliced_transfers_in_flight_finish(
    registry: Registry, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    blob, upload_body = await pushed(http, registry, "splice/drain", 16 * MiB), os.urandom(8 * MiB)
    gateway = gateway_factory(registry, args=["--log-level", "info"])
    location = await start_upload(http, gateway.url, "splice/drain")
    with Raw(gateway.port, receive_buffer=64 * 1024) as reader, Raw(gateway.port) as writer:
        reader.send("GET", f"/v2/splice/drain/blobs/{sha256(blob)}")
        assert reader.head()[0] == 200
        first = reader.body(MiB)
        writer.sock.sendall(f"PATCH {location.raw_path_qs} HTTP/1.1\r\nHost: {writer.host}\r\n"
                            f"Content-Length: {len(upload_body)}\r\n\r\n".encode() + upload_body[: 4 * MiB])  # fmt: skip
        await asyncio.sleep(0.3)
        os.kill(gateway.process.pid, signal.SIGTERM)
        await gateway.wait_for("stopping")
        writer.sock.sendall(upload_body[4 * MiB:])
        status, headers = writer.head()
        rest = reader.body(len(blob) - MiB)
    assert sha256(first + rest) == sha256(blob)
    assert status == 202
    assert headers["range"] == f"0-{len(upload_body) - 1}"
    assert await asyncio.to_thread(gateway.process.wait, 30) == 0
    spliced = [line for line in gateway.events("request") if line["method"] in {"GET", "PATCH"}]
    assert sorted((line["method"], line["status"]) for line in spliced) == [("GET", 200), ("PATCH", 202)]


async def test_workers_splice_and_their_supervisor_sums_what_they_spliced(
    registry: Registry, gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    blob = os.urandom(4 * MiB)
    gateway = gateway_factory(registry, args=["--log-level", "info"], config={"server": {"workers": 2}})
    await gateway.wait_for("listening", 2)
    for index in range(4):  # new connections each: the kernel spreads them over the workers
        async with aiohttp.ClientSession() as session:
            assert (await push_single_put(session, gateway.url, f"splice/workers{index}", blob)).status == 201
            fetched = await call(session, "GET", f"{gateway.url}/v2/splice/workers{index}/blobs/{sha256(blob)}")
            assert sha256(fetched.body) == sha256(blob)
    assert 4 * (len(blob) - MiB) <= metric(gateway, SPLICED, "down") <= 4 * len(blob)
    assert 4 * (len(blob) - MiB) <= metric(gateway, SPLICED, "up") <= 4 * len(blob)


async def test_skopeo_pushes_and_pulls_an_image_whose_layers_are_spliced(
    registry: Registry, gateway_factory: GatewayFactory, skopeo_cache: Path, tmp_path: Path
) -> None:
    """A real client takes the `Connection: close` of each spliced upload in its stride."""
    image = build_image(1601, layer_sizes=(3 * MiB, 2 * MiB))
    gateway = gateway_factory(registry)
    pushed_image = skopeo_copy(f"dir:{write_dir(image, tmp_path / 'image')}", f"docker://{gateway.host_port}/splice/skopeo:1",
                               cache_dir=skopeo_cache)  # fmt: skip
    assert pushed_image.returncode == 0, pushed_image.stderr
    pulled = skopeo_copy(f"docker://{gateway.host_port}/splice/skopeo:1", f"dir:{tmp_path / 'pulled'}", cache_dir=skopeo_cache)
    assert pulled.returncode == 0, pulled.stderr
    for layer in image.layers:
        assert registry.links("splice/skopeo", layer.digest)
        assert sha256((tmp_path / "pulled" / layer.digest.split(":")[1]).read_bytes()) == layer.digest
    layers = sum(layer.size for layer in image.layers)
    assert layers - 2 * MiB <= metric(gateway, SPLICED, "up") <= layers
    assert layers - 2 * MiB <= metric(gateway, SPLICED, "down") <= layers


# proxy.splice on its own: two loopback TCP connections in this process, no HTTP


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server((HOST, 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    for sock in (near, far):
        sock.setblocking(False)
    return near, far


async def test_a_transfer_moves_exactly_its_count_through_a_small_pipe_to_a_sink_that_keeps_filling() -> None:
    (feeder, source), (sink, reader) = tcp_pair(), tcp_pair()
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    data, extra = os.urandom(3 * MiB + 123), b"next request"
    loop = asyncio.get_running_loop()
    sending = asyncio.ensure_future(loop.sock_sendall(feeder, data + extra))
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(data):
            received.extend(await loop.sock_recv(reader, 65536))

    reading = asyncio.ensure_future(read_all())
    with splice.Pipe(64 * 1024) as pipe:
        transfer = splice.Transfer(source.fileno(), sink.fileno(), pipe)
        await transfer.move(len(data), WaitDeadline(5), WaitDeadline(5))
    await asyncio.wait_for(asyncio.gather(sending, reading), 10)
    assert (transfer.delivered, bytes(received)) == (len(data), data)
    assert source.recv(100) == extra  # not a byte past the count was taken
    for sock in (feeder, source, sink, reader):
        sock.close()


async def test_a_source_closing_early_and_a_sink_not_reading_stop_the_transfer_with_what_was_delivered() -> None:
    loop = asyncio.get_running_loop()
    (feeder, source), (sink, reader) = tcp_pair(), tcp_pair()
    await loop.sock_sendall(feeder, os.urandom(100_000))
    feeder.close()
    with splice.Pipe() as pipe:
        transfer = splice.Transfer(source.fileno(), sink.fileno(), pipe)
        with pytest.raises(splice.SpliceStopped) as closed:
            await transfer.move(200_000, WaitDeadline(5), WaitDeadline(5))
    assert (closed.value.side, closed.value.reason, transfer.delivered) == ("source", "closed", 100_000)
    (feeder, source), size = tcp_pair(), 16 * MiB  # more than the sink's buffers take while nobody reads
    sending = asyncio.ensure_future(loop.sock_sendall(feeder, os.urandom(size)))
    with splice.Pipe() as pipe:
        transfer = splice.Transfer(source.fileno(), sink.fileno(), pipe)
        with pytest.raises(splice.SpliceStopped) as stalled:
            await asyncio.wait_for(transfer.move(size, WaitDeadline(5), WaitDeadline(0.3)), 10)
    assert (stalled.value.side, stalled.value.reason) == ("sink", "timeout")
    assert 0 < transfer.delivered < size
    sending.cancel()
    for sock in (feeder, source, sink, reader):
        sock.close()


def test_a_pipe_closes_both_ends_and_duplicates_close_on_exit_whatever_happened() -> None:
    with splice.Pipe() as pipe:
        ends = (pipe.read_fd, pipe.write_fd)
        assert pipe.size >= 64 * 1024
        with pytest.raises(ValueError), splice.duplicates(*ends) as copies:
            raise ValueError("a failed transfer")
        for fd in copies:
            with pytest.raises(OSError):
                os.fstat(fd)
    for fd in ends:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize(
    ("waits", "stopped"),
    [
        ([(1.0, 100), (1.5, 100)], True),  # 200 bytes in 2.5 s of waiting, under 100 B/s
        ([(1.0, 300), (1.5, 0)], False),  # 300 bytes in 2.5 s: over it
        ([(0.5, 0), (0.5, 0), (0.5, 0)], False),  # the window (2 s) is not over yet
        ([(2.5, 200), (2.5, 200)], True),  # a window that passed resets the count: the next one fails
    ],
)
def test_the_rate_floor_judges_each_window_of_waiting(waits: list[tuple[float, int]], stopped: bool) -> None:
    floor = RateFloor(100, 2.0)
    try:
        for waited, received in waits:
            floor.add(waited, received)
    except StreamAborted as aborted:
        assert stopped, aborted
        assert "(minimum 100 B/s)" in aborted.cause
    else:
        assert not stopped
