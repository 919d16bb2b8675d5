"""Benchmark: the gateway against the registry itself, nginx (stock and tuned) and haproxy, on loopback, in one run.

    .venv/bin/python bench/run.py            # full run (about 13 minutes on 2 idle cores), writes bench/results/latest.json
    .venv/bin/python bench/run.py --quick    # smoke run (about 2 minutes), writes bench/results/quick.json
    .venv/bin/python bench/run.py --phases capacity,known   # some phases only

See bench/README.md for what each figure is and the latest results.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    EMPTY_BLOB,
    GIB,
    MIB,
    OCI_MANIFEST,
    BenchError,
    Blob,
    CpuMeter,
    ForeignLoad,
    HttpConnection,
    Services,
    Target,
    Wrk,
    download,
    machine,
    note,
    peak_rss_mib,
    process_tree,
    push_manifests,
    put_blob_bytes,
    reset_peak_rss,
    rss_mib,
    run_parallel,
    system_busy_seconds,
    upload_chunked,
    upload_monolithic,
)
from support.gateway import GatewayProcess

from proxy.gateway import SEEN_MANIFESTS_CAPACITY
from proxy.manifests import ForeignLayer
from proxy.store import Sighting, open_store

BENCH_DIR = Path(__file__).resolve().parent
REPOSITORY = "bench/large"
SMALL_REPOSITORY = "bench/small"
FOREIGN_TYPE = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
PROFILED_PHASES = ("large", "small")
PEERS = ("nginx-default", "nginx", "haproxy")
CORES = len(os.sched_getaffinity(0))
# Every column a table may have, in this order; a phase's table shows those it measured.
COLUMNS = {
    "direct": "direct",
    "nginx-default": "nginx default",
    "nginx": "nginx tuned",
    "haproxy": "haproxy",
    "gateway": "gateway",
    "gateway-workers": f"gateway x{CORES} workers",
    "gateway-warning": "gateway at warning",
    "empty store": "gateway, empty store",
}
RATIOS = (("gateway", "direct"), ("gateway", "nginx"), ("gateway-workers", "nginx"), ("gateway-workers", "gateway"))


@dataclass(frozen=True)
class Plan:
    mode: str
    rounds: int
    blob_bytes: int
    chunk_bytes: int
    concurrent_uploads: int
    concurrent_blob_bytes: int
    manifests: int
    connections: tuple[int, ...]
    wrk_seconds: int
    rss_requests: int
    rss_seconds: int
    capacity_rounds: int
    capacity_seconds: int
    capacity_connections: int
    known_digests: int
    known_rounds: int
    known_seconds: int
    learns_per_round: int
    burst_seconds: int


FULL = Plan(
    mode="full",
    rounds=3,
    blob_bytes=512 * MIB,
    chunk_bytes=8 * MIB,
    concurrent_uploads=128,
    concurrent_blob_bytes=16 * MIB,  # the registry hashing 128 x 64 MiB takes a minute per target; 16 MiB overlap as well
    manifests=10_000,  # more than the gateway's seen-manifest cache (8192): every GET takes the learn path
    connections=(16, 64),
    wrk_seconds=3,
    rss_requests=100_000,
    rss_seconds=120,
    capacity_rounds=3,
    capacity_seconds=3,
    capacity_connections=64,
    known_digests=1_000_000,
    known_rounds=3,
    known_seconds=8,
    learns_per_round=2,
    burst_seconds=10,
)
QUICK = Plan(
    mode="quick",
    rounds=1,
    blob_bytes=64 * MIB,
    chunk_bytes=8 * MIB,
    concurrent_uploads=8,
    concurrent_blob_bytes=16 * MIB,
    manifests=500,
    connections=(16,),
    wrk_seconds=1,
    rss_requests=5_000,
    rss_seconds=10,
    capacity_rounds=1,
    capacity_seconds=1,
    capacity_connections=64,
    known_digests=20_000,
    known_rounds=1,
    known_seconds=4,
    learns_per_round=1,
    burst_seconds=2,
)


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """`names` starting one further each round, so that no target always goes first."""
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def mib(size: int) -> str:
    return f"{size // MIB} MiB"


# Results


@dataclass
class Row:
    """One figure: the median of each target (COLUMNS' keys) in one phase, and its target from the issue."""

    figure: str
    unit: str
    values: dict[str, float | None] = field(default_factory=dict)
    target: str = ""
    met: bool | None = None
    note: str = ""
    key: str = ""
    phase: str = ""

    def ratio(self, subject: str, reference: str) -> float | None:
        value, base = self.values.get(subject), self.values.get(reference)
        return value / base if value is not None and base else None

    @property
    def to_direct(self) -> float | None:
        return self.ratio("gateway", "direct")

    @property
    def to_nginx(self) -> float | None:
        return self.ratio("gateway", "nginx")

    @property
    def gateway(self) -> float | None:
        return self.values.get("gateway")

    def as_dict(self) -> dict[str, Any]:
        ratios = {ratio_key(subject, reference): self.ratio(subject, reference) for subject, reference in RATIOS}
        return {**asdict(self), **{name: value for name, value in ratios.items() if value is not None}}


def ratio_key(subject: str, reference: str) -> str:
    """The JSON key of a ratio: "gateway_workers_to_gateway"."""
    return f"{subject}_to_{reference}".replace("-", "_")


Check = Callable[[Row], tuple[str, bool | None]]


@dataclass
class Results:
    plan: Plan
    rows: list[Row] = field(default_factory=list)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    extra: dict[str, Any] = field(default_factory=dict)
    phase: str = ""

    def add(self, figure: str, target: str, value: float) -> None:
        self.samples[figure][target].append(value)

    def median(self, figure: str, target: str) -> float | None:
        values = self.samples.get(figure, {}).get(target)
        return statistics.median(values) if values else None

    def row(self, figure: str, unit: str, check: Check | None = None, label: str = "") -> Row:
        values = {target: self.median(figure, target) for target in self.samples.get(figure, {})}
        row = Row(label or figure, unit, values, key=figure, phase=self.phase)
        if check is not None:
            row.target, row.met = check(row)
        self.rows.append(row)
        return row

    def single(self, key: str, label: str, unit: str, value: float | None, check: Check | None = None) -> Row:
        """A figure of the gateway alone, measured once (not a median over targets)."""
        row = Row(label, unit, {"gateway": value}, key=key, phase=self.phase)
        if check is not None:
            row.target, row.met = check(row)
        self.rows.append(row)
        return row


def at_most_direct(factor: float) -> Check:
    def check(row: Row) -> tuple[str, bool | None]:
        return f"<= {factor:g} x direct", None if row.to_direct is None else row.to_direct <= factor

    return check


def at_most_nginx(factor: float) -> Check:
    def check(row: Row) -> tuple[str, bool | None]:
        text = "<= nginx tuned" if factor == 1 else f"<= {factor:g} x nginx tuned"
        return text, None if row.to_nginx is None else row.to_nginx <= factor

    return check


def at_least_nginx(row: Row) -> tuple[str, bool | None]:
    return ">= nginx tuned", None if row.to_nginx is None else row.to_nginx >= 1


def scales_with_workers(factor: float) -> Check:
    def check(row: Row) -> tuple[str, bool | None]:
        scaled = row.ratio("gateway-workers", "gateway")
        return f">= {factor:g} x 1 worker", None if scaled is None else scaled >= factor

    return check


def below(limit: float, unit: str) -> Check:
    def check(row: Row) -> tuple[str, bool | None]:
        return f"< {limit:g} {unit}", None if row.gateway is None else row.gateway < limit

    return check




# Profiling (optional): py-spy attached to the gateway during a phase


@contextmanager
def profiled(directory: Path | None, phase: str, pid: int, results: Results) -> Iterator[None]:
    if directory is None or phase not in PROFILED_PHASES:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / f"gateway-{phase}.txt"
    spy = subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", "raw", "-o", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    results.extra.setdefault("profiles", {})[phase] = summarize_profile(raw)


def py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


IDLE_LEAVES = ("EpollSelector.select", "Runner.run", "BaseEventLoop.run_forever")


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and total shares of the busy samples per function, from py-spy's collapsed stacks.

    Samples whose innermost Python frame is the event loop itself are left out: waiting in
    selectors, or anywhere in uvloop's C loop under `Runner.run` (which includes the loop's own
    socket reads and writes: `py-spy record --native` shows those).
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = idle = 0
    if not raw.exists():
        return {"file": str(raw), "samples": 0}
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(frame) for frame in stack.split(";")]
        if frames[-1].startswith(IDLE_LEAVES):
            idle += count
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * count / samples, 1)) for name, count in counter.most_common(top)] if samples else []

    return {
        "file": str(raw),
        "busy_samples": samples,
        "idle_or_in_uvloop_samples": idle,
        "self_percent": share(own),
        "total_percent": share(total),
    }


