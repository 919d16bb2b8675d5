"""Manifest parsing and foreign-layer classification: pure functions, no I/O."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
GO_JSON_MAX_DEPTH = 10_000  # encoding/json's nesting limit: the registry rejects anything deeper
RECURSION_HEADROOM = 200

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
    """A field of an object from decode_json, whose keys are folded."""
    return document.get(name.casefold(), default)


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


@contextmanager
def registry_json_depth() -> Iterator[None]:
    """Room to decode JSON as deep as the registry's decoder accepts (Go's limit), deeper than Python's default.

    Python's limit is process-wide; decoding is synchronous, so nothing else runs at the raised limit
    on this thread meanwhile."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, GO_JSON_MAX_DEPTH + RECURSION_HEADROOM))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def _go_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object keyed as Go's decoder matches struct fields: case-insensitively, the last duplicate winning."""
    return {key.casefold(): value for key, value in pairs}


def decode_json(body: bytes) -> object:
    """JSON as the registry's Go decoder reads it: UTF-8 only, invalid bytes replaced, keys folded."""
    with registry_json_depth():
        return json.loads(body.decode("utf-8", errors="replace"), object_pairs_hook=_go_object)


def parse_manifest(body: bytes, content_type: str | None = None) -> Manifest:
    """Parse a Docker schema2 manifest or list, or an OCI manifest or index.

    Raises ManifestError for anything else (schema1, other artifacts, invalid JSON, wrong shape).
    """
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest larger than 4 MiB")
    try:
        document = decode_json(body)
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
        document = decode_json(config_body)
    except (ValueError, RecursionError):
        return ()
    rootfs = _field(document, "rootfs") if isinstance(document, dict) else None
    diff_ids = _field(rootfs, "diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(is_digest(item) for item in diff_ids):
        return ()
    return tuple(diff_ids)


def digest_lines(text: str) -> Iterable[str]:
    """Digests of a digest file: one per line, `#` starts a comment, blank lines ignored."""
    for line in text.splitlines():
        candidate = line.split("#", 1)[0].strip()
        if candidate:
            yield candidate
