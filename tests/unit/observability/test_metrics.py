"""The agent's metrics: kube-proxy's families under its names, types, labels, help texts and buckets
(pkg/proxy/metrics/metrics.go), then nodeagent's own, parsed with Prometheus' own parser."""

from __future__ import annotations

import errno

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from nodeagent.kernel.nfacct import NfacctUnsupported
from nodeagent.observability.health import HealthState, health_routes
from nodeagent.observability.metrics import (
    CT_STATE_INVALID_DROPPED_PACKETS,
    LOCALHOST_NODEPORTS_ACCEPTED_PACKETS,
    PROGRAMMING_BUCKETS,
    SYNC_BUCKETS,
    AgentMetrics,
    metrics_routes,
)

# name (as the parser names the family) -> (type, labels, help): kube-proxy's
KUBE_PROXY = {
    "kubeproxy_sync_proxy_rules_duration_seconds": ("histogram", {"ip_family"}, "SyncProxyRules latency in seconds"),
    "kubeproxy_sync_full_proxy_rules_duration_seconds": ("histogram", {"ip_family"},
                                                         "SyncProxyRules latency in seconds for full resyncs"),
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": ("histogram", {"ip_family"},
                                                            "SyncProxyRules latency in seconds for partial resyncs"),
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": ("gauge", {"ip_family"},
                                                          "The last time proxy rules were successfully synced"),
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": ("gauge", {"ip_family"},
                                                                 "The last time a sync of proxy rules was queued"),
    "kubeproxy_network_programming_duration_seconds": ("histogram", {"ip_family"},
                                                       "In Cluster Network Programming Latency in seconds"),
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": ("gauge", set(), "Pending proxy rules Endpoint changes"),
    "kubeproxy_sync_proxy_rules_endpoint_changes": ("counter", set(), "Cumulative proxy rules Endpoint changes"),
    "kubeproxy_sync_proxy_rules_service_changes_pending": ("gauge", set(), "Pending proxy rules Service changes"),
    "kubeproxy_sync_proxy_rules_service_changes": ("counter", set(), "Cumulative proxy rules Service changes"),
    "kubeproxy_sync_proxy_rules_iptables_restore_failures": ("counter", {"ip_family"},
                                                             "Cumulative proxy iptables restore failures"),
    "kubeproxy_sync_proxy_rules_iptables_total": ("gauge", {"table", "ip_family"},
                                                  "Total number of iptables rules owned by kube-proxy"),
    "kubeproxy_sync_proxy_rules_iptables_last": ("gauge", {"table", "ip_family"},
                                                 "Number of iptables rules written by kube-proxy in last sync"),
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures": (
        "counter", {"ip_family"}, "Cumulative proxy iptables partial restore failures"),
    "kubeproxy_conntrack_reconciler_sync_duration_seconds": ("histogram", {"ip_family"},
                                                             "ReconcileConntrackFlowsLatency latency in seconds"),
    "kubeproxy_conntrack_reconciler_deleted_entries": ("counter", {"ip_family"},
                                                       "Cumulative conntrack flows deleted by conntrack reconciler"),
    "kubeproxy_iptables_ct_state_invalid_dropped_packets": (
        "counter", set(), "packets dropped by iptables to work around conntrack problems"),
    "kubeproxy_iptables_localhost_nodeports_accepted_packets": (
        "counter", set(), "Number of packets accepted on nodeports of loopback interface"),
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total": (
        "gauge", {"traffic_policy", "ip_family"}, "Number of services with a Local traffic policy and no endpoints"),
    "kubeproxy_proxy_healthz": ("counter", {"code"}, "Cumulative proxy healthz HTTP status"),
    "kubeproxy_proxy_livez": ("counter", {"code"}, "Cumulative proxy livez HTTP status"),
}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def scrape(metrics: AgentMetrics) -> dict[str, list[Sample]]:
    status, content_type, body = metrics_routes(metrics, lambda: "iptables")["/metrics"]()
    assert status == 200 and content_type.startswith("text/plain")
    return {f.name: list(f.samples) for f in text_string_to_metric_families(body.decode())}


