"""A day of traffic: one long-lived gateway in front of one registry, steps of real client traffic, and what
must hold after every one of them.

`Day.step` runs one step under a watchdog that probes the gateway while the step runs: a gateway that stops
answering is killed at once (so the clients waiting on it fail too) and the step fails, instead of the suite
hanging. After the step `Day.check` asserts, in this order:
- the gateway's CPU is idle again (a spinning loop is at 100 % of a core; a liveness check, not a speed one);
- the gateway answers `/v2/`, the admin `/healthz` and `/metrics` within a second (the event-loop lag gauges are
  recorded from `/metrics`, here and by the watchdog);
- no foreign content is in the registry's storage: neither a blob named by a known foreign digest nor one whose
  gzip'd content is a foreign layer's (a recompressed copy), linked in a repository whose rule blocks, or
  committed at all unless a repository whose rule allows it links it (or it is a tolerated, reported leak), nor
  held by an upload session left open in a repository whose rule blocks;
- every image accepted so far pulls back through the gateway with the same manifest digest, every blob it
  names (foreign layers only where the rule allows them) with its digest.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .gateway import GatewayProcess
from .images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    FOREIGN_LAYER_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    OCI_NONDISTRIBUTABLE_LAYER,
    sha256_digest,
)
from .registry import Registry

T = TypeVar("T")

PROBE_SECONDS = 1.0
# While a step runs: the gateway counts as frozen after this many probes in a row without an answer.
FROZEN_AFTER_PROBES = 3
WATCH_INTERVAL_SECONDS = 0.5
STEP_TIMEOUT_SECONDS = 150.0
# After a step: the gateway's CPU over a window of this length must fall under IDLE_CPU_FRACTION of a core, in
# one of IDLE_WINDOWS windows in a row (the first may still see the end of the step's requests being logged).
CPU_WINDOW_SECONDS = 0.5
IDLE_CPU_FRACTION = 0.2
IDLE_WINDOWS = 6
LAG_GAUGE = "foreign_layer_proxy_event_loop_lag_seconds"
LAG_MAX_GAUGE = "foreign_layer_proxy_event_loop_lag_max_seconds"  # the process's own record since it started
PULL_CONCURRENCY = 8
ACCEPT_MANIFESTS = f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}, {OCI_INDEX}"
FOREIGN_MEDIA_TYPES = FOREIGN_LAYER_TYPES | {
    OCI_NONDISTRIBUTABLE_LAYER.removesuffix("+gzip"),
    OCI_NONDISTRIBUTABLE_LAYER.replace("+gzip", "+zstd"),
}


class GatewayFrozen(AssertionError):
    pass


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Accepted:
    """An image the registry took through the gateway, to be pulled back after every later step."""

    repository: str
    reference: str
    manifest_digest: str
    step: str


@dataclass(frozen=True)
class StepRecord:
    name: str
    seconds: float
    idle_cpu_fraction: float  # of one core, in the window that counted as idle
    first_cpu_fraction: float  # of one core, in the first window after the step


@dataclass(frozen=True)
class Rules:
    """Per-repository actions, by repository name prefix (first match wins), as the gateway's config gets them."""

    default: str
    by_prefix: tuple[tuple[str, str], ...] = ()

    def action(self, repository: str) -> str:
        return next((action for prefix, action in self.by_prefix if repository.startswith(prefix)), self.default)

    def policy(self) -> dict[str, Any]:
        return {
            "default": self.default,
            "rules": [{"repository": f"{prefix}**", "action": action} for prefix, action in self.by_prefix],
        }


