"""Throughput of the gateway with 1 and with N workers (`server.workers`) in front of a static upstream.

The upstream is nginx answering every request itself (no registry), so that what is measured is the
gateway's own cost. Rounds alternate 1 worker and N workers; each figure is the median over rounds.

    .venv/bin/python bench/workers.py [--workers 2] [--rounds 3] [--seconds 5] [--connections 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from harness import (
    HOST,
    Wrk,
    children_of,
    cpu_seconds,
    start_gateway,
    system_busy_seconds,
)
from support.processes import ManagedProcess, free_port

STATIC_CONFIG = """\
{user}worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
    server {{
        listen {listen};
        default_type application/json;
        location / {{ return 200 '{{}}'; }}
    }}
}}
"""


def static_upstream(workdir: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    config = workdir / "static.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    config.write_text(STATIC_CONFIG.format(user=user, workdir=workdir, listen=f"{HOST}:{port}"))
    process = ManagedProcess(["nginx", "-c", config, "-p", workdir, "-e", workdir / "nginx-error.log"],
                             log_path=workdir / "static.log")  # fmt: skip
    process.start()
    process.wait_for_port(HOST, port)
    return process, f"http://{HOST}:{port}"


def gateway_cpu(pid: int) -> float:
    """CPU seconds of the gateway: the process and, with workers, every worker."""
    return sum(cpu_seconds(process) for process in (pid, *children_of(pid)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    options = parser.parse_args()
    rates: dict[int, list[float]] = {1: [], options.workers: []}
    cpu_per_request: dict[int, list[float]] = {1: [], options.workers: []}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as scratch:
        workdir = Path(scratch)
        upstream, upstream_url = static_upstream(workdir)
        wrk = Wrk(workdir)
        requests = wrk.request_list([("GET", "/v2/")])
        try:
            for round_number in range(options.rounds):
                order = list(rates) if round_number % 2 == 0 else list(reversed(rates))
                for workers in order:
                    gateway, _ = start_gateway(workdir / f"gateway-{round_number}-{workers}", upstream_url,
                                               store=f"sqlite:///{workdir}/store-{round_number}-{workers}.db",
                                               config={"server": {"workers": workers}})  # fmt: skip
                    try:
                        time.sleep(2.0)  # every worker listening
                        wrk.run(gateway.host_port, requests, options.connections, 1, {})  # warm-up
                        busy, own = system_busy_seconds(), gateway_cpu(gateway.process.pid)
                        result = wrk.run(gateway.host_port, requests, options.connections, options.seconds, {})
                        busy, own = system_busy_seconds() - busy, gateway_cpu(gateway.process.pid) - own
                    finally:
                        gateway.stop()
                    rates[workers].append(result.rps)
                    cpu_per_request[workers].append(own / result.requests * 1e6)
                    print(f"round {round_number + 1}: {workers} worker(s): {result.rps:,.0f} requests/s "
                          f"(p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms); gateway CPU "
                          f"{own / result.seconds:.2f} cores, {own / result.requests * 1e6:.0f} us a request; "
                          f"machine busy {busy / result.seconds:.2f} cores", flush=True)  # fmt: skip
        finally:
            upstream.stop()
    medians = {workers: statistics.median(values) for workers, values in rates.items()}
    summary = {"cores": len(os.sched_getaffinity(0)), "connections": options.connections,
               "requests_per_second": {str(workers): values for workers, values in rates.items()},
               "median": {str(workers): median for workers, median in medians.items()},
               "gateway_cpu_us_per_request": {str(workers): values for workers, values in cpu_per_request.items()},
               "ratio": medians[options.workers] / medians[1]}  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
