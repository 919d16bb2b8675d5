"""Where `learn` finds foreign layers: a manifest file, a skopeo `dir:` folder, an OCI image layout or a registry."""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from proxy.manifests import (
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    ForeignClassifier,
    ForeignLayer,
    Manifest,
    ManifestError,
    is_digest,
    parse_diff_ids,
    parse_manifest,
    sha256_digest,
)
from proxy.policy import glob_to_regex
from proxy.registry_client import (
    RegistryAccess,
    RegistryClient,
    RegistryError,
    is_repository_name,
    is_tag,
    matches_digest,
    registry_url,
)
from proxy.store import Sighting

SIGHTING_SOURCE = "learn"
MAX_CONFIG_BYTES = 8 * 1024 * 1024
MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
DIR_PREFIX = "dir:"
OCI_PREFIX = "oci:"
REGISTRY_PREFIX = "docker://"
REGISTRY_FORM = "docker://HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]"
CATALOG_PAGE_SIZE = 100

_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
AUTHORITY = re.compile(
    rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[(?P<ipv6>[0-9A-Fa-f:.]+)\])(?::(?P<port>[0-9]{{1,5}}))?"
)


@dataclass(frozen=True, slots=True)
class Found:
    layer: ForeignLayer
    sighting: Sighting


class SourceError(Exception):
    """A source could not be read; the one-line message names it."""


class ImageReader(Protocol):
    async def manifest(self, digest: str) -> bytes:
        """A manifest an index refers to."""

    async def config(self, digest: str) -> bytes | None:
        """An image config, or None when this kind of source holds no configs."""


@dataclass(frozen=True, slots=True)
class ManifestFile:
    source: str

    async def manifest(self, digest: str) -> bytes:
        raise SourceError(
            f"{self.source}: an index, whose manifests are not in the file (use a dir: folder, an OCI layout "
            "or a registry)"
        )

    async def config(self, digest: str) -> bytes | None:
        return None


@dataclass(frozen=True, slots=True)
class FolderImages:
    """A skopeo `dir:` folder (blobs named by hex digest) or an OCI image layout (blobs/ALGORITHM/HEX)."""

    source: str
    root: Path
    oci_layout: bool

    async def manifest(self, digest: str) -> bytes:
        if self.oci_layout:
            return await self._read_blob(self._blob_path(digest), digest, MAX_MANIFEST_BYTES)
        _, _, encoded = digest.partition(":")
        return await self._read_blob(self.root / f"{encoded}.manifest.json", digest, MAX_MANIFEST_BYTES)

    async def config(self, digest: str) -> bytes | None:
        return await self._read_blob(self._blob_path(digest), digest, MAX_CONFIG_BYTES)

    def _blob_path(self, digest: str) -> Path:
        algorithm, _, encoded = digest.partition(":")
        return self.root / "blobs" / algorithm / encoded if self.oci_layout else self.root / encoded

    async def _read_blob(self, path: Path, digest: str, limit: int) -> bytes:
        described = f"{self.source}: {path.relative_to(self.root)}"
        data = await _read_file(path, limit, described)
        if not matches_digest(data, digest):
            raise SourceError(f"{described}: the content does not match {digest}")
        return data


@dataclass(frozen=True, slots=True)
class RegistryImages:
    client: RegistryClient
    repository: str

    async def manifest(self, digest: str) -> bytes:
        return (await self.client.get_manifest(self.repository, digest)).body

    async def config(self, digest: str) -> bytes | None:
        return await self.client.get_blob(self.repository, digest, MAX_CONFIG_BYTES)


