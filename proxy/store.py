"""The set of known foreign-layer digests, shared by the gateway and the CLI: in memory, SQLite or Redis."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from proxy.compact import CompactLayers
from proxy.manifests import ForeignLayer
from proxy.trust import (
    EVERYWHERE,
    Reach,
    Teaching,
    decode_reach,
    decode_teachings,
    encode_reach,
    encode_teachings,
    reach_of,
    with_teaching,
)

Result = TypeVar("Result")
Clock = Callable[[], float]

SUPPORTED_URLS = "memory://, sqlite:///path/to/foreign-layers.db or redis[s]://[:password@]host[:port][/db]"


@dataclass(frozen=True, slots=True)
class Sighting:
    """Where a layer was seen: `source` is e.g. "manifest-put", "manifest-get", "digest-file" or "learn"."""

    source: str
    repository: str | None = None
    manifest_digest: str | None = None


@dataclass(frozen=True, slots=True)
class ForeignRecord:
    """A known layer's history. `outcomes` counts count() calls per outcome; `bytes_kept_out` sums their nbytes.

    `teachings` say who taught it and where that applies (see proxy.trust).
    """

    layer: ForeignLayer
    first_sighting: Sighting
    last_sighting: Sighting
    first_seen: float
    last_seen: float
    outcomes: Mapping[str, int]
    bytes_kept_out: int
    teachings: tuple[Teaching, ...] = ()

    @property
    def reach(self) -> Reach | None:
        return reach_of(self.teachings)


@dataclass(frozen=True, slots=True)
class RepositoryStats:
    """What count() saw for one repository: calls per outcome, and the sum of their nbytes."""

    repository: str
    outcomes: Mapping[str, int]
    bytes_kept_out: int


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A rediss:// store's CA bundle (else the system's trust store) and client certificate, all PEM files."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


NO_TLS = TlsFiles()


@dataclass(frozen=True, slots=True)
class KnownSnapshot:
    """Everything a process enforces, as of `generation`: every known layer, and the reach of those not
    enforced everywhere."""

    generation: int
    layers: Mapping[str, ForeignLayer]  # a CompactLayers when read from a database
    reach: dict[str, Reach]


# A changed digest's layer and reach now; None: it is no longer known.
KnownEntry = tuple[ForeignLayer, Reach | None]


@dataclass(frozen=True, slots=True)
class KnownChanges:
    """The digests whose layer or reach changed after some generation, up to `generation` (at least)."""

    generation: int
    changed: dict[str, KnownEntry | None]


@dataclass(frozen=True, slots=True)
class Untaught:
    """What removing one teacher's teachings did: digests no longer known at all, and digests still
    known (from other teachers) whose reach shrank or stayed."""

    forgotten: list[str]
    narrowed: list[str]


# A count's key: the digest, the outcome and the repository (None: counted for the digest only).
CountKey = tuple[str, str, str | None]


@dataclass(slots=True)
class Tally:
    """count() and record_upload() calls added up, for a store to write in one transaction: a burst of a
    thousand drops of one layer is one row to update, not a thousand."""

    counts: dict[CountKey, tuple[int, int]] = field(default_factory=dict)  # -> (calls, sum of nbytes)
    uploads: dict[tuple[str, str], float] = field(default_factory=dict)  # (repository, digest) -> ttl seconds

    def count(self, digest: str, outcome: str, nbytes: int = 0, repository: str | None = None, times: int = 1) -> None:
        key = (digest, outcome, repository)
        calls, total = self.counts.get(key, (0, 0))
        self.counts[key] = (calls + times, total + nbytes)

    def upload(self, repository: str, digest: str, ttl_seconds: float) -> None:
        upload_expiry(0, ttl_seconds)  # a bad ttl fails here, at the call, not at the write
        self.uploads[repository, digest] = ttl_seconds

    def holds(self, key: CountKey | tuple[str, str]) -> bool:
        return key in self.counts or key in self.uploads

    def merge(self, later: Tally, limit: int) -> None:
        """Add `later` to this one (kept after a failed write), new keys only while fewer than `limit` are held."""
        for (digest, outcome, repository), (calls, nbytes) in later.counts.items():
            if len(self) < limit or (digest, outcome, repository) in self.counts:
                self.count(digest, outcome, nbytes, repository, calls)
        for key, ttl in later.uploads.items():
            if len(self) < limit or key in self.uploads:
                self.uploads[key] = ttl

    def __len__(self) -> int:
        return len(self.counts) + len(self.uploads)


class StoreError(Exception):
    """The store's backend failed; the message names the backend (the SQLite file, the Redis URL without password)."""


