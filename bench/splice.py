"""The gateway's CPU per GiB with `server.splice` on and off, against tuned nginx, and its peak RSS under
many concurrent uploads, in one run with alternating rounds.

    .venv/bin/python bench/splice.py [--size-mib 256] [--rounds 3] [--uploads 128] [--upload-mib 16]

A real docker-registry on tmpfs; in front of it tuned nginx (one worker, no buffering, keep-alive
upstream, the gateway's 128 KiB buffers) and two gateways (`--log-level warning`, memory store), one with
`server.splice: false`. Each round takes the three through, in an order that rotates, a blob download
(GET), a monolithic upload (POST + one PUT) and a chunked one (POST, PATCHes of 8 MiB with Content-Length,
empty PUT); the CPU (utime + stime, /proc) of the proxy process over each, per GiB. A spliced upload closes
its client connection after the answer: the client here opens a new one, as registry clients do.

Then, for each gateway in turn, `--uploads` monolithic uploads of `--upload-mib` at once, and its peak RSS
(VmHWM, reset just before). Prints a table and the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from harness import (
    GIB,
    MIB,
    Blob,
    HttpConnection,
    Nginx,
    Response,
    Services,
    Target,
    cpu_seconds,
    download,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    run_parallel,
    upload_chunked,
    upload_monolithic,
)

TUNED = """proxy_buffering off;
            client_body_buffer_size 128k;
            proxy_buffer_size 128k;
            proxy_buffers 4 128k;"""
COPY = {"server": {"splice": False}}
RSS_TARGET_MIB = 100.0


class Reconnecting(HttpConnection):
    """A keep-alive connection that opens a new one when an answer says `Connection: close`."""

    def request(
        self, method: str, target: str, headers: Mapping[str, str] | None = None, body: bytes = b"",
        body_file: tuple[IO[bytes], int, int] | None = None, keep_body: bool = True,
    ) -> Response:  # fmt: skip
        response = super().request(method, target, headers, body, body_file, keep_body)
        if response.headers.get("connection", "").lower() == "close":
            self.sock.close()
            HttpConnection.__init__(self, self.host_port)
        return response


def tuned_nginx(services: Services) -> Target:
    assert services.registry is not None
    nginx = Nginx(services.workdir / "nginx-tuned", services.registry.host_port)
    text = nginx.config_path.read_text()
    assert text.count("proxy_buffering off;") == 1
    nginx.config_path.write_text(text.replace("proxy_buffering off;", TUNED))
    services.nginx = nginx.start()
    return Target("nginx", nginx.host_port, (nginx.worker_pid,))


def cpu_per_gib(target: Target, size: int, work: Callable[[HttpConnection], None]) -> float:
    with Reconnecting(target.host_port) as connection:
        pid = target.pids[0]
        before = cpu_seconds(pid)
        work(connection)
        return (cpu_seconds(pid) - before) / (size / GIB)


def metric(host_port: str, name: str) -> dict[str, float]:
    """Samples of one metric on an admin listener, by their labels' values."""
    with HttpConnection(host_port) as connection:
        response = connection.request("GET", "/metrics")
    found: dict[str, float] = {}
    for line in response.body.decode().splitlines():
        if line.startswith((name + "{", name + " ")):
            labels, _, value = line.rpartition(" ")
            found[labels[len(name):]] = float(value)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="blob size for the CPU rounds (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="CPU rounds (0: only the RSS phase)")
    parser.add_argument("--uploads", type=int, default=128, help="concurrent uploads for the RSS phase (0: skip)")
    parser.add_argument("--upload-mib", type=int, default=16, help="size of each concurrent upload")
    args = parser.parse_args(argv)
    size = args.size_mib * MIB
    started = time.monotonic()
    with Services.running(4 * size + 2 * args.uploads * args.upload_mib * MIB, with_nginx=False) as services:
        assert services.registry is not None
        nginx = tuned_nginx(services)
        spliced, _ = services.gateway("gateway-splice")
        copied, _ = services.gateway("gateway-copy", config=COPY)
        targets = [
            nginx,
            Target("gateway splice", spliced.host_port, (spliced.process.pid,)),
            Target("gateway copy", copied.host_port, (copied.process.pid,)),
        ]
        blob, _ = Blob.create(services.workdir / "blob", size)
        with HttpConnection(services.registry.host_port) as direct:
            upload_monolithic(direct, "bench/splice", blob)
        operations: dict[str, Callable[[HttpConnection], None]] = {
            "download (GET)": lambda c: download(c, "bench/splice", blob.digest, size),
            "upload (POST + PUT)": lambda c: upload_monolithic(c, "bench/splice", blob),
            "upload (PATCH 8 MiB)": lambda c: upload_chunked(c, "bench/splice", blob, 8 * MIB),
        }
        figures: dict[str, dict[str, list[float]]] = {op: {t.name: [] for t in targets} for op in operations}
        for round_index in range(args.rounds):
            order = targets[round_index % len(targets):] + targets[: round_index % len(targets)]
            for operation, work in operations.items():
                for target in order:
                    figures[operation][target.name].append(cpu_per_gib(target, size, work))
            print(f"round {round_index + 1}: " + "; ".join(
                f"{op}: " + ", ".join(f"{name} {values[-1]:.3f}" for name, values in by_target.items())
                for op, by_target in figures.items()), file=sys.stderr)  # fmt: skip
        spliced_bytes = metric(f"127.0.0.1:{spliced.admin_port}", "foreign_layer_proxy_spliced_bytes_total")
        copy_spliced = metric(f"127.0.0.1:{copied.admin_port}", "foreign_layer_proxy_spliced_bytes_total")
        rss: dict[str, dict[str, float]] = {}
        if args.uploads:
            small, _ = Blob.create(services.workdir / "small", args.upload_mib * MIB)
            for gateway in (spliced, copied, spliced, copied):
                name = "gateway splice" if gateway is spliced else "gateway copy"
                pid = gateway.process.pid
                before = rss_mib(pid)
                reset_peak_rss(pid)

                def push(index: int, host_port: str = gateway.host_port) -> None:
                    with Reconnecting(host_port) as connection:
                        upload_monolithic(connection, f"bench/rss{index}", small)

                wall = run_parallel(args.uploads, push)
                peak = peak_rss_mib(pid)
                entry = rss.setdefault(name, {"before_mib": before, "peak_mib": 0.0, "wall_s": wall})
                entry["peak_mib"] = max(entry["peak_mib"], peak)
    medians = {op: {name: statistics.median(values) for name, values in by.items() if values} for op, by in figures.items()}
    print(f"\nproxy CPU per GiB (median of {args.rounds} rounds, {args.size_mib} MiB blob):")
    print("| transfer | nginx (tuned) | gateway splice | gateway copy | splice/nginx | copy/nginx |")
    print("|---|---|---|---|---|---|")
    for op, by in medians.items():
        if not by:
            continue
        nginx_cpu = by["nginx"]
        print(f"| {op} | {nginx_cpu:.3f} | {by['gateway splice']:.3f} | {by['gateway copy']:.3f} "
              f"| {by['gateway splice'] / nginx_cpu:.2f} | {by['gateway copy'] / nginx_cpu:.2f} |")  # fmt: skip
    for name, entry in rss.items():
        verdict = "met" if entry["peak_mib"] < RSS_TARGET_MIB else "NOT met"
        print(f"{name}: {args.uploads} concurrent uploads of {args.upload_mib} MiB: RSS {entry['before_mib']:.1f} MiB "
              f"before, peak {entry['peak_mib']:.1f} MiB (target < {RSS_TARGET_MIB:g} MiB: {verdict})")  # fmt: skip
    result: dict[str, Any] = {
        "size_mib": args.size_mib, "rounds": args.rounds, "cpu_s_per_gib": figures, "medians": medians,
        "rss": rss, "spliced_bytes": {"splice": spliced_bytes, "copy": copy_spliced},
        "seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
