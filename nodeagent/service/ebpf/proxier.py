"""One sync of the eBPF datapath: desired map entries from the snapshot, written incrementally.

- start: adopt or load the pinned programs and maps, attach them to the node's cgroup (idempotent).
- full sync (start, every `sync_period`, after a failure): read what the maps hold and rewrite
  exactly the difference with everything desired (repairs drift; adopts after a restart).
- partial sync: only the frontends of Services that changed.
- Traffic that enters the node from outside (NodePort, externalIPs, load-balancer IPs from other
  hosts) never passes a cgroup program; until the tc programs exist it is served by the iptables
  renderer's rules for exactly those paths (`external_only`), and `/proxyMode` says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import structlog

from nodeagent.cluster.model import ObjectRef
from nodeagent.kernel.bpf import loader, tc
from nodeagent.kernel.conntrack import Conntrack
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler
from nodeagent.service.datapath import DatapathMode, Gauges
from nodeagent.service.ebpf.desired import desired_entries
from nodeagent.service.ebpf.maps import MapSync, SyncStats
from nodeagent.service.iptables import cleanup as iptables_cleanup
from nodeagent.service.iptables.proxier import IptablesProxier
from nodeagent.state.tracker import Snapshot

log = structlog.get_logger("nodeagent.service.ebpf.proxier")
EXTERNAL_PATHS = "iptables (NodePort, externalIPs and load-balancer IPs from outside the node)"


@dataclass(frozen=True)
class EbpfSyncReport:
    """What one sync of the maps did (for logs, metrics and tests); a `service.datapath.SyncReport`."""

    full: bool
    stats: SyncStats
    seconds: float
    services: int = 0  # frontends in the service map after the sync
    backends: int = 0  # backends in the backend map

    def gauges(self) -> Gauges:
        """Entries of ours per map after the sync."""
        return Gauges(map_entries={"na_services": self.services, "na_backends": self.backends})


@dataclass
class EbpfProxier:
    """Keeps one node's socket load balancer (and its iptables side for external traffic) in sync (a
    `service.datapath.Datapath`)."""

    mode: ClassVar[DatapathMode] = DatapathMode.EBPF

    scope: str
    cgroup: Path
    external: IptablesProxier | None = None
    sync_period: float = 30.0
    clock: Callable[[], float] = time.monotonic
    datapath: loader.ServicePrograms | None = None
    _maps: MapSync | None = None
    _need_full: bool = True
    _last_full: float = float("-inf")
    _config: ProxyConfig | None = None
    tc_interfaces: list[str] = field(default_factory=list)
    # stale UDP flows NATed by the kernel (iptables before the switch to eBPF) in this namespace
    conntrack: ConntrackReconciler = field(default_factory=lambda: ConntrackReconciler(Conntrack()))
    mode_detail: str = field(default="ebpf: cgroup connect4/sendmsg4/recvmsg4/getpeername4; external: " +
                             EXTERNAL_PATHS)

    def start(self) -> EbpfProxier:
        """Load (or adopt) and attach; raises loader.BpfError when this kernel or bcc cannot.

        The tc programs take over traffic from outside when they load and attach; otherwise the
        iptables rules for those paths stay, with the reason in `mode_detail`.
        """
        self.datapath = loader.load(self.scope)
        try:
            loader.attach(self.datapath, self.cgroup)
        except loader.BpfError:
            loader.detach(self.cgroup)  # never leave some hooks translating and others not
            raise
        self._maps = MapSync(self.datapath.maps)
        if self.tc_interfaces:
            try:
                tc.load_tc(self.datapath)
                tc.attach_tc(self.datapath, self.tc_interfaces)
            except (loader.BpfError, OSError) as exc:
                log.warning("tc programs unavailable; external traffic stays on iptables", reason=str(exc))
                self.mode_detail += f" (tc unavailable: {exc})"
                return self
            if self.external is not None:
                removed = iptables_cleanup.cleanup(self.external.ipt)
                log.info("external traffic moved from iptables to tc", removed=len(removed))
            self.external = None
            self.mode_detail = ("ebpf: cgroup connect4/sendmsg4/recvmsg4/getpeername4; external: tc on "
                                + ", ".join(self.tc_interfaces))
        return self

    def force_full_sync(self) -> None:
        self._need_full = True
        if self.external is not None:
            self.external.force_full_sync()

    def canaries_intact(self) -> bool:
        return self.external.canaries_intact() if self.external is not None else True

    def sync(self, snapshot: Snapshot, config: ProxyConfig, changed: AbstractSet[ObjectRef]) -> EbpfSyncReport:
        """Write the maps to match `snapshot` (a partial sync rewrites the Services in `changed`); raises on
        failure (the next sync is then a full one)."""
        assert self._maps is not None and self.datapath is not None, "start() first"
        service_ports, endpoints = snapshot.service_ports, snapshot.endpoints
        started = self.clock()
        full = self._need_full or config != self._config or started - self._last_full >= self.sync_period
        self._need_full = True
        node_ips = config.nodeport_ips if config.nodeport_ips is not None else (
            (config.node_ip,) if config.node_ip is not None else ())
        if full:
            loader.attach(self.datapath, self.cgroup)  # repairs a detach by someone else
            desired = desired_entries(service_ports, endpoints, node_ips=node_ips, node_labels=config.node_labels)
            self._maps.adopt(desired)
            stats = self._maps.apply(desired)
        else:
            keys = {f"{ref.namespace}/{ref.name}" for ref in changed}
            ports = {name for name in service_ports if f"{name.namespace}/{name.name}" in keys}
            labels = {str(name) for name in ports} | {
                i.entry.port_name for i in self._maps.installed.values() if i.entry.port_name.split(":")[0] in keys}
            desired = desired_entries(service_ports, endpoints, node_ips=node_ips, node_labels=config.node_labels,
                                      only=ports)
            stats = self._maps.apply(desired, only=labels)
        if self.external is not None:
            self.external.sync(snapshot, replace(config, external_only=True), changed)  # (reconciles conntrack)
        else:
            self.conntrack.after_sync(service_ports, endpoints, changed)
        self._need_full = False
        self._config = config
        if full:
            self._last_full = started
        report = EbpfSyncReport(full, stats, self.clock() - started, len(self._maps.installed),
                                len(self._maps.backend_ids))
        log.info("ebpf maps synced", full=full, frontends_written=stats.written, frontends_removed=stats.removed,
                 map_updates=stats.map_updates, seconds=round(report.seconds, 4))
        return report


def external_interfaces() -> list[str]:
    """Interfaces of this network namespace that traffic from other hosts arrives on: those with a
    non-loopback address that is not a /32 pod-gateway address (the lab's and Calico-style pod links)."""
    import ipaddress

    import psutil

    found = []
    for name, addrs in psutil.net_if_addrs().items():
        for addr in addrs:
            if addr.family.name != "AF_INET" or not addr.netmask:
                continue
            network = ipaddress.ip_interface(f"{addr.address}/{addr.netmask}")
            if not network.ip.is_loopback and network.network.prefixlen < 32:
                found.append(name)
                break
    return sorted(found)
