"""The agent's health endpoint, as kube-proxy's (`:10256/healthz`, `/livez`).

Healthy means: the datapath has caught up with the changes queued for it, or a sync has succeeded
within the grace period since the oldest change still waiting. kube-proxy's ProxyHealthServer uses the
same rule, so a DaemonSet liveness probe written for kube-proxy works unchanged.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nodeagent.observability.http import Route

DEFAULT_PORT = 10256


@dataclass
class HealthState:
    """When changes were queued and when the datapath was last updated; thread-safe."""

    grace: float = 60.0
    clock: Callable[[], float] = time.time
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _oldest_queued: float | None = None
    _last_updated: float | None = None
    mode: str = ""  # the active datapath, for /proxyMode
    mode_reason: str = ""  # why (e.g. the reason eBPF could not be used)
    # Called with the seconds from the oldest change a sync programmed to the sync's end (kube-proxy's network
    # programming duration, measured from when the change reached us); `AgentMetrics.observe_health` sets it.
    programmed: Callable[[float], None] | None = None

    def queued(self) -> None:
        """A change waits for the datapath."""
        with self._lock:
            if self._oldest_queued is None:
                self._oldest_queued = self.clock()

    def updated(self) -> None:
        """A sync succeeded: everything queued so far is programmed."""
        with self._lock:
            now = self.clock()
            waited = None if self._oldest_queued is None else now - self._oldest_queued
            self._last_updated = now
            self._oldest_queued = None
        if waited is not None and self.programmed is not None:
            self.programmed(waited)

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, kube-proxy's JSON body)."""
        with self._lock:
            now = self.clock()
            healthy = self._oldest_queued is None or now - self._oldest_queued < self.grace
            stamp, queued = self._last_updated, self._oldest_queued

        def iso(t: float | None) -> str:
            return "" if t is None else datetime.fromtimestamp(t, UTC).isoformat()

        # kube-proxy's three fields, plus when the oldest change still waiting arrived (empty: none waits) and
        # the grace period, so an unhealthy answer says by itself how long the sync has stalled.
        return healthy, {"lastUpdated": iso(stamp), "currentTime": iso(now), "nodeEligible": True,
                         "oldestQueued": iso(queued), "gracePeriodSeconds": self.grace}


def health_routes(state: HealthState) -> dict[str, Route]:
    """`/healthz` and `/livez` (kube-proxy's JSON, plus the active mode and why) and `/proxyMode`."""
    def health() -> tuple[int, str, bytes]:
        healthy, body = state.report()
        body = {**body, "proxyMode": state.mode, "proxyModeReason": state.mode_reason}
        return (200 if healthy else 503), "application/json", json.dumps(body).encode()

    return {"/healthz": health, "/livez": health,
            "/proxyMode": lambda: (200, "text/plain", state.mode.encode())}  # kube-proxy answers the bare name
