"""Benchmark: the gateway against the registry itself and against nginx, on loopback, in one run.

    .venv/bin/python bench/run.py            # full run (about 8 minutes on 2 cores), writes bench/results/latest.json
    .venv/bin/python bench/run.py --quick    # smoke run (well under a minute), writes bench/results/quick.json

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
import time
import timeit
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    GIB,
    MIB,
    OCI_MANIFEST,
    Blob,
    ForeignLoad,
    HttpConnection,
    Services,
    Target,
    Wrk,
    download,
    machine,
    note,
    peak_rss_mib,
    push_manifests,
    put_blob_bytes,
    reset_peak_rss,
    rss_mib,
    run_parallel,
    upload_chunked,
    upload_monolithic,
)
from support.gateway import GatewayProcess

from proxy.gateway import SEEN_MANIFESTS_CAPACITY
from proxy.manifests import ForeignLayer
from proxy.policy import Action, Policy, Rule
from proxy.store import Sighting, SqliteStore

BENCH_DIR = Path(__file__).resolve().parent
TARGETS = ("direct", "nginx", "gateway")
REPOSITORY = "bench/large"
SMALL_REPOSITORY = "bench/small"
FOREIGN_TYPE = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
PROFILED_PHASES = ("large", "small")


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
    known_digests: int
    known_rounds: int
    decide_calls: int


FULL = Plan(
    mode="full",
    rounds=3,
    blob_bytes=512 * MIB,
    chunk_bytes=8 * MIB,
    concurrent_uploads=32,
    concurrent_blob_bytes=256 * MIB,
    manifests=10_000,  # more than the gateway's seen-manifest cache (8192): every GET takes the learn path
    connections=(16, 64),
    wrk_seconds=3,
    rss_requests=100_000,
    known_digests=100_000,
    known_rounds=3,
    decide_calls=200_000,
)
QUICK = Plan(
    mode="quick",
    rounds=1,
    blob_bytes=64 * MIB,
    chunk_bytes=8 * MIB,
    concurrent_uploads=4,
    concurrent_blob_bytes=32 * MIB,
    manifests=500,
    connections=(16,),
    wrk_seconds=1,
    rss_requests=5_000,
    known_digests=10_000,
    known_rounds=1,
    decide_calls=20_000,
)


def order(round_index: int) -> tuple[str, ...]:
    """direct / nginx / gateway, starting one further each round, so that no target always goes first."""
    shift = round_index % len(TARGETS)
    return TARGETS[shift:] + TARGETS[:shift]


def mib(size: int) -> str:
    return f"{size // MIB} MiB"


# Results


@dataclass
class Row:
    figure: str
    unit: str
    direct: float | None = None
    nginx: float | None = None
    gateway: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def to_direct(self) -> float | None:
        return self.gateway / self.direct if self.gateway is not None and self.direct else None

    @property
    def to_nginx(self) -> float | None:
        return self.gateway / self.nginx if self.gateway is not None and self.nginx else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gateway_to_direct": self.to_direct, "gateway_to_nginx": self.to_nginx}


@dataclass
class Results:
    plan: Plan
    rows: list[Row] = field(default_factory=list)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: str, target: str, value: float) -> None:
        self.samples[figure][target].append(value)

    def median(self, figure: str, target: str) -> float | None:
        values = self.samples.get(figure, {}).get(target)
        return statistics.median(values) if values else None

    def row(self, figure: str, unit: str, check: Callable[[Row], tuple[str, bool | None]] | None = None) -> Row:
        row = Row(figure, unit, self.median(figure, "direct"), self.median(figure, "nginx"), self.median(figure, "gateway"))
        if check is not None:
            row.target, row.met = check(row)
        self.rows.append(row)
        return row


def at_most_direct(factor: float) -> Callable[[Row], tuple[str, bool | None]]:
    def check(row: Row) -> tuple[str, bool | None]:
        return f"<= {factor:g} x direct", None if row.to_direct is None else row.to_direct <= factor

    return check


def at_most_nginx(factor: float) -> Callable[[Row], tuple[str, bool | None]]:
    def check(row: Row) -> tuple[str, bool | None]:
        text = "<= nginx" if factor == 1 else f"<= {factor:g} x nginx"
        return text, None if row.to_nginx is None else row.to_nginx <= factor

    return check


def at_least_nginx(row: Row) -> tuple[str, bool | None]:
    return ">= nginx", None if row.to_nginx is None else row.to_nginx >= 1


def below(limit: float, unit: str) -> Callable[[Row], tuple[str, bool | None]]:
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
        for name in order(round_index):
            target = targets[name]
            for operation, run in operations.items():
                meter = target.cpu()
                with HttpConnection(target.host_port) as connection:
                    meter.start()
                    started = time.perf_counter()
                    run(connection)
                    elapsed = time.perf_counter() - started
                    cpu = meter.stop()
                results.add(f"{operation} wall", name, elapsed)
                if target.pids:
                    results.add(f"{operation} cpu", name, cpu / (blob.size / GIB))
                note(f"  round {round_index + 1} {name:<8} {operation:<8} {elapsed:6.2f} s  cpu {cpu:5.2f} s")
    size = mib(blob.size)
    results.row("upload wall", "s", at_most_direct(1.05)).figure = f"blob upload {size}, POST + one PUT: wall"
    results.row("chunked wall", "s", at_most_direct(1.05)).figure = (
        f"blob upload {size}, POST + PATCH {mib(plan.chunk_bytes)} + PUT: wall"
    )
    results.row("download wall", "s", at_most_direct(1.05)).figure = f"blob download {size} (GET): wall"
    results.row("upload cpu", "s/GiB", at_most_nginx(1)).figure = "proxy CPU per GiB, upload (POST + PUT)"
    results.row("chunked cpu", "s/GiB", at_most_nginx(1)).figure = "proxy CPU per GiB, upload (chunked)"
    results.row("download cpu", "s/GiB", at_most_nginx(1)).figure = "proxy CPU per GiB, download (GET)"


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
        for name in order(round_index):
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
                    note(f"  round {round_index + 1} {name:<8} {key:<22} {result.rps:8.0f} req/s"
                         f"  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms")  # fmt: skip
    for case in cases:
        for connections in plan.connections:
            key = f"{case.key} c{connections}"
            label = f"{case.label}, {connections} connections"
            results.row(f"{key} rps", "req/s", at_least_nginx).figure = f"{label}: requests/s"
            results.row(f"{key} p50", "ms").figure = f"{label}: p50 latency"
            results.row(f"{key} p99", "ms", at_most_nginx(1.2)).figure = f"{label}: p99 latency"
    results.extra["proxy_cpu_us_per_request"] = {
        f"{case.key} c{connections}": {
            name: results.median(f"{case.key} c{connections} cpu_us", name) for name in ("nginx", "gateway")
        }
        for case in cases
        for connections in plan.connections
    }


# 4: memory


def concurrent_uploads(plan: Plan, targets: dict[str, Target], blob: Blob, results: Results) -> None:
    part = blob.prefix(plan.concurrent_blob_bytes, blob_prefix_digest(blob, plan.concurrent_blob_bytes))
    for name in TARGETS:
        target = targets[name]
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
            note(f"  {name:<8} {plan.concurrent_uploads} x {mib(part.size)}: {elapsed:6.2f} s, "
                 f"RSS {sum(before.values()):.1f} MiB before, peak {peak:.1f} MiB")  # fmt: skip
        else:
            note(f"  {name:<8} {plan.concurrent_uploads} x {mib(part.size)}: {elapsed:6.2f} s")
    label = f"{plan.concurrent_uploads} concurrent uploads of {mib(part.size)}"
    results.row("concurrent wall", "s").figure = f"{label}: wall"
    results.row("concurrent peak rss", "MiB", below(100, "MiB")).figure = f"{label}: proxy peak RSS (VmHWM)"


def rss_growth(plan: Plan, gateway: GatewayProcess, wrk: Wrk, cases: list[SmallCase], results: Results) -> None:
    """Gateway RSS over `plan.rss_requests` small requests (all three kinds, interleaved), after a warm-up."""
    mixed = wrk.request_list(interleave(cases))
    pid = gateway.process.pid
    warm = wrk.run(gateway.host_port, mixed, 16, max(2, plan.wrk_seconds), WRK_HEADERS)
    start = rss_mib(pid)
    done = 0
    trace: list[tuple[int, float]] = [(0, start)]
    while done < plan.rss_requests:
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
    results.row("rss start", "MiB").figure = "gateway RSS after warm-up (small requests)"
    results.row("rss end", "MiB").figure = f"gateway RSS after {done} more small requests"
    results.row("rss growth", "MiB", below(2, "MiB (no growth)")).figure = f"gateway RSS growth over {done} requests"


def interleave(cases: list[SmallCase]) -> list[tuple[str, str]]:
    """The cases' requests taken in turn: a different-manifest GET, a same-manifest GET, a blob HEAD, ..."""
    by_case = [[line.split(" ", 1) for line in case.requests.read_text().splitlines()] for case in cases]
    longest = max(len(requests) for requests in by_case)
    return [
        (requests[index % len(requests)][0], requests[index % len(requests)][1])
        for index in range(longest)
        for requests in by_case
    ]


