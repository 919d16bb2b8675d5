"""The in-memory set of known foreign layers: what the hot path reads, kept in step with the store.

Requests only read `layers` (a dict look-up). Writes to the store and resyncs from it happen in one
background task, so that a slow or broken store never delays or fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from proxy.logs import log_event
from proxy.manifests import ForeignLayer
from proxy.store import ForeignStore, Sighting, StoreError

logger = logging.getLogger("foreign_layer_proxy.known")


@dataclass(frozen=True, slots=True)
class _Learned:
    layers: tuple[ForeignLayer, ...]
    sighting: Sighting


@dataclass(frozen=True, slots=True)
class _Counted:
    digest: str
    outcome: str
    nbytes: int


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
        self.layers: dict[str, ForeignLayer] = dict(static or {})
        self.on_store_error = on_store_error
        self._static: dict[str, ForeignLayer] = dict(static or {})
        self._unsaved: dict[str, ForeignLayer] = {}
        self._pending: asyncio.Queue[_Learned | _Counted] = asyncio.Queue()
        self._generation: int | None = None
        self._wake = asyncio.Event()

    def learn(self, layers: Iterable[ForeignLayer], sighting: Sighting) -> list[ForeignLayer]:
        """Enforced from now on; saved in the background. Returns the layers new to this process."""
        layers = tuple(layers)
        new = [layer for layer in layers if layer.digest not in self.layers]
        for layer in layers:
            self.layers[layer.digest] = layer
            self._unsaved[layer.digest] = layer
        if layers:
            self._pending.put_nowait(_Learned(layers, sighting))
            self._wake.set()
        return new

    def count(self, digest: str, outcome: str, nbytes: int = 0) -> None:
        self._pending.put_nowait(_Counted(digest, outcome, nbytes))

    def replace_static(self, static: Mapping[str, ForeignLayer]) -> None:
        self._static = dict(static)
        self._wake.set()
        self._generation = None

    async def flush(self) -> None:
        """Write everything pending; used at shutdown and by tests."""
        while not self._pending.empty():
            await self._write(self._pending.get_nowait())

    async def resync(self) -> None:
        generation = await self.store.generation()
        if generation == self._generation:
            return
        stored = await self.store.known()
        self.layers = {**self._static, **stored, **self._unsaved}
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
                self.on_store_error()
                log_event(logger, logging.WARNING, "store_error", error=str(error))

    async def _write(self, item: _Learned | _Counted) -> None:
        try:
            if isinstance(item, _Learned):
                await self.store.learn(item.layers, item.sighting)
                for layer in item.layers:
                    if self._unsaved.get(layer.digest) is layer:
                        del self._unsaved[layer.digest]
            else:
                await self.store.count(item.digest, item.outcome, item.nbytes)
        except StoreError:
            self._pending.put_nowait(item)
            raise
