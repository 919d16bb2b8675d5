"""A compact set of known foreign layers: a million digests, each with a diff_id, in about 100 MiB. Pure, no I/O."""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from proxy.manifests import ForeignLayer

SHA256_PREFIX = "sha256:"
MADE_CAPACITY = 4096
MEDIA_BITS = 3
MEDIA_TYPES = (1 << MEDIA_BITS) - 1  # interned; a layer of another media type is kept whole
# A layer's one URL, as manifests give it (`https://mcr.microsoft.com/v2/.../blobs/sha256:...`), is kept as the
# number of its pattern, the URL with the digest cut out: manifests of one base image share a few patterns.
URL_BITS = 12
URL_PATTERNS = (1 << URL_BITS) - 1  # code 0: no urls
SIZE_SHIFT = MEDIA_BITS + URL_BITS
MAX_PACKED_SIZE = 1 << (63 - SIZE_SHIFT)
DIGEST_BYTES = 32
NO_DIFF_ID = bytes(DIGEST_BYTES)
FORGOTTEN = -1  # the packed value of a row whose layer was taken out; it is reused if the layer comes back
UNINDEXED = 0  # a row's diff_id hash when its diff_id does not name it (none, or given to a later layer)
MIN_SLOTS = 8


def sha256_bytes(digest: str) -> bytes | None:
    """The 32 bytes of a canonical sha256 digest (lower-case hex and nothing else), or None."""
    if not digest.startswith(SHA256_PREFIX):
        return None
    try:
        raw = bytes.fromhex(digest[7:])
    except ValueError:
        return None
    return raw if len(raw) == DIGEST_BYTES and raw.hex() == digest[7:] else None


class _HashIndex:
    """Open addressing over row numbers (row + 1; 0 is a free slot) by a string's hash, which is keyed per
    process (SipHash): digests chosen to collide cannot pile up in one place."""

    def __init__(self, capacity: int = 0):
        slots = MIN_SLOTS
        while slots < 2 * capacity:
            slots *= 2
        # Its own anonymous mapping: pages are touched only as slots fill, and all go back at once when an
        # index that grew is dropped (a heap block would leave the process that much bigger).
        self.slots = memoryview(mmap.mmap(-1, 4 * slots)).cast("I")
        self.mask = slots - 1
        self.entries = 0

    def find(self, hashed: int, hashes: array[int], after: int = -1) -> int:
        """The next slot (from the one after `after`) of a row of that hash, or else -1 - the free slot where
        one would go: a caller that finds the row is not the one it looks for looks on."""
        slots, mask = self.slots, self.mask
        slot = hashed & mask if after < 0 else (after + 1) & mask
        while entry := slots[slot]:
            if hashes[entry - 1] == hashed:
                return slot
            slot = (slot + 1) & mask
        return -1 - slot

    def put(self, slot: int, row: int) -> None:
        self.slots[slot] = row + 1
        self.entries += 1

    def has_room(self, more: int) -> bool:
        return 2 * (self.entries + more) <= len(self.slots)


def _indexed(hashes: array[int], capacity: int, rows: Iterable[int]) -> _HashIndex:
    """An index of `rows`, distinct, with room for `capacity`."""
    index = _HashIndex(capacity)
    for row in rows:
        index.put(-1 - index.find(hashes[row], hashes), row)
    return index


def _row_bytes(column: bytearray, row: int) -> bytearray:
    return column[row * DIGEST_BYTES:(row + 1) * DIGEST_BYTES]


def _name_hash(name: str) -> int:
    return hash(name) or 1  # 0 is UNINDEXED


def _row_named(index: _HashIndex, hashes: array[int], column: bytearray, name: str) -> int:
    """The row whose 32 bytes a canonical sha256 `name` spells, or -1."""
    hashed, slot = _name_hash(name), -1
    while (slot := index.find(hashed, hashes, slot)) >= 0:
        row = index.slots[slot] - 1
        if SHA256_PREFIX + _row_bytes(column, row).hex() == name:
            return row
    return -1


def _slot_of(index: _HashIndex, hashes: array[int], column: bytearray, row: int) -> int:
    """The slot of another row with row `row`'s hash and bytes, or else -1 - the free slot for it."""
    hashed, mine, slot = hashes[row], _row_bytes(column, row), -1
    while (slot := index.find(hashed, hashes, slot)) >= 0:
        other = index.slots[slot] - 1
        if other != row and _row_bytes(column, other) == mine:
            return slot
    return slot


