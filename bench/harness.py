"""What the benchmarks share: the three targets on loopback, a lean HTTP client, wrk, and /proc readings.

The registry, the gateway and the process handling are the test suite's own (`bench/support` is a
link to `tests/support`): the benchmark runs exactly what the tests run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self
from urllib.parse import urlsplit

import yaml
from support.gateway import GatewayProcess
from support.processes import ManagedProcess, free_port
from support.registry import Registry
from support.services import ConfiguredHaproxy

HOST = "127.0.0.1"
MIB = 1024 * 1024
GIB = 1024 * MIB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RECV_BYTES = 1 * MIB
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class BenchError(RuntimeError):
    """A target answered something a registry should not have: the figures would mean nothing."""


# /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_kib(pid: int, name: str) -> int:
    """A `kB` line of /proc/PID/status, e.g. VmRSS or VmHWM."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise KeyError(name)


def rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int) -> float:
    return status_kib(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux: `echo 5 > /proc/PID/clear_refs`)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def system_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def own_seconds() -> float:
    """CPU time of this process and of the children it waited for (wrk, py-spy)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


class CpuMeter:
    """CPU seconds a set of processes used between `start()` and `stop()`."""

    def __init__(self, pids: Sequence[int]):
        self.pids = tuple(pids)
        self._started = 0.0
        self.seconds = 0.0

    def _total(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def start(self) -> None:
        self._started = self._total()

    def stop(self) -> float:
        self.seconds = self._total() - self._started
        return self.seconds


# The machine


def command_version(args: Sequence[str]) -> str:
    try:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not found"
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    import aiohttp

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "registry": command_version(["docker-registry", "--version"]),
        "nginx": command_version(["nginx", "-v"]),
        "haproxy": command_version(["haproxy", "-v"]).split(" - ")[0],
        "wrk": command_version(["wrk", "-v"]).split(" Copyright")[0],
    }


def scratch_dir(needed_bytes: int) -> tuple[Path, str]:
    """A work folder on tmpfs (/dev/shm) when it has room, so that disk speed does not enter the figures."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > needed_bytes + 2 * GIB:
        return Path(tempfile.mkdtemp(prefix="flp-bench-", dir=shm)), "tmpfs (/dev/shm)"
    return Path(tempfile.mkdtemp(prefix="flp-bench-")), "disk (not enough room on /dev/shm)"


# A lean HTTP/1.1 client: blocking sockets, bodies sent with sendfile(2) and received into one buffer


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    body_length: int

    def text(self) -> str:
        return self.body[:2000].decode(errors="replace")