def frame_name(frame: str) -> str:
    """"relay_body (proxy/forwarding.py:120)" -> "relay_body (forwarding.py)"."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.split(':')[0].rsplit('/', 1)[-1].rstrip(')')})"


# 1 and 2: large blobs, wall time and proxy CPU per GiB


def large_blobs(plan: Plan, targets: dict[str, Target], blob: Blob, results: Results) -> None:
    warm_up(targets, blob)
    operations: dict[str, Callable[[HttpConnection], None]] = {
        "upload": lambda connection: upload_monolithic(connection, REPOSITORY, blob),
        "chunked": lambda connection: upload_chunked(connection, REPOSITORY, blob, plan.chunk_bytes),
        "download": lambda connection: download(connection, REPOSITORY, blob.digest, blob.size),
    }
    for round_index in range(plan.rounds):
        for name in rotated(list(targets), round_index):
            target = targets[name]
            for operation, run in operations.items():
                meter = target.cpu()
                with HttpConnection(target.host_port) as connection:
                    meter.start()
                    started = time.perf_counter()
                    run(connection)
                    elapsed = time.perf_counter() - started
                    cpu = meter.stop()
                # Answers with `Connection: close` (the client then opens a new connection) are worth knowing.
                reconnects = results.extra.setdefault("client_reconnects", {}).setdefault(name, {})
                reconnects[operation] = reconnects.get(operation, 0) + connection.reconnects
                results.add(f"{operation} wall", name, elapsed)
                if target.pids:
                    results.add(f"{operation} cpu", name, cpu / (blob.size / GIB))
                note(f"  round {round_index + 1} {name:<14} {operation:<8} {elapsed:6.2f} s  cpu {cpu:5.2f} s")
    size = mib(blob.size)
    results.row("upload wall", "s", at_most_direct(1.05), f"blob upload {size}, POST + one PUT: wall")
    results.row("chunked wall", "s", at_most_direct(1.05), f"blob upload {size}, POST + PATCH {mib(plan.chunk_bytes)} + PUT: wall")
    results.row("download wall", "s", at_most_direct(1.05), f"blob download {size} (GET): wall")
    results.row("upload cpu", "s/GiB", at_most_nginx(1), "proxy CPU per GiB, upload (POST + PUT)")
    results.row("chunked cpu", "s/GiB", at_most_nginx(1), "proxy CPU per GiB, upload (chunked)")
    results.row("download cpu", "s/GiB", at_most_nginx(1), "proxy CPU per GiB, download (GET)")


def warm_up(targets: dict[str, Target], blob: Blob) -> None:
    """One small upload and download through each target: connections pooled, code paths loaded."""
    for target in targets.values():
        small = blob.prefix(MIB, blob_prefix_digest(blob, MIB))
        with HttpConnection(target.host_port) as connection:
            for _ in range(3):
                upload_monolithic(connection, REPOSITORY, small)
                download(connection, REPOSITORY, small.digest, small.size)


_PREFIX_DIGESTS: dict[tuple[Path, int], str] = {}


def blob_prefix_digest(blob: Blob, size: int) -> str:
    key = (blob.path, size)
    if key not in _PREFIX_DIGESTS:
        with blob.path.open("rb") as file:
            _PREFIX_DIGESTS[key] = "sha256:" + hashlib.sha256(file.read(size)).hexdigest()
    return _PREFIX_DIGESTS[key]


# 3: small requests with wrk


@dataclass(frozen=True)
class SmallCase:
    key: str
    label: str
    requests: Path


def small_cases(wrk: Wrk, manifests: Sequence[str], empty_blob: str) -> list[SmallCase]:
    return [
        SmallCase(
            "manifest-same",
            "manifest GET, same manifest (cache path)",
            wrk.request_list([("GET", f"/v2/{SMALL_REPOSITORY}/manifests/{manifests[0]}")]),
        ),
        SmallCase(
            "manifest-different",
            f"manifest GET, {len(manifests)} different manifests "
            + ("(learn path)" if len(manifests) > SEEN_MANIFESTS_CAPACITY else "(fit the seen-manifest cache)"),
            wrk.request_list([("GET", f"/v2/{SMALL_REPOSITORY}/manifests/{digest}") for digest in manifests]),
        ),
        SmallCase(
            "blob-head",
            "blob HEAD",
            wrk.request_list([("HEAD", f"/v2/{SMALL_REPOSITORY}/blobs/{empty_blob}")]),
        ),
    ]


WRK_HEADERS = {"Accept": OCI_MANIFEST}


def small_requests(plan: Plan, targets: dict[str, Target], wrk: Wrk, cases: list[SmallCase], results: Results) -> None:
    for target in targets.values():
        for case in cases if plan.mode == "full" else cases[1:2]:
            wrk.run(target.host_port, case.requests, plan.connections[-1], 1, WRK_HEADERS)
    for round_index in range(plan.rounds):
        for name in rotated(list(targets), round_index):
            target = targets[name]
            for case in cases:
                for connections in plan.connections:
                    meter = target.cpu()
                    meter.start()
                    result = wrk.run(target.host_port, case.requests, connections, plan.wrk_seconds, WRK_HEADERS)
                    cpu = meter.stop()
                    key = f"{case.key} c{connections}"
                    results.add(f"{key} rps", name, result.rps)
                    results.add(f"{key} p50", name, result.p50_ms)
                    results.add(f"{key} p99", name, result.p99_ms)
                    if target.pids:
                        results.add(f"{key} cpu_us", name, 1e6 * cpu / result.requests)
                    note(f"  round {round_index + 1} {name:<14} {key:<22} {result.rps:8.0f} req/s"
                         f"  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms")  # fmt: skip
    for case in cases:
        for connections in plan.connections:
            key = f"{case.key} c{connections}"
            label = f"{case.label}, {connections} connections"
            results.row(f"{key} rps", "req/s", at_least_nginx, f"{label}: requests/s")
            results.row(f"{key} p50", "ms", label=f"{label}: p50 latency")
            results.row(f"{key} p99", "ms", at_most_nginx(1.2), f"{label}: p99 latency")
            results.row(f"{key} cpu_us", "us", label=f"{label}: proxy CPU per request")


# 4: memory


def concurrent_uploads(plan: Plan, targets: dict[str, Target], blob: Blob, results: Results) -> None:
    part = blob.prefix(plan.concurrent_blob_bytes, blob_prefix_digest(blob, plan.concurrent_blob_bytes))
    for name, target in targets.items():
        before = {pid: rss_mib(pid) for pid in target.pids}
        for pid in target.pids:
            reset_peak_rss(pid)

        def upload(index: int, host_port: str = target.host_port) -> None:
            with HttpConnection(host_port) as connection:
                upload_monolithic(connection, REPOSITORY, part)

        elapsed = run_parallel(plan.concurrent_uploads, upload)
        results.add("concurrent wall", name, elapsed)
        if target.pids:
            peak = sum(peak_rss_mib(pid) for pid in target.pids)
            results.add("concurrent peak rss", name, peak)
            results.add("concurrent rss before", name, sum(before.values()))
            note(f"  {name:<14} {plan.concurrent_uploads} x {mib(part.size)}: {elapsed:6.2f} s, "
                 f"RSS {sum(before.values()):.1f} MiB before, peak {peak:.1f} MiB")  # fmt: skip
        else:
            note(f"  {name:<14} {plan.concurrent_uploads} x {mib(part.size)}: {elapsed:6.2f} s")
    label = f"{plan.concurrent_uploads} concurrent uploads of {mib(part.size)}"
    results.row("concurrent wall", "s", label=f"{label}: wall")
    results.row("concurrent peak rss", "MiB", below(100, "MiB"), f"{label}: proxy peak RSS (VmHWM)")


def rss_growth(plan: Plan, gateway: GatewayProcess, wrk: Wrk, cases: list[SmallCase], results: Results) -> None:
    """Gateway RSS over `plan.rss_requests` small requests (all three kinds, interleaved), after a warm-up; at
    most `plan.rss_seconds` of them on a machine too busy to serve them all in time."""
    mixed = wrk.request_list(interleave(cases))
    pid = gateway.process.pid
    warm = wrk.run(gateway.host_port, mixed, 16, max(2, plan.wrk_seconds), WRK_HEADERS)
    start = rss_mib(pid)
    done = 0
    trace: list[tuple[int, float]] = [(0, start)]
    deadline = time.monotonic() + plan.rss_seconds
    while done < plan.rss_requests and time.monotonic() < deadline:
        remaining = plan.rss_requests - done
        seconds = min(30, max(1, math.ceil(min(remaining, plan.rss_requests / 4) / warm.rps)))
        result = wrk.run(gateway.host_port, mixed, 16, seconds, WRK_HEADERS)
        done += result.requests
        trace.append((done, rss_mib(pid)))
    end = trace[-1][1]
    note(f"  gateway RSS {start:.1f} MiB after warm-up, {end:.1f} MiB after {done} more requests: " + ", ".join(
        f"{count}: {value:.1f}" for count, value in trace))  # fmt: skip
    results.extra["rss_trace"] = {"requests_and_rss_mib": trace, "requests": done}
    results.add("rss start", "gateway", start)
    results.add("rss end", "gateway", end)
    results.add("rss growth", "gateway", end - start)
    results.row("rss start", "MiB", label="gateway RSS after warm-up (small requests)")
    results.row("rss end", "MiB", label=f"gateway RSS after {done} more small requests")
    results.row("rss growth", "MiB", below(2, "MiB (no growth)"), f"gateway RSS growth over {done} requests")


def interleave(cases: list[SmallCase]) -> list[tuple[str, str]]:
    """The cases' requests taken in turn: a different-manifest GET, a same-manifest GET, a blob HEAD, ..."""
    by_case = [[line.split(" ", 1) for line in case.requests.read_text().splitlines()] for case in cases]
    longest = max(len(requests) for requests in by_case)
    return [
        (requests[index % len(requests)][0], requests[index % len(requests)][1])
        for index in range(longest)
        for requests in by_case
    ]


