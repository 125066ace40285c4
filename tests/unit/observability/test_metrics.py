"""The agent's metrics: kube-proxy's families under its names, types, labels, help texts and buckets
(pkg/proxy/metrics/metrics.go), then nodeagent's own, parsed with Prometheus' own parser."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from nodeagent.observability.health import HealthState, health_routes
from nodeagent.observability.metrics import PROGRAMMING_BUCKETS, SYNC_BUCKETS, AgentMetrics, metrics_routes

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
    metrics.changed(service_changes=2, endpoint_changes=3)
    metrics.queued()
    metrics.synced(0.02, full=True, rules={"nat": 42, "filter": 7}, no_local=(1, 2))
    metrics.failed("iptables", 0.5, iptables=True)
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
