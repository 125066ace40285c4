"""What the tunnel reports per connection: Istio's TCP metrics (so existing dashboards work), our own
counters for resilience and policy, and one structured access-log line per closed connection.

Names and labels follow Istio's standard metrics as ztunnel reports them
(`istio_tcp_connections_opened_total`, `…_closed_total`, `istio_tcp_sent_bytes_total`,
`istio_tcp_received_bytes_total`): `reporter` is `source` on the client's node and `destination` on the
server's; as in Istio, *received* bytes are the request's (client to server) and *sent* bytes the
response's (server to client), whichever side reports. Workload labels
use the pod's `app.kubernetes.io/name` or `app` label (Istio's canonical name), else the pod name.
Each tunnel owns its registry: no process-global collector state.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from nodeagent.observability.http import Route
from nodeagent.tunnel.state.workloads import Workload

log = structlog.get_logger("nodeagent.tunnel.access")

METRICS_PORT = 15020
UNKNOWN = "unknown"
TCP_LABELS = ("reporter", "source_workload", "source_workload_namespace", "source_principal",
              "destination_workload", "destination_workload_namespace", "destination_principal",
              "destination_service", "request_protocol", "response_flags", "connection_security_policy")

# Envoy's response flags, as Istio reports them for TCP
NO_FLAGS = "-"
UPSTREAM_FAILURE = "UF"       # could not connect to the chosen endpoint(s)
NO_HEALTHY_UPSTREAM = "UH"    # no endpoint eligible
UPSTREAM_OVERFLOW = "UO"      # circuit breaker open
UPSTREAM_TIMEOUT = "UT"       # the connect deadline passed
POLICY_DENIED = "RBAC"        # authorization policy refused
DOWNSTREAM_RESET = "DC"       # the client went away before the upstream answered


def canonical_name(workload: Workload | None) -> str:
    """Istio's workload label: the app name label, else the pod name."""
    if workload is None:
        return UNKNOWN
    labels = workload.labels
    return labels.get("app.kubernetes.io/name") or labels.get("app") or workload.name.rsplit("/", 1)[-1] or UNKNOWN


@dataclass
class Connection:
    """One proxied connection, as metrics and the access log see it."""

    reporter: str  # "source" (outbound, 15001) or "destination" (inbound, 15008/15006)
    source: Workload | None
    destination: Workload | None
    source_principal: str = UNKNOWN
    destination_principal: str = UNKNOWN
    service: str = UNKNOWN  # ns/name of the Service the client addressed, if any
    address: str = ""  # what the client asked for (ip:port)
    endpoint: str = ""  # the endpoint chosen (ip:port)
    mtls: bool = True
    attempts: int = 0
    flags: str = NO_FLAGS
    reason: str = ""
    idle_timeout: float | None = 3600.0  # the Service's (nodeagent.io/idle-timeout); None: never
    request_bytes: int = 0  # client -> server
    response_bytes: int = 0  # server -> client
    started: float = field(default_factory=time.monotonic)

    def labels(self) -> dict[str, str]:
        """The Istio TCP metric labels of this connection."""
        return dict(zip(TCP_LABELS, self.label_values(), strict=True))

    def label_values(self) -> tuple[str, ...]:
        """The values of `TCP_LABELS`, in that order."""
        return (self.reporter, canonical_name(self.source), self.source.namespace if self.source else UNKNOWN,
                self.source_principal, canonical_name(self.destination),
                self.destination.namespace if self.destination else UNKNOWN, self.destination_principal,
                self.service, "tcp", self.flags, "mutual_tls" if self.mtls else "none")