def test_buckets_are_kube_proxys() -> None:
    assert list(SYNC_BUCKETS) == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                                                0.512, 1.024, 2.048, 4.096, 8.192, 16.384])
    assert list(PROGRAMMING_BUCKETS) == [0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30)]


def test_kube_proxys_families_under_its_names_types_labels_and_help() -> None:
    metrics = AgentMetrics()
    metrics.read_nfacct(NFACCT, FakeNfacct({"ct_state_invalid_dropped_pkts": 5, "localhost_nps_accepted_pkts": 6}))
    metrics.changed(service_changes=2, endpoint_changes=3)
    metrics.queued()
    metrics.synced(0.02, full=True, rules={"nat": 42, "filter": 7}, no_local=(1, 2), written={"nat": 40, "filter": 7})
    metrics.failed("iptables", 0.5, iptables=True, partial=True)
    metrics.reconciled("IPv4", 0.003, 2)
    health = HealthState(clock=Clock())
    metrics.observe_health(health)
    health.queued()
    health.updated()
    health_routes(health)["/healthz"]()
    health_routes(health)["/livez"]()
    text = metrics_routes(metrics, lambda: "iptables")["/metrics"]()[2].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels, help_text) in KUBE_PROXY.items():
        family = families[name]
        assert (family.type, family.documentation) == (kind, help_text), name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("kubeproxy_sync_proxy_rules_iptables_total", (("ip_family", "IPv4"), ("table", "nat")))] == 42
    assert samples[("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                    (("ip_family", "IPv4"), ("traffic_policy", "internal")))] == 1
    assert samples[("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                    (("ip_family", "IPv4"), ("traffic_policy", "external")))] == 2
    assert samples[("kubeproxy_sync_proxy_rules_duration_seconds_count", (("ip_family", "IPv4"),))] == 2
    assert samples[("kubeproxy_sync_full_proxy_rules_duration_seconds_count", (("ip_family", "IPv4"),))] == 1
    assert samples[("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", (("ip_family", "IPv4"),))] == 1
    assert samples[("kubeproxy_sync_proxy_rules_service_changes_total", ())] == 2
    assert samples[("kubeproxy_sync_proxy_rules_endpoint_changes_total", ())] == 3
    assert samples[("kubeproxy_sync_proxy_rules_service_changes_pending", ())] == 0  # the sync took them
    assert samples[("kubeproxy_proxy_healthz_total", (("code", "200"),))] == 1
    assert samples[("kubeproxy_proxy_livez_total", (("code", "200"),))] == 1
    assert samples[("kubeproxy_network_programming_duration_seconds_count", (("ip_family", "IPv4"),))] == 1
    assert samples[("kubeproxy_sync_proxy_rules_last_timestamp_seconds", (("ip_family", "IPv4"),))] > 0
    assert samples[("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", (("ip_family", "IPv4"),))] > 0
    assert samples[("nodeagent_sync_proxy_rules_failures_total", (("mode", "iptables"),))] == 1
    assert samples[("kubeproxy_sync_proxy_rules_iptables_last", (("ip_family", "IPv4"), ("table", "nat")))] == 40
    assert samples[("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
                    (("ip_family", "IPv4"),))] == 1
    assert samples[("kubeproxy_conntrack_reconciler_sync_duration_seconds_count", (("ip_family", "IPv4"),))] == 1
    assert samples[("kubeproxy_conntrack_reconciler_deleted_entries_total", (("ip_family", "IPv4"),))] == 2
    assert samples[("kubeproxy_iptables_ct_state_invalid_dropped_packets_total", ())] == 5
    assert samples[("kubeproxy_iptables_localhost_nodeports_accepted_packets_total", ())] == 6


def test_exposed_names_are_kube_proxys_exactly() -> None:
    """prometheus_client appends `_total` to a counter's name: the names on the wire (HELP, TYPE and samples)
    must be kube-proxy's, never `..._total_total`, and every counter carries `_total` once."""
    metrics = AgentMetrics()
    metrics.read_nfacct(NFACCT, FakeNfacct({"ct_state_invalid_dropped_pkts": 1, "localhost_nps_accepted_pkts": 2}))
    metrics.failed("iptables", 0.5, iptables=True, partial=True)
    metrics.reconciled("IPv4", 0.003, 1)
    text = metrics_routes(metrics, lambda: "iptables")["/metrics"]()[2].decode()
    assert "_total_total" not in text
    typed = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}
    for name in ("kubeproxy_conntrack_reconciler_deleted_entries_total",
                 "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
                 "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                 "kubeproxy_iptables_ct_state_invalid_dropped_packets_total",
                 "kubeproxy_iptables_localhost_nodeports_accepted_packets_total"):
        assert typed.get(name) == "counter", name
    assert typed["kubeproxy_conntrack_reconciler_sync_duration_seconds"] == "histogram"
    assert 'kubeproxy_conntrack_reconciler_sync_duration_seconds_bucket{ip_family="IPv4",le="0.004"} 1.0' in text


def test_the_conntrack_reconciler_histogram_has_kube_proxys_buckets() -> None:
    metrics = AgentMetrics()
    metrics.reconciled("IPv6", 0.02, 0)
    buckets = [s.labels["le"] for s in scrape(metrics)["kubeproxy_conntrack_reconciler_sync_duration_seconds"]
               if s.name.endswith("_bucket")]
    assert [float(b) for b in buckets[:-1]] == pytest.approx(list(SYNC_BUCKETS)) and buckets[-1] == "+Inf"
    value = metrics.registry.get_sample_value
    assert value("kubeproxy_conntrack_reconciler_deleted_entries_total", {"ip_family": "IPv6"}) == 0, \
        "a pass that deleted nothing still publishes its family (kube-proxy adds 0)"
    assert value("kubeproxy_conntrack_reconciler_deleted_entries_total", {"ip_family": "IPv4"}) is None


def test_partial_restore_failures_are_counted_apart_and_in_the_restore_failures() -> None:
    """kube-proxy: a failed partial sync counts in both counters; a failed full one only in the restore
    failures; a failure outside iptables-restore in neither."""
    metrics = AgentMetrics()
    metrics.failed("iptables", 0.1, iptables=True, partial=True)
    metrics.failed("iptables", 0.1, iptables=True)
    metrics.failed("ebpf", 0.1, iptables=False)
    value = metrics.registry.get_sample_value
    v4 = {"ip_family": "IPv4"}
    assert value("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", v4) == 1
    assert value("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", v4) == 2
    assert value("kubeproxy_sync_proxy_rules_duration_seconds_count", v4) == 3


def test_rules_written_are_set_by_every_sync_and_totals_only_when_counted() -> None:
    metrics = AgentMetrics()
    metrics.synced(0.01, full=True, rules={"nat": 100, "filter": 9}, no_local=(0, 0), written={"nat": 100, "filter": 9})
    metrics.synced(0.01, full=False, rules={}, no_local=(0, 0), written={"nat": 4, "filter": 0})
    value = metrics.registry.get_sample_value
    assert value("kubeproxy_sync_proxy_rules_iptables_last", {"table": "nat", "ip_family": "IPv4"}) == 4
    assert value("kubeproxy_sync_proxy_rules_iptables_last", {"table": "filter", "ip_family": "IPv4"}) == 0
    assert value("kubeproxy_sync_proxy_rules_iptables_total", {"table": "nat", "ip_family": "IPv4"}) == 100
    metrics.synced(0.01, full=True, rules={}, no_local=(0, 0))  # eBPF mode: nothing written to iptables measured
    assert value("kubeproxy_sync_proxy_rules_iptables_last", {"table": "nat", "ip_family": "IPv4"}) == 4


NFACCT = {CT_STATE_INVALID_DROPPED_PACKETS: "ct_state_invalid_dropped_pkts",
          LOCALHOST_NODEPORTS_ACCEPTED_PACKETS: "localhost_nps_accepted_pkts"}


class FakeNfacct:
    """The kernel's nfacct objects: packets by name; `failing` names raise as a broken socket would."""

    def __init__(self, counters: dict[str, int], failing: dict[str, Exception] | None = None) -> None:
        self.counters = counters
        self.failing = failing or {}
        self.reads: list[str] = []

    def __call__(self, name: str) -> int | None:
        self.reads.append(name)
        if name in self.failing:
            raise self.failing[name]
        return self.counters.get(name)


def nfacct_samples(metrics: AgentMetrics) -> dict[str, float]:
    families = scrape(metrics)
    return {s.name: s.value for name in ("kubeproxy_iptables_ct_state_invalid_dropped_packets",
                                         "kubeproxy_iptables_localhost_nodeports_accepted_packets")
            for s in families.get(name, ()) if not s.name.endswith("_created")}


def test_nfacct_counters_are_read_at_each_scrape() -> None:
    kernel = FakeNfacct({"ct_state_invalid_dropped_pkts": 3, "localhost_nps_accepted_pkts": 0})
    metrics = AgentMetrics()
    metrics.read_nfacct(NFACCT, kernel)
    assert not kernel.reads, "nothing is read before a scrape"
    assert nfacct_samples(metrics) == {"kubeproxy_iptables_ct_state_invalid_dropped_packets_total": 3,
                                       "kubeproxy_iptables_localhost_nodeports_accepted_packets_total": 0}
    kernel.counters["ct_state_invalid_dropped_pkts"] = 11
    assert nfacct_samples(metrics)["kubeproxy_iptables_ct_state_invalid_dropped_packets_total"] == 11
    assert kernel.reads.count("ct_state_invalid_dropped_pkts") == 2


def test_nfacct_families_are_published_only_while_their_counters_exist() -> None:
    """kube-proxy's collector sends nothing when its counter is missing (not created: no nfacct in the kernel,
    or the node's rules do not count there)."""
    kernel = FakeNfacct({"localhost_nps_accepted_pkts": 8})
    metrics = AgentMetrics()
    metrics.read_nfacct(NFACCT, kernel)
    assert nfacct_samples(metrics) == {"kubeproxy_iptables_localhost_nodeports_accepted_packets_total": 8}
    kernel.counters.clear()
    text = metrics_routes(metrics, lambda: "iptables")["/metrics"]()[2].decode()
    assert "nfacct" not in text and "_packets" not in text
    assert "kubeproxy_sync_proxy_rules_duration_seconds" in text
    assert "kubeproxy_iptables" not in metrics_routes(AgentMetrics(), lambda: "iptables")["/metrics"]()[2].decode()


def test_an_unreadable_nfacct_counter_leaves_out_its_family_only_and_is_logged_once() -> None:
    kernel = FakeNfacct({"localhost_nps_accepted_pkts": 2},
                        failing={"ct_state_invalid_dropped_pkts": OSError(errno.ENOBUFS, "No buffer space available")})
    metrics = AgentMetrics()
    metrics.read_nfacct(NFACCT, kernel)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            status, _, body = metrics_routes(metrics, lambda: "iptables")["/metrics"]()
            assert status == 200 and b"kubeproxy_sync_proxy_rules_duration_seconds" in body
            assert nfacct_samples(metrics) == {"kubeproxy_iptables_localhost_nodeports_accepted_packets_total": 2}
    warned = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warned) == 1 and warned[0]["counter"] == "ct_state_invalid_dropped_pkts"
    assert "No buffer space" in warned[0]["reason"]
    del kernel.failing["ct_state_invalid_dropped_pkts"]
    kernel.counters["ct_state_invalid_dropped_pkts"] = 4
    assert nfacct_samples(metrics)["kubeproxy_iptables_ct_state_invalid_dropped_packets_total"] == 4
    kernel.failing["ct_state_invalid_dropped_pkts"] = NfacctUnsupported("nfacct sub-system not available")
    with structlog.testing.capture_logs() as logs:
        assert "kubeproxy_iptables_ct_state_invalid_dropped_packets_total" not in nfacct_samples(metrics)
    assert len(logs) == 1, "logged again after it had recovered"


def test_changes_wait_as_pending_until_a_sync() -> None:
    metrics = AgentMetrics()
    metrics.changed(service_changes=1, endpoint_changes=0)
    metrics.changed(service_changes=0, endpoint_changes=4)
    samples = {s.name: s.value for family in scrape(metrics).values() for s in family}
    assert samples["kubeproxy_sync_proxy_rules_service_changes_pending"] == 1
    assert samples["kubeproxy_sync_proxy_rules_endpoint_changes_pending"] == 4
    metrics.synced(0.01, full=False, rules={}, no_local=(0, 0))
    samples = {s.name: s.value for family in scrape(metrics).values() for s in family}
    assert samples["kubeproxy_sync_proxy_rules_endpoint_changes_pending"] == 0
    assert samples["kubeproxy_sync_partial_proxy_rules_duration_seconds_count"] == 1


def test_health_answers_are_counted_by_code() -> None:
    """kube-proxy's TestHealthzServer metrics: proxy_healthz_total{code} and proxy_livez_total{code} equal the
    answers given with that code."""
    clock, metrics = Clock(), AgentMetrics()
    health = HealthState(grace=10.0, clock=clock)
    metrics.observe_health(health)
    routes = health_routes(health)
    routes["/healthz"]()
    health.queued()
    clock.now += 11
    routes["/healthz"]()
    routes["/healthz"]()
    routes["/livez"]()
    value = metrics.registry.get_sample_value
    assert value("kubeproxy_proxy_healthz_total", {"code": "200"}) == 1
    assert value("kubeproxy_proxy_healthz_total", {"code": "503"}) == 2
    assert value("kubeproxy_proxy_livez_total", {"code": "503"}) == 1


def test_network_programming_duration_is_the_wait_of_the_oldest_change() -> None:
    clock, metrics = Clock(), AgentMetrics()
    state = HealthState(clock=clock)
    metrics.observe_health(state)
    state.queued()
    clock.now += 0.3
    state.updated()
    state.updated()  # nothing queued: nothing to measure
    value = metrics.registry.get_sample_value
    assert value("kubeproxy_network_programming_duration_seconds_count", {"ip_family": "IPv4"}) == 1
    assert value("kubeproxy_network_programming_duration_seconds_sum", {"ip_family": "IPv4"}) == pytest.approx(0.3)


def test_nodeagents_own_metrics_beside_them() -> None:
    metrics = AgentMetrics()
    metrics.set_mode("iptables", "asked for")
    metrics.map_entries.labels(map="services").set(7)
    metrics.rejections.labels(kind="Service", scope="object").set(2)
    metrics.service_ports.set(3)
    families = scrape(metrics)
    for name in ("nodeagent_sync_proxy_rules_failures", "nodeagent_sync_proxy_map_entries",
                 "nodeagent_rejected_objects", "nodeagent_proxy_mode_info", "nodeagent_service_ports"):
        assert name in families, sorted(families)
    assert metrics_routes(metrics, lambda: "iptables")["/proxyMode"]() == (200, "text/plain", b"iptables")


def test_http_refusals_are_read_from_the_servers_at_each_scrape() -> None:
    counts = {"health-check": {"deadline": 3}, "healthz": {}}
    metrics = AgentMetrics()
    metrics.read_refusals(lambda: counts)
    samples = scrape(metrics)["nodeagent_http_refused_connections"]
    assert [(s.name, s.labels, s.value) for s in samples if s.name.endswith("_total")] == [
        ("nodeagent_http_refused_connections_total", {"server": "health-check", "reason": "deadline"}, 3.0)]
    counts["health-check"]["deadline"] = 5
    counts["healthz"]["too-large"] = 1
    samples = scrape(metrics)["nodeagent_http_refused_connections"]
    assert {(s.labels["server"], s.labels["reason"]): s.value for s in samples if s.name.endswith("_total")} == {
        ("health-check", "deadline"): 5.0, ("healthz", "too-large"): 1.0}
