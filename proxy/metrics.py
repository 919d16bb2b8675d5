"""Prometheus metrics of one gateway process, in a registry of its own (no module-level state).

With `server.workers` above 1 each worker writes its samples to files in the supervisor's folder
(prometheus-client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR) and the supervisor serves their sum.

Repository names never become label values: they are unbounded. Decisions are labelled by rule name,
which the operator's config bounds.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.routes import RouteKind
from proxy.watchdog import LoopLag

PREFIX = "foreign_layer_proxy"
DISTRIBUTION = "foreign-layer-proxy"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
UPLOAD_ROUTES = frozenset({RouteKind.UPLOAD_START, RouteKind.UPLOAD_SESSION})
MANIFEST_ROUTE_LABELS = {"GET": "manifest_get", "HEAD": "manifest_get", "PUT": "manifest_put"}


def route_label(method: str, kind: RouteKind | None) -> str:
    """The bounded route label of a request: what an operator charts."""
    if kind in UPLOAD_ROUTES:
        return "blob_upload"
    if kind is RouteKind.BLOB:
        return "blob_get" if method in {"GET", "HEAD"} else "blob_other"
    if kind is RouteKind.MANIFEST:
        return MANIFEST_ROUTE_LABELS.get(method, "manifest_other")
    return "other"


def version() -> str:
    """The installed package's version (what `--version` prints and build_info carries)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """Names follow Prometheus' conventions: base unit last but for `_total`, e.g. `_kept_out_bytes_total`."""

    def __init__(self, shared: bool = False) -> None:
        """`shared`: a worker's, summed by the supervisor; gauges read when scraped cannot be, and are left out."""
        self.shared = shared
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        Info(f"{PREFIX}_build", "The running version.", registry=self.registry).info(
            {"version": version(), "python_version": platform.python_version()}
        )
        self.reload_success = Gauge(
            f"{PREFIX}_config_last_reload_success", "1 if the last configuration (re)load succeeded, else 0.",
            multiprocess_mode="livemin", registry=self.registry,
        )  # fmt: skip
        self.reload_success_time = Gauge(
            f"{PREFIX}_config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration (re)load that succeeded.", multiprocess_mode="livemin",
            registry=self.registry,
        )  # fmt: skip
        self.config_loaded(True)
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests handled, by method, route kind and status.",
            ["method", "route", "status"], registry=self.registry,
        )  # fmt: skip
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "Time from request to the end of the response, by route kind.",
            ["route"], buckets=DURATION_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.bytes_streamed = Counter(
            f"{PREFIX}_streamed_bytes",
            "Body bytes (no headers) streamed: up (client to registry) and down (registry or gateway to client).",
            ["direction"], registry=self.registry,
        )  # fmt: skip
        self.bytes_spliced = Counter(
            f"{PREFIX}_spliced_bytes",
            "Body bytes of streamed_bytes moved with splice(2), from socket to socket in the kernel: up and down.",
            ["direction"], registry=self.registry,
        )  # fmt: skip
        self.decisions = Counter(
            f"{PREFIX}_decisions",
            "Foreign-layer decisions: dropped, rejected, allowed, audited, leaked, cleaned; by rule.",
            ["action", "rule"], registry=self.registry,
        )  # fmt: skip
        self.bytes_kept_out = Counter(
            f"{PREFIX}_kept_out_bytes", "Bytes of foreign layers that did not reach the registry.",
            registry=self.registry,
        )  # fmt: skip
        self.learned = Counter(
            f"{PREFIX}_learned_digests", "Foreign digests newly learned by this process, by source.",
            ["source"], registry=self.registry,
        )  # fmt: skip
        self.learned_candidates = Counter(
            f"{PREFIX}_learned_candidates", "Foreign digests learned as candidates (urls not trusted: audited only), "
            "by source.", ["source"], registry=self.registry,
        )  # fmt: skip
        self.learning_capped = Counter(
            f"{PREFIX}_learning_capped", "Foreign layers not learned because a cap was reached, by limit "
            "(manifest, repository).", ["limit"], registry=self.registry,
        )  # fmt: skip
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors", "Failed exchanges with the upstream registry, by kind.",
            ["kind"], registry=self.registry,
        )  # fmt: skip
        self.store_errors = Counter(
            f"{PREFIX}_store_errors", "Failed store operations (the gateway keeps enforcing what it knows).",
            registry=self.registry,
        )  # fmt: skip
        self.uploads_in_flight = Gauge(
            f"{PREFIX}_uploads_in_flight", "Blob upload requests being handled now.", multiprocess_mode="livesum",
            registry=self.registry,
        )  # fmt: skip
        self._bytes_up = self.bytes_streamed.labels("up")
        self._bytes_down = self.bytes_streamed.labels("down")
        self.bytes_spliced_up = self.bytes_spliced.labels("up")
        self.bytes_spliced_down = self.bytes_spliced.labels("down")
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe_request(
        self, method: str, route: str, status: int, duration: float, bytes_in: int, bytes_out: int
    ) -> None:
        """One finished request; label children are looked up once per combination, not per request."""
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(method, route, str(status)),
                self.duration.labels(route),
            )
        requests, duration_histogram = children
        requests.inc()
        duration_histogram.observe(duration)
        if bytes_in:  # most requests have no body, HEADs no answer body: no lock taken to add 0
            self._bytes_up.inc(bytes_in)
        if bytes_out:
            self._bytes_down.inc(bytes_out)

    def config_loaded(self, success: bool) -> None:
        self.reload_success.set(1 if success else 0)
        if success:
            self.reload_success_time.set(time.time())

    def track_known(self, count: Callable[[], int]) -> None:
        if self.shared:
            return
        Gauge(
            f"{PREFIX}_known_foreign_digests", "Foreign digests this process enforces.", registry=self.registry
        ).set_function(lambda: float(count()))

    def track_loop_lag(self, lag: LoopLag, clock: Callable[[], float]) -> None:
        """Read when scraped, so that a stall the loop just came out of shows even before its next tick."""
        if self.shared:
            return
        Gauge(
            f"{PREFIX}_event_loop_lag_seconds", "How late the event loop runs now (its last tick, or the stall going on).",
            registry=self.registry,
        ).set_function(lambda: lag.current(clock()))  # fmt: skip
        Gauge(
            f"{PREFIX}_event_loop_lag_max_seconds", "The largest event-loop lag since the process started.",
            registry=self.registry,
        ).set_function(lambda: lag.largest(clock()))  # fmt: skip

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class SupervisorMetrics:
    """What the supervisor of `server.workers` serves: its workers' metrics summed, and the workers' own state."""

    def __init__(self, workers_directory: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(self.registry, path=workers_directory)  # type: ignore[no-untyped-call]
        ProcessCollector(registry=self.registry)
        Info(f"{PREFIX}_build", "The running version.", registry=self.registry).info(
            {"version": version(), "python_version": platform.python_version()}
        )
        self.worker_restarts = Counter(
            f"{PREFIX}_worker_restarts", "Workers restarted after they exited unexpectedly.", registry=self.registry
        )

    def track_workers(self, alive: Callable[[], int]) -> None:
        Gauge(
            f"{PREFIX}_workers_alive", "Worker processes running now.", registry=self.registry
        ).set_function(lambda: float(alive()))  # fmt: skip

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
