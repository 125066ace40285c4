"""The agent's metrics, served on `:10249` with `/proxyMode` (as kube-proxy serves them).

kube-proxy's families first, under its names, types, labels, help texts and buckets
(pkg/proxy/metrics/metrics.go), so dashboards and alerts written for kube-proxy work unchanged; then nodeagent's
own, only where they say something kube-proxy's do not (the active datapath and why, failed syncs in either
mode, eBPF map sizes, rejected objects, the Service ports of the snapshot).

What nodeagent measures differently: the network programming duration runs from the moment a change reached the
agent (kube-proxy: from the EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`), once per sync
for the oldest change it programmed; the iptables rule totals are set after full syncs (a partial sync does not
count the tables), the rules written by the last sync (`..._iptables_last`) after every successful one
(kube-proxy sets it just before its restore); the conntrack reconciler's duration is observed once per table it
reconciles (eBPF mode with tc: the kernel's conntrack and tc's flow map, under the same `ip_family`). The nfacct
families are read from the kernel at each scrape and published only while their counters exist, as kube-proxy's
collector does. Not published: the nftables families (nodeagent has no nftables datapath).

Each agent owns its registry (no process-global collector state): tests and several agents in one
process never see each other's numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nodeagent.errors import NodeAgentError
from nodeagent.observability.http import Route

log = structlog.get_logger("nodeagent.observability.metrics")
DEFAULT_PORT = 10249
NOT_MEASURED: Mapping[str, int] = MappingProxyType({})

# kube-proxy's nfacct families (pkg/proxy/metrics/metrics.go: custom collectors, no labels) and their help texts
CT_STATE_INVALID_DROPPED_PACKETS = "kubeproxy_iptables_ct_state_invalid_dropped_packets_total"
LOCALHOST_NODEPORTS_ACCEPTED_PACKETS = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total"
NFACCT_HELP = MappingProxyType({
    CT_STATE_INVALID_DROPPED_PACKETS: "packets dropped by iptables to work around conntrack problems",
    LOCALHOST_NODEPORTS_ACCEPTED_PACKETS: "Number of packets accepted on nodeports of loopback interface",
})


def exponential_buckets(start: float, factor: float, count: int) -> tuple[float, ...]:
    """Prometheus' ExponentialBuckets."""
    return tuple(start * factor ** i for i in range(count))


def linear_buckets(start: float, width: float, count: int) -> tuple[float, ...]:
    """Prometheus' LinearBuckets."""
    return tuple(start + width * i for i in range(count))


# kube-proxy's buckets: sync latency and the conntrack reconciler's ExponentialBuckets(0.001, 2, 15) (1 ms to
# 16 s); network programming MergeBuckets(LinearBuckets(0.25, 0.25, 2), LinearBuckets(1, 1, 59),
# LinearBuckets(60, 5, 12), LinearBuckets(120, 30, 7)) (0.25 s to 5 min).
SYNC_BUCKETS = exponential_buckets(0.001, 2, 15)
PROGRAMMING_BUCKETS = (linear_buckets(0.25, 0.25, 2) + linear_buckets(1, 1, 59) + linear_buckets(60, 5, 12)
                       + linear_buckets(120, 30, 7))


class ReadsNfacct(Protocol):
    """Reads one nfacct counter (`kernel.nfacct.packets`; not imported: the two packages are siblings)."""

    def __call__(self, name: str) -> int | None:
        """The packets counted by the nfacct object `name`, None when it does not exist; raises OSError or
        NodeAgentError when it cannot be read."""
        ...


