"""Fixtures for the gateway in front of a real registry (a pytest plugin loaded by conftest)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Protocol

import aiohttp
import pytest

from .gateway import GatewayProcess
from .images import Image
from .protocol import push_single_put, teach
from .registry import Registry


class GatewayFactory(Protocol):
    def __call__(
        self,
        registry: Registry | str,
        *,
        args: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        store: str | None = None,
        env: Mapping[str, str] | None = None,
        tls: bool = False,
    ) -> GatewayProcess: ...


@pytest.fixture
def gateway_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    started: list[GatewayProcess] = []

    def start(
        registry: Registry | str,
        *,
        args: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        store: str | None = None,
        env: Mapping[str, str] | None = None,
        tls: bool = False,
    ) -> GatewayProcess:
        upstream = registry if isinstance(registry, str) else registry.url
        gateway = GatewayProcess(
            tmp_path_factory.mktemp("gateway"), upstream, args=args, config=config, store=store, env=env, tls=tls
        )
        started.append(gateway)
        return gateway.start()

    yield start
    for gateway in reversed(started):
        gateway.stop()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory, registry: Registry) -> GatewayProcess:
    return gateway_factory(registry, args=["--log-level", "info"])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client that, like registry clients, shows every answer as it is: no redirects, no decompression."""
    async with aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def gateway_knowing(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, image: Image, action: str,
    *, seed_for_mount: bool = False,
) -> GatewayProcess:
    """A gateway with `action` as its default rule that learned `image`'s foreign layers from a push; with
    `seed_for_mount`, the first foreign blob also sits (straight in the registry) in `seed/repo` to mount from."""
    gateway = gateway_factory(registry, args=["--action", action])
    await teach(http, gateway.url, "win/base", image)
    if seed_for_mount:
        seeded = await push_single_put(http, registry.url, "seed/repo", image.foreign_layers[0].data)
        assert seeded.status == 201, seeded
    return gateway
