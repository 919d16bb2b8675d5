"""The compact known set: a Mapping of digest to ForeignLayer that holds a million digests in under 150 MiB,
and answers exactly as a dict of ForeignLayer would."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.services import RedisServer
from test_trust import fill_redis, fill_sqlite

from proxy.compact import URL_PATTERNS, CompactLayers
from proxy.known import KnownForeign
from proxy.manifests import ForeignLayer
from proxy.policy import Action, Policy
from proxy.store import MemoryStore, Sighting, SqliteStore
from proxy.store_redis import RedisStore, parse_redis_url
from proxy.trust import Reach

FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
MILLION = 1_000_000
WINDOWS_BLOBS = "https://mcr.microsoft.invalid/v2/windows/servercore/blobs/"
BUDGET_MIB = 150


def digest(number: int) -> str:
    return f"sha256:{number:064x}"


def layer(number: int, **fields: object) -> ForeignLayer:
    values: dict[str, object] = {"media_type": FOREIGN, "size": 1000 + number, **fields}
    return ForeignLayer(digest(number), **values)  # type: ignore[arg-type]


SHA512 = "sha512:" + "ab" * 64
UPPER = "sha256:" + "AB" * 32
LOWER = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("stored", "asked", "found"),
    [
        pytest.param(LOWER, LOWER, True, id="canonical"),
        pytest.param(LOWER, UPPER, False, id="upper-case-spelling-is-another-digest"),
        pytest.param(UPPER, UPPER, True, id="upper-case-stored-as-given"),
        pytest.param(UPPER, LOWER, False, id="upper-case-stored-not-canonical"),
        pytest.param(SHA512, SHA512, True, id="another-algorithm"),
        pytest.param(LOWER, "sha512:" + "ab" * 32, False, id="same-hex-other-algorithm"),
        pytest.param(LOWER, "sha256:" + "ab" * 31 + "a b", False, id="whitespace-in-hex"),
        pytest.param(LOWER, "sha256:" + "zz" * 32, False, id="not-hex"),
        pytest.param(LOWER, "", False, id="empty"),
        pytest.param(LOWER, "sha256:" + "ab" * 33, False, id="too-long"),
    ],
)
def test_a_digest_is_found_only_as_it_was_stored(stored: str, asked: str, found: bool) -> None:
    known = ForeignLayer(stored, FOREIGN, 7, ("https://example.invalid/l",), "sha256:" + "cd" * 32)
    layers = CompactLayers([known])
    assert (asked in layers, layers.get(asked)) == (found, known if found else None)
    assert (list(layers), len(layers), layers[stored]) == ([stored], 1, known)
    if not found:
        with pytest.raises(KeyError):
            layers[asked]


def test_rare_fields_media_types_sizes_come_back_as_they_went_in() -> None:
    given_layers = [
        layer(1),
        layer(2, media_type=NONDISTRIBUTABLE, size=0),
        layer(3, urls=("https://a.invalid/x", "https://b.invalid/y")),
        layer(4, diff_id=digest(104)),
        layer(5, size=2**40),
        ForeignLayer(SHA512, FOREIGN, 5, (), digest(105)),
    ]
    layers = CompactLayers(given_layers)
    assert dict(layers) == {item.digest: item for item in given_layers}
    assert layers == {item.digest: item for item in given_layers}
    assert dict(layers.diff_ids) == {digest(104): layer(4, diff_id=digest(104)), digest(105): given_layers[-1]}
    assert 42 not in layers  # type: ignore[comparison-overlap]


@pytest.mark.parametrize(
    "urls",
    [
        pytest.param((f"{WINDOWS_BLOBS}{digest(7)}",), id="one-naming-the-digest"),
        pytest.param((f"{WINDOWS_BLOBS}{digest(7)}?sig=1",), id="digest-mid-url"),
        pytest.param((f"{digest(7)}",), id="the-digest-alone"),
        pytest.param((f"{WINDOWS_BLOBS}{digest(7)}/{digest(7)}",), id="digest-twice"),
        pytest.param((f"{WINDOWS_BLOBS}{digest(8)}",), id="naming-another-digest"),
        pytest.param((f"{WINDOWS_BLOBS}{digest(7)}", "https://b.invalid/y"), id="two"),
        pytest.param(("https://a.invalid/x",), id="not-naming-it"),
    ],
)
def test_urls_come_back_as_they_went_in(urls: tuple[str, ...]) -> None:
    given = layer(7, urls=urls)
    layers = CompactLayers([layer(1, urls=(f"{WINDOWS_BLOBS}{digest(1)}",)), given])
    assert (layers[digest(7)], layers.pop_layer(digest(7)), digest(7) in layers) == (given, given, False)
    assert layers[digest(1)].urls == (f"{WINDOWS_BLOBS}{digest(1)}",)


def test_urls_beyond_the_patterns_kept_are_kept_whole() -> None:
    given = [layer(n, urls=(f"https://registry-{n}.invalid/{digest(n)}",)) for n in range(URL_PATTERNS + 3)]
    layers = CompactLayers(given)
    assert dict(layers) == {item.digest: item for item in given}


def test_replacing_and_forgetting_keep_the_diff_id_index_in_step() -> None:
    layers = CompactLayers([layer(1, diff_id=digest(101)), layer(2, diff_id=digest(102))])
    layers.put(layer(1, diff_id=digest(111), size=9))
    assert (layers[digest(1)].size, set(layers.diff_ids)) == (9, {digest(111), digest(102)})
    layers.put(layer(3, diff_id=digest(102)))  # the same diff_id now names another layer
    assert layers.diff_ids[digest(102)].digest == digest(3)
    layers.pop_layer(digest(2))  # no longer indexed for it: the index keeps naming layer 3
    assert layers.diff_ids.get(digest(102)) == layer(3, diff_id=digest(102))
    assert layers.pop_layer(digest(3)) == layer(3, diff_id=digest(102))
    assert (digest(102) in layers.diff_ids, layers.diff_ids.get(digest(102)), len(layers.diff_ids)) == (False, None, 1)
    assert layers.pop_layer(digest(3)) is None
    layers.put(layer(4))  # takes a freed row: nothing of the layer before shows
    assert (dict(layers), len(layers)) == ({digest(1): layer(1, diff_id=digest(111), size=9), digest(4): layer(4)}, 2)


LAYER_FIELDS = (
    st.integers(0, 40),  # beyond the index's first size: it grows, with rows taken out and put back
    st.sampled_from([FOREIGN, NONDISTRIBUTABLE]),
    st.integers(-1, 2**50),  # beyond what a row packs
    st.sampled_from([(), ("https://a.invalid/x",), (f"{WINDOWS_BLOBS}{{}}",)]),
    st.sampled_from([None, digest(200), digest(201), "sha512:" + "cd" * 64]),
    st.sampled_from(["sha256:{:064x}", "sha512:{:0128x}", "sha256:{:064X}"]),
)
OPERATIONS = st.lists(st.tuples(st.sampled_from(["put", "pop"]), *LAYER_FIELDS), max_size=60)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.lists(st.tuples(*LAYER_FIELDS), max_size=30), OPERATIONS)
def test_a_load_then_any_sequence_of_puts_and_pops_answers_as_a_dict_does(
    loaded: list[tuple], operations: list[tuple]  # type: ignore[type-arg]
) -> None:
    """A diff_id names the layer it was last given with, until that layer is taken out or given another."""
    model: dict[str, ForeignLayer] = {}
    diff_ids: dict[str, str] = {}

    def put(number: int, media_type: str, size: int, urls: tuple[str, ...], diff_id: str | None, spelling: str) -> str:
        name = spelling.format(number + 10)
        if (old := model.get(name)) is not None and old.diff_id and diff_ids.get(old.diff_id) == name:
            del diff_ids[old.diff_id]
        model[name] = ForeignLayer(name, media_type, size, tuple(url.format(name) for url in urls), diff_id)
        if diff_id:
            diff_ids[diff_id] = name
        return name

    rows = [(name, model[name].media_type, model[name].size, model[name].urls, model[name].diff_id)
            for name in (put(*fields) for fields in loaded)]  # fmt: skip
    layers = CompactLayers()
    layers.add_many(rows)
    for operation, number, *fields in [("load", 0), *operations]:
        if operation == "load":
            pass
        elif operation == "put":
            layers.put(model[put(number, *fields)])
        else:
            name = fields[-1].format(number + 10)
            old = model.pop(name, None)
            if old is not None and old.diff_id and diff_ids.get(old.diff_id) == name:
                del diff_ids[old.diff_id]
            assert layers.pop_layer(name) == old
        assert len(layers) == len(model) and sorted(layers) == sorted(model)
        assert all(layers.get(name) == model[name] and name in layers for name in model)
        assert {key: value.digest for key, value in layers.diff_ids.items()} == diff_ids
        assert len(layers.diff_ids) == len(diff_ids)


MEASURE_A_MILLION = """
import asyncio, gc, sys
from proxy.known import KnownForeign
from proxy.store import open_store


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


