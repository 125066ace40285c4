"""The agent's metrics, served on `:10249` with `/proxyMode` (as kube-proxy serves them).

kube-proxy's families first, under its names, types, labels, help texts and buckets
(pkg/proxy/metrics/metrics.go), so dashboards and alerts written for kube-proxy work unchanged; then nodeagent's
own, only where they say something kube-proxy's do not (the active datapath and why, failed syncs in either
mode, eBPF map sizes, rejected objects, the Service ports of the snapshot).

What nodeagent measures differently: the network programming duration runs from the moment a change reached the
agent (kube-proxy: from the EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`), once per sync
for the oldest change it programmed; the iptables rule totals are set after full syncs (a partial sync does not
count the tables). Not published: `..._iptables_last`, `..._iptables_partial_restore_failures_total`, the nftables
and nfacct families and the conntrack reconciler's (nodeagent has no such measurement).

Each agent owns its registry (no process-global collector state): tests and several agents in one
process never see each other's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nodeagent.observability.http import Route

DEFAULT_PORT = 10249


def exponential_buckets(start: float, factor: float, count: int) -> tuple[float, ...]:
    """Prometheus' ExponentialBuckets."""
    return tuple(start * factor ** i for i in range(count))


def linear_buckets(start: float, width: float, count: int) -> tuple[float, ...]:
    """Prometheus' LinearBuckets."""
    return tuple(start + width * i for i in range(count))


# kube-proxy's buckets: sync latency ExponentialBuckets(0.001, 2, 15) (1 ms to 16 s); network programming
# MergeBuckets(LinearBuckets(0.25, 0.25, 2), LinearBuckets(1, 1, 59), LinearBuckets(60, 5, 12),
# LinearBuckets(120, 30, 7)) (0.25 s to 5 min).
SYNC_BUCKETS = exponential_buckets(0.001, 2, 15)
PROGRAMMING_BUCKETS = (linear_buckets(0.25, 0.25, 2) + linear_buckets(1, 1, 59) + linear_buckets(60, 5, 12)
                       + linear_buckets(120, 30, 7))


class MeasuresHealth(Protocol):
    """What measures the network programming duration and answers the health probes
    (`nodeagent.observability.health.HealthState`; not imported: the two modules are siblings)."""

    programmed: Callable[[float], None] | None
    answered_healthz: Callable[[int], None] | None
    answered_livez: Callable[[int], None] | None