# 5: capacity: every proxy in front of the static upstream, so that its own cost shows


@dataclass(frozen=True)
class CapacityCase:
    key: str
    label: str
    method: str
    path: str


CAPACITY_CASES = (
    CapacityCase("manifest", "manifest GET", "GET", "/v2/bench/app/manifests/latest"),
    CapacityCase("blob-head", "blob HEAD", "HEAD", f"/v2/bench/app/blobs/{EMPTY_BLOB}"),
    CapacityCase("base", "GET /v2/", "GET", "/v2/"),
)
# server.workers, and extra serve arguments, of the gateways compared (all others as shipped: log level info,
# access log on, a SQLite store).
CAPACITY_GATEWAYS = {"gateway": (1, ()), "gateway-workers": (CORES, ()), "gateway-warning": (1, ("--log-level", "warning"))}


def capacity(plan: Plan, services: Services, wrk: Wrk, results: Results) -> None:
    upstream = services.static_upstream()
    first = len(services.started)
    targets = {name: services.peer(name, upstream, workers=CORES) for name in PEERS}
    for name, (workers, args) in CAPACITY_GATEWAYS.items():
        store = f"sqlite:///{services.workdir / f'capacity-{name}.db'}"
        gateway, _ = services.gateway(f"capacity-{name}", store, {"server": {"workers": workers}}, upstream=upstream, args=args)
        targets[name] = services.gateway_target(name, gateway)
    requests = {case.key: wrk.request_list([(case.method, case.path)]) for case in CAPACITY_CASES}
    for target in targets.values():
        for case in CAPACITY_CASES:
            wrk.run(target.host_port, requests[case.key], plan.capacity_connections, 1, WRK_HEADERS)
    for round_index in range(plan.capacity_rounds):
        for name in rotated(list(targets), round_index):
            target = targets[name]
            for case in CAPACITY_CASES:
                meter = target.cpu()
                busy = system_busy_seconds()
                meter.start()
                result = wrk.run(target.host_port, requests[case.key], plan.capacity_connections,
                                 plan.capacity_seconds, WRK_HEADERS)  # fmt: skip
                cpu = meter.stop()
                busy = system_busy_seconds() - busy
                results.add(f"capacity {case.key} rps", name, result.rps)
                results.add(f"capacity {case.key} p50", name, result.p50_ms)
                results.add(f"capacity {case.key} p99", name, result.p99_ms)
                results.add(f"capacity {case.key} cpu_us", name, 1e6 * cpu / result.requests)
                results.add(f"capacity {case.key} cores", name, cpu / result.seconds)
                note(f"  round {round_index + 1} {name:<15} {case.key:<10} {result.rps:8.0f} req/s  "
                     f"p99 {result.p99_ms:6.2f} ms  proxy {1e6 * cpu / result.requests:6.1f} us/request, "
                     f"{cpu / result.seconds:.2f} cores; machine {busy / result.seconds:.2f} cores")  # fmt: skip
    for _ in range(len(services.started) - first):
        services.stop(services.started[-1])
    connections = f"{plan.capacity_connections} connections"
    for case in CAPACITY_CASES:
        label = f"static upstream, {case.label}, {connections}"
        results.row(f"capacity {case.key} rps", "req/s", scales_with_workers(1.3), f"{label}: requests/s")
        results.row(f"capacity {case.key} cpu_us", "us", at_most_nginx(5), f"{label}: proxy CPU per request")
        results.row(f"capacity {case.key} cores", "cores", label=f"{label}: proxy CPU (cores)")
        results.row(f"capacity {case.key} p50", "ms", label=f"{label}: p50 latency")
        results.row(f"capacity {case.key} p99", "ms", label=f"{label}: p99 latency")