async def main() -> None:
    store = open_store(sys.argv[1])
    await store.generation()  # connected, its modules loaded: only the load is measured
    known = KnownForeign(store)
    gc.collect()
    before = resident_mib()
    await known.resync()
    gc.collect()
    print(resident_mib() - before, len(known.layers), len(known.diff_ids))


asyncio.run(main())
"""


async def resident_after_a_fresh_load(url: str) -> tuple[float, int, int]:
    """Resident memory a fresh process gains by loading the known set from `url`, how many layers it holds
    and how many diff_ids."""
    command = [sys.executable, "-c", MEASURE_A_MILLION, url]
    found = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=180, check=False)
    assert found.returncode == 0, found.stderr
    held, count, with_diff_id = found.stdout.split()
    return float(held), int(count), int(with_diff_id)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("url_before", "diff_ids"),
    [(None, False), (WINDOWS_BLOBS, False), (WINDOWS_BLOBS, True)],
    ids=["from-digest-files", "with-urls-as-manifests-give", "with-urls-and-diff-ids-as-manifests-and-configs-give"],
)
async def test_a_million_known_digests_from_sqlite_are_held_in_under_150_mib(
    tmp_path: Path, url_before: str | None, diff_ids: bool
) -> None:
    """Resident memory of a gateway process before and after loading a million digests from its store:
    the store reads rows straight into the compact set, so no million ForeignLayers pass through. Layers
    learned from manifests each carry their own URL (kept as one of a few patterns, not a string each) and,
    from the image's config, a diff_id (32 bytes in a row)."""
    path = tmp_path / "foreign-layers.db"
    store = SqliteStore(path)
    await store.learn([layer(0)], Sighting("learn"))
    await store.close()
    await asyncio.to_thread(fill_sqlite, path, MILLION - 1, url_before, diff_ids)
    held, count, with_diff_id = await resident_after_a_fresh_load(f"sqlite:///{path}")
    print(f"a million known digests from SQLite ({url_before or 'no urls'}, diff_ids {diff_ids}): +{held:.0f} MiB")
    assert (held < BUDGET_MIB, count, with_diff_id) == (True, MILLION, MILLION - 1 if diff_ids else 0)