@dataclass(frozen=True, slots=True)
class RegistryReference:
    authority: str
    repository: str
    reference: str

    @classmethod
    def parse(cls, source: str) -> RegistryReference:
        """`docker://HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]`; the tag defaults to `latest`, a digest wins over a tag."""
        authority, _, name = source.removeprefix(REGISTRY_PREFIX).partition("/")
        if "@" in authority:
            # Not echoed: the part before `@` is probably a password.
            raise SourceError(
                "a docker:// reference cannot carry credentials: use REGISTRY_AUTH or --username"
            )
        name, at, digest = name.partition("@")
        repository, colon, tag = name.partition(":")
        reference = digest if at else tag if colon else "latest"
        valid_reference = is_digest(reference) if at else is_tag(reference)
        if not (_is_authority(authority) and is_repository_name(repository) and valid_reference):
            raise SourceError(f"{source}: expected {REGISTRY_FORM}")
        return cls(authority, repository, reference)


def _is_authority(value: str) -> bool:
    match = AUTHORITY.fullmatch(value)
    if match is None:
        return False
    try:
        if match["ipv6"]:
            ipaddress.IPv6Address(match["ipv6"])
    except ValueError:
        return False
    return match["port"] is None or 0 < int(match["port"]) < 65536


async def collect(source: str, classifier: ForeignClassifier, access: RegistryAccess) -> list[Found]:
    """The foreign layers of every image manifest in SOURCE, each once, in the order first seen.

    SOURCE is a manifest JSON file; `dir:PATH` or a PATH holding manifest.json and `version` (skopeo);
    `oci:PATH` or a PATH holding `oci-layout`; or a registry reference (see RegistryReference.parse), reached
    over https, or plain http where `registry_url` allows it. Indexes are followed to every manifest; schema1 and
    unknown manifests in an index are skipped. Configs are read for diff_ids only where there are foreign layers.
    """
    if source.startswith(REGISTRY_PREFIX):
        return await _collect_from_registry(source, classifier, access)
    if source.startswith(DIR_PREFIX):
        return await _collect_from_folder(source, Path(source.removeprefix(DIR_PREFIX)), False, classifier)
    if source.startswith(OCI_PREFIX):
        return await _collect_from_folder(source, Path(source.removeprefix(OCI_PREFIX)), True, classifier)
    path = Path(source)
    if (path / "oci-layout").is_file():
        return await _collect_from_folder(source, path, True, classifier)
    if (path / "manifest.json").is_file() and (path / "version").is_file():
        return await _collect_from_folder(source, path, False, classifier)
    if path.is_dir():
        raise SourceError(f"{source}: a folder, but neither a skopeo dir: folder nor an OCI layout")
    body = await _read_file(path, MAX_MANIFEST_BYTES, source)
    return await _collect(source, ManifestFile(source), body, None, classifier, repository=None)


async def _collect_from_folder(
    source: str, root: Path, oci_layout: bool, classifier: ForeignClassifier
) -> list[Found]:
    top_name, top_media_type = ("index.json", OCI_INDEX) if oci_layout else ("manifest.json", None)
    body = await _read_file(root / top_name, MAX_MANIFEST_BYTES, f"{source}: {top_name}")
    images = FolderImages(source, root, oci_layout)
    return await _collect(source, images, body, top_media_type, classifier, repository=None)


async def _collect_from_registry(
    source: str, classifier: ForeignClassifier, access: RegistryAccess
) -> list[Found]:
    reference = RegistryReference.parse(source)
    try:
        base_url = await registry_url(reference.authority, access)
        async with RegistryClient(base_url, access) as client:
            top = await client.get_manifest(reference.repository, reference.reference)
            images = RegistryImages(client, reference.repository)
            return await _collect(
                source, images, top.body, top.content_type, classifier, repository=reference.repository
            )
    except RegistryError as error:
        raise SourceError(f"{source}: {error}") from error


