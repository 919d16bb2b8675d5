"""The gateway's own CPU per pass-through request, against nginx's, in front of a static upstream.

The upstream is nginx answering every request itself (`GET /v2/`, a manifest with its digest, a blob HEAD),
so that only the proxy's own cost shows. In one run, rounds alternate between (in a rotating order):

- `nginx`: nginx (one worker, as bench/run.py configures it) proxying to the static upstream;
- `aiohttp-constant`: a bare aiohttp server answering `{}` itself (aiohttp's server floor);
- `aiohttp-relay`: a bare aiohttp handler passing each request to the static upstream with aiohttp's client;
- each gateway variant (`--variant NAME=DIR_OR_REF`, default this checkout and `--base REF`), at the default
  log level (info: one access-log line per request) and at warning.

Each measurement is wrk (one thread) for `--seconds` against one target; CPU is utime + stime from
/proc/PID/stat of the target's process (the nginx worker), divided by the requests served. Medians over
rounds, and the ratio of each to nginx. `--profile DIR` records the gateways with py-spy afterwards.

On a busy machine those figures vary by 20 % from round to round; `--callgrind N` instead counts the user-space
instructions (valgrind's callgrind, instrumentation switched on after a warm-up) each server spends on N
requests of the mix, repeatable to about a percent: the measure for comparing changes of Python code.

    .venv/bin/python bench/hotpath.py [--base REF] [--rounds 5] [--seconds 3] [--connections 16]
    .venv/bin/python bench/hotpath.py --callgrind 600 --base REF --variant NAME=REF --levels warning
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import harness
from harness import CLOCK_TICKS, EMPTY_BLOB, HOST, Nginx, Wrk
from support.processes import ManagedProcess, free_port

REPOSITORY = "library/app"
REQUESTS = {
    "base": ("GET", "/v2/"),
    "manifest": ("GET", f"/v2/{REPOSITORY}/manifests/latest"),
    "blob_head": ("HEAD", f"/v2/{REPOSITORY}/blobs/{EMPTY_BLOB}"),
}
CHECKOUT = Path(__file__).resolve().parent.parent

BARE_SERVER = """
import asyncio, sys
import aiohttp, uvloop
from aiohttp import web
from multidict import CIMultiDict

mode, port = sys.argv[1], int(sys.argv[2])
upstream = sys.argv[3] if len(sys.argv) > 3 else ""
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}

async def constant(request):
    if request.method == "HEAD":  # wrk reads a HEAD answer without Content-Length until the connection closes
        return web.Response(headers={"Content-Length": "0"}, content_type="application/json")
    return web.Response(body=b"{}", content_type="application/json")

async def relay(request):
    session = request.app["session"]
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP)
    async with session.request(request.method, upstream + request.raw_path, headers=headers,
                               allow_redirects=False) as answer:
        out = CIMultiDict((k, v) for k, v in answer.headers.items() if k.lower() not in HOP)
        response = web.StreamResponse(status=answer.status, headers=out)
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
        await response.write_eof()
        return response

async def session_context(app):
    app["session"] = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
    yield
    await app["session"].close()

app = web.Application()
if mode == "relay":
    app.cleanup_ctx.append(session_context)
app.router.add_route("*", "/{tail:.*}", relay if mode == "relay" else constant)
web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop())
"""


@dataclass
class Target:
    name: str
    process: ManagedProcess
    host_port: str
    nginx: Nginx | None = None
    cpu_us: list[float] = field(default_factory=list)
    system_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.nginx.worker_pid if self.nginx is not None else self.process.pid


def static_upstream(workdir: Path) -> tuple[Nginx, str]:
    """harness' static upstream (nginx answering like a registry itself) and its host:port."""
    static, url = harness.static_upstream(workdir / "static")
    return static, url.removeprefix("http://")


