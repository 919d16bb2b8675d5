"""Behind a load balancer that terminates TLS: real nginx and real haproxy, running exactly the lines the
project recommends (config/nginx.conf, the TLS lines of config/haproxy.cfg, both quoted in the README),
in front of a gateway with default settings; skopeo and podman push through them, verifying the
certificate; the proof is the registry's storage.

Before the fix the gateway appended its own `Forwarded: ...;proto=http`, which distribution prefers over
X-Forwarded-Proto: the registry handed out http:// upload locations and every push failed."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from support.clients import Podman, with_private_blob_info_cache
from support.fixtures import GatewayFactory
from support.images import Image, write_dir
from support.processes import describe, free_port, require_binaries, run
from support.registry import Registry
from support.services import ConfiguredHaproxy, Nginx

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
NGINX_EXAMPLE = ROOT / "config" / "nginx.conf"
HAPROXY_EXAMPLE = ROOT / "config" / "haproxy.cfg"
README = ROOT / "README.md"


def substituted(text: str, replacements: dict[str, str]) -> str:
    """`text` with each example value replaced by the test's own, each found exactly once."""
    for old, new in replacements.items():
        assert text.count(old) == 1, f"expected {old!r} once in the example"
        text = text.replace(old, new)
    return text


def haproxy_tls_lines() -> list[str]:
    """The commented TLS lines of config/haproxy.cfg's frontend, uncommented."""
    lines = HAPROXY_EXAMPLE.read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.strip().startswith("#   bind :443 ssl"))
    block = []
    for line in lines[start:]:
        if not line.strip().startswith("#   "):
            break
        block.append(line.strip()[len("#   "):])
    return block


def nginx_directives() -> list[str]:
    return [line.strip() for line in NGINX_EXAMPLE.read_text().splitlines() if line.strip().startswith("proxy_")]


