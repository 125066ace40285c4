"""The agent's health endpoint, as kube-proxy's ProxyHealthServer (`:10256/healthz`, `/livez`).

Healthy means: every IP family's datapath has caught up with the changes queued for it, or has none that waited
`grace` seconds or more (kube-proxy's rule, its healthTimeout being twice the sync period). `/healthz` also needs
the node to be eligible for traffic: not being deleted and not tainted `ToBeDeletedByClusterAutoscaler`. The
bodies are kube-proxy's `ProxyHealth` JSON, field for field and in its order (compact, Go's RFC 3339 times), so
a probe or a script written for kube-proxy reads them unchanged; nodeagent appends four fields of its own after
them (a Go client decoding `ProxyHealth` ignores them): `oldestQueued`, `gracePeriodSeconds`, `proxyMode` and
`proxyModeReason`, so an unhealthy answer says by itself how long the sync has stalled and which datapath runs.

One deliberate difference: kube-proxy calls `Updated()` once when its sync loop starts, so its `status` has the
family before any sync. nodeagent only queues then: `status` names a family once its first sync succeeded (a
probe can tell a synced agent from a starting one), and the queued start still turns unhealthy after `grace`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nodeagent.observability.http import Route

DEFAULT_PORT = 10256
IPV4, IPV6 = "IPv4", "IPv6"  # kube-proxy's v1.IPFamily strings (its `status` keys and `ip_family` labels)
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"  # the cluster autoscaler's taint on a node it drains
GO_ZERO_TIME = "0001-01-01T00:00:00Z"  # how Go writes a zero time.Time
# kube-proxy's health responses carry both headers; `RouteServer` adds them to every answer of the server.
HEALTH_HEADERS: Mapping[str, str] = {"X-Content-Type-Options": "nosniff"}


def go_time(t: float | None) -> str:
    """`t` (seconds since the epoch) as Go's JSON writes a time.Time in UTC: RFC 3339 with the fraction's trailing
    zeros dropped (microseconds here: a float clock has no more), `Z` for UTC; None is Go's zero time."""
    if t is None:
        return GO_ZERO_TIME
    micros = round(t * 1_000_000)
    whole = datetime.fromtimestamp(micros // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{micros % 1_000_000:06d}".rstrip("0")
    return f"{whole}.{fraction}Z" if fraction else f"{whole}Z"


def node_eligible(listed: bool, exists: bool, being_deleted: bool, taint_keys: frozenset[str]) -> bool:
    """kube-proxy's NodeEligible: false while the Node is being deleted (a deletionTimestamp) or carries the
    autoscaler's `ToBeDeletedByClusterAutoscaler` taint (any value or effect), and false when there is no Node.
    Until the Nodes have been listed nothing is known against the node: eligible (kube-proxy does not serve
    before it has its Node)."""
    if not listed:
        return True
    return exists and not being_deleted and TO_BE_DELETED_TAINT not in taint_keys


@dataclass(frozen=True)
class ProxierHealth:
    """One IP family's datapath: when it last synced and whether it is within its grace period."""

    last_updated: float
    healthy: bool


@dataclass(frozen=True)
class ProxyHealth:
    """kube-proxy's `ProxyHealth` (without node eligibility, which only `/healthz` adds)."""

    last_updated: float | None  # the latest family's last sync; None: none yet
    current_time: float
    healthy: bool
    status: Mapping[str, ProxierHealth]
    oldest_queued: float | None  # nodeagent's: the oldest change still waiting, over the families


@dataclass
class HealthState:
    """When changes were queued and when each family's datapath was last updated, and whether the node is
    eligible; thread-safe."""

    grace: float = 60.0
    clock: Callable[[], float] = time.time
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _oldest_queued: dict[str, float] = field(default_factory=dict)
    _last_updated: dict[str, float] = field(default_factory=dict)
    _node_eligible: bool = True
    mode: str = ""  # the active datapath, for /proxyMode
    mode_reason: str = ""  # why (e.g. the reason eBPF could not be used)
    # Called with the seconds from the oldest change a sync programmed to the sync's end (kube-proxy's network
    # programming duration, measured from when the change reached us); `AgentMetrics.observe_health` sets it.
    programmed: Callable[[float], None] | None = None
    # Called with the status code of every /healthz and /livez answer (kube-proxy's proxy_healthz_total and
    # proxy_livez_total); `AgentMetrics.observe_health` sets them.
    answered_healthz: Callable[[int], None] | None = None
    answered_livez: Callable[[int], None] | None = None

    def queued(self, family: str = IPV4) -> None:
        """A change waits for `family`'s datapath (kube-proxy's QueuedUpdate)."""
        with self._lock:
            self._oldest_queued.setdefault(family, self.clock())

    def updated(self, family: str = IPV4) -> None:
        """A sync of `family` succeeded: everything queued for it so far is programmed (kube-proxy's Updated)."""
        with self._lock:
            now = self.clock()
            oldest = self._oldest_queued.pop(family, None)
            self._last_updated[family] = now
        if oldest is not None and self.programmed is not None:
            self.programmed(now - oldest)

    def set_node_eligible(self, eligible: bool) -> None:
        """Whether the node may receive traffic (see `node_eligible`); the agent sets it at every sync."""
        with self._lock:
            self._node_eligible = eligible

    @property
    def node_is_eligible(self) -> bool:
        with self._lock:
            return self._node_eligible

    def health(self) -> ProxyHealth:
        """kube-proxy's Health(): healthy unless a family has had a change waiting `grace` seconds or more."""
        with self._lock:
            now = self.clock()
            late = {f for f, queued in self._oldest_queued.items() if now - queued >= self.grace}
            status = {f: ProxierHealth(t, f not in late) for f, t in sorted(self._last_updated.items())}
            return ProxyHealth(last_updated=max(self._last_updated.values(), default=None), current_time=now,
                               healthy=not late, status=status,
                               oldest_queued=min(self._oldest_queued.values(), default=None))

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, a summary) for `nodeagent inspect`: the real last sync (empty before the first; /healthz says
        the current time when healthy), the oldest change waiting, the node's eligibility, the grace period."""
        health = self.health()
        return health.healthy, {
            "lastUpdated": "" if health.last_updated is None else go_time(health.last_updated),
            "currentTime": go_time(health.current_time), "nodeEligible": self.node_is_eligible,
            "oldestQueued": "" if health.oldest_queued is None else go_time(health.oldest_queued),
            "gracePeriodSeconds": self.grace}

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        """(status code, body) of `/healthz` (with node eligibility) or `/livez` (without), as kube-proxy answers:
        503 when unhealthy (or, on /healthz, not eligible), and `lastUpdated` is the current time when 200."""
        health = self.health()
        eligible = self.node_is_eligible if path == "/healthz" else None
        ok = health.healthy and eligible is not False
        body: dict[str, Any] = {"lastUpdated": go_time(health.current_time if ok else health.last_updated),
                                "currentTime": go_time(health.current_time)}
        if eligible is not None:
            body["nodeEligible"] = eligible
        body["healthy"] = health.healthy
        if health.status:
            body["status"] = {f: {"lastUpdated": go_time(s.last_updated), "healthy": s.healthy}
                              for f, s in health.status.items()}
        body["oldestQueued"] = "" if health.oldest_queued is None else go_time(health.oldest_queued)
        body["gracePeriodSeconds"] = self.grace
        body["proxyMode"], body["proxyModeReason"] = self.mode, self.mode_reason
        return (200 if ok else 503), body


def health_routes(state: HealthState) -> dict[str, Route]:
    """`/healthz` and `/livez` (kube-proxy's JSON, then the wait, the active mode and why) and `/proxyMode`."""
    def answer(path: str) -> Route:
        def route() -> tuple[int, str, bytes]:
            status, body = state.answer(path)
            count = state.answered_healthz if path == "/healthz" else state.answered_livez
            if count is not None:
                count(status)
            return status, "application/json", json.dumps(body, separators=(",", ":")).encode()
        return route

    return {"/healthz": answer("/healthz"), "/livez": answer("/livez"),
            "/proxyMode": lambda: (200, "text/plain", state.mode.encode())}  # kube-proxy answers the bare name
