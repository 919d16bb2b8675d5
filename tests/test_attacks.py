"""Attacks by clients with pull or push access, each bounded (counts and seconds, loopback only), against a
gateway process in front of a real registry: stalled readers, trickling writers, a connection flood,
unfinished request heads, held manifest PUTs, and a small manifest whose config is 4 MiB pushed again
and again.

Throughout each attack a probe asks for /v2/ on a fresh connection every PROBE_INTERVAL seconds, as
another client would: at most 1 of 10 probes may fail or take longer than a second. The gateway's
VmRSS must stay within the stated budget, and once the attackers stop it must be back to normal: every
connection the attack held closed, the probe answering. Each test prints its figures (SECURITY.md
quotes them).

Attackers and the probe reach the gateway over loopback, which it trusts as a proxy by default: they
tell it who they are with X-Forwarded-For, as clients behind a load balancer are told apart.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import aiohttp
import pytest
from support.faulty import FaultyUpstream, open_fds, rss_bytes, sockets_to
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import build_image
from support.processes import ManagedProcess, free_port, require_binaries
from support.protocol import (
    call,
    digest_of,
    push_single_put,
    put_manifest,
    start_upload,
    teach,
)
from support.registry import Registry

MiB = 1024 * 1024
HOST = "127.0.0.1"
PROBE_INTERVAL = 0.2
PROBE_CLIENT = "198.51.100.7"
ATTACKER = "203.0.113.66"
# Figures for SECURITY.md, printed at the end of each test.
LIMITS = {
    "server": {
        "write_timeout": 3, "min_body_rate": 1024, "body_rate_window": 3, "idle_timeout": 10,
        "max_connections": 300, "manifest_memory": 16 * MiB,
    },
    "upstream": {"max_connections": 32, "max_connections_per_client": 16, "queue_timeout": 1},
}  # fmt: skip


@dataclass
class Watch:
    """The probe and the gateway's memory, sampled from a thread while an attack runs."""

    gateway: GatewayProcess
    probes: list[tuple[float, int]] = field(default_factory=list)  # (seconds, status)
    rss: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def probe(self) -> tuple[float, int]:
        started = time.monotonic()
        request = f"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {PROBE_CLIENT}\r\nConnection: close\r\n\r\n"
        answer = b""
        try:
            with socket.create_connection((HOST, self.gateway.port), timeout=5) as sock:
                sock.sendall(request.encode())
                while chunk := sock.recv(65536):
                    answer += chunk
        except OSError:
            pass
        status_line = answer.split(b"\r\n", 1)[0].split(b" ")
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
        return time.monotonic() - started, status

    def run(self) -> None:
        while not self._stop.is_set():
            self.probes.append(self.probe())
            self.rss.append(rss_bytes(self.gateway.process.pid))
            self._stop.wait(PROBE_INTERVAL)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    @property
    def bad(self) -> list[tuple[float, int]]:
        return [(seconds, status) for seconds, status in self.probes if status != 200 or seconds > 1.0]

    def assert_others_served(self) -> None:
        assert len(self.probes) >= 10, f"only {len(self.probes)} probes"
        assert len(self.bad) * 10 <= len(self.probes), f"{len(self.bad)} of {len(self.probes)} probes bad: {self.bad}"

    def summary(self, baseline_rss: int) -> str:
        slowest = max(seconds for seconds, _ in self.probes)
        return (f"probes {len(self.probes)}, {len(self.bad)} failed or over 1 s (slowest {slowest:.2f} s); "
                f"VmRSS {baseline_rss / MiB:.0f} MiB before, peak {max(self.rss) / MiB:.0f} MiB "
                f"(+{(max(self.rss) - baseline_rss) / MiB:.0f} MiB)")  # fmt: skip


