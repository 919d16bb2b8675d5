"""Deadlines on streams armed once per period, not per chunk: a stalled client or reader is still cut off
on time, time spent elsewhere is not counted, and a chunk costs no timer."""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

import aiohttp
import pytest

from proxy.forwarding import StreamAborted, WaitDeadline, client_body


def stream(loop: asyncio.AbstractEventLoop) -> aiohttp.StreamReader:
    return aiohttp.StreamReader(mock.Mock(_reading_paused=False), 2**20, loop=loop)


async def feed(content: aiohttp.StreamReader, pieces: int, pause: float, end: bool = True) -> None:
    for _ in range(pieces):
        content.feed_data(b"x" * 100)
        await asyncio.sleep(pause)
    if end:
        content.feed_eof()


async def test_a_client_that_stops_sending_is_cut_off_after_the_idle_timeout() -> None:
    loop = asyncio.get_running_loop()
    content = stream(loop)
    feeder = asyncio.create_task(feed(content, 3, 0.01, end=False))
    started, received = loop.time(), 0
    with pytest.raises(StreamAborted, match="no body bytes for 0.3 s"):
        async for chunk in client_body(content, 0.3):
            received += len(chunk)
    assert (received, 0.3 <= loop.time() - started < 2) == (300, True)
    await feeder
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_client_that_keeps_sending_outlives_many_idle_timeouts() -> None:
    loop = asyncio.get_running_loop()
    content = stream(loop)
    feeder = asyncio.create_task(feed(content, 40, 0.025))
    assert sum([len(chunk) async for chunk in client_body(content, 0.1)]) == 4000
    await feeder


async def test_the_time_spent_with_each_chunk_is_not_the_clients() -> None:
    """The consumer (a slow upstream) takes longer than the idle timeout per chunk: not a stalled client."""
    content = stream(asyncio.get_running_loop())
    await feed(content, 4, 0)
    received = 0
    async for chunk in client_body(content, 0.05):
        received += len(chunk)
        await asyncio.sleep(0.1)
    assert received == 400


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    content = stream(asyncio.get_running_loop())

    async def read() -> None:
        async for _ in client_body(content, 0.05):
            pass

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.01)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


async def test_a_thousand_chunks_arm_a_timer_once_not_a_thousand_times() -> None:
    loop = asyncio.get_running_loop()
    content = stream(loop)
    await feed(content, 1000, 0)
    armed = 0
    call_at = loop.call_at

    def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal armed
        armed += 1
        return call_at(when, callback, *args, **kwargs)

    with mock.patch.object(loop, "call_at", counted):
        chunks = [chunk async for chunk in client_body(content, 30)]
    assert (len(chunks), armed) == (1000, 1)


async def test_a_deadline_cuts_off_one_wait_that_lasts_too_long_and_only_that() -> None:
    loop = asyncio.get_running_loop()
    deadline = WaitDeadline(0.1)
    for _ in range(5):  # short waits, 0.25 s in all: more than the deadline, but none alone
        deadline.waiting()
        await asyncio.sleep(0.05)
        assert 0.04 < deadline.done() < 0.1 + 0.5
    deadline.waiting()
    started = loop.time()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(5)
    assert deadline.expired() and loop.time() - started < 2
    assert not deadline.expired()
    deadline.close()
