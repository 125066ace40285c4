"""The sync runner: kube-proxy's BoundedFrequencyRunner, pacing a datapath's syncs on its own thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("nodeagent.state.sync")


@dataclass(frozen=True)
class SyncSchedule:
    """When the next sync may run: kube-proxy's BoundedFrequencyRunner as a pure function.

    A requested sync runs once `min_interval` has passed since the previous one (bursts of events are
    coalesced into one sync); with no request, a sync still runs every `max_interval` (so drift in
    the kernel is repaired even when nothing changes).
    """

    min_interval: float = 1.0
    max_interval: float = 30.0

    def __post_init__(self) -> None:
        if self.min_interval < 0 or self.max_interval <= 0 or self.min_interval > self.max_interval:
            raise ValueError(f"need 0 <= min-sync-period ({self.min_interval}) <= sync-period ({self.max_interval})"
                             " and sync-period > 0")

    def delay(self, now: float, last_run: float | None, requested: bool) -> float:
        """Seconds until the next sync should start (0: now)."""
        if last_run is None:
            return 0.0
        if requested:
            return max(0.0, last_run + self.min_interval - now)
        return max(0.0, last_run + self.max_interval - now)


class SyncRunner:
    """Runs `sync` on its own thread as `SyncSchedule` allows; `request()` asks for a run soon.

    A sync that raises is logged and retried with exponential backoff (1 s, 2 s, ... up to
    `max_interval`), as kube-proxy retries a failed iptables-restore, so a persistent failure never
    turns into a hot loop even with `min_interval` 0.
    """

    def __init__(self, sync: Callable[[], None], schedule: SyncSchedule,
                 clock: Callable[[], float] = time.monotonic, name: str = "sync") -> None:
        self._sync = sync
        self._schedule = schedule
        self._clock = clock
        self._cond = threading.Condition()
        self._requested = False
        self._stopped = False
        self._last_run: float | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.runs = 0
        self.failures = 0
        self._retry_at: float | None = None
        self._retry_delay = 0.0

    def start(self) -> SyncRunner:
        """Start the thread; the first sync runs at once."""
        self._thread.start()
        return self

    def request(self) -> None:
        """Ask for a sync; many requests before it runs make one sync."""
        with self._cond:
            self._requested = True
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current sync, if one is running."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = self._clock()
                    delay = self._schedule.delay(now, self._last_run, self._requested)
                    if self._retry_at is not None:
                        delay = max(delay, self._retry_at - now)
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                if self._stopped:
                    return
                self._requested = False
                self._last_run = self._clock()
            try:
                self._sync()
                self.runs += 1
                self._retry_at, self._retry_delay = None, 0.0
            except Exception:
                self.failures += 1
                self._retry_delay = min(self._schedule.max_interval, max(1.0, self._retry_delay * 2))
                self._retry_at = self._clock() + self._retry_delay
                log.exception("sync failed; retrying", runner=self._thread.name, retry_in=self._retry_delay)
                with self._cond:
                    self._requested = True