# 6: a known set of a million digests that changes while load runs


WITH_URLS_AND_DIFF_IDS = "with urls and diff_ids"


def known_layers(numbers: range, as_manifests_teach: bool) -> list[ForeignLayer]:
    """Foreign layers as digest files teach them (no urls), or as manifests and their configs do: each with its
    own URL, which holds its digest (as Windows base layers' do: https://mcr.microsoft.com/v2/.../blobs/sha256:...),
    and its own diff_id."""
    digests = [f"sha256:{number:064x}" for number in numbers]
    return [
        ForeignLayer(digest, FOREIGN_TYPE, 100 * MIB + number,
                     (f"https://example.invalid/v2/windows/servercore/blobs/{digest}",) if as_manifests_teach else (),
                     f"sha256:d{number:063x}" if as_manifests_teach else None)
        for number, digest in zip(numbers, digests, strict=True)
    ]  # fmt: skip


async def fill_store(url: str, count: int, as_manifests_teach: bool, batch: int = 100_000) -> None:
    """`count` foreign layers, written through the store's own API in batches (SQLite: about 25 s a million)."""
    store = open_store(url)
    try:
        for start in range(0, count, batch):
            numbers = range(start, min(count, start + batch))
            await store.learn(known_layers(numbers, as_manifests_teach), Sighting("learn"))
    finally:
        await store.close()