async def _collect(
    source: str,
    images: ImageReader,
    top: bytes,
    top_media_type: str | None,
    classifier: ForeignClassifier,
    *,
    repository: str | None,
) -> list[Found]:
    try:
        root = parse_manifest(top, top_media_type)
    except ManifestError as error:
        raise SourceError(f"{source}: not a manifest ({error})") from None
    found: dict[str, Found] = {}
    pending = deque([(root, top)])
    visited: set[str] = set()
    while pending:
        manifest, body = pending.popleft()
        for child in manifest.children:
            if child.media_type in MANIFEST_TYPES and child.digest not in visited:
                visited.add(child.digest)
                child_body = await images.manifest(child.digest)
                with suppress(ManifestError):
                    pending.append((parse_manifest(child_body, child.media_type), child_body))
        sighting = Sighting(SIGHTING_SOURCE, repository, sha256_digest(body))
        for layer in await _foreign_layers(manifest, images, classifier):
            found.setdefault(layer.digest, Found(layer, sighting))
    return list(found.values())


async def _foreign_layers(
    manifest: Manifest, images: ImageReader, classifier: ForeignClassifier
) -> tuple[ForeignLayer, ...]:
    if manifest.config is None or not any(classifier.is_foreign(layer) for layer in manifest.layers):
        return ()
    config = await images.config(manifest.config.digest)
    return classifier.foreign_layers(manifest, parse_diff_ids(config) if config is not None else ())


async def _read_file(path: Path, limit: int, described: str) -> bytes:
    def read() -> bytes:
        with path.open("rb") as file:
            return file.read(limit + 1)

    try:
        data = await asyncio.to_thread(read)
    except OSError as error:
        raise SourceError(f"{described}: {error.strerror or error.__class__.__name__}") from None
    if len(data) > limit:
        raise SourceError(f"{described}: larger than {limit} bytes")
    return data


@dataclass(frozen=True, slots=True)
class ScannedRepository:
    repository: str
    found: list[Found]
    manifests: int
    error: str | None = None


def parse_registry_root(source: str) -> str:
    """The authority of `docker://HOST[:PORT][/]`, the form `learn --scan` takes."""
    authority = source.removeprefix(REGISTRY_PREFIX).rstrip("/")
    if not source.startswith(REGISTRY_PREFIX) or not _is_authority(authority):
        raise SourceError(f"{source}: expected docker://HOST[:PORT]/ for a scan")
    return authority


async def scan(
    source: str,
    classifier: ForeignClassifier,
    access: RegistryAccess,
    *,
    patterns: tuple[str, ...],
    skip: frozenset[str],
    concurrency: int,
) -> AsyncIterator[ScannedRepository]:
    """Every repository of a registry's catalog matching `patterns` (all when empty), except `skip`,
    with the foreign layers of all its tags; at most `concurrency` repositories at a time."""
    matchers = [glob_to_regex(pattern) for pattern in patterns]
    try:
        base_url = await registry_url(parse_registry_root(source), access)
        async with RegistryClient(base_url, access) as client:
            repositories = [
                name async for name in client.catalog(CATALOG_PAGE_SIZE)
                if name not in skip and (not matchers or any(m.fullmatch(name) for m in matchers))
            ]  # fmt: skip
            limit = asyncio.Semaphore(concurrency)

            async def scan_one(repository: str) -> ScannedRepository:
                async with limit:
                    return await _scan_repository(client, repository, classifier)

            for done in asyncio.as_completed([scan_one(name) for name in repositories]):
                yield await done
    except RegistryError as error:
        raise SourceError(f"{source}: {error}") from error


async def _scan_repository(client: RegistryClient, repository: str, classifier: ForeignClassifier) -> ScannedRepository:
    images = RegistryImages(client, repository)
    found: dict[str, Found] = {}
    seen_manifests: set[str] = set()
    try:
        async for tag in client.tags(repository):
            top = await client.get_manifest(repository, tag)
            if top.digest in seen_manifests:
                continue
            seen_manifests.add(top.digest)
            with suppress(SourceError):
                for item in await _collect(
                    f"{repository}:{tag}", images, top.body, top.content_type, classifier, repository=repository
                ):
                    found.setdefault(item.layer.digest, item)
    except RegistryError as error:
        return ScannedRepository(repository, list(found.values()), len(seen_manifests), str(error))
    return ScannedRepository(repository, list(found.values()), len(seen_manifests))
