"""Who may teach the gateway what is foreign: scoped and trusted learning, caps, undo, honest counts.

Pure parts first, then every store backend, the cost of following a store of a million digests, and
the gateway against a real registry.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.fixtures import GatewayFactory
from support.images import DOCKER_FOREIGN_LAYER, Image, build_image, descriptor
from support.processes import describe, run
from support.protocol import (
    PushForm,
    call,
    push_image_blobs,
    push_patch_then_empty_put,
    push_single_put,
    put_manifest,
    teach,
    upstream_has,
)
from support.registry import Registry
from support.services import RedisServer

from proxy.config import ConfigError, load_settings, policy_of
from proxy.known import KnownForeign
from proxy.manifests import ForeignLayer
from proxy.policy import Action, Decision, Policy, Rule
from proxy.store import ForeignStore, MemoryStore, Sighting, SqliteStore, open_store
from proxy.store_redis import LAYERS, RedisStore, parse_redis_url
from proxy.trust import (
    EVERYWHERE,
    LearningBudget,
    LearningScope,
    Reach,
    Standing,
    Teaches,
    Teaching,
    TrustedUrls,
    reach_of,
    widened,
    with_teaching,
)

FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
MILLION = 1_000_000
SYNC_CPU_LIMIT = 0.010  # seconds of process CPU for one new digest, from the issue
PATIENCE = 15.0


def digest(number: int) -> str:
    return f"sha256:{number:064x}"


def layer(number: int, size: int = 1000, urls: tuple[str, ...] = ()) -> ForeignLayer:
    return ForeignLayer(digest(number), FOREIGN_GZIP, size, urls)


# Pure parts: reach, teachings, scopes, trusted urls, the learning budget


@pytest.mark.parametrize(
    ("teachings", "expected"),
    [
        pytest.param([], None, id="none-recorded-is-everywhere"),
        pytest.param([("a/x", EVERYWHERE, False)], None, id="everywhere"),
        pytest.param([("a/x", "a", False)], Reach(frozenset({"a"})), id="one-namespace"),
        pytest.param([("a/x", "a", False), ("b/y", "b", False)], Reach(frozenset({"a", "b"})), id="two-namespaces"),
        pytest.param([("a/x", "a", False), (None, EVERYWHERE, False)], None, id="an-operator-widens-it"),
        pytest.param([("a/x", "a", True)], Reach(candidate=frozenset({"a"})), id="candidate"),
        pytest.param([("a/x", "a", True), ("a/y", "a", False)], Reach(frozenset({"a"})), id="enforced-wins-in-a-scope"),
        pytest.param(
            [("a/x", EVERYWHERE, True), ("b/y", "b", False)],
            Reach(frozenset({"b"}), frozenset({EVERYWHERE})),
            id="candidate-everywhere-enforced-in-b",
        ),
    ],
)
def test_the_reach_of_a_digest_sums_up_its_teachings(
    teachings: list[tuple[str | None, str, bool]], expected: Reach | None
) -> None:
    taught = [Teaching(repository, "manifest-put", None, scope, candidate) for repository, scope, candidate in teachings]
    assert reach_of(taught) == expected
    # Teaching one at a time, as a process does in memory, gives the same reach as the store computes.
    reach: Reach | None = None
    for index, teaching in enumerate(taught):
        reach = widened(reach, index > 0, teaching.scope, teaching.candidate)
    assert reach == expected or not taught


def test_a_teacher_vouching_again_with_trusted_urls_promotes_its_candidate() -> None:
    candidate = Teaching("a/x", "manifest-put", digest(9), "a", candidate=True, taught_at=1.0)
    again = Teaching("a/x", "manifest-get", digest(8), "a", candidate=False, taught_at=2.0)
    other = Teaching("b/y", "manifest-put", None, "b", candidate=True, taught_at=3.0)

    assert with_teaching((candidate,), again) == (Teaching("a/x", "manifest-put", digest(9), "a", False, 1.0),)
    assert with_teaching((candidate,), other) == (candidate, other)
    assert with_teaching((), candidate) == (candidate,)


RULES = (
    Rule("mirror/windows/**", Action.ALLOW, Teaches.EVERYWHERE),
    Rule("teams/red/**", Action.DROP, Teaches.NAMESPACE),
    Rule("sandbox/**", Action.DROP, Teaches.NOWHERE),
    Rule("ci/**", Action.REJECT),
)


@pytest.mark.parametrize(
    ("learning_scope", "repository", "teaches_in", "reads_in"),
    [
        (LearningScope.GLOBAL, "tenant-a/evil", EVERYWHERE, "tenant-a"),
        (LearningScope.NAMESPACE, "tenant-a/evil", "tenant-a", "tenant-a"),
        (LearningScope.NAMESPACE, "tenant-a/deep/er", "tenant-a", "tenant-a"),
        (LearningScope.NAMESPACE, "single", "single", "single"),
        (LearningScope.NAMESPACE, "mirror/windows/servercore", EVERYWHERE, "mirror"),
        (LearningScope.NAMESPACE, "teams/red/app", "glob:teams/red/**", "glob:teams/red/**"),
        (LearningScope.GLOBAL, "teams/red/app", "glob:teams/red/**", "glob:teams/red/**"),
        (LearningScope.NAMESPACE, "teams/blue/app", "teams", "teams"),
        (LearningScope.GLOBAL, "sandbox/anything", None, "sandbox"),
        (LearningScope.NAMESPACE, "ci/app", "ci", "ci"),
    ],
)
def test_where_a_repository_teaches_and_reads(
    learning_scope: LearningScope, repository: str, teaches_in: str | None, reads_in: str
) -> None:
    policy = Policy(Action.DROP, RULES, learning_scope)
    assert policy.teaching_scope(repository) == teaches_in
    assert policy.scope_of(repository) == reads_in


def test_a_digest_taught_in_one_namespace_is_decided_there_only_and_a_candidate_is_audited() -> None:
    policy = Policy(Action.REJECT, (), LearningScope.NAMESPACE)
    known = {digest(1): layer(1), digest(2): layer(2), digest(3): layer(3)}
    reach = {digest(1): Reach(frozenset({"tenant-a"})), digest(2): Reach(candidate=frozenset({EVERYWHERE}))}

    assert policy.decide("tenant-a/app", [digest(1)], known, reach=reach) == Decision(
        Action.REJECT, "default", "tenant-a/app", layer(1)
    )
    assert policy.decide("tenant-b/app", [digest(1)], known, reach=reach) is None
    assert policy.decide("tenant-b/app", [digest(2)], known, reach=reach) == Decision(
        Action.AUDIT, "default", "tenant-b/app", layer(2), candidate=True
    )
    assert policy.decide("tenant-b/app", [digest(3)], known, reach=reach) == Decision(
        Action.REJECT, "default", "tenant-b/app", layer(3)
    )
    # A digest named twice, once out of scope: the one in scope still decides.
    assert policy.decide("tenant-b/app", [digest(1), digest(3)], known, reach=reach) is not None
    assert policy.standing("tenant-b/x", digest(2), reach) is Standing.CANDIDATE


@pytest.mark.parametrize(
    ("urls", "trusted"),
    [
        ((), True),
        (("https://mcr.microsoft.com/v2/windows/servercore/blobs/sha256:1",), True),
        (("https://go.microsoft.com/fwlink/?linkid=1",), True),
        (("https://mcr.microsoft.com/a", "https://example.invalid/b"), False),
        (("https://mcr.microsoft.com.evil.example/a",), False),
        (("http://mcr.microsoft.com/a",), False),
    ],
)
def test_trusted_urls_must_all_match(urls: tuple[str, ...], trusted: bool) -> None:
    microsoft = TrustedUrls((re.compile(r"^https://mcr\.microsoft\.com/"), re.compile(r"^https://go\.microsoft\.com/")))
    assert microsoft.trust(urls) is trusted
    assert TrustedUrls().trust(urls)  # the default: any http(s) URL


def test_the_trust_settings_are_parsed_once_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "foreign:\n  learning_scope: Namespace\n  trusted_urls: ['^https://mcr\\.microsoft\\.com/']\n"
        "  max_learned_per_manifest: 8\n"
        "policy:\n  rules:\n    - {repository: 'mirror/**', action: allow, teaches: everywhere}\n"
        "    - {repository: 'ci/**', action: reject}\n"
    )
    settings = load_settings(config, environ={"FOREIGN_LAYER_PROXY_FOREIGN_MAX_LEARNED_PER_REPOSITORY_HOUR": "99"})

    assert settings.foreign.learning_scope is LearningScope.NAMESPACE
    assert [pattern.pattern for pattern in settings.foreign.trusted_urls.patterns] == [r"^https://mcr\.microsoft\.com/"]
    assert (settings.foreign.max_learned_per_manifest, settings.foreign.max_learned_per_repository_hour) == (8, 99)
    assert [rule.teaches for rule in settings.policy.rules] == [Teaches.EVERYWHERE, None]
    assert policy_of(settings).teaching_scope("mirror/windows") == EVERYWHERE
    assert policy_of(settings).teaching_scope("ci/app") == "ci"
    from_environment = load_settings(None, environ={"FOREIGN_LAYER_PROXY_FOREIGN_TRUSTED_URLS": "['^https://a{1,3}/']"})
    assert from_environment.foreign.trusted_urls.trust(["https://aa/x"])


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("foreign:\n  learning_scope: tenant\n", "foreign.learning_scope"),
        ("foreign:\n  trusted_urls: ['(unclosed']\n", "foreign.trusted_urls"),
        ("foreign:\n  max_learned_per_manifest: 0\n", "foreign.max_learned_per_manifest"),
        ("policy:\n  rules:\n    - {repository: a, action: drop, teaches: sometimes}\n", "policy.rules: rule 1"),
    ],
)
def test_a_bad_trust_setting_is_a_one_line_config_error(tmp_path: Path, text: str, key: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(key)) as refused:
        load_settings(config, environ={})
    assert "\n" not in str(refused.value)


def test_the_learning_budget_caps_each_manifest_and_each_repository_per_hour() -> None:
    now = [0.0]
    budget = LearningBudget(per_manifest=5, per_repository_hour=12, clock=lambda: now[0])

    assert budget.admit("flood/evil", 3) == (3, None)
    assert budget.admit("flood/evil", 20) == (5, "manifest")
    assert budget.admit("flood/evil", 20) == (4, "repository")
    assert budget.admit("flood/evil", 1) == (0, "repository")
    assert budget.admit("flood/other", 2) == (2, None)
    now[0] = 3600.0
    assert budget.admit("flood/evil", 2) == (2, None)


# Every backend: teachings, reach, changes, undo, claimed uploads


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ForeignStore]:
    opened: ForeignStore
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flush()
        opened = RedisStore(parse_redis_url(server.url()))
    elif request.param == "sqlite":
        opened = SqliteStore(tmp_path / "foreign-layers.db")
    else:
        opened = MemoryStore()
    yield opened
    await opened.close()


async def test_what_a_namespace_taught_reaches_only_that_namespace_until_others_teach_it(store: ForeignStore) -> None:
    await store.learn([layer(1), layer(2)], Sighting("manifest-put", "tenant-a/evil", digest(100)), scope="tenant-a")
    await store.learn([layer(3)], Sighting("learn"))
    await store.learn([layer(4)], Sighting("manifest-put", "tenant-a/evil", digest(101)), scope="tenant-a",
                      candidate=True)  # fmt: skip

    snapshot = await store.snapshot()
    assert set(snapshot.layers) == {digest(n) for n in (1, 2, 3, 4)}
    assert snapshot.reach == {
        digest(1): Reach(frozenset({"tenant-a"})),
        digest(2): Reach(frozenset({"tenant-a"})),
        digest(4): Reach(candidate=frozenset({"tenant-a"})),
    }
    await store.learn([layer(1)], Sighting("manifest-put", "tenant-c/app"), scope="tenant-c")
    await store.learn([layer(2)], Sighting("learn"))
    reach = (await store.snapshot()).reach
    assert (reach[digest(1)], digest(2) in reach) == (Reach(frozenset({"tenant-a", "tenant-c"})), False)
    [record] = [record for record in await store.records() if record.layer.digest == digest(1)]
    assert [(t.repository, t.source, t.manifest_digest, t.scope) for t in record.teachings] == [
        ("tenant-a/evil", "manifest-put", digest(100), "tenant-a"),
        ("tenant-c/app", "manifest-put", None, "tenant-c"),
    ]


async def test_changes_since_a_generation_name_what_changed_and_nothing_else(store: ForeignStore) -> None:
    await store.learn([layer(n) for n in range(1, 6)], Sighting("learn"))
    since = await store.generation()
    assert await store.changes(since) is not None
    assert (await store.changes(since)).changed == {}  # type: ignore[union-attr]

    await store.learn([layer(1), layer(6)], Sighting("manifest-put", "tenant-a/x"), scope="tenant-a")
    await store.forget([digest(2)])
    await store.fill_size(digest(7), 10)  # unknown: nothing
    await store.count(digest(3), "dropped", 5, "team/app")  # counts are not changes

    changes = await store.changes(since)
    assert changes is not None and changes.generation == await store.generation()
    assert changes.changed == {digest(6): (layer(6), Reach(frozenset({"tenant-a"}))), digest(2): None}
    assert (await store.changes(changes.generation)).changed == {}  # type: ignore[union-attr]
    assert await store.changes(changes.generation + 1000) is None  # ahead of the store: it was reset


async def test_a_size_the_source_did_not_give_is_filled_from_a_push(store: ForeignStore) -> None:
    await store.learn([layer(1, size=0), layer(2, size=7)], Sighting("learn"))
    since = await store.generation()

    await store.fill_size(digest(1), 4096)
    await store.fill_size(digest(2), 4096)

    assert (await store.known())[digest(1)].size == 4096
    assert (await store.known())[digest(2)].size == 7
    assert (await store.changes(since)).changed == {digest(1): (layer(1, size=4096), None)}  # type: ignore[union-attr]


async def test_untaught_removes_what_one_teacher_taught_and_keeps_what_others_did(store: ForeignStore) -> None:
    clock_before = time.time()
    await store.learn([layer(1), layer(2)], Sighting("manifest-put", "tenant-a/evil", digest(100)))
    await store.learn([layer(2), layer(3)], Sighting("manifest-put", "tenant-b/app", digest(101)), scope="tenant-b")
    await store.learn([layer(4)], Sighting("learn"))
    since = await store.generation()

    untaught = await store.untaught("tenant-a/evil")

    assert (untaught.forgotten, untaught.narrowed) == ([digest(1)], [digest(2)])
    snapshot = await store.snapshot()
    assert set(snapshot.layers) == {digest(2), digest(3), digest(4)}
    assert snapshot.reach[digest(2)] == Reach(frozenset({"tenant-b"}))
    assert (await store.changes(since)).changed == {  # type: ignore[union-attr]
        digest(1): None, digest(2): (layer(2), Reach(frozenset({"tenant-b"})))
    }
    assert await store.untaught("tenant-a/evil") == type(untaught)([], [])
    assert (await store.untaught("tenant-b/app", since=time.time() + 60)).forgotten == []
    assert sorted((await store.untaught("tenant-b/app", since=clock_before)).forgotten) == [digest(2), digest(3)]
    assert (await store.untaught("learn")).forgotten == [digest(4)]
    assert await store.known() == {}


async def test_an_upload_is_claimed_once(store: ForeignStore) -> None:
    await store.record_upload("team/app", digest(1), 60)
    await store.record_upload("team/app", digest(2), 60)

    assert await store.claim_uploads("team/app", [digest(1), digest(3)]) == {digest(1)}
    assert await store.claim_uploads("team/app", [digest(1), digest(2)]) == {digest(2)}
    assert await store.claim_uploads("team/app", [digest(1), digest(2)]) == set()
    assert await store.recent_uploads("team/app", [digest(1), digest(2)]) == set()


async def test_a_process_follows_changes_and_reloads_when_the_history_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "foreign-layers.db"
    writer = SqliteStore(path, changes_kept=3)
    known = KnownForeign(SqliteStore(path))
    await writer.learn([layer(1)], Sighting("learn"))
    await known.resync()

    await writer.learn([layer(2)], Sighting("manifest-put", "tenant-a/x"), scope="tenant-a")
    await known.resync()
    assert (set(known.layers), known.reach) == ({digest(1), digest(2)}, {digest(2): Reach(frozenset({"tenant-a"}))})

    for number in range(3, 10):  # more changes than the store keeps: this process fell behind
        await writer.learn([layer(number)], Sighting("learn"))
    await writer.forget([digest(1)])
    assert await writer.changes(1) is None
    await known.resync()
    assert set(known.layers) == {digest(n) for n in range(2, 10)}
    await writer.close()
    await known.store.close()


async def test_a_version_3_file_gains_teachings_from_its_first_sightings(tmp_path: Path) -> None:
    path = tmp_path / "foreign-layers.db"
    old = SqliteStore(path)
    await old.learn([layer(1)], Sighting("manifest-put", "team/app", digest(100)))
    await old.close()
    with sqlite3.connect(path) as connection:
        connection.executescript(
            "ALTER TABLE foreign_layers DROP COLUMN teachings; ALTER TABLE foreign_layers DROP COLUMN reach;"
            "DROP TABLE changes; DELETE FROM meta WHERE key = 'history_from'; PRAGMA user_version = 3;"
        )
    connection.close()

    upgraded = SqliteStore(path)
    [record] = await upgraded.records()
    assert [(t.repository, t.manifest_digest, t.scope) for t in record.teachings] == [
        ("team/app", digest(100), EVERYWHERE)
    ]
    since = await upgraded.generation()
    await upgraded.learn([layer(2)], Sighting("learn"))
    assert (await upgraded.changes(since)).changed == {digest(2): (layer(2), None)}  # type: ignore[union-attr]
    assert (await upgraded.untaught("team/app")).forgotten == [digest(1)]
    await upgraded.close()


# One new digest against a million known: what following the store costs each process


def fill_sqlite(path: Path, count: int, url_before: str | None = None, diff_ids: bool = False) -> None:
    """`count` layers taught by `learn`, written by SQLite itself (no Python loop over rows); with `url_before`,
    each with its own URL, as manifests teach them: `url_before` and the digest; with `diff_ids`, each with its
    own diff_id, as a manifest's config gives them."""
    teachings = json.dumps([[None, "learn", None, EVERYWHERE, False, 0.0]])
    urls = "'[]'" if url_before is None else f"""'["{url_before}' || printf('sha256:%064x', i) || '"]'"""
    diff_id = "printf('sha256:d%063x', i)" if diff_ids else "NULL"
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute(
            f"""
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
            INSERT INTO foreign_layers (digest, media_type, size, urls, diff_id, first_source, first_seen,
                                        last_source, last_seen, teachings)
            SELECT printf('sha256:%064x', i), ?, 1000, {urls}, {diff_id}, 'learn', 0, 'learn', 0, ? FROM n
            """,
            (count, FOREIGN_GZIP, teachings),
        )
    connection.close()


