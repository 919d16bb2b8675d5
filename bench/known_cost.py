"""What a known set of N digests costs one process: memory held, load time, and Policy.decide per call.

    .venv/bin/python bench/known_cost.py [N]
    .venv/bin/python bench/known_cost.py --gateway sqlite|redis [--learn 5] [N]

Memory is what tracemalloc sees held by the KnownForeign after the store's snapshot is dropped, plus the
hash indexes, which are anonymous mappings of their own (tracemalloc does not see them).

With --gateway, a store (a SQLite file, or a redis-server of its own) is filled with N digests by the
database itself, and a gateway (`python -m proxy serve`, `policy.pretend_present: true`) is started on
it: its start-up seconds and resident memory against a gateway on an empty store of the same kind;
then, --learn times, `foreign-layer-proxy learn` teaches one new digest (a manifest file) while a
client HEADs it through the gateway every 5 ms (a HEAD of a known digest is answered by the gateway
itself): the seconds from the end of `learn` until the gateway answers it, the gateway's CPU over
that change (less its idle CPU), and the slowest answer to a HEAD of an already known digest, sent
every 5 ms meanwhile (what a request waits while the process takes the change in).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

from harness import cpu_seconds, status_kib
from support.gateway import GatewayProcess
from support.services import RedisServer

from proxy.known import KnownForeign
from proxy.manifests import ForeignLayer
from proxy.policy import Policy
from proxy.store import KnownSnapshot, MemoryStore

FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
CALLS = 100_000


class SnapshotStore(MemoryStore):
    def __init__(self, layers: dict[str, ForeignLayer]):
        super().__init__()
        self.layers = layers

    async def snapshot(self) -> KnownSnapshot:
        return KnownSnapshot(1, self.layers, {})


def digest(number: int) -> str:
    return f"sha256:{number:064x}"


def per_call_us(policy: Policy, known: KnownForeign, digests: list[str]) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for candidate in digests:
            policy.decide("team/app", (candidate,), known.layers, known.diff_ids, known.reach)
        best = min(best, time.perf_counter() - started)
    return best / len(digests) * 1e6


async def main(count: int) -> None:
    tracemalloc.start()
    layers = {digest(n): ForeignLayer(digest(n), FOREIGN, 1000 + n) for n in range(count)}
    store = SnapshotStore(layers)
    known = KnownForeign(store)
    started = time.perf_counter()
    await known.reload()
    loaded = time.perf_counter() - started
    store.layers = {}
    del layers
    gc.collect()
    indexes = sum(len(index.slots) * index.slots.itemsize for index in (known.layers._by_digest, known.layers._by_diff_id))
    held = (tracemalloc.get_traced_memory()[0] + indexes) / 2**20
    tracemalloc.stop()
    print(f"{count} digests: held {held:.0f} MiB (tracemalloc and indexes), reload {loaded:.2f} s under tracemalloc")
    known = KnownForeign(SnapshotStore({digest(n): ForeignLayer(digest(n), FOREIGN, 1000 + n) for n in range(count)}))
    started = time.perf_counter()
    await known.reload()
    print(f"reload without tracemalloc: {time.perf_counter() - started:.2f} s")
    policy = Policy()
    hits = [digest(n * 7 % count) for n in range(CALLS)]
    misses = [digest(count + n) for n in range(CALLS)]
    print(f"decide, known digest (each once):  {per_call_us(policy, known, hits):.2f} us/call")
    repeated = [digest(n % 100) for n in range(CALLS)]
    print(f"decide, known digest (100 pushed again and again): {per_call_us(policy, known, repeated):.2f} us/call")
    print(f"decide, unknown digest: {per_call_us(policy, known, misses):.2f} us/call")


# The stores filled by the database itself: no Python loop over a million rows.
FILL_SQLITE = """
    WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
    INSERT INTO foreign_layers (digest, media_type, size, urls, diff_id, first_source, first_seen,
                                last_source, last_seen, teachings)
    SELECT printf('sha256:%064x', i), ?, 1000 + i, '[]', NULL, 'learn', 0, 'learn', 0, ? FROM n
"""
FILL_REDIS = """
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
    redis.call('HSET', KEYS[1], string.format('sha256:%064x', i), string.format(ARGV[3], 1000 + i))
end
"""
PROBE_EVERY = 0.005


async def filled_store(kind: str, count: int, workdir: Path, redis_server: RedisServer | None) -> str:
    """A store of `kind` with `count` digests (0: empty, but with its schema); its URL."""
    from proxy.store import Sighting, open_store

    url = redis_server.url() if redis_server is not None else f"sqlite:///{workdir / f'known-{count}.db'}"
    store = open_store(url)
    await store.learn([ForeignLayer(digest(0), FOREIGN, 1)], Sighting("learn"))
    await store.close()
    if count and redis_server is not None:
        value = json.dumps([FOREIGN, 0, [], None, None]).replace("0", "%d", 1)
        with redis_server.client() as client:
            for first in range(1, count + 1, 250_000):
                client.eval(FILL_REDIS, 1, "foreign-layer-proxy:layers", first, min(count, first + 249_999), value)
    elif count:
        import sqlite3

        with sqlite3.connect(workdir / f"known-{count}.db") as connection:
            connection.execute(FILL_SQLITE, (count, FOREIGN, json.dumps([[None, "learn", None, "*", False, 0.0]])))
        connection.close()
    return url


def head_status(gateway: GatewayProcess, digest_text: str) -> tuple[int, float]:
    connection = http.client.HTTPConnection(gateway.host_port, timeout=30)
    started = time.perf_counter()
    connection.request("HEAD", f"/v2/probe/app/blobs/{digest_text}")
    status = connection.getresponse().status
    connection.close()
    return status, time.perf_counter() - started


def started_gateway(workdir: Path, url: str) -> tuple[GatewayProcess, float]:
    gateway = GatewayProcess(
        workdir, "http://127.0.0.1:9", args=["--log-level", "warning"], store=url,
        config={"policy": {"pretend_present": True}},
    )  # fmt: skip
    started = time.perf_counter()
    gateway.process.start()
    gateway.process.wait_until(lambda: head_ready(gateway), timeout=300, what="the gateway answering")
    return gateway, time.perf_counter() - started


def head_ready(gateway: GatewayProcess) -> bool:
    try:
        return head_status(gateway, digest(0))[0] == 200
    except OSError:
        return False


def manifest_naming(number: int, workdir: Path) -> Path:
    path = workdir / f"manifest-{number}.json"
    path.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2, "digest": digest(7)},
        "layers": [{"mediaType": FOREIGN, "size": 1234, "digest": digest(number)}],
    }))  # fmt: skip
    return path


def loop_lag_max(gateway: GatewayProcess) -> float:
    """The gateway's foreign_layer_proxy_event_loop_lag_max_seconds gauge."""
    connection = http.client.HTTPConnection(f"127.0.0.1:{gateway.admin_port}", timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(LAG_MAX))


