"""Bookkeeping off the hot path: a gateway's counts and upload records are added up in memory and written
in one store transaction per sync interval, whatever the burst, and nothing is lost when the store
fails; log lines logged on the event loop are written together, shortly after."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from support.services import RedisServer

import proxy.known
from proxy.known import KnownForeign
from proxy.logs import BatchedStreamHandler, JsonFormatter, log_event
from proxy.manifests import ForeignLayer
from proxy.store import (
    ForeignStore,
    MemoryStore,
    RepositoryStats,
    Sighting,
    SqliteStore,
    StoreError,
    Tally,
)
from proxy.store_redis import RedisStore, parse_redis_url

FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
BURST = 600


def digest(number: int) -> str:
    return f"sha256:{number:064x}"


def layer(number: int) -> ForeignLayer:
    return ForeignLayer(digest(number), FOREIGN, 1000 + number)


class Transactions:
    """How many write transactions a backend saw: BEGINs on SQLite connections, EXECs and script calls
    on Redis (a count used to be one script call, an upload one SET), record() calls on a memory store."""

    def __init__(self, read: Callable[[], int]) -> None:
        self.read = read
        self.before = 0

    def start(self) -> None:
        self.before = self.read()

    def since_start(self) -> int:
        return self.read() - self.before


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def counted_store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[ForeignStore, Transactions]]:
    store: ForeignStore
    if request.param == "memory":
        memory = MemoryStore()
        calls = [0]
        record = memory.record

        async def counted_record(tally: Tally) -> None:
            calls[0] += 1
            await record(tally)

        monkeypatch.setattr(memory, "record", counted_record)
        store, transactions = memory, Transactions(lambda: calls[0])
    elif request.param == "sqlite":
        begins = [0]
        connect = sqlite3.connect

        def traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            connection: sqlite3.Connection = connect(*args, **kwargs)

            def traced(statement: str) -> None:
                begins[0] += statement.startswith("BEGIN IMMEDIATE")

            connection.set_trace_callback(traced)
            return connection

        monkeypatch.setattr(sqlite3, "connect", traced_connect)
        store, transactions = (
            SqliteStore(tmp_path / "foreign-layers.db"),
            Transactions(lambda: begins[0]),
        )
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flush()

        def writes() -> int:
            with server.client() as client:
                stats = client.info("commandstats")
            return sum(
                int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
                for name in ("exec", "evalsha", "eval")
            )

        store, transactions = (
            RedisStore(parse_redis_url(server.url())),
            Transactions(writes),
        )
    yield store, transactions
    await store.close()


async def test_a_burst_of_drops_is_one_transaction_and_counts_every_drop_and_byte(
    counted_store: tuple[ForeignStore, Transactions],
) -> None:
    store, transactions = counted_store
    await store.learn([layer(1), layer(2)], Sighting("learn"))
    known = KnownForeign(store)
    await known.resync()

    transactions.start()
    for number in range(BURST):
        known.count(
            digest(1 + number % 2),
            "dropped",
            1000 + 1 + number % 2,
            f"team/app{number % 3}",
        )
    for number in range(BURST // 2):
        known.count(
            digest(9), "rejected", 50, "team/app0"
        )  # unknown: counted for its repository only
        known.count(digest(1), "leaked", repository="team/other")
        known.record_upload("team/app0", digest(100 + number), 60)
    await known.flush()

    # One transaction (Redis: one MULTI/EXEC, around one script call for every count and the uploads' SETs).
    assert transactions.since_start() == (2 if isinstance(store, RedisStore) else 1)
    records = {record.layer.digest: record for record in await store.records()}
    assert (dict(records[digest(1)].outcomes), records[digest(1)].bytes_kept_out) == (
        {"dropped": BURST // 2, "leaked": BURST // 2},
        BURST // 2 * 1001,
    )
    assert (dict(records[digest(2)].outcomes), records[digest(2)].bytes_kept_out) == (
        {"dropped": BURST // 2},
        BURST // 2 * 1002,
    )
    per_drop = {
        f"team/app{n}": sum(1001 + m % 2 for m in range(BURST) if m % 3 == n)
        for n in range(3)
    }
    assert await store.repository_stats() == [
        RepositoryStats(
            "team/app0",
            {"dropped": BURST // 3, "rejected": BURST // 2},
            per_drop["team/app0"] + 50 * BURST // 2,
        ),
        RepositoryStats("team/app1", {"dropped": BURST // 3}, per_drop["team/app1"]),
        RepositoryStats("team/app2", {"dropped": BURST // 3}, per_drop["team/app2"]),
        RepositoryStats("team/other", {"leaked": BURST // 2}, 0),
    ]
    assert await store.recent_uploads("team/app0", [digest(100), digest(100 + BURST // 2 - 1)]) == {
        digest(100), digest(100 + BURST // 2 - 1)
    }  # fmt: skip

    transactions.start()
    await known.flush()
    assert transactions.since_start() == 0  # nothing counted since: no write at all


class FlakyStore(MemoryStore):
    """A memory store whose record() fails while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def record(self, tally: Tally) -> None:
        if self.down:
            raise StoreError("foreign-layer store flaky: down")
        await super().record(tally)


