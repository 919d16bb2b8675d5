"""The foreign-layer store: every backend against one contract, then SQLite and Redis across processes and failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis
import redis.asyncio
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.processes import free_port, require_binaries
from support.services import RedisFactory, RedisServer

from proxy.manifests import ForeignLayer
from proxy.store import (
    SCHEMA_VERSION,
    Clock,
    ForeignRecord,
    ForeignStore,
    MemoryStore,
    RepositoryStats,
    Sighting,
    SqliteStore,
    StoreError,
    _urls,
    open_store,
)
from proxy.store_redis import (
    CHANNEL,
    LAYERS,
    RedisLocation,
    RedisStore,
    parse_redis_url,
)
from proxy.trust import EVERYWHERE, Teaching

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
START = 1_700_000_000.0
BACKENDS = ("memory", "sqlite", "redis")
SHARED_BACKENDS = ("sqlite", "redis")
RUNNING_AS_ROOT = os.geteuid() == 0

WRITER_PROCESS = """
import asyncio, sys
from proxy.manifests import ForeignLayer
from proxy.store import Sighting, open_store

async def learn_each(url, digests):
    store = open_store(url)
    for digest in digests:
        await store.learn([ForeignLayer(digest, "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", 1)],
                          Sighting("learn"))
    await store.close()

