"""A compact set of known foreign layers: a million digests, each with a diff_id, in about 100 MiB. Pure, no I/O."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
        self.slots = array("I", bytes(4 * slots))
        self.mask = slots - 1
        self.entries = 0

    def free_slot(self, hashed: int) -> int:
        slots, mask = self.slots, self.mask
        slot = hashed & mask
        while slots[slot]:
            slot = (slot + 1) & mask
        return slot

    def put(self, slot: int, row: int) -> None:
        self.slots[slot] = row + 1
        self.entries += 1

    def full(self) -> bool:
        return 2 * (self.entries + 1) > len(self.slots)


def _indexed(hashes: array[int], capacity: int, rows: Iterable[int]) -> _HashIndex:
    index = _HashIndex(capacity)
    for row in rows:
        index.put(index.free_slot(hashes[row]), row)
    return index


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

    def add_many(self, rows: Iterable[Sequence[Any]]) -> None:
        """`add` for each row of (digest, media_type, size, urls, diff_id), the common case (a canonical sha256
        digest and diff_id, no urls or one URL of a known pattern) inline: what a store's load is made of, a
        million times."""
        url_codes, rare, fromhex = self._url_codes, self._rare, bytes.fromhex
        media_type, code = None, MEDIA_TYPES
        for row in rows:
            digest, size, urls, diff_id = row[0], row[2], row[3], row[4]
            if row[1] != media_type:
                media_type, code = row[1], self._media_code(row[1])
            pattern = 0
            if urls and len(urls) == 1:
                before, named, after = urls[0].partition(digest)
                pattern = url_codes.get((before, after), -1) if named else -1
            try:
                raw, diff_raw = fromhex(digest[7:]), fromhex(diff_id[7:]) if diff_id else NO_DIFF_ID
            except ValueError:
                raw = diff_raw = b""
            if (pattern < 0 or (urls and not pattern) or code == MEDIA_TYPES or not 0 <= size < MAX_PACKED_SIZE
                    or len(raw) != DIGEST_BYTES or raw.hex() != digest[7:] or not digest.startswith(SHA256_PREFIX)
                    or diff_id and (len(diff_raw) != DIGEST_BYTES or diff_raw.hex() != diff_id[7:]
                                    or diff_raw == NO_DIFF_ID or not diff_id.startswith(SHA256_PREFIX))
                    or digest in rare):  # fmt: skip
                self.add(digest, row[1], size, tuple(urls or ()), diff_id)
            else:
                self._put_row(digest, raw, size << SIZE_SHIFT | pattern << MEDIA_BITS | code, diff_id, diff_raw)

    def _put_row(self, digest: str, raw: bytes, packed: int, diff_id: str | None, diff_raw: bytes) -> None:
        """The layer as a row (the one it had, if any): a canonical digest and diff_id, a packed size."""
        found = self._find(digest)
        if found >= 0:
            self._made.pop(digest, None)
            if self._values[found] == FORGOTTEN:
                self._live += 1
            self._values[found] = packed
            if diff_id or found < len(self._diff_id_hashes):
                self._set_diff_id(found, diff_id, diff_raw)
            return
        row = len(self._values)
        self._digests += raw
        self._hashes.append(hash(digest))
        self._values.append(packed)
        if self._by_digest.full():
            self._by_digest = _indexed(self._hashes, 2 * self._live + 2, self._live_rows())
        else:
            self._by_digest.put(-found - 1, row)
        self._live += 1
        if diff_id or self._diff_id_hashes:
            if len(self._diff_id_hashes) < row:
                self._set_diff_id(row - 1, None, NO_DIFF_ID)  # the rows before had none
            self._diff_id_bytes += diff_raw
            self._diff_id_hashes.append(UNINDEXED)
            if diff_id:
                self._index_diff_id(row, diff_id)

    def _fits_a_row(self, digest: str, code: int, size: int, diff_id: str | None) -> tuple[bytes, bytes] | None:
        raw = sha256_bytes(digest)
        diff_raw = sha256_bytes(diff_id) if diff_id else NO_DIFF_ID
        if raw is None or diff_raw is None or diff_raw == NO_DIFF_ID and diff_id or code == MEDIA_TYPES:
            return None
        return (raw, diff_raw) if 0 <= size < MAX_PACKED_SIZE else None

    def _find(self, digest: str) -> int:
        """The row of a digest (live or forgotten), or else -1 - the free slot where its row would go."""
        hashed = hash(digest)
        index, hashes, digests = self._by_digest, self._hashes, self._digests
        slots, mask = index.slots, index.mask
        slot = hashed & mask
        while entry := slots[slot]:
            row = entry - 1
            if (hashes[row] == hashed and digests[row * DIGEST_BYTES:(row + 1) * DIGEST_BYTES].hex() == digest[7:]
                    and digest.startswith(SHA256_PREFIX)):  # fmt: skip
                return row
            slot = (slot + 1) & mask
        return -1 - slot

    def _live_rows(self) -> Iterator[int]:
        values = self._values
        return (row for row in range(len(values)) if values[row] != FORGOTTEN)

    def _find_diff_id(self, diff_id: str, hashed: int = 0) -> int:
        """The row whose layer a diff_id names, or else -1 - the free slot where its entry would go."""
        hashed = hashed or hash(diff_id) or 1
        index, hashes, diff_ids = self._by_diff_id, self._diff_id_hashes, self._diff_id_bytes
        slots, mask = index.slots, index.mask
        slot = hashed & mask
        while entry := slots[slot]:
            row = entry - 1
            if (hashes[row] == hashed and diff_ids[row * DIGEST_BYTES:(row + 1) * DIGEST_BYTES].hex() == diff_id[7:]
                    and diff_id.startswith(SHA256_PREFIX)):  # fmt: skip
                return row
            slot = (slot + 1) & mask
        return -1 - slot

    def _set_diff_id(self, row: int, diff_id: str | None, raw: bytes) -> None:
        """A row's diff_id (NO_DIFF_ID: none); a diff_id names the layer it came with last."""
        missing = row + 1 - len(self._diff_id_hashes)
        if missing > 0:
            self._diff_id_bytes += bytes(DIGEST_BYTES * missing)
            self._diff_id_hashes.frombytes(bytes(8 * missing))
        elif self._diff_id_bytes[row * DIGEST_BYTES:(row + 1) * DIGEST_BYTES] == raw and (
            self._diff_id_hashes[row] != UNINDEXED or raw == NO_DIFF_ID
        ):
            return
        self._unindex_diff_id(row)
        self._diff_id_bytes[row * DIGEST_BYTES:(row + 1) * DIGEST_BYTES] = raw
        if diff_id and raw != NO_DIFF_ID:
            self._index_diff_id(row, diff_id)

    def _index_diff_id(self, row: int, diff_id: str) -> None:
        """The diff_id of row `row` (its bytes in place) names it, and no longer the layer it named."""
        if self._rare_diff_ids:
            self._rare_diff_ids.pop(diff_id, None)
        hashed = hash(diff_id) or 1
        found = self._find_diff_id(diff_id, hashed)
        if found >= 0:
            self._unindex_diff_id(found)
        self._diff_id_hashes[row] = hashed
        self._indexed_diff_ids += 1
        index = self._by_diff_id
        if index.full():
            hashes = self._diff_id_hashes
            indexed = (number for number in range(len(hashes)) if hashes[number] != UNINDEXED)
            self._by_diff_id = _indexed(hashes, 2 * self._indexed_diff_ids, indexed)
        else:
            index.put(index.free_slot(hashed) if found >= 0 else -found - 1, row)

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

    def _digest_at(self, row: int) -> str:
        return SHA256_PREFIX + self._digests[row * DIGEST_BYTES:(row + 1) * DIGEST_BYTES].hex()

    def get(self, digest: str, default: ForeignLayer | None = None) -> ForeignLayer | None:  # type: ignore[override]
        # The hot path, for every digest a push names: mostly unknown ones, so that a miss costs a probe or
        # two of the index (by the digest's string hash, which the str keeps once computed).
        if self._live:
            row = self._find(digest)
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
            raw = self._diff_id_bytes[row * DIGEST_BYTES:(row + 1) * DIGEST_BYTES]
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
        if row >= 0 and self._values[row] != FORGOTTEN:
            self._values[row] = FORGOTTEN
            self._live -= 1
            self._unindex_diff_id(row)

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
                yield SHA256_PREFIX + diff_ids[row * DIGEST_BYTES:(row + 1) * DIGEST_BYTES].hex()
        yield from layers._rare_diff_ids
