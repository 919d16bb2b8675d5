"""The Go-built peers (crane, oras, regctl, distribution v3, the OCI conformance suite).

`make go-tools` (tests/tools/build-go-tools.sh) installs the versions pinned in tests/tools/go-tools.txt
into a cache outside the checkout; this module finds them there by the same key.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from .processes import describe, require_binaries
from .registry import DEBIAN_2_8, Release, distribution_v3

VERSIONS_FILE = Path(__file__).resolve().parents[1] / "tools" / "go-tools.txt"
GO_FALLBACK = Path("/usr/local/go/bin/go")
MINIMUM_GO_MINOR = 22


@dataclass(frozen=True)
class GoTool:
    name: str
    how: str
    package: str
    version: str


def pinned_tools(text: str | None = None) -> dict[str, GoTool]:
    text = VERSIONS_FILE.read_text() if text is None else text
    tools = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, how, package, version = line.split()
            tools[name] = GoTool(name, how, package, version)
    return tools


def versions_key(text: str) -> str:
    """What build-go-tools.sh names its folder by: `grep -v '^#' go-tools.txt | sha256sum | cut -c1-12`."""
    kept = "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))
    return hashlib.sha256(kept.encode()).hexdigest()[:12]


def tools_bin() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "foreign-layer-proxy" / "go-tools" / versions_key(VERSIONS_FILE.read_text()) / "bin"


def _go_available() -> bool:
    """As build-go-tools.sh decides: Go 1.22+ at $GO, else `go` on PATH, else /usr/local/go."""
    named = os.environ.get("GO") or shutil.which("go") or str(GO_FALLBACK)
    if not os.access(named, os.X_OK):
        return False
    version = subprocess.run(
        [named, "env", "GOVERSION"], env={**os.environ, "GOTOOLCHAIN": "local"},
        capture_output=True, text=True, timeout=30, check=False,
    ).stdout  # fmt: skip
    match = re.match(r"go1\.(\d+)", version)
    return match is not None and int(match.group(1)) >= MINIMUM_GO_MINOR


def require_go_tools(*names: str) -> None:
    """Skip (or fail, see go_tool) before anything is started when one of the tools is missing."""
    for name in names:
        go_tool(name)


def go_tool(name: str) -> Path:
    """The built binary `name`; the test skips when it is missing (fails under CI when Go is there)."""
    if name not in pinned_tools():
        raise KeyError(f"{name} is not pinned in {VERSIONS_FILE}")
    path = tools_bin() / name
    if path.is_file() and (tools_bin() / ".complete").is_file():
        return path
    if not _go_available():
        pytest.skip(f"{name} not built: no Go 1.22+ on this machine (`make go-tools` skips)")
    message = f"{name} not built in {tools_bin()}: run `make go-tools`"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


UPSTREAMS = ("distribution-2.8", "distribution-3")


def upstream_release(name: str) -> Release:
    """Debian's distribution 2.8, or the v3 registry built by `make go-tools`."""
    if name == DEBIAN_2_8.name:
        require_binaries("docker-registry")
        return DEBIAN_2_8
    return distribution_v3(go_tool("registry"))


@dataclass(frozen=True)
class GoClients:
    """crane, oras and regctl with their configuration in `home`, each command bounded by `timeout`."""

    home: Path
    timeout: float = 60.0

    @property
    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.home),
            "DOCKER_CONFIG": str(self.home / ".docker"),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "NO_COLOR": "1",
        }

    def crane(self, *args: str | Path) -> str:
        return self.checked("crane", *args)

    def oras(self, *args: str | Path, cwd: Path | None = None) -> str:
        return self.checked("oras", *args, cwd=cwd)

    def regctl(self, *args: str | Path) -> str:
        return self.checked("regctl", *args)

    def regctl_plain_http(self, host_port: str) -> None:
        self.regctl("registry", "set", "--tls", "disabled", host_port)

    def attempt(self, tool: str, *args: str | Path, cwd: Path | None = None) -> tuple[int, str]:
        """Run without requiring success: the exit status and everything printed."""
        result = self._run(tool, args, cwd)
        return result.returncode, result.stdout + result.stderr

    def checked(self, tool: str, *args: str | Path, cwd: Path | None = None) -> str:
        result = self._run(tool, args, cwd)
        if result.returncode != 0:
            raise AssertionError(describe(result))
        return result.stdout

    def _run(self, tool: str, args: tuple[str | Path, ...], cwd: Path | None) -> subprocess.CompletedProcess[str]:
        # crane talks plain HTTP to 127.0.0.1 only when told; the others are told per command or per host.
        flags = ("--insecure",) if tool == "crane" else ()
        return subprocess.run(
            [str(go_tool(tool)), *flags, *map(str, args)],
            env={**os.environ, **self.env}, cwd=cwd, capture_output=True, text=True, timeout=self.timeout, check=False,
        )  # fmt: skip
