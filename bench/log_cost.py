"""What the access log costs: the gateway's CPU per request at `--log-level info` (a JSON line per
request) against `warning` (none), in front of a static upstream (nginx answering 200 itself), so that
only the gateway's own cost shows. Rounds alternate every combination; figures are medians.

    .venv/bin/python bench/log_cost.py [--rounds 4] [--seconds 4] [--connections 16] [--source NAME=DIR ...]

`--source` runs the gateway from another copy of the package (DIR holding `proxy/`, e.g. a `git
archive` of an older commit), to compare a change against what it replaced in the same run.
The log goes to a file, as `tests/support` runs the gateway.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from harness import Wrk
from support.gateway import GatewayProcess
from workers import gateway_cpu, static_upstream

LEVELS = ("info", "warning")


def measured(gateway: GatewayProcess, wrk: Wrk, requests: Path, connections: int, seconds: int) -> float:
    """CPU microseconds of the gateway per request, over one wrk run after a warm-up."""
    wrk.run(gateway.host_port, requests, connections, 1, {})
    own = gateway_cpu(gateway.process.pid)
    result = wrk.run(gateway.host_port, requests, connections, seconds, {})
    return (gateway_cpu(gateway.process.pid) - own) / result.requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--source", action="append", default=[], help="NAME=DIR: also run the package in DIR")
    options = parser.parse_args()
    sources: dict[str, str] = {"this": ""} | dict(item.split("=", 1) for item in options.source)
    combinations = [(source, level) for source in sources for level in LEVELS]
    costs: dict[tuple[str, str], list[float]] = {combination: [] for combination in combinations}
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as scratch:
        workdir = Path(scratch)
        upstream, upstream_url = static_upstream(workdir)
        wrk = Wrk(workdir)
        # No HEAD: wrk would wait for the body of a HEAD answer with a Content-Length.
        requests = wrk.request_list([("GET", "/v2/"), ("GET", "/v2/team/app/manifests/1"), ("GET", "/v2/team/app/tags/list")])
        try:
            for round_number in range(options.rounds):
                order = combinations if round_number % 2 == 0 else list(reversed(combinations))
                for source, level in order:
                    env = {"PYTHONPATH": sources[source]} if sources[source] else None
                    (workdir / f"{round_number}-{source}-{level}").mkdir()
                    gateway = GatewayProcess(workdir / f"{round_number}-{source}-{level}", upstream_url,
                                             args=["--log-level", level], store="memory://", env=env)  # fmt: skip
                    gateway.start()
                    try:
                        time.sleep(0.5)
                        costs[source, level].append(measured(gateway, wrk, requests, options.connections, options.seconds))
                    finally:
                        gateway.stop()
                    print(f"round {round_number + 1}: {source} at {level}: {costs[source, level][-1]:.0f} us a request", flush=True)
        finally:
            upstream.stop()
    medians = {f"{source} {level}": statistics.median(values) for (source, level), values in costs.items()}
    summary: dict[str, object] = {"cpu_us_per_request_median": {key: round(value, 1) for key, value in medians.items()}}
    summary["info_to_warning"] = {source: round(medians[f"{source} info"] / medians[f"{source} warning"], 3) for source in sources}
    summary["to_this"] = {key: round(value / medians[f"this {key.split()[1]}"], 3) for key, value in medians.items()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
