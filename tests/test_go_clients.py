"""crane, regctl and oras through one long-lived gateway per upstream (distribution 2.8 and v3).

Many steps against the same gateway and registry: Windows-like images that share two foreign base layers
(docker foreign and OCI nondistributable media types, and an app image on the same base) are pushed with
the clients' flags for foreign layers, copied between repositories (mounts), pulled back; `drop/**`
repositories drop foreign layers (the default rule), `reject/**` reject them. After every step: the gateway
answers a probe within a second, no foreign blob is in the registry's storage, and every image accepted so
far pulls back through the gateway with the same digest.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.gateway import GatewayProcess
from support.go_clients import UPSTREAMS, GoClients, require_go_tools, upstream_release
from support.images import Image, build_image, write_oci_layout
from support.processes import free_port
from support.registry import (
    Registry,
    RegistryConfig,
    Release,
)

PROBE_SECONDS = 1.0
# A client that takes longer than this on a few small blobs is stuck (e.g. a frozen gateway, issue 11).
CLIENT_TIMEOUT = 30.0
MODES = ("reject", "drop")
GATEWAY_CONFIG = {"policy": {"default": "drop", "rules": [{"repository": "reject/**", "action": "reject"}]}}
ARTIFACT_TYPE = "application/vnd.example.test+json"


@pytest.fixture(params=UPSTREAMS)
def release(request: pytest.FixtureRequest) -> Release:
    require_go_tools("crane", "oras", "regctl")
    return upstream_release(request.param)


@dataclass
class Day:
    """One gateway in front of one registry, and what has been accepted through it so far."""

    registry: Registry
    gateway: GatewayProcess
    clients: GoClients
    workdir: Path
    foreign: frozenset[str]
    accepted: dict[str, Image] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)

    def ref(self, repository_and_tag: str) -> str:
        return f"{self.gateway.host_port}/{repository_and_tag}"

    def step(self, what: str, action: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        self.steps.append(what)
        try:
            action(*args, **kwargs)
            self.check_health()
        except BaseException as error:
            raise AssertionError(
                f"step {len(self.steps)} ({what}) failed: {error}\n--- gateway log (tail)\n"
                f"{self.gateway.process.log_text()[-4000:]}"
            ) from error

    def push(self, tool: str, args: list[str | Path], target: str, image: Image, *, accepted: bool) -> None:
        """Run a client push or copy to `target`; it must succeed and pull back when `accepted`, else fail."""
        status, output = self.clients.attempt(tool, *args)
        if accepted:
            assert status == 0, f"{tool} {args}: exit {status}\n{output}"
            self.accepted[target] = image
            self.pull_with_regctl(target, image)
        else:
            assert status != 0, f"{tool} {args} succeeded where foreign layers are rejected\n{output}"
            assert self.manifest_status(target) == 404
            repository = target.split(":")[0]
            rejected = {entry["digest"] for entry in self.gateway.events("decision")
                        if entry["action"] == "reject" and entry["repository"] == repository}
            assert rejected and rejected <= self.foreign, rejected

    def check_health(self) -> None:
        started = time.monotonic()
        with urllib.request.urlopen(f"{self.gateway.url}/v2/", timeout=PROBE_SECONDS) as answer:
            assert answer.status == 200
        assert time.monotonic() - started < PROBE_SECONDS
        stored = sorted(digest for digest in self.foreign if self.registry.blob_data_path(digest).exists())
        assert not stored, f"foreign blobs in the registry's storage: {stored}"
        linked = sorted(
            (repository, digest) for repository in self.repositories() for digest in self.foreign
            if self.registry.layer_link_path(repository, digest).exists()
        )  # fmt: skip
        assert not linked, f"foreign blobs linked into repositories: {linked}"
        for target, image in self.accepted.items():
            assert self.manifest_digest(target, image) == image.manifest_digest, target

    def repositories(self) -> list[str]:
        """Every repository the registry's storage has, as its folder names it."""
        root = self.registry.root / "docker/registry/v2/repositories"
        return sorted(str(path.parent.relative_to(root)) for path in root.rglob("_layers"))

    def manifest_digest(self, target: str, image: Image) -> str:
        repository, tag = target.split(":")
        request = urllib.request.Request(
            f"{self.gateway.url}/v2/{repository}/manifests/{tag}", headers={"Accept": image.media_type}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return "sha256:" + hashlib.sha256(answer.read()).hexdigest()

    def manifest_status(self, target: str) -> int:
        repository, tag = target.split(":")
        request = urllib.request.Request(f"{self.gateway.url}/v2/{repository}/manifests/{tag}", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return error.code

    def pull_with_regctl(self, target: str, image: Image) -> None:
        """A real pull: regctl copies the image into an OCI layout (foreign layers stay external)."""
        layout = self.workdir / f"pulled-{len(self.steps)}"
        self.clients.regctl("image", "copy", self.ref(target), f"ocidir://{layout}:pulled")
        index = json.loads((layout / "index.json").read_text())
        assert [entry["digest"] for entry in index["manifests"]] == [image.manifest_digest]
        for layer in image.layers:
            pulled = layout / "blobs" / "sha256" / layer.digest.split(":", 1)[1]
            if layer.foreign:
                assert not pulled.exists()
            else:
                assert "sha256:" + hashlib.sha256(pulled.read_bytes()).hexdigest() == layer.digest


@pytest.fixture
def day(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Day]:
    registry = Registry(tmp_path_factory.mktemp("registry"), RegistryConfig(allow_foreign_urls=True), release)
    gateway = GatewayProcess(tmp_path_factory.mktemp("gateway"), registry.url, config=GATEWAY_CONFIG)
    workdir = tmp_path_factory.mktemp("clients")
    with registry:
        gateway.start()
        try:
            clients = GoClients(workdir / "home", timeout=CLIENT_TIMEOUT)
            clients.regctl_plain_http(gateway.host_port)
            windows = build_image(2, foreign=2, os="windows")
            yield Day(registry, gateway, clients, workdir, frozenset(layer.digest for layer in windows.foreign_layers))
        finally:
            gateway.stop()


def windows_images() -> dict[str, Image]:
    """Three images on the same two foreign base layers: docker foreign, OCI nondistributable, and an app
    image (another top layer) on the docker base."""
    return {
        "docker": build_image(2, foreign=2, os="windows"),
        "oci": build_image(2, foreign=2, flavour="oci", os="windows"),
        "app": build_image(2, (16 * 1024, 8 * 1024, 6 * 1024), foreign=2, os="windows"),
    }


def test_go_clients_push_copy_and_pull_windows_images_through_one_gateway(day: Day) -> None:
    images = windows_images()
    assert {layer.digest for image in images.values() for layer in image.foreign_layers} == day.foreign
    layouts = {name: write_oci_layout(image, day.workdir / f"layout-{name}", tag="1") for name, image in images.items()}
    plain = build_image(1)
    plain_layout = write_oci_layout(plain, day.workdir / "layout-plain", tag="1")
    crane_nd = "--allow-nondistributable-artifacts"

    # crane skips foreign layers by default: the manifests teach the gateway the foreign digests.
    for name, image in images.items():
        day.step(f"crane push {name} (teaches)", day.push,
                 "crane", ["push", layouts[name], day.ref(f"teach/{name}:1")], f"teach/{name}:1", image, accepted=True)
    day.step("crane push plain", day.push,
             "crane", ["push", plain_layout, day.ref("plain/base:1")], "plain/base:1", plain, accepted=True)
    learned = {entry["digest"] for entry in day.gateway.events("learned")}
    assert learned >= day.foreign, learned

    for mode in MODES:
        dropped = mode == "drop"
        for name, image in images.items():
            source = day.ref(f"teach/{name}:1")
            steps: list[tuple[str, str, list[str | Path], bool]] = [
                # Uploads of the foreign blobs: crane POST + PATCH + empty PUT; regctl a mount without `from`,
                # then a single PUT with the body, then chunks. The same push again, into the same repository.
                ("crane", "crane", [crane_nd, "push", layouts[name]], dropped),
                ("regctl", "regctl", ["image", "copy", "--include-external", f"ocidir://{layouts[name]}:1"], dropped),
                ("crane", "crane", [crane_nd, "push", layouts[name]], dropped),
                # Copies between repositories through the gateway: blobs are mounted from the source.
                ("crane", "crane-copy", ["copy", source], True),
                ("regctl", "regctl-copy", ["image", "copy", source], True),
            ]
            if dropped:
                # Mounts of the foreign blobs themselves (where refused, the clients would fetch the blobs
                # from their `urls`, off this machine, so only where they are dropped).
                steps += [
                    ("crane", "crane-copy-nd", [crane_nd, "copy", source], True),
                    ("regctl", "regctl-copy-nd", ["image", "copy", "--include-external", source], True),
                ]
            for tool, repository, args, accepted in steps:
                target = f"{mode}/{repository}-{name}:1"
                day.step(f"{mode}: {tool} {' '.join(map(str, args))} -> {target}", day.push,
                         tool, [*args, day.ref(target)], target, image, accepted=accepted)
        day.step(f"{mode}: oras push of an artifact whose layer is a foreign blob",
                 oras_push_foreign_blob, day, images["docker"], f"{mode}/oras-foreign:1")
        day.step(f"{mode}: crane push plain", day.push,
                 "crane", ["push", plain_layout, day.ref(f"{mode}/plain:1")], f"{mode}/plain:1", plain, accepted=True)
        day.step(f"{mode}: oras artifact push, attach, discover, copy, pull", oras_artifact_round_trip, day, mode)

    assert len(day.steps) >= 40, day.steps
    # The storage checks looked where the registry keeps what was accepted.
    assert {target.split(":")[0] for target in day.accepted} <= set(day.repositories())


def oras_push_foreign_blob(day: Day, image: Image, target: str) -> None:
    """An artifact that lists a known foreign blob as an ordinary layer: refused (reject: at the blob; drop: the
    blob is dropped, then the manifest, which names a blob the registry does not have, is refused)."""
    foreign = image.foreign_layers[0]
    folder = day.workdir / f"oras-foreign-{len(day.steps)}"
    folder.mkdir()
    (folder / "layer.tar.gz").write_bytes(foreign.data)
    status, output = day.clients.attempt(
        "oras", "push", "--plain-http", day.ref(target), "layer.tar.gz:application/vnd.oci.image.layer.v1.tar+gzip",
        cwd=folder,
    )  # fmt: skip
    assert status != 0, output
    assert day.manifest_status(target) == 404


def oras_artifact_round_trip(day: Day, mode: str) -> None:
    folder = day.workdir / f"oras-{mode}"
    folder.mkdir()
    payload = folder / "payload.json"
    payload.write_text(json.dumps({"mode": mode, "data": "x" * 5000}))
    source, copy = day.ref(f"{mode}/oras:1"), day.ref(f"{mode}/oras-copy:1")
    day.clients.oras("push", "--plain-http", "--artifact-type", ARTIFACT_TYPE, source, "payload.json:application/json",
                     cwd=folder)  # fmt: skip
    subject = day.ref(f"{mode}/crane-docker:1") if mode == "drop" else day.ref("teach/docker:1")
    day.clients.oras("attach", "--plain-http", "--artifact-type", ARTIFACT_TYPE, subject, "payload.json:application/json",
                     cwd=folder)  # fmt: skip
    discovered = json.loads(day.clients.oras("discover", "--plain-http", "--format", "json", subject))
    referrers = discovered.get("referrers", discovered.get("manifests", []))
    assert [entry["artifactType"] for entry in referrers] == [ARTIFACT_TYPE], discovered
    day.clients.oras("cp", "--from-plain-http", "--to-plain-http", source, copy)
    pulled = folder / "pulled"
    day.clients.oras("pull", "--plain-http", "-o", pulled, copy)
    assert (pulled / "payload.json").read_bytes() == payload.read_bytes()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def blob_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A plain file server on 127.0.0.1 over a folder: where a redirecting registry sends blob GETs."""
    root = tmp_path_factory.mktemp("storage")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/", root
    server.shutdown()
    server.server_close()


def test_blob_redirects_reach_go_clients_through_the_gateway_unchanged(
    release: Release, blob_store: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A registry whose storage answers blob GETs with a redirect (CDN, object store): the gateway passes the
    redirect on as it is (another origin than the registry's), and clients fetch the blob from there."""
    store_url, store_root = blob_store
    workdir = tmp_path_factory.mktemp("registry")
    registry = Registry(workdir, RegistryConfig(redirect_blobs_to=store_url), release)
    registry.root.rmdir()
    registry.root.symlink_to(store_root)
    gateway = GatewayProcess(tmp_path_factory.mktemp("gateway"), registry.url, config=GATEWAY_CONFIG)
    image = build_image(8, os="windows")
    layout = write_oci_layout(image, tmp_path_factory.mktemp("layout"), tag="1")
    clients = GoClients(tmp_path_factory.mktemp("home"), timeout=CLIENT_TIMEOUT)
    with registry:
        gateway.start()
        try:
            clients.crane("push", layout, f"{gateway.host_port}/plain/redirected:1")
            layer = image.layers[0]
            request = urllib.request.Request(f"{gateway.url}/v2/plain/redirected/blobs/{layer.digest}")
            opener = urllib.request.build_opener(NoRedirects)
            with pytest.raises(urllib.error.HTTPError) as redirected:
                opener.open(request, timeout=10)
            assert redirected.value.code in (302, 307), redirected.value
            location = redirected.value.headers["Location"]
            assert location.startswith(store_url) and location.endswith(f"/{layer.digest.split(':')[1]}/data")
            clients.regctl_plain_http(gateway.host_port)
            pulled = workdir / "pulled"
            clients.regctl("image", "copy", f"{gateway.host_port}/plain/redirected:1", f"ocidir://{pulled}:1")
            for blob in image.layers:
                data = (pulled / "blobs" / "sha256" / blob.digest.split(":", 1)[1]).read_bytes()
                assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
            assert clients.crane("digest", f"{gateway.host_port}/plain/redirected:1").strip() == image.manifest_digest
        finally:
            gateway.stop()


class NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