class ForeignStore(Protocol):
    async def learn(
        self, layers: Sequence[ForeignLayer], sighting: Sighting, *, scope: str = EVERYWHERE, candidate: bool = False
    ) -> list[ForeignLayer]:
        """Insert or refresh; returns the layers that were not known before.

        A refresh moves last_seen/last_sighting, keeps the first_* fields and fills a missing size (0),
        diff_id or urls. The sighting's repository (or source) is recorded as a teaching in `scope`,
        a candidate one (only audited) with `candidate`.
        """

    async def known(self) -> dict[str, ForeignLayer]:
        """Every known layer, by digest, whatever its reach."""

    async def snapshot(self) -> KnownSnapshot:
        """Every known layer and the reach of those not enforced everywhere, with the generation they are of."""

    async def changes(self, since: int) -> KnownChanges | None:
        """What changed after generation `since`; None when the store no longer holds that history (or
        never did: another store, a reset), so that the caller reloads a snapshot. Costs what changed,
        not what is known."""

    async def records(self) -> list[ForeignRecord]:
        """Every known layer with its history, sorted by digest."""

    async def forget(self, digests: Iterable[str]) -> list[str]:
        """Remove the digests; returns those that were known."""

    async def untaught(self, repository: str, since: float | None = None) -> Untaught:
        """Remove the teachings of `repository` (or of an operator source of that name), those made at or
        after `since` only if given; a digest left without teachings is forgotten."""

    async def fill_size(self, digest: str, size: int) -> None:
        """Record a known layer's size where its source did not give one (size 0)."""

    async def count(self, digest: str, outcome: str, nbytes: int = 0, repository: str | None = None) -> None:
        """Record one outcome for a known digest (an unknown one is not recorded) and for `repository`, if given.

        The repository's totals count every digest, known or not, and outlive `forget`.
        """

    async def record(self, tally: Tally) -> None:
        """Every count and upload of `tally`, as count() and record_upload() would, in one transaction."""

    async def repository_stats(self) -> list[RepositoryStats]:
        """Every repository that was counted, by bytes kept out (most first), then by name."""

    async def generation(self) -> int:
        """Cheap; differs after any change to what `snapshot()` answers, committed by any process sharing the store.

        Counts, refreshed sightings, upload records and teachings that reach no further do not move it,
        so that following it costs a read of `changes()` only when the set of layers really changed. A
        Redis store that lost its records (a failover to an empty server) answers lower than it ever did
        before the loss (a replaced SQLite file starts again from 0).
        """

    async def restore(self, records: Sequence[ForeignRecord], repositories: Sequence[RepositoryStats]) -> None:
        """Write records and repository counts as given (an export of another store), replacing any of the same
        digest or repository; other records stay."""

    async def record_upload(self, repository: str, digest: str, ttl_seconds: float) -> None:
        """Remember for `ttl_seconds` (> 0, else ValueError) that `digest` was uploaded to `repository`."""

    async def recent_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        """Those of `digests` recorded for `repository` whose time has not run out."""

    async def claim_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        """Like recent_uploads, but the records found are removed: each upload is claimed (counted) once,
        by one process."""

    async def close(self) -> None: ...


def open_store(url: str, tls: TlsFiles = NO_TLS) -> ForeignStore:
    """The store a URL names; ValueError for an unsupported or malformed URL. Nothing is opened until first use.

    `tls` applies to rediss:// only. Messages show the URL without its password.
    """
    shown = without_password(url)
    scheme, separator, location = url.partition("://")
    if not separator:
        raise ValueError(f"malformed store URL {shown!r}: expected {SUPPORTED_URLS}")
    match scheme.lower():
        case "memory":
            if location:
                raise ValueError(f"malformed store URL {url!r}: memory:// takes no path")
            return MemoryStore()
        case "sqlite":
            return SqliteStore(_sqlite_path(url, location))
        case "redis" | "rediss":
            # Imported here so that the SQLite-only CLI paths do not load the Redis client.
            from proxy.store_redis import RedisStore, parse_redis_url

            return RedisStore(parse_redis_url(url), tls=tls)
        case _:
            raise ValueError(f"unsupported store URL {shown!r}: expected {SUPPORTED_URLS}")


def without_password(url: str) -> str:
    """`url` with the credentials of its authority, if any, replaced by `***`."""
    scheme, separator, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if not separator or "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"


def upload_expiry(now: float, ttl_seconds: float) -> float:
    if not ttl_seconds > 0:
        raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds!r}")
    return now + ttl_seconds


def _sqlite_path(url: str, location: str) -> Path:
    if "?" in location or "#" in location:
        raise ValueError(f"malformed store URL {url!r}: query strings and fragments are not supported")
    if not location or "\0" in location or location.endswith("/") or Path(location).name in {"", ".."}:
        raise ValueError(
            f"malformed store URL {url!r}: expected sqlite:///absolute/path.db or sqlite://relative/path.db"
        )
    return Path(location).absolute()


def counted_once(digest: str, outcome: str, nbytes: int, repository: str | None) -> Tally:
    tally = Tally()
    tally.count(digest, outcome, nbytes, repository)
    return tally


def uploaded_once(repository: str, digest: str, ttl_seconds: float) -> Tally:
    tally = Tally()
    tally.upload(repository, digest, ttl_seconds)
    return tally


def by_bytes_kept_out(stats: Iterable[RepositoryStats]) -> list[RepositoryStats]:
    return sorted(stats, key=lambda repository: (-repository.bytes_kept_out, repository.repository))


def with_gaps_filled(known: ForeignLayer, later: ForeignLayer) -> ForeignLayer:
    return replace(
        known,
        size=known.size or later.size,
        urls=known.urls or later.urls,
        diff_id=later.diff_id if known.diff_id is None else known.diff_id,
    )


