"""Deterministic synthetic container images and writers for the layouts clients read.

Layers are gzip'd tars of seeded random bytes (mtime 0 everywhere), so the same
arguments always give the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Flavour = Literal["docker", "oci"]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_NONDISTRIBUTABLE_LAYER = (
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
)

FOREIGN_LAYER_TYPES = frozenset({DOCKER_FOREIGN_LAYER, OCI_NONDISTRIBUTABLE_LAYER})

_MEDIA_TYPES: Mapping[Flavour, Mapping[str, str]] = {
    "docker": {
        "manifest": DOCKER_MANIFEST,
        "index": DOCKER_MANIFEST_LIST,
        "config": DOCKER_CONFIG,
        "layer": DOCKER_LAYER,
        "foreign": DOCKER_FOREIGN_LAYER,
    },
    "oci": {
        "manifest": OCI_MANIFEST,
        "index": OCI_INDEX,
        "config": OCI_CONFIG,
        "layer": OCI_LAYER,
        "foreign": OCI_NONDISTRIBUTABLE_LAYER,
    },
}

DEFAULT_LAYER_SIZES = (16 * 1024, 8 * 1024, 4 * 1024)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": sha256_digest(data),
        "size": len(data),
        **extra,
    }


def _json_bytes(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, indent=3).encode()


@dataclass(frozen=True)
class Layer:
    data: bytes
    diff_id: str
    media_type: str
    urls: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def foreign(self) -> bool:
        return self.media_type in FOREIGN_LAYER_TYPES

    def descriptor(self) -> dict[str, Any]:
        extra = {"urls": list(self.urls)} if self.urls else {}
        return descriptor(self.media_type, self.data, **extra)


@dataclass(frozen=True)
class Image:
    manifest: bytes
    media_type: str
    config: bytes
    layers: tuple[Layer, ...]
    os: str
    architecture: str

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def foreign_layers(self) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if layer.foreign)

    @property
    def blobs(self) -> dict[str, bytes]:
        """Config and layers by digest (manifests are not blobs here)."""
        return {self.config_digest: self.config} | {
            layer.digest: layer.data for layer in self.layers
        }


@dataclass(frozen=True)
class ImageIndex:
    """A docker manifest list or OCI index over several single-platform images."""

    manifest: bytes
    media_type: str
    images: tuple[Image, ...]

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def blobs(self) -> dict[str, bytes]:
        merged: dict[str, bytes] = {}
        for image in self.images:
            merged |= image.blobs
        return merged


Artifact = Image | ImageIndex


def _layer_tar(rng: random.Random, index: int, size: int) -> bytes:
    payload = rng.randbytes(size)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(f"layer-{index}.bin")
        info.size = len(payload)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def build_image(
    seed: int,
    layer_sizes: Sequence[int] = DEFAULT_LAYER_SIZES,
    *,
    foreign: int = 0,
    flavour: Flavour = "docker",
    foreign_urls: bool = True,
    os: str = "linux",
    architecture: str = "amd64",
) -> Image:
    """Build an image whose first `foreign` layers are foreign, as in Windows images.

    Layer bytes depend only on `seed` and `layer_sizes`: images that share a seed
    share layer digests, whatever their media types.
    """
    if not 0 <= foreign <= len(layer_sizes):
        raise ValueError(f"foreign={foreign} but only {len(layer_sizes)} layers")
    types = _MEDIA_TYPES[flavour]
    rng = random.Random(seed)
    layers: list[Layer] = []
    for index, size in enumerate(layer_sizes):
        tar = _layer_tar(rng, index, size)
        data = gzip.compress(tar, mtime=0)
        is_foreign = index < foreign
        urls = (f"https://example.invalid/{sha256_digest(data)}",)
        layers.append(
            Layer(
                data=data,
                diff_id=sha256_digest(tar),
                media_type=types["foreign" if is_foreign else "layer"],
                urls=urls if is_foreign and foreign_urls else (),
            )
        )
    return assemble_image(layers, seed=seed, flavour=flavour, os=os, architecture=architecture)


def assemble_image(
    layers: Sequence[Layer],
    *,
    seed: int,
    flavour: Flavour = "docker",
    os: str = "linux",
    architecture: str = "amd64",
) -> Image:
    """The config and manifest over `layers` (e.g. another image's foreign base layers and layers of its own)."""
    types = _MEDIA_TYPES[flavour]
    config = _json_bytes(
        {
            "architecture": architecture,
            "os": os,
            "created": "1970-01-01T00:00:00Z",
            "config": {"Env": [f"SEED={seed}"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": [layer.diff_id for layer in layers],
            },
        }
    )
    manifest = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": types["manifest"],
            "config": descriptor(types["config"], config),
            "layers": [layer.descriptor() for layer in layers],
        }
    )
    return Image(
        manifest=manifest,
        media_type=types["manifest"],
        config=config,
        layers=tuple(layers),
        os=os,
        architecture=architecture,
    )