class HttpConnection:
    """One keep-alive connection (a new one after an answer with `Connection: close`, as clients do).
    Efficient enough that the client is never the bottleneck: request bodies go from a (tmpfs) file to
    the socket by sendfile, response bodies that are not needed are received into one reused buffer
    and only counted."""

    def __init__(self, host_port: str, timeout: float = 600.0):
        self.host_port = host_port
        self.timeout = timeout
        self.sock = self._connect()
        self.reconnects = 0
        self._closing = False
        self._pending = bytearray()
        self._scratch = bytearray(RECV_BYTES)

    def _connect(self) -> socket.socket:
        host, _, port = self.host_port.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def request(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        body_file: tuple[IO[bytes], int, int] | None = None,
        keep_body: bool = True,
    ) -> Response:
        """`body_file` is (file, offset, count), sent with sendfile; `keep_body=False` only counts the answer's body."""
        if self._closing:
            self.sock.close()
            self.sock, self._closing, self._pending = self._connect(), False, bytearray()
            self.reconnects += 1
        length = body_file[2] if body_file is not None else len(body)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_port}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if length or method in {"POST", "PUT", "PATCH"}:
            lines.append(f"Content-Length: {length}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if body_file is None:
            self.sock.sendall(head + body)
        else:
            self.sock.sendall(head)
            file, offset, count = body_file
            sent = self.sock.sendfile(file, offset, count)
            if sent != count:
                raise BenchError(f"sendfile sent {sent} of {count} bytes")
        return self._read_response(method, keep_body)

    # Response parsing

    def _fill(self) -> None:
        received = self.sock.recv_into(self._scratch)
        if received == 0:
            raise BenchError(f"{self.host_port} closed the connection")
        self._pending += memoryview(self._scratch)[:received]

    def _read_line(self) -> bytes:
        while (end := self._pending.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._pending[:end])
        del self._pending[: end + 2]
        return line

    def _read_exact(self, count: int, keep: bool) -> bytes:
        """`count` bytes; when not kept, received straight into the scratch buffer and dropped."""
        kept = bytearray()
        take = min(count, len(self._pending))
        if keep:
            kept += self._pending[:take]
        del self._pending[:take]
        remaining = count - take
        view = memoryview(self._scratch)
        while remaining:
            received = self.sock.recv_into(view, min(remaining, RECV_BYTES))
            if received == 0:
                raise BenchError(f"{self.host_port} closed the connection mid-body")
            if keep:
                kept += view[:received]
            remaining -= received
        return bytes(kept)

    def _read_response(self, method: str, keep_body: bool) -> Response:
        while True:
            status_line = self._read_line().decode("latin-1")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise BenchError(f"{self.host_port}: not an HTTP response: {status_line[:200]!r}")
            status = int(parts[1])
            headers: dict[str, str] = {}
            while line := self._read_line():
                name, _, value = line.decode("latin-1").partition(":")
                key = name.strip().lower()
                headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
            if status != 100:
                break
        self._closing = "close" in headers.get("connection", "").lower()
        if method == "HEAD" or status in {204, 304}:
            return Response(status, headers, b"", 0)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            total = 0
            while size := int(self._read_line().split(b";")[0], 16):
                chunk = self._read_exact(size, keep_body)
                total += size
                body += chunk
                self._read_line()
            while self._read_line():
                pass
            return Response(status, headers, bytes(body), total)
        if "content-length" in headers:
            length = int(headers["content-length"])
            return Response(status, headers, self._read_exact(length, keep_body), length)
        raise BenchError(f"{self.host_port}: response without a length to {method}")


# Registry API operations (all checked: a wrong answer stops the benchmark)


@dataclass(frozen=True)
class Blob:
    """A blob as a (tmpfs) file, possibly only its first `size` bytes."""

    path: Path
    size: int
    digest: str

    @classmethod
    def create(cls, path: Path, size: int, prefixes: Sequence[int] = ()) -> tuple[Blob, dict[int, str]]:
        """Random bytes; also returns the digests of the given prefix sizes."""
        hasher = hashlib.sha256()
        prefix_hashers = {prefix: hashlib.sha256() for prefix in prefixes}
        written = 0
        with path.open("wb") as file:
            while written < size:
                piece = os.urandom(min(16 * MIB, size - written))
                file.write(piece)
                hasher.update(piece)
                for prefix, prefix_hasher in prefix_hashers.items():
                    if written < prefix:
                        prefix_hasher.update(piece[: prefix - written])
                written += len(piece)
        digests = {prefix: "sha256:" + prefix_hasher.hexdigest() for prefix, prefix_hasher in prefix_hashers.items()}
        return cls(path, size, "sha256:" + hasher.hexdigest()), digests

    def prefix(self, size: int, digest: str) -> Blob:
        return Blob(self.path, size, digest)


def expect(response: Response, status: int, what: str) -> Response:
    if response.status != status:
        raise BenchError(f"{what}: expected {status}, got {response.status}: {response.text()}")
    return response


def location_target(connection: HttpConnection, response: Response) -> str:
    """The path and query of a Location; an absolute one must point back at the target that answered."""
    location = response.headers.get("location")
    if not location:
        raise BenchError(f"no Location in a {response.status} answer")
    parts = urlsplit(location)
    if parts.netloc and parts.netloc != connection.host_port:
        raise BenchError(f"Location {location} leads away from {connection.host_port}")
    return parts.path + (f"?{parts.query}" if parts.query else "")


def with_query(target: str, name: str, value: str) -> str:
    return f"{target}{'&' if '?' in target else '?'}{name}={value}"


def start_upload(connection: HttpConnection, repository: str) -> str:
    response = connection.request("POST", f"/v2/{repository}/blobs/uploads/")
    return location_target(connection, expect(response, 202, "upload start"))


def upload_monolithic(connection: HttpConnection, repository: str, blob: Blob) -> None:
    """POST, then one PUT carrying the whole blob."""
    target = start_upload(connection, repository)
    with blob.path.open("rb") as file:
        response = connection.request(
            "PUT",
            with_query(target, "digest", blob.digest),
            {"Content-Type": "application/octet-stream"},
            body_file=(file, 0, blob.size),
        )
    expect(response, 201, "upload PUT")


def upload_chunked(connection: HttpConnection, repository: str, blob: Blob, chunk: int) -> None:
    """POST, PATCHes of `chunk` bytes with Content-Range, then an empty PUT."""
    target = start_upload(connection, repository)
    with blob.path.open("rb") as file:
        for offset in range(0, blob.size, chunk):
            count = min(chunk, blob.size - offset)
            headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{offset + count - 1}"}
            response = connection.request("PATCH", target, headers, body_file=(file, offset, count))
            target = location_target(connection, expect(response, 202, "upload PATCH"))
    expect(connection.request("PUT", with_query(target, "digest", blob.digest)), 201, "upload final PUT")


def download(connection: HttpConnection, repository: str, digest: str, size: int) -> None:
    response = connection.request("GET", f"/v2/{repository}/blobs/{digest}", keep_body=False)
    expect(response, 200, "blob GET")
    if response.body_length != size:
        raise BenchError(f"blob GET: {response.body_length} bytes instead of {size}")


def put_blob_bytes(connection: HttpConnection, repository: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    target = start_upload(connection, repository)
    response = connection.request(
        "PUT", with_query(target, "digest", digest), {"Content-Type": "application/octet-stream"}, data
    )
    expect(response, 201, "small blob PUT")
    return digest


def push_manifests(host_port: str, repository: str, count: int, threads: int = 8) -> tuple[list[str], str]:
    """`count` distinct small OCI image manifests sharing one config and one layer, pushed by digest.

    Returns the manifest digests and the layer's digest.
    """
    with HttpConnection(host_port) as connection:
        layer = os.urandom(2048)
        layer_digest = put_blob_bytes(connection, repository, layer)
        diff_id = "sha256:" + hashlib.sha256(b"bench-layer").hexdigest()
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
        ).encode()
        config_digest = put_blob_bytes(connection, repository, config)

    def manifest(index: int) -> bytes:
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
                "annotations": {"org.example.bench.index": str(index)},
            }
        ).encode()

    def push(start: int) -> list[tuple[int, str]]:
        pushed = []
        with HttpConnection(host_port) as connection:
            for index in range(start, count, threads):
                body = manifest(index)
                digest = "sha256:" + hashlib.sha256(body).hexdigest()
                response = connection.request(
                    "PUT", f"/v2/{repository}/manifests/{digest}", {"Content-Type": OCI_MANIFEST}, body
                )
                expect(response, 201, "manifest PUT")
                pushed.append((index, digest))
        return pushed

    with ThreadPoolExecutor(threads) as pool:
        ordered = sorted(pair for pairs in pool.map(push, range(threads)) for pair in pairs)
    digests = [digest for _, digest in ordered]
    return digests, layer_digest