# KEYS: layers. ARGV: first, last, value (a format of the number). Written by Redis itself, in slices of a few hundred thousand.
FILL_REDIS = """
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
    redis.call('HSET', KEYS[1], string.format('sha256:%064x', i), string.format(ARGV[3], i))
end
"""


def fill_redis(server: RedisServer, count: int, diff_ids: bool = False) -> None:
    """`count` layers, written by Redis itself; with `diff_ids`, each with its own."""
    value = json.dumps([FOREIGN_GZIP, 1000, [], "sha256:d%063x" if diff_ids else None, None])
    with server.client() as client:
        for first in range(1, count + 1, 250_000):
            client.eval(FILL_REDIS, 1, LAYERS, first, min(count, first + 249_999), value)


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


async def sync_costs(store: ForeignStore, other: ForeignStore, label: str) -> list[float]:
    """Load a million known digests into a process, then let another process teach one digest at a time;
    the CPU time (all threads) of each resync that picks one up."""
    known = KnownForeign(store)
    before, started, cpu = resident_mib(), time.perf_counter(), time.process_time()
    await known.resync()
    print(f"{label}: full load of {len(known.layers)} digests: {time.perf_counter() - started:.1f} s, "
          f"{time.process_time() - cpu:.1f} s CPU, +{resident_mib() - before:.0f} MiB")  # fmt: skip
    assert len(known.layers) == MILLION + 1
    costs = []
    for number in range(MILLION + 1, MILLION + 6):
        await other.learn([layer(number)], Sighting("manifest-put", "tenant-a/x", digest(7)), scope="tenant-a")
        cpu = time.process_time()
        await known.resync()
        costs.append(time.process_time() - cpu)
        assert digest(number) in known.layers and known.reach[digest(number)] == Reach(frozenset({"tenant-a"}))
    assert len(known.layers) == MILLION + 6
    print(f"{label}: one new digest against {MILLION} known, resync CPU: "
          f"{', '.join(f'{cost * 1000:.2f}' for cost in costs)} ms (median {statistics.median(costs) * 1000:.2f} ms)")  # fmt: skip
    return costs