asyncio.run(learn_each(sys.argv[1], sys.argv[2:]))
"""


def digest(number: int) -> str:
    return f"sha256:{number:064x}"


def layer(
    number: int,
    media_type: str = FOREIGN_GZIP,
    size: int = 1000,
    urls: tuple[str, ...] = (),
    diff_id: str | None = None,
) -> ForeignLayer:
    return ForeignLayer(digest(number), media_type, size, urls, diff_id)


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True, slots=True)
class Backend:
    """A kind of store; SQLite keeps it at the test's `path`, Redis in the session's server."""

    name: str
    redis: RedisServer | None = None

    def url(self, path: Path) -> str:
        if self.redis is not None:
            return self.redis.url()
        return "memory://" if self.name == "memory" else f"sqlite://{path}"

    def open(self, path: Path, clock: Clock = time.time) -> ForeignStore:
        """A new, empty store."""
        if self.redis is not None:
            self.redis.flush()
        return self.connect(path, clock)

    def connect(self, path: Path, clock: Clock = time.time) -> ForeignStore:
        """Another handle on the store `open` made (for memory://, a store of its own)."""
        if self.redis is not None:
            return RedisStore(parse_redis_url(self.url(path)), clock=clock)
        if self.name == "memory":
            return MemoryStore(clock=clock)
        return SqliteStore(path, clock=clock)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis":
        return Backend("redis", request.getfixturevalue("redis_server"))
    return Backend(request.param)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "foreign-layers.db"


@pytest.fixture
async def store(backend: Backend, db_path: Path, clock: FakeClock) -> AsyncIterator[ForeignStore]:
    store = backend.open(db_path, clock)
    yield store
    await store.close()


Elapse = Callable[[float], Awaitable[None]]


@pytest.fixture
def elapse(backend: Backend, clock: FakeClock) -> Elapse:
    """Let time pass for the store: its clock, and for Redis (which expires keys on its own clock) real time."""

    async def elapse(seconds: float) -> None:
        clock.now += seconds
        if backend.redis is not None:
            await asyncio.sleep(seconds)

    return elapse


async def test_learn_returns_only_layers_new_to_the_store(store: ForeignStore) -> None:
    sighting = Sighting("manifest-put", "team/app", digest(100))

    assert await store.learn([layer(1), layer(2)], sighting) == [layer(1), layer(2)]
    assert await store.learn([layer(2), layer(3)], sighting) == [layer(3)]
    assert await store.learn([layer(1), layer(2), layer(3)], sighting) == []
    assert await store.learn([layer(4), layer(4)], sighting) == [layer(4)]
    assert await store.known() == {digest(n): layer(n) for n in (1, 2, 3, 4)}


async def test_learn_keeps_the_first_sighting_and_moves_the_last(store: ForeignStore, clock: FakeClock) -> None:
    pushed = Sighting("manifest-put", "team/app", digest(100))
    pulled = Sighting("manifest-get", "team/other", digest(101))
    listed = Sighting("digest-file")

    await store.learn([layer(1)], pushed)
    clock.now = START + 10
    await store.learn([layer(1), layer(2)], pulled)
    clock.now = START + 20
    await store.learn([layer(1)], listed)

    first, second = await store.records()
    assert (first.first_sighting, first.last_sighting) == (pushed, listed)
    assert (first.first_seen, first.last_seen) == (START, START + 20)
    assert (second.first_sighting, second.last_sighting) == (pulled, pulled)
    assert (second.first_seen, second.last_seen) == (START + 10, START + 10)


@pytest.mark.parametrize(
    ("first", "later", "expected"),
    [
        pytest.param(layer(1), layer(1, diff_id=digest(50)), layer(1, diff_id=digest(50)), id="fills-diff-id"),
        pytest.param(layer(1), layer(1, urls=("https://a/1",)), layer(1, urls=("https://a/1",)), id="fills-urls"),
        pytest.param(
            layer(1, diff_id=digest(50), urls=("https://a/1",)),
            layer(1, diff_id=digest(51), urls=("https://b/1", "https://b/2")),
            layer(1, diff_id=digest(50), urls=("https://a/1",)),
            id="keeps-known-diff-id-and-urls",
        ),
        pytest.param(
            layer(1, diff_id=digest(50), urls=("https://a/1",)),
            layer(1),
            layer(1, diff_id=digest(50), urls=("https://a/1",)),
            id="later-without-them-keeps-them",
        ),
        pytest.param(
            layer(1),
            layer(1, media_type=NONDISTRIBUTABLE, size=7),
            layer(1),
            id="keeps-media-type-and-size",
        ),
    ],
)
async def test_a_later_sighting_fills_only_what_is_missing(
    store: ForeignStore, first: ForeignLayer, later: ForeignLayer, expected: ForeignLayer
) -> None:
    await store.learn([first], Sighting("learn"))
    assert await store.learn([later], Sighting("manifest-put")) == []
    assert await store.known() == {expected.digest: expected}
    assert [record.layer for record in await store.records()] == [expected]


async def test_forget_returns_the_digests_that_were_known(store: ForeignStore) -> None:
    await store.learn([layer(1), layer(2), layer(3)], Sighting("learn"))

    assert await store.forget([digest(3), digest(9), digest(1), digest(3)]) == [digest(3), digest(1)]
    assert await store.forget(iter([digest(1)])) == []
    assert await store.forget([]) == []
    assert await store.known() == {digest(2): layer(2)}


async def test_a_forgotten_layer_learned_again_starts_a_fresh_record(store: ForeignStore, clock: FakeClock) -> None:
    await store.learn([layer(1)], Sighting("learn"))
    await store.count(digest(1), "dropped", 1000)
    await store.forget([digest(1)])
    clock.now = START + 5

    assert await store.learn([layer(1)], Sighting("manifest-put")) == [layer(1)]
    assert await store.records() == [
        ForeignRecord(layer(1), Sighting("manifest-put"), Sighting("manifest-put"), START + 5, START + 5, {}, 0,
                      (Teaching(None, "manifest-put", None, EVERYWHERE, False, START + 5),))
    ]


async def test_count_accumulates_per_outcome_and_ignores_unknown_digests(store: ForeignStore) -> None:
    await store.learn([layer(1), layer(2)], Sighting("learn"))

    await store.count(digest(1), "dropped", 1001)
    await store.count(digest(1), "dropped", 1001, "team/app")
    await store.count(digest(1), "leaked", repository="team/other")
    await store.count(digest(2), "rejected", 5)
    await store.count(digest(9), "dropped", 1_000_000, "team/app")

    first, second = await store.records()
    assert (first.outcomes, first.bytes_kept_out) == ({"dropped": 2, "leaked": 1}, 2002)
    assert (second.outcomes, second.bytes_kept_out) == ({"rejected": 1}, 5)
    assert [record.layer.digest for record in await store.records()] == [digest(1), digest(2)]


async def test_records_are_sorted_by_digest_and_answers_are_copies(store: ForeignStore) -> None:
    await store.learn([layer(3), layer(1), layer(2)], Sighting("learn"))
    await store.count(digest(1), "dropped", repository="team/app")

    records = await store.records()
    assert [record.layer for record in records] == [layer(1), layer(2), layer(3)]
    records[0].outcomes["dropped"] = 99  # type: ignore[index]
    (await store.repository_stats())[0].outcomes["dropped"] = 99  # type: ignore[index]
    assert (await store.records())[0].outcomes == {"dropped": 1}
    assert (await store.repository_stats())[0].outcomes == {"dropped": 1}


# count() calls: (layer number, outcome, nbytes, repository); layers 1 and 2 are known, 9 is not.
Count = tuple[int, str, int, str | None]


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        pytest.param([], [], id="nothing-counted"),
        pytest.param([(1, "dropped", 10, None)], [], id="no-repository-given"),
        pytest.param(
            [
                (1, "dropped", 10, "team/app"),
                (1, "dropped", 10, "team/app"),
                (2, "rejected", 5, "team/app"),
                (1, "leaked", 0, "team/app"),
                (2, "audited", 0, "team/app"),
                (1, "dropped", 7, None),
            ],
            [RepositoryStats("team/app", {"dropped": 2, "rejected": 1, "leaked": 1, "audited": 1}, 25)],
            id="outcomes-and-bytes-add-up",
        ),
        pytest.param(
            [(9, "dropped", 100, "team/app"), (9, "leaked", 0, "team/other")],
            [RepositoryStats("team/app", {"dropped": 1}, 100), RepositoryStats("team/other", {"leaked": 1}, 0)],
            id="unknown-digests-count-for-their-repository",
        ),
        pytest.param(
            [
                (1, "audited", 0, "c/none"),
                (1, "dropped", 5, "b/low"),
                (2, "dropped", 50, "z/high"),
                (9, "rejected", 5, "a/low"),
                (2, "allowed", 0, "a/none"),
            ],
            [
                RepositoryStats("z/high", {"dropped": 1}, 50),
                RepositoryStats("a/low", {"rejected": 1}, 5),
                RepositoryStats("b/low", {"dropped": 1}, 5),
                RepositoryStats("a/none", {"allowed": 1}, 0),
                RepositoryStats("c/none", {"audited": 1}, 0),
            ],
            id="most-bytes-kept-out-first-then-by-name",
        ),
    ],
)
async def test_repository_stats_add_up_the_counts_per_repository_and_outlive_forget(
    store: ForeignStore, counts: list[Count], expected: list[RepositoryStats]
) -> None:
    await store.learn([layer(1), layer(2)], Sighting("learn"))

    for number, outcome, nbytes, repository in counts:
        await store.count(digest(number), outcome, nbytes, repository)

    assert await store.repository_stats() == expected
    await store.forget([digest(1), digest(2)])
    assert await store.repository_stats() == expected


