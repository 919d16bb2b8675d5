"""The store in Redis, shared by gateway replicas on many hosts.

Keys (all under PREFIX, in the URL's database):
    layers            HASH digest -> JSON [media_type, size, urls, diff_id, reach]  (all that `snapshot()` reads)
    history           HASH digest -> JSON [first source, repository, manifest, first_seen, last ..., last_seen]
    teachings         HASH digest -> JSON list of teachings (proxy.trust)
    changes           ZSET digest scored by the generation of its last change to `layers`
    history-from      INT, the generation after which `changes` is complete (older entries are trimmed)
    bytes-kept-out    HASH digest -> int
    outcomes:DIGEST   HASH outcome -> count
    repository-bytes-kept-out      HASH repository -> int (every repository counted, even with 0 bytes)
    repository-outcomes:REPOSITORY HASH outcome -> count
    generation        INT, moved in the transaction of every change to `layers`; see generation_base()
    upload:REPO@DIGEST  "1" with a TTL (leak detection)
Every change to `layers` is also PUBLISHed on CHANNEL, so a subscriber may react before its next generation poll.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError
from redis.typing import EncodableT

from proxy.compact import CompactLayers
from proxy.manifests import ForeignLayer
from proxy.store import (
    NO_TLS,
    Clock,
    ForeignRecord,
    KnownChanges,
    KnownEntry,
    KnownSnapshot,
    RepositoryStats,
    Sighting,
    StoreError,
    Tally,
    TlsFiles,
    Untaught,
    by_bytes_kept_out,
    counted_once,
    teaching_from,
    upload_expiry,
    uploaded_once,
    with_gaps_filled,
    without_password,
    without_teacher,
)
from proxy.trust import (
    EVERYWHERE,
    Reach,
    Teaching,
    decode_teachings,
    encode_teachings,
    reach_of,
    with_teaching,
)

PREFIX = "foreign-layer-proxy:"
LAYERS = PREFIX + "layers"
HISTORY = PREFIX + "history"
TEACHINGS = PREFIX + "teachings"
CHANGES = PREFIX + "changes"
HISTORY_FROM = PREFIX + "history-from"
CHANGES_KEPT = 100_000
BYTES_KEPT_OUT = PREFIX + "bytes-kept-out"
REPOSITORY_BYTES_KEPT_OUT = PREFIX + "repository-bytes-kept-out"
GENERATION = PREFIX + "generation"
CHANNEL = PREFIX + "changes"
DEFAULT_PORT = 6379
DEFAULT_TIMEOUT = 2.0
KNOWN_SLICE = 5000
LEARN_SLICE = 1000
COUNT_SLICE = 1000  # counts per script call: a big tally does not block Redis for long at a time

# KEYS: layers, bytes-kept-out, repository-bytes-kept-out, then per count outcomes:DIGEST and
# repository-outcomes:REPOSITORY (outcomes:DIGEST again, unused, when counted for no repository).
# ARGV: per count digest, outcome, calls, nbytes, repository ('' for none), 1 if for the repository else 0.
COUNT_SCRIPT = """
for i = 0, #ARGV / 6 - 1 do
    local digest, outcome, calls, nbytes, repository, for_repository = unpack(ARGV, 6 * i + 1, 6 * i + 6)
    if for_repository == '1' then
        redis.call('HINCRBY', KEYS[5 + 2 * i], outcome, calls)
        redis.call('HINCRBY', KEYS[3], repository, nbytes)
    end
    if redis.call('HEXISTS', KEYS[1], digest) == 1 then
        redis.call('HINCRBY', KEYS[4 + 2 * i], outcome, calls)
        redis.call('HINCRBY', KEYS[2], digest, nbytes)
    end