@pytest.mark.slow
async def test_one_new_digest_against_a_million_costs_a_sqlite_process_under_10_ms(tmp_path: Path) -> None:
    path = tmp_path / "foreign-layers.db"
    other = SqliteStore(path)
    await other.learn([layer(0)], Sighting("learn"))
    await asyncio.to_thread(fill_sqlite, path, MILLION)
    store = SqliteStore(path)

    costs = await sync_costs(store, other, "sqlite")

    assert max(costs) < SYNC_CPU_LIMIT, costs
    await store.close()
    await other.close()


@pytest.mark.slow
async def test_one_new_digest_against_a_million_costs_a_redis_process_under_10_ms(redis_server: RedisServer) -> None:
    redis_server.flush()
    other = RedisStore(parse_redis_url(redis_server.url()))
    await other.learn([layer(0)], Sighting("learn"))
    await asyncio.to_thread(fill_redis, redis_server, MILLION)
    store = RedisStore(parse_redis_url(redis_server.url()))

    try:
        costs = await sync_costs(store, other, "redis")
    finally:
        redis_server.flush()  # a million keys would slow every later test that flushes the shared server

    assert max(costs) < SYNC_CPU_LIMIT, costs
    await store.close()
    await other.close()


async def test_a_process_reloads_when_redis_comes_back_without_its_history(redis_server: RedisServer) -> None:
    redis_server.flush()
    writer = RedisStore(parse_redis_url(redis_server.url()))
    known = KnownForeign(RedisStore(parse_redis_url(redis_server.url())))
    await writer.learn([layer(1)], Sighting("manifest-put", "tenant-a/x"), scope="tenant-a")
    await known.resync()
    with redis_server.client() as client:
        client.delete("foreign-layer-proxy:changes", "foreign-layer-proxy:history-from")
    await writer.learn([layer(2)], Sighting("learn"))

    await known.resync()

    assert set(known.layers) == {digest(1), digest(2)}
    assert known.reach == {digest(1): Reach(frozenset({"tenant-a"}))}
    await writer.close()
    await known.store.close()
    redis_server.flush()