class TunnelMetrics:
    """The tunnel's collectors; `opened`/`closed` keep the Istio counters and the access log in step."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.opened_total = Counter("istio_tcp_connections_opened", "TCP connections opened", TCP_LABELS,
                                    registry=self.registry)
        self.closed_total = Counter("istio_tcp_connections_closed", "TCP connections closed", TCP_LABELS,
                                    registry=self.registry)
        self.sent_bytes = Counter("istio_tcp_sent_bytes", "Bytes sent during the response (server to client)",
                                  TCP_LABELS, registry=self.registry)
        self.received_bytes = Counter("istio_tcp_received_bytes", "Bytes received during the request (client to "
                                      "server)", TCP_LABELS, registry=self.registry)
        self.retries = Counter("nodeagent_tunnel_connect_retries", "Connect attempts retried on another endpoint",
                               ["destination_service"], registry=self.registry)
        self.ejections = Counter("nodeagent_tunnel_outlier_ejections", "Endpoints ejected by outlier detection",
                                 ["destination_service"], registry=self.registry)
        self.overflows = Counter("nodeagent_tunnel_circuit_breaker_rejections",
                                 "Connections refused at once because a Service's circuit breaker was open",
                                 ["destination_service", "limit"], registry=self.registry)
        self.denials = Counter("nodeagent_tunnel_policy_denials", "Inbound connections refused by policy",
                               ["destination_workload_namespace", "policy"], registry=self.registry)
        self.refusals = Counter("nodeagent_tunnel_hbone_refusals", "HBONE handshakes or CONNECTs refused",
                                ["reason"], registry=self.registry)
        self.revocations = Counter("nodeagent_tunnel_policy_revocations",
                                   "Open inbound connections closed because a changed policy or label now denies "
                                   "them", ["destination_workload_namespace"], registry=self.registry)
        # Hostile or broken HBONE peers (hbone.server.serve_connection's `violation`): a refused TLS handshake, a
        # refused stream, or a connection closed for a flood or a stall; `reason` is one of hbone.limits.VIOLATIONS.
        self.protocol_violations = Counter("nodeagent_hbone_protocol_violations",
                                           "HBONE peers refused at TLS, streams refused or connections closed for "
                                           "abusing HTTP/2", ["reason"], registry=self.registry)
        self.active = Gauge("nodeagent_tunnel_active_connections", "Connections open now", ["reporter"],
                            registry=self.registry)
        # Each connection's Istio series, found by their label values: prometheus_client's `labels()` validates
        # and sorts eleven labels on every call (~25 us a connection on this path). A series is made on its first
        # use, as before (a connection with no bytes makes no bytes series); the dict holds the children the
        # registry holds anyway, so it grows with the same label sets and no further.
        self._series: dict[tuple[Counter, tuple[str, ...]], Counter] = {}

    def _child(self, counter: Counter, values: tuple[str, ...]) -> Counter:
        child = self._series.get((counter, values))
        if child is None:
            child = self._series[(counter, values)] = counter.labels(*values)
        return child

    def opened(self, connection: Connection) -> None:
        """Count a connection whose upstream was reached (Istio counts opens once established)."""
        self._child(self.opened_total, connection.label_values()).inc()
        self.active.labels(reporter=connection.reporter).inc()

    def closed(self, connection: Connection, *, was_open: bool) -> None:
        """Count the close and the bytes, and write the access-log line."""
        values = connection.label_values()
        if was_open:
            self.active.labels(reporter=connection.reporter).dec()
        self._child(self.closed_total, values).inc()
        if connection.response_bytes:
            self._child(self.sent_bytes, values).inc(connection.response_bytes)
        if connection.request_bytes:
            self._child(self.received_bytes, values).inc(connection.request_bytes)
        access_log(connection)


def access_log(connection: Connection) -> None:
    """One structured line per closed connection (ztunnel's access log fields)."""
    log.info("connection complete", reporter=connection.reporter,
             src_workload=connection.source.name if connection.source else UNKNOWN,
             src_identity=connection.source_principal,
             dst_workload=connection.destination.name if connection.destination else UNKNOWN,
             dst_identity=connection.destination_principal, dst_service=connection.service,
             dst_address=connection.address, endpoint=connection.endpoint, attempts=connection.attempts,
             request_bytes=connection.request_bytes, response_bytes=connection.response_bytes,
             duration_ms=round((time.monotonic() - connection.started) * 1000, 1), flags=connection.flags,
             mtls=connection.mtls, reason=connection.reason or None)


def metrics_routes(metrics: TunnelMetrics) -> Mapping[str, Route]:
    """`/metrics` on 15020, Prometheus text format."""
    return {"/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))}


def merge_families(parts: Iterable[Iterable[Metric]]) -> list[Metric]:
    """The metric families of several tunnels (the workers of one `nodeagent ztunnel --workers N`) as one
    tunnel's: every sample summed over the parts by (name, labels), so counters, gauges and histograms
    (bucket by bucket, `_sum` and `_count`) read as if one process had counted them all; a `_created`
    timestamp is the earliest. The first part to name a family gives its help and type."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in parts:
        for family in families:
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif sample.name.endswith("_created"):
                    samples[key] = min(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


class Families:
    """Collected metric families as a collector (what `generate_latest` reads)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        """The families held."""
        return self.families


def exposition(*collectors: Families | CollectorRegistry) -> bytes:
    """Prometheus text of every family of `collectors`, in order."""
    return b"".join(generate_latest(collector) for collector in collectors)
