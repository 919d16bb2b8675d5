"""`server.workers`: worker processes, each the whole gateway re-executed, kept running by a supervisor.

Workers are started as new processes (the same command again, marked by an environment variable), never
forked: a forked asyncio loop, thread or open store connection is not safe to share. Each binds
`server.listen` with SO_REUSEPORT; the kernel spreads new connections between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence

from prometheus_client.multiprocess import mark_process_dead

from proxy.config import Address
from proxy.logs import log_event

logger = logging.getLogger("foreign_layer_proxy")
WORKER_ENV = "FLP_WORKER"  # outside FOREIGN_LAYER_PROXY_*, which names settings
METRICS_DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_DELAY_SECONDS = 1.0
# After server.shutdown_timeout, a worker still has to close its store and upstream connections.
EXIT_GRACE_SECONDS = 10.0


def worker_index(environ: Mapping[str, str]) -> int | None:
    """This process's number among the workers, or None when it is not one."""
    value = environ.get(WORKER_ENV)
    return int(value) if value is not None and value.isdigit() else None


def check_shared_listen(address: Address) -> None:
    """Raise OSError when workers could not bind `address` (in use by a listener without SO_REUSEPORT)."""
    with socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((address.host, address.port))


def watch_parent(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """A worker's standard input is a pipe from its supervisor: end of file means the supervisor is gone
    (even killed outright), and the worker drains and stops rather than run on unsupervised."""

    def readable() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            stop()

    loop.add_reader(sys.stdin.fileno(), readable)


class Supervisor:
    """Keeps `count` workers running until `stop`; passes signals on to them."""

    def __init__(
        self, command: Sequence[str], count: int, environ: Mapping[str, str], metrics_directory: str,
        on_restart: Callable[[], None],
    ) -> None:  # fmt: skip
        self.command = tuple(command)
        self.count = count
        self.environ = dict(environ)
        self.metrics_directory = metrics_directory
        self.on_restart = on_restart
        self.stopping = False
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self._stopped = asyncio.Event()
        self._slots: list[asyncio.Task[None]] = []

    def alive(self) -> int:
        return sum(process.returncode is None for process in self.processes.values())

    def start(self) -> None:
        self._slots = [asyncio.create_task(self._keep_running(index)) for index in range(self.count)]

    async def _keep_running(self, index: int) -> None:
        environ = self.environ | {WORKER_ENV: str(index), METRICS_DIRECTORY_ENV: self.metrics_directory}
        while not self.stopping:
            process = await asyncio.create_subprocess_exec(*self.command, env=environ, stdin=asyncio.subprocess.PIPE)
            self.processes[index] = process
            if self.stopping:  # stop() came while this one was starting
                process.send_signal(signal.SIGTERM)
            log_event(logger, logging.INFO, "worker_started", worker=index, pid=process.pid)
            code = await process.wait()
            mark_process_dead(process.pid, self.metrics_directory)  # type: ignore[no-untyped-call]
            if self.stopping:
                log_event(logger, logging.INFO, "worker_stopped", worker=index, pid=process.pid, exit_code=code)
                return
            log_event(logger, logging.ERROR, "worker_restarted", worker=index, pid=process.pid, exit_code=code,
                      note=f"exited unexpectedly; a new one starts in {RESTART_DELAY_SECONDS:g} s")  # fmt: skip
            self.on_restart()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), RESTART_DELAY_SECONDS)

    def send(self, signum: signal.Signals) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signum)

    async def stop(self, grace: float) -> None:
        """SIGTERM to every worker (each drains within server.shutdown_timeout), SIGKILL to any still running
        `grace` seconds later; returns once all have exited."""
        self.stopping = True
        self._stopped.set()
        self.send(signal.SIGTERM)
        done, pending = await asyncio.wait(self._slots, timeout=grace)
        if pending:
            log_event(logger, logging.WARNING, "workers_killed", workers=len(pending),
                      note=f"still running {grace:g} s after SIGTERM")  # fmt: skip
            self.send(signal.SIGKILL)
            await asyncio.wait(pending)
        for task in done:
            task.result()
