"""A day of traffic: one long-lived gateway per scenario in front of one real registry, real clients pushing and
pulling, and after every step the checks of support.day (idle CPU, probes within a second, no foreign content in
the registry's storage, every accepted image pulled back with its digest).

Images of one family share the same two foreign base layers (docker foreign or OCI nondistributable types, the
same bytes) and differ in a layer of their own; they are pushed by every client again and again, into many
repositories and tags, interleaved with ordinary pushes and pulls. Each scenario has a default action and
per-repository rules, so that every client meets both a dropping and a rejecting repository.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import dxf
import oras.provider
import pytest
import requests
from support.clients import (
    Buildah,
    Containerd,
    DockerDaemon,
    Podman,
    oras_retry_pauses_skipped,
    skopeo_copy,
)
from support.day import Day, Rules
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import (
    Flavour,
    Image,
    assemble_image,
    build_image,
    write_dir,
    write_docker_archive,
    write_oci_archive,
    write_oci_layout,
)
from support.processes import describe, require_binaries
from support.protocol import (
    PUSH_FORMS,
    Answer,
    call,
    digest_of,
    mount,
    push_image_blobs,
    push_single_put,
    put_manifest,
    start_upload,
)
from support.registry import Registry

BASE_SEED = 110
BASE_LAYER_SIZES = (12 * 1024, 6 * 1024)
CLIENT_TIMEOUT_SECONDS = 90.0
DXF_TIMEOUT_SECONDS = 30.0
MIRROR = "mirror/win"
DIGEST_LINE = re.compile(r"digest: (sha256:[0-9a-f]{64})")


def member(seed: int, *, flavour: Flavour = "docker", foreign_urls: bool = True) -> Image:
    """An image of the family: the two shared foreign base layers, then a layer of its own."""
    base = build_image(BASE_SEED, BASE_LAYER_SIZES, foreign=2, flavour=flavour, foreign_urls=foreign_urls, os="windows")
    own = build_image(seed, (3 * 1024,), flavour=flavour).layers
    return assemble_image(base.layers + own, seed=seed, flavour=flavour, os="windows")


@dataclass(frozen=True)
class Mode:
    rules: Rules
    inspect_content: bool
    rounds: int
    docker: bool
    reject_status: int = 403  # 400 stops oras-py at once; 403 (distribution's DENIED) makes it retry

    @property
    def areas(self) -> list[str]:
        """Repository prefixes whose rules block: the default's, then each blocking rule's."""
        blocking = [prefix.rstrip("/") for prefix, action in self.rules.by_prefix if action in {"drop", "reject"}]
        return ["win", *blocking]


MODES = {
    "drop-ci-reject-mirror-allow-inspecting": Mode(
        Rules("drop", (("ci/", "reject"), ("mirror/", "allow"))), inspect_content=True, rounds=2, docker=True
    ),
    "reject-400-scratch-drop-mirror-allow": Mode(
        Rules("reject", (("scratch/", "drop"), ("mirror/", "allow"))), inspect_content=False, rounds=1, docker=False,
        reject_status=400,
    ),
}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """Like the suite's `http`, with a bound on every request so that a frozen gateway fails a step, not the suite."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session


@pytest.fixture
def docker_daemons() -> Iterator[list[DockerDaemon]]:
    """The daemons a test started, stopped at its end."""
    started: list[DockerDaemon] = []
    yield started
    for daemon in started:
        daemon.stop()