# The gateway against a real registry


def cli(*args: str | Path) -> Any:
    return run([sys.executable, "-m", "proxy", *args], timeout=60)


def records(store: str) -> dict[str, dict[str, Any]]:
    listed = cli("digests", "--json", "--store", store)
    assert listed.returncode == 0, describe(listed)
    return {record["layer"]["digest"]: record for record in map(json.loads, listed.stdout.splitlines())}


async def eventually(check: Any, what: str) -> Any:
    deadline = time.monotonic() + PATIENCE
    while not (result := await check()):
        assert time.monotonic() < deadline, f"no {what} after {PATIENCE} s"
        await asyncio.sleep(0.1)
    return result


def poisoned(victim_seed: int) -> tuple[Image, Image]:
    """A tenant's ordinary image, and the attacker's image that lists the same first layer as foreign, with
    urls (images built from one seed share layer digests, whatever their media types)."""
    return build_image(victim_seed), build_image(victim_seed, foreign=1, os="windows")


async def push_all(http: aiohttp.ClientSession, base: str, repository: str, image: Image, tag: str = "1") -> int:
    """A normal push: every blob, then the manifest; returns the manifest's status."""
    await push_image_blobs(http, base, repository, image.blobs.values())
    return (await put_manifest(http, base, repository, tag, image.manifest, image.media_type)).status