def build_index(images: Iterable[Image], flavour: Flavour = "docker") -> ImageIndex:
    children = tuple(images)
    media_type = _MEDIA_TYPES[flavour]["index"]
    manifest = _json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                descriptor(
                    image.media_type,
                    image.manifest,
                    platform={"architecture": image.architecture, "os": image.os},
                )
                for image in children
            ],
        }
    )
    return ImageIndex(manifest=manifest, media_type=media_type, images=children)


def _child_manifests(artifact: Artifact) -> tuple[Image, ...]:
    return artifact.images if isinstance(artifact, ImageIndex) else ()


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def dir_files(artifact: Artifact) -> dict[str, bytes]:
    """skopeo `dir:` layout, relative path -> content."""
    files = {
        "version": b"Directory Transport Version: 1.1\n",
        "manifest.json": artifact.manifest,
    }
    for image in _child_manifests(artifact):
        files[f"{_hex(image.manifest_digest)}.manifest.json"] = image.manifest
    for digest, data in artifact.blobs.items():
        files[_hex(digest)] = data
    return files


def oci_layout_files(artifact: Artifact, tag: str) -> dict[str, bytes]:
    """OCI image layout, relative path -> content; `tag` is the ref.name annotation.

    ctr reads docker-flavoured layouts too, but skopeo and podman 4.3 only look at
    OCI media types in index.json: give them docker-flavoured images as `dir:`.
    """
    top = descriptor(
        artifact.media_type,
        artifact.manifest,
        annotations={"org.opencontainers.image.ref.name": tag},
    )
    files = {
        "oci-layout": _json_bytes({"imageLayoutVersion": "1.0.0"}),
        "index.json": _json_bytes(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]}
        ),
    }
    contents = {artifact.manifest_digest: artifact.manifest} | artifact.blobs
    for image in _child_manifests(artifact):
        contents[image.manifest_digest] = image.manifest
    for digest, data in contents.items():
        files[f"blobs/sha256/{_hex(digest)}"] = data
    return files


def _write_files(files: Mapping[str, bytes], path: Path) -> Path:
    for name, data in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return path


def _write_tar(files: Mapping[str, bytes], path: Path) -> Path:
    directories = sorted({str(Path(name).parent) for name in files} - {"."})
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in directories:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def docker_archive_files(image: Image, tag: str) -> dict[str, bytes]:
    """`docker save` layout (what `docker load` reads), relative path -> content; `tag` is e.g. `day/app:1`."""
    layer_paths = [f"{_hex(layer.digest)}/layer.tar" for layer in image.layers]
    config_path = f"{_hex(image.config_digest)}.json"
    index = [{"Config": config_path, "RepoTags": [tag], "Layers": layer_paths}]
    files = {"manifest.json": json.dumps(index).encode(), config_path: image.config}
    # docker load takes gzip'd layer files as they are and checks them against the config's diff_ids.
    files |= {path: layer.data for path, layer in zip(layer_paths, image.layers, strict=True)}
    return files


def write_docker_archive(image: Image, path: Path, tag: str) -> Path:
    return _write_tar(docker_archive_files(image, tag), path)


def write_dir(artifact: Artifact, path: Path) -> Path:
    return _write_files(dir_files(artifact), path)


def write_oci_layout(artifact: Artifact, path: Path, tag: str = "latest") -> Path:
    return _write_files(oci_layout_files(artifact, tag), path)


def write_oci_archive(artifact: Artifact, path: Path, tag: str = "latest") -> Path:
    return _write_tar(oci_layout_files(artifact, tag), path)