@dataclass
class Day:
    gateway: GatewayProcess
    registry: Registry
    http: aiohttp.ClientSession
    rules: Rules
    foreign_layers: tuple[bytes, ...]  # the shared foreign base layers, as first pushed
    accepted: list[Accepted] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    lag_samples: list[tuple[float, str]] = field(default_factory=list)  # (seconds, during or after which step)
    lag_max_reported: float | None = None
    # (repository, digest) of recompressed foreign layers a client committed where the gateway could not know them
    # (inspect_content off), each one reported by the gateway as `leaked`: the known gap, tracked explicitly.
    tolerated_leaks: set[tuple[str, str]] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)  # steps left out, and why
    _foreign_content: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.foreign_digests = {sha256_digest(data) for data in self.foreign_layers}
        self.foreign_diff_ids = {sha256_digest(gzip.decompress(data)) for data in self.foreign_layers}

    # steps

    async def step(self, name: str, action: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        work = asyncio.ensure_future(action())
        watchdog = asyncio.ensure_future(self._watch(name))
        try:
            done, _ = await asyncio.wait({work, watchdog}, timeout=STEP_TIMEOUT_SECONDS,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if work not in done:
                self._kill_gateway()
                await asyncio.wait({work}, timeout=30)
                if watchdog in done:
                    watchdog.result()
                raise AssertionError(f"step {name!r} did not end within {STEP_TIMEOUT_SECONDS:g} s")
            result = work.result()
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        seconds = time.monotonic() - started
        first_cpu, idle_cpu = await self.check_idle(name)
        await self.check(name)
        self.steps.append(StepRecord(name, seconds, idle_cpu, first_cpu))
        return result

    def accept(self, repository: str, reference: str, manifest_digest: str, step: str) -> None:
        self.accepted.append(Accepted(repository, reference, manifest_digest, step))

    def blocks(self, repository: str) -> bool:
        return self.rules.action(repository) in {"drop", "reject"}

    async def _watch(self, step: str) -> None:
        """Returns never; raises GatewayFrozen (after killing the gateway) once it stops answering."""
        missed = 0
        while True:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            try:
                async with asyncio.timeout(PROBE_SECONDS):
                    await self._probe_admin(step)
                missed = 0
            except (TimeoutError, aiohttp.ClientError, AssertionError):
                missed += 1
            if missed >= FROZEN_AFTER_PROBES:
                cpu = await self.cpu_fraction()
                self._kill_gateway()
                raise GatewayFrozen(
                    f"during step {step!r} the gateway left {missed} probes in a row without an answer within "
                    f"{PROBE_SECONDS:g} s, at {cpu:.0%} of a core; killed it\n{self.gateway.process.log_text()[-3000:]}"
                )

    async def _probe_admin(self, step: str) -> None:
        async with self.http.get(f"{self.gateway.admin_url}/healthz") as response:
            assert response.status == 200, response.status
        async with self.http.get(f"{self.gateway.admin_url}/metrics") as response:
            self._record_lag(await response.text(), step)

    def _record_lag(self, exposition: str, step: str) -> None:
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                if sample.name == LAG_GAUGE:
                    self.lag_samples.append((sample.value, step))
                elif sample.name == LAG_MAX_GAUGE:
                    self.lag_max_reported = sample.value

    def _kill_gateway(self) -> None:
        if self.gateway.process.running:
            os.kill(self.gateway.process.pid, signal.SIGKILL)

    # after every step

    async def cpu_fraction(self) -> float:
        pid = self.gateway.process.pid
        before, started = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(CPU_WINDOW_SECONDS)
        return (cpu_seconds(pid) - before) / (time.monotonic() - started)

    async def check_idle(self, step: str) -> tuple[float, float]:
        fractions = []
        for _ in range(IDLE_WINDOWS):
            fractions.append(await self.cpu_fraction())
            if fractions[-1] < IDLE_CPU_FRACTION:
                return fractions[0], fractions[-1]
        raise AssertionError(
            f"after step {step!r} the gateway stayed busy: {', '.join(f'{f:.0%}' for f in fractions)} of a core "
            f"in {len(fractions)} windows of {CPU_WINDOW_SECONDS:g} s"
        )

    async def check(self, step: str) -> None:
        await self.check_probes(step)
        self.check_storage(step)
        await self.check_pulls(step)

    async def check_probes(self, step: str) -> None:
        for url in (f"{self.gateway.url}/v2/", f"{self.gateway.admin_url}/healthz", f"{self.gateway.admin_url}/metrics"):
            try:
                async with asyncio.timeout(PROBE_SECONDS), self.http.get(url) as response:
                    assert response.status == 200, f"after step {step!r}: {url} answered {response.status}"
                    if url.endswith("/metrics"):
                        self._record_lag(await response.text(), step)
            except TimeoutError:
                raise AssertionError(f"after step {step!r}: {url} gave no answer within {PROBE_SECONDS:g} s") from None

    def is_foreign_content(self, digest: str, data_path: Path) -> bool:
        """A known foreign digest, or gzip'd content whose uncompressed digest is a foreign layer's diff_id."""
        if digest not in self._foreign_content:
            self._foreign_content[digest] = digest in self.foreign_digests or self._inflates_to_foreign(data_path)
        return self._foreign_content[digest]

    def _inflates_to_foreign(self, data_path: Path) -> bool:
        try:
            content = gzip.decompress(data_path.read_bytes())
        except (OSError, EOFError, zlib.error):
            return False
        return sha256_digest(content) in self.foreign_diff_ids

    def storage(self) -> tuple[dict[str, Path], dict[str, set[str]]]:
        """(committed blobs: digest -> data file, repository -> digests its `_layers` links)."""
        v2 = self.registry.root / "docker/registry/v2"
        blobs = {f"sha256:{data.parent.name}": data for data in (v2 / "blobs/sha256").glob("*/*/data")}
        links: dict[str, set[str]] = {}
        for layers in (v2 / "repositories").rglob("_layers"):
            repository = str(layers.parent.relative_to(v2 / "repositories"))
            links[repository] = {f"sha256:{link.parent.name}" for link in layers.glob("sha256/*/link")}
        return blobs, links

    def check_storage(self, step: str) -> None:
        blobs, links = self.storage()
        foreign = {digest for digest, path in blobs.items() if self.is_foreign_content(digest, path)}
        linked_where_blocked = sorted(
            (repository, digest)
            for repository, digests in links.items()
            for digest in digests & foreign
            if self.blocks(repository) and (repository, digest) not in self.tolerated_leaks
        )
        assert not linked_where_blocked, (
            f"after step {step!r}: foreign content linked in repositories whose rule blocks: {linked_where_blocked}"
        )
        uploads = self.registry.root / "docker/registry/v2/repositories"
        unfinished = sorted(
            str(data.parent.relative_to(uploads))
            for data in uploads.glob("**/_uploads/*/data")
            if self.blocks(str(data.parent.parent.parent.relative_to(uploads))) and self._inflates_to_foreign(data)
        )
        assert not unfinished, f"after step {step!r}: upload sessions holding a foreign layer left open: {unfinished}"
        kept_by = {digest for repository, digests in links.items() if not self.blocks(repository) for digest in digests}
        kept_by |= {digest for _, digest in self.tolerated_leaks}
        unaccounted = sorted(foreign - kept_by)
        assert not unaccounted, f"after step {step!r}: foreign blobs committed that no allowing repository links: {unaccounted}"

    async def check_pulls(self, step: str) -> None:
        limit = asyncio.Semaphore(PULL_CONCURRENCY)

        async def pull(image: Accepted) -> None:
            async with limit:
                await self.pull_back(image, step)

        await asyncio.gather(*(pull(image) for image in self.accepted))

    async def pull_back(self, image: Accepted, step: str) -> None:
        where = f"after step {step!r}, {image.repository}:{image.reference} (pushed in {image.step!r})"
        base = f"{self.gateway.url}/v2/{image.repository}"
        async with self.http.get(f"{base}/manifests/{image.reference}", headers={"Accept": ACCEPT_MANIFESTS}) as got:
            body = await got.read()
            assert got.status == 200, f"{where}: manifest GET answered {got.status}: {body[:300]!r}"
        assert sha256_digest(body) == image.manifest_digest, f"{where}: manifest digest {sha256_digest(body)}"
        for blob in blobs_of(body, keep_foreign=not self.blocks(image.repository)):
            async with self.http.get(f"{base}/blobs/{blob}") as got:
                data = await got.read()
                assert got.status == 200, f"{where}: blob {blob} answered {got.status}"
            assert sha256_digest(data) == blob, f"{where}: blob {blob} came back as {sha256_digest(data)}"

    # figures

    def summary(self) -> str:
        slowest = max(self.steps, key=lambda record: record.seconds)
        worst = max(self.lag_samples, default=(0.0, ""))
        lag = (
            f"max {worst[0] * 1000:.1f} ms (at {worst[1]!r}) over {len(self.lag_samples)} samples during and after "
            "steps, "
            f"{LAG_MAX_GAUGE} {(self.lag_max_reported or 0.0) * 1000:.1f} ms"
            if self.lag_samples else f"not exported ({LAG_GAUGE} absent from /metrics)"
        )
        return (
            f"{len(self.steps)} steps, {len(self.accepted)} images accepted and pulled back after each; "
            f"gateway CPU after steps: first window max {max(r.first_cpu_fraction for r in self.steps):.0%}, "
            f"idle window max {max(r.idle_cpu_fraction for r in self.steps):.0%} of a core; "
            f"slowest step {slowest.name!r} {slowest.seconds:.1f} s; event-loop lag {lag}; "
            f"tolerated leaks {sorted(self.tolerated_leaks)}; notes {self.notes}"
        )


def blobs_of(manifest: bytes, *, keep_foreign: bool) -> list[str]:
    """The config and layer digests of an image manifest; foreign layers only with `keep_foreign`."""
    document = json.loads(manifest)
    layers: Iterable[Mapping[str, Any]] = document.get("layers", [])
    return [document["config"]["digest"]] + [
        layer["digest"] for layer in layers if keep_foreign or layer["mediaType"] not in FOREIGN_MEDIA_TYPES
    ]

