"""The CPU cost of `policy.inspect_content`: seconds of CPU per GiB of gzip layer streamed through the
inspector (sha256 of the bytes as sent, plus inflate and sha256 of the uncompressed tar), in the same
128 KiB pieces the gateway reads. Compare with the gateway's CPU per GiB of a plain upload in
bench/README.md: inspection adds this much on top.

    .venv/bin/python bench/inspect_cost.py [--mib 256]
"""

from __future__ import annotations

import argparse
import gzip
import random
import time

from proxy.forwarding import STREAM_BUFFER_BYTES
from proxy.inspection import LayerInspector


def layer(mib: int) -> bytes:
    """A gzip'd tar-like payload that compresses about 2:1, as binaries in image layers do."""
    rng = random.Random(7)
    words = [rng.randbytes(rng.randint(2, 12)) for _ in range(4096)]
    raw = b"".join(rng.choice(words) for _ in range(mib * 1024 * 1024 // 7))
    return gzip.compress(raw, compresslevel=6, mtime=0)


def cpu_seconds_per_gib(data: bytes, rounds: int = 3) -> float:
    timings = []
    for _ in range(rounds):
        inspector = LayerInspector()
        started = time.process_time()
        for offset in range(0, len(data), STREAM_BUFFER_BYTES):
            inspector.feed(data[offset : offset + STREAM_BUFFER_BYTES])
        timings.append(time.process_time() - started)
        assert inspector.diff_id() is not None
    return sorted(timings)[len(timings) // 2] * (1024**3) / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="uncompressed size of the test layer")
    data = layer(parser.parse_args().mib)
    print(f"gzip layer: {len(data) / 2**20:.0f} MiB; inspect_content CPU: {cpu_seconds_per_gib(data):.2f} s per GiB")


if __name__ == "__main__":
    main()