def source_tree(ref: str, workdir: Path) -> Path:
    """The `proxy` package as of a commit, unpacked where PYTHONPATH can put it ahead of the installed one."""
    tree = workdir / f"source-{ref.replace('/', '_')}"
    archive = subprocess.run(["git", "-C", str(CHECKOUT), "archive", ref, "proxy"], capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def start_gateway(name: str, source: Path, upstream: str, level: str, workdir: Path) -> Target:
    folder = workdir / name
    folder.mkdir()
    port = free_port()
    command, env = gateway_command(source, upstream, level, port)
    process = ManagedProcess(command, log_path=folder / "gateway.log", env=env, cwd=folder)
    process.start()
    process.wait_for_port(HOST, port)
    return Target(name, process, f"{HOST}:{port}")


def start_bare(mode: str, upstream: str, workdir: Path) -> Target:
    port = free_port()
    script = workdir / "bare.py"
    script.write_text(BARE_SERVER)
    process = ManagedProcess([sys.executable, script, mode, str(port), f"http://{upstream}"],
                             log_path=workdir / f"bare-{mode}.log")  # fmt: skip
    process.start()
    process.wait_for_port(HOST, port)
    return Target(f"aiohttp-{mode}", process, f"{HOST}:{port}")


def user_system(pid: int) -> tuple[float, float]:
    """utime and stime of a process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def measure(wrk: Wrk, target: Target, requests: Path, connections: int, seconds: int) -> None:
    pid = target.pid
    user, system = user_system(pid)
    result = wrk.run(target.host_port, requests, connections, seconds, {})
    user_after, system_after = user_system(pid)
    target.cpu_us.append((user_after - user + system_after - system) / result.requests * 1e6)
    target.system_us.append((system_after - system) / result.requests * 1e6)
    target.rps.append(result.rps)


def send_requests(host_port: str, requests: list[tuple[str, str]], count: int, connections: int = 4) -> None:
    """`count` requests of the mix over `connections` keep-alive connections, one after the other on each."""
    host, port = host_port.split(":")
    sockets = [socket.create_connection((host, int(port))) for _ in range(connections)]
    try:
        for index in range(0, count, connections):
            sent = []
            for number, sock in enumerate(sockets):
                method, target = requests[(index + number) % len(requests)]
                sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: {host_port}\r\n\r\n".encode())
                sent.append(method)
            for sock, method in zip(sockets, sent, strict=True):
                read_answer(sock, method)
    finally:
        for sock in sockets:
            sock.close()


def read_answer(sock: socket.socket, method: str) -> None:
    """One 200 answer: its head, then as many body bytes as its Content-Length says (the mix has no chunked ones)."""
    data = b""
    while b"\r\n\r\n" not in data:
        received = sock.recv(65536)
        if not received:
            raise SystemExit("connection closed mid-answer")
        data += received
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise SystemExit(f"unexpected answer: {head!r}")
    found = re.search(rb"(?im)^content-length: *(\d+)", head)
    remaining = (int(found.group(1)) if found and method != "HEAD" else 0) - len(body)
    while remaining > 0:
        remaining -= len(sock.recv(remaining))


def gateway_command(source: Path, upstream: str, level: str, port: int) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "proxy", "serve", "--upstream", f"http://{upstream}", "--listen",
               f"{HOST}:{port}", "--admin-listen", f"{HOST}:{free_port()}", "--store", "memory://", "--log-level", level]  # fmt: skip
    return command, {"PYTHONPATH": str(source)}


def instructions(name: str, command: list[str], env: dict[str, str], port: int, workdir: Path, count: int,
                 requests: list[tuple[str, str]]) -> float:
    """Instructions (callgrind's Ir, user space only) a server spends per request, over `count` requests
    after a warm-up: repeatable to about a percent, whatever else the machine does."""
    folder = workdir / f"callgrind-{name}"
    folder.mkdir()
    out = folder / "callgrind.out"
    # A fixed hash seed: set and dict layouts, and so the instructions, then differ less from run to run.
    process = ManagedProcess(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                              *command], log_path=folder / "server.log", env={**env, "PYTHONHASHSEED": "0"},
                             cwd=folder)  # fmt: skip
    process.start()
    try:
        process.wait_for_port(HOST, port, timeout=300)
        send_requests(f"{HOST}:{port}", requests, 200)  # warm-up: pools, caches, lazily built objects
        subprocess.run(["callgrind_control", "--instr=on", str(process.pid)], check=True, capture_output=True)
        send_requests(f"{HOST}:{port}", requests, count)
        subprocess.run(["callgrind_control", "--dump", str(process.pid)], check=True, capture_output=True)
    finally:
        process.stop()
    for dump in folder.glob("callgrind.out*"):  # the dump asked for; not the one written at exit
        text = dump.read_text(errors="replace")
        found = re.search(r"^summary: (\d+)", text, re.MULTILINE)
        if found and "Trigger: Program termination" not in text:
            return int(found.group(1)) / count
    raise SystemExit(f"{name}: no callgrind dump in {folder}")


def profile(target: Target, wrk: Wrk, requests: Path, connections: int, seconds: int, folder: Path) -> None:
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    out = folder / f"{target.name}.txt"
    recorder = subprocess.Popen([str(py_spy), "record", "--format", "raw", "--rate", "500", "--nonblocking",
                                 "--pid", str(target.pid), "--output", str(out), "--duration", str(seconds + 1)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.5)
    wrk.run(target.host_port, requests, connections, seconds, {})
    recorder.wait(timeout=seconds + 30)


def gateway_sources(options: argparse.Namespace, workdir: Path) -> dict[str, Path]:
    sources = {"this": CHECKOUT}
    if not options.no_base:
        sources["base"] = source_tree(options.base, workdir)
    for variant in options.variant:
        name, _, where = variant.partition("=")
        sources[name] = Path(where).resolve() if Path(where).is_dir() else source_tree(where, workdir)
    return sources


def count_instructions(options: argparse.Namespace, workdir: Path) -> int:
    static: Nginx | None = None
    counts: dict[str, float] = {}
    requests = [REQUESTS[kind] for kind in options.kinds.split(",")]
    try:
        static, upstream = static_upstream(workdir)
        servers: dict[str, tuple[list[str], dict[str, str], int]] = {}
        if not options.no_reference:
            script = workdir / "bare.py"
            script.write_text(BARE_SERVER)
            for mode in ("constant", "relay"):
                port = free_port()
                servers[f"aiohttp-{mode}"] = [sys.executable, str(script), mode, str(port), f"http://{upstream}"], {}, port
        for name, source in gateway_sources(options, workdir).items():
            for level in options.levels.split(","):
                port = free_port()
                servers[f"{name}@{level}"] = (*gateway_command(source, upstream, level, port), port)
        for label, (command, env, port) in servers.items():
            counts[label] = instructions(label, command, env, port, workdir, options.callgrind, requests)
            print(f"{label}: {counts[label]:,.0f} instructions a request", flush=True)
    finally:
        if static is not None:
            static.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"kinds": options.kinds, "requests": options.callgrind, "instructions_per_request": counts}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="commit of the `base` gateway variant (default: main)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR_OR_REF",
                        help="more gateway variants: a directory holding a `proxy` package, or a commit")  # fmt: skip
    parser.add_argument("--no-base", action="store_true", help="only this checkout (and --variant ones)")
    parser.add_argument("--levels", default="info,warning")
    parser.add_argument("--kinds", default=",".join(REQUESTS), help=f"requests in the mix: {', '.join(REQUESTS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--no-reference", action="store_true", help="without nginx and the bare aiohttp servers")
    parser.add_argument("--callgrind", type=int, metavar="N",
                        help="instead: instructions per request of each gateway variant over N requests (valgrind)")  # fmt: skip
    parser.add_argument("--profile", type=Path, help="folder for py-spy raw (collapsed) stacks of each gateway")
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-hotpath-"))
    if options.callgrind:
        return count_instructions(options, workdir)
    targets: list[Target] = []
    static: Nginx | None = None
    try:
        static, upstream = static_upstream(workdir)
        sources = gateway_sources(options, workdir)
        if not options.no_reference:
            nginx = Nginx(workdir / "nginx", upstream).start()
            targets.append(Target("nginx", nginx.process, nginx.host_port, nginx=nginx))
            targets += [start_bare("constant", upstream, workdir), start_bare("relay", upstream, workdir)]
        for name, source in sources.items():
            for level in options.levels.split(","):
                targets.append(start_gateway(f"{name}@{level}", source, upstream, level, workdir))
        wrk = Wrk(workdir)
        requests = wrk.request_list([REQUESTS[kind] for kind in options.kinds.split(",")])
        for target in targets:
            wrk.run(target.host_port, requests, options.connections, 1, {})  # warm-up: pools, caches
        for round_number in range(options.rounds):
            shift = round_number % len(targets)
            order = targets[shift:] + targets[:shift]
            for target in order:
                measure(wrk, target, requests, options.connections, options.seconds)
            print(f"round {round_number + 1}: " + ", ".join(f"{t.name} {t.cpu_us[-1]:.0f}" for t in targets),
                  flush=True)  # fmt: skip
        if options.profile:
            options.profile.mkdir(parents=True, exist_ok=True)
            for target in targets:
                if target.nginx is None:
                    profile(target, wrk, requests, options.connections, options.seconds, options.profile)
    finally:
        for target in targets:
            target.process.stop()
        if static is not None:
            static.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {target.name: statistics.median(target.cpu_us) for target in targets}
    reference = medians.get("nginx")
    print(f"{'target':<22} {'us/request':>10} {'of it sys':>9} {'x nginx':>8} {'requests/s':>11}")
    for target in targets:
        ratio = f"{medians[target.name] / reference:.1f}" if reference else "-"
        print(f"{target.name:<22} {medians[target.name]:>10.1f} {statistics.median(target.system_us):>9.1f} {ratio:>8} "
              f"{statistics.median(target.rps):>11,.0f}")
    print(json.dumps({"kinds": options.kinds, "connections": options.connections,
                      "cpu_us_per_request": {t.name: t.cpu_us for t in targets},
                      "system_us_per_request": {t.name: t.system_us for t in targets},
                      "median_cpu_us_per_request": medians}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