def teaching_from(sighting: Sighting, scope: str, candidate: bool, now: float) -> Teaching:
    return Teaching(sighting.repository, sighting.source, sighting.manifest_digest, scope, candidate, now)


def without_teacher(teachings: Sequence[Teaching], teacher: str, since: float | None) -> tuple[Teaching, ...]:
    return tuple(
        teaching for teaching in teachings
        if teaching.teacher != teacher or (since is not None and teaching.taught_at < since)
    )  # fmt: skip


class MemoryStore:
    """One process's store, for tests and single-process use."""

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._records: dict[str, ForeignRecord] = {}
        self._uploads: dict[tuple[str, str], float] = {}
        self._expiries: list[tuple[float, str, str]] = []  # a heap of (expires_at, repository, digest)
        self._repositories: dict[str, RepositoryStats] = {}
        self._generation = 0
        # Digest -> the generation of its last change, oldest first.
        self._changes: dict[str, int] = {}
        self._closed = False

    async def learn(
        self, layers: Sequence[ForeignLayer], sighting: Sighting, *, scope: str = EVERYWHERE, candidate: bool = False
    ) -> list[ForeignLayer]:
        self._check_open()
        now = self._clock()
        teaching = teaching_from(sighting, scope, candidate, now)
        new_layers = []
        changed = []
        for layer in layers:
            record = self._records.get(layer.digest)
            if record is None:
                self._records[layer.digest] = ForeignRecord(layer, sighting, sighting, now, now, {}, 0, (teaching,))
                new_layers.append(layer)
                changed.append(layer.digest)
            else:
                updated = replace(
                    record, layer=with_gaps_filled(record.layer, layer), last_sighting=sighting, last_seen=now,
                    teachings=with_teaching(record.teachings, teaching),
                )  # fmt: skip
                if (updated.layer, updated.reach) != (record.layer, record.reach):
                    changed.append(layer.digest)
                self._records[layer.digest] = updated
        self._moved(changed)
        return new_layers

    async def known(self) -> dict[str, ForeignLayer]:
        self._check_open()
        return {digest: record.layer for digest, record in self._records.items()}

    async def snapshot(self) -> KnownSnapshot:
        self._check_open()
        reach = {digest: scoped for digest, record in self._records.items() if (scoped := record.reach) is not None}
        return KnownSnapshot(self._generation, await self.known(), reach)

    async def changes(self, since: int) -> KnownChanges | None:
        self._check_open()
        if since > self._generation:
            return None
        changed: dict[str, KnownEntry | None] = {}
        for digest, generation in reversed(self._changes.items()):
            if generation <= since:
                break
            record = self._records.get(digest)
            changed[digest] = None if record is None else (record.layer, record.reach)
        return KnownChanges(self._generation, changed)

    async def records(self) -> list[ForeignRecord]:
        self._check_open()
        # Copies, so a caller cannot reach into the store through `outcomes`.
        return [replace(record, outcomes=dict(record.outcomes)) for _, record in sorted(self._records.items())]

    async def forget(self, digests: Iterable[str]) -> list[str]:
        self._check_open()
        removed = [digest for digest in dict.fromkeys(digests) if self._records.pop(digest, None)]
        self._moved(removed)
        return removed

    async def untaught(self, repository: str, since: float | None = None) -> Untaught:
        self._check_open()
        untaught = Untaught([], [])
        for digest, record in list(self._records.items()):
            remaining = without_teacher(record.teachings, repository, since)
            if remaining == record.teachings:
                continue
            if remaining:
                self._records[digest] = replace(record, teachings=remaining)
                untaught.narrowed.append(digest)
                if reach_of(remaining) != record.reach:
                    self._moved([digest])
            else:
                untaught.forgotten.extend(await self.forget([digest]))
        return untaught

    async def fill_size(self, digest: str, size: int) -> None:
        self._check_open()
        record = self._records.get(digest)
        if record is not None and record.layer.size == 0 and size > 0:
            self._records[digest] = replace(record, layer=replace(record.layer, size=size))
            self._moved([digest])

    async def count(self, digest: str, outcome: str, nbytes: int = 0, repository: str | None = None) -> None:
        await self.record(counted_once(digest, outcome, nbytes, repository))

    async def record(self, tally: Tally) -> None:
        self._check_open()
        for (digest, outcome, repository), (calls, nbytes) in tally.counts.items():
            if (record := self._records.get(digest)) is not None:
                self._records[digest] = _counted(record, outcome, calls, nbytes)
            if repository is not None:
                stats = self._repositories.get(repository, RepositoryStats(repository, {}, 0))
                self._repositories[repository] = _counted(stats, outcome, calls, nbytes)
        now = self._clock()
        for (repository, digest), ttl_seconds in tally.uploads.items():
            expires_at = upload_expiry(now, ttl_seconds)
            self._uploads[repository, digest] = expires_at
            heapq.heappush(self._expiries, (expires_at, repository, digest))
        # Oldest expiry first: each upload record is dropped once, not the whole table rebuilt per upload.
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, repository, digest = heapq.heappop(self._expiries)
            if self._uploads.get((repository, digest)) == expires_at:
                del self._uploads[repository, digest]

    async def restore(self, records: Sequence[ForeignRecord], repositories: Sequence[RepositoryStats]) -> None:
        self._check_open()
        self._records.update((record.layer.digest, record) for record in records)
        self._repositories.update((stats.repository, stats) for stats in repositories)
        if records:
            self._generation += 1

    async def repository_stats(self) -> list[RepositoryStats]:
        self._check_open()
        return by_bytes_kept_out(replace(stats, outcomes=dict(stats.outcomes)) for stats in self._repositories.values())

    async def generation(self) -> int:
        self._check_open()
        return self._generation

    async def record_upload(self, repository: str, digest: str, ttl_seconds: float) -> None:
        await self.record(uploaded_once(repository, digest, ttl_seconds))

    async def recent_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        self._check_open()
        now = self._clock()
        return {digest for digest in digests if self._uploads.get((repository, digest), now) > now}

    async def claim_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        claimed = await self.recent_uploads(repository, digests)
        for digest in claimed:
            del self._uploads[repository, digest]
        return claimed

    async def close(self) -> None:
        self._closed = True

    def _moved(self, digests: Iterable[str]) -> None:
        digests = list(digests)
        if not digests:
            return
        self._generation += 1
        for digest in digests:
            self._changes.pop(digest, None)
            self._changes[digest] = self._generation

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("memory store is closed")


