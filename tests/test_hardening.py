"""Hardening: bad manifests, every spelling of a digest or a name, hostile HTTP, slow clients, secrets and TLS.

Everything runs against a real `docker-registry` (CNCF distribution 2.8) with the gateway as a real
process. What the registry itself accepts was checked against it, and each test shows it again with a
control exchange straight to the registry, so that a test fails if the registry's behaviour changes.

Facts about distribution 2.8 these tests rest on (all checked here):
- `?digest=` is read with Go's FormValue: the first `digest` value, percent-decoded (`sha256%3A...`,
  `%64igest=` are the same digest); the hex must be lower case, nothing may surround it. FormValue also
  reads an `application/x-www-form-urlencoded` or multipart request *body*, before the query.
- `digest=sha512:<hex>` of a blob's bytes is accepted, and the blob is then stored under its sha256 too.
- Paths are percent-decoded (`%2F` is `/`); a path with `.`/`..`/`//` segments gets a 301, nothing else.
- Manifests are read by Go's encoding/json: keys match struct fields case-insensitively ("Layers",
  "MediaType"), the last of duplicate keys wins, invalid UTF-8 in strings is accepted, nesting deeper
  than 10,000 levels is refused, and bodies over 4 MiB are refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from support.faulty import FaultyUpstream, rss_bytes
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import Image, build_image
from support.processes import ManagedProcess, free_port, require_binaries, run
from support.protocol import (
    Answer,
    absolute,
    call,
    digest_of,
    push_image_blobs,
    push_single_put,
    put_manifest,
    start_upload,
    teach,
    upstream_has,
)
from support.registry import Registry, RegistryConfig, RegistryFactory, make_htpasswd
from yarl import URL

from proxy.config import Address, Settings

MiB = 1024 * 1024


# Shared processes ---------------------------------------------------------------------------------


@dataclass
class Stack:
    registry: Registry
    gateway: GatewayProcess

    def learned(self, repository: str) -> list[str]:
        return [entry["digest"] for entry in self.gateway.events("learned") if entry["repository"] == repository]

    def decisions(self, repository: str) -> list[dict[str, Any]]:
        return [entry for entry in self.gateway.events("decision") if entry.get("repository") == repository]


def start_stack(factory: pytest.TempPathFactory, config: dict[str, Any] | None = None) -> Stack:
    require_binaries("docker-registry")
    registry = Registry(factory.mktemp("registry"), RegistryConfig(allow_foreign_urls=True))
    registry.start()
    gateway = GatewayProcess(factory.mktemp("gateway"), registry.url, args=["--log-level", "info"], config=config)
    try:
        gateway.start()
    except BaseException:
        registry.stop()
        raise
    return Stack(registry, gateway)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One registry and one gateway (policy: drop) for the many small cases; each case uses repositories of its own."""
    shared = start_stack(tmp_path_factory)
    yield shared
    shared.gateway.stop()
    shared.registry.stop()


