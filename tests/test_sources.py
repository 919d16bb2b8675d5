"""`learn` sources: files, skopeo dir: folders, OCI layouts, and real registries through the registry client."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin

import pytest
import trustme
from aiohttp import encode_basic_auth, web
from aiohttp.pytest_plugin import AiohttpServer
from support.images import (
    OCI_INDEX,
    Artifact,
    Image,
    ImageIndex,
    build_image,
    build_index,
    descriptor,
    sha256_digest,
    write_dir,
    write_oci_layout,
)
from support.registry import Registry, RegistryConfig, RegistryFactory, make_htpasswd
from yarl import URL

from proxy.manifests import ForeignClassifier, ForeignLayer
from proxy.registry_client import RegistryAccess, RegistryClient, RegistryError
from proxy.sources import Found, SourceError, collect
from proxy.store import Sighting

CLASSIFIER = ForeignClassifier()
ANONYMOUS = RegistryAccess()
USER, PASSWORD = "alice", "s3cret-pass"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"


def expected(image: Image, *, with_diff_ids: bool = True, repository: str | None = None) -> list[Found]:
    sighting = Sighting("learn", repository, image.manifest_digest)
    return [
        Found(
            ForeignLayer(
                layer.digest,
                layer.media_type,
                layer.size,
                layer.urls,
                layer.diff_id if with_diff_ids else None,
            ),
            sighting,
        )
        for layer in image.foreign_layers
    ]


async def collect_twice(source: str, access: RegistryAccess = ANONYMOUS) -> list[Found]:
    first = await collect(source, CLASSIFIER, access)
    assert await collect(source, CLASSIFIER, access) == first
    return first


def two_platform_index() -> ImageIndex:
    return build_index(
        [
            build_image(20, foreign=2, flavour="oci", os="windows"),
            build_image(21, foreign=1, flavour="oci", os="windows", architecture="arm64"),
        ],
        flavour="oci",
    )


@dataclass(frozen=True)
class Pusher:
    """Raw HTTP, as a careful client pushes: every blob but foreign layers with `urls`, children, then the tag."""

    registry: Registry
    authorization: str | None = None
    tls: ssl.SSLContext | None = None

    def send(self, request: urllib.request.Request) -> tuple[int, str | None]:
        if self.authorization:
            request.add_header("Authorization", self.authorization)
        with urllib.request.urlopen(request, context=self.tls) as response:
            return response.status, response.headers["Location"]

    def push(self, repository: str, tag: str, artifact: Artifact) -> None:
        images = artifact.images if isinstance(artifact, ImageIndex) else (artifact,)
        for image in images:
            left_out = {layer.digest for layer in image.foreign_layers if layer.urls}
            for digest, data in image.blobs.items():
                if digest not in left_out:
                    self.put_blob(repository, digest, data)
        children = [(image.manifest_digest, image) for image in images if image is not artifact]
        for reference, manifest in [*children, (tag, artifact)]:
            request = urllib.request.Request(
                f"{self.registry.url}/v2/{repository}/manifests/{reference}",
                data=manifest.manifest,
                method="PUT",
                headers={"Content-Type": manifest.media_type},
            )
            assert self.send(request)[0] == 201

    def put_blob(self, repository: str, digest: str, data: bytes) -> None:
        start = urllib.request.Request(f"{self.registry.url}/v2/{repository}/blobs/uploads/", method="POST")
        _, location = self.send(start)
        assert location is not None
        upload = urljoin(self.registry.url, location)
        separator = "&" if "?" in upload else "?"
        finish = urllib.request.Request(
            f"{upload}{separator}digest={quote(digest)}",
            data=data,
            method="PUT",
            headers={"Content-Type": "application/octet-stream"},
        )
        assert self.send(finish)[0] == 201


def assert_one_line_naming(error: pytest.ExceptionInfo[SourceError], source: str) -> None:
    message = str(error.value)
    assert message.startswith(f"{source}: ")
    assert "\n" not in message


@pytest.mark.asyncio
async def test_manifest_file_gives_foreign_layers_without_diff_ids(
    tmp_path: Path, foreign_image: Image
) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(foreign_image.manifest)

    found = await collect_twice(str(path))

    assert found == expected(foreign_image, with_diff_ids=False)
    assert len(found) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("prefix", ["dir:", ""])
async def test_skopeo_dir_folder_attaches_diff_ids(tmp_path: Path, foreign_image: Image, prefix: str) -> None:
    folder = write_dir(foreign_image, tmp_path / "image")

    found = await collect_twice(f"{prefix}{folder}")

    assert found == expected(foreign_image)
    assert all(item.layer.diff_id is not None for item in found)


@pytest.mark.asyncio
async def test_image_without_foreign_layers_gives_nothing(tmp_path: Path, plain_image: Image) -> None:
    assert await collect_twice(f"dir:{write_dir(plain_image, tmp_path / 'image')}") == []


@pytest.mark.asyncio
@pytest.mark.parametrize("prefix", ["oci:", ""])
async def test_oci_layout_index_of_two_platforms(tmp_path: Path, prefix: str) -> None:
    index = two_platform_index()
    layout = write_oci_layout(index, tmp_path / "layout")

    found = await collect_twice(f"{prefix}{layout}")

    assert found == expected(index.images[0]) + expected(index.images[1])
    assert len(found) == 3


@pytest.mark.asyncio
async def test_dir_folder_with_a_manifest_list(tmp_path: Path) -> None:
    index = build_index([build_image(30, foreign=2, os="windows"), build_image(31, foreign=1, os="windows")])

    found = await collect_twice(f"dir:{write_dir(index, tmp_path / 'image')}")

    assert found == expected(index.images[0]) + expected(index.images[1])


@pytest.mark.asyncio
async def test_layers_shared_by_platforms_are_found_once(tmp_path: Path) -> None:
    # The same seed gives the same layers; only the config and so the manifest differ.
    amd64 = build_image(40, foreign=2, os="windows")
    arm64 = build_image(40, foreign=2, os="windows", architecture="arm64")
    index = build_index([amd64, arm64])

    found = await collect_twice(str(write_dir(index, tmp_path / "image")))

    assert amd64.manifest_digest != arm64.manifest_digest
    assert found == expected(amd64)


@pytest.mark.asyncio
async def test_index_children_of_unknown_types_are_skipped(tmp_path: Path, oci_foreign_image: Image) -> None:
    not_a_manifest = b'{"schemaVersion": 1, "name": "old/style"}'
    top = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                descriptor(SCHEMA1, b"never read"),
                descriptor("application/vnd.example.artifact+json", b"never read"),
                descriptor(oci_foreign_image.media_type, not_a_manifest),
                descriptor(oci_foreign_image.media_type, oci_foreign_image.manifest),
            ],
        }
    ).encode()
    layout = write_oci_layout(ImageIndex(top, OCI_INDEX, (oci_foreign_image,)), tmp_path / "layout")
    (layout / "blobs/sha256" / sha256_digest(not_a_manifest).removeprefix("sha256:")).write_bytes(
        not_a_manifest
    )

    assert await collect_twice(f"oci:{layout}") == expected(oci_foreign_image)


@pytest.mark.asyncio
async def test_registry_by_tag_and_by_digest(registry: Registry, foreign_image: Image) -> None:
    Pusher(registry).push("win/core", "ltsc", foreign_image)
    wanted = expected(foreign_image, repository="win/core")

    assert await collect_twice(f"docker://{registry.host_port}/win/core:ltsc") == wanted
    by_digest = f"docker://{registry.host_port}/win/core@{foreign_image.manifest_digest}"
    assert await collect_twice(by_digest) == wanted


@pytest.mark.asyncio
async def test_registry_through_a_manifest_list(registry: Registry) -> None:
    index = build_index([build_image(50, foreign=2, os="windows"), build_image(51, foreign=1, os="windows")])
    Pusher(registry).push("win/multi", "latest", index)

    found = await collect_twice(f"docker://{registry.host_port}/win/multi")

    assert found == expected(index.images[0], repository="win/multi") + expected(
        index.images[1], repository="win/multi"
    )


@pytest.fixture
def registry_with_basic_auth(registry_factory: RegistryFactory, tmp_path: Path) -> Registry:
    return registry_factory(RegistryConfig(htpasswd=make_htpasswd(tmp_path / "htpasswd", USER, PASSWORD)))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "access",
    [
        RegistryAccess(username=USER, password=PASSWORD),
        RegistryAccess.from_environment(
            {"REGISTRY_AUTH": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
        ),
        RegistryAccess.from_environment({"REGISTRY_AUTH": f"{USER}:{PASSWORD}"}),
    ],
    ids=["explicit", "docker-auth", "plain"],
)
async def test_registry_with_basic_auth(
    registry_with_basic_auth: Registry, oci_foreign_image: Image, access: RegistryAccess
) -> None:
    Pusher(registry_with_basic_auth, encode_basic_auth(USER, PASSWORD)).push(
        "win/private", "v1", oci_foreign_image
    )

    found = await collect_twice(f"docker://{registry_with_basic_auth.host_port}/win/private:v1", access)

    assert found == expected(oci_foreign_image, repository="win/private")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "access",
    [ANONYMOUS, RegistryAccess(username=USER, password="wrong-pass")],
    ids=["anonymous", "wrong-password"],
)
async def test_registry_refusal_is_a_one_line_error_without_credentials(
    registry_with_basic_auth: Registry, access: RegistryAccess
) -> None:
    source = f"docker://{registry_with_basic_auth.host_port}/win/private:v1"

    with pytest.raises(SourceError) as refused:
        await collect(source, CLASSIFIER, access)

    assert_one_line_naming(refused, source)
    assert "401 Unauthorized" in str(refused.value)
    assert "wrong-pass" not in str(refused.value)


def test_registry_auth_parsing_and_precedence() -> None:
    encoded = base64.b64encode(b"bob:pa:ss").decode()

    from_docker_auth = RegistryAccess.from_environment({"REGISTRY_AUTH": f"{encoded}\n"})
    explicit = RegistryAccess.from_environment({"REGISTRY_AUTH": encoded}, username="carol", password="x")

    assert (from_docker_auth.username, from_docker_auth.password) == ("bob", "pa:ss")
    assert (explicit.username, explicit.password) == ("carol", "x")
    assert RegistryAccess.from_environment({}) == RegistryAccess()
    assert "pa:ss" not in repr(from_docker_auth)
    with pytest.raises(ValueError, match="REGISTRY_AUTH") as malformed:
        RegistryAccess.from_environment({"REGISTRY_AUTH": "not-base64-nor-a-pair"})
    assert "not-base64" not in str(malformed.value)


@pytest.mark.asyncio
async def test_registry_over_tls_with_a_custom_ca(
    registry_factory: RegistryFactory, tmp_path: Path, foreign_image: Image
) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    certificate.private_key_pem.write_to_path(str(key_path))
    cert_path.write_bytes(b"".join(pem.bytes() for pem in certificate.cert_chain_pems))
    authority.cert_pem.write_to_path(str(ca_path))
    registry = registry_factory(RegistryConfig(tls_cert=cert_path, tls_key=key_path))
    Pusher(registry, tls=ssl.create_default_context(cafile=str(ca_path))).push("win/tls", "v1", foreign_image)
    source = f"docker://{registry.host_port}/win/tls:v1"
    wanted = expected(foreign_image, repository="win/tls")

    assert await collect_twice(source, RegistryAccess(ca_file=ca_path)) == wanted
    assert await collect_twice(source, RegistryAccess(insecure=True)) == wanted
    with pytest.raises(SourceError) as unverified:
        await collect(source, CLASSIFIER, ANONYMOUS)
    assert_one_line_naming(unverified, source)
    assert f"GET https://{registry.host_port}/" in str(unverified.value)
    assert "certificate" in str(unverified.value).lower()


@pytest.mark.asyncio
async def test_registry_errors_name_the_source(registry: Registry) -> None:
    missing_tag = f"docker://{registry.host_port}/win/absent:v1"
    unknown_host = "docker://registry.invalid/win/core:v1"
    malformed = [
        f"docker://{registry.host_port}/Not_A_Repository!",
        f"docker://{registry.host_port}/win/core:bad:tag",
        f"docker://{registry.host_port}/win/core@sha256:short",
        "docker://127.0.0.1:99999/win/core",
        "docker://[1:2::::]/win/core",
        "docker://",
    ]

    for source, detail in [
        (missing_tag, "404 Not Found (MANIFEST_UNKNOWN: manifest unknown)"),
        (unknown_host, "GET https://registry.invalid/v2/win/core/manifests/v1"),
        *((source, "expected docker://HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]") for source in malformed),
    ]:
        with pytest.raises(SourceError) as failed:
            await collect(source, CLASSIFIER, ANONYMOUS)
        assert_one_line_naming(failed, source)
        assert detail in str(failed.value)


@pytest.mark.asyncio
async def test_credentials_in_a_reference_are_refused_without_echoing_them() -> None:
    with pytest.raises(SourceError) as refused:
        await collect("docker://bob:hunter2@registry.invalid/win/core:v1", CLASSIFIER, ANONYMOUS)
    assert "hunter2" not in str(refused.value)


@pytest.mark.asyncio
async def test_local_errors_are_one_line_and_name_the_source(tmp_path: Path, foreign_image: Image) -> None:
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\x01 not json\n")
    schema1 = tmp_path / "schema1.json"
    schema1.write_text(json.dumps({"schemaVersion": 1, "mediaType": SCHEMA1}))
    plain_folder = tmp_path / "plain-folder"
    plain_folder.mkdir()
    corrupt = write_dir(foreign_image, tmp_path / "corrupt")
    (corrupt / foreign_image.config_digest.removeprefix("sha256:")).write_bytes(b"{}")
    index_file = tmp_path / "index.json"
    index_file.write_bytes(two_platform_index().manifest)

    for source, detail in [
        (str(tmp_path / "missing.json"), "No such file or directory"),
        (f"dir:{tmp_path / 'missing'}", "manifest.json: No such file or directory"),
        (f"oci:{plain_folder}", "index.json: No such file or directory"),
        (str(garbage), "not a manifest"),
        (str(schema1), "not a manifest"),
        (str(plain_folder), "neither a skopeo dir: folder nor an OCI layout"),
        (str(corrupt), "does not match"),
        (str(index_file), "an index"),
    ]:
        with pytest.raises(SourceError) as failed:
            await collect(source, CLASSIFIER, ANONYMOUS)
        assert_one_line_naming(failed, source)
        assert detail in str(failed.value)


@pytest.mark.asyncio
async def test_catalog_and_tags_follow_pages_and_blobs_can_be_deleted(
    registry: Registry, plain_image: Image
) -> None:
    pusher = Pusher(registry)
    for repository in ("a/one", "b/two", "c/three"):
        pusher.push(repository, "v1", plain_image)
    pusher.push("a/one", "v2", plain_image)

    async with RegistryClient(URL(registry.url), ANONYMOUS) as client:
        repositories = [name async for name in client.catalog(page_size=1)]
        tags = [name async for name in client.tags("a/one")]
        deleted = await client.delete_blob("b/two", plain_image.config_digest)
        deleted_again = await client.delete_blob("b/two", plain_image.config_digest)
        with pytest.raises(RegistryError, match=r"^GET http://[^ ]+/v2/b/two/blobs/sha256:[0-9a-f]+: 404"):
            await client.get_blob("b/two", plain_image.config_digest, 1024 * 1024)
        config = await client.get_blob("a/one", plain_image.config_digest, 1024 * 1024)

    assert repositories == ["a/one", "b/two", "c/three"]
    assert tags == ["v1", "v2"]
    assert (deleted, deleted_again) == (202, 404)
    assert config == plain_image.config


@pytest.mark.asyncio
async def test_bearer_tokens_are_fetched_once_per_scope_and_blob_redirects_followed(
    aiohttp_server: AiohttpServer, foreign_image: Image
) -> None:
    token_requests: list[dict[str, str]] = []

    async def token(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == encode_basic_auth(USER, PASSWORD)
        token_requests.append(dict(request.query))
        return web.json_response({"access_token": f"token for {request.query['scope']}"})

    def authorized(request: web.Request) -> None:
        scope = f"repository:{request.match_info['name']}:pull"
        if request.headers.get("Authorization") != f"Bearer token for {scope}":
            challenge = f'Bearer realm="{server.make_url("/token")}",service="fake",scope="{scope}"'
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": challenge})

    async def manifest(request: web.Request) -> web.Response:
        authorized(request)
        return web.Response(body=foreign_image.manifest, content_type=foreign_image.media_type)

    async def blob(request: web.Request) -> web.Response:
        authorized(request)
        raise web.HTTPTemporaryRedirect(f"/storage/{request.match_info['digest']}")

    async def storage(request: web.Request) -> web.Response:
        return web.Response(body=foreign_image.blobs[request.match_info["digest"]])

    app = web.Application()
    app.router.add_get("/token", token)
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", manifest)
    app.router.add_get("/v2/{name:.+}/blobs/{digest}", blob)
    app.router.add_get("/storage/{digest}", storage)
    server = await aiohttp_server(app)
    access = RegistryAccess(username=USER, password=PASSWORD)

    found = await collect(f"docker://127.0.0.1:{server.port}/win/token:v1", CLASSIFIER, access)

    assert found == expected(foreign_image, repository="win/token")
    assert token_requests == [{"scope": "repository:win/token:pull", "service": "fake"}]