# Writes that change what known() answers (layers 1 and 2 are known)...
WRITES: dict[str, Callable[[ForeignStore], Awaitable[object]]] = {
    "learn-new": lambda store: store.learn([layer(3)], Sighting("learn")),
    "learn-filling-a-gap": lambda store: store.learn([layer(1, diff_id=digest(50))], Sighting("manifest-get")),
    "forget": lambda store: store.forget([digest(2)]),
}
# ...and calls that leave it as it was, writes to the records included.
NO_CHANGES: dict[str, Callable[[ForeignStore], Awaitable[object]]] = {
    "learn-known": lambda store: store.learn([layer(1)], Sighting("manifest-get")),
    "count": lambda store: store.count(digest(1), "dropped", 10),
    "known": lambda store: store.known(),
    "records": lambda store: store.records(),
    "generation": lambda store: store.generation(),
    "learn-nothing": lambda store: store.learn([], Sighting("learn")),
    "forget-unknown": lambda store: store.forget([digest(9)]),
    "count-unknown": lambda store: store.count(digest(9), "dropped", 10),
    "count-for-a-repository": lambda store: store.count(digest(1), "dropped", 10, "team/app"),
    "count-unknown-for-a-repository": lambda store: store.count(digest(9), "dropped", 10, "team/app"),
    "repository-stats": lambda store: store.repository_stats(),
    "record-upload": lambda store: store.record_upload("team/app", digest(1), 60),
    "recent-uploads": lambda store: store.recent_uploads("team/app", [digest(1)]),
}


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
async def test_generation_changes_after_each_write(
    store: ForeignStore, write: Callable[[ForeignStore], Awaitable[object]]
) -> None:
    await store.learn([layer(1), layer(2)], Sighting("learn"))
    before = await store.generation()

    await write(store)
    after_first = await store.generation()
    await store.learn([layer(4)], Sighting("learn"))

    assert before != after_first != await store.generation()


@pytest.mark.parametrize("operation", NO_CHANGES.values(), ids=NO_CHANGES.keys())
async def test_generation_stays_put_when_nothing_changed(
    store: ForeignStore, operation: Callable[[ForeignStore], Awaitable[object]]
) -> None:
    await store.learn([layer(1), layer(2)], Sighting("learn"))
    before = await store.generation()

    await operation(store)

    assert await store.generation() == before


async def test_a_closed_store_refuses_calls(store: ForeignStore) -> None:
    await store.learn([layer(1)], Sighting("learn"))
    await store.close()
    await store.close()

    with pytest.raises(StoreError, match="closed"):
        await store.known()


