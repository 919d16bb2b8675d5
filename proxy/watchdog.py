"""The event-loop watchdog: how late the serving loop runs, seen from the loop and from a thread beside it.

A task on the loop sleeps `interval` seconds and records how much longer it took (the lag). A loop that is
blocked runs nothing, neither that task nor the admin listener, so a thread watches the time of the last
tick and logs a stall while it lasts; once the loop runs again, /healthz and the gauges report what it
accumulated, and /healthz stays unhealthy for a while so that a periodic probe sees it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.logs import log_event

logger = logging.getLogger("foreign_layer_proxy.watchdog")

TICK_SECONDS = 0.25
WARNING_SECONDS = 0.5
# How long /healthz keeps reporting a loop that was blocked beyond the limit, once it runs again: longer
# than the period of an orchestrator's liveness probe, so that the probe after the stall sees it.
UNHEALTHY_HOLD_SECONDS = 30.0


def lag_after_sleep(interval: float, slept: float) -> float:
    """The overshoot of a sleep of `interval` seconds that took `slept`; a clock that ran early is no lag."""
    return max(0.0, slept - interval)


@dataclass(frozen=True, slots=True)
class Stall:
    lag: float
    ended: float | None  # None: still going on


class LoopLag:
    """The lag of a loop that ticks every `interval` seconds: the overshoot of its last tick, or, while no
    tick comes, how late the next one is. Ticks are recorded on the loop, read from any thread."""

    def __init__(self, interval: float, started: float, hold: float = UNHEALTHY_HOLD_SECONDS):
        self.interval = interval
        self.hold = hold
        self._lock = threading.Lock()
        self._last_tick = started
        self._last_lag = 0.0
        self._max_lag = 0.0
        self._worst_recent: Stall = Stall(0.0, started)

    def tick(self, at: float, lag: float) -> None:
        with self._lock:
            self._last_tick = at
            self._last_lag = lag
            self._max_lag = max(self._max_lag, lag)
            if lag >= self._worst_recent.lag or self._expired(self._worst_recent, at):
                self._worst_recent = Stall(lag, at)

    def stall(self, now: float) -> float:
        """How late the next tick is at `now`: 0 while the loop keeps time."""
        with self._lock:
            return max(0.0, now - self._last_tick - self.interval)

    def current(self, now: float) -> float:
        with self._lock:
            last_tick, last_lag = self._last_tick, self._last_lag
        return max(last_lag, now - last_tick - self.interval, 0.0)

    def largest(self, now: float) -> float:
        with self._lock:
            max_lag = self._max_lag
        return max(max_lag, self.stall(now))

    def worst_recent(self, now: float) -> Stall:
        """The worst lag of the last `hold` seconds, or the stall going on if it is worse."""
        ongoing = self.stall(now)
        with self._lock:
            recent = self._worst_recent
        if self._expired(recent, now):
            recent = Stall(0.0, now)
        return Stall(ongoing, None) if ongoing > recent.lag else recent

    def blocked_beyond(self, limit: float, now: float) -> bool:
        return self.worst_recent(now).lag > limit

    def _expired(self, stall: Stall, now: float) -> bool:
        return stall.ended is not None and now - stall.ended > self.hold


class LoopWatchdog:
    """The tick task (`run`, on the loop) and the thread that notices when the ticks stop."""

    def __init__(self, interval: float = TICK_SECONDS, warning: float = WARNING_SECONDS,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.interval = interval
        self.warning = warning
        self.clock = clock
        self.lag = LoopLag(interval, clock())
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="event-loop-watchdog", daemon=True)

    async def run(self) -> None:
        self._thread.start()
        try:
            while True:
                before = self.clock()
                await asyncio.sleep(self.interval)
                now = self.clock()
                lag = lag_after_sleep(self.interval, now - before)
                self.lag.tick(now, lag)
                if lag > self.warning:
                    log_event(logger, logging.WARNING, "event_loop_lag", lag_seconds=round(lag, 3),
                              note="the event loop ran nothing else for this long")  # fmt: skip
        finally:
            self._stopped.set()

    def _watch(self) -> None:
        """Off the loop: one warning per stall, while it is going on."""
        warned = False
        while not self._stopped.wait(self.interval):
            stalled = self.lag.stall(self.clock())
            if stalled > self.warning and not warned:
                log_event(logger, logging.WARNING, "event_loop_blocked", blocked_seconds=round(stalled, 3),
                          note="no request is being served until the event loop runs again")  # fmt: skip
            warned = stalled > self.warning