class Traffic:
    """The clients of one scenario, each step a method; `day` checks after each."""

    def __init__(
        self, day: Day, mode: Mode, tmp: pytest.TempPathFactory, containerd: Containerd, podman: Podman,
        buildah: Buildah, docker_daemons: list[DockerDaemon],
    ) -> None:  # fmt: skip
        self.day = day
        self.mode = mode
        self.tmp = tmp
        self.containerd = containerd
        self.podman = podman
        self.buildah = buildah
        self.docker_daemons = docker_daemons
        self.host = day.gateway.host_port
        self.warm_cache = tmp.mktemp("skopeo-warm")

    def fresh_cache(self) -> Path:
        return self.tmp.mktemp("skopeo-fresh")

    def rejects(self, repository: str) -> bool:
        return self.day.rules.action(repository) == "reject"

    def decisions(self, repository: str) -> list[tuple[str, str, str]]:
        return [(entry["action"], entry["method"], entry["digest"]) for entry in self.day.gateway.events("decision")
                if entry.get("repository") == repository and entry["action"] in {"drop", "reject"}]  # fmt: skip

    # skopeo

    async def skopeo(self, source: str, repository: str, tag: str, *, cache: Path) -> tuple[bool, str]:
        result = await asyncio.to_thread(
            skopeo_copy, source, f"docker://{self.host}/{repository}:{tag}", cache_dir=cache,
            timeout=CLIENT_TIMEOUT_SECONDS,
        )  # fmt: skip
        return result.returncode == 0, describe(result)

    async def skopeo_skipping(self, image: Image, repository: str, tag: str, *, oci: bool, cache: Path) -> None:
        """skopeo skips foreign layers with urls: accepted whatever the rule."""
        folder = self.tmp.mktemp("image")
        source = f"oci:{write_oci_layout(image, folder)}:latest" if oci else f"dir:{write_dir(image, folder)}"
        ok, output = await self.skopeo(source, repository, tag, cache=cache)
        assert ok, output
        self.day.accept(repository, tag, image.manifest_digest, f"skopeo {repository}:{tag}")

    async def skopeo_uploading(self, image: Image, repository: str, *, cache: Path, mounts: bool) -> None:
        """skopeo uploads OCI foreign layers without urls (POST, PATCH, empty PUT), or mounts them when its cache has
        seen them elsewhere: where the rule blocks, the blob is dropped or rejected and the push fails (a manifest
        whose foreign layer has no urls and no blob is refused)."""
        layout = write_oci_layout(image, self.tmp.mktemp("layout"))
        ok, output = await self.skopeo(f"oci:{layout}:latest", repository, "1", cache=cache)
        assert not ok, output
        decided = self.decisions(repository)
        action = self.day.rules.action(repository)
        assert decided and {decision for decision, _, _ in decided} == {action}, (decided, output)
        if mounts:
            assert "POST" in {method for _, method, _ in decided}, f"skopeo did not mount: {decided}\n{output}"
        if action == "reject":
            assert "foreign layer" in output, output

    async def pull_ordinary(self, repository: str, image: Image) -> None:
        """An ordinary pull with skopeo (warm cache: it records where blobs are, for later mounts)."""
        folder = self.tmp.mktemp("pulled")
        result = await asyncio.to_thread(
            skopeo_copy, f"docker://{self.host}/{repository}:1", f"dir:{folder}", cache_dir=self.warm_cache,
            timeout=CLIENT_TIMEOUT_SECONDS,
        )  # fmt: skip
        assert result.returncode == 0, describe(result)
        assert (folder / "manifest.json").read_bytes() == image.manifest
        for digest, data in image.blobs.items():
            assert (folder / digest.split(":", 1)[1]).read_bytes() == data

    # containerd

    async def ctr(self, image: Image, repository: str, *, non_distributable: bool) -> None:
        local = f"local/{repository.replace('/', '-')}"
        archive = write_oci_archive(image, self.tmp.mktemp("archive") / "image.oci.tar")
        await asyncio.to_thread(self.containerd.import_archive, archive, local)
        push = functools.partial(
            self.containerd.push, f"{local}:latest", f"{self.host}/{repository}:1",
            allow_non_distributable=non_distributable, timeout=CLIENT_TIMEOUT_SECONDS,
        )  # fmt: skip
        result = await asyncio.to_thread(push)
        if self.containerd.push_panicked(result):  # once more: ctr's own race on a refusal, not the gateway's answer
            result = await asyncio.to_thread(push)
        output = describe(result)
        if non_distributable and self.rejects(repository):
            assert result.returncode != 0, output
            assert "foreign layer" in output, output
            assert {decision for decision, _, _ in self.decisions(repository)} == {"reject"}
            return
        assert result.returncode == 0, output
        if non_distributable:
            assert {(decision, method) for decision, method, _ in self.decisions(repository)} == {("drop", "PUT")}
        self.day.accept(repository, "1", image.manifest_digest, f"ctr {repository}")

    # podman and buildah: they recompress, so the digests they push are new; only inspect_content sees the diff_id

    async def recompressing(self, tool: Podman, image: Image, repository: str) -> None:
        local = await asyncio.to_thread(tool.pull, f"dir:{write_dir(image, self.tmp.mktemp('image'))}")
        result = await asyncio.to_thread(
            tool.push, local, f"docker://{self.host}/{repository}:1", timeout=CLIENT_TIMEOUT_SECONDS
        )
        output = describe(result)
        assert result.returncode != 0, output  # no blob and no urls for the foreign layers: never a usable image
        if self.mode.inspect_content:
            action = self.day.rules.action(repository)
            assert {decision for decision, _, _ in self.decisions(repository)} == {action}, output
            if action == "reject":
                assert "foreign layer" in output, output
        elif not await self.tolerate_reported_leaks(repository):
            # The recompressed digests were learned from an earlier leak: stopped at the closing PUT now.
            assert self.decisions(repository), output

    async def tolerate_reported_leaks(self, repository: str) -> bool:
        """Without inspect_content a recompressed foreign layer is committed; the gateway must at least have reported
        each one as leaked (from the manifest) for it to be tolerated in the storage checks."""
        blobs, links = self.day.storage()
        committed = {digest for digest in links.get(repository, set())
                     if self.day.is_foreign_content(digest, blobs[digest])}  # fmt: skip
        if not committed:
            return False
        leaked = {entry["digest"] for entry in self.day.gateway.events("decision")
                  if entry["action"] == "leaked" and entry.get("repository") == repository}  # fmt: skip
        assert committed <= leaked, f"{repository}: committed {committed}, reported as leaked only {leaked}"
        self.day.tolerated_leaks |= {(repository, digest) for digest in committed}
        return True

    # SDKs

    async def oras_sdk(self, image: Image, repository: str, monkeypatch: pytest.MonkeyPatch) -> None:
        retrying = self.mode.reject_status == 403
        if retrying:
            oras_retry_pauses_skipped(monkeypatch)
        client = oras.provider.Registry(self.host, insecure=True)
        client.session.request = functools.partial(client.session.request, timeout=CLIENT_TIMEOUT_SECONDS)
        folder = self.tmp.mktemp("oras")

        def upload(index: int, digest: str, data: bytes, media_type: str) -> Any:
            path = folder / digest.split(":", 1)[1]
            path.write_bytes(data)
            layer = {"mediaType": media_type, "digest": digest, "size": len(data)}
            return client.upload_blob(str(path), f"{self.host}/{repository}:1", layer,
                                      do_chunked=index % 2 == 1, chunk_size=4096)  # fmt: skip

        blobs = [(layer.digest, layer.data, layer.media_type) for layer in image.layers]
        blobs.append((image.config_digest, image.config, "application/vnd.docker.container.image.v1+json"))
        if self.rejects(repository):
            if retrying:  # oras takes a 403 for an authentication challenge, retries it and never shows the reason
                with pytest.raises(ValueError, match="Cannot respond to request for authentication"):
                    await asyncio.to_thread(upload, 0, *blobs[0])
            else:  # a 400 it hands back at once
                response = await asyncio.to_thread(upload, 0, *blobs[0])
                assert response.status_code == 400 and f"foreign layer {blobs[0][0]}" in response.text, response.text
            assert {decision for decision, _, _ in self.decisions(repository)} == {"reject"}
            return
        for index, blob in enumerate(blobs):
            response = await asyncio.to_thread(upload, index, *blob)
            assert response.status_code == 201, response.text
        await self.put_manifest(image, repository, "1")

    async def python_dxf(self, image: Image, repository: str) -> None:
        client = dxf.DXF(self.host, repository, insecure=True, timeout=DXF_TIMEOUT_SECONDS)
        first, second = image.foreign_layers
        path = self.tmp.mktemp("dxf") / "layer.tar.gz"
        path.write_bytes(first.data)

        def push() -> None:
            assert client.push_blob(str(path)) == first.digest  # HEAD, POST, PUT with the body
            assert client.mount_blob(MIRROR, second.digest) == second.digest  # POST ?mount=&from=
            for digest, data in image.blobs.items():
                if digest not in {first.digest, second.digest}:
                    chunks = (data[offset : offset + 4096] for offset in range(0, len(data), 4096))
                    assert client.push_blob(data=chunks, digest=digest) == digest  # PUT in chunked encoding
            client.set_manifest("1", image.manifest.decode())

        if self.rejects(repository):
            with pytest.raises(requests.HTTPError) as raised:
                await asyncio.to_thread(push)
            assert raised.value.response is not None and raised.value.response.status_code == self.mode.reject_status
            assert raised.value.response.json()["errors"][0]["code"] == "DENIED"
            return
        await asyncio.to_thread(push)
        self.day.accept(repository, "1", image.manifest_digest, f"python-dxf {repository}")

    # the push forms spoken by hand

    async def raw_forms(self, image: Image, repository: str) -> None:
        """Each form pushes the two shared foreign base layers, then the image's own blobs and its manifest (with urls)."""
        http, base = self.day.http, self.day.gateway.url
        refused = self.mode.reject_status if self.rejects(repository) else None
        for form_name, form in PUSH_FORMS.items():
            for layer in image.foreign_layers:
                answer = await form(http, base, repository, layer.data)
                self.expect_decided(answer, refused, f"{form_name} of {layer.digest} to {repository}")
            if not refused:
                own = {digest: data for digest, data in image.blobs.items()
                       if digest not in {layer.digest for layer in image.foreign_layers}}  # fmt: skip
                await self.ordinary_push(own, image, repository, form_name, tag=form_name)
        first, second = image.foreign_layers
        answer = await mount(http, base, repository, first.digest, MIRROR)
        self.expect_decided(answer, refused, f"mount of {first.digest} from {MIRROR} to {repository}")
        # distribution mounts through a POST on a session URL as well (the same handler as the start URL's).
        session = await start_upload(http, base, repository)
        answer = await call(http, "POST", session.update_query({"mount": second.digest, "from": MIRROR}))
        self.expect_decided(answer, refused, f"mount of {second.digest} from {MIRROR} on a session URL of {repository}")

    @staticmethod
    def expect_decided(answer: Answer, refused: int | None, what: str) -> None:
        if refused:
            assert answer.status == refused and answer.error_codes == ["DENIED"], (what, answer)
        else:
            assert answer.status == 201, (what, answer)

    async def put_manifest(self, image: Image, repository: str, tag: str) -> None:
        answer = await put_manifest(self.day.http, self.day.gateway.url, repository, tag, image.manifest, image.media_type)
        assert answer.status == 201, answer
        self.day.accept(repository, tag, image.manifest_digest, f"manifest PUT {repository}:{tag}")

    async def ordinary_push(self, blobs: Mapping[str, bytes], image: Image, repository: str, form: str,
                            tag: str = "1") -> None:  # fmt: skip
        """`blobs` in push form `form`, then the image's manifest."""
        for data in blobs.values():
            answer = await PUSH_FORMS[form](self.day.http, self.day.gateway.url, repository, data)
            assert answer.status == 201, (form, answer)
        await self.put_manifest(image, repository, tag)

    # dockerd 20.10

    async def start_docker(self) -> DockerDaemon | str:
        """A private dockerd that takes the gateway as an insecure registry, or why it cannot run here."""
        for binary in (DockerDaemon.DOCKERD, DockerDaemon.DOCKER):
            if not Path(binary).exists():
                require_binaries(binary)  # fails under CI, which installs docker.io
                return f"{binary} is not installed (Debian docker.io)"
        daemon = DockerDaemon(self.tmp.mktemp("dockerd"), insecure=[self.host])
        self.docker_daemons.append(daemon)
        try:
            await asyncio.to_thread(daemon.start)
        except (RuntimeError, TimeoutError) as error:
            return f"dockerd did not start: {error}"
        return daemon

    async def docker_push(self, daemon: DockerDaemon, image: Image, repositories: list[str]) -> None:
        """docker load of a docker-archive, then a push per repository: after the first, docker mounts the layers."""
        archive = write_docker_archive(image, self.tmp.mktemp("docker") / "image.tar", "day/docker:1")
        loaded = await asyncio.to_thread(daemon.run, "load", "--input", archive)
        assert loaded.returncode == 0, describe(loaded)
        for repository in repositories:
            target = f"{self.host}/{repository}:1"
            tagged = await asyncio.to_thread(daemon.run, "tag", "day/docker:1", target)
            assert tagged.returncode == 0, describe(tagged)
            pushed = await asyncio.to_thread(daemon.run, "push", target, timeout=CLIENT_TIMEOUT_SECONDS)
            assert pushed.returncode == 0, describe(pushed)
            [digest] = DIGEST_LINE.findall(pushed.stdout)
            self.day.accept(repository, "1", digest, f"docker push {repository}")
        mounted = {entry["repository"] for entry in self.day.gateway.events("request")
                   if entry["method"] == "POST" and "mount=" in (entry.get("query") or "") and entry["status"] == 201}
        assert set(repositories[1:]) <= mounted, f"docker did not mount into {repositories[1:]}"