Counted = TypeVar("Counted", ForeignRecord, RepositoryStats)


def _counted(counted: Counted, outcome: str, calls: int, nbytes: int) -> Counted:
    outcomes = {**counted.outcomes, outcome: counted.outcomes.get(outcome, 0) + calls}
    return replace(counted, outcomes=outcomes, bytes_kept_out=counted.bytes_kept_out + nbytes)


SCHEMA_VERSION = 4
# Changes kept for other processes to follow; one that fell further behind reloads a snapshot.
CHANGES_KEPT = 100_000

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0)",
    """
    CREATE TABLE IF NOT EXISTS foreign_layers (
        digest TEXT PRIMARY KEY,
        media_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        urls TEXT NOT NULL,
        diff_id TEXT,
        first_source TEXT NOT NULL,
        first_repository TEXT,
        first_manifest_digest TEXT,
        first_seen REAL NOT NULL,
        last_source TEXT NOT NULL,
        last_repository TEXT,
        last_manifest_digest TEXT,
        last_seen REAL NOT NULL,
        bytes_kept_out INTEGER NOT NULL DEFAULT 0,
        teachings TEXT,
        reach TEXT
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS outcomes (
        digest TEXT NOT NULL,
        outcome TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (digest, outcome)
    ) WITHOUT ROWID
    """,
    # Version 2: upload records for leak detection (a version 1 file gains the table on first use).
    """
    CREATE TABLE IF NOT EXISTS uploads (
        repository TEXT NOT NULL,
        digest TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (repository, digest)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS uploads_by_expiry ON uploads (expires_at)",
    # Version 3: counts per repository (an older file gains the table on first use).
    """
    CREATE TABLE IF NOT EXISTS repository_outcomes (
        repository TEXT NOT NULL,
        outcome TEXT NOT NULL,
        count INTEGER NOT NULL,
        bytes_kept_out INTEGER NOT NULL,
        PRIMARY KEY (repository, outcome)
    ) WITHOUT ROWID
    """,
    # Version 4: teachings and reach per layer (see ADDED_COLUMNS), and the digests each generation
    # changed, from `history_from` on, so that processes follow changes instead of reloading.
    """
    CREATE TABLE IF NOT EXISTS changes (
        generation INTEGER NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (generation, digest)
    ) WITHOUT ROWID
    """,
    "INSERT OR IGNORE INTO meta (key, value) SELECT 'history_from', value FROM meta WHERE key = 'generation'",
)
NO_URLS = json.dumps([])
WITHOUT_URLS = f"FROM foreign_layers WHERE urls = '{NO_URLS}'"
ADDED_COLUMNS = {"teachings": "TEXT", "reach": "TEXT"}
# Layers from before teachings were recorded were taught everywhere by their first sighting.
BACKFILL_TEACHINGS = """
    UPDATE foreign_layers
    SET teachings = json_array(json_array(first_repository, first_source, first_manifest_digest, '*', 0, first_seen))
    WHERE teachings IS NULL
"""

REFRESH_SIGHTING = """
    UPDATE foreign_layers SET
        last_source = :source,
        last_repository = :repository,
        last_manifest_digest = :manifest_digest,
        last_seen = :now
    WHERE digest = :digest
"""

UPDATE_LAYER = """
    UPDATE foreign_layers SET size = :size, urls = :urls, diff_id = :diff_id, teachings = :teachings, reach = :reach
    WHERE digest = :digest
"""

INSERT_LAYER = """
    INSERT INTO foreign_layers (
        digest, media_type, size, urls, diff_id,
        first_source, first_repository, first_manifest_digest, first_seen,
        last_source, last_repository, last_manifest_digest, last_seen,
        teachings, reach
    ) VALUES (
        :digest, :media_type, :size, :urls, :diff_id,
        :source, :repository, :manifest_digest, :now,
        :source, :repository, :manifest_digest, :now,
        :teachings, :reach
    )