@pytest.mark.slow
@pytest.mark.parametrize("diff_ids", [False, True], ids=["from-digest-files", "with-diff-ids"])
async def test_a_million_known_digests_from_redis_are_held_in_under_150_mib(
    redis_server: RedisServer, diff_ids: bool
) -> None:
    redis_server.flush()
    store = RedisStore(parse_redis_url(redis_server.url()))
    await store.learn([layer(0)], Sighting("learn"))
    await store.close()
    try:
        await asyncio.to_thread(fill_redis, redis_server, MILLION - 1, diff_ids)
        held, count, with_diff_id = await resident_after_a_fresh_load(redis_server.url())
    finally:
        redis_server.flush()  # a million keys would slow every later test that flushes the shared server
    print(f"a million known digests from Redis (diff_ids {diff_ids}): +{held:.0f} MiB resident")
    assert (held < BUDGET_MIB, count, with_diff_id) == (True, MILLION, MILLION - 1 if diff_ids else 0)


def test_decisions_read_the_compact_set_as_they_read_a_dict() -> None:
    layers = {digest(n): layer(n) for n in range(10)}
    compact = CompactLayers(layers.values())
    reach = {digest(3): Reach(frozenset({"tenant-a"})), digest(4): Reach(frozenset(), frozenset({"tenant-a"}))}
    policy = Policy(Action.DROP)
    for repository in ("tenant-a/app", "tenant-b/app"):
        for candidates in ([digest(11), digest(5)], [digest(3)], [digest(4)], [digest(12)], [digest(11), digest(3)]):
            expected = policy.decide(repository, candidates, layers, {}, reach)
            assert policy.decide(repository, candidates, compact, compact.diff_ids, reach) == expected


