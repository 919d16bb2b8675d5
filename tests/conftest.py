from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from support.clients import Containerd, Podman
from support.fixtures import gateway, gateway_factory, http  # noqa: F401  (fixtures shared by the suite)
from support.images import Image, build_image
from support.processes import require_binaries
from support.registry import Registry, RegistryConfig, RegistryFactory
from support.services import Haproxy, HaproxyFactory, RedisFactory, RedisServer


@pytest.fixture
def registry_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RegistryFactory]:
    require_binaries("docker-registry")
    started: list[Registry] = []

    def start(config: RegistryConfig) -> Registry:
        registry = Registry(tmp_path_factory.mktemp("registry"), config)
        started.append(registry)
        registry.start()
        return registry

    yield start
    for registry in reversed(started):
        registry.stop()


@pytest.fixture
def registry(registry_factory: RegistryFactory) -> Registry:
    return registry_factory(RegistryConfig(allow_foreign_urls=True))


@pytest.fixture(scope="module")
def module_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One registry for a whole module whose tests each push into repositories of their own."""
    require_binaries("docker-registry")
    registry = Registry(tmp_path_factory.mktemp("registry"), RegistryConfig(allow_foreign_urls=True))
    registry.start()
    yield registry
    registry.stop()


@pytest.fixture
def skopeo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_binaries("skopeo", "unshare")
    return tmp_path_factory.mktemp("skopeo-cache")


@pytest.fixture
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    require_binaries("containerd", "ctr")
    # Not tmp_path: a long test name would overflow the unix socket path.
    with Containerd(tmp_path_factory.mktemp("containerd")) as daemon:
        yield daemon


@pytest.fixture
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    require_binaries("podman", "unshare")
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def plain_image() -> Image:
    return build_image(1)


@pytest.fixture(scope="session")
def foreign_image() -> Image:
    """Windows-like: two docker foreign base layers with `urls`, then a normal one."""
    return build_image(2, foreign=2, os="windows")


@pytest.fixture(scope="session")
def oci_foreign_image() -> Image:
    return build_image(3, foreign=2, flavour="oci", os="windows")



@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the session; tests that share it flush their database first."""
    require_binaries("redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisFactory]:
    """Servers of the test's own, for tests that stop, pause or restart them."""
    require_binaries("redis-server")
    started: list[RedisServer] = []

    def start(*, password: str | None = None, certificate: tuple[Path, Path] | None = None) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), password=password, certificate=certificate)
        started.append(server)
        return server.start()

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def haproxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaproxyFactory]:
    require_binaries("haproxy")
    started: list[Haproxy] = []

    def start(backends: Sequence[str]) -> Haproxy:
        balancer = Haproxy(tmp_path_factory.mktemp("haproxy"), backends)
        started.append(balancer)
        return balancer.start()

    yield start
    for balancer in reversed(started):
        balancer.stop()
