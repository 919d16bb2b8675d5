"""The in-memory set of known foreign layers: what the hot path reads, kept in step with the store.

Requests only read `layers` (a dict look-up). Writes to the store and resyncs from it happen in one
background task, so that a slow or broken store never delays or fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from proxy.logs import log_event
from proxy.manifests import ForeignLayer
from proxy.store import ForeignStore, Sighting, StoreError

logger = logging.getLogger("foreign_layer_proxy.known")
RECENT_UPLOADS_CAPACITY = 100_000
# While the store is down, counters and upload records wait in memory up to this many; learned layers always wait.
MAX_PENDING_RECORDS = 100_000


@dataclass(frozen=True, slots=True)
class _Learned:
    layers: tuple[ForeignLayer, ...]
    sighting: Sighting


@dataclass(frozen=True, slots=True)
class _Counted:
    digest: str
    outcome: str
    nbytes: int
    repository: str | None


@dataclass(frozen=True, slots=True)
class _Uploaded:
    repository: str
    digest: str
    ttl: float


_Change = _Learned | _Counted | _Uploaded


def index_diff_ids(layers: Iterable[ForeignLayer]) -> dict[str, ForeignLayer]:
    return {layer.diff_id: layer for layer in layers if layer.diff_id}


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
        self.layers: dict[str, ForeignLayer] = dict(static or {})
        self.diff_ids: dict[str, ForeignLayer] = {}
        self._static: dict[str, ForeignLayer] = dict(static or {})
        self._unsaved: dict[str, ForeignLayer] = {}
        self._recent_uploads: dict[tuple[str, str], float] = {}
        self._pending: asyncio.Queue[_Change] = asyncio.Queue()
        self._generation: int | None = None
        self._wake = asyncio.Event()

    def learn(self, layers: Iterable[ForeignLayer], sighting: Sighting) -> list[ForeignLayer]:
        """Enforced from now on; saved in the background. Returns the layers new to this process."""
        layers = tuple(layers)
        new = [layer for layer in layers if layer.digest not in self.layers]
        for layer in layers:
            self.layers[layer.digest] = layer
            self._unsaved[layer.digest] = layer
        self.diff_ids.update(index_diff_ids(layers))
        if layers:
            self._queue(_Learned(layers, sighting))
        return new

    def count(self, digest: str, outcome: str, nbytes: int = 0, repository: str | None = None) -> None:
        if self._pending.qsize() < MAX_PENDING_RECORDS:
            self._pending.put_nowait(_Counted(digest, outcome, nbytes, repository))

    def record_upload(self, repository: str, digest: str, ttl: float) -> None:
        """A blob upload completed: kept for leak detection, here and (for other replicas) in the store."""
        if len(self._recent_uploads) >= RECENT_UPLOADS_CAPACITY:
            self._forget_expired_uploads()
        self._recent_uploads[(repository, digest)] = time.monotonic() + ttl
        if self._pending.qsize() < MAX_PENDING_RECORDS:
            self._queue(_Uploaded(repository, digest, ttl))

    async def uploaded_recently(self, repository: str, digests: Iterable[str]) -> set[str]:
        """Which of `digests` were uploaded to `repository` within the leak window, by any replica."""
        now = time.monotonic()
        wanted = set(digests)
        found = {digest for digest in wanted if self._recent_uploads.get((repository, digest), 0.0) > now}
        if wanted - found:
            try:
                await self.flush()
                found |= await self.store.recent_uploads(repository, wanted - found)
            except StoreError as error:
                self._report(error)
        return found

    def replace_static(self, static: Mapping[str, ForeignLayer]) -> None:
        self._static = dict(static)
        self._generation = None
        self._wake.set()

    async def flush(self) -> None:
        """Write everything pending; used at shutdown and by tests."""
        while not self._pending.empty():
            await self._write(self._pending.get_nowait())

    async def resync(self) -> None:
        generation = await self.store.generation()
        if generation == self._generation:
            return
        if self._generation is not None and generation < self._generation:
            # The store was reset (a Redis failover without persistence): give it back what we enforce.
            self._unsaved |= {digest: layer for digest, layer in self.layers.items() if digest not in self._static}
            self._queue(_Learned(tuple(self._unsaved.values()), Sighting("resync")))
        stored = await self.store.known()
        self.layers = {**self._static, **stored, **self._unsaved}
        self.diff_ids = index_diff_ids(self.layers.values())
        self._generation = generation

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

    def _forget_expired_uploads(self) -> None:
        now = time.monotonic()
        self._recent_uploads = {key: expiry for key, expiry in self._recent_uploads.items() if expiry > now}
        while len(self._recent_uploads) >= RECENT_UPLOADS_CAPACITY:
            del self._recent_uploads[next(iter(self._recent_uploads))]

    async def _write(self, change: _Change) -> None:
        try:
            if isinstance(change, _Learned):
                await self.store.learn(change.layers, change.sighting)
                for layer in change.layers:
                    if self._unsaved.get(layer.digest) is layer:
                        del self._unsaved[layer.digest]
            elif isinstance(change, _Counted):
                await self.store.count(change.digest, change.outcome, change.nbytes, change.repository)
            else:
                await self.store.record_upload(change.repository, change.digest, change.ttl)
        except StoreError:
            self._pending.put_nowait(change)
            raise
