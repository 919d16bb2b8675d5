"""Fixtures for the gateway in front of a real registry (a pytest plugin loaded by conftest)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Protocol

import aiohttp
import pytest

from .gateway import GatewayProcess
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