@pytest.fixture
def shared_store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shared.db'}"


@pytest.fixture(params=["sqlite", "redis"])
def either_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The gateway's store and the CLI's: a SQLite file, or the session's Redis (flushed before and after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.flush()
    yield server.url()
    server.flush()


async def test_with_namespace_scope_a_tenant_cannot_poison_another_tenants_pushes(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, either_store: str
) -> None:
    shared_store = either_store
    victim, attack = poisoned(130)
    target = victim.layers[0]
    gateway = gateway_factory(registry, store=shared_store, config={"foreign": {"learning_scope": "namespace"}})

    await teach(http, gateway.url, "tenant-a/evil", attack)
    assert [(entry["digest"], entry["scope"]) for entry in await gateway.wait_for("learned")] == [
        (target.digest, "tenant-a")
    ]
    assert await push_all(http, gateway.url, "tenant-b/app", victim) == 201

    assert registry.blob_data_path(target.digest).read_bytes() == target.data
    assert await upstream_has(http, registry, "tenant-b/app", target.digest)
    pulled = await call(http, "GET", f"{gateway.url}/v2/tenant-b/app/manifests/1", headers={"Accept": victim.media_type})
    assert pulled.status == 200 and pulled.body == victim.manifest
    assert gateway.events("decision") == []
    # What tenant-a taught applies to tenant-a: there the layer is foreign, and kept out.
    dropped = await push_single_put(http, gateway.url, "tenant-a/other", target.data)
    assert dropped.status == 201
    assert not await upstream_has(http, registry, "tenant-a/other", target.digest)
    assert [(entry["action"], entry["repository"]) for entry in gateway.events("decision")] == [
        ("drop", "tenant-a/other")
    ]
    await asyncio.to_thread(gateway.stop)
    [record] = (await asyncio.to_thread(records, shared_store)).values()
    assert record["reach"] == {"enforced": ["tenant-a"], "candidate": []}
    assert record["teachings"][0]["repository"] == "tenant-a/evil"


