"""What a known set of N digests costs one process: memory held, load time, and Policy.decide per call.

    .venv/bin/python bench/known_cost.py [N]

Memory is what tracemalloc sees held by the KnownForeign after the store's snapshot is dropped.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import tracemalloc

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
    held = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    print(f"{count} digests: held {held:.0f} MiB (tracemalloc), reload {loaded:.2f} s under tracemalloc")
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


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