class AgentMetrics:
    """The collectors the reconcile loop updates."""

    def __init__(self, ip_family: str = "IPv4") -> None:
        self.ip_family = ip_family
        self.registry = r = CollectorRegistry()
        # kube-proxy's (subsystem kubeproxy)
        self.sync_duration = Histogram("kubeproxy_sync_proxy_rules_duration_seconds",
                                       "SyncProxyRules latency in seconds", ["ip_family"], buckets=SYNC_BUCKETS,
                                       registry=r)
        self.sync_full_duration = Histogram("kubeproxy_sync_full_proxy_rules_duration_seconds",
                                            "SyncProxyRules latency in seconds for full resyncs", ["ip_family"],
                                            buckets=SYNC_BUCKETS, registry=r)
        self.sync_partial_duration = Histogram("kubeproxy_sync_partial_proxy_rules_duration_seconds",
                                               "SyncProxyRules latency in seconds for partial resyncs",
                                               ["ip_family"], buckets=SYNC_BUCKETS, registry=r)
        self.last_sync = Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced", ["ip_family"], registry=r)
        self.last_queued = Gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                                 "The last time a sync of proxy rules was queued", ["ip_family"], registry=r)
        self.network_programming = Histogram("kubeproxy_network_programming_duration_seconds",
                                             "In Cluster Network Programming Latency in seconds", ["ip_family"],
                                             buckets=PROGRAMMING_BUCKETS, registry=r)
        self.endpoint_changes_pending = Gauge("kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                                              "Pending proxy rules Endpoint changes", registry=r)
        self.endpoint_changes = Counter("kubeproxy_sync_proxy_rules_endpoint_changes",
                                        "Cumulative proxy rules Endpoint changes", registry=r)
        self.service_changes_pending = Gauge("kubeproxy_sync_proxy_rules_service_changes_pending",
                                             "Pending proxy rules Service changes", registry=r)
        self.service_changes = Counter("kubeproxy_sync_proxy_rules_service_changes",
                                       "Cumulative proxy rules Service changes", registry=r)
        self.restore_failures = Counter("kubeproxy_sync_proxy_rules_iptables_restore_failures",
                                        "Cumulative proxy iptables restore failures", ["ip_family"], registry=r)
        self.rules = Gauge("kubeproxy_sync_proxy_rules_iptables_total",
                           "Total number of iptables rules owned by kube-proxy", ["table", "ip_family"], registry=r)
        self.no_local_endpoints = Gauge("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                                        "Number of services with a Local traffic policy and no endpoints",
                                        ["traffic_policy", "ip_family"], registry=r)
        self.healthz = Counter("kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"],
                               registry=r)
        self.livez = Counter("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", ["code"], registry=r)
        # nodeagent's own
        self.sync_failures = Counter("nodeagent_sync_proxy_rules_failures_total", "Datapath syncs that failed",
                                     ["mode"], registry=r)
        self.proxy_mode = Gauge("nodeagent_proxy_mode_info", "The active datapath and why (value 1)",
                                ["mode", "reason"], registry=r)
        self.rejections = Gauge("nodeagent_rejected_objects", "Objects (or fields) rejected by validation, by "
                                "kind and scope", ["kind", "scope"], registry=r)
        self.service_ports = Gauge("nodeagent_service_ports", "Service ports in the current snapshot", registry=r)
        self.map_entries = Gauge("nodeagent_sync_proxy_map_entries", "eBPF map entries of ours after the last "
                                 "sync, by map", ["map"], registry=r)
        self.external_on_iptables = Gauge(
            "nodeagent_ebpf_external_on_iptables_service_ports", "eBPF mode with tc: Service ports whose traffic "
            "from outside kube-proxy's iptables rules serve, by what tc lacks for them", ["lacks"], registry=r)

    def observe_health(self, health: MeasuresHealth) -> None:
        """Record every sync's network programming duration, which `health` measures, and count its answers."""
        health.programmed = self.network_programming.labels(self.ip_family).observe
        health.answered_healthz = lambda code: self.healthz.labels(str(code)).inc()
        health.answered_livez = lambda code: self.livez.labels(str(code)).inc()

    def set_mode(self, mode: str, reason: str) -> None:
        """Publish the active datapath and why."""
        self.proxy_mode.clear()
        self.proxy_mode.labels(mode=mode, reason=reason).set(1)

    def changed(self, service_changes: int, endpoint_changes: int) -> None:
        """Changes of Services and EndpointSlices reached the agent (kube-proxy's change trackers count each)."""
        if service_changes:
            self.service_changes.inc(service_changes)
            self.service_changes_pending.inc(service_changes)
        if endpoint_changes:
            self.endpoint_changes.inc(endpoint_changes)
            self.endpoint_changes_pending.inc(endpoint_changes)

    def queued(self) -> None:
        """A sync was queued."""
        self.last_queued.labels(self.ip_family).set_to_current_time()

    def synced(self, seconds: float, full: bool, rules: dict[str, int], no_local: tuple[int, int]) -> None:
        """A sync succeeded after `seconds`: every pending change is programmed. `rules` (table -> rules, empty
        when not counted) and `no_local` ((internal, external) Services with a Local policy and no local
        endpoint) as measured by it."""
        family = self.ip_family
        self.sync_duration.labels(family).observe(seconds)
        (self.sync_full_duration if full else self.sync_partial_duration).labels(family).observe(seconds)
        self.last_sync.labels(family).set_to_current_time()
        self.service_changes_pending.set(0)
        self.endpoint_changes_pending.set(0)
        for table, count in rules.items():
            self.rules.labels(table, family).set(count)
        self.no_local_endpoints.labels("internal", family).set(no_local[0])
        self.no_local_endpoints.labels("external", family).set(no_local[1])

    def failed(self, mode: str, seconds: float, iptables: bool) -> None:
        """A sync failed after `seconds` (kube-proxy observes its latency all the same); `iptables`: in iptables."""
        self.sync_duration.labels(self.ip_family).observe(seconds)
        self.sync_failures.labels(mode=mode).inc()
        if iptables:
            self.restore_failures.labels(self.ip_family).inc()


def metrics_routes(metrics: AgentMetrics, mode: Callable[[], str]) -> dict[str, Route]:
    """`/metrics` (Prometheus text) and `/proxyMode`, as kube-proxy serves them on 10249."""
    return {"/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)),
            "/proxyMode": lambda: (200, "text/plain", mode().encode())}