async def rush_hour(traffic: Traffic, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clients of a round at the same time, into fresh repositories (the skopeo pushes warm-cached, so they
    mount), with ordinary pushes in every form and pulls in between."""
    seed = 500
    work = []
    for area in traffic.mode.areas:
        seed += 20
        repository = functools.partial("{}/rush-{}".format, area)
        work += [
            traffic.skopeo_skipping(member(seed), repository("skopeo"), "1", oci=False, cache=traffic.warm_cache),
            traffic.skopeo_skipping(member(seed + 1, flavour="oci"), repository("skopeo-oci"), "1", oci=True,
                                    cache=traffic.fresh_cache()),
            traffic.skopeo_uploading(member(seed + 2, flavour="oci", foreign_urls=False), repository("skopeo-upload"),
                                     cache=traffic.fresh_cache(), mounts=False),
            traffic.ctr(member(seed + 3), repository("ctr-nd"), non_distributable=True),
            traffic.oras_sdk(member(seed + 5), repository("oras"), monkeypatch),
            traffic.python_dxf(member(seed + 6), repository("dxf")),
            traffic.raw_forms(member(seed + 7), repository("raw")),
        ]  # fmt: skip
    work.append(traffic.recompressing(traffic.podman, member(seed + 8), "win/rush-podman"))
    ordinary = [build_image(seed + 9 + index) for index in range(len(PUSH_FORMS))]
    work += [traffic.ordinary_push(image.blobs, image, f"apps/rush-{form}", form)
             for image, form in zip(ordinary, PUSH_FORMS, strict=True)]  # fmt: skip
    work += [traffic.pull_ordinary("apps/plain", build_image(130)) for _ in range(3)]
    await asyncio.gather(*work)


@pytest.mark.slow
@pytest.mark.parametrize("mode_name", MODES)
async def test_a_day_of_traffic(
    gateway_factory: GatewayFactory,
    registry: Registry,
    http: aiohttp.ClientSession,
    containerd: Containerd,
    podman: Podman,
    tmp_path_factory: pytest.TempPathFactory,
    docker_daemons: list[DockerDaemon],
    monkeypatch: pytest.MonkeyPatch,
    mode_name: str,
) -> None:
    require_binaries("skopeo", "buildah", "unshare")
    mode = MODES[mode_name]
    gateway = gateway_factory(
        registry, args=["--log-level", "info"],
        config={"policy": {**mode.rules.policy(), "inspect_content": mode.inspect_content,
                           "reject_status": mode.reject_status}},
    )  # fmt: skip
    shared = member(BASE_SEED)
    day = Day(gateway, registry, http, mode.rules, tuple(layer.data for layer in shared.foreign_layers))
    traffic = Traffic(day, mode, tmp_path_factory, containerd, podman, Buildah(tmp_path_factory.mktemp("buildah")),
                      docker_daemons)  # fmt: skip
    mirrored = member(120, flavour="oci", foreign_urls=False)
    plain = build_image(130)

    await day.step("teach: skopeo pushes the Windows base, skipping its foreign layers",
                   lambda: traffic.skopeo_skipping(shared, "win/base", "1", oci=False, cache=traffic.fresh_cache()))
    assert {entry["digest"] for entry in gateway.events("learned")} == day.foreign_digests
    await day.step("mirror: every blob of an OCI Windows image, foreign ones included, where the rule allows",
                   functools.partial(traffic.ordinary_push, mirrored.blobs, mirrored, MIRROR, "single-put"))
    await day.step("ordinary push of a plain image",
                   functools.partial(traffic.ordinary_push, plain.blobs, plain, "apps/plain", "single-put"))
    await day.step("ordinary pull with skopeo from the mirror (its cache learns where the foreign blobs are)",
                   lambda: traffic.pull_ordinary(MIRROR, mirrored))
    if mode.docker:
        daemon = await traffic.start_docker()
        if isinstance(daemon, str):
            day.notes.append(f"dockerd step skipped: {daemon}")
        else:
            await day.step("dockerd 20.10: load a plain image, push it, push it again elsewhere (mounts)",
                           functools.partial(traffic.docker_push, daemon, build_image(131),
                                             ["apps/docker", "apps/docker-copy"]))

    for round_ in range(mode.rounds):
        for area in mode.areas:
            seed = 200 + 20 * round_ + mode.areas.index(area)
            own = member(seed)
            oci = member(seed + 1, flavour="oci")
            bare = member(seed + 2, flavour="oci", foreign_urls=False)
            repo = functools.partial("{}/{}{}".format, area)
            steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                (f"skopeo dir: fresh cache to {area}", functools.partial(
                    traffic.skopeo_skipping, own, repo("skopeo", round_), "1", oci=False, cache=traffic.fresh_cache())),
                (f"skopeo oci: fresh cache to {area}", functools.partial(
                    traffic.skopeo_skipping, oci, repo("skopeo-oci", round_), "1", oci=True, cache=traffic.fresh_cache())),
                (f"skopeo oci: without urls, fresh cache (PATCH + empty PUT) to {area}", functools.partial(
                    traffic.skopeo_uploading, bare, repo("skopeo-upload", round_), cache=traffic.fresh_cache(),
                    mounts=False)),
                (f"skopeo oci: without urls, warm cache (mounts from {MIRROR}) to {area}", functools.partial(
                    traffic.skopeo_uploading, bare, repo("skopeo-mount", round_), cache=traffic.warm_cache, mounts=True)),
                (f"skopeo dir: warm cache, the same image again in another repository of {area}", functools.partial(
                    traffic.skopeo_skipping, own, repo("skopeo-again", round_), "2", oci=False, cache=traffic.warm_cache)),
                (f"ctr to {area}", functools.partial(traffic.ctr, own, repo("ctr", round_), non_distributable=False)),
                (f"ctr --allow-non-distributable-blobs to {area}", functools.partial(
                    traffic.ctr, own, repo("ctr-nd", round_), non_distributable=True)),
                (f"ordinary push in chunked-encoding PATCHes, round {round_}", functools.partial(
                    traffic.ordinary_push, (ordinary := build_image(140 + seed)).blobs, ordinary, f"apps/plain{seed}",
                    "chunked-encoding-patch")),
                (f"podman (recompressing) to {area}", functools.partial(
                    traffic.recompressing, traffic.podman, member(seed + 3), repo("podman", round_))),
                (f"buildah (recompressing) to {area}", functools.partial(
                    traffic.recompressing, traffic.buildah, member(seed + 4), repo("buildah", round_))),
                (f"oras-py to {area}", functools.partial(
                    traffic.oras_sdk, member(seed + 5), repo("oras", round_), monkeypatch)),
                (f"python-dxf to {area}", functools.partial(traffic.python_dxf, member(seed + 6), repo("dxf", round_))),
                (f"raw push forms and a mount to {area}", functools.partial(
                    traffic.raw_forms, member(seed + 7), repo("raw", round_))),
                (f"ordinary pull with skopeo, round {round_}", functools.partial(
                    traffic.pull_ordinary, "apps/plain", plain)),
            ]
            for name, action in steps:
                await day.step(f"round {round_}: {name}", action)

    await day.step("rush hour: every client at once, in every area", functools.partial(rush_hour, traffic, monkeypatch))

    figures = f"{mode_name}: {day.summary()}"
    print(figures, file=sys.stderr)
    (tmp_path_factory.mktemp("figures") / "day.txt").write_text(figures + "\n")


async def test_the_checks_see_foreign_content_where_the_rule_blocks_and_a_wrong_pull(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    """The day's checks can fail: blobs put straight into the registry, past the gateway."""
    first, second = member(BASE_SEED).foreign_layers
    day = Day(gateway, registry, http, Rules("drop", (("mirror/", "allow"),)), (first.data, second.data))
    assert (await push_single_put(http, registry.url, MIRROR, first.data)).status == 201
    day.check_storage("kept where the rule allows")

    assert (await mount(http, registry.url, "win/mounted", first.digest, MIRROR)).status == 201
    with pytest.raises(AssertionError, match=f"foreign content linked .*'win/mounted', '{first.digest}'"):
        day.check_storage("mounted where the rule blocks")
    day.tolerated_leaks.add(("win/mounted", first.digest))

    recompressed = gzip.compress(gzip.decompress(second.data), compresslevel=1, mtime=0)
    assert digest_of(recompressed) != second.digest
    assert (await push_single_put(http, registry.url, "win/leak", recompressed)).status == 201
    with pytest.raises(AssertionError, match=f"'win/leak', '{digest_of(recompressed)}'"):
        day.check_storage("recompressed where the rule blocks")

    day.tolerated_leaks.add(("win/leak", digest_of(recompressed)))
    day.check_storage("every leak tolerated")

    session = await start_upload(http, registry.url, "win/unfinished")
    patched = await call(http, "PATCH", session, data=second.data, headers={"Content-Type": "application/octet-stream"})
    assert patched.status == 202, patched
    with pytest.raises(AssertionError, match="upload sessions holding a foreign layer left open: .'win/unfinished/"):
        day.check_storage("an upload session left open")

    image = build_image(150)
    await push_image_blobs(http, registry.url, "apps/plain", image.blobs.values())
    assert (await put_manifest(http, registry.url, "apps/plain", "1", image.manifest, image.media_type)).status == 201
    day.accept("apps/plain", "1", image.manifest_digest, "straight to the registry")
    await day.check_pulls("pulled back")
    day.accept("apps/plain", "1", build_image(151).manifest_digest, "a digest the registry never had")
    with pytest.raises(AssertionError, match="manifest digest"):
        await day.check_pulls("pulled back, wrong digest")
