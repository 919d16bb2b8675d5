"""Real processes for tests: free ports, start, wait until ready, stop by PID."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import pytest


def require_binaries(*names: str) -> None:
    """Skip the test if a binary is missing; fail under CI, which installs them all."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    message = f"not installed: {', '.join(missing)} (.ci/run installs them)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def run(
    args: Sequence[str | Path],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args],
        env=None if env is None else {**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_checked(
    args: Sequence[str | Path],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    result = run(args, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(describe(result))
    return result


def describe(result: subprocess.CompletedProcess[str]) -> str:
    command = " ".join(str(arg) for arg in result.args)
    return (
        f"`{command}` exited with {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


class Service:
    """Something started and stopped by a test, usable as `with Service(...) as service:`."""

    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class ManagedProcess(Service):
    """A long-running child process whose output goes to `log_path`.

    `start()` may be called again after `stop()`; the log is appended to, so a
    restarted process keeps the history of earlier runs for failure messages.
    """

    def __init__(
        self,
        args: Sequence[str | Path],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = [str(arg) for arg in args]
        self.log_path = log_path
        self.env = None if env is None else {**os.environ, **env}
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self._require_popen().pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.args[0]} is already running")
        self._log = self.log_path.open("ab")
        self._popen = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
        )

    def wait_until(
        self, ready: Callable[[], bool], *, timeout: float, what: str
    ) -> None:
        """Poll `ready` until true; fail at once if the process exits first."""
        deadline = time.monotonic() + timeout
        while not ready():
            popen = self._require_popen()
            if popen.poll() is not None:
                raise RuntimeError(
                    f"{self.args[0]} exited with {popen.returncode} before {what}\n"
                    f"{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.args[0]}: no {what} after {timeout} s\n{self.log_text()}"
                )
            time.sleep(0.05)

    def wait_for_port(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.wait_until(
            lambda: port_accepts(host, port),
            timeout=timeout,
            what=f"listener on {host}:{port}",
        )

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; returns its exit status."""
        return self._require_popen().wait(timeout)

    def stop(self) -> int | None:
        """Terminate, wait up to 10 s, then kill; returns the exit status."""
        popen, self._popen = self._popen, None
        returncode = None
        if popen is not None:
            if popen.poll() is None:
                popen.terminate()
                try:
                    popen.wait(10)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()
            returncode = popen.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return returncode

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _require_popen(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.args[0]} is not started")
        return self._popen
