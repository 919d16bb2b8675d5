"""Opt-in content inspection (`policy.inspect_content`): the sha256 and the uncompressed digest (diff_id)
of a blob, computed from the bytes the registry accepted, so that a recompressed foreign layer, or one named by
another digest algorithm, is recognised at its closing PUT, before the registry commits it.

An upload is inspected only when the gateway saw its session open; each chunk is hashed into a copy of the
upload's inspector, off the event loop and one chunk at a time, and the copy replaces the inspector only when
the registry answered 202 with a size that matches. Upload sessions are kept in this process: behind a load
balancer, inspection needs requests of one session to reach one replica (sticky sessions).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

GZIP_WINDOW = 16 + zlib.MAX_WBITS
MAX_INFLATED_CHUNK = 1024 * 1024
# Real layers inflate a few times over (sparse files a few dozen); past this ratio, after the first
# INFLATE_GRACE_BYTES, or past MAX_INFLATED_BYTES in all, inflating stops and the upload is unverifiable.
MAX_INFLATE_RATIO = 100
INFLATE_GRACE_BYTES = 64 * 1024 * 1024
MAX_INFLATED_BYTES = 64 * 1024**3
# An upload no request has touched for this long is forgotten (its place is needed by new ones).
IDLE_SECONDS = 900.0

UploadKey = tuple[str, str]  # (repository, upload session id)


class LayerInspector:
    """sha256 of a blob and of the decompressed stream of a (possibly multi-member) gzip blob, within bounds."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(GZIP_WINDOW)
        self._hash = hashlib.sha256()
        self._raw_hash = hashlib.sha256()
        self.not_gzip = False
        self.past_limits = False
        self.size = 0
        self.inflated = 0

    def copy(self) -> LayerInspector:
        twin = LayerInspector.__new__(LayerInspector)
        twin._inflate = self._inflate.copy()
        twin._hash = self._hash.copy()
        twin._raw_hash = self._raw_hash.copy()
        twin.not_gzip, twin.past_limits, twin.size, twin.inflated = (
            self.not_gzip, self.past_limits, self.size, self.inflated
        )  # fmt: skip
        return twin

    def feed(self, chunk: bytes) -> None:
        """CPU-bound (zlib and hashlib release the GIL): called in a worker thread."""
        self.size += len(chunk)
        self._raw_hash.update(chunk)
        if self.not_gzip or self.past_limits:
            return
        try:
            pending = chunk
            while pending:
                # Bounded output per call: a small gzip bomb must not become a large buffer.
                inflated = self._inflate.decompress(pending, MAX_INFLATED_CHUNK)
                self.inflated += len(inflated)
                if self.inflated > min(MAX_INFLATED_BYTES, max(INFLATE_GRACE_BYTES, MAX_INFLATE_RATIO * self.size)):
                    self.past_limits = True
                    return
                self._hash.update(inflated)
                pending = self._inflate.unconsumed_tail
                if self._inflate.eof and self._inflate.unused_data:
                    pending = self._inflate.unused_data
                    self._inflate = zlib.decompressobj(GZIP_WINDOW)
        except zlib.error:
            self.not_gzip = True

    def digest(self) -> str:
        """The sha256 of the blob as sent, whatever digest the client names it by."""
        return "sha256:" + self._raw_hash.hexdigest()

    def diff_id(self) -> str | None:
        if self.not_gzip or self.past_limits or not self._inflate.eof:
            return None
        return "sha256:" + self._hash.hexdigest()


@dataclass(slots=True)
class InspectedUpload:
    inspector: LayerInspector = field(default_factory=LayerInspector)
    expires: float = 0.0
    busy: bool = False
    out_of_step: str | None = None  # why the inspector may not hold what the registry holds

    def unverifiable(self) -> str | None:
        if self.busy:
            return "another request of this upload is still under way"
        if self.out_of_step is not None:
            return self.out_of_step
        if self.inspector.past_limits:
            return "the blob inflates past the inspection limits"
        return None


class UploadInspections:
    """Inspected uploads by (repository, session), opened only for sessions the gateway saw start, forgotten when
    the upload completes or is cancelled, or when it has been idle for `idle` seconds. Never more than
    `capacity`: a new upload is refused rather than one in flight forgotten."""

    def __init__(self, capacity: int, idle: float = IDLE_SECONDS):
        self.capacity = capacity
        self.idle = idle
        self._uploads: dict[UploadKey, InspectedUpload] = {}
        self._reserved = 0

    def __len__(self) -> int:
        return len(self._uploads)

    def reserve(self) -> bool:
        """A place for an upload about to start; give it back with open() or release()."""
        now = time.monotonic()
        for key in [key for key, upload in self._uploads.items() if upload.expires < now and not upload.busy]:
            del self._uploads[key]
        if len(self._uploads) + self._reserved >= self.capacity:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        self._reserved -= 1

    def open(self, key: UploadKey) -> None:
        self._reserved -= 1
        self._uploads[key] = InspectedUpload(expires=time.monotonic() + self.idle)

    def get(self, key: UploadKey) -> InspectedUpload | None:
        upload = self._uploads.get(key)
        now = time.monotonic()
        if upload is None or (upload.expires < now and not upload.busy):
            self._uploads.pop(key, None)
            return None
        upload.expires = now + self.idle
        return upload

    def finish(self, key: UploadKey) -> InspectedUpload | None:
        return self._uploads.pop(key, None)


class TentativeFeed:
    """A request body's chunks hashed into a copy of an upload's inspector, each in a worker thread while the
    next one is read, so that at most one chunk per upload is in flight; `settled()` is the copy once every
    chunk is in, for the caller to keep only if the registry accepted them."""

    def __init__(self, inspector: LayerInspector):
        self._inspector = inspector.copy()
        self._pending: asyncio.Future[None] | None = None

    async def body(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            await self._wait()
            self._pending = asyncio.ensure_future(asyncio.to_thread(self._inspector.feed, chunk))
            yield chunk
        await self._wait()

    async def settled(self) -> LayerInspector:
        await self._wait()
        return self._inspector

    async def _wait(self) -> None:
        # Shielded and not cleared: aiohttp cancels the body's writer when the registry answers early, and
        # settled() must still see that chunk through.
        if self._pending is not None:
            await asyncio.shield(self._pending)


def range_end(value: str | None) -> int | None:
    """The last byte of a `Range: 0-N` (or `bytes=0-N`) upload status; None when absent or malformed."""
    if value is None:
        return None
    _, _, end = value.rpartition("-")
    return int(end) if end.isascii() and end.isdigit() else None


def matches_range(inspector: LayerInspector, value: str | None) -> bool:
    """Whether the registry's upload size is the inspector's (distribution says `0-0` for 0 and 1 byte)."""
    end = range_end(value)
    return end is not None and end == max(inspector.size - 1, 0)
