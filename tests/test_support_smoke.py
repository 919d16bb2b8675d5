"""The test support code, used directly against the registry (no gateway)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urljoin

import pytest
import trustme
from support.clients import Containerd, Podman, skopeo_copy, skopeo_inspect_raw
from support.images import Image, build_image, build_index, write_dir, write_oci_archive
from support.registry import Registry, RegistryConfig, RegistryFactory, make_htpasswd


def put_blob(registry: Registry, repository: str, digest: str, data: bytes) -> None:
    start = urllib.request.Request(
        f"{registry.url}/v2/{repository}/blobs/uploads/", method="POST"
    )
    with urllib.request.urlopen(start) as response:
        location = urljoin(registry.url, response.headers["Location"])
    separator = "&" if "?" in location else "?"
    finish = urllib.request.Request(
        f"{location}{separator}digest={quote(digest)}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(finish) as response:
        assert response.status == 201


def put_manifest(registry: Registry, repository: str, tag: str, image: Image) -> int:
    request = urllib.request.Request(
        f"{registry.url}/v2/{repository}/manifests/{tag}",
        data=image.manifest,
        method="PUT",
        headers={"Content-Type": image.media_type},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_skopeo_round_trip_keeps_blobs_identical(
    registry: Registry, skopeo_cache: Path, plain_image: Image, tmp_path: Path
) -> None:
    source = write_dir(plain_image, tmp_path / "source")
    reference = f"docker://{registry.host_port}/smoke/plain:v1"

    pushed = skopeo_copy(f"dir:{source}", reference, cache_dir=skopeo_cache)
    assert pushed.returncode == 0, pushed.stderr
    pulled = skopeo_copy(reference, f"dir:{tmp_path / 'copy'}", cache_dir=skopeo_cache)
    assert pulled.returncode == 0, pulled.stderr

    assert len(plain_image.layers) == 3
    for digest, data in plain_image.blobs.items():
        assert (tmp_path / "copy" / digest.removeprefix("sha256:")).read_bytes() == data
        assert registry.blob_data_path(digest).read_bytes() == data
    assert skopeo_inspect_raw(reference) == plain_image.manifest


def test_skopeo_copies_an_index_with_all_children(
    registry: Registry, skopeo_cache: Path, tmp_path: Path
) -> None:
    index = build_index(
        [
            build_image(10, flavour="oci"),
            build_image(11, flavour="oci", architecture="arm64"),
        ],
        flavour="oci",
    )
    reference = f"docker://{registry.host_port}/smoke/index:v1"

    result = skopeo_copy(
        f"dir:{write_dir(index, tmp_path / 'index')}",
        reference,
        cache_dir=skopeo_cache,
        extra=["--all", "--preserve-digests"],
    )

    assert result.returncode == 0, result.stderr
    assert skopeo_inspect_raw(reference) == index.manifest
    assert all(registry.blob_data_path(digest).exists() for digest in index.blobs)


def test_registry_restart_keeps_port_and_storage(
    registry: Registry, skopeo_cache: Path, plain_image: Image, tmp_path: Path
) -> None:
    reference = f"docker://{registry.host_port}/smoke/restart:v1"
    source = write_dir(plain_image, tmp_path / "source")
    assert (
        skopeo_copy(f"dir:{source}", reference, cache_dir=skopeo_cache).returncode == 0
    )

    registry.stop()
    registry.start()

    assert skopeo_inspect_raw(reference) == plain_image.manifest


@pytest.mark.parametrize("flavour", ["docker", "oci"])
@pytest.mark.parametrize(
    ("allow_foreign_urls", "expected_status"), [(True, 201), (False, 500)]
)
def test_registry_foreign_urls_allow_list(
    registry_factory: RegistryFactory,
    flavour: str,
    allow_foreign_urls: bool,
    expected_status: int,
    foreign_image: Image,
    oci_foreign_image: Image,
) -> None:
    image = foreign_image if flavour == "docker" else oci_foreign_image
    registry = registry_factory(RegistryConfig(allow_foreign_urls=allow_foreign_urls))
    distributable = {layer.digest for layer in image.layers if not layer.foreign}
    for digest, data in image.blobs.items():
        if digest == image.config_digest or digest in distributable:
            put_blob(registry, "smoke/foreign", digest, data)

    assert put_manifest(registry, "smoke/foreign", "v1", image) == expected_status
    assert len(image.foreign_layers) == 2
    for layer in image.foreign_layers:
        assert not registry.blob_data_path(layer.digest).exists()


def test_registry_with_tls_and_basic_auth(
    registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_pem.write_to_path(str(key_path))
    cert_path.write_bytes(b"".join(pem.bytes() for pem in certificate.cert_chain_pems))
    registry = registry_factory(
        RegistryConfig(
            htpasswd=make_htpasswd(tmp_path / "htpasswd", "alice", "secret"),
            tls_cert=cert_path,
            tls_key=key_path,
        )
    )
    context = ssl.create_default_context()
    authority.configure_trust(context)
    handler = urllib.request.HTTPBasicAuthHandler()
    handler.add_password("registry", registry.url, "alice", "secret")
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), handler
    )

    assert registry.url.startswith("https://")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{registry.url}/v2/", context=context)
    assert refused.value.code == 401
    with opener.open(f"{registry.url}/v2/") as response:
        assert response.status == 200


@pytest.mark.parametrize("allow_non_distributable", [True, False])
def test_ctr_push_of_foreign_blobs(
    registry: Registry,
    containerd: Containerd,
    foreign_image: Image,
    allow_non_distributable: bool,
    tmp_path: Path,
) -> None:
    containerd.import_archive(
        write_oci_archive(foreign_image, tmp_path / "image.tar", "v1"), "x/y"
    )

    result = containerd.push(
        "x/y:v1",
        f"{registry.host_port}/smoke/ctr:v1",
        allow_non_distributable=allow_non_distributable,
    )

    assert result.returncode == 0, result.stderr
    for layer in foreign_image.layers:
        stored = registry.blob_data_path(layer.digest).exists()
        assert stored == (allow_non_distributable or not layer.foreign)


def test_podman_push(
    registry: Registry, podman: Podman, plain_image: Image, tmp_path: Path
) -> None:
    image_id = podman.pull(f"dir:{write_dir(plain_image, tmp_path / 'source')}")
    reference = f"docker://{registry.host_port}/smoke/podman:v1"

    result = podman.push(image_id, reference)

    assert result.returncode == 0, result.stderr
    manifest = json.loads(skopeo_inspect_raw(reference))
    assert len(manifest["layers"]) == len(plain_image.layers)
    for layer in manifest["layers"]:
        assert registry.blob_data_path(layer["digest"]).exists()