class NfacctCollector:
    """kube-proxy's nfacct families, read from the kernel at each scrape (its `nfacctMetricCollector`).

    A family is published only while its counter exists (kube-proxy: `Get` fails, nothing is sent). A counter
    that cannot be read leaves its family out of that scrape, never the whole answer; each family's failure is
    logged once (a scrape every few seconds would otherwise repeat it forever), again after it recovered.
    """

    def __init__(self, counters: Mapping[str, str], read: ReadsNfacct) -> None:
        """`counters`: family name (a key of NFACCT_HELP) -> nfacct object name."""
        unknown = set(counters) - set(NFACCT_HELP)
        if unknown:
            raise ValueError(f"not kube-proxy's nfacct families: {sorted(unknown)}")
        self.counters = dict(counters)
        self.read = read
        self._failing: set[str] = set()

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The families whose counters exist now (prometheus_client's collector protocol)."""
        for family, counter in self.counters.items():
            try:
                packets = self.read(counter)
            except (OSError, NodeAgentError) as exc:
                if family not in self._failing:
                    self._failing.add(family)
                    log.warning("nfacct counter not read; its metric is left out", counter=counter, metric=family,
                                reason=str(exc))
                continue
            self._failing.discard(family)
            if packets is not None:
                yield CounterMetricFamily(family, NFACCT_HELP[family], value=packets)


REFUSALS_FAMILY = "nodeagent_http_refused_connections"


class RefusalsCollector:
    """Connections the agent's HTTP servers turned away (`observability.http.BoundedHTTPServer`: a request head
    not in by its deadline, one too large, a connection evicted over the cap), read at each scrape from the
    servers themselves, which keep the counts."""

    def __init__(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """`read()`: server (`healthz`, `metrics`, `health-check`) -> reason -> connections refused so far."""
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        """One counter family, a sample per server and reason (prometheus_client's collector protocol)."""
        family = CounterMetricFamily(REFUSALS_FAMILY, "Connections the agent's HTTP servers (health, metrics, "
                                     "health check node ports) refused or closed unanswered, by server and reason",
                                     labels=["server", "reason"])
        for server, counts in sorted(self.read().items()):
            for reason, count in sorted(counts.items()):
                family.add_metric([server, reason], count)
        yield family


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
        self.rules_written = Gauge("kubeproxy_sync_proxy_rules_iptables_last",
                                   "Number of iptables rules written by kube-proxy in last sync",
                                   ["table", "ip_family"], registry=r)
        self.partial_restore_failures = Counter("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
                                                "Cumulative proxy iptables partial restore failures", ["ip_family"],
                                                registry=r)
        self.conntrack_duration = Histogram("kubeproxy_conntrack_reconciler_sync_duration_seconds",
                                            "ReconcileConntrackFlowsLatency latency in seconds", ["ip_family"],
                                            buckets=SYNC_BUCKETS, registry=r)
        self.conntrack_deleted = Counter("kubeproxy_conntrack_reconciler_deleted_entries",
                                         "Cumulative conntrack flows deleted by conntrack reconciler", ["ip_family"],
                                         registry=r)
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
            "from outside kube-proxy's iptables rules serve, by what tc lacks for them and IP family",
            ["lacks", "ip_family"], registry=r)

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

    def queued(self, ip_family: str | None = None) -> None:
        """A sync was queued (for `ip_family`'s proxier; None: this object's family)."""
        self.last_queued.labels(ip_family or self.ip_family).set_to_current_time()

    def synced(self, seconds: float, full: bool, rules: Mapping[str, int], no_local: tuple[int, int],
               written: Mapping[str, int] = NOT_MEASURED, ip_family: str | None = None) -> None:
        """A sync succeeded after `seconds`: every pending change is programmed. `rules` (table -> rules, empty
        when not counted), `written` (table -> rules this sync wrote; empty outside iptables) and `no_local`
        ((internal, external) Services with a Local policy and no local endpoint) as measured by it. `ip_family`:
        the proxier's family when the node runs one per family (kube-proxy's metaproxier; None: this object's)."""
        family = ip_family or self.ip_family
        self.sync_duration.labels(family).observe(seconds)
        (self.sync_full_duration if full else self.sync_partial_duration).labels(family).observe(seconds)
        self.last_sync.labels(family).set_to_current_time()
        self.service_changes_pending.set(0)
        self.endpoint_changes_pending.set(0)
        for table, count in rules.items():
            self.rules.labels(table, family).set(count)
        for table, count in written.items():
            self.rules_written.labels(table, family).set(count)
        self.no_local_endpoints.labels("internal", family).set(no_local[0])
        self.no_local_endpoints.labels("external", family).set(no_local[1])

    def failed(self, mode: str, seconds: float, iptables: bool, partial: bool = False,
               ip_family: str | None = None) -> None:
        """A sync failed after `seconds` (kube-proxy observes its latency all the same); `iptables`: in
        iptables-restore; `partial`: that of a partial sync (kube-proxy counts it in both counters)."""
        family = ip_family or self.ip_family
        self.sync_duration.labels(family).observe(seconds)
        self.sync_failures.labels(mode=mode).inc()
        if iptables:
            self.restore_failures.labels(family).inc()
        if partial:
            self.partial_restore_failures.labels(family).inc()

    def reconciled(self, ip_family: str, seconds: float, deleted: int) -> None:
        """One pass of the conntrack reconciler over one table took `seconds` and deleted `deleted` flows
        (kube-proxy's `CleanStaleEntries` observes its duration even when listing failed)."""
        self.conntrack_duration.labels(ip_family).observe(seconds)
        self.conntrack_deleted.labels(ip_family).inc(deleted)

    def read_refusals(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """Publish the HTTP servers' refused connections (`read()`: server -> reason -> count), read at each
        scrape."""
        self.registry.register(RefusalsCollector(read))

    def read_nfacct(self, counters: Mapping[str, str], read: ReadsNfacct) -> None:
        """Publish kube-proxy's nfacct families (`counters`: family -> nfacct object), read at each scrape."""
        self.registry.register(NfacctCollector(counters, read))


def metrics_routes(metrics: AgentMetrics, mode: Callable[[], str]) -> dict[str, Route]:
    """`/metrics` (Prometheus text) and `/proxyMode`, as kube-proxy serves them on 10249."""
    return {"/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)),
            "/proxyMode": lambda: (200, "text/plain", mode().encode())}
