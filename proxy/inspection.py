"""Opt-in content inspection (`policy.inspect_content`): the sha256 and the uncompressed digest (diff_id)
of a blob, computed while it streams through, so that a recompressed foreign layer, or one named by
another digest algorithm, is recognised at its closing PUT, before the registry commits it. Upload sessions are kept in this process: behind a
load balancer, inspection needs requests of one session to reach one replica (sticky sessions).
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator

GZIP_WINDOW = 16 + zlib.MAX_WBITS
MAX_INFLATED_CHUNK = 1024 * 1024
MAX_SESSIONS = 4096


class LayerInspector:
    """sha256 of the decompressed stream of a (possibly multi-member) gzip blob."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(GZIP_WINDOW)
        self._hash = hashlib.sha256()
        self._raw_hash = hashlib.sha256()
        self.failed = False
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._raw_hash.update(chunk)
        if self.failed:
            return
        try:
            pending = chunk
            while pending:
                # Bounded output per call: a small gzip bomb must not become a large buffer.
                self._hash.update(self._inflate.decompress(pending, MAX_INFLATED_CHUNK))
                pending = self._inflate.unconsumed_tail
                if self._inflate.eof and self._inflate.unused_data:
                    pending = self._inflate.unused_data
                    self._inflate = zlib.decompressobj(GZIP_WINDOW)
        except zlib.error:
            self.failed = True

    def digest(self) -> str:
        """The sha256 of the blob as sent, whatever digest the client names it by."""
        return "sha256:" + self._raw_hash.hexdigest()

    def diff_id(self) -> str | None:
        if self.failed or not self._inflate.eof:
            return None
        return "sha256:" + self._hash.hexdigest()


class UploadInspections:
    """Inspectors by upload session, forgotten when the session completes or after `ttl` seconds."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._sessions: OrderedDict[str, tuple[LayerInspector, float]] = OrderedDict()

    def session(self, upload: str) -> LayerInspector:
        now = time.monotonic()
        inspector, _ = self._sessions.pop(upload, (None, 0.0))
        self._sessions[upload] = (inspector := inspector or LayerInspector(), now + self.ttl)
        while self._sessions and (len(self._sessions) > MAX_SESSIONS or next(iter(self._sessions.values()))[1] < now):
            self._sessions.popitem(last=False)
        return inspector

    def finish(self, upload: str) -> LayerInspector | None:
        inspector, _ = self._sessions.pop(upload, (None, 0.0))
        return inspector


async def inspected(body: AsyncIterator[bytes], inspector: LayerInspector) -> AsyncIterator[bytes]:
    """The request body, passing every chunk through the inspector on its way upstream."""
    async for chunk in body:
        inspector.feed(chunk)
        yield chunk