async def test_with_the_default_scope_digests_shows_the_teacher_and_forget_taught_by_undoes_it(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, either_store: str
) -> None:
    shared_store = either_store
    victim, attack = poisoned(131)
    target = victim.layers[0]
    gateway = gateway_factory(registry, store=shared_store)
    await teach(http, gateway.url, "tenant-a/evil", attack)
    await gateway.wait_for("learned")

    assert await push_all(http, gateway.url, "tenant-b/app", victim) == 400  # the poisoning, as the issue found it
    assert not await upstream_has(http, registry, "tenant-b/app", target.digest)

    async def listed() -> str:
        table = await asyncio.to_thread(cli, "digests", "--store", shared_store)
        return str(table.stdout) if target.digest in table.stdout else ""

    table = await eventually(listed, "learned digest in the store")
    [row] = [row for row in table.splitlines() if row.startswith(target.digest)]
    assert "tenant-a/evil (manifest-put, sha256:" in row and "everywhere" in row, table
    undone = await asyncio.to_thread(cli, "forget", "--store", shared_store, "--taught-by", "tenant-a/evil")
    assert (undone.returncode, undone.stdout.split()) == (0, ["forgotten", target.digest]), describe(undone)

    async def victim_pushes() -> bool:
        return await push_all(http, gateway.url, "tenant-b/app", victim, tag="2") == 201

    await eventually(victim_pushes, "push of the victim's image once forgotten")
    assert await upstream_has(http, registry, "tenant-b/app", target.digest)
    nothing = await asyncio.to_thread(cli, "forget", "--store", shared_store, "--taught-by", "tenant-a/evil")
    assert nothing.returncode == 1 and "nothing taught by tenant-a/evil" in nothing.stderr, describe(nothing)