def run_parallel(count: int, work: Callable[[int], None]) -> float:
    """Run `work(index)` in `count` threads started together; returns the wall time until all are done."""
    barrier = threading.Barrier(count + 1)

    def body(index: int) -> None:
        barrier.wait()
        work(index)

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(body, index) for index in range(count)]
        barrier.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        return time.perf_counter() - started


# wrk

WRK_SCRIPT = r"""
-- Requests read from a file, one "METHOD PATH" per line, sent round-robin.
local requests = {}
local index = 0

function init(args)
  for line in io.lines(args[1]) do
    local method, path = line:match("^(%S+) (%S+)$")
    requests[#requests + 1] = wrk.format(method, path)
  end
  index = math.random(#requests) - 1
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, '
    .. '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, '
    .. '"mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout, latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


class Wrk:
    """Debian's wrk with one thread (the machine has two cores to share with the targets)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.script = workdir / "requests.lua"
        self.script.write_text(WRK_SCRIPT)
        self._lists = 0

    def request_list(self, requests: Sequence[tuple[str, str]]) -> Path:
        self._lists += 1
        path = self.workdir / f"requests-{self._lists}.txt"
        path.write_text("".join(f"{method} {target}\n" for method, target in requests))
        return path

    def run(
        self, host_port: str, requests: Path, connections: int, seconds: int, headers: Mapping[str, str]
    ) -> WrkResult:
        args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(self.script)]
        for name, value in headers.items():
            args += ["-H", f"{name}: {value}"]
        args += [f"http://{host_port}/", "--", str(requests)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=False)
        found = re.search(r"^WRK_RESULT (\{.*\})$", result.stdout, re.MULTILINE)
        if result.returncode != 0 or found is None:
            raise BenchError(f"wrk failed ({result.returncode}): {result.stdout[-2000:]} {result.stderr[-2000:]}")
        data = json.loads(found.group(1))
        errors = sum(data[key] for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
        if errors:
            raise BenchError(f"wrk against {host_port}: {errors} failed requests ({data})\n{result.stdout}")
        return WrkResult(
            requests=data["requests"],
            seconds=data["duration_us"] / 1e6,
            p50_ms=data["p50_us"] / 1000,
            p99_ms=data["p99_us"] / 1000,
            mean_ms=data["mean_us"] / 1000,
            errors=errors,
        )


# The three targets


def start_registry(workdir: Path) -> Registry:
    """The test suite's registry, with its per-request access log off and the usual in-memory blob
    descriptor cache on (as in Debian's default config), so that it is as fast as it gets."""
    registry = Registry(workdir)
    document = yaml.safe_load(registry.config_path.read_text())
    document.setdefault("log", {})["accesslog"] = {"disabled": True}
    document["storage"]["cache"] = {"blobdescriptor": "inmemory"}
    registry.config_path.write_text(yaml.safe_dump(document))
    registry.start()
    return registry


NGINX_CONFIG = """\
{user}worker_processes {workers};
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
{http}
}}
"""

PROXY_SITE = """\
    upstream registry {{
        server {upstream};
{keepalive}    }}
    server {{
        listen {listen};
        client_max_body_size 0;
        location / {{
            proxy_pass http://registry;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
{tuning}        }}
    }}"""

# The gateway's own choices: 128 KiB reads either way, nothing buffered, HTTP/1.1 keep-alive upstream.
TUNED = """\
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            client_body_buffer_size 128k;
            proxy_buffer_size 128k;
            proxy_buffers 4 128k;
"""


class Nginx:
    """nginx as a reference proxy, `tuned` (the gateway's buffer sizes and choices, see TUNED) or with its
    stock settings (request and response buffering on, 4/8 KiB buffers, HTTP/1.0 without keep-alive
    upstream); `site` replaces the proxy server block (the static upstream)."""

    def __init__(self, workdir: Path, upstream: str = "", *, tuned: bool = True, workers: int = 1, site: str = ""):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""
        listen = f"{HOST}:{self.port}"
        http = site.replace("{listen}", listen) if site else PROXY_SITE.format(
            upstream=upstream, listen=listen, keepalive="        keepalive 64;\n" if tuned else "",
            tuning=TUNED if tuned else "",
        )  # fmt: skip
        self.config_path.write_text(NGINX_CONFIG.format(user=user, workers=workers, workdir=workdir, http=http))
        self.process = ManagedProcess(
            ["nginx", "-c", self.config_path, "-p", workdir, "-e", workdir / "nginx-error.log"],
            log_path=workdir / "nginx.log",
        )

    @property
    def host_port(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> Self:
        self.process.start()
        self.process.wait_for_port(HOST, self.port)
        return self

    @property
    def worker_pids(self) -> tuple[int, ...]:
        return tuple(children_of(self.process.pid))

    @property
    def worker_pid(self) -> int:
        """The worker of a one-worker nginx."""
        workers = self.worker_pids
        if len(workers) != 1:
            raise BenchError(f"expected one nginx worker, found {workers}")
        return workers[0]

    def stop(self) -> None:
        self.process.stop()


HAPROXY_CONFIG = """\
global
    maxconn 8192

defaults
    mode http
    option forwardfor
    timeout connect 5s
    timeout client 600s
    timeout server 600s

frontend bench
    bind {listen}
    default_backend registry

backend registry
    server registry {upstream}
"""


def start_haproxy(workdir: Path, upstream: str) -> ConfiguredHaproxy:
    """haproxy in http mode with its defaults: keep-alive both ways, connections to the upstream reused."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return ConfiguredHaproxy(workdir, HAPROXY_CONFIG.format(listen=f"{HOST}:{port}", upstream=upstream), port).start()


def start_gateway(
    workdir: Path,
    upstream: str,
    store: str = "memory://",
    config: Mapping[str, Any] | None = None,
    args: Sequence[str] = (),
) -> tuple[GatewayProcess, float]:
    """The gateway as users run it (`python -m proxy serve`, log settings as shipped unless `args` say
    otherwise); also returns how long it took until every worker accepted connections."""
    workdir.mkdir(parents=True, exist_ok=True)
    gateway = GatewayProcess(workdir, upstream, args=args, store=store, config=config)
    started = time.perf_counter()
    gateway.process.start()
    try:
        # It listens once its known set is loaded: a million digests take seconds, more on a busy machine.
        gateway.process.wait_for_port(HOST, gateway.port, timeout=120)
        if int((config or {}).get("server", {}).get("workers", 1)) > 1:
            gateway.process.wait_until(lambda: ready(gateway.admin_port), timeout=30, what="every worker running")
    except (RuntimeError, TimeoutError):
        gateway.stop()  # not left behind when it never came up
        raise
    return gateway, time.perf_counter() - started


def ready(admin_port: int) -> bool:
    """/readyz answers 200: with workers, the supervisor says so once every worker runs."""
    try:
        with HttpConnection(f"{HOST}:{admin_port}", timeout=5) as connection:
            return connection.request("GET", "/readyz").status == 200
    except (OSError, BenchError):
        return False


def event_loop_of(pid: int) -> str:
    """uvloop when the gateway process has it loaded (the `speed` extra), else asyncio's own loop."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    return "uvloop" if "/uvloop/" in maps else "asyncio"


def process_tree(pid: int) -> tuple[int, ...]:
    """A process and its children: nginx's master and workers, the gateway's supervisor and workers."""
    return (pid, *children_of(pid))


@dataclass
class Target:
    name: str
    host_port: str
    pids: tuple[int, ...] = ()

    def cpu(self) -> CpuMeter:
        return CpuMeter(self.pids)


class Running(Protocol):
    process: ManagedProcess

    def stop(self) -> object: ...


# The static upstream: nginx answering like a registry itself, so that a proxy in front shows its own cost.
EMPTY_BLOB = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
STATIC_MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + "1" * 64, "size": 1469},
        "layers": [
            {"mediaType": OCI_LAYER, "digest": "sha256:" + f"{n}" * 64, "size": 3_000_000 * n} for n in range(2, 5)
        ],
    },
    indent=3,
)
STATIC_MANIFEST_DIGEST = "sha256:" + hashlib.sha256(STATIC_MANIFEST.encode()).hexdigest()
STATIC_SITE = f"""\
    server {{
        listen {{listen}};
        location = /v2/ {{
            add_header Docker-Distribution-Api-Version registry/2.0 always;
            default_type application/json;
            return 200 '{{}}';
        }}
        location ~ ^/v2/.+/manifests/ {{
            add_header Docker-Distribution-Api-Version registry/2.0 always;
            default_type {OCI_MANIFEST};
            add_header Docker-Content-Digest {STATIC_MANIFEST_DIGEST};
            add_header Etag '"{STATIC_MANIFEST_DIGEST}"';
            return 200 '{STATIC_MANIFEST}';
        }}
        location ~ ^/v2/.+/blobs/{EMPTY_BLOB}$ {{
            add_header Docker-Distribution-Api-Version registry/2.0 always;
            default_type application/octet-stream;
            add_header Docker-Content-Digest {EMPTY_BLOB};
            add_header Accept-Ranges bytes;
            add_header Cache-Control "max-age=31536000";
            add_header Etag '"{EMPTY_BLOB}"';
            return 200 '';
        }}
        location ~ ^/v2/.+/blobs/ {{
            add_header Docker-Distribution-Api-Version registry/2.0 always;
            default_type application/json;
            return 404 '{{"errors":[{{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}}]}}';
        }}
        location / {{
            add_header Docker-Distribution-Api-Version registry/2.0 always;
            default_type application/json;
            return 200 '{{}}';
        }}
    }}"""