async def test_concurrent_calls_on_one_store_all_land(store: ForeignStore) -> None:
    new_layers = await asyncio.gather(*(store.learn([layer(n)], Sighting("learn")) for n in range(40)))
    await asyncio.gather(*(store.count(digest(n % 4), "dropped", 1, f"team/{n % 2}") for n in range(40)))

    assert sorted(new[0].digest for new in new_layers) == [digest(n) for n in range(40)]
    assert [record.outcomes for record in (await store.records())[:4]] == [{"dropped": 10}] * 4
    assert await store.repository_stats() == [RepositoryStats(f"team/{n}", {"dropped": 20}, 20) for n in (0, 1)]


async def test_a_large_store_is_read_whole(store: ForeignStore) -> None:
    layers = [layer(number) for number in range(2500)]
    await store.learn(layers, Sighting("learn"))

    assert await store.known() == {layer.digest: layer for layer in layers}


async def test_uploads_are_recent_per_repository_until_their_time_runs_out(store: ForeignStore, elapse: Elapse) -> None:
    await store.record_upload("team/app", digest(1), ttl_seconds=0.3)
    await store.record_upload("team/app", digest(2), ttl_seconds=60)
    await store.record_upload("team/other", digest(3), ttl_seconds=60)
    asked = [digest(1), digest(2), digest(3), digest(9), digest(1)]

    assert await store.recent_uploads("team/app", asked) == {digest(1), digest(2)}
    await elapse(0.6)
    assert await store.recent_uploads("team/app", iter(asked)) == {digest(2)}
    assert await store.recent_uploads("team/other", asked) == {digest(3)}
    assert await store.recent_uploads("team/app", []) == set()


async def test_recording_an_upload_again_restarts_its_time(store: ForeignStore, elapse: Elapse) -> None:
    await store.record_upload("team/app", digest(1), ttl_seconds=0.5)
    await elapse(0.3)
    await store.record_upload("team/app", digest(1), ttl_seconds=0.5)
    await elapse(0.3)

    assert await store.recent_uploads("team/app", [digest(1)]) == {digest(1)}