async def test_counts_written_while_the_store_fails_are_kept_and_written_once_it_is_back() -> (
    None
):
    store = FlakyStore()
    await store.learn([layer(1)], Sighting("learn"))
    known = KnownForeign(store)
    await known.resync()
    known.count(digest(1), "dropped", 1001, "team/app")
    known.record_upload("team/app", digest(5), 60)
    store.down = True

    with pytest.raises(StoreError):
        await known.flush()
    known.count(digest(1), "dropped", 1001, "team/app")
    known.count(digest(1), "rejected", 1001, "team/other")
    with pytest.raises(StoreError):
        await known.flush()
    store.down = False
    await known.flush()
    await known.flush()

    [record] = await store.records()
    assert (dict(record.outcomes), record.bytes_kept_out) == (
        {"dropped": 2, "rejected": 1},
        3003,
    )
    assert await store.repository_stats() == [
        RepositoryStats("team/app", {"dropped": 2}, 2002), RepositoryStats("team/other", {"rejected": 1}, 1001)
    ]  # fmt: skip
    assert await store.recent_uploads("team/app", [digest(5)]) == {digest(5)}


async def test_while_the_store_is_down_a_bounded_number_of_counts_wait_and_each_still_adds_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(proxy.known, "MAX_PENDING_RECORDS", 10)
    store = FlakyStore()
    known = KnownForeign(store)
    store.down = True
    for number in range(20):
        known.count(digest(number), "dropped", 1, f"team/{number}")
    with pytest.raises(StoreError):
        await known.flush()
    for number in range(20):
        known.count(
            digest(number), "dropped", 1, f"team/{number}"
        )  # the first ten add up, the others wait no more
        known.record_upload("team/app", digest(100 + number), 60)  # no room left
    store.down = False
    await known.flush()

    assert await store.repository_stats() == sorted(
        (RepositoryStats(f"team/{number}", {"dropped": 2}, 2) for number in range(10)),
        key=lambda stats: stats.repository,
    )
    assert (
        await store.recent_uploads(
            "team/app", [digest(100 + number) for number in range(20)]
        )
        == set()
    )


class CountedHash(str):
    """A repository name that counts how often it is hashed: what a rebuild of a table keyed by it costs."""

    hashed = 0

    def __hash__(self) -> int:
        CountedHash.hashed += 1
        return super().__hash__()


async def test_a_memory_store_does_not_rebuild_its_upload_records_per_upload() -> None:
    store = MemoryStore()
    repository = CountedHash("team/app")
    for number in range(1000):
        await store.record_upload(repository, digest(number), 60)

    assert CountedHash.hashed < 10 * 1000  # a rebuild per upload: about 500,000
    assert await store.recent_uploads("team/app", [digest(0), digest(999)]) == {
        digest(0),
        digest(999),
    }


async def test_a_process_keeps_a_bounded_number_of_uploads_dropping_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(proxy.known, "RECENT_UPLOADS_CAPACITY", 3)
    known = KnownForeign(MemoryStore())
    for number in range(5):
        known.record_upload("team/app", digest(number), 60)
    await (
        known.store.close()
    )  # the store is gone: only the process's own records answer

    assert await known.claim_uploads(
        "team/app", [digest(number) for number in range(5)]
    ) == {digest(2), digest(3), digest(4)}


class CountedWrites(io.StringIO):
    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def batched() -> tuple[logging.Logger, CountedWrites]:
    stream = CountedWrites()
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("foreign_layer_proxy.test_batched")
    logger.handlers[:], logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    return logger, stream


async def test_lines_logged_in_one_turn_of_the_event_loop_are_written_together_and_warnings_at_once(
    batched: tuple[logging.Logger, CountedWrites],
) -> None:
    logger, stream = batched
    for number in range(100):
        log_event(logger, logging.INFO, "request", number=number)
    assert stream.writes == 0
    log_event(logger, logging.WARNING, "store_error")
    assert stream.writes == 1
    for number in range(100, 105):
        log_event(logger, logging.INFO, "request", number=number)
    await asyncio.sleep(0)  # the loop's next turn
    assert stream.writes == 2
    await asyncio.to_thread(log_event, logger, logging.INFO, "from_a_thread")  # no event loop there: at once
    assert stream.writes == 3

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("number") for line in lines if line["event"] == "request"] == list(range(105))
    assert [line["event"] for line in lines][100:102] == ["store_error", "request"]
    assert lines[-1]["event"] == "from_a_thread"


async def test_what_waits_is_written_when_logging_shuts_down(batched: tuple[logging.Logger, CountedWrites]) -> None:
    logger, stream = batched
    log_event(logger, logging.INFO, "request", number=1)
    assert stream.getvalue() == ""
    logging.shutdown(handlerList=[weakref.ref(logger.handlers[0])])  # as at exit, before the loop turns
    assert json.loads(stream.getvalue())["number"] == 1