"""

LAYER_COLUMNS = "digest, media_type, size, urls, diff_id"
HISTORY_COLUMNS = (
    "first_source, first_repository, first_manifest_digest, first_seen, "
    "last_source, last_repository, last_manifest_digest, last_seen"
)

SELECT_RECORDS = f"""
    SELECT {LAYER_COLUMNS},
        first_source, first_repository, first_manifest_digest, first_seen,
        last_source, last_repository, last_manifest_digest, last_seen,
        bytes_kept_out, teachings, outcome, count
    FROM foreign_layers LEFT JOIN outcomes USING (digest)
    ORDER BY digest
"""

COUNT_FOR_REPOSITORY = """
    INSERT INTO repository_outcomes (repository, outcome, count, bytes_kept_out) VALUES (?, ?, ?, ?)
    ON CONFLICT (repository, outcome) DO UPDATE SET
        count = count + excluded.count, bytes_kept_out = bytes_kept_out + excluded.bytes_kept_out
"""

# Only for a known digest; SELECT ... WHERE, not VALUES, so that an unknown one inserts nothing.
COUNT_FOR_DIGEST = """
    INSERT INTO outcomes (digest, outcome, count)
    SELECT digest, ?2, ?3 FROM foreign_layers WHERE digest = ?1
    ON CONFLICT (digest, outcome) DO UPDATE SET count = count + excluded.count
"""

RECORD_UPLOAD = """
    INSERT INTO uploads (repository, digest, expires_at) VALUES (?, ?, ?)
    ON CONFLICT (repository, digest) DO UPDATE SET expires_at = excluded.expires_at
"""

SELECT_CHANGED = """
    SELECT changed.digest, media_type, size, urls, diff_id, reach
    FROM (SELECT DISTINCT digest FROM changes WHERE generation > ?) AS changed
    LEFT JOIN foreign_layers ON foreign_layers.digest = changed.digest
