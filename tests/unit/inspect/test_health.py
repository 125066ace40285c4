"""The agent's /healthz and /livez (kube-proxy's rule: unhealthy once a queued change has waited longer than the
grace period, the timestamps in the body) and its metrics, parsed with Prometheus' own parser."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.observability.health import HealthState, health_routes
from nodeagent.observability.metrics import AgentMetrics, metrics_routes


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def answer(state: HealthState, path: str) -> tuple[int, dict[str, object]]:
    status, content_type, body = health_routes(state)[path]()
    assert content_type == "application/json"
    return status, json.loads(body)


def test_healthz_and_livez_flip_when_a_sync_stalls_past_the_grace_period_and_recover() -> None:
    clock = Clock()
    state = HealthState(grace=60.0, clock=clock)
    assert answer(state, "/healthz")[0] == 200  # nothing queued yet
    state.queued()
    clock.now += 59
    assert answer(state, "/healthz")[0] == 200
    clock.now += 2  # the change has waited 61 s: the sync stalled
    for path in ("/healthz", "/livez"):
        status, body = answer(state, path)
        assert status == 503
        assert body["oldestQueued"] == "1970-01-12T13:46:40+00:00" and body["lastUpdated"] == ""
        assert body["currentTime"] == "1970-01-12T13:47:41+00:00" and body["gracePeriodSeconds"] == 60.0
    state.updated()
    status, body = answer(state, "/healthz")
    assert status == 200 and body["lastUpdated"] == body["currentTime"] and body["oldestQueued"] == ""


def test_another_change_while_one_waits_keeps_the_oldest_time() -> None:
    clock = Clock()
    state = HealthState(grace=10.0, clock=clock)
    state.queued()
    clock.now += 8
    state.queued()  # a newer change must not reset the wait
    clock.now += 3
    assert answer(state, "/healthz")[0] == 503


def test_network_programming_duration_is_the_wait_of_the_oldest_change() -> None:
    clock, metrics = Clock(), AgentMetrics()
    state = HealthState(clock=clock)
    metrics.observe_health(state)
    state.queued()
    clock.now += 0.3
    state.updated()
    state.updated()  # nothing queued: nothing to measure
    assert metrics.registry.get_sample_value("nodeagent_network_programming_duration_seconds_count") == 1
    assert metrics.registry.get_sample_value("nodeagent_network_programming_duration_seconds_sum") == \
        pytest.approx(0.3)


def test_metrics_parse_with_the_prometheus_parser_under_kube_proxys_names() -> None:
    metrics = AgentMetrics()
    metrics.set_mode("iptables", "asked for")
    metrics.sync_duration.labels(mode="iptables", kind="full").observe(0.02)
    metrics.sync_failures.labels(mode="iptables").inc()
    metrics.last_sync.set(1234.5)
    metrics.rules.labels(table="nat").set(42)
    metrics.map_entries.labels(map="services").set(7)
    metrics.rejections.labels(kind="Service", scope="object").set(2)
    status, content_type, body = metrics_routes(metrics, lambda: "iptables")["/metrics"]()
    assert status == 200 and content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("nodeagent_sync_proxy_rules_duration_seconds", "nodeagent_network_programming_duration_seconds",
                 "nodeagent_sync_proxy_rules_last_timestamp_seconds", "nodeagent_sync_proxy_rules_failures",
                 "nodeagent_sync_proxy_rules_iptables_total", "nodeagent_sync_proxy_map_entries",
                 "nodeagent_rejected_objects", "nodeagent_proxy_mode_info"):
        assert name in families, sorted(families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("nodeagent_sync_proxy_rules_iptables_total", (("table", "nat"),))] == 42
    assert samples[("nodeagent_sync_proxy_rules_failures_total", (("mode", "iptables"),))] == 1
    assert families["nodeagent_sync_proxy_rules_duration_seconds"].type == "histogram"
    assert metrics_routes(metrics, lambda: "iptables")["/proxyMode"]() == (200, "text/plain", b"iptables")
