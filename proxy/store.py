"""The set of known foreign-layer digests, shared by the gateway and the CLI: in memory, SQLite or Redis."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from proxy.manifests import ForeignLayer

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
    """A known layer's history. `outcomes` counts count() calls per outcome; `bytes_kept_out` sums their nbytes."""

    layer: ForeignLayer
    first_sighting: Sighting
    last_sighting: Sighting
    first_seen: float
    last_seen: float
    outcomes: Mapping[str, int]
    bytes_kept_out: int


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


class StoreError(Exception):
    """The store's backend failed; the message names the backend (the SQLite file, the Redis URL without password)."""


class ForeignStore(Protocol):
    async def learn(self, layers: Sequence[ForeignLayer], sighting: Sighting) -> list[ForeignLayer]:
        """Insert or refresh; returns the layers that were not known before.

        A refresh moves last_seen/last_sighting, keeps the first_* fields and fills a missing diff_id or urls.
        """

    async def known(self) -> dict[str, ForeignLayer]:
        """Every known layer, by digest."""

    async def records(self) -> list[ForeignRecord]:
        """Every known layer with its history, sorted by digest."""

    async def forget(self, digests: Iterable[str]) -> list[str]:
        """Remove the digests; returns those that were known."""

    async def count(self, digest: str, outcome: str, nbytes: int = 0, repository: str | None = None) -> None:
        """Record one outcome for a known digest (an unknown one is not recorded) and for `repository`, if given.

        The repository's totals count every digest, known or not, and outlive `forget`.
        """

    async def repository_stats(self) -> list[RepositoryStats]:
        """Every repository that was counted, by bytes kept out (most first), then by name."""

    async def generation(self) -> int:
        """Cheap; differs after any change to what `known()` answers, committed by any process sharing the store.

        Counts, refreshed sightings and upload records do not move it, so that following it costs a reload
        of `known()` only when the set of layers really changed. A Redis store that lost its records (a
        failover to an empty server) answers lower than it ever did before the loss (a replaced SQLite
        file starts again from 0).
        """

    async def restore(self, records: Sequence[ForeignRecord], repositories: Sequence[RepositoryStats]) -> None:
        """Write records and repository counts as given (an export of another store), replacing any of the same
        digest or repository; other records stay."""

    async def record_upload(self, repository: str, digest: str, ttl_seconds: float) -> None:
        """Remember for `ttl_seconds` (> 0, else ValueError) that `digest` was uploaded to `repository`."""

    async def recent_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        """Those of `digests` recorded for `repository` whose time has not run out."""

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


def by_bytes_kept_out(stats: Iterable[RepositoryStats]) -> list[RepositoryStats]:
    return sorted(stats, key=lambda repository: (-repository.bytes_kept_out, repository.repository))


def with_gaps_filled(known: ForeignLayer, later: ForeignLayer) -> ForeignLayer:
    return replace(
        known,
        urls=known.urls or later.urls,
        diff_id=later.diff_id if known.diff_id is None else known.diff_id,
    )


class MemoryStore:
    """One process's store, for tests and single-process use."""

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._records: dict[str, ForeignRecord] = {}
        self._uploads: dict[tuple[str, str], float] = {}
        self._repositories: dict[str, RepositoryStats] = {}
        self._generation = 0
        self._closed = False

    async def learn(self, layers: Sequence[ForeignLayer], sighting: Sighting) -> list[ForeignLayer]:
        self._check_open()
        now = self._clock()
        new_layers = []
        moved = False
        for layer in layers:
            record = self._records.get(layer.digest)
            if record is None:
                self._records[layer.digest] = ForeignRecord(layer, sighting, sighting, now, now, {}, 0)
                new_layers.append(layer)
                moved = True
            else:
                filled = with_gaps_filled(record.layer, layer)
                moved = moved or filled != record.layer
                self._records[layer.digest] = replace(record, layer=filled, last_sighting=sighting, last_seen=now)
        if moved:
            self._generation += 1
        return new_layers

    async def known(self) -> dict[str, ForeignLayer]:
        self._check_open()
        return {digest: record.layer for digest, record in self._records.items()}

    async def records(self) -> list[ForeignRecord]:
        self._check_open()
        # Copies, so a caller cannot reach into the store through `outcomes`.
        return [replace(record, outcomes=dict(record.outcomes)) for _, record in sorted(self._records.items())]

    async def forget(self, digests: Iterable[str]) -> list[str]:
        self._check_open()
        removed = [digest for digest in dict.fromkeys(digests) if self._records.pop(digest, None)]
        if removed:
            self._generation += 1
        return removed

    async def count(self, digest: str, outcome: str, nbytes: int = 0, repository: str | None = None) -> None:
        self._check_open()
        if (record := self._records.get(digest)) is not None:
            self._records[digest] = _counted(record, outcome, nbytes)
        if repository is not None:
            stats = self._repositories.get(repository, RepositoryStats(repository, {}, 0))
            self._repositories[repository] = _counted(stats, outcome, nbytes)

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
        self._check_open()
        now = self._clock()
        expires_at = upload_expiry(now, ttl_seconds)
        self._uploads = {key: expiry for key, expiry in self._uploads.items() if expiry > now}
        self._uploads[repository, digest] = expires_at

    async def recent_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        self._check_open()
        now = self._clock()
        return {digest for digest in digests if self._uploads.get((repository, digest), now) > now}

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("memory store is closed")