async def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> float:
    """Seconds until `check()` holds; fails after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def recovered(gateway: GatewayProcess, baseline_fds: int, what: str) -> float:
    """Seconds until the gateway holds no more descriptors than before the attack (pooled upstream
    connections aside) and answers the probe."""
    pid = gateway.process.pid
    upstream_port = int(str(gateway.process.args[gateway.process.args.index("--upstream") + 1]).rsplit(":", 1)[1])
    seconds = await eventually(lambda: open_fds(pid) - sockets_to(pid, upstream_port) <= baseline_fds + 4,
                               f"{what}: gateway descriptors back to {baseline_fds} (now {open_fds(pid)})")  # fmt: skip
    watch = Watch(gateway)
    assert watch.probe()[1] == 200
    return seconds


def report(name: str, figures: str) -> None:
    print(f"\nATTACK {name}: {figures}", file=sys.stderr)


async def raw_connection(
    port: int, receive_buffer: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    return await asyncio.open_connection(sock=sock)


@dataclass(frozen=True)
class Outcome:
    status: int  # 0: no answer
    complete: bool  # the whole body announced came
    held: bool  # the gateway neither answered in full nor closed the connection within the time given


async def read_to_end(reader: asyncio.StreamReader, timeout: float) -> Outcome:
    """How one answer ended, read to the end of the connection."""
    head, received, held = b"", 0, False
    try:
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            while chunk := await reader.read(1024 * 1024):
                received += len(chunk)
    except TimeoutError:
        held = True
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    status = int(head.split(b" ")[1]) if head else 0
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), -1)  # fmt: skip
    return Outcome(status, received == length, held)


@pytest.fixture
def hardened(gateway_factory: GatewayFactory, registry: Registry) -> GatewayProcess:
    return gateway_factory(registry, config=LIMITS, args=["--log-level", "warning"])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def test_stalled_readers_are_cut_off_and_free_their_upstream_connections(
    hardened: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    """80 clients (more than the 32 upstream connections) GET a 32 MiB blob and stop reading."""
    blob = bytes(range(256)) * (32 * MiB // 256)
    assert (await push_single_put(http, registry.url, "attack/stall", blob)).status == 201
    pid, attackers = hardened.process.pid, 80
    baseline_rss, baseline_fds = rss_bytes(pid), open_fds(pid)
    request = (f"GET /v2/attack/stall/blobs/{digest_of(blob)} HTTP/1.1\r\nHost: x\r\n"
               f"X-Forwarded-For: {ATTACKER}\r\n\r\n").encode()  # fmt: skip
    with Watch(hardened) as watch:
        connections = [await raw_connection(hardened.port, receive_buffer=8192) for _ in range(attackers)]
        for _, writer in connections:
            writer.write(request)
        held_upstream = []
        for _ in range(30):  # 6 s of not reading: twice the write deadline
            await asyncio.sleep(0.2)
            held_upstream.append(sockets_to(pid, registry.port))
        outcomes = await asyncio.gather(*(read_to_end(reader, 30) for reader, _ in connections))
        for _, writer in connections:
            writer.close()
        recovery = await recovered(hardened, baseline_fds, "stalled readers")
    cut = [outcome for outcome in outcomes if outcome.status == 200 and not outcome.complete and not outcome.held]
    busy = [outcome for outcome in outcomes if outcome.status == 503]
    assert len(cut) + len(busy) == attackers, outcomes
    assert max(held_upstream) <= 32
    watch.assert_others_served()
    assert max(watch.rss) - baseline_rss < 64 * MiB
    report("stalled readers", f"{attackers} clients, {len(cut)} cut off after the 3 s write deadline, {len(busy)} "
           f"told 503 by the 16-per-client cap; upstream connections held at most {max(held_upstream)}; "
           f"{watch.summary(baseline_rss)}; recovered {recovery:.1f} s after")  # fmt: skip


async def trickle(port: int, head: bytes, seconds: int) -> float | None:
    """Send `head`, then a byte a second; returns when the gateway answered or closed, None if it never did."""
    reader, writer = await raw_connection(port)
    writer.write(head)
    started = time.monotonic()
    answered = asyncio.ensure_future(reader.read(65536))  # the first bytes of an answer, or the end
    try:
        for _ in range(seconds):
            done, _ = await asyncio.wait({answered}, timeout=1)
            if done:
                return time.monotonic() - started
            writer.write(b"x")
        return None
    finally:
        answered.cancel()
        writer.close()


async def test_trickling_writers_are_cut_off(hardened: GatewayProcess, http: aiohttp.ClientSession) -> None:
    """60 PATCHes that announce 1 MiB and send 1 byte a second (minimum rate 1 KiB/s over 3 s windows)."""
    pid, attackers = hardened.process.pid, 60
    baseline_rss, baseline_fds = rss_bytes(pid), open_fds(pid)
    locations = [await start_upload(http, hardened.url, "attack/trickle") for _ in range(attackers)]
    heads = [(f"PATCH {location.raw_path_qs} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {ATTACKER}\r\n"
              f"Content-Type: application/octet-stream\r\nContent-Length: {MiB}\r\n\r\n").encode()
             for location in locations]  # fmt: skip
    with Watch(hardened) as watch:
        ended = await asyncio.gather(*(trickle(hardened.port, head, 15) for head in heads))
        recovery = await recovered(hardened, baseline_fds, "trickling writers")
    held = [index for index, seconds in enumerate(ended) if seconds is None]
    assert held == [], f"{len(held)} trickling uploads still held after 15 s"
    watch.assert_others_served()
    assert max(watch.rss) - baseline_rss < 64 * MiB
    cut_after = max(seconds for seconds in ended if seconds is not None)
    report("trickling writers", f"{attackers} PATCHes at 1 B/s, the last cut off after {cut_after:.1f} s; "
           f"{watch.summary(baseline_rss)}; recovered {recovery:.1f} s after")  # fmt: skip


async def test_a_connection_flood_past_max_connections_leaves_room_for_others(hardened: GatewayProcess) -> None:
    """400 connections that send nothing, against server.max_connections 300: each new connection takes the
    place of the oldest idle one, so a client with a request is still served."""
    pid, attackers = hardened.process.pid, 400
    baseline_rss, baseline_fds = rss_bytes(pid), open_fds(pid)
    with Watch(hardened) as watch:
        connections = [await raw_connection(hardened.port) for _ in range(attackers)]
        await asyncio.sleep(3)
        held = open_fds(pid) - baseline_fds
        for _, writer in connections:
            writer.close()
        recovery = await recovered(hardened, baseline_fds, "connection flood")
    assert held <= 300 + 8, f"the gateway holds {held} connections, more than server.max_connections"
    watch.assert_others_served()
    assert max(watch.rss) - baseline_rss < 64 * MiB
    report("connection flood", f"{attackers} idle connections, {held} held (max_connections 300); "
           f"{watch.summary(baseline_rss)}; recovered {recovery:.1f} s after")  # fmt: skip


async def test_past_max_connections_with_every_connection_busy_the_answer_is_503(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    gateway = gateway_factory(registry, config={"server": {"max_connections": 20, "idle_timeout": 10}})
    locations = [await start_upload(http, gateway.url, "attack/busy") for _ in range(20)]
    connections = [await raw_connection(gateway.port) for _ in range(20)]
    for location, (_, writer) in zip(locations, connections, strict=True):
        writer.write(f"PATCH {location.raw_path_qs} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx".encode())
    await asyncio.sleep(1)
    async with aiohttp.ClientSession() as fresh:
        refused = await call(fresh, "GET", f"{gateway.url}/v2/")
    for _, writer in connections:
        writer.close()
    assert refused.status == 503, refused
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["errors"][0]["code"] == "UNAVAILABLE"
    await eventually(lambda: Watch(gateway).probe()[1] == 200, "the gateway answering once the uploads went away")


async def test_many_unfinished_request_heads_cost_bounded_memory(hardened: GatewayProcess) -> None:
    """200 connections each send 60 KiB of headers (just under server.max_head_size) and never finish."""
    pid, attackers = hardened.process.pid, 200
    baseline_rss, baseline_fds = rss_bytes(pid), open_fds(pid)
    head = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 8000) for i in range(7))
    with Watch(hardened) as watch:
        connections = [await raw_connection(hardened.port) for _ in range(attackers)]
        for _, writer in connections:
            writer.write(head)
        await asyncio.sleep(3)
        too_long_reader, too_long_writer = await raw_connection(hardened.port)
        too_long_writer.write(head * 2)
        too_long = await read_to_end(too_long_reader, 10)
        too_long_writer.close()
        for _, writer in connections:
            writer.close()
        recovery = await recovered(hardened, baseline_fds, "unfinished heads")
    assert too_long.status in {431, 0} and not too_long.held, too_long  # 431, or reset: closed before reading it all
    watch.assert_others_served()
    assert max(watch.rss) - baseline_rss < 64 * MiB
    report("unfinished request heads", f"{attackers} heads of {len(head) // 1024} KiB left unfinished; "
           f"{watch.summary(baseline_rss)}; recovered {recovery:.1f} s after")  # fmt: skip


async def test_held_manifest_puts_are_bounded_by_the_memory_budget(
    hardened: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    """40 manifest PUTs announce 4 MiB, send all but one byte and hold (server.manifest_memory 16 MiB)."""
    pid, attackers = hardened.process.pid, 40
    baseline_rss, baseline_fds = rss_bytes(pid), open_fds(pid)
    body = b"{" + b" " * (4 * MiB - 2)
    head = (f"PUT /v2/attack/manifest/manifests/held HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {ATTACKER}\r\n"
            f"Content-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {len(body) + 1}\r\n\r\n")
    with Watch(hardened) as watch:
        connections = [await raw_connection(hardened.port) for _ in range(attackers)]
        for _, writer in connections:
            writer.write(head.encode() + body)
        await asyncio.sleep(3)
        during = await put_manifest(http, hardened.url, "attack/manifest", "during", b"{}",
                                    "application/vnd.oci.image.manifest.v1+json")  # fmt: skip
        outcomes = await asyncio.gather(*(read_to_end(reader, 1) for reader, _ in connections))
        for _, writer in connections:
            writer.close()
        recovery = await recovered(hardened, baseline_fds, "held manifest PUTs")
        after = await put_manifest(http, hardened.url, "attack/manifest", "after", b"{}",
                                   "application/vnd.oci.image.manifest.v1+json")  # fmt: skip
    # Told 503 at once (aiohttp then discards what else comes, for up to 10 s, before closing: a lingering
    # close, so that the client reads the answer); the budget holds the other four.
    refused = [outcome for outcome in outcomes if outcome.status == 503]
    assert len(refused) >= attackers - 4, outcomes
    assert during.status == 503 and during.headers["Retry-After"] == "1", during
    assert "Docker-Distribution-Api-Version" in after.headers, after  # the registry's own answer: budget free again
    watch.assert_others_served()
    assert max(watch.rss) - baseline_rss < 96 * MiB
    report("held manifest PUTs", f"{attackers} PUTs of 4 MiB held, {len(refused)} refused (16 MiB budget); "
           f"{watch.summary(baseline_rss)}; recovered {recovery:.1f} s after")  # fmt: skip


def big_config_image(index: int, diff_id: str) -> tuple[bytes, bytes, bytes]:
    """(manifest, config, layer): a manifest of under 500 bytes whose config is 4 MiB of JSON."""
    layer = b"layer %d" % index
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                         "comment": "c" * (4 * MiB - 200)}).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": digest_of(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": digest_of(layer),
                    "size": len(layer)}],
    }, separators=(",", ":")).encode()  # fmt: skip
    return manifest, config, layer


async def test_a_small_manifest_with_a_4_mib_config_pushed_repeatedly_is_read_once(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    """The config's diff_ids are cached by digest: 30 pushes of the manifest fetch the config once; the
    4 MiB parse happens off the event loop, so the probe is answered meanwhile."""
    with FaultyUpstream(registry.host_port) as recorder:
        gateway = gateway_factory(recorder.url, config=LIMITS, args=["--log-level", "warning"])
        await teach(http, gateway.url, "attack/base", build_image(70, foreign=1, os="windows"))  # knows diff_ids now
        manifest, config, layer = big_config_image(1, digest_of(b"layer 1"))
        for blob in (config, layer):
            assert (await push_single_put(http, registry.url, "attack/config", blob)).status == 201
        pid, pushes = gateway.process.pid, 30
        baseline_rss = rss_bytes(pid)
        with Watch(gateway) as watch:
            answers = await asyncio.gather(*(
                put_manifest(http, gateway.url, "attack/config", f"t{index}", manifest,
                             "application/vnd.docker.distribution.manifest.v2+json")
                for index in range(pushes)
            ))  # fmt: skip
            await asyncio.sleep(2.5)
        fetched = [line for line in recorder.request_lines if digest_of(config).encode() in line]
    assert [answer.status for answer in answers] == [201] * pushes, answers[0]
    assert len(manifest) < 500
    assert 1 <= len(fetched) <= 2, fetched  # two pushes may miss the cache together before it is filled
    watch.assert_others_served()
    assert max(watch.rss) - baseline_rss < 96 * MiB
    report("4 MiB config behind a small manifest", f"{pushes} concurrent pushes of a {len(manifest)}-byte "
           f"manifest, config fetched {len(fetched)} time(s); {watch.summary(baseline_rss)}")  # fmt: skip


def test_the_open_file_limit_is_raised_to_the_hard_limit(registry: Registry, tmp_path: Path) -> None:
    """Started with a soft limit of 256 open files, the gateway raises it to the hard limit."""
    require_binaries("prlimit")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard RLIMIT_NOFILE is only {hard}")
    port = free_port()
    process = ManagedProcess(
        ["prlimit", "--nofile=256:", "--", sys.executable, "-m", "proxy", "serve", "--upstream", registry.url,
         "--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{free_port()}", "--store", "memory://"],
        log_path=tmp_path / "gateway.log",
    )  # fmt: skip
    with process:
        process.wait_for_port(HOST, port)
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        sockets = []
        try:
            for _ in range(400):  # more than the soft limit it was started with
                sockets.append(socket.create_connection((HOST, port), timeout=5))
            with socket.create_connection((HOST, port), timeout=5) as probe:
                probe.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = probe.recv(100)
        finally:
            for sock in sockets:
                sock.close()
    soft_now = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3]
    assert int(soft_now) == hard, limits
    assert answer.startswith(b"HTTP/1.1 200"), answer



def many_layers_manifest(index: int, layers: int = 20_000) -> bytes:
    """A manifest of about 3 MiB listing `layers` layers. Sent as an OCI manifest, which its docker media
    type contradicts, the registry refuses it at once, without looking for 20,000 blobs."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": digest_of(b"config %d" % index), "size": 10},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "digest": digest_of(b"%d %d" % (index, layer)), "size": layer + 1} for layer in range(layers)],
    }).encode()  # fmt: skip


