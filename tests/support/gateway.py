"""The gateway as users run it: `python -m proxy serve ...` on free local ports, stopped by PID."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from .processes import ManagedProcess, free_port

HOST = "127.0.0.1"
QUIET_SECONDS = 0.05


class GatewayProcess:
    def __init__(
        self,
        workdir: Path,
        upstream: str,
        *,
        args: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        store: str | None = None,
        env: Mapping[str, str] | None = None,
        tls: bool = False,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.admin_port = free_port()
        self.store = store or f"sqlite:///{workdir / 'foreign-layers.db'}"
        self.tls = tls
        command = [
            sys.executable, "-m", "proxy", "serve",
            "--upstream", upstream,
            "--listen", f"{HOST}:{self.port}",
            "--admin-listen", f"{HOST}:{self.admin_port}",
            "--store", self.store,
            *args,
        ]  # fmt: skip
        if config is not None:
            self.config_path = workdir / "gateway.yaml"
            self.config_path.write_text(json.dumps(config))
            command += ["--config", str(self.config_path)]
        self.process = ManagedProcess(command, log_path=workdir / "gateway.log", env=env)

    @property
    def host_port(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    def start(self) -> Self:
        self.process.start()
        self.process.wait_for_port(HOST, self.port)
        return self

    def stop(self) -> int | None:
        return self.process.stop()

    def log_events(self) -> Iterator[dict[str, Any]]:
        """The structured (JSON) log lines, once the log has been quiet for a moment: the gateway writes a
        request's line just after the client has its answer."""
        text = self.process.log_text()
        for _ in range(40):
            time.sleep(QUIET_SECONDS)
            if (latest := self.process.log_text()) == text:
                break
            text = latest
        for line in text[: text.rfind("\n") + 1].splitlines():
            if line.startswith("{"):
                yield json.loads(line)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in self.log_events() if entry.get("event") == event]

    async def wait_for(self, event: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The log lines of `event` once there are `count` of them: the gateway may log just after answering."""
        deadline = time.monotonic() + timeout
        while len(found := self.events(event)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} {event} lines in the gateway's log:\n{self.process.log_text()}")
            await asyncio.sleep(0.02)
        return found
