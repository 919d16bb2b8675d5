"""Real registry clients (skopeo, containerd's ctr, podman), each with private state."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest

from .processes import ManagedProcess, Service, run, run_checked

# skopeo and podman running as root remember in this folder which blobs they have
# seen in which registry, and later mount those blobs instead of uploading them.
SHARED_BLOB_INFO_CACHE = "/var/lib/containers/cache"

# Longest unix socket path: sun_path holds 108 bytes including the final NUL.
MAX_SOCKET_PATH = 107


def with_private_blob_info_cache(
    args: Sequence[str | Path], cache_dir: Path
) -> list[str]:
    """Run `args` in a private mount namespace, `cache_dir` hiding the shared cache."""
    return [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", 'mkdir -p "$1" && mount --bind "$2" "$1" && shift 2 && exec "$@"',
        "sh", SHARED_BLOB_INFO_CACHE, str(cache_dir),
        *(str(arg) for arg in args),
    ]  # fmt: skip


def skopeo_copy(
    src: str,
    dest: str,
    *,
    cache_dir: Path,
    extra: Sequence[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    args = [
        "skopeo", "--insecure-policy", "copy",
        "--src-tls-verify=false", "--dest-tls-verify=false",
        *extra, src, dest,
    ]  # fmt: skip
    return run(with_private_blob_info_cache(args, cache_dir), timeout=timeout)


def skopeo_inspect_raw(reference: str, *, timeout: float = 60.0) -> bytes:
    """The manifest bytes exactly as served, e.g. for `docker://HOST:PORT/repo:tag`."""
    result = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", reference],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"skopeo inspect --raw {reference} exited with {result.returncode}: "
            f"{result.stderr.decode(errors='replace')}"
        )
    return result.stdout


class Containerd(Service):
    """A private containerd daemon; `ctr` talks to it in namespace `namespace`."""

    def __init__(self, workdir: Path, namespace: str = "test") -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.socket = workdir / "containerd.sock"
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path too long for a unix socket: {self.socket}")
        config = workdir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{workdir / "root"}"\n'
            f'state = "{workdir / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
            # Without this the opt plugin creates /opt/containerd.
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{workdir / "opt"}"\n'
        )
        self.process = ManagedProcess(
            ["containerd", "--config", config], log_path=workdir / "containerd.log"
        )

    def start(self, timeout: float = 30.0) -> None:
        self.process.start()
        self.process.wait_until(
            lambda: run(self._ctr("version"), timeout=5).returncode == 0,
            timeout=timeout,
            what=f"answer on {self.socket}",
        )

    def stop(self) -> None:
        self.process.stop()

    def ctr(
        self, *args: str | Path, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return run(self._ctr(*args), timeout=timeout)

    def import_archive(
        self, archive: Path, base_name: str, timeout: float = 120.0
    ) -> None:
        """Import an OCI archive; its images are then named `base_name:<tag>`."""
        run_checked(
            self._ctr(
                "images", "import", "--no-unpack", "--all-platforms",
                "--base-name", base_name, archive,
            ),
            timeout=timeout,
        )  # fmt: skip

    def push(
        self,
        local_ref: str,
        dest: str,
        *,
        allow_non_distributable: bool = False,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Push `local_ref` (`x/y:tag`) to `dest` (`127.0.0.1:PORT/repo:tag`)."""
        flags = ["--allow-non-distributable-blobs"] if allow_non_distributable else []
        return self.ctr(
            "images", "push", "--plain-http", *flags, dest, local_ref, timeout=timeout
        )

    @staticmethod
    def push_panicked(result: subprocess.CompletedProcess[str]) -> bool:
        """containerd 1.6's pusher can race with itself ("send on closed channel") when one of its concurrent
        uploads is refused: a crash of ctr's own, whatever the registry answered."""
        output = result.stdout + result.stderr
        return "panic: send on closed channel" in output and "remotes/docker/pusher.go" in output

    def _ctr(self, *args: str | Path) -> list[str | Path]:
        return ["ctr", "--address", self.socket, "--namespace", self.namespace, *args]