end
"""

# KEYS: layers, history, bytes-kept-out, generation, teachings, changes, history-from, then outcomes:DIGEST per digest.
# ARGV: channel, generation base, then the digests.
FORGET_SCRIPT = """
local removed = {}
for i = 3, #ARGV do
    if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
        redis.call('HDEL', KEYS[2], ARGV[i])
        redis.call('HDEL', KEYS[3], ARGV[i])
        redis.call('HDEL', KEYS[5], ARGV[i])
        redis.call('DEL', KEYS[i + 5])
        removed[#removed + 1] = ARGV[i]
    end
end
if #removed > 0 then
    redis.call('SET', KEYS[7], ARGV[2], 'NX')
    redis.call('SET', KEYS[4], ARGV[2], 'NX')
    local generation = redis.call('INCR', KEYS[4])
    for _, digest in ipairs(removed) do
        redis.call('ZADD', KEYS[6], generation, digest)
    end
    redis.call('PUBLISH', ARGV[1], 'forget')
end
return removed
"""

# KEYS: changes, history-from. ARGV: how many changes to keep.
TRIM_SCRIPT = """
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local last = redis.call('ZRANGE', KEYS[1], excess - 1, excess - 1, 'WITHSCORES')
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
redis.call('SET', KEYS[2], last[2])
return excess
"""

# KEYS: layers. ARGV: cursor, count. One slice of HSCAN as two strings, the digests one per line and
# the values joined into the body of a JSON array: a million entries are then parsed as a few hundred
# replies and JSON documents, not two million of each.
SNAPSHOT_SLICE_SCRIPT = """
local reply = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local items, digests, values = reply[2], {}, {}
for i = 1, #items, 2 do
    digests[#digests + 1] = items[i]
    values[#values + 1] = items[i + 1]
end
return {reply[1], table.concat(digests, '\\n'), table.concat(values, ',')}
"""

# KEYS: upload keys. Deleting is claiming: of replicas claiming one upload at once, one gets it.
CLAIM_SCRIPT = """
local claimed = {}
for i = 1, #KEYS do claimed[i] = redis.call('DEL', KEYS[i]) end
return claimed
"""


@dataclass(frozen=True, slots=True)
class RedisLocation:
    """A parsed redis:// or rediss:// URL. `shown` is the URL without credentials, for messages and logs."""

    host: str
    port: int
    db: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def shown(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisLocation:
    """ValueError for a malformed URL, naming it without its password."""
    shown = without_password(url)
    if any(character.isspace() or not character.isprintable() for character in url):
        # urlsplit would silently drop some of them.
        raise ValueError(f"malformed store URL {shown!r}: spaces and control characters are not allowed")
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORT
    except ValueError as error:
        raise ValueError(f"malformed store URL {shown!r}: {error}") from None
    if parts.query or parts.fragment or "#" in url:
        raise ValueError(f"malformed store URL {shown!r}: query strings and fragments are not supported")
    if not parts.hostname:
        raise ValueError(f"malformed store URL {shown!r}: expected redis://[:PASSWORD@]HOST[:PORT][/DB]")
    db = parts.path.removeprefix("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"malformed store URL {shown!r}: the path must be a database number, like /0")
    return RedisLocation(
        host=parts.hostname,
        port=port,
        db=int(db or 0),
        tls=parts.scheme.lower() == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


@dataclass(frozen=True, slots=True)
class _History:
    first_sighting: Sighting
    first_seen: float
    last_sighting: Sighting
    last_seen: float


def _encode_layer(layer: ForeignLayer, reach: Reach | None) -> str:
    scoped = None if reach is None else [sorted(reach.enforced), sorted(reach.candidate)]
    return json.dumps([layer.media_type, layer.size, list(layer.urls), layer.diff_id, scoped], separators=(",", ":"))


def _decode_entry(digest: str, text: str) -> KnownEntry:
    media_type, size, urls, diff_id, *scoped = json.loads(text)
    return ForeignLayer(digest, media_type, size, tuple(urls) if urls else (), diff_id), _reach(scoped)


def _reach(scoped: list[Any]) -> Reach | None:
    """The fifth field of a `layers` value; absent (written before teachings were recorded) or null: everywhere."""
    return Reach(frozenset(scoped[0][0]), frozenset(scoped[0][1])) if scoped and scoped[0] is not None else None


def _read_slice(layers: CompactLayers, reach: dict[str, Reach], digests: str, values: str) -> None:
    """One reply of SNAPSHOT_SLICE_SCRIPT into `layers` and `reach`."""
    decoded = json.loads(f"[{values}]")
    names = digests.split("\n") if digests else []
    layers.add_many((digest, *value[:4]) for digest, value in zip(names, decoded, strict=True))
    if "[[" in values:  # a reach is a list of lists (else only a url could hold "[[")
        for digest, (_, _, _, _, *scoped) in zip(names, decoded, strict=True):
            if (scoped_reach := _reach(scoped)) is not None:
                reach[digest] = scoped_reach


def _decode_layer(digest: str, text: str) -> ForeignLayer:
    return _decode_entry(digest, text)[0]


def _encode_history(history: _History) -> str:
    first, last = history.first_sighting, history.last_sighting
    return json.dumps(
        [first.source, first.repository, first.manifest_digest, history.first_seen,
         last.source, last.repository, last.manifest_digest, history.last_seen],
        separators=(",", ":"),
    )  # fmt: skip


def _decode_history(text: str) -> _History:
    values = json.loads(text)
    return _History(Sighting(*values[0:3]), values[3], Sighting(*values[4:7]), values[7])


def _first_teaching(history: _History) -> Teaching:
    first = history.first_sighting
    return Teaching(first.repository, first.source, first.manifest_digest, EVERYWHERE, False, history.first_seen)


LayerChange = Callable[[ForeignLayer, tuple[Teaching, ...]], tuple[ForeignLayer, tuple[Teaching, ...]]]


def _with_teachings(teachings: tuple[Teaching, ...]) -> LayerChange:
    return lambda layer, _: (layer, teachings)


def generation_base() -> int:
    """Where the generation of an empty database starts: lower for a database first written later.

    So a Redis that lost everything (a failover to an empty server) answers lower generations than
    before the loss, whoever writes to it first: what KnownForeign takes for "the store was reset".
    Microseconds, so a database would need a million changes a second to overtake a younger one.
    """
    return 2**52 - time.time_ns() // 1000


def _outcomes_key(digest: str) -> str:
    return f"{PREFIX}outcomes:{digest}"


def _repository_outcomes_key(repository: str) -> str:
    return f"{PREFIX}repository-outcomes:{repository}"


def _decode_counts(counts: dict[str, str]) -> dict[str, int]:
    return {outcome: int(count) for outcome, count in counts.items()}


def _encoded_counts(counts: Mapping[str, int]) -> dict[EncodableT, EncodableT]:
    return {outcome: count for outcome, count in counts.items()}


def _upload_key(repository: str, digest: str) -> str:
    return f"{PREFIX}upload:{repository}@{digest}"


class RedisStore:
    """A store in one Redis database, shared by every process that names it.

    Nothing connects until first use; a lost connection is re-opened by the next call, so calls fail
    with StoreError while Redis is away and work again once it is back.
    """

    def __init__(
        self,
        location: RedisLocation,
        *,
        clock: Clock = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        changes_kept: int = CHANGES_KEPT,
        tls: TlsFiles = NO_TLS,
    ) -> None:
        self._location = location
        self._clock = clock
        self._closed = False
        self._client = redis.Redis(
            host=location.host,
            port=location.port,
            db=location.db,
            username=location.username,
            password=location.password,
            ssl=location.tls,
            ssl_ca_certs=str(tls.ca_file) if tls.ca_file else None,
            ssl_certfile=str(tls.cert_file) if tls.cert_file else None,
            ssl_keyfile=str(tls.key_file) if tls.key_file else None,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One quick retry re-opens a pooled connection that died with a Redis restart; more would
            # only delay noticing an outage.
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
            client_name="foreign-layer-proxy",
        )
        self._count_script = self._client.register_script(COUNT_SCRIPT)
        self._forget_script = self._client.register_script(FORGET_SCRIPT)
        self._trim_script = self._client.register_script(TRIM_SCRIPT)
        self._claim_script = self._client.register_script(CLAIM_SCRIPT)
        self._snapshot_slice = self._client.register_script(SNAPSHOT_SLICE_SCRIPT)
        self._changes_kept = changes_kept

    @property
    def location(self) -> RedisLocation:
        return self._location

    async def learn(
        self, layers: Sequence[ForeignLayer], sighting: Sighting, *, scope: str = EVERYWHERE, candidate: bool = False
    ) -> list[ForeignLayer]:
        # A transaction per slice: replicas refilling a Redis that came back empty all learn everything
        # at once, and smaller transactions collide (WATCH) less and redo less when they do.
        layers = tuple(layers)
        new_layers = []
        teaching = teaching_from(sighting, scope, candidate, self._clock())
        with self._backend_errors():
            async with self._client.pipeline(transaction=True) as pipe:
                for start in range(0, len(layers), LEARN_SLICE):
                    while True:
                        try:
                            new_layers += await self._learn(pipe, layers[start : start + LEARN_SLICE], sighting, teaching)
                            break
                        except WatchError:
                            continue
        return new_layers

    async def _learn(
        self, pipe: Pipeline, layers: tuple[ForeignLayer, ...], sighting: Sighting, teaching: Teaching
    ) -> list[ForeignLayer]:
        digests = list(dict.fromkeys(layer.digest for layer in layers))
        await pipe.watch(LAYERS, HISTORY, TEACHINGS, GENERATION)
        stored_layers = cast(list[str | None], await pipe.hmget(LAYERS, digests))
        stored_history = cast(list[str | None], await pipe.hmget(HISTORY, digests))
        stored_teachings = cast(list[str | None], await pipe.hmget(TEACHINGS, digests))
        before = dict(zip(digests, stored_layers, strict=True))
        current = {
            digest: (_decode_layer(digest, layer), _decode_history(history), decode_teachings(teachings))
            for digest, layer, history, teachings in zip(digests, stored_layers, stored_history, stored_teachings, strict=True)
            if layer is not None and history is not None
        }  # fmt: skip
        if any(not entry[2] for entry in current.values()):
            # Layers written before teachings were recorded: taught everywhere by their first sighting.
            current = {digest: (known, history, teachings or (_first_teaching(history),))
                       for digest, (known, history, teachings) in current.items()}  # fmt: skip
        now = teaching.taught_at
        new_layers = []
        for layer in layers:
            if (entry := current.get(layer.digest)) is None:
                current[layer.digest] = (layer, _History(sighting, now, sighting, now), (teaching,))
                new_layers.append(layer)
            else:
                known, history, teachings = entry
                current[layer.digest] = (
                    with_gaps_filled(known, layer),
                    replace(history, last_sighting=sighting, last_seen=now),
                    with_teaching(teachings, teaching),
                )
        encoded = {digest: _encode_layer(current[digest][0], reach_of(current[digest][2])) for digest in digests}
        changed = [digest for digest in digests if encoded[digest] != before[digest]]
        generation = cast(str | None, await pipe.get(GENERATION))
        pipe.multi()  # type: ignore[no-untyped-call]
        pipe.hset(LAYERS, mapping=cast(dict[EncodableT, EncodableT], encoded))
        pipe.hset(HISTORY, mapping={digest: _encode_history(current[digest][1]) for digest in digests})
        pipe.hset(TEACHINGS, mapping={digest: encode_teachings(current[digest][2]) for digest in digests})
        if changed:
            self._record_changes(pipe, generation, changed)
        await pipe.execute()
        if changed:
            await self._trim_script(keys=[CHANGES, HISTORY_FROM], args=[self._changes_kept])
        return new_layers

    def _record_changes(self, pipe: Pipeline, generation: str | None, changed: Sequence[str]) -> None:
        """In a MULTI whose WATCH covers GENERATION: the next generation, and the digests it changed."""
        if generation is None:
            base = generation_base()
            pipe.set(HISTORY_FROM, base, nx=True)
            next_generation = base + 1
        else:
            next_generation = int(generation) + 1
        pipe.set(GENERATION, next_generation)
        pipe.zadd(CHANGES, dict.fromkeys(changed, next_generation))
        pipe.publish(CHANNEL, "learn")

    async def known(self) -> dict[str, ForeignLayer]:
        return dict((await self.snapshot()).layers)

    async def snapshot(self) -> KnownSnapshot:
        # In slices rather than one HGETALL: decoding 100k entries at once stalls the event loop (so
        # every request of the gateway) for ~0.35 s. Each slice is decoded in a thread while Redis
        # reads the next one: a load takes the longer of the two, not their sum, and the event loop
        # keeps serving. Not a snapshot, but a change made meanwhile moves the generation (read
        # first), so the caller's next poll reads it again.
        layers = CompactLayers()  # row by row: a million ForeignLayers at once would cost ~300 MiB
        reach: dict[str, Reach] = {}
        with self._backend_errors():
            generation = int(cast(str | None, await self._client.get(GENERATION)) or 0)
            layers.reserve(int(await self._client.hlen(LAYERS)))
            cursor, digests, values = await self._snapshot_slice(keys=[LAYERS], args=["0", KNOWN_SLICE])
            while True:
                following = None
                if cursor != "0":
                    following = asyncio.ensure_future(self._snapshot_slice(keys=[LAYERS], args=[cursor, KNOWN_SLICE]))
                try:
                    await asyncio.to_thread(_read_slice, layers, reach, digests, values)
                except BaseException:
                    if following is not None:
                        following.cancel()
                    raise
                if following is None:
                    return KnownSnapshot(generation, layers, reach)
                cursor, digests, values = await following

    async def changes(self, since: int) -> KnownChanges | None:
        with self._backend_errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.get(GENERATION)
                pipe.get(HISTORY_FROM)
                pipe.zrangebyscore(CHANGES, f"({since}", "+inf")
                generation_text, history_from, digests = await pipe.execute()
            generation = int(generation_text or 0)
            if since > generation or history_from is None or since < int(history_from):
                return None
            if not digests:
                return KnownChanges(generation, {})
            stored = cast(list[str | None], await self._client.hmget(LAYERS, digests))
            return KnownChanges(
                generation,
                {digest: None if text is None else _decode_entry(digest, text) for digest, text in zip(digests, stored, strict=True)},
            )  # fmt: skip

    async def records(self) -> list[ForeignRecord]:
        with self._backend_errors():
            async with self._client.pipeline(transaction=True) as pipe:
                for key in (LAYERS, HISTORY, BYTES_KEPT_OUT):
                    pipe.hgetall(key)
                layers, histories, kept_out = cast(list[dict[str, str]], await pipe.execute())
            digests = sorted(digest for digest in layers if digest in histories)
            async with self._client.pipeline(transaction=False) as pipe:
                for digest in digests:
                    pipe.hgetall(_outcomes_key(digest))
                outcomes = cast(list[dict[str, str]], await pipe.execute())
            taught = cast(dict[str, str], await self._client.hgetall(TEACHINGS))
            records = []
            for digest, counts in zip(digests, outcomes, strict=True):
                history = _decode_history(histories[digest])
                records.append(
                    ForeignRecord(
                        layer=_decode_layer(digest, layers[digest]),
                        first_sighting=history.first_sighting,
                        last_sighting=history.last_sighting,
                        first_seen=history.first_seen,
                        last_seen=history.last_seen,
                        outcomes=_decode_counts(counts),
                        bytes_kept_out=int(kept_out.get(digest, 0)),
                        teachings=decode_teachings(taught.get(digest)) or (_first_teaching(history),),
                    )
                )
            return records

    async def forget(self, digests: Iterable[str]) -> list[str]:
        unique_digests = list(dict.fromkeys(digests))
        with self._backend_errors():
            if not unique_digests:
                return []
            removed: list[str] = await self._forget_script(
                keys=[LAYERS, HISTORY, BYTES_KEPT_OUT, GENERATION, TEACHINGS, CHANGES, HISTORY_FROM,
                      *map(_outcomes_key, unique_digests)],
                args=[CHANNEL, generation_base(), *unique_digests],
            )  # fmt: skip
            if removed:
                await self._trim_script(keys=[CHANGES, HISTORY_FROM], args=[self._changes_kept])
            return removed

    async def untaught(self, repository: str, since: float | None = None) -> Untaught:
        untaught = Untaught([], [])
        with self._backend_errors():
            teachings: dict[str, tuple[Teaching, ...]] = {}
            async for digest, text in self._client.hscan_iter(TEACHINGS, match=None, count=KNOWN_SLICE):
                if repository in text:
                    teachings[digest] = decode_teachings(text)
            forgotten = []
            for digest, taught in teachings.items():
                remaining = without_teacher(taught, repository, since)
                if remaining == taught:
                    continue
                if not remaining:
                    forgotten.append(digest)
                elif await self._update(digest, _with_teachings(remaining)):
                    untaught.narrowed.append(digest)
            untaught.forgotten.extend(await self.forget(forgotten))
        return untaught

    async def fill_size(self, digest: str, size: int) -> None:
        with self._backend_errors():
            await self._update(digest, lambda layer, teachings: (replace(layer, size=layer.size or size), teachings))

    async def _update(
        self,
        digest: str,
        change: LayerChange,
    ) -> bool:
        """Apply `change` to a known digest's layer and teachings; False when it is not known."""
        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(LAYERS, TEACHINGS, GENERATION)
                    text = cast(str | None, await pipe.hget(LAYERS, digest))
                    if text is None:
                        return False
                    teachings = decode_teachings(cast(str | None, await pipe.hget(TEACHINGS, digest)))
                    layer, changed_teachings = change(_decode_layer(digest, text), teachings)
                    encoded = _encode_layer(layer, reach_of(changed_teachings))
                    generation = cast(str | None, await pipe.get(GENERATION))
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(LAYERS, digest, encoded)
                    pipe.hset(TEACHINGS, digest, encode_teachings(changed_teachings))
                    if encoded != text:
                        self._record_changes(pipe, generation, [digest])
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    async def count(self, digest: str, outcome: str, nbytes: int = 0, repository: str | None = None) -> None:
        await self.record(counted_once(digest, outcome, nbytes, repository))

    async def record(self, tally: Tally) -> None:
        counts = list(tally.counts.items())
        with self._backend_errors():
            async with self._client.pipeline(transaction=True) as pipe:
                for start in range(0, len(counts), COUNT_SLICE):
                    keys: list[str] = [LAYERS, BYTES_KEPT_OUT, REPOSITORY_BYTES_KEPT_OUT]
                    args: list[EncodableT] = []
                    for (digest, outcome, repository), (calls, nbytes) in counts[start : start + COUNT_SLICE]:
                        outcomes = _outcomes_key(digest)
                        keys += [outcomes, outcomes if repository is None else _repository_outcomes_key(repository)]
                        args += [digest, outcome, calls, nbytes, repository or "", int(repository is not None)]
                    await self._count_script(keys=keys, args=args, client=pipe)
                for (repository, digest), ttl_seconds in tally.uploads.items():
                    milliseconds = max(1, math.ceil(upload_expiry(0, ttl_seconds) * 1000))
                    pipe.set(_upload_key(repository, digest), "1", px=milliseconds)
                await pipe.execute()

    async def repository_stats(self) -> list[RepositoryStats]:
        with self._backend_errors():
            kept_out = cast(dict[str, str], await self._client.hgetall(REPOSITORY_BYTES_KEPT_OUT))
            async with self._client.pipeline(transaction=False) as pipe:
                for repository in kept_out:
                    pipe.hgetall(_repository_outcomes_key(repository))
                outcomes = cast(list[dict[str, str]], await pipe.execute())
            return by_bytes_kept_out(
                RepositoryStats(repository, _decode_counts(counts), int(nbytes))
                for (repository, nbytes), counts in zip(kept_out.items(), outcomes, strict=True)
            )

    async def restore(self, records: Sequence[ForeignRecord], repositories: Sequence[RepositoryStats]) -> None:
        with self._backend_errors():
            async with self._client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(GENERATION)
                        generation = cast(str | None, await pipe.get(GENERATION))
                        pipe.multi()  # type: ignore[no-untyped-call]
                        self._write_export(pipe, records, repositories)
                        if records:
                            self._record_changes(pipe, generation, [record.layer.digest for record in records])
                        await pipe.execute()
                        break
                    except WatchError:
                        continue
            if records:
                await self._trim_script(keys=[CHANGES, HISTORY_FROM], args=[self._changes_kept])

    @staticmethod
    def _write_export(pipe: Pipeline, records: Sequence[ForeignRecord], repositories: Sequence[RepositoryStats]) -> None:
        for record in records:
            digest = record.layer.digest
            history = _History(record.first_sighting, record.first_seen, record.last_sighting, record.last_seen)
            pipe.hset(LAYERS, digest, _encode_layer(record.layer, record.reach))
            pipe.hset(HISTORY, digest, _encode_history(history))
            pipe.hset(TEACHINGS, digest, encode_teachings(record.teachings))
            pipe.hset(BYTES_KEPT_OUT, digest, record.bytes_kept_out)
            pipe.delete(_outcomes_key(digest))
            if record.outcomes:
                pipe.hset(_outcomes_key(digest), mapping=_encoded_counts(record.outcomes))
        for stats in repositories:
            pipe.hset(REPOSITORY_BYTES_KEPT_OUT, stats.repository, stats.bytes_kept_out)
            pipe.delete(_repository_outcomes_key(stats.repository))
            if stats.outcomes:
                pipe.hset(_repository_outcomes_key(stats.repository), mapping=_encoded_counts(stats.outcomes))

    async def generation(self) -> int:
        with self._backend_errors():
            value = cast(str | None, await self._client.get(GENERATION))
            return int(value or 0)

    async def record_upload(self, repository: str, digest: str, ttl_seconds: float) -> None:
        await self.record(uploaded_once(repository, digest, ttl_seconds))

    async def recent_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        unique_digests = list(dict.fromkeys(digests))
        with self._backend_errors():
            if not unique_digests:
                return set()
            keys = [_upload_key(repository, digest) for digest in unique_digests]
            found = cast(list[str | None], await self._client.mget(keys))
            return {digest for digest, value in zip(unique_digests, found, strict=True) if value is not None}

    async def claim_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        unique_digests = list(dict.fromkeys(digests))
        with self._backend_errors():
            if not unique_digests:
                return set()
            keys = [_upload_key(repository, digest) for digest in unique_digests]
            claimed = cast(list[int], await self._claim_script(keys=keys))
            return {digest for digest, deleted in zip(unique_digests, claimed, strict=True) if deleted}

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._backend_errors(check_open=False):
            await self._client.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"foreign-layer store {self._location.shown} is closed")

    @contextmanager
    def _backend_errors(self, *, check_open: bool = True) -> Iterator[None]:
        if check_open:
            self._check_open()
        try:
            yield
        except (RedisError, OSError, ValueError) as error:
            # ValueError: a record that is not ours (or not JSON) under one of our keys.
            detail = " ".join(str(error).split()) or type(error).__name__
            raise StoreError(f"foreign-layer store {self._location.shown}: {detail}") from error