def test_the_readme_quotes_the_tested_lines() -> None:
    readme = README.read_text()
    missing = [line for line in [*nginx_directives(), *haproxy_tls_lines()] if line not in readme]
    assert missing == [], f"README's deployment examples lack the tested lines {missing}"


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(CA folder for containers' --cert-dir, chain, key, chain+key PEM for haproxy)."""
    authority = trustme.CA()
    issued = authority.issue_cert(HOST, "localhost")
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    authority.cert_pem.write_to_path(str(ca_dir / "ca.crt"))
    chain, key, combined = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "combined.pem"
    issued.cert_chain_pems[0].write_to_path(str(chain))
    issued.private_key_pem.write_to_path(str(key))
    issued.private_key_and_cert_chain_pem.write_to_path(str(combined))
    return ca_dir, chain, key, combined


def nginx_in_front(workdir: Path, gateway: str, chain: Path, key: Path) -> Nginx:
    port = free_port()
    site = substituted(NGINX_EXAMPLE.read_text(), {
        "server gateway:5000;": f"server {gateway};",
        "listen 443 ssl;": f"listen {HOST}:{port} ssl;",
        "/etc/nginx/tls/registry.crt": str(chain),
        "/etc/nginx/tls/registry.key": str(key),
    })  # fmt: skip
    return Nginx(workdir, site, port)


HAPROXY_AROUND = """\
global
    maxconn 1024

defaults
    mode http
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    timeout http-request 30s

frontend registry
{frontend}
    default_backend gateways

backend gateways
    server gateway {gateway}
"""


def haproxy_in_front(workdir: Path, gateway: str, combined: Path) -> ConfiguredHaproxy:
    port = free_port()
    lines = [substituted(line, {":443": f"{HOST}:{port}", "/usr/local/etc/haproxy/registry.pem": str(combined)})
             if line.startswith("bind ") else line for line in haproxy_tls_lines()]  # fmt: skip
    assert lines[0].startswith("bind ") and len(lines) >= 2, lines
    config = HAPROXY_AROUND.format(frontend="\n".join("    " + line for line in lines), gateway=gateway)
    return ConfiguredHaproxy(workdir, config, port)


def stored(registry: Registry, repository: str, tag: str) -> list[str]:
    """What of the tagged image is missing from the registry's storage (empty: all of it is there)."""
    base = registry.root / "docker/registry/v2/repositories" / repository
    tag_link = base / "_manifests/tags" / tag / "current/link"
    if not tag_link.exists():
        return [f"tag {tag}"]
    manifest_digest = tag_link.read_text().strip()
    manifest = json.loads(registry.blob_data_path(manifest_digest).read_bytes())
    missing = []
    for descriptor in [manifest["config"], *manifest["layers"]]:
        digest = descriptor["digest"]
        algorithm, hex_digest = digest.split(":", 1)
        if not registry.blob_data_path(digest).exists():
            missing.append(f"blob data {digest}")
        if not (base / "_layers" / algorithm / hex_digest / "link").exists():
            missing.append(f"layer link {digest}")
    return missing


def skopeo_push(source: Path, destination: str, ca_dir: Path, cache_dir: Path) -> str:
    """skopeo copy into the TLS front, checking its certificate against the test CA; "" on success."""
    args = ["skopeo", "--insecure-policy", "copy", "--dest-cert-dir", str(ca_dir), f"dir:{source}", destination]
    result = run(with_private_blob_info_cache(args, cache_dir), timeout=120)
    return "" if result.returncode == 0 else describe(result)


def podman_push(podman: Podman, source: Path, destination: str, ca_dir: Path) -> str:
    image = podman.pull(f"dir:{source}")
    result = podman.run("push", "--cert-dir", str(ca_dir), image, destination, timeout=120)
    return "" if result.returncode == 0 else describe(result)


@pytest.fixture(params=["nginx", "haproxy"])
def tls_front(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    gateway_factory: GatewayFactory,
    registry: Registry,
    certificate: tuple[Path, Path, Path, Path],
) -> Iterator[tuple[str, Path]]:
    """(host:port of the TLS front, CA folder); the gateway behind it runs with default settings."""
    require_binaries(request.param)
    gateway = gateway_factory(registry)
    ca_dir, chain, key, combined = certificate
    workdir = tmp_path_factory.mktemp(request.param)
    front = (nginx_in_front(workdir, gateway.host_port, chain, key) if request.param == "nginx"
             else haproxy_in_front(workdir, gateway.host_port, combined))  # fmt: skip
    with front:
        yield f"{HOST}:{front.port}", ca_dir


def test_skopeo_pushes_through_a_tls_load_balancer(
    tls_front: tuple[str, Path], registry: Registry, plain_image: Image, skopeo_cache: Path, tmp_path: Path
) -> None:
    front, ca_dir = tls_front
    failure = skopeo_push(write_dir(plain_image, tmp_path / "image"), f"docker://{front}/tls/skopeo:1", ca_dir,
                          skopeo_cache)  # fmt: skip
    assert failure == "", failure
    assert stored(registry, "tls/skopeo", "1") == []


def test_podman_pushes_through_a_tls_load_balancer(
    tls_front: tuple[str, Path], registry: Registry, plain_image: Image, podman: Podman, tmp_path: Path
) -> None:
    front, ca_dir = tls_front
    failure = podman_push(podman, write_dir(plain_image, tmp_path / "image"), f"docker://{front}/tls/podman:1", ca_dir)
    assert failure == "", failure
    assert stored(registry, "tls/podman", "1") == []


def test_upload_locations_name_the_tls_front(tls_front: tuple[str, Path]) -> None:
    """The registry's own view, as the client gets it: an https Location on the front's address."""
    front, ca_dir = tls_front
    host, port = front.rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), timeout=30,
                                             context=ssl.create_default_context(cafile=str(ca_dir / "ca.crt")))  # fmt: skip
    try:
        connection.request("POST", "/v2/tls/direct/blobs/uploads/")
        answer = connection.getresponse()
        location = answer.getheader("Location") or ""
    finally:
        connection.close()
    assert answer.status == 202, answer.status
    assert location.startswith(f"https://{front}/v2/tls/direct/blobs/uploads/"), location