async def test_large_manifests_are_parsed_without_stalling_others(
    hardened: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    """16 pushes of distinct 3 MiB manifests (20,000 layers each, about 0.7 s to parse here), four at a time
    (the 16 MiB budget): the parsing happens in worker threads, so the probe is still answered."""
    pid, pushes = hardened.process.pid, 16
    bodies = [many_layers_manifest(index) for index in range(pushes)]
    baseline_rss, baseline_fds = rss_bytes(pid), open_fds(pid)
    with Watch(hardened) as watch:
        answers = []
        for batch in range(0, pushes, 4):
            answers += await asyncio.gather(*(
                put_manifest(http, hardened.url, "attack/large", f"t{index}", bodies[index],
                             "application/vnd.oci.image.manifest.v1+json")
                for index in range(batch, batch + 4)
            ))  # fmt: skip
        recovery = await recovered(hardened, baseline_fds, "large manifests")
    assert all("Docker-Distribution-Api-Version" in answer.headers for answer in answers), answers[0]  # registry's
    watch.assert_others_served()
    assert max(watch.rss) - baseline_rss < 160 * MiB
    report("large manifests", f"{pushes} pushes of {len(bodies[0]) // MiB} MiB manifests with 20,000 layers; "
           f"{watch.summary(baseline_rss)}; recovered {recovery:.1f} s after")  # fmt: skip