def flood_manifest(config: bytes, first: int, count: int) -> bytes:
    """A manifest of made-up foreign layers (with urls, so the registry accepts it without the blobs)."""
    layers = [
        {"mediaType": DOCKER_FOREIGN_LAYER, "digest": digest(number), "size": 1000,
         "urls": [f"https://example.invalid/{number}"]}
        for number in range(first, first + count)
    ]  # fmt: skip
    return json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": descriptor("application/vnd.docker.container.image.v1+json", config), "layers": layers,
    }).encode()  # fmt: skip


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def test_a_flood_of_made_up_digests_stops_at_the_caps_and_a_repository_may_teach_nothing(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    gateway = gateway_factory(registry, config={
        "foreign": {"max_learned_per_manifest": 20, "max_learned_per_repository_hour": 50},
        "policy": {"rules": [{"repository": "sandbox/**", "action": "drop", "teaches": "nowhere"}]},
    })  # fmt: skip
    config = build_image(132).config
    for repository in ("flood/evil", "flood/other", "sandbox/play"):
        assert (await push_single_put(http, gateway.url, repository, config)).status == 201
    untaught = flood_manifest(config, 9000, 3)
    assert (await put_manifest(http, gateway.url, "sandbox/play", "1", untaught,
                               "application/vnd.docker.distribution.manifest.v2+json")).status == 201  # fmt: skip
    for index in range(6):
        manifest = flood_manifest(config, 1000 + index * 100, 100)
        answer = await put_manifest(http, gateway.url, "flood/evil", f"t{index}", manifest,
                                    "application/vnd.docker.distribution.manifest.v2+json")  # fmt: skip
        assert answer.status == 201, answer
    other = flood_manifest(config, 5000, 3)
    assert (await put_manifest(http, gateway.url, "flood/other", "1", other,
                               "application/vnd.docker.distribution.manifest.v2+json")).status == 201  # fmt: skip

    learned = await gateway.wait_for("learned", 53)
    assert sum(entry["repository"] == "flood/evil" for entry in learned) == 50
    assert sum(entry["repository"] == "flood/other" for entry in learned) == 3
    assert len(learned) == 53  # nothing from sandbox/play, which teaches nowhere
    capped = gateway.events("learning_capped")
    assert [(entry["limit"], entry["learned"], entry["not_learned"]) for entry in capped] == [
        ("manifest", 20, 80), ("manifest", 20, 80), ("repository", 10, 90),
        ("repository", 0, 100), ("repository", 0, 100), ("repository", 0, 100),
    ]  # fmt: skip
    scraped = (await call(http, "GET", f"{gateway.admin_url}/metrics")).body.decode()
    assert metric(scraped, 'foreign_layer_proxy_learning_capped_total{limit="manifest"}') == 160
    assert metric(scraped, 'foreign_layer_proxy_learning_capped_total{limit="repository"}') == 390
    assert "flood/evil" not in scraped
    assert (await call(http, "GET", f"{gateway.url}/v2/")).status == 200


async def test_a_layer_whose_urls_are_not_trusted_is_a_candidate_audited_until_promoted(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, shared_store: str
) -> None:
    image = build_image(133, foreign=1, os="windows")  # urls at example.invalid
    foreign = image.foreign_layers[0]
    gateway = gateway_factory(registry, store=shared_store,
                              config={"foreign": {"trusted_urls": [r"^https://mcr\.microsoft\.com/"]}})  # fmt: skip
    await teach(http, gateway.url, "win/base", image)
    [learned] = await gateway.wait_for("learned")
    assert (learned["candidate"], learned["urls"]) == (True, list(foreign.urls))

    audited = await push_single_put(http, gateway.url, "win/app", foreign.data)
    assert audited.status == 201
    assert await upstream_has(http, registry, "win/app", foreign.digest)
    [decision] = gateway.events("decision")
    assert (decision["action"], decision["candidate"]) == ("audit", True)

    async def listed_as_candidate() -> bool:
        shown = await asyncio.to_thread(cli, "digests", "--candidates", "--store", shared_store)
        return foreign.digest in shown.stdout

    await eventually(listed_as_candidate, "candidate listed")
    promoted = await asyncio.to_thread(cli, "promote", "--store", shared_store, foreign.digest)
    assert promoted.stdout.split() == ["promoted", foreign.digest], describe(promoted)
    listed = await asyncio.to_thread(cli, "digests", "--candidates", "--store", shared_store)
    assert foreign.digest not in listed.stdout

    async def dropped() -> bool:
        answer = await push_single_put(http, gateway.url, "win/later", foreign.data)
        return answer.status == 201 and not await upstream_has(http, registry, "win/later", foreign.digest)

    await eventually(dropped, "drop of the promoted layer")
    scraped = (await call(http, "GET", f"{gateway.admin_url}/metrics")).body.decode()
    assert metric(scraped, "foreign_layer_proxy_learned_candidates_total") == 1


async def test_an_audited_push_is_no_leak(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(134, foreign=1, os="windows")
    gateway = gateway_factory(registry, args=["--action", "audit"])
    await teach(http, gateway.url, "win/base", image)
    await gateway.wait_for("learned")

    assert await push_all(http, gateway.url, "win/app", image) == 201

    assert [entry["action"] for entry in gateway.events("decision")] == ["audit"]


async def test_an_upload_is_one_leak_however_many_manifests_name_it(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(135, foreign=1, os="windows")
    gateway = gateway_factory(registry)

    assert await push_all(http, gateway.url, "win/first", image, tag="1") == 201
    assert await push_all(http, gateway.url, "win/first", image, tag="2") == 201
    assert (await put_manifest(http, gateway.url, "win/first", "3", image.manifest, image.media_type)).status == 201

    decisions = [entry["action"] for entry in gateway.events("decision")]
    assert decisions == ["leaked", "drop"], decisions  # the second push's blob is known by then: dropped


async def test_blocked_counts_drops_and_rejects_only(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "foreign-layers.db")
    await store.learn([layer(1)], Sighting("learn"))
    for outcome in ("dropped", "dropped", "rejected", "audited", "allowed", "leaked"):
        await store.count(digest(1), outcome, 1000, "team/app")
    await store.close()

    table = await asyncio.to_thread(cli, "digests", "--store", f"sqlite:///{tmp_path / 'foreign-layers.db'}")

    [row] = table.stdout.splitlines()[1:]
    assert row.split()[:4] == [digest(1), "1000", "3", "everywhere"], table.stdout


@pytest.mark.parametrize("push", [push_single_put, push_patch_then_empty_put], ids=["single-put", "patch-empty-put"])
async def test_a_layer_from_a_digest_file_learns_its_size_from_the_push(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, tmp_path: Path, push: PushForm
) -> None:
    foreign = build_image(136, foreign=1, os="windows").foreign_layers[0]
    listed = tmp_path / "digests.txt"
    listed.write_text(f"{foreign.digest}\n")
    gateway = gateway_factory(registry, config={"foreign": {"digest_files": [str(listed)]},
                                                "policy": {"pretend_present": True}})  # fmt: skip

    assert (await push(http, gateway.url, "win/app", foreign.data)).status == 201

    [decision] = gateway.events("decision")
    assert (decision["action"], decision["size"]) == ("drop", foreign.size)
    scraped = (await call(http, "GET", f"{gateway.admin_url}/metrics")).body.decode()
    assert metric(scraped, "foreign_layer_proxy_kept_out_bytes_total") == foreign.size
    present = await call(http, "HEAD", f"{gateway.url}/v2/win/other/blobs/{foreign.digest}")
    assert (present.status, present.headers["Content-Length"]) == (200, str(foreign.size))


ENFORCE_LIMIT = 2.0  # seconds from the end of `learn` until a running gateway enforces the digest (a liveness bound)
MANY = 50_000


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_digest_learned_by_the_cli_is_enforced_by_a_gateway_holding_many_within_two_seconds(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, tmp_path: Path,
    request: pytest.FixtureRequest, kind: str,
) -> None:  # fmt: skip
    """Following the store's changes, not reloading it: a new digest costs what changed, whatever is known."""
    server: RedisServer | None = request.getfixturevalue("redis_server") if kind == "redis" else None
    if server is not None:
        server.flush()
        url = server.url()
    else:
        url = f"sqlite:///{tmp_path / 'shared.db'}"
    store = open_store(url)
    await store.learn([layer(0)], Sighting("learn"))
    await store.close()
    if server is not None:
        await asyncio.to_thread(fill_redis, server, MANY)
    else:
        await asyncio.to_thread(fill_sqlite, tmp_path / "shared.db", MANY)
    gateway = gateway_factory(registry, store=url, config={"policy": {"pretend_present": True}})
    new = layer(MANY + 1)
    blob = f"{gateway.url}/v2/team/app/blobs/{new.digest}"
    assert (await call(http, "HEAD", f"{gateway.url}/v2/team/app/blobs/{digest(MANY)}")).status == 200  # all loaded
    assert (await call(http, "HEAD", blob)).status == 404
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2, "digest": digest(7)},
        "layers": [{"mediaType": FOREIGN_GZIP, "size": new.size, "digest": new.digest}],
    }))  # fmt: skip

    learned = await asyncio.to_thread(cli, "learn", "--store", url, manifest)
    assert learned.returncode == 0 and new.digest in learned.stdout, describe(learned)
    learned_at = time.monotonic()
    while (await call(http, "HEAD", blob)).status != 200:
        assert time.monotonic() - learned_at < ENFORCE_LIMIT, f"not enforced {ENFORCE_LIMIT} s after learn"
        await asyncio.sleep(0.02)
    if server is not None:
        server.flush()
