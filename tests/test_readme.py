"""The README's quickstart and worked example, run as a newcomer would: its shell blocks, extracted.

`make run` runs in the checkout (it writes nothing there: its state goes to $XDG_STATE_HOME, a
temporary folder here); the worked example runs in a second shell, in a folder that has the
checkout's `.venv` and `demo` (so the example image is written there, not into the checkout). The
only change made to the commands: the ports, 127.0.0.1:5000 and the others, become free ones.
containerd is a private daemon that `ctr` finds through CONTAINERD_ADDRESS.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.clients import Containerd
from support.images import build_image
from support.processes import free_port, port_accepts, require_binaries

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEFAULT_PORTS = {"LOCAL_GATEWAY_PORT": 5000, "LOCAL_REGISTRY_PORT": 5001, "LOCAL_ADMIN_PORT": 9090}


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def worked_example(text: str) -> str:
    """The policy section's learn -> push -> drop block (its other blocks illustrate `digests` and `forget`)."""
    return next(block for block in shell_blocks(section(text, "The policy model")) if "ctr images push" in block)


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    text = README.read_text()
    assert shell_blocks(section(text, "Quickstart")) == ["make run\n"]
    example = worked_example(text)
    assert "foreign-layer-proxy learn dir:./windows-image" in example and "ctr images push" in example


def test_make_run_installs_only_what_running_needs() -> None:
    """Test tools come with `make test`; `make run` installs the command once, not on every start."""
    require_binaries("make")
    planned = subprocess.run(["make", "--no-print-directory", "-n", "run"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=True).stdout  # fmt: skip
    assert "[test]" not in planned and "config/run-local.sh" in planned
    assert "[ -x .venv/bin/foreign-layer-proxy ] ||" in planned


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def system_binaries() -> list[str]:
    """What `make run` checks before it would install Debian packages (which a test must not do)."""
    (line,) = [line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("SYSTEM_BINARIES")]
    return line.partition(":=")[2].split()


@pytest.fixture
def make_run(state: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int], Path]]:
    require_binaries("make", *system_binaries())
    ports = {name: free_port() for name in DEFAULT_PORTS}
    log = tmp_path / "make-run.log"
    with log.open("wb") as output:
        # A session of its own, so that stopping it stops make, the script, the registry and the gateway.
        process = subprocess.Popen(
            ["make", "--no-print-directory", "run"], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, "XDG_STATE_HOME": str(state), **{name: str(port) for name, port in ports.items()}},
            start_new_session=True,
        )  # fmt: skip
    try:
        yield process, ports, log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.slow
def test_the_quickstart_and_the_worked_example_run_as_written(
    make_run: tuple[subprocess.Popen[bytes], dict[str, int], Path], state: Path, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    process, ports, log = make_run
    text = README.read_text()
    example = worked_example(text)
    for name, port in ports.items():
        example = example.replace(f"127.0.0.1:{DEFAULT_PORTS[name]}", f"127.0.0.1:{port}")
    for _ in range(600):
        if port_accepts("127.0.0.1", ports["LOCAL_GATEWAY_PORT"]) or process.poll() is not None:
            break
        subprocess.run(["sleep", "0.05"], check=True)
    assert process.poll() is None, log.read_text()
    printed = log.read_text()
    for name in ("gateway", "registry", "admin"):
        port = ports[f"LOCAL_{name.upper()}_PORT"]
        assert re.search(rf"^{name} +http://127\.0\.0\.1:{port}\b", printed, re.MULTILINE), printed
    assert ".venv/bin/foreign-layer-proxy" in printed and "source .venv/bin/activate" in printed

    workdir = tmp_path_factory.mktemp("second-terminal")
    for shared in (".venv", "demo"):
        (workdir / shared).symlink_to(ROOT / shared)
    with Containerd(tmp_path_factory.mktemp("containerd")) as containerd:
        env = {**os.environ, "XDG_STATE_HOME": str(state), "CONTAINERD_ADDRESS": str(containerd.socket),
               "CONTAINERD_NAMESPACE": containerd.namespace}  # fmt: skip
        shell = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", example], cwd=workdir, env=env, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
    assert shell.returncode == 0, shell.stdout + shell.stderr

    image = build_image(14, foreign=2, os="windows")  # what demo/example_image.py writes
    foreign = [layer.digest for layer in image.foreign_layers]
    gateway_log = log.read_text()
    decisions = re.findall(r" decision action=(\w+) .*digest=(sha256:[0-9a-f]{64})", gateway_log)
    assert sorted(decisions) == sorted(("drop", digest) for digest in foreign), gateway_log
    assert "leaked" not in gateway_log and "level=error" not in gateway_log, gateway_log
    storage = state / "foreign-layer-proxy/local-registry/storage/docker/registry/v2/blobs/sha256"
    stored = {f"sha256:{data.parent.name}" for data in storage.glob("*/*/data")}
    assert image.config_digest in stored and image.manifest_digest in stored
    assert not set(foreign) & stored, "no foreign blob in the registry's storage"
    # The registry's own lines (an error for every normal 404 of a HEAD) are in its file, not in the gateway's log.
    assert "blob unknown" in (state / "foreign-layer-proxy/local-registry/registry.log").read_text()
    assert "blob unknown" not in gateway_log
    # `digests` and `digests --stats` printed what the worked example says they do.
    assert all(digest in shell.stdout for digest in foreign), shell.stdout
    assert re.search(r"^apps/win +2 +0 +0 +0 ", shell.stdout, re.MULTILINE), shell.stdout