Counted = TypeVar("Counted", ForeignRecord, RepositoryStats)


def _counted(counted: Counted, outcome: str, nbytes: int) -> Counted:
    outcomes = {**counted.outcomes, outcome: counted.outcomes.get(outcome, 0) + 1}
    return replace(counted, outcomes=outcomes, bytes_kept_out=counted.bytes_kept_out + nbytes)


SCHEMA_VERSION = 3

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
        bytes_kept_out INTEGER NOT NULL DEFAULT 0
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
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

NO_URLS = json.dumps([])

REFRESH_SIGHTING = """
    UPDATE foreign_layers SET
        last_source = :source,
        last_repository = :repository,
        last_manifest_digest = :manifest_digest,
        last_seen = :now
    WHERE digest = :digest
"""

FILL_GAPS = f"""
    UPDATE foreign_layers SET
        urls = CASE WHEN urls = '{NO_URLS}' THEN :urls ELSE urls END,
        diff_id = coalesce(diff_id, :diff_id)
    WHERE digest = :digest
        AND ((urls = '{NO_URLS}' AND :urls != '{NO_URLS}') OR (diff_id IS NULL AND :diff_id IS NOT NULL))
"""

BUMP_GENERATION = "UPDATE meta SET value = value + 1 WHERE key = 'generation'"

INSERT_LAYER = """
    INSERT INTO foreign_layers (
        digest, media_type, size, urls, diff_id,
        first_source, first_repository, first_manifest_digest, first_seen,
        last_source, last_repository, last_manifest_digest, last_seen
    ) VALUES (
        :digest, :media_type, :size, :urls, :diff_id,
        :source, :repository, :manifest_digest, :now,
        :source, :repository, :manifest_digest, :now
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
        bytes_kept_out, outcome, count
    FROM foreign_layers LEFT JOIN outcomes USING (digest)
    ORDER BY digest
"""


