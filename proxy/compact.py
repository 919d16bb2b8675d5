"""A compact set of known foreign layers: a million digests in about 130 MiB rather than 400. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from proxy.manifests import ForeignLayer

SHA256_PREFIX = "sha256:"
MADE_CAPACITY = 4096
MEDIA_BITS = 3
RARE = (1 << MEDIA_BITS) - 1  # the media code of a layer whose fields are kept whole, in `_rare`
# A layer's one URL, as manifests give it (`https://mcr.microsoft.com/v2/.../blobs/sha256:...`), is kept as the
# number of its pattern, the URL with the digest cut out: manifests of one base image share a few patterns.
URL_BITS = 12
URL_PATTERNS = (1 << URL_BITS) - 1  # code 0: no urls
SIZE_SHIFT = MEDIA_BITS + URL_BITS


def _key(digest: str) -> int:
    """The look-up key of a sha256 digest: its 256 bits as an int. int() also takes other spellings (upper
    case, "_", a sign, another algorithm's hex): a hit counts only for the one canonical spelling."""
    try:
        return int(digest[7:], 16)
    except ValueError:
        return -1  # never a key


def _canonical(digest: str, key: int) -> bool:
    return digest == f"{SHA256_PREFIX}{key:064x}"


class CompactLayers(Mapping[str, ForeignLayer]):
    """Known layers by digest in about 100 bytes each instead of a ForeignLayer (some 300): a sha256 digest's
    256 bits (one int) map to one int packing the size, the media type (one of a few interned) and the pattern
    of its URL (one of a few thousand); the rare layers with a diff_id, other urls or an eighth media type
    are kept whole beside. A ForeignLayer is made only
    when one is asked for (on the hot path: a known digest), and the last few made are kept."""

    def __init__(self, layers: Iterable[ForeignLayer] = ()):
        self._known: dict[int, int] = {}
        self._other: dict[str, int] = {}  # digests of another algorithm or spelling
        self._media_types: list[str] = []
        self._url_patterns: list[tuple[str, str]] = []
        self._url_codes: dict[tuple[str, str], int] = {}
        self._rare: dict[str, tuple[str, tuple[str, ...], str | None]] = {}
        self._by_diff_id: dict[str, str] = {}  # diff_id -> digest
        self._made: dict[str, ForeignLayer] = {}
        self.diff_ids = DiffIdIndex(self)
        self._load(layers)

    def _load(self, layers: Iterable[ForeignLayer]) -> None:
        """`put` for each, with the common case (a new canonical digest, no rare fields) inline: a load at start."""
        known = self._known
        media_type, code = None, RARE
        for layer in layers:
            digest = layer.digest
            key = _key(digest)
            if layer.media_type is not media_type:
                media_type, code = layer.media_type, self._media_code(layer.media_type)
            if key in known or layer.urls or layer.diff_id or code == RARE or not _canonical(digest, key):
                self.put(layer)
            else:
                known[key] = layer.size << SIZE_SHIFT | code

    def add_many(self, rows: Iterable[Sequence[Any]]) -> None:
        """`add` for each row of (digest, media_type, size, urls, diff_id), the common cases (a new canonical
        digest, no rare fields, no urls or one URL of a known pattern) inline: what a store's load is made of,
        a million times."""
        known, url_codes = self._known, self._url_codes
        media_type, code = None, RARE
        for row in rows:
            digest, size, urls, diff_id = row[0], row[2], row[3], row[4]
            if row[1] != media_type:
                media_type, code = row[1], self._media_code(row[1])
            try:
                key = int(digest[7:], 16)
            except ValueError:
                key = -1
            pattern = 0
            if urls and len(urls) == 1:
                before, named, after = urls[0].partition(digest)
                pattern = url_codes.get((before, after), -1) if named else -1
            if (pattern < 0 or (urls and not pattern) or diff_id or code == RARE or key in known
                    or digest != f"{SHA256_PREFIX}{key:064x}"):  # fmt: skip
                self.add(digest, row[1], size, tuple(urls or ()), diff_id)
            else:
                known[key] = size << SIZE_SHIFT | pattern << MEDIA_BITS | code

    def _packed(self, digest: str) -> int | None:
        key = _key(digest)
        packed = self._known.get(key)
        if packed is not None and _canonical(digest, key):
            return packed
        return self._other.get(digest) if self._other else None

    def get(self, digest: str, default: ForeignLayer | None = None) -> ForeignLayer | None:  # type: ignore[override]
        # The hot path, for every digest a push names: mostly unknown ones, so that a miss costs one look-up,
        # and a known one pushed again is a second (the layers made last are kept, by exact spelling).
        try:
            key = int(digest[7:], 16)
        except ValueError:
            key = -1
        packed = self._known.get(key)
        if packed is None and not self._other:
            return default
        made = self._made.get(digest)
        if made is not None:
            return made
        if packed is None or not _canonical(digest, key):
            packed = self._other.get(digest)
        return default if packed is None else self._layer(digest, packed)

    def _layer(self, digest: str, packed: int) -> ForeignLayer:
        code, size = packed & RARE, packed >> SIZE_SHIFT
        if code == RARE:
            media_type, urls, diff_id = self._rare[digest]
            layer = ForeignLayer(digest, media_type, size, urls, diff_id)
        elif pattern := packed >> MEDIA_BITS & URL_PATTERNS:
            before, after = self._url_patterns[pattern - 1]
            layer = ForeignLayer(digest, self._media_types[code], size, (f"{before}{digest}{after}",))
        else:
            layer = ForeignLayer(digest, self._media_types[code], size)
        if len(self._made) >= MADE_CAPACITY:
            self._made.clear()
        self._made[digest] = layer
        return layer

    def __getitem__(self, digest: str) -> ForeignLayer:
        packed = self._packed(digest)
        if packed is None:
            raise KeyError(digest)
        return self._layer(digest, packed)

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and self._packed(digest) is not None

    def __len__(self) -> int:
        return len(self._known) + len(self._other)

    def __iter__(self) -> Iterator[str]:
        for key in self._known:
            yield f"{SHA256_PREFIX}{key:064x}"
        yield from self._other

    def put(self, layer: ForeignLayer) -> None:
        self.add(layer.digest, layer.media_type, layer.size, layer.urls, layer.diff_id)

    def add(
        self, digest: str, media_type: str, size: int, urls: tuple[str, ...] = (), diff_id: str | None = None
    ) -> None:
        """Add or replace a layer (a store reads rows into this, no ForeignLayer made); the diff_id index
        then names it for its diff_id."""
        self._unindex(digest)
        code = self._media_code(media_type)
        pattern = self._url_pattern(digest, urls) if code != RARE and not diff_id else 0
        if pattern is None or diff_id or code == RARE:
            code, pattern = RARE, 0
            self._rare[digest] = (media_type, urls, diff_id)
            if diff_id:
                self._by_diff_id[diff_id] = digest
        packed = size << SIZE_SHIFT | pattern << MEDIA_BITS | code
        key = _key(digest)
        if _canonical(digest, key):
            self._known[key] = packed
        else:
            self._other[digest] = packed

    def pop_layer(self, digest: str) -> ForeignLayer | None:
        packed = self._packed(digest)
        if packed is None:
            return None
        layer = self._layer(digest, packed)
        self._unindex(digest)
        key = _key(digest)
        if _canonical(digest, key):
            del self._known[key]
        else:
            del self._other[digest]
        return layer

    def _unindex(self, digest: str) -> None:
        self._made.pop(digest, None)
        rare = self._rare.pop(digest, None)
        if rare is not None and rare[2] and self._by_diff_id.get(rare[2]) == digest:
            del self._by_diff_id[rare[2]]

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
        if len(self._media_types) < RARE:
            self._media_types.append(media_type)
            return len(self._media_types) - 1
        return RARE


class DiffIdIndex(Mapping[str, ForeignLayer]):
    """The known layers by diff_id (their uncompressed digest), for those that have one."""

    def __init__(self, layers: CompactLayers):
        self._layers = layers

    def get(self, diff_id: str, default: ForeignLayer | None = None) -> ForeignLayer | None:  # type: ignore[override]
        digest = self._layers._by_diff_id.get(diff_id)
        return default if digest is None else self._layers.get(digest, default)

    def __getitem__(self, diff_id: str) -> ForeignLayer:
        return self._layers[self._layers._by_diff_id[diff_id]]

    def __contains__(self, diff_id: object) -> bool:
        return diff_id in self._layers._by_diff_id

    def __len__(self) -> int:
        return len(self._layers._by_diff_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers._by_diff_id)