def learn_manifest(path: Path, digest: str) -> Path:
    """A Docker image manifest with one foreign layer, for `foreign-layer-proxy learn FILE`."""
    document = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1469,
                   "digest": "sha256:" + "1" * 64},
        "layers": [{"mediaType": FOREIGN_TYPE, "size": 123_456_789, "digest": digest,
                    "urls": ["https://example.invalid/learned"]}],
    }  # fmt: skip
    path.write_text(json.dumps(document))
    return path


@dataclass
class Probe:
    """HEAD of one blob through a gateway (policy.pretend_present): 200 once its digest is known."""

    host_port: str
    digest: str
    latencies: list[float] = field(default_factory=list)

    def known(self, connection: HttpConnection) -> bool:
        started = time.perf_counter()
        status = connection.request("HEAD", f"/v2/bench/known/blobs/{self.digest}").status
        self.latencies.append(time.perf_counter() - started)
        return status == 200

    def wait_until_known(self, timeout: float) -> float:
        """Seconds until the gateway enforces the digest, probing every 10 ms."""
        started = time.perf_counter()
        with HttpConnection(self.host_port) as connection:
            while not self.known(connection):
                if time.perf_counter() - started > timeout:
                    raise BenchError(f"{self.digest} not enforced {timeout:g} s after it was learned")
                time.sleep(0.01)
        return time.perf_counter() - started


def learn_and_wait(store_url: str, host_port: str, workdir: Path, number: int) -> tuple[float, float, float]:
    """`foreign-layer-proxy learn` of a new digest into the gateway's store; then the seconds until the gateway
    enforces it, and the slowest probe meanwhile and for a second after (a stalled event loop shows there)."""
    digest = f"sha256:{number:064x}"
    manifest = learn_manifest(workdir / f"learn-{number}.json", digest)
    command = [sys.executable, "-m", "proxy", "learn", str(manifest), "--store", store_url]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    learned = time.perf_counter()
    probe = Probe(host_port, digest)
    enforced = probe.wait_until_known(30)
    with HttpConnection(host_port) as connection:
        until = time.perf_counter() + 1
        while time.perf_counter() < until:
            probe.known(connection)
            time.sleep(0.01)
    return enforced, learned - started, max(probe.latencies)


def known_set(plan: Plan, services: Services, wrk: Wrk, results: Results) -> None:
    upstream = services.static_upstream()
    count = plan.known_digests
    size = f"{count / 1e6:g}M" if count >= 1_000_000 else f"{count // 1000}k"
    with_urls = f"{size} {WITH_URLS_AND_DIFF_IDS}"
    stores = {"empty": f"sqlite:///{services.workdir / 'known-empty.db'}",
              size: f"sqlite:///{services.workdir / 'known-full.db'}",
              with_urls: f"sqlite:///{services.workdir / 'known-urls.db'}"}  # fmt: skip
    for variant in (size, with_urls):
        started = time.perf_counter()
        asyncio.run(fill_store(stores[variant], count, as_manifests_teach=variant == with_urls))
        note(f"  {count} digests ({variant}) written to the store in {time.perf_counter() - started:.1f} s")
    config = {"policy": {"pretend_present": True}}
    gateways: dict[str, GatewayProcess] = {}
    for variant, url in stores.items():
        gateway, startup = services.gateway(f"known-{variant}", url, config, upstream=upstream)
        if variant != "empty":
            startup += Probe(gateway.host_port, f"sha256:{count // 2:064x}").wait_until_known(60)
        pid = gateway.process.pid
        results.add("known startup", variant, startup)
        results.add("known rss", variant, rss_mib(pid))
        results.add("known peak rss", variant, peak_rss_mib(pid))
        note(f"  store {variant:<14} gateway enforcing in {startup:5.2f} s, RSS {rss_mib(pid):.1f} MiB "
             f"(peak {peak_rss_mib(pid):.1f} MiB)")  # fmt: skip
        if variant == with_urls:
            services.stop(gateway)  # only its start-up and memory are measured
        else:
            gateways[variant] = gateway
    load = wrk.request_list([("HEAD", f"/v2/bench/app/blobs/{EMPTY_BLOB}"), ("GET", "/v2/bench/app/manifests/latest")])
    numbers = iter(range(count + 1, 2 * count + 1))
    for round_index in range(plan.known_rounds):
        for variant in rotated(list(gateways), round_index):
            gateway = gateways[variant]
            changes: list[tuple[float, float, float]] = []

            def learning(gateway: GatewayProcess = gateway, url: str = stores[variant],
                         changes: list[tuple[float, float, float]] = changes) -> None:
                # One learn takes about 3 s (the command, the wait, a second of probing): all within the wrk run.
                time.sleep(0.5)
                for _ in range(plan.learns_per_round):
                    changes.append(learn_and_wait(url, gateway.host_port, services.workdir, next(numbers)))

            learner = threading.Thread(target=learning)
            learner.start()
            result = wrk.run(gateway.host_port, load, plan.capacity_connections, plan.known_seconds, WRK_HEADERS)
            learner.join()
            results.add("known rps", variant, result.rps)
            results.add("known p99", variant, result.p99_ms)
            for enforced, learn_took, slowest in changes:
                results.add("known enforced", variant, enforced)
                results.add("known learn cli", variant, learn_took)
                results.add("known slowest probe", variant, 1000 * slowest)
            note(f"  round {round_index + 1} store {variant:<14} {result.rps:8.0f} req/s  p99 {result.p99_ms:6.2f} ms; "
                 + ", ".join(f"enforced {enforced:.2f} s after learn (slowest probe {1000 * slowest:.0f} ms)"
                             for enforced, _, slowest in changes))  # fmt: skip
    for variant, gateway in gateways.items():
        results.add("known peak rss end", variant, peak_rss_mib(gateway.process.pid))
    bookkeeping(plan, gateways[size], wrk, results)
    million_rows(results, size, count)