# 5: known-foreign look-ups


def digest_of(kind: str, index: int) -> str:
    return "sha256:" + hashlib.sha256(f"{kind}-{index}".encode()).hexdigest()


def foreign_layers(count: int, with_diff_ids: bool) -> list[ForeignLayer]:
    return [
        ForeignLayer(
            digest=digest_of("foreign", index),
            media_type=FOREIGN_TYPE,
            size=100 * MIB + index,
            urls=(f"https://example.invalid/layers/{index}",),
            diff_id=digest_of("diff", index) if with_diff_ids else None,
        )
        for index in range(count)
    ]


def decide_cost(plan: Plan, results: Results) -> None:
    """Policy.decide with a realistic policy (two rules), against an empty and a 100k dict."""
    policy = Policy(
        default=Action.DROP, rules=(Rule("mirror/windows/**", Action.ALLOW), Rule("ci/**", Action.REJECT))
    )
    full = {layer.digest: layer for layer in foreign_layers(plan.known_digests, with_diff_ids=True)}
    empty: dict[str, ForeignLayer] = {}
    miss = [digest_of("ordinary", 1)]
    hit = [digest_of("foreign", plan.known_digests // 2)]
    repository = "team/app"

    def per_call(known: dict[str, ForeignLayer], digests: list[str]) -> float:
        timer = timeit.Timer(lambda: policy.decide(repository, digests, known))
        return min(timer.repeat(repeat=5, number=plan.decide_calls)) / plan.decide_calls * 1e9

    figures = {
        "decide miss empty": per_call(empty, miss),
        "decide miss full": per_call(full, miss),
        "decide hit full": per_call(full, hit),
    }
    for key, value in figures.items():
        results.add(key, "gateway", value)
    count = f"{plan.known_digests // 1000}k"
    row = results.row("decide miss empty", "ns")
    row.figure = "Policy.decide, ordinary digest, empty dict"
    row = results.row("decide miss full", "ns")
    row.figure = f"Policy.decide, ordinary digest, {count}-digest dict"
    row.target = "<= 1.25 x empty dict"
    row.met = figures["decide miss full"] <= 1.25 * figures["decide miss empty"]
    results.row("decide hit full", "ns").figure = f"Policy.decide, known foreign digest, {count}-digest dict"


async def fill_store(path: Path, layers: list[ForeignLayer]) -> None:
    store = SqliteStore(path)
    try:
        for start in range(0, len(layers), 10_000):
            await store.learn(layers[start : start + 10_000], Sighting("bench", "bench/seed"))
    finally:
        await store.close()


def known_phase(plan: Plan, services: Services, wrk: Wrk, cases: list[SmallCase], results: Results) -> None:
    decide_cost(plan, results)
    known_end_to_end(plan, services, wrk, cases, results)


def known_end_to_end(plan: Plan, services: Services, wrk: Wrk, cases: list[SmallCase], results: Results) -> None:
    """Small requests through gateways whose sqlite store is empty, or holds the digests (with or without
    diff_ids); blob HEADs consult the known set (policy.pretend_present) and manifest GETs review layers."""
    count = f"{plan.known_digests // 1000}k"
    variants = {"empty": [], count: foreign_layers(plan.known_digests, False)}
    variants[f"{count} + diff_ids"] = foreign_layers(plan.known_digests, True)
    gateways: dict[str, GatewayProcess] = {}
    for variant, layers in variants.items():
        path = services.workdir / f"store-{len(gateways)}.db"
        started = time.perf_counter()
        asyncio.run(fill_store(path, layers))
        filled = time.perf_counter() - started
        gateway, startup = services.gateway(
            f"gateway-store-{len(gateways)}", f"sqlite:///{path}", {"policy": {"pretend_present": True}}
        )
        gateways[variant] = gateway
        results.add("store startup", variant, startup)
        results.add("store rss", variant, rss_mib(gateway.process.pid))
        note(f"  store {variant:<16} filled in {filled:5.1f} s, gateway up in {startup:4.2f} s, "
             f"RSS {rss_mib(gateway.process.pid):.1f} MiB")  # fmt: skip
    chosen = [case for case in cases if case.key in {"blob-head", "manifest-different"}]
    for gateway in gateways.values():
        for case in chosen if plan.mode == "full" else ():
            wrk.run(gateway.host_port, case.requests, 16, 1, WRK_HEADERS)
    names = list(gateways)
    for round_index in range(plan.known_rounds):
        shift = round_index % len(names)
        for variant in names[shift:] + names[:shift]:
            for case in chosen:
                result = wrk.run(gateways[variant].host_port, case.requests, 16, plan.wrk_seconds, WRK_HEADERS)
                results.add(f"store {case.key}", variant, result.rps)
                note(f"  round {round_index + 1} store {variant:<16} {case.key:<20} {result.rps:8.0f} req/s")
    for case in chosen:
        baseline = results.median(f"store {case.key}", "empty")
        for variant in names:
            value = results.median(f"store {case.key}", variant)
            label = "blob HEAD (pretend_present on)" if case.key == "blob-head" else "manifest GET, different"
            row = Row(f"{label}, 16 connections, store: {variant}", "req/s", gateway=value)
            if variant != "empty" and value is not None and baseline:
                row.target = ">= 0.95 x empty store"
                row.met = value >= 0.95 * baseline
                row.note = f"{value / baseline:.2f} x empty store"
            results.rows.append(row)
    for variant in names:
        results.rows.append(Row(f"gateway start-up, store: {variant}", "s", gateway=results.median("store startup", variant)))
        results.rows.append(Row(f"gateway RSS when idle, store: {variant}", "MiB", gateway=results.median("store rss", variant)))


# The table


def formatted(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in {"req/s", "ns"}:
        return f"{value:,.0f}"
    if unit in {"MiB", "ms"}:
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return f"{value:.2f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: Sequence[Row]) -> str:
    header = ["figure", "unit", "direct", "nginx", "gateway", "gateway/direct", "gateway/nginx", "target", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**NO**")
        target = f"{row.target} ({row.note})" if row.note else row.target
        cells = [
            row.figure, row.unit, formatted(row.direct, row.unit), formatted(row.nginx, row.unit),
            formatted(row.gateway, row.unit), ratio(row.to_direct), ratio(row.to_nginx), target, met,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def event_loop_of(pid: int) -> str:
    """uvloop when the gateway process has it loaded (the `speed` extra), else asyncio's own loop."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    return "uvloop" if "/uvloop/" in maps else "asyncio"


README_START = "<!-- latest-results:start -->"
README_END = "<!-- latest-results:end -->"


def update_readme(readme: Path, document: dict[str, Any]) -> None:
    """Put the run's table, and the machine it ran on, between the README's markers."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    box = document["machine"]
    disturbed = {
        phase: load["others_share_of_machine"]
        for phase, load in document["extra"].get("other_processes", {}).items()
        if load["others_share_of_machine"] > 0.05
    }
    lines = [
        README_START,
        f"Run of {document['generated']} ({document['mode']} mode, {document['elapsed_s']:.0f} s), in `results/latest.json`:",
        "",
        (
            f"- machine: {box['nproc']} cores ({box['cpu_model']}), {box['memory_gib']} GiB, "
            f"Linux {box['kernel']}, Python {box['python']}, aiohttp {box['aiohttp']}"
        ),
        f"- {box['registry']}; {box['nginx']}; {box['wrk']}",
        f"- gateway: `{document['gateway_command']}` ({document['gateway_event_loop']} event loop), "
        f"commit {document['code']['commit']}"
        + (" with local changes to proxy/" if document["code"]["proxy_files_changed_since"] else ""),
        f"- registry storage and test files on {document['storage']}",
    ]
    if disturbed:
        shares = ", ".join(f"{phase} {100 * share:.0f}%" for phase, share in disturbed.items())
        lines.append(f"- **disturbed**: other processes took part of the machine during phases: {shares}")
    lines += ["", document["table_markdown"], README_END]
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + "\n".join(lines) + text[end:])


# Main


def run(plan: Plan, output: Path, profile: Path | None, phases: set[str], readme: Path | None) -> int:
    results = Results(plan)
    began = time.perf_counter()
    needed = plan.blob_bytes * 2 + plan.concurrent_uploads * plan.concurrent_blob_bytes + plan.concurrent_blob_bytes
    with Services.running(needed) as services:
        assert services.registry is not None
        if os.getloadavg()[0] > 0.5:
            note(f"WARNING: load average {os.getloadavg()[0]:.1f} before the start: something else is running")
        note(f"work folder {services.workdir} on {services.storage}; registry {services.registry.url}")
        gateway, startup = services.gateway("gateway")
        results.extra["gateway_startup_s"] = startup
        targets = services.targets(gateway)
        gateway_pid = gateway.process.pid
        results.extra["gateway_rss_idle_mib"] = rss_mib(gateway_pid)
        wrk = Wrk(services.workdir)
        note(f"creating a {mib(plan.blob_bytes)} random blob")
        blob, _ = Blob.create(services.workdir / "blob", plan.blob_bytes)

        if phases & {"small", "rss", "known"}:
            note(f"pushing {plan.manifests} manifests to the registry")
            started = time.perf_counter()
            manifests, _ = push_manifests(services.registry.host_port, SMALL_REPOSITORY, plan.manifests)
            with HttpConnection(services.registry.host_port) as connection:
                empty_blob = put_blob_bytes(connection, SMALL_REPOSITORY, b"")
            note(f"  pushed in {time.perf_counter() - started:.1f} s")
            cases = small_cases(wrk, manifests, empty_blob)
        steps: list[tuple[str, str, Callable[[], None]]] = [
            ("large", "1-2. large blobs: wall time and proxy CPU", lambda: large_blobs(plan, targets, blob, results)),
            ("small", "3. small requests (wrk, 1 thread)", lambda: small_requests(plan, targets, wrk, cases, results)),
            ("memory", "4. memory: concurrent uploads", lambda: concurrent_uploads(plan, targets, blob, results)),
            ("rss", "4. memory: RSS over many small requests", lambda: rss_growth(plan, gateway, wrk, cases, results)),
            ("known", "5. known-foreign look-ups", lambda: known_phase(plan, services, wrk, cases, results)),
        ]
        for phase, title, step in steps:
            if phase not in phases:
                continue
            note(title)
            load = ForeignLoad(services)
            load.start()
            with profiled(profile, phase, gateway_pid, results):
                step()
            busy = results.extra.setdefault("other_processes", {})[phase] = load.stop()
            if busy["others_share_of_machine"] > 0.05:
                note(f"  WARNING: other processes took {100 * busy['others_share_of_machine']:.0f}% of the machine "
                     "during this phase; its figures are disturbed")  # fmt: skip
        results.extra["gateway_rss_final_mib"] = rss_mib(gateway_pid)
        storage = services.storage
        gateway_command = " ".join(["python", *gateway.process.args[1:]])
        gateway_loop = event_loop_of(gateway_pid)
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
    if readme is not None:
        update_readme(readme, document)
        print(f"table written to {readme}")
    return 0


ALL_PHASES = ("large", "small", "memory", "rss", "known")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one round, short wrk runs")
    parser.add_argument("--output", type=Path, help="JSON results (default bench/results/latest.json, or quick.json)")
    parser.add_argument("--phases", default=",".join(ALL_PHASES), help=f"comma-separated subset of {ALL_PHASES}")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="attach py-spy to the gateway during the large and small phases; raw stacks into DIR")  # fmt: skip
    args = parser.parse_args(argv)
    phases = {phase.strip() for phase in args.phases.split(",") if phase.strip()}
    unknown = phases - set(ALL_PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    plan = QUICK if args.quick else FULL
    output = args.output or BENCH_DIR / "results" / ("quick.json" if args.quick else "latest.json")
    # Only a complete, unprofiled full run to the default place replaces the README's table.
    complete = not args.quick and args.output is None and args.profile is None and phases == set(ALL_PHASES)
    return run(plan, output, args.profile, phases, BENCH_DIR / "README.md" if complete else None)


if __name__ == "__main__":
    sys.exit(main())