"""


class SqliteStore:
    """A store in one SQLite file, shared safely by several processes on one host.

    All SQLite work runs in worker threads on one connection, serialised by a lock.
    The file and schema are created on first use, so construction never touches the disk.
    """

    def __init__(
        self, path: Path, *, clock: Clock = time.time, busy_timeout: float = 10.0, changes_kept: int = CHANGES_KEPT
    ) -> None:
        self._path = path
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._changes_kept = changes_kept
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    async def learn(
        self, layers: Sequence[ForeignLayer], sighting: Sighting, *, scope: str = EVERYWHERE, candidate: bool = False
    ) -> list[ForeignLayer]:
        layers = tuple(layers)
        now = self._clock()
        teaching = teaching_from(sighting, scope, candidate, now)

        def learn_layers(connection: sqlite3.Connection) -> tuple[list[ForeignLayer], list[str]]:
            new_layers = []
            changed = []
            for layer in layers:
                values: dict[str, object] = {
                    "digest": layer.digest,
                    "source": sighting.source,
                    "repository": sighting.repository,
                    "manifest_digest": sighting.manifest_digest,
                    "now": now,
                }
                row = connection.execute(
                    f"SELECT {LAYER_COLUMNS}, teachings FROM foreign_layers WHERE digest = ?", (layer.digest,)
                ).fetchone()
                if row is None:
                    teachings: tuple[Teaching, ...] = (teaching,)
                    connection.execute(INSERT_LAYER, values | _layer_values(layer, teachings))
                    new_layers.append(layer)
                    changed.append(layer.digest)
                    continue
                connection.execute(REFRESH_SIGHTING, values)
                known, known_teachings = _layer(row), decode_teachings(row[5])
                filled, teachings = with_gaps_filled(known, layer), with_teaching(known_teachings, teaching)
                if (filled, teachings) != (known, known_teachings):
                    connection.execute(UPDATE_LAYER, _layer_values(filled, teachings))
                if (filled, reach_of(teachings)) != (known, reach_of(known_teachings)):
                    changed.append(layer.digest)
            return new_layers, changed

        return await self._write(learn_layers)

    async def known(self) -> dict[str, ForeignLayer]:
        return dict((await self.snapshot()).layers)

    async def snapshot(self) -> KnownSnapshot:
        def select_layers(connection: sqlite3.Connection) -> KnownSnapshot:
            generation = _meta(connection, "generation")
            # Rows straight into the compact set: a million ForeignLayers at once would cost ~300 MiB.
            layers = CompactLayers()
            layers.reserve(*connection.execute("SELECT count(*), count(diff_id) FROM foreign_layers").fetchone())
            layers.add_many(connection.execute(f"SELECT digest, media_type, size, NULL, diff_id {WITHOUT_URLS}"))
            layers.add_many(
                connection.execute(f"SELECT {LAYER_COLUMNS} FROM foreign_layers WHERE urls != ?", (NO_URLS,)), _urls
            )
            reach: dict[str, Reach] = {}
            for digest, scoped in connection.execute("SELECT digest, reach FROM foreign_layers WHERE reach IS NOT NULL"):
                if (scoped_reach := decode_reach(scoped)) is not None:
                    reach[digest] = scoped_reach
            return KnownSnapshot(generation, layers, reach)

        return await self._read(select_layers)

    async def changes(self, since: int) -> KnownChanges | None:
        def select_changes(connection: sqlite3.Connection) -> KnownChanges | None:
            generation = _meta(connection, "generation")
            if since > generation or since < _meta(connection, "history_from"):
                return None
            changed: dict[str, KnownEntry | None] = {}
            for digest, *layer, scoped in connection.execute(SELECT_CHANGED, (since,)):
                changed[digest] = None if layer[0] is None else (_layer([digest, *layer]), decode_reach(scoped))
            return KnownChanges(generation, changed)

        return await self._read(select_changes)

    async def records(self) -> list[ForeignRecord]:
        def select_records(connection: sqlite3.Connection) -> list[ForeignRecord]:
            rows = connection.execute(SELECT_RECORDS)
            return [_record(list(group)) for _, group in itertools.groupby(rows, key=lambda row: row[0])]

        return await self._run(select_records)

    async def forget(self, digests: Iterable[str]) -> list[str]:
        unique_digests = tuple(dict.fromkeys(digests))

        def delete_layers(connection: sqlite3.Connection) -> tuple[list[str], list[str]]:
            removed = [digest for digest in unique_digests if _delete_layer(connection, digest)]
            return removed, removed

        return await self._write(delete_layers)

    async def untaught(self, repository: str, since: float | None = None) -> Untaught:
        # The JSON text of a teaching holds the teacher's name as a JSON string: a cheap filter first.
        pattern = "%" + json.dumps(repository).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"

        def remove_teachings(connection: sqlite3.Connection) -> tuple[Untaught, list[str]]:
            untaught = Untaught([], [])
            changed = []
            rows = connection.execute(
                f"SELECT {LAYER_COLUMNS}, teachings FROM foreign_layers WHERE teachings LIKE ? ESCAPE '\\'",
                (pattern,),
            ).fetchall()
            for row in rows:
                digest, teachings = row[0], decode_teachings(row[5])
                remaining = without_teacher(teachings, repository, since)
                if remaining == teachings:
                    continue
                if not remaining:
                    _delete_layer(connection, digest)
                    untaught.forgotten.append(digest)
                    changed.append(digest)
                    continue
                connection.execute(UPDATE_LAYER, _layer_values(_layer(row), remaining))
                untaught.narrowed.append(digest)
                if reach_of(remaining) != reach_of(teachings):
                    changed.append(digest)
            return untaught, changed

        return await self._write(remove_teachings)

    async def fill_size(self, digest: str, size: int) -> None:
        def update_size(connection: sqlite3.Connection) -> tuple[None, list[str]]:
            updated = connection.execute(
                "UPDATE foreign_layers SET size = ? WHERE digest = ? AND size = 0 AND ? > 0", (size, digest, size)
            ).rowcount
            return None, [digest] if updated else []

        await self._write(update_size)

    async def count(self, digest: str, outcome: str, nbytes: int = 0, repository: str | None = None) -> None:
        await self.record(counted_once(digest, outcome, nbytes, repository))

    async def record(self, tally: Tally) -> None:
        now = self._clock()
        by_repository = [
            (repository, outcome, calls, nbytes)
            for (_, outcome, repository), (calls, nbytes) in tally.counts.items() if repository is not None
        ]  # fmt: skip
        kept_out: dict[str, int] = {}
        by_digest: dict[tuple[str, str], int] = {}
        for (digest, outcome, _), (calls, nbytes) in tally.counts.items():
            kept_out[digest] = kept_out.get(digest, 0) + nbytes
            by_digest[digest, outcome] = by_digest.get((digest, outcome), 0) + calls
        uploads = [(repository, digest, upload_expiry(now, ttl)) for (repository, digest), ttl in tally.uploads.items()]

        def record_tally(connection: sqlite3.Connection) -> None:
            connection.executemany(COUNT_FOR_REPOSITORY, by_repository)
            connection.executemany(
                "UPDATE foreign_layers SET bytes_kept_out = bytes_kept_out + ? WHERE digest = ?",
                [(nbytes, digest) for digest, nbytes in kept_out.items() if nbytes],
            )
            connection.executemany(
                COUNT_FOR_DIGEST, [(digest, outcome, calls) for (digest, outcome), calls in by_digest.items()]
            )
            if uploads:
                connection.execute("DELETE FROM uploads WHERE expires_at <= ?", (now,))
                connection.executemany(RECORD_UPLOAD, uploads)

        await self._transaction(record_tally)

    async def repository_stats(self) -> list[RepositoryStats]:
        def select_stats(connection: sqlite3.Connection) -> list[RepositoryStats]:
            rows = connection.execute(
                """
                SELECT repository, json_group_object(outcome, count), sum(bytes_kept_out)
                FROM repository_outcomes GROUP BY repository
                """
            )
            return by_bytes_kept_out(RepositoryStats(name, json.loads(outcomes), total) for name, outcomes, total in rows)

        return await self._run(select_stats)

    async def restore(self, records: Sequence[ForeignRecord], repositories: Sequence[RepositoryStats]) -> None:
        records, repositories = tuple(records), tuple(repositories)

        def write_records(connection: sqlite3.Connection) -> tuple[None, list[str]]:
            for record in records:
                layer, first, last = record.layer, record.first_sighting, record.last_sighting
                connection.execute("DELETE FROM outcomes WHERE digest = ?", (layer.digest,))
                connection.execute(
                    f"INSERT OR REPLACE INTO foreign_layers ({LAYER_COLUMNS}, {HISTORY_COLUMNS}, bytes_kept_out, "
                    "teachings, reach) VALUES (:digest, :media_type, :size, :urls, :diff_id, :first_source, "
                    ":first_repository, :first_manifest_digest, :first_seen, :last_source, :last_repository, "
                    ":last_manifest_digest, :last_seen, :bytes_kept_out, :teachings, :reach)",
                    _layer_values(layer, record.teachings) | {
                        "first_source": first.source, "first_repository": first.repository,
                        "first_manifest_digest": first.manifest_digest, "first_seen": record.first_seen,
                        "last_source": last.source, "last_repository": last.repository,
                        "last_manifest_digest": last.manifest_digest, "last_seen": record.last_seen,
                        "bytes_kept_out": record.bytes_kept_out,
                    },
                )  # fmt: skip
                connection.executemany(
                    "INSERT INTO outcomes (digest, outcome, count) VALUES (?, ?, ?)",
                    [(layer.digest, outcome, count) for outcome, count in record.outcomes.items()],
                )
            for stats in repositories:
                # The table keeps bytes per outcome; repository_stats() sums them, so the total goes on one row.
                connection.execute("DELETE FROM repository_outcomes WHERE repository = ?", (stats.repository,))
                connection.executemany(
                    "INSERT INTO repository_outcomes (repository, outcome, count, bytes_kept_out) VALUES (?, ?, ?, ?)",
                    [(stats.repository, outcome, count, stats.bytes_kept_out if index == 0 else 0)
                     for index, (outcome, count) in enumerate(stats.outcomes.items())],
                )  # fmt: skip
            return None, [record.layer.digest for record in records]

        await self._write(write_records)

    async def backup(self, target: Path) -> None:
        """A consistent copy of the file through SQLite's online backup API (a plain copy of a file in WAL
        mode misses what is still in the write-ahead log)."""

        def copy(connection: sqlite3.Connection) -> None:
            with contextlib.closing(sqlite3.connect(target)) as destination:
                connection.backup(destination)

        await self._run(copy)

    async def generation(self) -> int:
        return await self._run(lambda connection: _meta(connection, "generation"))

    async def record_upload(self, repository: str, digest: str, ttl_seconds: float) -> None:
        await self.record(uploaded_once(repository, digest, ttl_seconds))

    async def recent_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        return await self._uploads(repository, digests, "SELECT digest FROM uploads", self._run)

    async def claim_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        return await self._uploads(repository, digests, "DELETE FROM uploads", self._transaction, " RETURNING digest")

    async def _uploads(
        self,
        repository: str,
        digests: Iterable[str],
        statement: str,
        run: Callable[[Callable[[sqlite3.Connection], set[str]]], Awaitable[set[str]]],
        returning: str = "",
    ) -> set[str]:
        now = self._clock()
        wanted = json.dumps(list(dict.fromkeys(digests)))

        def select_uploads(connection: sqlite3.Connection) -> set[str]:
            rows = connection.execute(
                f"""
                {statement}
                WHERE repository = ? AND expires_at > ? AND digest IN (SELECT value FROM json_each(?)){returning}
                """,
                (repository, now, wanted),
            )
            return {row[0] for row in rows.fetchall()}

        return await run(select_uploads)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    async def _run(self, operation: Callable[[sqlite3.Connection], Result]) -> Result:
        return await asyncio.to_thread(self._call, operation)

    async def _read(self, operation: Callable[[sqlite3.Connection], Result]) -> Result:
        """`operation` in one read transaction: its queries see one state of the file."""

        def read(connection: sqlite3.Connection) -> Result:
            connection.execute("BEGIN")
            try:
                return operation(connection)
            finally:
                connection.execute("COMMIT")

        return await self._run(read)

    async def _transaction(self, work: Callable[[sqlite3.Connection], Result]) -> Result:
        return await self._run(lambda connection: _in_transaction(connection, work))

    async def _write(self, change: Callable[[sqlite3.Connection], tuple[Result, list[str]]]) -> Result:
        """`change` also tells which digests `snapshot()` answers differently for now: only then the
        generation moves, and the change is recorded for other processes to follow."""

        def change_and_record(connection: sqlite3.Connection) -> Result:
            result, changed = change(connection)
            if changed:
                generation = _meta(connection, "generation") + 1
                connection.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (generation,))
                connection.executemany(
                    "INSERT OR IGNORE INTO changes (generation, digest) VALUES (?, ?)",
                    ((generation, digest) for digest in changed),
                )
                if generation % 1000 == 0 or self._changes_kept < 1000:
                    history_from = max(0, generation - self._changes_kept)
                    connection.execute("DELETE FROM changes WHERE generation <= ?", (history_from,))
                    connection.execute("UPDATE meta SET value = ? WHERE key = 'history_from'", (history_from,))
            return result

        return await self._transaction(change_and_record)

    def _call(self, operation: Callable[[sqlite3.Connection], Result]) -> Result:
        with self._lock, self._backend_errors():
            return operation(self._open_connection())

    def _close(self) -> None:
        with self._lock, self._backend_errors():
            self._closed = True
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()

    def _open_connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"foreign-layer store {self._path} is closed")
        if self._connection is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._connection = self._connect()
            except sqlite3.OperationalError as error:
                if not (_cannot_write(error) and self._path.is_file()):
                    raise
                self._connection = self._connect_read_only(error)
        return self._connection

    def _connect(self, read_only: str | None = None) -> sqlite3.Connection:
        target = self._path if read_only is None else f"{self._path.absolute().as_uri()}?{read_only}"
        connection = sqlite3.connect(
            target, uri=read_only is not None, timeout=self._busy_timeout, isolation_level=None,
            check_same_thread=False,
        )  # fmt: skip
        try:
            if read_only is None:
                self._use_wal(connection)
                self._ensure_schema(connection)
            else:
                self._schema_version(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect_read_only(self, error: sqlite3.OperationalError) -> sqlite3.Connection:
        """A file in a read-only folder (a frozen volume): readable, while every write fails with StoreError.

        mode=ro still sees a writer elsewhere, but needs the WAL index beside the file; without one (and
        no way to create it) only immutable=1 can read the file.
        """
        for read_only in ("mode=ro", "immutable=1"):
            try:
                return self._connect(read_only)
            except sqlite3.OperationalError as failure:
                if not _cannot_write(failure):
                    raise
                error = failure
        raise error

    def _use_wal(self, connection: sqlite3.Connection) -> None:
        # Switching a new file to WAL fails at once with SQLITE_BUSY while another process is
        # switching or creating the schema: the busy timeout does not apply to it, so retry here.
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                connection.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _ensure_schema(self, connection: sqlite3.Connection) -> None:
        if self._schema_version(connection) == SCHEMA_VERSION:
            return

        def create_schema(connection: sqlite3.Connection) -> None:
            # Checked again under the write lock: another process may have created it meanwhile.
            if self._schema_version(connection) == SCHEMA_VERSION:
                return
            for statement in SCHEMA:
                connection.execute(statement)
            columns = {row[1] for row in connection.execute("PRAGMA table_info(foreign_layers)")}
            for name, kind in ADDED_COLUMNS.items():
                if name not in columns:
                    connection.execute(f"ALTER TABLE foreign_layers ADD COLUMN {name} {kind}")
            connection.execute(BACKFILL_TEACHINGS)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

        _in_transaction(connection, create_schema)

    def _schema_version(self, connection: sqlite3.Connection) -> int:
        version = int(connection.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"foreign-layer store {self._path} has schema version {version}; "
                f"this version of the proxy knows only up to {SCHEMA_VERSION}"
            )
        return version

    @contextlib.contextmanager
    def _backend_errors(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"foreign-layer store {self._path}: {exc}") from exc


def _cannot_write(error: sqlite3.OperationalError) -> bool:
    return error.sqlite_errorcode & 0xFF in {sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY}


def _in_transaction(connection: sqlite3.Connection, work: Callable[[sqlite3.Connection], Result]) -> Result:
    # IMMEDIATE takes the write lock up front, so a busy database waits (busy_timeout) instead of
    # failing at the first write after a read.
    connection.execute("BEGIN IMMEDIATE")
    try:
        result = work(connection)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.rollback()
        raise
    return result


def _meta(connection: sqlite3.Connection, key: str) -> int:
    row = connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row is not None else 0


def _delete_layer(connection: sqlite3.Connection, digest: str) -> bool:
    if not connection.execute("DELETE FROM foreign_layers WHERE digest = ?", (digest,)).rowcount:
        return False
    connection.execute("DELETE FROM outcomes WHERE digest = ?", (digest,))
    return True


def _layer_values(layer: ForeignLayer, teachings: Sequence[Teaching]) -> dict[str, object]:
    return {
        "digest": layer.digest,
        "media_type": layer.media_type,
        "size": layer.size,
        "urls": json.dumps(list(layer.urls)),
        "diff_id": layer.diff_id,
        "teachings": encode_teachings(teachings),
        "reach": encode_reach(reach_of(teachings)),
    }


def _urls(text: str) -> tuple[str, ...]:
    if text == NO_URLS:
        return ()
    one = text[2:-2]
    if text.startswith('["') and text.endswith('"]') and '"' not in one and "\\" not in one:
        return (one,)  # the common case, a URL json.dumps left as it is, without a JSON parse per row at a load
    return tuple(json.loads(text))


def _layer(row: Sequence[Any]) -> ForeignLayer:
    digest, media_type, size, urls, diff_id = row[:5]
    return ForeignLayer(digest, media_type, size, _urls(urls), diff_id)


def _record(rows: Sequence[Sequence[Any]]) -> ForeignRecord:
    """One layer's rows of SELECT_RECORDS: the same layer columns, one row per outcome (or one with none)."""
    first = rows[0]
    return ForeignRecord(
        layer=_layer(first),
        first_sighting=Sighting(*first[5:8]),
        last_sighting=Sighting(*first[9:12]),
        first_seen=first[8],
        last_seen=first[12],
        outcomes={row[15]: row[16] for row in rows if row[15] is not None},
        bytes_kept_out=first[13],
        teachings=decode_teachings(first[14]),
    )