class CompactLayers(Mapping[str, ForeignLayer]):
    """Known layers by digest in about 50 bytes each (100 with a diff_id) instead of a ForeignLayer and its
    strings (some 300): a layer is a row of fixed-width arrays, found through hash indexes by digest and by
    diff_id: its digest's 32 bytes and string hash; one int packing its size, its media type (one of a few
    interned) and the pattern of its URL (one of a few thousand); its diff_id's 32 bytes and hash. The rare
    layers that fit no row (other urls or media types, digests of another algorithm or spelling) are kept
    whole beside. A ForeignLayer is made only when one is asked for (on the hot path: a known digest), and
    the last few made are kept."""

    def __init__(self, layers: Iterable[ForeignLayer] = ()):
        self._digests = bytearray()
        self._hashes = array("q")
        self._values = array("q")
        self._diff_id_bytes = bytearray()  # per row, from the first diff_id on
        self._diff_id_hashes = array("q")
        self._by_digest = _HashIndex()
        self._by_diff_id = _HashIndex()
        self._live = 0
        self._indexed_diff_ids = 0
        self._media_types: list[str] = []
        self._url_patterns: list[tuple[str, str]] = []
        self._url_codes: dict[tuple[str, str], int] = {}
        self._rare: dict[str, ForeignLayer] = {}
        self._rare_diff_ids: dict[str, str] = {}  # diff_id -> digest, where the diff_id has no row
        self._made: dict[str, ForeignLayer] = {}
        self.diff_ids = DiffIdIndex(self)
        self.add_many((layer.digest, layer.media_type, layer.size, layer.urls, layer.diff_id) for layer in layers)

    def reserve(self, layers: int, diff_ids: int = 0) -> None:
        """Room for so many layers and diff_ids: a load that knows its size spares the indexes their regrowth."""
        if 2 * layers > len(self._by_digest.slots):
            self._by_digest = _indexed(self._hashes, layers, self._live_rows())
        if 2 * diff_ids > len(self._by_diff_id.slots) and not self._indexed_diff_ids:
            self._by_diff_id = _HashIndex(diff_ids)

    def add_many(self, rows: Iterable[Sequence[Any]], urls_text: Callable[[str], tuple[str, ...]] | None = None) -> None:
        """`add` for each row of (digest, media_type, size, urls, diff_id); with `urls_text`, a row's urls are
        text it decodes, read as a pattern without decoding where one like it was. The common case (a canonical
        sha256 digest and diff_id, no urls or one URL of a known pattern) is appended inline and indexed at the
        end: what a store's load is made of, a million times."""
        url_codes = self._url_codes if urls_text is None else {}
        rare, fromhex = self._rare, bytes.fromhex
        media_type, code, pending = None, MEDIA_TYPES, len(self._values)
        for row in rows:
            digest, size, urls, diff_id = row[0], row[2], row[3], row[4]
            if row[1] != media_type:
                media_type, code = row[1], self._media_code(row[1])
            pattern = 0
            if urls:
                before, named, after = urls.partition(digest) if urls_text else urls[0].partition(digest)
                pattern = url_codes.get((before, after), -1) if named and (urls_text or len(urls) == 1) else -1
                if urls_text and named and (before, after) not in url_codes:
                    # Text without escapes around the digest decodes the same around any other digest.
                    known = self._url_pattern(digest, urls_text(urls)) if "\\" not in before + after else None
                    pattern = url_codes[before, after] = -1 if known is None else known
            try:
                raw, diff_raw = fromhex(digest[7:]), fromhex(diff_id[7:]) if diff_id else NO_DIFF_ID
            except ValueError:
                raw = diff_raw = b""
            if (pattern <= 0 and urls or code == MEDIA_TYPES or not 0 <= size < MAX_PACKED_SIZE
                    or len(raw) != DIGEST_BYTES or raw.hex() != digest[7:] or not digest.startswith(SHA256_PREFIX)
                    or diff_id and (len(diff_raw) != DIGEST_BYTES or diff_raw.hex() != diff_id[7:]
                                    or diff_raw == NO_DIFF_ID or not diff_id.startswith(SHA256_PREFIX))
                    or digest in rare):  # fmt: skip
                self._index_from(pending)
                self.add(digest, row[1], size, urls_text(urls) if urls_text and urls else tuple(urls or ()), diff_id)
                pending = len(self._values)
            else:
                self._append_row(digest, raw, size << SIZE_SHIFT | pattern << MEDIA_BITS | code, diff_id, diff_raw)
        self._index_from(pending)

    def _append_row(self, digest: str, raw: bytes, packed: int, diff_id: str | None, diff_raw: bytes) -> None:
        """A new row, to be indexed by `_index_from`."""
        self._digests += raw
        self._hashes.append(_name_hash(digest))
        self._values.append(packed)
        if diff_id or self._diff_id_hashes:
            self._diff_id_columns_to(len(self._values) - 1)
            self._diff_id_bytes += diff_raw
            self._diff_id_hashes.append(_name_hash(diff_id) if diff_id else UNINDEXED)
            if diff_id and self._rare_diff_ids:
                self._rare_diff_ids.pop(diff_id, None)

    def _index_from(self, first: int) -> None:
        """Rows `first` on, appended by `_append_row`, into the indexes: a row of a digest (or diff_id)
        indexed before gives its place up, as it would to a later `add`."""
        added = len(self._values) - first
        if not added:
            return
        if not self._by_digest.has_room(added):
            capacity = max(len(self._by_digest.slots), self._live + added)  # twice the slots, or what is added
            self._by_digest = _indexed(self._hashes, capacity, self._live_rows(first))
        diff_hashes = self._diff_id_hashes
        with_diff_ids = len(diff_hashes) > first
        if with_diff_ids:
            self._diff_id_room(added, first)
        # A free first slot taken inline: this runs a million times at a load.
        digests, hashes, index, by_diff_id = self._digests, self._hashes, self._by_digest, self._by_diff_id
        slots, mask, diff_slots, diff_mask = index.slots, index.mask, by_diff_id.slots, by_diff_id.mask
        for row in range(first, first + added):
            slot = hashes[row] & mask
            if slots[slot]:
                slot = _slot_of(index, hashes, digests, row)
                if slot >= 0:
                    self._forget_row(slots[slot] - 1, self._digest_at(row))
                    index.entries -= 1
                slot = -1 - slot if slot < 0 else slot
            slots[slot] = row + 1
            index.entries += 1
            self._live += 1
            if with_diff_ids and (diff_hash := diff_hashes[row]) != UNINDEXED:
                if diff_slots[diff_hash & diff_mask]:
                    self._index_diff_id(row)
                else:
                    diff_slots[diff_hash & diff_mask] = row + 1
                    by_diff_id.entries += 1
                    self._indexed_diff_ids += 1

    def _put_row(self, digest: str, raw: bytes, packed: int, diff_id: str | None, diff_raw: bytes) -> None:
        """The layer as a row (the one it had, if any): a canonical digest and diff_id, a packed size."""
        found = self._find(digest)
        if found < 0:
            self._append_row(digest, raw, packed, diff_id, diff_raw)
            self._index_from(len(self._values) - 1)
            return
        self._made.pop(digest, None)
        if self._values[found] == FORGOTTEN:
            self._live += 1
        self._values[found] = packed
        if diff_id or found < len(self._diff_id_hashes):
            self._set_diff_id(found, diff_id, diff_raw)

    def _fits_a_row(self, digest: str, code: int, size: int, diff_id: str | None) -> tuple[bytes, bytes] | None:
        raw = sha256_bytes(digest)
        diff_raw = sha256_bytes(diff_id) if diff_id else NO_DIFF_ID
        if raw is None or diff_raw is None or diff_raw == NO_DIFF_ID and diff_id or code == MEDIA_TYPES:
            return None
        return (raw, diff_raw) if 0 <= size < MAX_PACKED_SIZE else None

    def _find(self, digest: str) -> int:
        """The row of a digest (live or forgotten), or -1."""
        return _row_named(self._by_digest, self._hashes, self._digests, digest)

    def _live_rows(self, end: int | None = None) -> Iterator[int]:
        values = self._values
        return (row for row in range(len(values) if end is None else end) if values[row] != FORGOTTEN)

    def _find_diff_id(self, diff_id: str) -> int:
        """The row whose layer a diff_id names, or -1."""
        return _row_named(self._by_diff_id, self._diff_id_hashes, self._diff_id_bytes, diff_id)

    def _set_diff_id(self, row: int, diff_id: str | None, raw: bytes) -> None:
        """An indexed row's diff_id (NO_DIFF_ID: none); a diff_id names the layer it came with last."""
        if row >= len(self._diff_id_hashes):
            self._diff_id_columns_to(row + 1)
        elif _row_bytes(self._diff_id_bytes, row) == raw and (self._diff_id_hashes[row] != UNINDEXED or not diff_id):
            return
        self._unindex_diff_id(row)
        self._diff_id_bytes[row * DIGEST_BYTES:(row + 1) * DIGEST_BYTES] = raw
        if diff_id and raw != NO_DIFF_ID:
            self._rare_diff_ids.pop(diff_id, None)
            self._diff_id_room(1, len(self._diff_id_hashes))
            self._diff_id_hashes[row] = _name_hash(diff_id)
            self._index_diff_id(row)

    def _diff_id_columns_to(self, rows: int) -> None:
        """The diff_id columns as long as `rows` rows: those not there had none."""
        missing = rows - len(self._diff_id_hashes)
        self._diff_id_bytes += bytes(DIGEST_BYTES * missing)
        self._diff_id_hashes.frombytes(bytes(8 * missing))

    def _diff_id_room(self, more: int, end: int) -> None:
        """Room in the diff_id index for `more`, the rows indexed so far being those before `end`."""
        if not self._by_diff_id.has_room(more):
            hashes = self._diff_id_hashes
            indexed = (row for row in range(end) if hashes[row] != UNINDEXED)
            capacity = max(len(self._by_diff_id.slots), self._indexed_diff_ids + more)
            self._by_diff_id = _indexed(hashes, capacity, indexed)

    def _index_diff_id(self, row: int) -> None:
        """Row `row`'s diff_id (its bytes and hash in place) names it, and no longer the layer it named."""
        index = self._by_diff_id
        slot = _slot_of(index, self._diff_id_hashes, self._diff_id_bytes, row)
        if slot < 0:
            index.put(-1 - slot, row)
        else:
            self._unindex_diff_id(index.slots[slot] - 1)
            index.slots[slot] = row + 1
        self._indexed_diff_ids += 1

    def _release_diff_id(self, diff_id: str) -> None:
        """`diff_id` is about to name another layer: it no longer names the one it named."""
        holder = self._find_diff_id(diff_id)
        if holder >= 0:
            self._unindex_diff_id(holder)
        self._rare_diff_ids.pop(diff_id, None)

    def _unindex_diff_id(self, row: int) -> None:
        if row < len(self._diff_id_hashes) and self._diff_id_hashes[row] != UNINDEXED:
            self._diff_id_hashes[row] = UNINDEXED
            self._indexed_diff_ids -= 1

    def _forget_row(self, row: int, digest: str) -> None:
        if self._values[row] != FORGOTTEN:
            self._values[row] = FORGOTTEN
            self._live -= 1
            self._unindex_diff_id(row)
        self._made.pop(digest, None)

    def _digest_at(self, row: int) -> str:
        return SHA256_PREFIX + _row_bytes(self._digests, row).hex()

    def get(self, digest: str, default: ForeignLayer | None = None) -> ForeignLayer | None:  # type: ignore[override]
        # The hot path, for every digest a push names: mostly unknown ones, so that a miss costs a probe or
        # two of the index (by the digest's string hash, which the str keeps once computed).
        if self._live:
            row = _row_named(self._by_digest, self._hashes, self._digests, digest)
            if row >= 0 and (packed := self._values[row]) != FORGOTTEN:
                made = self._made.get(digest)
                return made if made is not None else self._layer(digest, packed, row)
        return self._rare.get(digest, default) if self._rare else default

    def _layer(self, digest: str, packed: int, row: int) -> ForeignLayer:
        urls: tuple[str, ...] = ()
        if pattern := packed >> MEDIA_BITS & URL_PATTERNS:
            before, after = self._url_patterns[pattern - 1]
            urls = (f"{before}{digest}{after}",)
        diff_id = None
        if row < len(self._diff_id_hashes):
            raw = _row_bytes(self._diff_id_bytes, row)
            diff_id = None if raw == NO_DIFF_ID else SHA256_PREFIX + raw.hex()
        layer = ForeignLayer(digest, self._media_types[packed & MEDIA_TYPES], packed >> SIZE_SHIFT, urls, diff_id)
        if len(self._made) >= MADE_CAPACITY:
            self._made.clear()
        self._made[digest] = layer
        return layer

    def __getitem__(self, digest: str) -> ForeignLayer:
        layer = self.get(digest)
        if layer is None:
            raise KeyError(digest)
        return layer

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and self.get(digest) is not None

    def __len__(self) -> int:
        return self._live + len(self._rare)

    def __iter__(self) -> Iterator[str]:
        for row in self._live_rows():
            yield self._digest_at(row)
        yield from self._rare

    def put(self, layer: ForeignLayer) -> None:
        self.add(layer.digest, layer.media_type, layer.size, layer.urls, layer.diff_id)

    def add(
        self, digest: str, media_type: str, size: int, urls: tuple[str, ...] = (), diff_id: str | None = None
    ) -> None:
        """Add or replace a layer (a store reads rows into this, no ForeignLayer made); its diff_id then
        names it. A layer that keeps its row is changed in place."""
        code = self._media_code(media_type)
        pattern = self._url_pattern(digest, urls)
        fits = self._fits_a_row(digest, code, size, diff_id) if pattern is not None else None
        if fits is None or digest in self._rare:
            self._take_out(digest)
        if fits is not None and pattern is not None:
            self._put_row(digest, fits[0], size << SIZE_SHIFT | pattern << MEDIA_BITS | code, diff_id, fits[1])
        else:
            self._rare[digest] = ForeignLayer(digest, media_type, size, urls, diff_id)
            if diff_id:
                self._release_diff_id(diff_id)
                self._rare_diff_ids[diff_id] = digest

    def pop_layer(self, digest: str) -> ForeignLayer | None:
        layer = self.get(digest)
        if layer is not None:
            self._take_out(digest)
        return layer

    def _take_out(self, digest: str) -> None:
        self._made.pop(digest, None)
        rare = self._rare.pop(digest, None)
        if rare is not None:
            if rare.diff_id and self._rare_diff_ids.get(rare.diff_id) == digest:
                del self._rare_diff_ids[rare.diff_id]
            return
        row = self._find(digest) if self._live else -1
        if row >= 0:
            self._forget_row(row, digest)

    def _url_pattern(self, digest: str, urls: tuple[str, ...]) -> int | None:
        """The code of the pattern `urls` follow: 0 for none, None for urls kept whole (several, or one that
        does not name the digest, or a pattern beyond the few thousand kept)."""
        if not urls:
            return 0
        if len(urls) > 1 or digest not in urls[0]:
            return None
        before, _, after = urls[0].partition(digest)
        code = self._url_codes.get((before, after))
        if code is None and len(self._url_patterns) < URL_PATTERNS:
            self._url_patterns.append((before, after))
            code = self._url_codes[(before, after)] = len(self._url_patterns)
        return code

    def _media_code(self, media_type: str) -> int:
        for code, known in enumerate(self._media_types):
            if known == media_type:
                return code
        if len(self._media_types) < MEDIA_TYPES:
            self._media_types.append(media_type)
            return len(self._media_types) - 1
        return MEDIA_TYPES


