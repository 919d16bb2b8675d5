"""Manifest parsing and foreign-layer classification: pure functions, no I/O."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_MANIFEST_BYTES = 4 * 1024 * 1024

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE_MANIFEST_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})

FOREIGN_MEDIA_TYPES = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)


class ManifestError(ValueError):
    """The bytes are not a manifest this module understands; nothing is learned from them."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    children: tuple[Descriptor, ...]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


@dataclass(frozen=True, slots=True)
class ForeignLayer:
    digest: str
    media_type: str
    size: int
    urls: tuple[str, ...] = ()
    diff_id: str | None = None


@dataclass(frozen=True, slots=True)
class ForeignClassifier:
    media_types: frozenset[str] = FOREIGN_MEDIA_TYPES
    urls_mark_foreign: bool = False

    def is_foreign(self, layer: Descriptor) -> bool:
        return layer.media_type in self.media_types or (self.urls_mark_foreign and bool(layer.urls))

    def foreign_layers(
        self, manifest: Manifest, diff_ids: tuple[str, ...] = ()
    ) -> tuple[ForeignLayer, ...]:
        """The manifest's foreign layers; `diff_ids` (the config's, in layer order) are attached when they line up."""
        aligned = len(diff_ids) == len(manifest.layers)
        return tuple(
            ForeignLayer(
                digest=layer.digest,
                media_type=layer.media_type,
                size=layer.size,
                urls=layer.urls,
                diff_id=diff_ids[index] if aligned else None,
            )
            for index, layer in enumerate(manifest.layers)
            if self.is_foreign(layer)
        )


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(value: object) -> bool:
    if not isinstance(value, str):
        return False
    algorithm, _, encoded = value.partition(":")
    if algorithm == "sha256":
        return len(encoded) == 64 and all(c in "0123456789abcdef" for c in encoded)
    if algorithm == "sha512":
        return len(encoded) == 128 and all(c in "0123456789abcdef" for c in encoded)
    return False


def _field(document: Mapping[str, Any], name: str, default: object = None) -> Any:
    """A JSON field as the registry reads it: Go's decoder matches keys case-insensitively, exact match first."""
    if name in document:
        return document[name]
    folded = name.casefold()
    return next((value for key, value in document.items() if key.casefold() == folded), default)


def _descriptor(raw: object) -> Descriptor:
    if not isinstance(raw, Mapping):
        raise ManifestError("descriptor is not an object")
    media_type, digest, size = _field(raw, "mediaType"), _field(raw, "digest"), _field(raw, "size")
    urls = _field(raw, "urls", ())
    if not isinstance(media_type, str) or not is_digest(digest):
        raise ManifestError("descriptor needs a mediaType and a valid digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError("descriptor size must be a non-negative integer")
    if not isinstance(urls, list | tuple) or not all(isinstance(url, str) for url in urls):
        raise ManifestError("descriptor urls must be a list of strings")
    assert isinstance(digest, str)
    return Descriptor(media_type=media_type, digest=digest, size=size, urls=tuple(urls))


def _descriptors(raw: object) -> tuple[Descriptor, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ManifestError("expected a list of descriptors")
    return tuple(_descriptor(item) for item in raw)


def _media_type(document: Mapping[str, Any], content_type: str | None) -> str:
    declared = _field(document, "mediaType")
    if isinstance(declared, str) and declared:
        return declared
    bare_content_type = (content_type or "").split(";")[0].strip().lower()
    if bare_content_type in IMAGE_MANIFEST_TYPES | INDEX_TYPES:
        return bare_content_type
    if _field(document, "manifests") is not None:
        return OCI_INDEX
    if _field(document, "layers") is not None:
        return OCI_MANIFEST
    raise ManifestError("unknown manifest type")


def parse_manifest(body: bytes, content_type: str | None = None) -> Manifest:
    """Parse a Docker schema2 manifest or list, or an OCI manifest or index.

    Raises ManifestError for anything else (schema1, other artifacts, invalid JSON, wrong shape).
    """
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest larger than 4 MiB")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"invalid JSON: {exc.__class__.__name__}") from None
    if not isinstance(document, dict):
        raise ManifestError("manifest is not a JSON object")
    media_type = _media_type(document, content_type)
    if media_type in INDEX_TYPES:
        return Manifest(media_type, None, (), _descriptors(_field(document, "manifests")))
    if media_type in IMAGE_MANIFEST_TYPES:
        config = _descriptor(_field(document, "config"))
        return Manifest(media_type, config, _descriptors(_field(document, "layers")), ())
    raise ManifestError(f"unsupported manifest type {media_type[:100]!r}")


def parse_diff_ids(config_body: bytes) -> tuple[str, ...]:
    """The `rootfs.diff_ids` of an image config, or () when it has none usable."""
    try:
        document = json.loads(config_body)
    except (ValueError, RecursionError):
        return ()
    rootfs = document.get("rootfs") if isinstance(document, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(is_digest(item) for item in diff_ids):
        return ()
    return tuple(diff_ids)


def digest_lines(text: str) -> Iterable[str]:
    """Digests of a digest file: one per line, `#` starts a comment, blank lines ignored."""
    for line in text.splitlines():
        candidate = line.split("#", 1)[0].strip()
        if candidate:
            yield candidate
