"""The tunnel's per-connection telemetry: Istio's TCP series with Istio's labels, counted at open and at close
(with the flags and bytes the connection ended with), the open-connection gauge, and one access-log line."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from nodeagent.ca.identity import SpiffeId
from nodeagent.tunnel.state.workloads import Workload
from nodeagent.tunnel.telemetry import TCP_LABELS, UPSTREAM_FAILURE, Connection, TunnelMetrics, canonical_name

CLIENT = Workload("10.244.1.2", SpiffeId("cluster.local", "demo", "client"), "node1", "/run/netns/c",
                  name="demo/client-7d9", labels={"app": "client"})
ECHO = Workload("10.244.2.3", SpiffeId("cluster.local", "demo", "sa-echo"), "node2", "/run/netns/e",
                name="demo/echo-1", labels={"app.kubernetes.io/name": "echo", "app": "other"})


def samples(metrics: TunnelMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created")}


def connection(**fields: object) -> Connection:
    made = Connection("source", CLIENT, ECHO, source_principal=str(CLIENT.identity),
                      destination_principal=str(ECHO.identity), service="demo/echo", address="10.96.0.10:80",
                      endpoint="10.244.2.3:8080", attempts=1)
    for name, value in fields.items():
        setattr(made, name, value)
    return made


def test_labels_are_istios_in_its_order_with_canonical_workload_names() -> None:
    labels = connection().labels()
    assert tuple(labels) == TCP_LABELS
    assert labels == {
        "reporter": "source", "source_workload": "client", "source_workload_namespace": "demo",
        "source_principal": "spiffe://cluster.local/ns/demo/sa/client", "destination_workload": "echo",
        "destination_workload_namespace": "demo", "destination_principal": "spiffe://cluster.local/ns/demo/sa/sa-echo",
        "destination_service": "demo/echo", "request_protocol": "tcp", "response_flags": "-",
        "connection_security_policy": "mutual_tls"}
    assert canonical_name(None) == "unknown"
    assert canonical_name(Workload("10.0.0.9", CLIENT.identity, "node1", "/x", name="demo/lonely")) == "lonely"


def test_each_connection_is_counted_open_and_closed_with_the_flags_and_bytes_it_ended_with() -> None:
    metrics = TunnelMetrics()
    first, second = connection(), connection()
    metrics.opened(first)
    metrics.opened(second)
    assert samples(metrics)[("nodeagent_tunnel_active_connections", (("reporter", "source"),))] == 2
    first.request_bytes, first.response_bytes = 100, 2000
    metrics.closed(first, was_open=True)
    second.flags, second.mtls = UPSTREAM_FAILURE, False  # what it ended as decides its close series
    metrics.closed(second, was_open=True)
    refused = connection(flags=UPSTREAM_FAILURE, mtls=False)
    metrics.closed(refused, was_open=False)  # never opened: closed and logged, the gauge untouched

    ok = tuple(sorted(first.labels().items()))
    failed = tuple(sorted(second.labels().items()))
    got = samples(metrics)
    assert got[("istio_tcp_connections_opened_total", ok)] == 2
    assert got[("istio_tcp_connections_closed_total", ok)] == 1
    assert got[("istio_tcp_connections_closed_total", failed)] == 2
    assert got[("istio_tcp_received_bytes_total", ok)] == 100
    assert got[("istio_tcp_sent_bytes_total", ok)] == 2000
    assert ("istio_tcp_sent_bytes_total", failed) not in got  # no bytes, no increment
    assert got[("nodeagent_tunnel_active_connections", (("reporter", "source"),))] == 0


@pytest.fixture
def info_logged() -> Iterator[None]:
    """Info lines reach `capture_logs` whatever an earlier test configured: it swaps the processors only, and a
    level filter set before (a CLI run with --log-level warning) would drop the access log first."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.mark.usefixtures("info_logged")
def test_one_access_log_line_per_closed_connection() -> None:
    metrics = TunnelMetrics()
    done = connection(request_bytes=5, response_bytes=7, reason="")
    with capture_logs() as logs:
        metrics.closed(done, was_open=False)
    lines = [entry for entry in logs if entry["event"] == "connection complete"]
    assert len(lines) == 1
    line = lines[0]
    assert (line["src_workload"], line["dst_workload"], line["dst_service"], line["endpoint"]) == (
        "demo/client-7d9", "demo/echo-1", "demo/echo", "10.244.2.3:8080")
    assert (line["request_bytes"], line["response_bytes"], line["flags"], line["mtls"]) == (5, 7, "-", True)
    assert line["reason"] is None