async def test_a_process_follows_learning_forgetting_and_diff_ids_through_the_store() -> None:
    store = MemoryStore()
    known, other = KnownForeign(store), KnownForeign(store)
    await known.resync()
    other.learn([layer(1, diff_id=digest(101)), layer(2)], Sighting("manifest-put", "a/b"))
    await other.flush()
    await known.resync()
    assert known.layers == {digest(1): layer(1, diff_id=digest(101)), digest(2): layer(2)}
    assert known.diff_ids.get(digest(101)) == layer(1, diff_id=digest(101))
    other.fill_size(digest(2), 5)  # layer 2 has a size: not replaced
    await store.forget([digest(1)])
    await known.resync()
    assert (dict(known.layers), dict(known.diff_ids)) == ({digest(2): layer(2)}, {})
    policy = Policy(Action.REJECT)
    assert policy.decide("a/b", [digest(1), digest(101)], known.layers, known.diff_ids, known.reach) is None


def test_a_bulk_load_holds_what_adding_each_row_would() -> None:
    """add_many, a store's load, keeps the common case inline: every other row must still come out right."""
    rows: list[tuple[str, str, int, tuple[str, ...] | None, str | None]] = [
        (digest(1), FOREIGN, 10, None, None),
        (digest(2), FOREIGN, 0, (), None),
        (digest(3), NONDISTRIBUTABLE, 30, ("https://a.invalid/x",), None),
        (digest(4), FOREIGN, 40, None, digest(104)),
        (UPPER, FOREIGN, 50, None, None),
        (SHA512, FOREIGN, 60, None, None),
        (digest(1), NONDISTRIBUTABLE, 11, None, None),  # again: replaced
        *((digest(10 + n), f"application/vnd.example.{n}", n, None, None) for n in range(8)),  # the 8th is rare
    ]
    one_by_one = CompactLayers()
    for name, media_type, size, urls, diff_id in rows:
        one_by_one.add(name, media_type, size, urls or (), diff_id)
    bulk = CompactLayers()
    bulk.add_many(rows)
    assert dict(bulk) == dict(one_by_one) and dict(bulk.diff_ids) == dict(one_by_one.diff_ids)
    assert bulk[digest(1)] == ForeignLayer(digest(1), NONDISTRIBUTABLE, 11) and len(bulk) == len(rows) - 1


URLS_AS_TEXT = [
    (f"{WINDOWS_BLOBS}{digest(1)}",),
    (f"{WINDOWS_BLOBS}{digest(2)}",),  # the same pattern: read from its text, not decoded
    ("https://b.invalid/y",),  # naming no digest
    (f"{WINDOWS_BLOBS}{digest(4)}", "https://b.invalid/y"),  # two
    (f"https://c.invalid/{digest(5)}/{digest(5)}",),  # the digest twice
    (f'https://d.invalid/"quoted"/é/{digest(6)}',),  # escaped in JSON
    (f"https://d.invalid/\"quoted\"/é/{digest(7)}",),
    (),
]


@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["ascii-json", "utf8-json"])
def test_a_load_of_urls_as_a_store_keeps_them_as_text_holds_what_adding_each_row_would(ensure_ascii: bool) -> None:
    """A store's urls column is JSON text: the load reads a pattern seen before from the text itself, and
    decodes the rest, so every row must come out as decoding each would have given."""
    texts = [json.dumps(list(urls), ensure_ascii=ensure_ascii) for urls in URLS_AS_TEXT]
    # Text another writer may give: the digest once escaped, once not; the same text around another digest.
    first = len(texts) + 1
    texts += [f'["https://e.invalid/\\u0073ha256:{digest(first)[7:]}/{digest(number)}"]' for number in (first, first + 1)]
    rows = [(digest(number), FOREIGN, number, text, digest(100 + number)) for number, text in enumerate(texts, start=1)]
    one_by_one = CompactLayers()
    for name, media_type, size, urls, diff_id in rows:
        one_by_one.add(name, media_type, size, tuple(json.loads(urls)), diff_id)
    bulk = CompactLayers()
    bulk.add_many(rows, lambda text: tuple(json.loads(text)))
    assert dict(bulk) == dict(one_by_one) and dict(bulk.diff_ids) == dict(one_by_one.diff_ids)
    assert [bulk[digest(number)].urls for number in range(1, len(texts) + 1)] == [tuple(json.loads(text)) for text in texts]