def bookkeeping(plan: Plan, gateway: GatewayProcess, wrk: Wrk, results: Results) -> None:
    """Dropped pushes of a known digest (POST ?digest=, each a decision the store counts) for a while; then
    the gateway's CPU in the seconds after: work left over from the burst, where counting lags behind."""
    pushes = wrk.request_list([("POST", f"/v2/bench/drop/blobs/uploads/?digest=sha256:{7:064x}")])
    pids = process_tree(gateway.process.pid)
    meter = CpuMeter(pids)
    meter.start()
    result = wrk.run(gateway.host_port, pushes, 16, plan.burst_seconds, WRK_HEADERS)
    during = meter.stop()
    meter.start()
    time.sleep(3)
    after = meter.stop()
    results.add("burst rps", "gateway", result.rps)
    results.add("burst after cpu", "gateway", after)
    note(f"  burst of dropped pushes: {result.rps:.0f}/s for {result.seconds:.0f} s ({during:.1f} s CPU); "
         f"gateway CPU in the 3 s after: {after:.2f} s")  # fmt: skip


def million_rows(results: Results, size: str, count: int) -> None:
    def compared(key: str, label: str, unit: str, check: Check | None = None) -> Row:
        row = results.single(key, label, unit, results.median(key, size), check)
        row.values["empty store"] = results.median(key, "empty")
        return row

    def longest(key: str, variant: str) -> float | None:
        values = results.samples.get(key, {}).get(variant)
        return max(values) if values else None

    empty_rss = results.median("known rss", "empty")
    for variant in (size, f"{size} {WITH_URLS_AND_DIFF_IDS}"):
        suffix = variant.removeprefix(size)
        what = f"{size} known digests{suffix}"
        startup = results.single(f"known startup{suffix}", f"gateway start-up with {what} (until one is enforced)",
                                 "s", results.median("known startup", variant), below(5, "s"))  # fmt: skip
        startup.values["empty store"] = results.median("known startup", "empty")
        full_rss = results.median("known rss", variant)
        rss = results.single(f"known rss{suffix}", f"gateway RSS with {what}, idle", "MiB", full_rss)
        rss.values["empty store"] = empty_rss
        results.single(f"known rss growth{suffix}", f"RSS that {what} add to a process", "MiB",
                       None if full_rss is None or empty_rss is None else full_rss - empty_rss,
                       below(150, "MiB"))  # fmt: skip
    compared("known peak rss", f"gateway peak RSS (VmHWM) after loading {size}", "MiB")
    compared("known peak rss end", f"gateway peak RSS (VmHWM) after the changes, {size} known", "MiB")
    rps = compared("known rps", f"requests/s with {size} known digests while digests are learned", "req/s")
    empty = rps.values["empty store"]
    rps.target = ">= 0.95 x empty store"
    rps.met = None if rps.gateway is None or not empty else rps.gateway >= 0.95 * empty
    compared("known p99", f"p99 latency with {size} known digests while digests are learned", "ms")
    compared("known enforced", f"from `learn` done to enforced, {size} known (median)", "s")
    results.single("known enforced max", f"from `learn` done to enforced, {size} known (longest)", "s",
                   longest("known enforced", size), below(1, "s"))  # fmt: skip
    compared("known learn cli", "`foreign-layer-proxy learn` of one manifest (the command itself)", "s")
    stall = results.single("known stall", f"slowest probe while a change is picked up, {size} known", "ms",
                           longest("known slowest probe", size))  # fmt: skip
    quiet = stall.values["empty store"] = longest("known slowest probe", "empty")
    stall.target = "<= empty store + 100 ms"
    stall.met = None if stall.gateway is None or quiet is None else stall.gateway <= quiet + 100
    results.single("burst rps", "dropped pushes of a known digest (POST ?digest=), 16 connections", "req/s",
                   results.median("burst rps", "gateway"))  # fmt: skip
    results.single("burst after cpu", "gateway CPU in the 3 s after that burst (bookkeeping left over)", "s",
                   results.median("burst after cpu", "gateway"), below(0.3, "s"))  # fmt: skip


# The table