class DiffIdIndex(Mapping[str, ForeignLayer]):
    """The known layers by diff_id (their uncompressed digest), for those that have one."""

    def __init__(self, layers: CompactLayers):
        self._layers = layers

    def get(self, diff_id: str, default: ForeignLayer | None = None) -> ForeignLayer | None:  # type: ignore[override]
        layers = self._layers
        digest = layers._rare_diff_ids.get(diff_id) if layers._rare_diff_ids else None
        if digest is None:
            row = layers._find_diff_id(diff_id) if layers._indexed_diff_ids else -1
            if row < 0:
                return default
            digest = layers._digest_at(row)
        return layers.get(digest, default)

    def __getitem__(self, diff_id: str) -> ForeignLayer:
        layer = self.get(diff_id)
        if layer is None:
            raise KeyError(diff_id)
        return layer

    def __contains__(self, diff_id: object) -> bool:
        return isinstance(diff_id, str) and self.get(diff_id) is not None

    def __len__(self) -> int:
        return self._layers._indexed_diff_ids + len(self._layers._rare_diff_ids)

    def __iter__(self) -> Iterator[str]:
        layers = self._layers
        hashes, diff_ids = layers._diff_id_hashes, layers._diff_id_bytes
        for row in range(len(hashes)):
            if hashes[row] != UNINDEXED:
                yield SHA256_PREFIX + _row_bytes(diff_ids, row).hex()
        yield from layers._rare_diff_ids