class SqliteStore:
    """A store in one SQLite file, shared safely by several processes on one host.

    All SQLite work runs in worker threads on one connection, serialised by a lock.
    The file and schema are created on first use, so construction never touches the disk.
    """

    def __init__(self, path: Path, *, clock: Clock = time.time, busy_timeout: float = 10.0) -> None:
        self._path = path
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    async def learn(self, layers: Sequence[ForeignLayer], sighting: Sighting) -> list[ForeignLayer]:
        layers = tuple(layers)
        now = self._clock()

        def learn_layers(connection: sqlite3.Connection) -> tuple[list[ForeignLayer], bool]:
            new_layers = []
            filled = False
            for layer in layers:
                values = {
                    "digest": layer.digest,
                    "media_type": layer.media_type,
                    "size": layer.size,
                    "urls": json.dumps(list(layer.urls)),
                    "diff_id": layer.diff_id,
                    "source": sighting.source,
                    "repository": sighting.repository,
                    "manifest_digest": sighting.manifest_digest,
                    "now": now,
                }
                if connection.execute(REFRESH_SIGHTING, values).rowcount:
                    filled = connection.execute(FILL_GAPS, values).rowcount > 0 or filled
                else:
                    connection.execute(INSERT_LAYER, values)
                    new_layers.append(layer)
            return new_layers, bool(new_layers) or filled

        return await self._write(learn_layers)

    async def known(self) -> dict[str, ForeignLayer]:
        def select_layers(connection: sqlite3.Connection) -> dict[str, ForeignLayer]:
            rows = connection.execute(f"SELECT {LAYER_COLUMNS} FROM foreign_layers")
            return {row[0]: _layer(row) for row in rows}

        return await self._run(select_layers)

    async def records(self) -> list[ForeignRecord]:
        def select_records(connection: sqlite3.Connection) -> list[ForeignRecord]:
            rows = connection.execute(SELECT_RECORDS)
            return [_record(list(group)) for _, group in itertools.groupby(rows, key=lambda row: row[0])]

        return await self._run(select_records)

    async def forget(self, digests: Iterable[str]) -> list[str]:
        unique_digests = tuple(dict.fromkeys(digests))

        def delete_layers(connection: sqlite3.Connection) -> tuple[list[str], bool]:
            removed = []
            for digest in unique_digests:
                if connection.execute("DELETE FROM foreign_layers WHERE digest = ?", (digest,)).rowcount:
                    connection.execute("DELETE FROM outcomes WHERE digest = ?", (digest,))
                    removed.append(digest)
            return removed, bool(removed)

        return await self._write(delete_layers)

    async def count(self, digest: str, outcome: str, nbytes: int = 0, repository: str | None = None) -> None:
        def count_outcome(connection: sqlite3.Connection) -> None:
            if repository is not None:
                connection.execute(
                    """
                    INSERT INTO repository_outcomes (repository, outcome, count, bytes_kept_out) VALUES (?, ?, 1, ?)
                    ON CONFLICT (repository, outcome) DO UPDATE SET
                        count = count + 1, bytes_kept_out = bytes_kept_out + excluded.bytes_kept_out
                    """,
                    (repository, outcome, nbytes),
                )
            known = connection.execute(
                "UPDATE foreign_layers SET bytes_kept_out = bytes_kept_out + ? WHERE digest = ?",
                (nbytes, digest),
            ).rowcount
            if known:
                connection.execute(
                    """
                    INSERT INTO outcomes (digest, outcome, count) VALUES (?, ?, 1)
                    ON CONFLICT (digest, outcome) DO UPDATE SET count = count + 1
                    """,
                    (digest, outcome),
                )

        await self._transaction(count_outcome)

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

        def write_records(connection: sqlite3.Connection) -> tuple[None, bool]:
            for record in records:
                layer, first, last = record.layer, record.first_sighting, record.last_sighting
                connection.execute("DELETE FROM outcomes WHERE digest = ?", (layer.digest,))
                connection.execute(
                    f"INSERT OR REPLACE INTO foreign_layers ({LAYER_COLUMNS}, {HISTORY_COLUMNS}, bytes_kept_out) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (layer.digest, layer.media_type, layer.size, json.dumps(list(layer.urls)), layer.diff_id,
                     first.source, first.repository, first.manifest_digest, record.first_seen,
                     last.source, last.repository, last.manifest_digest, record.last_seen, record.bytes_kept_out),
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
            return None, bool(records)

        await self._write(write_records)

    async def backup(self, target: Path) -> None:
        """A consistent copy of the file through SQLite's online backup API (a plain copy of a file in WAL
        mode misses what is still in the write-ahead log)."""

        def copy(connection: sqlite3.Connection) -> None:
            with contextlib.closing(sqlite3.connect(target)) as destination:
                connection.backup(destination)

        await self._run(copy)

    async def generation(self) -> int:
        def select_generation(connection: sqlite3.Connection) -> int:
            row = connection.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            return int(row[0])

        return await self._run(select_generation)

    async def record_upload(self, repository: str, digest: str, ttl_seconds: float) -> None:
        now = self._clock()
        expires_at = upload_expiry(now, ttl_seconds)

        def upsert_upload(connection: sqlite3.Connection) -> None:
            connection.execute("DELETE FROM uploads WHERE expires_at <= ?", (now,))
            connection.execute(
                """
                INSERT INTO uploads (repository, digest, expires_at) VALUES (?, ?, ?)
                ON CONFLICT (repository, digest) DO UPDATE SET expires_at = excluded.expires_at
                """,
                (repository, digest, expires_at),
            )

        await self._transaction(upsert_upload)

    async def recent_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        now = self._clock()
        wanted = json.dumps(list(dict.fromkeys(digests)))

        def select_uploads(connection: sqlite3.Connection) -> set[str]:
            rows = connection.execute(
                """
                SELECT digest FROM uploads
                WHERE repository = ? AND expires_at > ? AND digest IN (SELECT value FROM json_each(?))
                """,
                (repository, now, wanted),
            )
            return {row[0] for row in rows}

        return await self._run(select_uploads)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    async def _run(self, operation: Callable[[sqlite3.Connection], Result]) -> Result:
        return await asyncio.to_thread(self._call, operation)

    async def _transaction(self, work: Callable[[sqlite3.Connection], Result]) -> Result:
        return await self._run(lambda connection: _in_transaction(connection, work))

    async def _write(self, change: Callable[[sqlite3.Connection], tuple[Result, bool]]) -> Result:
        """`change` also tells whether `known()` answers differently now: only then the generation moves."""

        def change_and_bump_generation(connection: sqlite3.Connection) -> Result:
            result, moved = change(connection)
            if moved:
                connection.execute(BUMP_GENERATION)
            return result

        return await self._transaction(change_and_bump_generation)

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


def _layer(row: Sequence[Any]) -> ForeignLayer:
    digest, media_type, size, urls, diff_id = row[:5]
    return ForeignLayer(digest, media_type, size, tuple(json.loads(urls)), diff_id)


def _record(rows: Sequence[Sequence[Any]]) -> ForeignRecord:
    """One layer's rows of SELECT_RECORDS: the same layer columns, one row per outcome (or one with none)."""
    first = rows[0]
    return ForeignRecord(
        layer=_layer(first),
        first_sighting=Sighting(*first[5:8]),
        last_sighting=Sighting(*first[9:12]),
        first_seen=first[8],
        last_seen=first[12],
        outcomes={row[14]: row[15] for row in rows if row[14] is not None},
        bytes_kept_out=first[13],
    )
