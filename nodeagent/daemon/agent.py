"""The reconcile loop: a source feeds the change tracker, a rate-limited runner syncs the datapath.

As kube-proxy: nothing is programmed before Services and EndpointSlices have been listed completely
(a half-listed cluster would withdraw Services that exist); changes are coalesced by
`min_sync_period`; a sync also runs every `sync_period` (repairing drift, noticing flushed tables);
a failed sync is retried as a full sync with backoff, and `/healthz` turns unhealthy once changes
have waited longer than its grace period.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from nodeagent import heap
from nodeagent.cluster.events import Deleted, Event, Listed, Sink, Upserted
from nodeagent.cluster.model import IPAddress, Kind, ObjectRef
from nodeagent.kernel import nfacct
from nodeagent.kernel.netfilter import IptablesError
from nodeagent.observability.health import HEALTH_HEADERS, IPV4, IPV6, HealthState, health_routes, node_eligible
from nodeagent.observability.http import RouteServer
from nodeagent.observability.metrics import (
    CT_STATE_INVALID_DROPPED_PACKETS,
    LOCALHOST_NODEPORTS_ACCEPTED_PACKETS,
    AgentMetrics,
    ReadsNfacct,
    metrics_routes,
)
from nodeagent.observability.service_health import ServiceHealthServers
from nodeagent.service.addresses import local_addresses
from nodeagent.service.config import (
    CT_STATE_INVALID_DROPPED,
    LOCALHOST_NODEPORTS_ACCEPTED,
    ProxyConfig,
    ProxySettings,
    base_families,
    proxy_config,
)
from nodeagent.service.conntrack import Reconciled
from nodeagent.service.datapath import Datapath, ObservesConntrack, PartialRestoreError
from nodeagent.service.healthcheck import health_check_ports, local_ready_endpoints, no_local_endpoints
from nodeagent.state.sync import SyncRunner, SyncSchedule
from nodeagent.state.tracker import ChangeTracker, Snapshot
from nodeagent.state.translation import endpoints_of_family

log = structlog.get_logger("nodeagent.daemon.agent")
PROGRAMMED_KINDS = (Kind.SERVICE, Kind.ENDPOINT_SLICE)
# kube-proxy's nfacct families and the counters they read (service.config's names, as the rules count in them)
NFACCT_FAMILIES = {CT_STATE_INVALID_DROPPED_PACKETS: CT_STATE_INVALID_DROPPED,
                   LOCALHOST_NODEPORTS_ACCEPTED_PACKETS: LOCALHOST_NODEPORTS_ACCEPTED}


class Source(Protocol):
    """Where the objects come from (the API server's watches, or a directory of manifests)."""

    def start(self) -> object:
        """Begin delivering events to the sink it was made with."""
        ...

    def stop(self) -> None:
        """Stop delivering events."""
        ...


@dataclass(frozen=True)
class AgentOptions:
    """The flags of `nodeagent run` (kube-proxy's names where it has them)."""

    node_name: str
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    proxy: ProxySettings = field(default_factory=ProxySettings)
    healthz_host: str = "0.0.0.0"
    healthz_port: int | None = 10256
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = None  # 10249 in `run`: /metrics and /proxyMode
    healthz_grace: float | None = None  # None: kube-proxy's healthTimeout, twice the sync period


class Agent:
    """Ties a source, the tracker, the runner, the datapath (iptables or eBPF), the health and metrics
    endpoints and the Services' health check node ports together.

    `read_nfacct` reads the kernel's nfacct counters at each scrape of `/metrics` (None: not published).
    `ipv6_proxier`: the IPv6 datapath, run beside `proxier` (IPv4) as kube-proxy's metaproxier runs one proxier
    per family: it syncs once the node has IPv6 to serve (an IPv6 node address or pod CIDR, or an IPv6
    --cluster-cidr) and from then on, each sync after the IPv4 one, with its own configuration, pending
    changes, health (`/healthz` per family) and `ip_family="IPv6"` metrics. None: IPv6 is never served, and the
    change tracker reports every IPv6 Service as not served."""

    def __init__(self, options: AgentOptions, make_source: Callable[[Sink], Source], proxier: Datapath,
                 addresses: Callable[[], tuple[IPAddress, ...]] = local_addresses,
                 read_nfacct: ReadsNfacct | None = nfacct.packets, ipv6_proxier: Datapath | None = None) -> None:
        heap.limit_malloc_retention()
        self.options = options
        self.make_source = make_source
        self.proxier = proxier
        self.ipv6_proxier = ipv6_proxier
        self._ipv6_active = False  # the IPv6 proxier has started syncing (it then never stops)
        self._pending6: set[ObjectRef] = set()
        self.addresses = addresses
        grace = options.healthz_grace if options.healthz_grace is not None else 2 * options.sync_period
        self.health = HealthState(grace=grace)
        self.metrics = AgentMetrics()
        self.metrics.observe_health(self.health)
        for each in (proxier, ipv6_proxier):
            if isinstance(each, ObservesConntrack):
                each.observe_conntrack(self._reconciled)
        if read_nfacct is not None:
            self.metrics.read_nfacct(NFACCT_FAMILIES, read_nfacct)
        # kube-proxy's service health server: answers from the proxy's health without node eligibility
        self.service_health = ServiceHealthServers(lambda: self.health.health().healthy)
        self.metrics.read_refusals(self._refusals)
        self.synced = threading.Event()  # set after the first successful sync
        self.syncs = 0
        self._pending: set[ObjectRef] = set()
        self._settled = False
        # the families served whatever the Node says (IPv4, and those of --cluster-cidr), limited to the proxiers
        # there are; the Node's own addresses and pod CIDRs add theirs (see ChangeTracker)
        servable = frozenset({4, 6}) if ipv6_proxier is not None else frozenset({4})
        self._tracker = ChangeTracker(self.options.node_name, on_change=self._changed,
                                      families=base_families(options.proxy) & servable, servable=servable)
        self._runner = SyncRunner(self._sync, SyncSchedule(self.options.min_sync_period, self.options.sync_period),
                                  name=f"{proxier.mode}-sync")
        self._source: Source | None = None
        self._server: RouteServer | None = None
        self._metrics_server: RouteServer | None = None

    def _reconciled(self, result: Reconciled) -> None:
        """A pass of the datapath's conntrack reconciler (on its sync thread)."""
        self.metrics.reconciled(result.ip_family, result.seconds, result.deleted)

    def _changed(self) -> None:
        self.health.queued()
        self.metrics.queued()
        if self._ipv6_active:
            self.health.queued(IPV6)
            self.metrics.queued(IPV6)
        self._runner.request()

    def _received(self, event: Event) -> None:
        """Count the Service and EndpointSlice changes (kube-proxy's change counters), then track the event."""
        if isinstance(event, Listed):
            kind, count = event.kind, len(event.items)
        elif isinstance(event, (Upserted, Deleted)):
            kind, count = (event.kind if isinstance(event, Upserted) else event.ref.kind), 1
        else:
            kind, count = None, 0
        if kind is Kind.SERVICE or kind is Kind.ENDPOINT_SLICE:
            self.metrics.changed(count if kind is Kind.SERVICE else 0, count if kind is Kind.ENDPOINT_SLICE else 0)
        self._tracker.apply(event)

    @property
    def tracker(self) -> ChangeTracker:
        return self._tracker

    def _refusals(self) -> dict[str, dict[str, int]]:
        """What each HTTP server of the agent turned away so far, by reason."""
        servers = {"healthz": self._server, "metrics": self._metrics_server}
        out = {name: server.refusals() for name, server in servers.items() if server is not None}
        out["health-check"] = self.service_health.refusals()
        return out

    def start(self) -> Agent:
        """Serve health, start the source and the sync runner."""
        self.metrics.set_mode(self.health.mode, self.health.mode_reason)
        if self.options.healthz_port is not None:
            self._server = RouteServer(health_routes(self.health), self.options.healthz_host,
                                       self.options.healthz_port, "healthz", headers=HEALTH_HEADERS).start()
        if self.options.metrics_port is not None:
            self._metrics_server = RouteServer(metrics_routes(self.metrics, lambda: self.health.mode),
                                               self.options.metrics_host, self.options.metrics_port,
                                               "metrics").start()
        # Everything the source is about to deliver waits for the first sync: it counts for /healthz and for
        # the network programming duration from now (the tracker reports only later changes itself).
        self.health.queued()
        self.metrics.queued()
        self._source = self.make_source(self._received)
        self._source.start()
        self._runner.start()
        log.info("agent started", node=self.options.node_name)
        return self

    def stop(self) -> None:
        """Stop syncing and watching; the programmed datapath stays in place (as kube-proxy's does)."""
        self._runner.stop()
        if self._source is not None:
            self._source.stop()
        if self._server is not None:
            self._server.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self.service_health.close()

    def _sync(self) -> None:
        if not self._tracker.synced(PROGRAMMED_KINDS):
            log.info("waiting for the complete list of Services and EndpointSlices")
            return
        snapshot = self._tracker.snapshot()
        if snapshot is not None:
            self._pending |= snapshot.changed_services
            self._pending6 |= snapshot.changed_services
        else:
            snapshot = self._tracker.last()
            assert snapshot is not None
            for proxier in (self.proxier, self.ipv6_proxier if self._ipv6_active else None):
                if proxier is not None and not proxier.canaries_intact():
                    log.warning("iptables canary chains are gone (tables flushed?); full resync",
                                mode=str(proxier.mode))
                    proxier.force_full_sync()
        if (self.ipv6_proxier is not None and not self._ipv6_active
                and 6 in (snapshot.served_families or frozenset())):
            log.info("the node has IPv6 to serve: the IPv6 proxier starts", node=self.options.node_name)
            self._ipv6_active = True
            self.health.queued(IPV6)
        # kube-proxy's metaproxier syncs each family's proxier on its own: a failing IPv6 sync does not hold the
        # IPv4 rules back, nor the reverse; the first failure is raised once both were tried (a retry with backoff)
        failure: Exception | None = None
        try:
            self._sync_ipv4(snapshot)
        except Exception as exc:
            failure = exc
        if self._ipv6_active:
            try:
                self._sync_ipv6(snapshot)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _sync_ipv6(self, snapshot: Snapshot) -> None:
        assert self.ipv6_proxier is not None
        config = proxy_config(self.options.node_name, self.options.proxy, snapshot, self.addresses(), family=6)
        started = time.monotonic()
        try:
            report = self.ipv6_proxier.sync(snapshot, config, self._pending6)
        except Exception as exc:
            self.metrics.failed(self.health.mode, time.monotonic() - started, iptables=isinstance(exc, IptablesError),
                                partial=isinstance(exc, PartialRestoreError), ip_family=IPV6)
            raise
        gauges = report.gauges()
        # eBPF mode: the IPv6 maps' entries (na_services6, ...; their own names) and the IPv6 ports ip6tables serves
        # from outside by gap (under ip_family IPv6), beside the IPv4 ones
        for map_name, entries in gauges.map_entries.items():
            self.metrics.map_entries.labels(map_name).set(entries)
        for lacks, count in gauges.external_on_iptables.items():
            self.metrics.external_on_iptables.labels(lacks, IPV6).set(count)
        # what the IPv6 proxier serves: the ports with an IPv6 cluster IP, with their IPv6 endpoints
        ports = {name: info for name, info in snapshot.service_ports.items() if 6 in info.families}
        endpoints = {name: tuple(endpoints_of_family(eps, 6)) for name, eps in snapshot.endpoints.items()
                     if name in ports}
        self.metrics.synced(time.monotonic() - started, report.full, gauges.rules,
                            no_local_endpoints(ports, endpoints), written=gauges.written, ip_family=IPV6)
        self._pending6 = set()
        self.health.updated(IPV6)

    def _sync_ipv4(self, snapshot: Snapshot) -> None:
        config = proxy_config(self.options.node_name, self.options.proxy, snapshot, self.addresses())
        started = time.monotonic()
        try:
            report = self.proxier.sync(snapshot, config, self._pending)
        except Exception as exc:
            self.metrics.failed(self.health.mode, time.monotonic() - started, iptables=isinstance(exc, IptablesError),
                                partial=isinstance(exc, PartialRestoreError))
            raise
        gauges = report.gauges()
        for map_name, entries in gauges.map_entries.items():
            self.metrics.map_entries.labels(map_name).set(entries)
        for lacks, ports in gauges.external_on_iptables.items():
            self.metrics.external_on_iptables.labels(lacks, IPV4).set(ports)
        self.metrics.synced(time.monotonic() - started, report.full, gauges.rules,
                            no_local_endpoints(snapshot.service_ports, snapshot.endpoints), written=gauges.written)
        self.metrics.service_ports.set(len(snapshot.service_ports))
        for (kind_name, scope), count in snapshot.rejection_counts.items():
            self.metrics.rejections.labels(kind=kind_name, scope=scope).set(count)
        self._pending = set()
        self.syncs += 1
        self.health.set_node_eligible(self._node_eligible(snapshot))
        self.health.updated()
        self._sync_health_checks(snapshot, config)
        self.synced.set()
        if not self._settled:
            heap.settle()
            self._settled = True

    @staticmethod
    def _node_eligible(snapshot: Snapshot) -> bool:
        node = snapshot.node
        return node_eligible(listed=snapshot.synced((Kind.NODE,)), exists=node is not None,
                             being_deleted=node is not None and node.being_deleted,
                             taint_keys=node.taint_keys if node is not None else frozenset())

    def _sync_health_checks(self, snapshot: Snapshot, config: ProxyConfig) -> None:
        """After a successful sync, as kube-proxy: a listener per health-checked Service on the node's NodePort
        addresses, answering with its local ready endpoints; per family, as each family's proxier has its own (the
        IPv6 one's on the IPv6 NodePort addresses, once the IPv6 proxier runs)."""
        ipv6 = self._ipv6_active
        nodeport_ips6 = proxy_config(self.options.node_name, self.options.proxy, snapshot, self.addresses(),
                                     family=6).nodeport_ips if ipv6 else None
        wanted = health_check_ports(snapshot.service_ports.values(), config.nodeport_ips, nodeport_ips6, ipv6=ipv6)
        self.service_health.sync_services(wanted)
        self.service_health.sync_endpoints(local_ready_endpoints(snapshot.endpoints, only=wanted.keys(), family=4))
        if ipv6:
            self.service_health.sync_endpoints(local_ready_endpoints(snapshot.endpoints, only=wanted.keys(),
                                                                     family=6), family=6)
