"""The in-memory set of known foreign layers: what the hot path reads, kept in step with the store.

Requests only read `layers` (a CompactLayers: a probe or two of a hash index per digest) and `reach` (a dict). Writes to the store and resyncs from it happen
in one background task, so that a slow or broken store never delays or fails a request. A resync reads
only what changed since the generation this process last saw; a full reload only when the store no
longer has that history (or was reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from proxy.compact import CompactLayers, DiffIdIndex
from proxy.logs import log_event
from proxy.manifests import ForeignLayer
from proxy.store import (
    ForeignStore,
    KnownChanges,
    Sighting,
    StoreError,
    Tally,
    with_gaps_filled,
)
from proxy.trust import EVERYWHERE, Reach, teaches_more, widened

logger = logging.getLogger("foreign_layer_proxy.known")
RECENT_UPLOADS_CAPACITY = 100_000
# Counts and upload records wait in memory, added up, until the next write (one transaction per sync
# interval); while the store is down, up to this many different ones (a digest, outcome and repository,
# or an upload); learned layers always wait.
MAX_PENDING_RECORDS = 100_000


@dataclass(frozen=True, slots=True)
class _Learned:
    layers: tuple[ForeignLayer, ...]
    sighting: Sighting
    scope: str = EVERYWHERE
    candidate: bool = False


@dataclass(frozen=True, slots=True)
class _Sized:
    digest: str
    size: int


_Change = _Learned | _Sized


class KnownForeign:
    def __init__(
        self,
        store: ForeignStore,
        static: Mapping[str, ForeignLayer] | None = None,
        sync_interval: float = 0.5,
        on_store_error: Callable[[], None] = lambda: None,
    ):
        self.store = store
        self.sync_interval = sync_interval
        self.on_store_error = on_store_error
        # Every known digest, whatever its reach; `reach` only for those not enforced everywhere.
        self.layers = CompactLayers((static or {}).values())
        self.reach: dict[str, Reach] = {}
        self._static: dict[str, ForeignLayer] = dict(static or {})
        self._unsaved: dict[str, ForeignLayer] = {}
        # Oldest first: at capacity, the expired (or else the oldest) go first, one at a time.
        self._recent_uploads: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._pending: asyncio.Queue[_Change] = asyncio.Queue()
        self._tally = Tally()
        self._generation: int | None = None
        self._wake = asyncio.Event()

    @property
    def diff_ids(self) -> DiffIdIndex:
        return self.layers.diff_ids

    def teaches_more(self, digest: str, scope: str, candidate: bool) -> bool:
        """Whether a teaching of `digest` in `scope` would change what this process enforces or audits."""
        if digest in self._static:
            return False
        return teaches_more(self.reach.get(digest), digest in self.layers, scope, candidate)

    def learn(
        self, layers: Iterable[ForeignLayer], sighting: Sighting, *, scope: str = EVERYWHERE, candidate: bool = False
    ) -> list[ForeignLayer]:
        """Enforced (or, for a candidate, audited) in `scope` from now on; saved in the background.
        Returns the layers this changed anything for: new to this process, or reaching further."""
        layers = tuple(layers)
        taught = []
        for layer in layers:
            known = self.layers.get(layer.digest)
            if self.teaches_more(layer.digest, scope, candidate):
                taught.append(layer)
                reach = widened(self.reach.get(layer.digest), known is not None, scope, candidate)
                if reach is None:
                    self.reach.pop(layer.digest, None)
                else:
                    self.reach[layer.digest] = reach
            self._remember(with_gaps_filled(known, layer) if known is not None else layer)
            self._unsaved[layer.digest] = layer
        if layers:
            self._queue(_Learned(layers, sighting, scope, candidate))
        return taught

    def fill_size(self, digest: str, size: int) -> None:
        """A known layer's size, seen in a push, where its source did not give one (a digest file)."""
        known = self.layers.get(digest)
        if known is None or known.size or size <= 0:
            return
        self._remember(known := replace(known, size=size))
        if digest in self._static:
            self._static[digest] = known
        self._queue(_Sized(digest, size))

    def count(self, digest: str, outcome: str, nbytes: int = 0, repository: str | None = None) -> None:
        """Added up in memory; written with the next flush (at most one sync interval later)."""
        if len(self._tally) < MAX_PENDING_RECORDS or self._tally.holds((digest, outcome, repository)):
            self._tally.count(digest, outcome, nbytes, repository)

    def record_upload(self, repository: str, digest: str, ttl: float) -> None:
        """A blob upload completed: kept for leak detection, here and (for other replicas) in the store."""
        now = time.monotonic()
        uploads = self._recent_uploads
        while uploads and (len(uploads) >= RECENT_UPLOADS_CAPACITY or next(iter(uploads.values())) <= now):
            uploads.popitem(last=False)
        uploads[repository, digest] = now + ttl
        uploads.move_to_end((repository, digest))
        if len(self._tally) < MAX_PENDING_RECORDS or self._tally.holds((repository, digest)):
            self._tally.upload(repository, digest, ttl)
            # Written at once (with whatever else is waiting): a manifest naming it may come to another replica.
            self._wake.set()

    async def claim_uploads(self, repository: str, digests: Iterable[str]) -> set[str]:
        """Which of `digests` were uploaded to `repository` within the leak window, by any replica; each
        upload is claimed once, so that it counts as one leak however many manifests name it."""
        now = time.monotonic()
        wanted = set(digests)
        claimed = {digest for digest in wanted if self._recent_uploads.pop((repository, digest), 0.0) > now}
        try:
            await self.flush()
            claimed |= await self.store.claim_uploads(repository, wanted)
        except StoreError as error:
            self._report(error)
        return claimed

    def replace_static(self, static: Mapping[str, ForeignLayer]) -> None:
        self._static = dict(static)
        self._generation = None
        self._wake.set()

    async def flush(self) -> None:
        """Write everything pending, the counts and uploads added up in one store call; used at shutdown
        and by tests. What a failed write was to write stays pending."""
        while not self._pending.empty():
            await self._write(self._pending.get_nowait())
        if not self._tally:
            return
        tally, self._tally = self._tally, Tally()
        try:
            await self.store.record(tally)
        except StoreError:
            tally.merge(self._tally, MAX_PENDING_RECORDS)
            self._tally = tally
            raise

    async def resync(self) -> None:
        generation = await self.store.generation()
        if generation == self._generation:
            return
        if self._generation is not None and generation < self._generation:
            # The store was reset (a Redis failover without persistence): give it back what we enforce.
            self._refill()
            await self.reload()
            return
        changes = None if self._generation is None else await self.store.changes(self._generation)
        if changes is None:
            await self.reload()
        else:
            self._apply(changes)

    async def reload(self) -> None:
        """Everything again from the store: at start, and when following its changes is not possible."""
        snapshot = await self.store.snapshot()
        unsaved_reach = {digest: self.reach[digest] for digest in self._unsaved if digest in self.reach}
        given = snapshot.layers
        layers = given if isinstance(given, CompactLayers) else CompactLayers(given.values())
        # The stores read straight into a compact set: never a million ForeignLayers at once.
        for digest, layer in self._static.items():
            if digest not in layers:
                layers.put(layer)
        for layer in self._unsaved.values():
            layers.put(layer)
        self.layers = layers
        self.reach = {
            digest: reach for digest, reach in snapshot.reach.items()
            if digest not in self._static and digest not in self._unsaved
        } | unsaved_reach  # fmt: skip
        self._generation = snapshot.generation

    def _refill(self) -> None:
        """Queue everything this process enforces for writing, each layer in the scopes it reaches."""
        self._unsaved |= {digest: layer for digest, layer in self.layers.items() if digest not in self._static}
        everywhere = tuple(layer for digest, layer in self._unsaved.items() if digest not in self.reach)
        self._queue(_Learned(everywhere, Sighting("resync")))
        for digest, reach in self.reach.items():
            layer = (self._unsaved[digest],)
            for scope in reach.enforced:
                self._queue(_Learned(layer, Sighting("resync"), scope))
            for scope in reach.candidate:
                self._queue(_Learned(layer, Sighting("resync"), scope, candidate=True))

    def _apply(self, changes: KnownChanges) -> None:
        for digest, entry in changes.changed.items():
            if digest in self._unsaved:
                continue  # our own write is on its way; its change comes with a later generation
            self._forget_locally(digest)
            if entry is None:
                if (static := self._static.get(digest)) is not None:
                    self._remember(static)
                continue
            layer, reach = entry
            self._remember(layer)
            if reach is not None and digest not in self._static:
                self.reach[digest] = reach
        self._generation = changes.generation

    def _remember(self, layer: ForeignLayer) -> None:
        self.layers.put(layer)

    def _forget_locally(self, digest: str) -> None:
        self.layers.pop_layer(digest)
        self.reach.pop(digest, None)

    async def run(self) -> None:
        """Save pending writes and follow other processes' changes until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.sync_interval)
            self._wake.clear()
            try:
                await self.flush()
                await self.resync()
            except StoreError as error:
                self._report(error)

    def _queue(self, change: _Change) -> None:
        self._pending.put_nowait(change)
        self._wake.set()

    def _report(self, error: StoreError) -> None:
        self.on_store_error()
        log_event(logger, logging.WARNING, "store_error", error=str(error))

    async def _write(self, change: _Change) -> None:
        try:
            if isinstance(change, _Learned):
                await self.store.learn(change.layers, change.sighting, scope=change.scope, candidate=change.candidate)
                for layer in change.layers:
                    if self._unsaved.get(layer.digest) is layer:
                        del self._unsaved[layer.digest]
            else:
                await self.store.fill_size(change.digest, change.size)
        except StoreError:
            self._pending.put_nowait(change)
            raise