def static_upstream(workdir: Path) -> tuple[Nginx, str]:
    """nginx answering like a registry itself (STATIC_SITE), and its URL."""
    static = Nginx(workdir, site=STATIC_SITE).start()
    return static, f"http://{static.host_port}"


def gateway_cpu(pid: int) -> float:
    """CPU seconds of a gateway: the process and, with workers, every worker."""
    return sum(cpu_seconds(process) for process in process_tree(pid))


@dataclass
class Services:
    """The registry and the proxies in front of it (or of the static upstream); stopped (and their
    files removed) on exit."""

    workdir: Path
    storage: str
    registry: Registry | None = None
    # Tuned nginx in front of the registry (`with_nginx`), or one a script put here; stopped with the rest.
    nginx: Nginx | None = None
    started: list[Running] = field(default_factory=list)
    _static: str | None = None
    # The command line and event loop of the first gateway started, for the record.
    first_gateway: tuple[str, str] = ("(no gateway started)", "unknown")

    @classmethod
    @contextlib.contextmanager
    def running(cls, needed_bytes: int, with_nginx: bool = False, with_registry: bool = True) -> Iterator[Services]:
        workdir, storage = scratch_dir(needed_bytes)
        services = cls(workdir, storage)
        try:
            if with_registry:
                services.registry = start_registry(workdir / "registry")
                services.started.append(services.registry)
                if with_nginx:
                    services.nginx = Nginx(workdir / "nginx", services.registry.host_port).start()
            yield services
        finally:
            for running in reversed(services.started):
                running.stop()
            if services.nginx is not None:
                services.nginx.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    @property
    def registry_url(self) -> str:
        assert self.registry is not None
        return self.registry.url

    def static_upstream(self) -> str:
        """The static upstream's URL (started on first use): one nginx worker, no proxying."""
        if self._static is None:
            static, self._static = static_upstream(self.workdir / "static")
            self.started.append(static)
        return self._static

    def stop(self, running: Running) -> None:
        running.stop()
        self.started.remove(running)

    def gateway(
        self,
        name: str,
        store: str = "memory://",
        config: Mapping[str, Any] | None = None,
        *,
        upstream: str | None = None,
        args: Sequence[str] = (),
    ) -> tuple[GatewayProcess, float]:
        gateway, startup = start_gateway(self.workdir / name, upstream or self.registry_url, store, config, args)
        self.started.append(gateway)
        if not any(isinstance(running, GatewayProcess) for running in self.started[:-1]) and self.first_gateway[1] == "unknown":
            self.first_gateway = (" ".join(["python", *gateway.process.args[1:]]), event_loop_of(gateway.process.pid))
        return gateway, startup

    def gateway_target(self, name: str, gateway: GatewayProcess) -> Target:
        return Target(name, gateway.host_port, process_tree(gateway.process.pid))

    def peer(self, name: str, upstream: str | None = None, workers: int = 1) -> Target:
        """A reference proxy in front of the registry (or `upstream`): nginx-default, nginx (tuned) or haproxy."""
        upstream_host_port = urlsplit(upstream or self.registry_url).netloc
        if name == "haproxy":
            haproxy = start_haproxy(self.workdir / f"{name}-{free_port()}", upstream_host_port)
            self.started.append(haproxy)
            return Target(name, haproxy.host_port, (haproxy.process.pid,))
        nginx = Nginx(self.workdir / f"{name}-{free_port()}", upstream_host_port, tuned=name == "nginx", workers=workers)
        self.started.append(nginx.start())
        return Target(name, nginx.host_port, nginx.worker_pids)

    def pids(self) -> list[int]:
        """The benchmark's own long-running processes (registry, proxies and their workers, gateways)."""
        return [pid for running in self.started if running.process.running for pid in process_tree(running.process.pid)]


class ForeignLoad:
    """How much CPU processes other than the benchmark's took while it ran: on a shared machine,
    figures measured while others were busy are not worth much."""

    def __init__(self, services: Services):
        self.services = services
        self._started = (0.0, 0.0, 0.0, 0.0)

    def _reading(self) -> tuple[float, float, float, float]:
        ours = sum(cpu_seconds(pid) for pid in self.services.pids()) + own_seconds()
        return time.monotonic(), system_busy_seconds(), ours, os.getloadavg()[0]

    def start(self) -> None:
        self._started = self._reading()

    def stop(self) -> dict[str, float]:
        now, busy, ours, load = self._reading()
        wall = now - self._started[0]
        others = max(0.0, (busy - self._started[1]) - (ours - self._started[2]))
        cores = os.cpu_count() or 1
        return {
            "wall_s": round(wall, 1),
            "others_cpu_s": round(others, 1),
            "others_share_of_machine": round(others / (wall * cores), 3) if wall else 0.0,
            "loadavg_1min_end": round(load, 2),
        }


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