def formatted(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in {"req/s", "ns"}:
        return f"{value:,.0f}"
    if unit in {"MiB", "ms", "us"}:
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return f"{value:.2f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


PHASE_TITLES = {
    "large": "Large blobs through each proxy in front of the registry",
    "small": "Small requests in front of the registry (wrk, 1 thread)",
    "memory": "Memory",
    "rss": "Memory over many small requests",
    "capacity": "Capacity: a static upstream (nginx answering like a registry), so that each proxy's own cost shows",
    "known": "A known set that changes while load runs (static upstream, policy.pretend_present on)",
}


def table(rows: Sequence[Row]) -> str:
    """Markdown: one table per phase, with the columns (targets, ratios) that phase measured."""
    sections = []
    for phase in dict.fromkeys(row.phase for row in rows):
        chosen = [row for row in rows if row.phase == phase]
        columns = [key for key in COLUMNS if any(row.values.get(key) is not None for row in chosen)]
        ratios = [(a, b) for a, b in RATIOS if a in columns and b in columns]
        header = ["figure", "unit", *(COLUMNS[key] for key in columns), *(f"{a}/{b}" for a, b in ratios), "target", "met"]
        lines = [f"**{PHASE_TITLES.get(phase, phase)}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]  # fmt: skip
        for row in chosen:
            met = "" if row.met is None else ("yes" if row.met else "**NO**")
            cells = [row.figure, row.unit, *(formatted(row.values.get(key), row.unit) for key in columns),
                     *(ratio(row.ratio(a, b)) for a, b in ratios), f"{row.target} ({row.note})" if row.note else row.target,
                     met]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(partial, path)


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the work tree differed from it."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, check=False)
        return result.stdout.strip()

    changed = [line[3:] for line in git("status", "--porcelain", "--", "proxy").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "proxy_files_changed_since": changed}


README_START = "<!-- latest-results:start -->"
README_END = "<!-- latest-results:end -->"
PERFORMANCE_START = "<!-- performance:start -->"
PERFORMANCE_END = "<!-- performance:end -->"
# The figures of the repository README's performance table, as keys of Row.key.
PERFORMANCE_KEYS = (
    *(f"capacity {case.key} {figure}" for figure in ("cpu_us", "rps") for case in CAPACITY_CASES),
    "upload cpu", "chunked cpu", "download cpu", "upload wall", "download wall",
    "concurrent peak rss", "rss growth",
    "known rss growth", f"known rss growth {WITH_URLS_AND_DIFF_IDS}", "known startup", f"known startup {WITH_URLS_AND_DIFF_IDS}", "known rps", "known p99", "known enforced max", "known stall", "burst after cpu",
)  # fmt: skip


def replace_between(path: Path, start_marker: str, end_marker: str, lines: list[str]) -> bool:
    text = path.read_text()
    if start_marker not in text or end_marker not in text:
        return False
    start, end = text.index(start_marker), text.index(end_marker) + len(end_marker)
    path.write_text(text[:start] + "\n".join([start_marker, *lines, end_marker]) + text[end:])
    return True


def run_description(document: dict[str, Any], where: str) -> list[str]:
    """Which run, on what, and how disturbed."""
    box = document["machine"]
    disturbed = {
        phase: load["others_share_of_machine"]
        for phase, load in document["extra"].get("other_processes", {}).items()
        if load["others_share_of_machine"] > 0.05
    }
    phases = "all phases" if set(document["phases"]) == set(ALL_PHASES) else "phases " + ", ".join(document["phases"])
    lines = [
        f"Run of {document['generated']} ({document['mode']} mode, {phases}, {document['elapsed_s']:.0f} s), in {where}:",
        "",
        (
            f"- machine: {box['nproc']} cores ({box['cpu_model']}), {box['memory_gib']} GiB, "
            f"Linux {box['kernel']}, Python {box['python']}, aiohttp {box['aiohttp']}"
        ),
        f"- {box['registry']}; {box['nginx']}; {box['haproxy']}; {box['wrk']}",
        f"- gateway: `{document['gateway_command']}` ({document['gateway_event_loop']} event loop), "
        f"commit {document['code']['commit']}"
        + (" with local changes to proxy/" if document["code"]["proxy_files_changed_since"] else "")
        + ": log level and access log as shipped (info, on) unless the column says otherwise",
        f"- registry storage and test files on {document['storage']}",
    ]
    if failed := document["extra"].get("failed_phases"):
        lines.append(f"- **failed**: phases {', '.join(failed)} (see `extra.failed_phases` in the JSON)")
    if disturbed:
        shares = ", ".join(f"{phase} {100 * share:.0f}%" for phase, share in disturbed.items())
        lines.append(f"- **disturbed**: other processes took part of the machine during phases: {shares}")
    return lines


def update_readme(readme: Path, document: dict[str, Any]) -> None:
    """Put the run's tables, and the machine it ran on, between bench/README.md's markers."""
    lines = [*run_description(document, "`results/latest.json`"), "", document["table_markdown"]]
    replace_between(readme, README_START, README_END, lines)


def performance_table(document: dict[str, Any]) -> list[str]:
    """The repository README's table: the headline figures, each as a ratio to tuned nginx in the same run."""
    workers = ratio_key("gateway-workers", "gateway")
    header = "| figure | gateway | nginx tuned | gateway / nginx tuned | target | met |"
    lines = [header, "|---|---|---|---|---|---|"]
    by_key = {row["key"]: row for row in document["rows"]}
    for key in PERFORMANCE_KEYS:
        if (row := by_key.get(key)) is None or row["values"].get("gateway") is None:
            continue
        unit = row["unit"]
        gateway = f"{formatted(row['values'].get('gateway'), unit)} {unit}"
        nginx = row["values"].get("nginx")
        target = row["target"]
        if "worker" in target and row.get(workers) is not None:
            target = f"{target} (x{CORES} workers: {row[workers]:.2f} x 1 worker)"
        elif row["values"].get("empty store") is not None:
            target = f"{target} (empty store: {formatted(row['values']['empty store'], unit)} {unit})".strip()
        met = "" if row["met"] is None else ("yes" if row["met"] else "**NO**")
        nginx_cell = "-" if nginx is None else f"{formatted(nginx, unit)} {unit}"
        lines.append(f"| {row['figure']} | {gateway} | {nginx_cell} | {ratio(row.get('gateway_to_nginx'))} | {target} | {met} |")
    return lines


def update_performance(readme: Path, document: dict[str, Any]) -> None:
    lines = [*run_description(document, "`bench/results/latest.json`"), "", *performance_table(document)]
    replace_between(readme, PERFORMANCE_START, PERFORMANCE_END, lines)


# Main


def run(plan: Plan, output: Path, profile: Path | None, phases: set[str], readmes: bool) -> int:
    results = Results(plan)
    began = time.perf_counter()
    registry_phases = phases & {"large", "small", "memory", "rss"}
    needed = plan.blob_bytes * 4 + plan.concurrent_uploads * plan.concurrent_blob_bytes + plan.concurrent_blob_bytes
    with Services.running(needed, with_registry=bool(registry_phases)) as services:
        if os.getloadavg()[0] > 0.5:
            note(f"WARNING: load average {os.getloadavg()[0]:.1f} before the start: something else is running")
        note(f"work folder {services.workdir} on {services.storage}")
        wrk = Wrk(services.workdir)
        steps: list[tuple[str, str, Callable[[], None]]] = [
            ("capacity", "capacity: each proxy in front of a static upstream", lambda: capacity(plan, services, wrk, results)),
            ("known", "a known set of digests that changes under load", lambda: known_set(plan, services, wrk, results)),
        ]  # fmt: skip
        gateway_pid = None
        if registry_phases:
            assert services.registry is not None
            gateway, startup = services.gateway("gateway")
            gateway_pid = gateway.process.pid
            results.extra["gateway_startup_s"] = startup
            results.extra["gateway_rss_idle_mib"] = rss_mib(gateway_pid)
            everyone = {"direct": Target("direct", services.registry.host_port)}
            everyone |= {name: services.peer(name) for name in PEERS}
            everyone["gateway"] = services.gateway_target("gateway", gateway)

            def chosen(*names: str) -> dict[str, Target]:
                return {name: everyone[name] for name in names}

            note(f"creating a {mib(plan.blob_bytes)} random blob")
            blob, _ = Blob.create(services.workdir / "blob", plan.blob_bytes)
            cases: list[SmallCase] = []
            if phases & {"small", "rss"}:
                note(f"pushing {plan.manifests} manifests to the registry")
                started = time.perf_counter()
                manifests, _ = push_manifests(services.registry.host_port, SMALL_REPOSITORY, plan.manifests)
                with HttpConnection(services.registry.host_port) as connection:
                    empty_blob = put_blob_bytes(connection, SMALL_REPOSITORY, b"")
                note(f"  pushed in {time.perf_counter() - started:.1f} s")
                cases = small_cases(wrk, manifests, empty_blob)
            steps = [
                ("large", "1-2. large blobs: wall time and proxy CPU",
                 lambda: large_blobs(plan, chosen("direct", *PEERS, "gateway"), blob, results)),
                ("small", "3. small requests (wrk, 1 thread)",
                 lambda: small_requests(plan, chosen("direct", "nginx", "gateway"), wrk, cases, results)),
                ("memory", "4. memory: concurrent uploads",
                 lambda: concurrent_uploads(plan, chosen("nginx", "haproxy", "gateway"), blob, results)),
                ("rss", "4. memory: RSS over many small requests", lambda: rss_growth(plan, gateway, wrk, cases, results)),
                *steps,
            ]  # fmt: skip
        for phase, title, step in steps:
            if phase not in phases:
                continue
            note(title)
            results.phase = phase
            load = ForeignLoad(services)
            load.start()
            try:
                with profiled(profile if gateway_pid else None, phase, gateway_pid or 0, results):
                    step()
            except (OSError, RuntimeError, subprocess.SubprocessError):  # a broken phase must not cost the others
                note(f"  FAILED: phase {phase}:\n{traceback.format_exc()}")
                results.extra.setdefault("failed_phases", {})[phase] = traceback.format_exc(limit=-3)
            busy = results.extra.setdefault("other_processes", {})[phase] = load.stop()
            if busy["others_share_of_machine"] > 0.05:
                note(f"  WARNING: other processes took {100 * busy['others_share_of_machine']:.0f}% of the machine "
                     "during this phase; its figures are disturbed")  # fmt: skip
        storage = services.storage
        gateway_command, gateway_loop = services.first_gateway
    elapsed = time.perf_counter() - began
    rendered = table(results.rows)
    print(rendered)
    misses = [row.figure for row in results.rows if row.met is False]
    print(f"\n{plan.mode} run: {elapsed:.0f} s; targets missed: {len(misses)} of "
          f"{sum(row.met is not None for row in results.rows)}")  # fmt: skip
    document: dict[str, Any] = {
        "mode": plan.mode,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(elapsed, 1),
        "machine": machine(),
        "code": code_version(),
        "gateway_event_loop": gateway_loop,
        "storage": storage,
        "gateway_command": gateway_command,
        "plan": asdict(plan),
        "phases": sorted(phases),
        "profiled": profile is not None,
        "table_markdown": rendered,
        "rows": [row.as_dict() for row in results.rows],
        "samples": {figure: dict(per_target) for figure, per_target in results.samples.items()},
        "extra": results.extra,
    }
    write_json(output, document)
    print(f"results written to {output}")
    if results.extra.get("failed_phases"):
        print(f"FAILED phases: {', '.join(results.extra['failed_phases'])}")
        return 1
    if readmes:
        write_readmes(document)
    return 0


def write_readmes(document: dict[str, Any]) -> None:
    update_readme(BENCH_DIR / "README.md", document)
    update_performance(BENCH_DIR.parent / "README.md", document)
    print("tables written to bench/README.md and README.md")


ALL_PHASES = ("large", "small", "memory", "rss", "capacity", "known")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one round, short wrk runs")
    parser.add_argument("--output", type=Path, help="JSON results (default bench/results/latest.json, or quick.json)")
    parser.add_argument("--phases", default=",".join(ALL_PHASES), help=f"comma-separated subset of {ALL_PHASES}")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="attach py-spy to the gateway during the large and small phases; raw stacks into DIR")  # fmt: skip
    parser.add_argument("--readmes-from", type=Path, metavar="JSON",
                        help="only write the tables of an earlier run (its JSON) into bench/README.md and README.md")  # fmt: skip
    args = parser.parse_args(argv)
    if args.readmes_from is not None:
        write_readmes(json.loads(args.readmes_from.read_text()))
        return 0
    phases = {phase.strip() for phase in args.phases.split(",") if phase.strip()}
    unknown = phases - set(ALL_PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    plan = QUICK if args.quick else FULL
    output = args.output or BENCH_DIR / "results" / ("quick.json" if args.quick else "latest.json")
    # Only a complete, unprofiled full run to the default place replaces the READMEs' tables.
    complete = not args.quick and args.output is None and args.profile is None and phases == set(ALL_PHASES)
    return run(plan, output, args.profile, phases, complete)


if __name__ == "__main__":
    sys.exit(main())