@pytest.fixture(scope="module")
def ruled_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway whose only blocking rule is by repository: team/** is rejected, the rest allowed."""
    shared = start_stack(
        tmp_path_factory,
        {"policy": {"default": "allow", "rules": [{"repository": "team/**", "action": "reject"}]}},
    )
    yield shared
    shared.gateway.stop()
    shared.registry.stop()


async def wait_for_log(gateway: GatewayProcess, predicate: Callable[[], bool], what: str) -> None:
    """Log lines are written after the answer: wait for them, boundedly."""
    deadline = time.monotonic() + 10
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in the gateway's log:\n{gateway.process.log_text()[-3000:]}")
        await asyncio.sleep(0.05)


async def request_logged(gateway: GatewayProcess, count: int) -> None:
    await wait_for_log(gateway, lambda: len(gateway.events("request")) >= count, f"{count} request lines")


def raw_exchange(host_port: str, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are; read one answer (its head and Content-Length body) or until the gateway closes.

    A reset reads as what came before it; no answer within `timeout` reads as what came so far.
    """
    host, port = host_port.rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            while not answer_complete(received):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (ConnectionError, TimeoutError):
            pass
    return received


def answer_complete(received: bytes) -> bool:
    head, found, body = received.partition(b"\r\n\r\n")
    if not found:
        return False
    if head.startswith(b"HTTP/1.1 100 "):
        return answer_complete(body)
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value)
    return False


def status_of(answer: bytes) -> int:
    parts = answer.split(b"\r\n", 1)[0].split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else 0


async def assert_alive(http: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    assert gateway.process.running, gateway.process.log_text()[-3000:]
    assert (await call(http, "GET", f"{gateway.url}/v2/")).status == 200


# Bad manifests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestCase:
    body: bytes
    content_type: str
    # The foreign layers the registry reads in the body (it stores the manifest only if it accepts it).
    registry_reads_foreign: bool


def _document(image: Image) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(image.manifest)
    return document


def _encoded(document: object) -> bytes:
    return json.dumps(document).encode()


def _renamed_key(image: Image, where: str, old: str, new: str) -> bytes:
    document = _document(image)
    if where == "top":
        document[new] = document.pop(old)
    else:
        for layer in document["layers"]:
            layer[new] = layer.pop(old)
    return _encoded(document)


def _same_key_in_another_case(image: Image) -> bytes:
    """`"mediaType": ordinary` then `"MEDIATYPE": foreign` in the foreign layer: Go keeps the last."""
    document = _document(image)
    foreign = document["layers"][0]
    foreign_type = foreign.pop("mediaType")
    text = _encoded(document).decode()
    marker = f'"digest": "{foreign["digest"]}"'
    ordinary = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    return text.replace(marker, f'"mediaType": "{ordinary}", "MEDIATYPE": "{foreign_type}", {marker}', 1).encode()


def _with_annotation_bytes(image: Image, raw: bytes) -> bytes:
    document = _document(image)
    document["annotations"] = {"note": "PLACEHOLDER"}
    return _encoded(document).replace(b"PLACEHOLDER", raw)


def _deeply_nested(image: Image, levels: int) -> bytes:
    document = _document(image)
    document["annotations"] = "PLACEHOLDER"
    return _encoded(document).replace(b'"PLACEHOLDER"', b"[" * levels + b"]" * levels)


def _huge_layers(image: Image, count: int) -> bytes:
    document = _document(image)
    foreign = document["layers"][0]
    document["layers"] = [
        {**foreign, "digest": "sha256:" + hashlib.sha256(b"%d" % index).hexdigest()} for index in range(count)
    ]
    return _encoded(document)


def _duplicate_layers(image: Image, first: str, last: str, empty_first: bool) -> bytes:
    layers = json.dumps(_document(image)["layers"])
    document = _document(image)
    del document["layers"]
    head = _encoded(document)[:-1]
    pairs = (f'"{first}": [], "{last}": {layers}' if empty_first else f'"{first}": {layers}, "{last}": []').encode()
    return head + b", " + pairs + b"}"


def manifest_cases(image: Image) -> dict[str, ManifestCase]:
    docker = image.media_type
    document = _document(image)
    return {
        "invalid-json": ManifestCase(image.manifest[:-2], docker, False),
        "json-array": ManifestCase(b"[" + image.manifest + b"]", docker, False),
        "layers-is-an-object": ManifestCase(_encoded({**document, "layers": {"0": document["layers"][0]}}), docker, False),
        "digest-is-a-number": ManifestCase(
            _encoded({**document, "layers": [{**document["layers"][0], "digest": 12345}, *document["layers"][1:]]}),
            docker,
            False,
        ),
        "nested-100k-levels": ManifestCase(_deeply_nested(image, 100_000), docker, False),
        "nested-5k-levels": ManifestCase(_deeply_nested(image, 5_000), docker, True),
        "duplicate-layers-key-last-empty": ManifestCase(_duplicate_layers(image, "layers", "layers", False), docker, False),
        "huge-layers-array": ManifestCase(_huge_layers(image, 12_000), docker, True),
        "wrong-content-type-text": ManifestCase(image.manifest, "text/plain", False),
        "wrong-content-type-index": ManifestCase(image.manifest, "application/vnd.oci.image.index.v1+json", False),
        "no-content-type": ManifestCase(image.manifest, "", False),
        # Go's encoding/json: what the registry reads differs from what a strict reader sees.
        "non-utf8-bytes-in-a-string": ManifestCase(_with_annotation_bytes(image, b"\xff\xfe"), docker, True),
        "Layers-key": ManifestCase(_renamed_key(image, "top", "layers", "Layers"), docker, True),
        "MediaType-key-in-layers": ManifestCase(_renamed_key(image, "layers", "mediaType", "MediaType"), docker, True),
        "Digest-key-in-layers": ManifestCase(_renamed_key(image, "layers", "digest", "Digest"), docker, True),
        "MEDIATYPE-overrides-mediaType": ManifestCase(_same_key_in_another_case(image), docker, True),
        "empty-layers-then-Layers": ManifestCase(_duplicate_layers(image, "layers", "Layers", True), docker, True),
    }


# An image of its own per case: a gateway logs "learned" only for digests new to it.
MANIFEST_CASE_NAMES = list(manifest_cases(build_image(299, foreign=1, os="windows")))


def manifest_case(name: str) -> tuple[Image, ManifestCase]:
    image = build_image(300 + MANIFEST_CASE_NAMES.index(name), foreign=1, os="windows")
    return image, manifest_cases(image)[name]


def _ordinary_blobs(image: Image) -> list[bytes]:
    foreign = {layer.digest for layer in image.foreign_layers}
    return [data for digest, data in image.blobs.items() if digest not in foreign]


@pytest.mark.parametrize("case", MANIFEST_CASE_NAMES)
async def test_a_bad_manifest_gets_the_registrys_answer_and_teaches_only_what_the_registry_stored(
    stack: Stack, http: aiohttp.ClientSession, case: str
) -> None:
    image, manifest = manifest_case(case)
    direct_repository, repository = f"bad/direct-{case.lower()}", f"bad/{case.lower()}"
    for name in (direct_repository, repository):
        await push_image_blobs(http, stack.registry.url, name, _ordinary_blobs(image))
    headers = {"Content-Type": manifest.content_type} if manifest.content_type else {}

    direct = await call(http, "PUT", f"{stack.registry.url}/v2/{direct_repository}/manifests/1", data=manifest.body,
                        headers=headers)  # fmt: skip
    answer = await call(http, "PUT", f"{stack.gateway.url}/v2/{repository}/manifests/1", data=manifest.body,
                        headers=headers)  # fmt: skip

    assert answer.status == direct.status, (answer, direct)
    if direct.status >= 400:
        assert answer.error_codes == direct.error_codes
    await assert_alive(http, stack.gateway)
    stored = answer.status == 201
    expected = {layer.digest for layer in image.foreign_layers} if stored and manifest.registry_reads_foreign else set()
    if case == "huge-layers-array":
        expected = {layer["digest"] for layer in json.loads(manifest.body)["layers"]}
    learned = set(stack.learned(repository))
    assert learned == expected, (
        f"the registry {'stored' if answer.status == 201 else 'refused'} the manifest; the gateway learned "
        f"{len(learned)} foreign digests instead of {len(expected)}"
    )


async def test_a_manifest_over_4_mib_is_refused_by_the_gateway_itself(stack: Stack, http: aiohttp.ClientSession) -> None:
    image = build_image(298, foreign=1, os="windows")
    await push_image_blobs(http, stack.registry.url, "big/app", _ordinary_blobs(image))
    exactly = image.manifest + b" " * (4 * MiB - len(image.manifest))

    too_big = await put_manifest(http, stack.gateway.url, "big/app", "over", exactly + b" ", image.media_type)
    assert too_big.status == 413, too_big
    assert too_big.error_codes == ["SIZE_INVALID"]
    assert (await call(http, "HEAD", f"{stack.registry.url}/v2/big/app/manifests/over",
                       headers={"Accept": image.media_type})).status == 404  # fmt: skip
    assert stack.learned("big/app") == []

    at_the_limit = await put_manifest(http, stack.gateway.url, "big/app", "limit", exactly, image.media_type)
    assert at_the_limit.status == 201, at_the_limit
    await wait_for_log(stack.gateway, lambda: bool(stack.learned("big/app")), "learned event")
    assert stack.learned("big/app") == [image.foreign_layers[0].digest]


async def test_after_a_case_insensitive_manifest_the_foreign_layer_is_still_stopped(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """What the lead asked: with "Layers" the registry stores the foreign layer's manifest; does the gateway miss it?"""
    image = build_image(301, foreign=1, os="windows")
    await push_image_blobs(http, stack.gateway.url, "case/base", _ordinary_blobs(image))
    body = _renamed_key(image, "top", "layers", "Layers")
    stored = await put_manifest(http, stack.gateway.url, "case/base", "1", body, image.media_type)
    assert stored.status == 201, stored
    pulled = await call(http, "GET", f"{stack.gateway.url}/v2/case/base/manifests/1", headers={"Accept": image.media_type})
    assert pulled.body == body

    foreign = image.foreign_layers[0]
    answer = await push_single_put(http, stack.gateway.url, "case/app", foreign.data)
    assert answer.status == 201, answer
    assert not await upstream_has(http, stack.registry, "case/app", foreign.digest), (
        "the registry accepted a manifest listing this foreign layer under \"Layers\" (and gave it back on pull), "
        "but the gateway learned nothing from it and let the blob through"
    )


# Every spelling of a digest -----------------------------------------------------------------------


BlobPush = Callable[[aiohttp.ClientSession, str, str, bytes], Awaitable[Answer]]


def _hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_with_query(query: Callable[[bytes], str]) -> BlobPush:
    """POST, then one PUT with the body and `query(data)` appended to the session's own query (`_state`)."""

    async def push(http: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
        location = await start_upload(http, base, repository)
        target = URL(f"{base}{location.raw_path}?{location.raw_query_string}&{query(data)}", encoded=True)
        return await call(http, "PUT", target, data=data, headers={"Content-Type": "application/octet-stream"})

    return push


def mount_with_query(query: Callable[[bytes], str]) -> BlobPush:
    async def push(http: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
        return await call(http, "POST", URL(f"{base}/v2/{repository}/blobs/uploads/?{query(data)}", encoded=True))

    return push


async def patch_then_put(http: aiohttp.ClientSession, base: str, repository: str, data: bytes,
                         body: bytes, content_type: str) -> Answer:  # fmt: skip
    """The blob in a PATCH, then a PUT whose body (not its query) names the digest."""
    location = await start_upload(http, base, repository)
    patched = await call(http, "PATCH", location, data=data, headers={"Content-Type": "application/octet-stream"})
    assert patched.status == 202, patched
    return await call(http, "PUT", absolute(base, patched.headers["Location"]), data=body,
                      headers={"Content-Type": content_type})  # fmt: skip


async def digest_in_a_form_body(http: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
    return await patch_then_put(http, base, repository, data, f"digest=sha256:{_hex(data)}".encode(),
                                "application/x-www-form-urlencoded")  # fmt: skip


async def digest_in_a_multipart_body(http: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
    boundary = "hardening-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="digest"\r\n\r\nsha256:{_hex(data)}\r\n'
            f"--{boundary}--\r\n").encode()  # fmt: skip
    return await patch_then_put(http, base, repository, data, body, f"multipart/form-data; boundary={boundary}")


async def mount_in_a_form_body(http: aiohttp.ClientSession, base: str, repository: str, data: bytes) -> Answer:
    return await call(http, "POST", f"{base}/v2/{repository}/blobs/uploads/",
                      data=f"mount=sha256:{_hex(data)}&from=seed/repo".encode(),
                      headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip


def _every_byte_encoded(text: str) -> str:
    return "".join(f"%{byte:02x}" for byte in text.encode())


ACCEPTED_FORMS: dict[str, BlobPush] = {
    "plain": put_with_query(lambda data: f"digest=sha256:{_hex(data)}"),
    "colon-percent-encoded": put_with_query(lambda data: f"digest=sha256%3A{_hex(data)}"),
    "colon-lower-case-percent": put_with_query(lambda data: f"digest=sha256%3a{_hex(data)}"),
    "every-byte-percent-encoded": put_with_query(lambda data: "digest=" + _every_byte_encoded(f"sha256:{_hex(data)}")),
    "parameter-name-percent-encoded": put_with_query(lambda data: f"%64igest=sha256:{_hex(data)}"),
    "repeated-foreign-first": put_with_query(lambda data: f"digest=sha256:{_hex(data)}&digest=sha256:{'0' * 64}"),
    "empty-pairs-around": put_with_query(lambda data: f"&&digest=sha256:{_hex(data)}&&"),
    "among-other-parameters": put_with_query(lambda data: f"x=1&digest=sha256:{_hex(data)}&y"),
    "mount-percent-encoded": mount_with_query(lambda data: f"mount=sha256%3A{_hex(data)}&from=seed%2Frepo"),
    "mount-repeated": mount_with_query(lambda data: f"mount=sha256:{_hex(data)}&mount=x&from=seed/repo"),
    # Accepted by the registry, and not seen by the gateway:
    "sha512-of-the-same-bytes": put_with_query(lambda data: f"digest=sha512:{hashlib.sha512(data).hexdigest()}"),
    "digest-in-a-form-body": digest_in_a_form_body,
    "digest-in-a-multipart-body": digest_in_a_multipart_body,
    "mount-in-a-form-body": mount_in_a_form_body,
}


@pytest.mark.parametrize("form", ACCEPTED_FORMS)
async def test_a_known_foreign_digest_in_any_form_the_registry_accepts_is_stopped(
    stack: Stack, http: aiohttp.ClientSession, form: str
) -> None:
    push = ACCEPTED_FORMS[form]
    control = os.urandom(4096)
    await push_single_put(http, stack.registry.url, "seed/repo", control)
    await push(http, stack.registry.url, f"control/{form}", control)
    assert await upstream_has(http, stack.registry, f"control/{form}", digest_of(control)), "the registry refuses this form"

    image = build_image(310, foreign=1, os="windows")
    await teach(http, stack.gateway.url, "forms/base", image)
    foreign = image.foreign_layers[0]
    await push_single_put(http, stack.registry.url, "seed/repo", foreign.data)  # the source of mounts
    answer = await push(http, stack.gateway.url, f"forms/{form}", foreign.data)

    assert not await upstream_has(http, stack.registry, f"forms/{form}", foreign.digest), (
        f"known foreign blob stored by the registry; the gateway answered {answer.status} {answer.body[:200]!r} "
        f"and decided {stack.decisions(f'forms/{form}')}"
    )
    if answer.status < 400:  # dropped, as the policy says, and logged as such
        assert answer.status == 201, answer
        await wait_for_log(stack.gateway, lambda: bool(stack.decisions(f"forms/{form}")), "decision")
    else:  # or refused outright, with an OCI error the client can show
        assert answer.error_codes, answer


REJECTED_FORMS: dict[str, Callable[[bytes], str]] = {
    "upper-case-hex": lambda data: f"digest=sha256:{_hex(data).upper()}",
    "upper-case-algorithm": lambda data: f"digest=SHA256:{_hex(data)}",
    "plus-before": lambda data: f"digest=+sha256:{_hex(data)}",
    "plus-after": lambda data: f"digest=sha256:{_hex(data)}+",
    "space-after": lambda data: f"digest=sha256:{_hex(data)}%20",
    "tab-after": lambda data: f"digest=sha256:{_hex(data)}%09",
    "nul-after": lambda data: f"digest=sha256:{_hex(data)}%00",
    "one-hex-digit-short": lambda data: f"digest=sha256:{_hex(data)[:-1]}",
    "one-hex-digit-long": lambda data: f"digest=sha256:{_hex(data)}0",
    "sha512-label-on-sha256-hex": lambda data: f"digest=sha512:{_hex(data)}",
    "wrong-algorithm": lambda data: f"digest=md5:{hashlib.md5(data).hexdigest()}",
    "byte-order-mark-before": lambda data: f"digest=%EF%BB%BFsha256:{_hex(data)}",
    "semicolon-separated": lambda data: f"x=1;digest=sha256:{_hex(data)}",
    "name-in-upper-case": lambda data: f"Digest=sha256:{_hex(data)}",
    "other-digest-first": lambda data: f"digest=sha256:{'0' * 64}&digest=sha256:{_hex(data)}",
}


@pytest.mark.parametrize("form", REJECTED_FORMS)
async def test_a_digest_form_the_registry_refuses_gets_the_registrys_own_error(
    stack: Stack, http: aiohttp.ClientSession, form: str
) -> None:
    push = put_with_query(REJECTED_FORMS[form])
    control = os.urandom(4096)
    direct = await push(http, stack.registry.url, f"control/{form}", control)
    assert direct.status == 400 and not await upstream_has(http, stack.registry, f"control/{form}", digest_of(control))

    image = build_image(311, foreign=1, os="windows")
    await teach(http, stack.gateway.url, "refused/base", image)
    foreign = image.foreign_layers[0]
    answer = await push(http, stack.gateway.url, f"refused/{form}", foreign.data)

    assert not await upstream_has(http, stack.registry, f"refused/{form}", foreign.digest)
    # "other-digest-first" and "semicolon-separated" are refused by the gateway itself (registries read them
    # differently), with the registry's own status and code.
    assert (answer.status, answer.error_codes) == (direct.status, direct.error_codes), (answer, direct)


NAME_FORMS = {
    "dot-dot-segment": "x/../team/app",
    "percent-encoded-dot-dot": "x/%2e%2e/team/app",
    "dot-segment": "team/./app",
    "double-slash": "team//app",
    "leading-double-slash": "/team/app",
    "percent-encoded-slash": "team%2Fapp",
    "percent-encoded-letter": "%74eam/app",
    "trailing-dot": "team/app/.",
}


@pytest.mark.parametrize("way", ["mount", "upload"])
@pytest.mark.parametrize("form", NAME_FORMS)
async def test_no_spelling_of_a_repository_name_escapes_its_rule(
    ruled_stack: Stack, http: aiohttp.ClientSession, form: str, way: str
) -> None:
    stack = ruled_stack
    image = build_image(320, foreign=1, os="windows")
    await teach(http, stack.gateway.url, "team/base", image)
    foreign = image.foreign_layers[0]
    await push_single_put(http, stack.registry.url, "seed/repo", foreign.data)
    name = NAME_FORMS[form]
    base = f"{stack.gateway.url}/v2/{name}/blobs/uploads/"

    if way == "mount":
        answer = await call(http, "POST", URL(f"{base}?mount={foreign.digest}&from=seed/repo", encoded=True))
    else:
        started = await call(http, "POST", URL(base, encoded=True))
        answer = started
        if started.status == 202:
            location = absolute(stack.gateway.url, started.headers["Location"])
            session = location.raw_path.rsplit("/", 1)[1]
            target = f"{base}{session}?{location.raw_query_string}&digest={foreign.digest}"
            answer = await call(http, "PUT", URL(target, encoded=True), data=foreign.data)

    assert not await upstream_has(http, stack.registry, "team/app", foreign.digest), answer
    assert answer.status in {301, 403}, answer
    if answer.status == 403:
        assert answer.error_codes == ["DENIED"]


async def test_odd_repository_names_get_the_registrys_own_answer(stack: Stack, http: aiohttp.ClientSession) -> None:
    for name in ("a" * 300, "UPPER/Case", "-dash/first", "a/" * 200 + "b"):
        direct = await call(http, "POST", URL(f"{stack.registry.url}/v2/{name}/blobs/uploads/", encoded=True))
        answer = await call(http, "POST", URL(f"{stack.gateway.url}/v2/{name}/blobs/uploads/", encoded=True))
        assert answer.status == direct.status, (name, answer, direct)
    await assert_alive(http, stack.gateway)


# Hostile HTTP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def injected_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, FaultyUpstream]]:
    """A gateway whose upstream is the fault injector (faults unarmed): it records every request line that arrives."""
    require_binaries("docker-registry")
    registry = Registry(tmp_path_factory.mktemp("registry"), RegistryConfig(allow_foreign_urls=True))
    registry.start()
    injector = FaultyUpstream(registry.host_port).start()
    gateway = GatewayProcess(tmp_path_factory.mktemp("gateway"), injector.url, args=["--log-level", "info"])
    gateway.start()
    yield Stack(registry, gateway), injector
    gateway.stop()
    injector.stop()
    registry.stop()


SMUGGLED = b"GET /v2/smuggled/tags/list HTTP/1.1\r\nHost: x\r\n\r\n"
SMUGGLING = {
    "content-length-and-transfer-encoding": (
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
    ),
    "transfer-encoding-then-content-length": (
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n0\r\n\r\n%s"
        % (5 + len(SMUGGLED), SMUGGLED)
    ),
    "two-content-lengths": b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: %d\r\n\r\n%s"
    % (len(SMUGGLED), SMUGGLED),
    "content-length-list": b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0, %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED),
    "content-length-with-plus": b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: +%d\r\n\r\n%s"
    % (len(SMUGGLED), SMUGGLED),
    "obs-fold-transfer-encoding": (
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n%s"
        % (5 + len(SMUGGLED), SMUGGLED)
    ),
    "obs-fold-other-header": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n" + SMUGGLED,
    "space-before-colon": (
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n%s"
        % (5 + len(SMUGGLED), SMUGGLED)
    ),
    "chunked-not-last": (
        b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED
    ),
    "unknown-transfer-coding": b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "negative-chunk-size": b"POST /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n\r\n" + SMUGGLED,
    "nul-in-header-name": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A\x00B: 1\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("attempt", SMUGGLING)
async def test_request_smuggling_is_refused_and_nothing_reaches_the_registry(
    injected_stack: tuple[Stack, FaultyUpstream], http: aiohttp.ClientSession, attempt: str
) -> None:
    stack, injector = injected_stack
    answer = await asyncio.to_thread(raw_exchange, stack.gateway.host_port, SMUGGLING[attempt])

    assert status_of(answer) == 400, answer[:300]
    assert answer.count(b"HTTP/1.") == 1, answer[:600]
    assert not [line for line in injector.request_lines if b"smuggled" in line], injector.request_lines
    await assert_alive(http, stack.gateway)


async def test_no_request_form_makes_the_gateway_connect_anywhere_but_its_upstream(
    injected_stack: tuple[Stack, FaultyUpstream], http: aiohttp.ClientSession
) -> None:
    """An open proxy would connect to the victim listener for one of these; the gateway must not."""
    stack, injector = injected_stack
    victim = socket.create_server(("127.0.0.1", 0))
    victim.settimeout(0.5)
    target = f"127.0.0.1:{victim.getsockname()[1]}"
    refused = [
        f"GET http://{target}/v2/ HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"GET https://{target}/v2/ HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"GET http://{stack.gateway.host_port}/v2/ HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"CONNECT {stack.registry.host_port} HTTP/1.1\r\nHost: {stack.registry.host_port}\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    forwarded = [
        f"GET /v2/ HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: {target}\r\nForwarded: host={target}\r\n\r\n",
        f"GET //{target}/v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /v2/../../{target}/v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    try:
        for payload in refused:
            answer = await asyncio.to_thread(raw_exchange, stack.gateway.host_port, payload.encode())
            assert status_of(answer) == 400, (payload, answer[:300])
            assert b"UNSUPPORTED" in answer, answer
        for payload in forwarded:
            answer = await asyncio.to_thread(raw_exchange, stack.gateway.host_port, payload.encode())
            assert status_of(answer) in {200, 301, 404}, (payload, answer[:300])
        with pytest.raises(TimeoutError):
            victim.accept()
    finally:
        victim.close()
    assert not [line for line in injector.request_lines if line.startswith(b"CONNECT")]
    await assert_alive(http, stack.gateway)


LIMITS = {
    "header-line-of-9-kib": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9216 + b"\r\n\r\n",
    "request-target-of-9-kib": b"GET /v2/" + b"a" * 9216 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "1000-headers": b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(1000)) + b"\r\n",
    "40000-headers": b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(40000)) + b"\r\n",
    "1-6-mb-of-headers": b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 8000) for i in range(200))
    + b"\r\n",
}


@pytest.mark.parametrize("limit", LIMITS)
async def test_oversized_request_heads_are_refused_and_the_gateway_keeps_serving(
    stack: Stack, http: aiohttp.ClientSession, limit: str
) -> None:
    answer = await asyncio.to_thread(raw_exchange, stack.gateway.host_port, LIMITS[limit])
    assert status_of(answer) in {400, 414, 431}, answer[:300]
    await assert_alive(http, stack.gateway)


async def test_large_but_ordinary_request_heads_pass(stack: Stack, http: aiohttp.ClientSession) -> None:
    """A 4 KiB bearer token and 60 headers are what real clients send: the limits must leave room for them."""
    headers = {f"X-Extra-{index}": "v" * 50 for index in range(60)}
    headers["Authorization"] = "Bearer " + "t" * 4096
    answer = await call(http, "GET", f"{stack.gateway.url}/v2/", headers=headers)
    assert answer.status == 200, answer


@pytest.fixture(scope="module")
def impatient_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    shared = start_stack(tmp_path_factory, {"server": {"idle_timeout": 1}})
    yield shared
    shared.gateway.stop()
    shared.registry.stop()


SLOW_CLIENTS = {
    "sends-nothing": b"",
    "half-sent-request-line": b"PUT /v2/slow/app/blobs/uploads/",
    "half-sent-headers": b"GET /v2/ HTTP/1.1\r\nHost: x\r\n",
    "half-sent-body": b"PATCH /v2/slow/app/blobs/uploads/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    + b"b" * 10,
    "half-sent-chunked-body": b"PATCH /v2/slow/app/blobs/uploads/x HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n10\r\nbbbbbbbb",
    "idle-after-an-answer": b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
}


def closed_within(host_port: str, payload: bytes, seconds: float) -> tuple[bool, bytes]:
    """Send `payload`, then nothing: was the connection closed by the gateway within `seconds`?"""
    host, port = host_port.rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=seconds) as sock:
        sock.sendall(payload)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    return True, received
                received += chunk
        except TimeoutError:
            return False, received
        except ConnectionError:
            return True, received
    return False, received


@pytest.mark.parametrize("client", SLOW_CLIENTS)
async def test_an_idle_or_half_sent_request_is_closed_after_the_idle_timeout(
    impatient_stack: Stack, http: aiohttp.ClientSession, client: str
) -> None:
    """server.idle_timeout = 1 s; closing within 6 s is generous. aiohttp's keepalive_timeout, which the
    gateway sets from it, covers a connection waiting for a request's head; nothing covers a stalled body."""
    closed, received = await asyncio.to_thread(
        closed_within, impatient_stack.gateway.host_port, SLOW_CLIENTS[client], 6.0
    )
    assert closed, f"connection still open 6 s after the client went quiet (idle_timeout 1 s); got {received[:200]!r}"
    await assert_alive(http, impatient_stack.gateway)


async def push_streamed_blob(http: aiohttp.ClientSession, base: str, repository: str, size: int) -> str:
    """A blob of `size` bytes in one streamed PATCH, never held in memory whole; returns its digest."""
    block = os.urandom(MiB)
    digest = hashlib.sha256()

    async def body() -> Any:
        for index in range(size // MiB):
            part = index.to_bytes(8, "big") + block[8:]
            digest.update(part)
            yield part

    location = await start_upload(http, base, repository)
    patched = await call(http, "PATCH", location, data=body(), headers={"Content-Type": "application/octet-stream"})
    assert patched.status == 202, patched
    done = absolute(base, patched.headers["Location"]).update_query({"digest": "sha256:" + digest.hexdigest()})
    committed = await call(http, "PUT", done)
    assert committed.status == 201, committed
    return "sha256:" + digest.hexdigest()


@pytest.mark.slow
async def test_a_client_that_stops_reading_a_large_download_costs_bounded_memory(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    size = 512 * MiB
    digest = await push_streamed_blob(http, stack.registry.url, "huge/blob", size)
    pid = stack.gateway.process.pid
    before = rss_bytes(pid)
    host, port = stack.gateway.host_port.rsplit(":", 1)

    def stalled_download() -> tuple[list[int], str, int]:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"GET /v2/huge/blob/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            head, _, first = head.partition(b"\r\n\r\n")
            hashed = hashlib.sha256(first)
            received = len(first)
            while received < MiB:
                chunk = sock.recv(65536)
                hashed.update(chunk)
                received += len(chunk)
            samples = []
            for _ in range(16):  # not reading for 4 s: the gateway must stop reading the registry
                time.sleep(0.25)
                samples.append(rss_bytes(pid))
            while received < size:
                chunk = sock.recv(4 * MiB)
                if not chunk:
                    break
                hashed.update(chunk)
                received += len(chunk)
            return samples, "sha256:" + hashed.hexdigest(), received

    samples, got, received = await asyncio.to_thread(stalled_download)
    growth = max(samples) - before
    print(f"512 MiB download, client not reading: gateway VmRSS {before / MiB:.1f} MiB before, "
          f"{max(samples) / MiB:.1f} MiB peak (+{growth / MiB:.1f} MiB)", file=sys.stderr)  # fmt: skip
    assert growth < 64 * MiB, f"gateway grew by {growth / MiB:.0f} MiB while the client did not read"
    assert (received, got) == (size, digest)


# Secrets, TLS, the admin listener -----------------------------------------------------------------


SECRET_PASSWORD = "Pa55-w0rd-never-logged"
SECRET_TOKEN = "eyJhbGciOiJIUzI1NiJ9.bearer-token-never-logged"


def _secrets_in(text: str, secrets: list[str]) -> list[str]:
    return [secret for secret in secrets if secret in text or secret[:16] in text]


async def test_credentials_are_never_logged_even_at_debug_nor_for_malformed_requests(
    registry_factory: RegistryFactory, gateway_factory: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    registry = registry_factory(RegistryConfig(htpasswd=make_htpasswd(tmp_path / "htpasswd", "carol", SECRET_PASSWORD)))
    gateway = gateway_factory(registry, args=["--log-level", "debug"])
    basic = aiohttp.encode_basic_auth("carol", SECRET_PASSWORD)
    started = await call(http, "POST", f"{gateway.url}/v2/secret/app/blobs/uploads/", headers={"Authorization": basic})
    assert started.status == 202, started
    state = started.headers["Location"].split("_state=")[1]
    bearer = await call(http, "GET", f"{gateway.url}/v2/", headers={"Authorization": f"Bearer {SECRET_TOKEN}"})
    assert bearer.status == 401
    path = started.headers["Location"].removeprefix(gateway.url)
    malformed = [
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: {basic}\x01\r\n\r\n".encode(),
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET_TOKEN}\x7f\r\n\r\n".encode(),
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET_TOKEN}{'x' * 9000}\r\n\r\n".encode(),
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: {basic}\r\n folded\r\n\r\n".encode(),
        f"PUT {path}\x7f HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"PUT {path}{'A' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    ]
    for payload in malformed:
        assert status_of(await asyncio.to_thread(raw_exchange, gateway.host_port, payload)) == 400
    await request_logged(gateway, 2)

    secrets = [SECRET_PASSWORD, basic.split()[1], SECRET_TOKEN, state]
    log = gateway.process.log_text()
    leaked = _secrets_in(log, secrets)
    assert leaked == [], "credentials in the gateway's log: " + "; ".join(
        line[:300] for line in log.splitlines() if _secrets_in(line, leaked)
    )


def tls_files(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    return authority, cert_file, key_file


def legacy_client(authority: trustme.CA, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        authority.configure_trust(context)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = version
        context.set_ciphers(ciphers or "DEFAULT:@SECLEVEL=0")
    return context


def handshake(context: ssl.SSLContext, host_port: str) -> str:
    """The negotiated version, or "refused" when the handshake fails."""
    host, port = host_port.rsplit(":", 1)
    try:
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            return str(tls.version())
    except (ssl.SSLError, ConnectionError):
        return "refused"


def permissive_tls_server(cert_file: Path, key_file: Path) -> tuple[str, threading.Thread, socket.socket]:
    """A server that takes TLS 1.0 and old suites: proves the legacy client really offers them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_cert_chain(cert_file, key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        for _ in range(2):
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(connection, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"127.0.0.1:{listener.getsockname()[1]}", thread, listener


async def test_the_https_listener_refuses_tls_below_1_2_and_legacy_suites(
    gateway_factory: GatewayFactory, registry: Registry, tmp_path: Path
) -> None:
    authority, cert_file, key_file = tls_files(tmp_path)
    gateway = gateway_factory(registry, args=["--tls-cert", str(cert_file), "--tls-key", str(key_file)], tls=True)
    tls11 = legacy_client(authority, ssl.TLSVersion.TLSv1_1)
    sha1_cbc_only = legacy_client(authority, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:@SECLEVEL=0")
    control, server, listener = permissive_tls_server(cert_file, key_file)
    try:
        assert await asyncio.to_thread(handshake, tls11, control) == "TLSv1.1"
        assert await asyncio.to_thread(handshake, sha1_cbc_only, control) == "TLSv1.2"
    finally:
        listener.close()
        server.join(5)

    assert await asyncio.to_thread(handshake, tls11, gateway.host_port) == "refused"
    assert await asyncio.to_thread(handshake, sha1_cbc_only, gateway.host_port) == "refused"
    modern = ssl.create_default_context(cafile=None)
    authority.configure_trust(modern)
    assert await asyncio.to_thread(handshake, modern, gateway.host_port) == "TLSv1.3"
    tls12 = ssl.create_default_context()
    authority.configure_trust(tls12)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await asyncio.to_thread(handshake, tls12, gateway.host_port) == "TLSv1.2"


def listeners(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening in the process's network namespace."""
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        with open(f"/proc/{pid}/net/{table}") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[3] != "0A":
                    continue
                address, port = fields[1].split(":")
                if width == 8:
                    host = socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
                else:
                    words = bytes.fromhex(address)
                    host = socket.inet_ntop(socket.AF_INET6, b"".join(words[i : i + 4][::-1] for i in range(0, 16, 4)))
                found.add((host, int(port, 16)))
    return found


def test_the_admin_listener_is_on_loopback_by_default(tmp_path: Path) -> None:
    """Started without --admin-listen, in a network namespace of its own so that port 9090 is surely free."""
    require_binaries("unshare", "ip", "nsenter")
    assert Settings().admin.listen == Address("127.0.0.1", 9090)
    command = [
        "unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
        sys.executable, "-m", "proxy", "serve", "--upstream", "http://127.0.0.1:1", "--listen", "127.0.0.1:5000",
        "--store", f"sqlite:///{tmp_path / 'store.db'}",
    ]  # fmt: skip
    gateway = ManagedProcess(command, log_path=tmp_path / "gateway.log")
    gateway.start()
    try:
        gateway.wait_until(lambda: ("127.0.0.1", 9090) in listeners(gateway.pid), timeout=20,
                           what="admin listener on 127.0.0.1:9090")  # fmt: skip
        bound = listeners(gateway.pid)
        assert {address for address, port in bound if port == 9090} == {"127.0.0.1"}, bound
        metrics = run(["nsenter", f"--net=/proc/{gateway.pid}/ns/net", sys.executable, "-c",
                       "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9090/metrics').status)"],
                      timeout=30)  # fmt: skip
        assert metrics.stdout.strip() == "200", metrics
    finally:
        gateway.stop()


CONFIG_SECRET = "Cl3anup-Secret-Not-For-Logs"


@pytest.mark.parametrize(
    ("config", "named"),
    [
        pytest.param({"cleanup": {"password": CONFIG_SECRET, "attempts": "many"}}, "cleanup.attempts", id="bad-value-beside-it"),
        pytest.param({"cleanup": {"password": CONFIG_SECRET, "passwrod": CONFIG_SECRET}}, "cleanup.passwrod",
                     id="misspelt-key"),
        pytest.param({"cleanup": {"password": CONFIG_SECRET}, "cleanups": {"password": CONFIG_SECRET}}, "cleanups",
                     id="unknown-section"),
        pytest.param({"upstream": {"url": f"https://ops:{CONFIG_SECRET}@registry.example:5000"}}, "upstream.url",
                     id="credentials-in-the-upstream-url"),
        pytest.param({"store": {"url": f"redis://:{CONFIG_SECRET}@127.0.0.1:notaport/0"}}, "store.url",
                     id="password-in-a-malformed-store-url"),
        pytest.param(f"cleanup:\n  password: \"{CONFIG_SECRET}\n  username: x\n", "line", id="invalid-yaml-on-its-line"),
    ],
)
def test_a_bad_config_file_is_named_without_echoing_its_secrets(
    tmp_path: Path, config: dict[str, Any] | str, named: str
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    upstream = [] if isinstance(config, dict) and "upstream" in config else ["--upstream", "http://127.0.0.1:1"]
    store = [] if isinstance(config, dict) and "store" in config else ["--store", "memory://"]
    # A gateway that starts despite the error runs until this timeout, which then fails the test.
    result = run(
        [sys.executable, "-m", "proxy", "serve", "--config", path, "--listen", f"127.0.0.1:{free_port()}",
         "--admin-listen", f"127.0.0.1:{free_port()}", *upstream, *store],
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert named in result.stderr, result.stderr
    assert CONFIG_SECRET not in result.stderr + result.stdout, result.stderr


async def test_secrets_from_the_config_file_are_used_but_never_logged(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    gateway = gateway_factory(
        registry,
        args=["--log-level", "debug"],
        config={"cleanup": {"delete_leaked": True, "username": "ops", "password": CONFIG_SECRET,
                            "bearer_token": CONFIG_SECRET + "-token"}},
    )  # fmt: skip
    image = build_image(330, foreign=1, os="windows")
    await push_image_blobs(http, gateway.url, "leak/app", image.blobs.values())  # a first-sight leak: clean-up runs
    assert (await put_manifest(http, gateway.url, "leak/app", "1", image.manifest, image.media_type)).status == 201
    await wait_for_log(gateway, lambda: any(entry.get("action") == "cleaned" for entry in gateway.events("decision"))
                       or bool(gateway.events("cleanup_failed")), "clean-up outcome")  # fmt: skip
    os.kill(gateway.process.pid, signal.SIGHUP)  # the config file is read again
    await wait_for_log(gateway, lambda: bool(gateway.events("reloaded")), "reloaded")
    assert CONFIG_SECRET not in gateway.process.log_text()


async def test_an_anonymous_client_cannot_teach_the_gateway(
    registry_factory: RegistryFactory, gateway_factory: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """On a registry that requires a login, a refused manifest from nobody must not mark a layer foreign."""
    registry = registry_factory(RegistryConfig(htpasswd=make_htpasswd(tmp_path / "htpasswd", "dave", "dave-pw")))
    gateway = gateway_factory(registry)
    login = {"Authorization": aiohttp.encode_basic_auth("dave", "dave-pw")}
    ordinary = os.urandom(20_000)  # a popular base layer, say
    poison = build_image(340)
    document = json.loads(poison.manifest)
    document["layers"] = [{"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                           "digest": digest_of(ordinary), "size": len(ordinary)}]  # fmt: skip

    anonymous = await put_manifest(http, gateway.url, "any/thing", "x", json.dumps(document).encode(), poison.media_type)
    assert anonymous.status in {400, 401}, anonymous

    started = await call(http, "POST", f"{gateway.url}/v2/team/base/blobs/uploads/", headers=login)
    assert started.status == 202, started
    location = absolute(gateway.url, started.headers["Location"]).update_query(digest=digest_of(ordinary))
    pushed = await call(http, "PUT", location, data=ordinary, headers=login)
    assert pushed.status == 201, pushed
    stored = await call(http, "HEAD", f"{registry.url}/v2/team/base/blobs/{digest_of(ordinary)}", headers=login)
    assert stored.status == 200, (
        f"an authenticated push of an ordinary blob was dropped: an anonymous, refused manifest ({anonymous.status}) "
        f"taught the gateway {[entry['digest'] for entry in gateway.events('learned')]}"
    )
