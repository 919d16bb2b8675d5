"""The budgets of proxy/limits.py on their own: upstream slots, the manifest memory budget, the minimum body
rate, the open-file limit, and the 503 answers they give."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.errors import (
    SERVER_BUSY,
    UPSTREAM_BUSY,
    ErrorKind,
    GatewayError,
    error_response,
)
from proxy.forwarding import StreamAborted
from proxy.limits import (
    DeadlineResponse,
    MemoryBudget,
    UpstreamSlots,
    at_least,
    raise_open_file_limit,
)
from proxy.lru import Lru


async def test_a_client_at_its_cap_waits_a_bounded_time_then_is_told_to_retry() -> None:
    slots = UpstreamSlots(total=0, per_client=1, queue_timeout=0.2)
    async with slots.hold("203.0.113.1"):
        async with slots.hold("198.51.100.1"):  # another client is not held up
            pass
        with pytest.raises(GatewayError) as refused:
            async with slots.hold("203.0.113.1"):
                pass
    assert refused.value.kind is UPSTREAM_BUSY
    async with slots.hold("203.0.113.1"):  # free again
        pass


async def test_a_waiting_client_gets_the_slot_when_it_is_released() -> None:
    slots = UpstreamSlots(total=1, per_client=0, queue_timeout=2)
    order: list[str] = []

    async def first() -> None:
        async with slots.hold("a"):
            order.append("first")
            await asyncio.sleep(0.1)

    async def second() -> None:
        await asyncio.sleep(0.01)
        async with slots.hold("b"):
            order.append("second")

    await asyncio.gather(first(), second())
    assert order == ["first", "second"]


async def test_per_client_state_is_forgotten_when_the_client_is_done() -> None:
    slots = UpstreamSlots(total=0, per_client=4, queue_timeout=1)
    for client in (f"192.0.2.{n}" for n in range(100)):
        async with slots.hold(client):
            pass
    assert slots._per_client == {} and slots._holders == {}


def test_the_memory_budget_refuses_past_its_limit_and_frees_on_exit() -> None:
    budget = MemoryBudget(10)
    with budget.reserve(6):
        with pytest.raises(GatewayError) as refused, budget.reserve(5):
            pass
        assert refused.value.kind is SERVER_BUSY
        with budget.reserve(4):
            assert budget.used == 10
    assert budget.used == 0


async def chunks(pieces: list[bytes], pause: float) -> AsyncIterator[bytes]:
    for piece in pieces:
        await asyncio.sleep(pause)
        yield piece


async def test_a_trickling_body_is_cut_off_after_a_window() -> None:
    with pytest.raises(StreamAborted, match="minimum 1000 B/s"):
        async for _ in at_least(chunks([b"x"] * 50, 0.02), rate=1000, window=0.2):
            pass


async def test_a_body_at_the_rate_passes_whole() -> None:
    body = [bytes(100)] * 20
    received = [chunk async for chunk in at_least(chunks(body, 0.02), rate=1000, window=0.1)]
    assert received == body


async def test_the_time_the_upstream_takes_is_not_the_clients() -> None:
    """A consumer that takes long per chunk (a slow registry) does not make a fast client look slow."""
    received = 0
    async for chunk in at_least(chunks([bytes(100)] * 5, 0), rate=1000, window=0.05):
        received += len(chunk)
        await asyncio.sleep(0.05)
    assert received == 500


async def test_no_minimum_rate_when_it_is_zero() -> None:
    assert [chunk async for chunk in at_least(chunks([b"x"] * 3, 0.05), rate=0, window=0.01)] == [b"x"] * 3


@pytest.mark.parametrize("kind", [UPSTREAM_BUSY, SERVER_BUSY])
def test_limits_answer_503_with_retry_after_and_an_oci_body(kind: ErrorKind) -> None:
    response = error_response(GatewayError(kind))
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert response.body is not None
    assert json.loads(bytes(response.body))["errors"][0]["code"] == "UNAVAILABLE"  # type: ignore[arg-type]


def test_the_config_cache_keeps_the_most_recently_used() -> None:
    cache: Lru[str, tuple[str, ...]] = Lru(capacity=2)
    cache.put("sha256:a", ("d1",))
    cache.put("sha256:b", ("d2",))
    assert cache.get("sha256:a") == ("d1",)
    cache.put("sha256:c", ("d3",))
    assert (cache.get("sha256:a"), cache.get("sha256:b"), cache.get("sha256:c")) == (("d1",), None, ("d3",))


def test_the_open_file_limit_is_the_hard_limit_after_raising() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        raised = raise_open_file_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert raised == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_upstream_slots_are_unlimited_only_without_any_limit() -> None:
    assert UpstreamSlots(total=0, per_client=0, queue_timeout=1).unlimited
    assert not UpstreamSlots(total=0, per_client=1, queue_timeout=1).unlimited
    assert not UpstreamSlots(total=1, per_client=0, queue_timeout=1).unlimited


@pytest.mark.parametrize(("small", "writes"), [(True, 1), (False, 2)])
async def test_a_short_answers_head_goes_out_with_its_body(small: bool, writes: int) -> None:
    sent: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        original = transport.write

        def write(data: bytes | bytearray | memoryview) -> None:
            sent.append(bytes(data))
            original(data)

        transport.write = write  # type: ignore[method-assign]
        response = DeadlineResponse(write_timeout=5, body_size=2 if small else None, headers={"Content-Length": "2"})
        await response.prepare(request)
        await response.write(b"{}")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestServer(app) as server, aiohttp.ClientSession() as session, session.get(server.make_url("/")) as answer:
        assert await answer.read() == b"{}"
    assert len(sent) == writes
    assert sent[-1].endswith(b"\r\n\r\n{}" if small else b"{}")


async def answer_with(prepare_paused: bool, body_size: int | None, body: bytes) -> tuple[bool, BaseException | None]:
    """A DeadlineResponse's answer, the transport paused (a client that stopped reading) or not as it is
    prepared: whether it went out untimed, and how its writes ended."""
    outcome: list[tuple[bool, BaseException | None]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        response = DeadlineResponse(write_timeout=0.3, body_size=body_size, headers={"Content-Length": str(len(body))})
        if prepare_paused:
            request.protocol.pause_writing()
        await response.prepare(request)
        try:
            await response.write(body)
            await response.write_eof()
            outcome.append((response.untimed, None))
        except StreamAborted as error:
            outcome.append((response.untimed, error))
            raise
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestServer(app) as server:
        # A client that sends its request and reads nothing until the gateway is done with it.
        _, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        for _ in range(50):
            if outcome:
                break
            await asyncio.sleep(0.1)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return outcome[0]


async def test_a_short_answer_that_fits_the_buffer_goes_out_untimed() -> None:
    assert await answer_with(prepare_paused=False, body_size=2, body=b"{}") == (True, None)


@pytest.mark.parametrize("body_size", [2, None])
async def test_an_answer_to_a_client_that_stopped_reading_is_timed_however_short_it_says_it_is(
    body_size: int | None,
) -> None:
    # 256 KiB: aiohttp waits for the transport to drain past 64 KiB written (a write of 2 bytes never waits)
    untimed, error = await answer_with(prepare_paused=True, body_size=body_size, body=b"x" * 256 * 1024)
    assert not untimed
    assert isinstance(error, StreamAborted)