LAG_MAX = "foreign_layer_proxy_event_loop_lag_max_seconds "


def one_change(gateway: GatewayProcess, url: str, number: int, workdir: Path) -> dict[str, float]:
    """`learn` one new digest; seconds until the gateway enforces it, its CPU meanwhile, the slowest probe."""
    slowest = [0.0]
    done = threading.Event()

    def probe_known() -> None:
        while not done.is_set():
            slowest[0] = max(slowest[0], head_status(gateway, digest(1))[1])
            time.sleep(PROBE_EVERY)

    prober = threading.Thread(target=probe_known)
    prober.start()
    time.sleep(1.0)
    slowest[0], lag_before = 0.0, loop_lag_max(gateway)
    idle_from, idle_cpu = time.perf_counter(), cpu_seconds(gateway.process.pid)
    time.sleep(2.0)
    idle_rate = (cpu_seconds(gateway.process.pid) - idle_cpu) / (time.perf_counter() - idle_from)
    slowest_idle, slowest[0] = slowest[0], 0.0
    cpu, since = cpu_seconds(gateway.process.pid), time.perf_counter()
    learned = subprocess.run(
        [sys.executable, "-m", "proxy", "learn", "--store", url, str(manifest_naming(number, workdir))],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert digest(number) in learned.stdout, learned
    learned_at = time.perf_counter()
    while head_status(gateway, digest(number))[0] != 200:
        assert time.perf_counter() - learned_at < 60, "never enforced"
        time.sleep(PROBE_EVERY)
    enforced = time.perf_counter() - learned_at
    time.sleep(1.0)
    window = time.perf_counter() - since
    change_cpu = cpu_seconds(gateway.process.pid) - cpu - idle_rate * window
    done.set()
    prober.join()
    return {
        "enforced_after_s": enforced,
        "change_cpu_ms": change_cpu * 1000,  # over the probes' own cost, measured for 2 s before
        "slowest_probe_ms": slowest[0] * 1000,
        "slowest_probe_before_ms": slowest_idle * 1000,
        "loop_lag_max_before_s": lag_before,
        "loop_lag_max_after_s": loop_lag_max(gateway),
    }


async def gateway_costs(kind: str, count: int, changes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="known-cost-") as scratch:
        workdir = Path(scratch)
        redis_server = RedisServer(workdir).start() if kind == "redis" else None
        try:
            figures = {}
            for size in (0, count):
                url = await filled_store(kind, size, workdir, redis_server)
                (workdir / str(size)).mkdir()
                gateway, seconds = started_gateway(workdir / str(size), url)
                try:
                    figures[size] = {"start_s": seconds, "start_cpu_s": cpu_seconds(gateway.process.pid),
                                     "rss_mib": status_kib(gateway.process.pid, "VmRSS") / 1024,
                                     "peak_mib": status_kib(gateway.process.pid, "VmHWM") / 1024}  # fmt: skip
                    if size:
                        rounds = [one_change(gateway, url, count + 10 + n, workdir) for n in range(changes)]
                finally:
                    gateway.stop()
                if redis_server is not None and size == 0:
                    redis_server.flush()
        finally:
            if redis_server is not None:
                redis_server.stop()
    empty, full = figures[0], figures[count]
    print(json.dumps({
        "store": kind, "digests": count,
        "start_s": {"empty": round(empty["start_s"], 2), "known": round(full["start_s"], 2)},
        "start_cpu_s": {"empty": round(empty["start_cpu_s"], 2), "known": round(full["start_cpu_s"], 2)},
        "rss_mib": {"empty": round(empty["rss_mib"], 1), "known": round(full["rss_mib"], 1),
                    "added": round(full["rss_mib"] - empty["rss_mib"], 1), "peak_added": round(full["peak_mib"] - empty["rss_mib"], 1)},
        "changes": [{key: round(value, 3) for key, value in change.items()} for change in rounds],
        "median": {key: round(statistics.median(change[key] for change in rounds), 3) for key in rounds[0]},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("count", nargs="?", type=int, default=1_000_000)
    parser.add_argument("--gateway", choices=["sqlite", "redis"])
    parser.add_argument("--learn", type=int, default=5, help="with --gateway: how many changes to time")
    options = parser.parse_args()
    if options.gateway:
        asyncio.run(gateway_costs(options.gateway, options.count, options.learn))
    else:
        asyncio.run(main(options.count))
