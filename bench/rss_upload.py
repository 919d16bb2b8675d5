"""One-off: how much one 1 GiB upload (POST + one PUT) through the gateway raises its RSS.

    .venv/bin/python bench/rss_upload.py [--size-mib 1024] [--chunked]

The gateway is started fresh (`python -m proxy serve`, logging as shipped, memory store) in front of a
real docker-registry on tmpfs, warmed up with one 1 MiB upload, then its peak RSS (VmHWM, reset just
before) is read around the big upload. Target (foundation issue): an increase below 20 MiB.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from harness import (
    MIB,
    Blob,
    HttpConnection,
    Services,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    upload_chunked,
    upload_monolithic,
)

LIMIT_MIB = 20.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="upload size (default 1024)")
    parser.add_argument("--chunked", action="store_true", help="PATCHes of 8 MiB instead of one PUT")
    args = parser.parse_args(argv)
    size = args.size_mib * MIB
    with Services.running(2 * size) as services:
        gateway, _ = services.gateway("gateway")
        pid = gateway.process.pid
        blob, prefixes = Blob.create(services.workdir / "blob", size, [MIB])
        with HttpConnection(gateway.host_port) as connection:
            upload_monolithic(connection, "bench/rss", blob.prefix(MIB, prefixes[MIB]))
        before = rss_mib(pid)
        reset_peak_rss(pid)
        started = time.perf_counter()
        with HttpConnection(gateway.host_port) as connection:
            if args.chunked:
                upload_chunked(connection, "bench/rss", blob, 8 * MIB)
            else:
                upload_monolithic(connection, "bench/rss", blob)
        elapsed = time.perf_counter() - started
        peak, after = peak_rss_mib(pid), rss_mib(pid)
    increase = peak - before
    form = "chunked (PATCH 8 MiB)" if args.chunked else "POST + one PUT"
    print(f"{args.size_mib} MiB upload, {form}, through the gateway in {elapsed:.2f} s")
    print(f"gateway RSS before {before:.1f} MiB, peak during {peak:.1f} MiB, after {after:.1f} MiB")
    verdict = "met" if increase < LIMIT_MIB else "NOT met"
    print(f"RSS increase (peak - before): {increase:.1f} MiB (target < {LIMIT_MIB:g} MiB: {verdict})")
    return 0 if increase < LIMIT_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