class Podman:
    """podman with its own storage, configuration and blob-info cache in `workdir`."""

    binary = "podman"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        storage_conf = workdir / "storage.conf"
        storage_conf.write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f'graphroot = "{workdir / "graph"}"\n'
            f'runroot = "{workdir / "run"}"\n'
        )
        containers_conf = workdir / "containers.conf"
        containers_conf.write_text(
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{workdir / "events.log"}"\n'
            f'tmp_dir = "{workdir / "tmp"}"\n'
            f'image_copy_tmp_dir = "{workdir / "tmp"}"\n'
            f'volume_path = "{workdir / "volumes"}"\n'
            "[network]\n"
            f'network_config_dir = "{workdir / "networks"}"\n'
        )
        self.cache_dir = workdir / "blob-info-cache"
        self.cache_dir.mkdir()
        self.env = {
            "CONTAINERS_STORAGE_CONF": str(storage_conf),
            "CONTAINERS_CONF": str(containers_conf),
        }

    def run(
        self, *args: str | Path, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return run(self._podman(*args), timeout=timeout, env=self.env)

    def pull(self, source: str, timeout: float = 120.0) -> str:
        """Pull e.g. `dir:FOLDER` or `oci-archive:FILE`; returns the image id."""
        result = run_checked(
            self._podman("pull", "--quiet", "--tls-verify=false", source),
            timeout=timeout,
            env=self.env,
        )
        return result.stdout.strip().splitlines()[-1]

    def push(
        self, image: str, dest: str, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Push a local image (name or id) to e.g. `docker://127.0.0.1:PORT/repo:tag`."""
        return self.run("push", "--tls-verify=false", image, dest, timeout=timeout)

    def _podman(self, *args: str | Path) -> list[str]:
        return with_private_blob_info_cache([self.binary, *args], self.cache_dir)


class Buildah(Podman):
    """buildah reads the same storage and containers configuration, and its pull and push take podman's flags."""

    binary = "buildah"


class DockerDaemon(Service):
    """A private dockerd 20.10 (no bridge, no iptables, vfs storage) and the package's own `docker` client.

    `insecure` registries (HOST:PORT) are spoken to in plain HTTP. dockerd starts its own containerd under the
    exec root.
    """

    DOCKERD = "/usr/sbin/dockerd"
    DOCKER = "/usr/bin/docker"

    def __init__(self, workdir: Path, insecure: Sequence[str]) -> None:
        self.workdir = workdir
        self.socket = workdir / "docker.sock"
        # dockerd's containerd puts its socket deeper under the exec root.
        if len(str(workdir / "exec" / "containerd" / "containerd.sock")) > MAX_SOCKET_PATH:
            raise ValueError(f"path too long for dockerd's unix sockets: {workdir}")
        config = workdir / "daemon.json"
        config.write_text(json.dumps({"insecure-registries": list(insecure)}))
        self.process = ManagedProcess(
            [
                self.DOCKERD, "--config-file", config,
                "--bridge", "none", "--iptables=false", "--ip6tables=false", "--storage-driver", "vfs",
                "--data-root", workdir / "data", "--exec-root", workdir / "exec",
                "--pidfile", workdir / "docker.pid", "--host", f"unix://{self.socket}",
            ],
            log_path=workdir / "dockerd.log",
        )  # fmt: skip
        self.env = {"DOCKER_CONFIG": str(workdir / "client")}

    def start(self, timeout: float = 60.0) -> None:
        self.process.start()
        self.process.wait_until(
            lambda: self.socket.exists() and self.run("version", timeout=10).returncode == 0,
            timeout=timeout,
            what=f"answer on {self.socket}",
        )

    def stop(self) -> None:
        self.process.stop()

    def run(self, *args: str | Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run([self.DOCKER, "--host", f"unix://{self.socket}", *args], timeout=timeout, env=self.env)


def blob_status(base_url: str, repository: str, digest: str) -> int:
    """The status of a plain HEAD on a blob, e.g. straight to the registry, bypassing the gateway."""
    request = urllib.request.Request(f"{base_url}/v2/{repository}/blobs/{digest}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


class _RecordedSleeps:
    """Stands in for the `time` module inside `oras.decorator`: records each retry pause instead of sleeping."""

    def __init__(self) -> None:
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)


def oras_retry_pauses_skipped(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make the oras SDK retry without its pauses (3 s to 83 s each); returns the pauses it would have taken."""
    import oras.decorator

    recorded = _RecordedSleeps()
    monkeypatch.setattr(oras.decorator, "time", recorded)
    return recorded.pauses
