"""The agent's metrics, kube-proxy style, served on `:10249` with `/proxyMode` (as kube-proxy serves them).

Each agent owns its registry (no process-global collector state): tests and several agents in one
process never see each other's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nodeagent.observability.http import Route


class MeasuresProgramming(Protocol):
    """What measures the network programming duration (`nodeagent.observability.health.HealthState`; not
    imported: the two modules are siblings)."""

    programmed: Callable[[float], None] | None

DEFAULT_PORT = 10249


class AgentMetrics:
    """The collectors the reconcile loop updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sync_duration = Histogram(
            "nodeagent_sync_proxy_rules_duration_seconds", "Time one datapath sync took", ["mode", "kind"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.last_sync = Gauge("nodeagent_sync_proxy_rules_last_timestamp_seconds",
                               "When the datapath was last synced successfully", registry=self.registry)
        self.sync_failures = Counter("nodeagent_sync_proxy_rules_failures_total", "Datapath syncs that failed",
                                     ["mode"], registry=self.registry)
        self.proxy_mode = Gauge("nodeagent_proxy_mode_info", "The active datapath and why (value 1)",
                                ["mode", "reason"], registry=self.registry)
        self.rejections = Gauge("nodeagent_rejected_objects", "Objects (or fields) rejected by validation, by "
                                "kind and scope", ["kind", "scope"], registry=self.registry)
        self.service_ports = Gauge("nodeagent_service_ports", "Service ports in the current snapshot",
                                   registry=self.registry)
        # kube-proxy's network_programming_duration_seconds buckets (0.25 s to 5 min, then longer)
        self.network_programming = Histogram(
            "nodeagent_network_programming_duration_seconds", "From a change reaching the agent to the datapath "
            "programmed with it", buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry)
        self.rules = Gauge("nodeagent_sync_proxy_rules_iptables_total", "iptables rules of ours after the last "
                           "sync, by table (kube-proxy's name)", ["table"], registry=self.registry)
        self.map_entries = Gauge("nodeagent_sync_proxy_map_entries", "eBPF map entries of ours after the last "
                                 "sync, by map", ["map"], registry=self.registry)

    def observe_health(self, health: MeasuresProgramming) -> None:
        """Record every sync's network programming duration, which `health` measures."""
        health.programmed = self.network_programming.observe

    def set_mode(self, mode: str, reason: str) -> None:
        self.proxy_mode.clear()
        self.proxy_mode.labels(mode=mode, reason=reason).set(1)


def metrics_routes(metrics: AgentMetrics, mode: Callable[[], str]) -> dict[str, Route]:
    """`/metrics` (Prometheus text) and `/proxyMode`, as kube-proxy serves them on 10249."""
    return {"/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)),
            "/proxyMode": lambda: (200, "text/plain", mode().encode())}
