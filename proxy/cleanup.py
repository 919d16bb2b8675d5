"""Deleting leaked foreign blobs from the upstream, in the background, never failing anyone's push."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from yarl import URL

from proxy.config import CleanupSettings, UpstreamSettings
from proxy.logs import log_event
from proxy.registry_client import RegistryAccess, RegistryClient, RegistryError

logger = logging.getLogger("foreign_layer_proxy.cleanup")
FIRST_RETRY_SECONDS = 0.5
DELETED = frozenset({202, 404})  # 404: already gone, which is what the clean-up wants


class Cleaner:
    def __init__(
        self,
        upstream: URL,
        upstream_settings: UpstreamSettings,
        settings: CleanupSettings,
        on_result: Callable[[str], None] = lambda outcome: None,
    ):
        self.upstream = upstream
        self.access = RegistryAccess(
            insecure=upstream_settings.insecure,
            ca_file=upstream_settings.ca_file,
            username=settings.username,
            password=settings.password,
            bearer_token=settings.bearer_token,
        )
        self.attempts = settings.attempts
        self.on_result = on_result
        self._tasks: set[asyncio.Task[None]] = set()

    def delete_later(self, repository: str, digests: list[str]) -> None:
        task = asyncio.create_task(self._delete(repository, digests))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete(self, repository: str, digests: list[str]) -> None:
        async with RegistryClient(self.upstream, self.access) as registry:
            for digest in digests:
                outcome = await self._delete_one(registry, repository, digest)
                self.on_result(outcome)

    async def _delete_one(self, registry: RegistryClient, repository: str, digest: str) -> str:
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(FIRST_RETRY_SECONDS * 2 ** (attempt - 1))
            try:
                status = await registry.delete_blob(repository, digest)
            except RegistryError as error:
                problem = str(error)
                continue
            if status in DELETED:
                log_event(logger, logging.INFO, "decision", action="cleaned", repository=repository, digest=digest,
                          status=status, attempts=attempt + 1)
                return "cleaned"
            problem = f"upstream answered DELETE with {status}"
            if status in {401, 403, 405}:
                break  # neither credentials nor a disabled delete improve by retrying
        log_event(logger, logging.WARNING, "cleanup_failed", repository=repository, digest=digest, error=problem)
        return "cleanup_failed"

    async def close(self) -> None:
        """Let clean-ups in progress finish for a moment, then stop them."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