@pytest.mark.parametrize("ttl", [0, -1.0, float("nan")])
async def test_an_upload_needs_a_positive_time_to_live(store: ForeignStore, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl_seconds must be positive"):
        await store.record_upload("team/app", digest(1), ttl)


async def test_upload_records_leave_the_layer_records_alone(store: ForeignStore) -> None:
    await store.learn([layer(1)], Sighting("learn"))
    records = await store.records()

    await store.record_upload("team/app", digest(1), 60)

    assert await store.records() == records
    assert await store.known() == {digest(1): layer(1)}


@dataclass(frozen=True, slots=True)
class Learn:
    layers: tuple[ForeignLayer, ...]


@dataclass(frozen=True, slots=True)
class Forget:
    digests: tuple[str, ...]


model_digests = st.sampled_from([digest(n) for n in range(6)])
model_layers = st.builds(
    ForeignLayer,
    digest=model_digests,
    media_type=st.sampled_from([FOREIGN_GZIP, NONDISTRIBUTABLE]),
    size=st.integers(0, 3),
    urls=st.sampled_from([(), ("https://a/1",), ("https://b/1", "https://b/2")]),
    diff_id=st.sampled_from([None, digest(50), digest(51)]),
)
operations = st.lists(
    st.one_of(
        st.builds(Learn, st.lists(model_layers, max_size=4).map(tuple)),
        st.builds(Forget, st.lists(model_digests | st.just(digest(99)), max_size=4).map(tuple)),
    ),
    max_size=12,
)


def apply_to_model(model: dict[str, ForeignLayer], operation: Learn | Forget) -> list[ForeignLayer] | list[str]:
    if isinstance(operation, Forget):
        return [digest for digest in dict.fromkeys(operation.digests) if model.pop(digest, None)]
    new_layers = []
    for learned in operation.layers:
        known = model.get(learned.digest)
        if known is None:
            model[learned.digest] = learned
            new_layers.append(learned)
        else:
            model[learned.digest] = replace(
                known,
                size=known.size or learned.size,
                urls=known.urls or learned.urls,
                diff_id=learned.diff_id if known.diff_id is None else known.diff_id,
            )
    return new_layers


async def apply_to_store(store: ForeignStore, operation: Learn | Forget) -> list[ForeignLayer] | list[str]:
    if isinstance(operation, Forget):
        return await store.forget(operation.digests)
    return await store.learn(operation.layers, Sighting("learn"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=operations)
def test_any_learn_forget_sequence_matches_a_dict_model(backend: Backend, operations: list[Learn | Forget]) -> None:
    async def check(path: Path) -> None:
        store = backend.open(path, FakeClock())
        model: dict[str, ForeignLayer] = {}
        try:
            for operation in operations:
                before, model_before = await store.generation(), dict(model)
                expected = apply_to_model(model, operation)
                assert await apply_to_store(store, operation) == expected
                assert (await store.generation() != before) == (model != model_before)
                assert await store.known() == model
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(check(Path(folder) / "foreign-layers.db"))


async def test_opening_touches_nothing_until_first_use(db_path: Path) -> None:
    store = open_store(f"sqlite://{db_path}")
    assert not db_path.parent.exists()

    assert await store.known() == {}
    assert db_path.is_file()
    await store.close()


async def test_everything_survives_close_and_reopen(db_path: Path, clock: FakeClock) -> None:
    store = SqliteStore(db_path, clock=clock)
    await store.learn([layer(1, urls=("https://a/1",), diff_id=digest(50)), layer(2)], Sighting("manifest-put", "a/b"))
    await store.count(digest(1), "dropped", 1001, "a/b")
    records, stats, generation = await store.records(), await store.repository_stats(), await store.generation()
    await store.close()

    reopened = SqliteStore(db_path)
    assert await reopened.records() == records
    assert await reopened.repository_stats() == stats
    assert await reopened.generation() == generation
    await reopened.close()


@pytest.mark.parametrize("backend", SHARED_BACKENDS, indirect=True)
async def test_two_stores_on_one_backend_see_each_others_writes(backend: Backend, db_path: Path) -> None:
    gateway, cli = backend.open(db_path), backend.connect(db_path)
    try:
        seen = await gateway.generation()
        await cli.learn([layer(1)], Sighting("learn"))
        assert await gateway.generation() != seen
        assert await gateway.known() == {digest(1): layer(1)}

        await gateway.count(digest(1), "dropped", 1001, "team/app")
        assert (await cli.records())[0].outcomes == {"dropped": 1}
        assert await cli.repository_stats() == [RepositoryStats("team/app", {"dropped": 1}, 1001)]

        seen = await gateway.generation()
        assert await cli.forget([digest(1)]) == [digest(1)]
        assert await gateway.generation() != seen
        assert await gateway.known() == {}
    finally:
        await gateway.close()
        await cli.close()


async def in_another_process(script: str, *args: str | Path, prefix: tuple[str | Path, ...] = ()) -> str:
    """Run a Python `script` on the project (after `prefix`, a command that execs the rest); its output."""
    process = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-c", script, *args,
        cwd=PROJECT_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def learn_in_another_process(url: str, digests: list[str]) -> None:
    await in_another_process(WRITER_PROCESS, url, *digests)


@pytest.mark.parametrize("backend", SHARED_BACKENDS, indirect=True)
async def test_a_write_from_another_process_changes_the_generation(
    store: ForeignStore, backend: Backend, db_path: Path
) -> None:
    await store.learn([layer(1)], Sighting("learn"))
    seen = await store.generation()

    await learn_in_another_process(backend.url(db_path), [digest(2)])

    assert await store.generation() != seen
    assert set(await store.known()) == {digest(1), digest(2)}


@pytest.mark.parametrize("backend", SHARED_BACKENDS, indirect=True)
async def test_processes_writing_at_once_to_a_new_store_lose_nothing(backend: Backend, db_path: Path) -> None:
    store = backend.open(db_path)  # touches nothing yet: the SQLite file is created by the writers
    batches = [[digest(batch * 100 + n) for n in range(25)] for batch in range(4)]

    failures = await asyncio.gather(
        *(learn_in_another_process(backend.url(db_path), batch) for batch in batches), return_exceptions=True
    )
    assert [failure for failure in failures if failure is not None] == []

    assert set(await store.known()) == {digest for batch in batches for digest in batch}
    if backend.redis is None:  # Redis starts its generation at generation_base(), not 0
        assert await store.generation() == 100
    await store.close()


FIRST_CALLS: dict[str, Callable[[ForeignStore], Awaitable[object]]] = {
    **NO_CHANGES,
    "learn": lambda store: store.learn([layer(1)], Sighting("learn")),
    "forget": lambda store: store.forget([digest(1)]),
    "count": lambda store: store.count(digest(1), "dropped"),
}


@pytest.mark.parametrize("first_call", FIRST_CALLS.values(), ids=FIRST_CALLS.keys())
async def test_a_corrupt_file_fails_every_first_call_with_a_store_error(
    db_path: Path, first_call: Callable[[ForeignStore], Awaitable[object]]
) -> None:
    garbage = b"not a database, just garbage " * 200
    db_path.parent.mkdir()
    db_path.write_bytes(garbage)
    store = open_store(f"sqlite://{db_path}")

    with pytest.raises(StoreError, match=f"{db_path}: file is not a database"):
        await first_call(store)
    with pytest.raises(StoreError, match=str(db_path)):
        await store.generation()
    await store.close()
    assert db_path.read_bytes() == garbage


async def test_a_file_from_a_newer_schema_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir()
    with sqlite3.connect(db_path) as connection:
        connection.execute("PRAGMA user_version = 99")
    connection.close()

    with pytest.raises(StoreError, match=f"{db_path} has schema version 99"):
        await SqliteStore(db_path).known()


@pytest.mark.parametrize(
    "make_unusable",
    [
        pytest.param(lambda path: path.mkdir(parents=True), id="path-is-a-directory"),
        pytest.param(lambda path: path.parent.write_text(""), id="parent-is-a-file"),
    ],
)
async def test_an_unusable_path_fails_with_a_store_error(
    db_path: Path, make_unusable: Callable[[Path], object]
) -> None:
    make_unusable(db_path)

    with pytest.raises(StoreError, match=str(db_path.parent)):
        await SqliteStore(db_path).learn([layer(1)], Sighting("learn"))


@pytest.fixture
def permissions_restored(db_path: Path) -> Iterator[None]:
    yield
    for path in (db_path.parent, *db_path.parent.iterdir()):
        path.chmod(0o755)


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root ignores file permissions")
@pytest.mark.parametrize(
    ("file_mode", "folder_mode"),
    [pytest.param(0o444, 0o755, id="read-only-file"), pytest.param(0o644, 0o555, id="read-only-folder")],
)
@pytest.mark.usefixtures("permissions_restored")
async def test_a_read_only_store_fails_writes_with_a_store_error(
    db_path: Path, file_mode: int, folder_mode: int
) -> None:
    store = SqliteStore(db_path)
    await store.learn([layer(1)], Sighting("learn"))
    await store.close()
    db_path.chmod(file_mode)
    db_path.parent.chmod(folder_mode)

    reopened = SqliteStore(db_path)
    with pytest.raises(StoreError, match=str(db_path)):
        await reopened.learn([layer(2)], Sighting("learn"))
    await reopened.close()


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root ignores file permissions")
@pytest.mark.usefixtures("permissions_restored")
async def test_an_unreadable_file_fails_the_first_call_with_a_store_error(db_path: Path) -> None:
    store = SqliteStore(db_path)
    await store.learn([layer(1)], Sighting("learn"))
    await store.close()
    db_path.chmod(0o000)

    with pytest.raises(StoreError, match=str(db_path)):
        await SqliteStore(db_path).known()


@pytest.mark.parametrize(
    ("url", "expected_path"),
    [
        ("sqlite:///var/lib/foreign-layer-proxy/foreign-layers.db", "/var/lib/foreign-layer-proxy/foreign-layers.db"),
        ("sqlite://relative/path.db", "{cwd}/relative/path.db"),
        ("sqlite://foreign-layers.db", "{cwd}/foreign-layers.db"),
        ("SQLite:///x/y.db", "/x/y.db"),
        ("sqlite:///x/with space.db", "/x/with space.db"),
    ],
)
def test_open_store_reads_sqlite_urls(
    url: str, expected_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store(url)
    assert isinstance(store, SqliteStore)
    assert store.path == Path(expected_path.format(cwd=tmp_path))


def test_open_store_reads_memory_url() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "foreign-layers.db",
        "/var/lib/foreign-layers.db",
        "sqlite:/var/lib/foreign-layers.db",
        "sqlite://",
        "sqlite:///",
        "sqlite:///var/lib/",
        "sqlite://..",
        "sqlite:///x.db?mode=ro",
        "sqlite:///x.db#fragment",
        "memory:",
        "memory://somewhere",
        "postgresql://db.example/foreign",
        "https://registry.example/v2/",
        "sqlite\n://x.db",
        "sqlite:///x\0y.db",
    ],
)
def test_open_store_refuses_bad_urls_with_a_one_line_message(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        open_store(url)
    message = str(refused.value)
    assert repr(url) in message
    assert "\n" not in message


async def test_expired_uploads_are_purged_by_later_records(db_path: Path, clock: FakeClock) -> None:
    store = SqliteStore(db_path, clock=clock)
    for number in range(5):
        await store.record_upload("team/app", digest(number), ttl_seconds=1)
    clock.now += 2
    await store.record_upload("team/app", digest(9), ttl_seconds=1)
    await store.close()

    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        assert connection.execute("SELECT digest FROM uploads").fetchall() == [(digest(9),)]


@pytest.mark.parametrize(
    ("version", "tables_added_since"),
    [
        pytest.param(1, ("uploads", "repository_outcomes"), id="version-1"),
        pytest.param(2, ("repository_outcomes",), id="version-2"),
    ],
)
async def test_an_older_file_is_upgraded_in_place_and_keeps_its_records(
    db_path: Path, version: int, tables_added_since: tuple[str, ...]
) -> None:
    store = SqliteStore(db_path)
    await store.learn([layer(1)], Sighting("learn"))
    await store.count(digest(1), "dropped", 1000)
    records = await store.records()
    await store.close()
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        connection.executescript("".join(f"DROP TABLE {table};" for table in tables_added_since))
        connection.execute(f"PRAGMA user_version = {version}")

    upgraded = SqliteStore(db_path)
    assert await upgraded.records() == records
    await upgraded.record_upload("team/app", digest(1), ttl_seconds=60)
    await upgraded.count(digest(9), "dropped", 1000, "team/app")
    assert await upgraded.recent_uploads("team/app", [digest(1)]) == {digest(1)}
    assert await upgraded.repository_stats() == [RepositoryStats("team/app", {"dropped": 1}, 1000)]
    await upgraded.close()
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


READER_PROCESS = """
import asyncio, sys
from proxy.manifests import ForeignLayer
from proxy.store import Sighting, StoreError, open_store

async def read_then_write(url):
    store = open_store(url)
    print(sorted(await store.known()))
    try:
        await store.learn([ForeignLayer("sha256:" + "f" * 64, "x", 1)], Sighting("learn"))
    except StoreError as error:
        print(error)
    await store.close()

asyncio.run(read_then_write(sys.argv[1]))
"""


@pytest.mark.skipif(not RUNNING_AS_ROOT, reason="mounting a read-only folder needs root")
async def test_a_file_in_a_read_only_folder_is_read_and_refuses_writes(db_path: Path) -> None:
    require_binaries("unshare")
    store = SqliteStore(db_path)
    await store.learn([layer(1)], Sighting("learn"))
    await store.close()  # the last connection removes the WAL files: nothing can be created beside the file
    read_only_folder = ("unshare", "--mount", "--propagation", "private", "--",
                        "sh", "-c", 'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", db_path.parent)  # fmt: skip

    known, refusal = (await in_another_process(READER_PROCESS, f"sqlite://{db_path}", prefix=read_only_folder)).splitlines()

    assert known == repr([digest(1)])
    assert refusal == f"foreign-layer store {db_path}: attempt to write a readonly database"


@pytest.mark.parametrize(
    ("url", "expected", "shown"),
    [
        ("redis://cache.example", RedisLocation("cache.example", 6379, 0, tls=False), "redis://cache.example:6379/0"),
        ("redis://cache.example:6380/3", RedisLocation("cache.example", 6380, 3, tls=False), None),
        (
            "rediss://:s3cret@cache.example/1",
            RedisLocation("cache.example", 6379, 1, tls=True, password="s3cret"),
            "rediss://cache.example:6379/1",
        ),
        (
            "redis://proxy:p%40ss%2Fword@10.0.0.5:7000/",
            RedisLocation("10.0.0.5", 7000, 0, tls=False, username="proxy", password="p@ss/word"),
            "redis://10.0.0.5:7000/0",
        ),
        ("REDIS://[::1]:6379/2", RedisLocation("::1", 6379, 2, tls=False), "redis://[::1]:6379/2"),
    ],
)
def test_open_store_reads_redis_urls(url: str, expected: RedisLocation, shown: str | None) -> None:
    store = open_store(url)
    assert isinstance(store, RedisStore)
    assert store.location == expected
    assert shown is None or expected.shown == shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://",
        "redis://:s3cret@",
        "redis://:s3cret@cache.example:port/0",
        "redis://:s3cret@cache.example:99999/0",
        "redis://:s3cret@cache.example/zero",
        "redis://:s3cret@cache.example/0/1",
        "redis://:s3cret@cache.example/0?ssl_cert_reqs=none",
        "redis://:s3cret@cache.example/0#fragment",
        "redis+sentinel://:s3cret@cache.example/0",
        "redis://user:s3cret@cache.example\n/0",
    ],
)
def test_open_store_refuses_bad_redis_urls_without_showing_the_password(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        open_store(url)
    message = str(refused.value)
    assert "store URL" in message
    assert "s3cret" not in message
    assert "\n" not in message


OFFLINE_CALLS = {name: call for name, call in FIRST_CALLS.items() if name != "learn-nothing"}


@pytest.mark.parametrize("first_call", OFFLINE_CALLS.values(), ids=OFFLINE_CALLS.keys())
async def test_an_unreachable_redis_fails_each_call_with_a_one_line_store_error(
    first_call: Callable[[ForeignStore], Awaitable[object]],
) -> None:
    port = free_port()
    store = open_store(f"redis://:s3cret@127.0.0.1:{port}/0")

    with pytest.raises(StoreError) as failed:
        await first_call(store)
    message = str(failed.value)
    assert message.startswith(f"foreign-layer store redis://127.0.0.1:{port}/0: ")
    assert "s3cret" not in message and "\n" not in message
    await store.close()


async def test_a_store_works_again_once_redis_is_back_even_empty(redis_factory: RedisFactory) -> None:
    server = redis_factory(password="s3cret")
    store = open_store(server.url())
    await store.learn([layer(1)], Sighting("learn"))
    await store.count(digest(1), "dropped")
    generation = await store.generation()

    server.stop()
    with pytest.raises(StoreError, match=f"redis://{server.host_port}/0: .*connecting to"):
        await store.known()
    with pytest.raises(StoreError):
        await store.count(digest(1), "dropped")
    server.start()  # empty, like a failover to a replica that had nothing

    assert (await store.known(), await store.generation()) == ({}, 0)
    await store.learn([layer(2)], Sighting("learn"))
    await store.count(digest(2), "dropped", 5)  # its script is loaded again
    assert [(record.layer, record.outcomes) for record in await store.records()] == [(layer(2), {"dropped": 1})]
    assert 0 < await store.generation() < generation  # what tells KnownForeign that the store was reset
    await store.close()


async def test_a_redis_that_stops_answering_fails_calls_after_the_short_timeout(redis_factory: RedisFactory) -> None:
    server = redis_factory()
    store = RedisStore(parse_redis_url(server.url()), timeout=0.3)
    await store.learn([layer(1)], Sighting("learn"))

    server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=f"redis://{server.host_port}/0: Timeout"):
            await store.known()
        waited = time.monotonic() - started
    finally:
        server.resume()

    assert waited < 5
    assert await store.known() == {digest(1): layer(1)}
    await store.close()


async def test_rediss_checks_the_servers_certificate_against_the_trust_store(
    redis_factory: RedisFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    chain, key, trusted_roots = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "roots.pem"
    issued.cert_chain_pems[0].write_to_path(str(chain))
    issued.private_key_pem.write_to_path(str(key))
    authority.cert_pem.write_to_path(str(trusted_roots))
    server = redis_factory(password="s3cret", certificate=(chain, key))

    untrusting = open_store(server.url())
    with pytest.raises(StoreError, match=f"rediss://{server.host_port}/0: .*certificate verify failed"):
        await untrusting.known()
    await untrusting.close()

    monkeypatch.setenv("SSL_CERT_FILE", str(trusted_roots))
    trusting = open_store(server.url())
    await trusting.learn([layer(1)], Sighting("learn"))
    assert await trusting.known() == {digest(1): layer(1)}
    await trusting.close()


async def test_a_wrong_password_is_a_store_error_that_shows_no_password(redis_factory: RedisFactory) -> None:
    server = redis_factory(password="right-s3cret")
    store = open_store(f"redis://:wrong-s3cret@{server.host_port}/0")

    with pytest.raises(StoreError, match=f"redis://{server.host_port}/0: ") as failed:
        await store.generation()
    assert "s3cret" not in str(failed.value)
    await store.close()


@pytest.mark.parametrize(
    "intrusion",
    [
        pytest.param(lambda client: client.set(LAYERS, "a string where a hash belongs"), id="wrong-type"),
        pytest.param(lambda client: client.hset(LAYERS, digest(1), "not json"), id="not-json"),
    ],
)
@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_foreign_data_under_the_stores_keys_is_a_store_error(
    store: ForeignStore, backend: Backend, intrusion: Callable[[redis.Redis], object]
) -> None:
    assert backend.redis is not None
    with backend.redis.client() as client:
        intrusion(client)

    with pytest.raises(StoreError, match=backend.redis.host_port):
        await store.known()


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_every_change_is_published(store: ForeignStore, backend: Backend) -> None:
    assert backend.redis is not None
    await store.learn([layer(1), layer(2)], Sighting("learn"))
    listener = redis.asyncio.Redis.from_url(backend.redis.url(), decode_responses=True)
    async with listener.pubsub() as subscription:
        await subscription.subscribe(CHANNEL)
        for change in (*WRITES.values(), *NO_CHANGES.values()):
            await change(store)
        messages = []
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            if message := await subscription.get_message(ignore_subscribe_messages=True, timeout=0.1):
                messages.append(message["data"])
    await listener.aclose()

    assert messages == ["learn", "learn", "forget"]


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.lists(st.text(), max_size=3))
def test_urls_read_back_at_a_load_are_the_urls_written(urls: list[str]) -> None:
    """A load reads a one-URL column without a JSON parse: whatever json.dumps made of the urls must come back."""
    assert _urls(json.dumps(urls)) == tuple(urls)
