"""One sync of the eBPF datapath: desired map entries from the snapshot, written incrementally.

- start: adopt or load the pinned programs and maps, attach them to the node's cgroup (idempotent).
- full sync (start, every `sync_period`, after a failure): read what the maps hold and rewrite
  exactly the difference with everything desired (repairs drift; adopts after a restart).
- partial sync: only the frontends of Services that changed.
- Traffic that enters the node from outside (NodePort, externalIPs, load-balancer IPs from other
  hosts) never passes a cgroup program; until the tc programs exist it is served by the iptables
  renderer's rules for exactly those paths (`external_only`), and `/proxyMode` says so.
- With tc, tc serves the external frontends only of the Service ports it fully implements; the others
  (`desired.tc_gaps`: externalTrafficPolicy Local, loadBalancerSourceRanges, ClientIP affinity, SCTP,
  no endpoints, masquerade-all) are flagged in the map so tc leaves them to the stack, and the same
  iptables renderer (`external_only`) is fed exactly those ports: their effect is kube-proxy's. The
  split is logged when it changes, published as a gauge and shown in `/proxyMode`.
- IPv6: the agent runs one proxier per family (kube-proxy's metaproxier), and `ipv6_side` is this proxier's
  IPv6 one: same programs, cgroup and pins, its own maps (na_services6, ...; `family=6`), fed the IPv6
  configuration. tc translates IPv4 only, so its iptables side (ip6tables, `external_only`) serves every IPv6
  NodePort, externalIP and load-balancer IP from outside, as the IPv4 side serves what tc lacks: each such port
  is in `split` with the gap `TcGap.IPV6`, logged when it changes, in its report and `mode_detail`.
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
from nodeagent.kernel.bpf.syscall import MapHandle
from nodeagent.kernel.conntrack import Conntrack
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler, Reconciled
from nodeagent.service.datapath import DatapathMode, Gauges
from nodeagent.service.ebpf.desired import TcGap, plan
from nodeagent.service.ebpf.flows import CT_KEY, CT_VALUE, TcFlowTable
from nodeagent.service.ebpf.maps import FAMILY_MAPS, MapSync, SyncStats
from nodeagent.service.iptables import cleanup as iptables_cleanup
from nodeagent.service.iptables.proxier import IptablesProxier
from nodeagent.state.tracker import Snapshot
from nodeagent.state.translation import ServicePortName

log = structlog.get_logger("nodeagent.service.ebpf.proxier")
EXTERNAL_PATHS = "iptables (NodePort, externalIPs and load-balancer IPs from outside the node)"
IPV6_DETAIL = ("ebpf (IPv6): cgroup connect6/sendmsg6/recvmsg6/getpeername6 (v4-mapped addresses to IPv4 Services "
               "too); external: ip6tables (tc translates IPv4 only)")


@dataclass(frozen=True)
class EbpfSyncReport:
    """What one sync of the maps did (for logs, metrics and tests); a `service.datapath.SyncReport`."""

    full: bool
    stats: SyncStats
    seconds: float
    services: int = 0  # frontends in the service map after the sync
    backends: int = 0  # backends in the backend map
    # Service ports whose traffic from outside the node iptables serves (tc lacks what they need), and why
    external_on_iptables: dict[ServicePortName, tuple[TcGap, ...]] = field(default_factory=dict)
    tc: bool = False  # tc serves traffic from outside (else iptables serves all of it, and no split is measured)
    family: int = 4

    def gauges(self) -> Gauges:
        """Entries of ours per map after the sync (IPv6: the IPv6 maps), and the ports kept on iptables by gap
        (IPv6: under `TcGap.IPV6` alone, so both families' gauges can be published side by side)."""
        names = FAMILY_MAPS[self.family]
        by_gap = ({str(gap): count for gap, count in self.external_on_iptables_by_gap().items()}
                  if self.tc or self.family == 6 else {})
        return Gauges(map_entries={names.services: self.services, names.backends: self.backends},
                      external_on_iptables=by_gap)

    def external_on_iptables_by_gap(self) -> dict[TcGap, int]:
        """Service ports kept on iptables for their external traffic, per gap (every gap of the family, zeros
        included; IPv6 has the one gap, IPv6 itself)."""
        if self.family == 6:
            return {TcGap.IPV6: len(self.external_on_iptables)}
        return {gap: sum(gap in gaps for gaps in self.external_on_iptables.values()) for gap in TcGap
                if gap is not TcGap.IPV6}


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
    tc_active: bool = False  # the tc programs serve traffic from outside (else `external` serves all of it)
    _external_ports: frozenset[ServicePortName] | None = None  # the ports `external` was last fed (None: unknown)
    _external_installed: bool = True  # whether `external` may hold rules (a previous run's, at start)
    split: dict[ServicePortName, tuple[TcGap, ...]] = field(default_factory=dict)
    # stale UDP flows NATed by the kernel (iptables before the switch to eBPF) in this namespace
    conntrack: ConntrackReconciler = field(default_factory=lambda: ConntrackReconciler(Conntrack()))
    # stale UDP flows tc itself keeps (na_ct): the same decision, on tc's flow map, once tc serves
    tc_flows: ConntrackReconciler | None = None
    mode_detail: str = field(default="ebpf: cgroup connect4/sendmsg4/recvmsg4/getpeername4; external: " +
                             EXTERNAL_PATHS)
    # who watches every reconciler's passes (`observe_conntrack`), kept for tc's, which `start` makes
    _conntrack_observers: list[Callable[[Reconciled], None]] = field(default_factory=list)
    family: int = 4  # whose Services' maps this proxier writes (see `ipv6_side`)

    def ipv6_side(self, external: IptablesProxier | None) -> EbpfProxier:
        """This started proxier's IPv6 counterpart: the same programs (connect6, sendmsg6, recvmsg6,
        getpeername6 are loaded and attached with the IPv4 ones), the IPv6 maps, and `external` (an ip6tables
        proxier) for all IPv6 traffic from outside the node, which tc does not translate."""
        assert self.datapath is not None, "start() first"
        side = EbpfProxier(self.scope, self.cgroup, external=external, sync_period=self.sync_period, clock=self.clock,
                           datapath=self.datapath, _maps=MapSync(self.datapath.maps, family=6), family=6,
                           conntrack=ConntrackReconciler(Conntrack()))
        side.mode_detail = IPV6_DETAIL
        return side

    @property
    def _reports_split(self) -> bool:
        """Whether this proxier's external traffic is split between tc and iptables (IPv6: all on ip6tables)."""
        return self.tc_active or self.family == 6

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
            # The iptables rules stay until the first sync has decided which Service ports still need them.
            self.tc_active = True
            try:
                self.tc_flows = ConntrackReconciler(TcFlowTable(MapHandle.pinned(
                    str(self.datapath.directory / "na_ct"), CT_KEY.size, CT_VALUE.size)),
                    observers=list(self._conntrack_observers))
            except OSError as exc:  # tc serves all the same; only its stale UDP flows wait for eviction
                log.warning("tc's flow map unreadable; its stale UDP flows are not reconciled", reason=str(exc))
            self.mode_detail = self._tc_detail()
        return self

    def _tc_detail(self) -> str:
        detail = ("ebpf: cgroup connect4/sendmsg4/recvmsg4/getpeername4; external: tc on "
                  + ", ".join(self.tc_interfaces))
        if self.split:
            detail += "; external on iptables (tc lacks what they need): " + "; ".join(
                f"{name} ({', '.join(gaps)})" for name, gaps in sorted(self.split.items(), key=lambda i: str(i[0])))
        return detail

    def observe_conntrack(self, observer: Callable[[Reconciled], None]) -> None:
        """Call `observer` with every pass of each conntrack reconciler (a `service.datapath.ObservesConntrack`):
        the kernel's table here and on the iptables side, and tc's flow map.

        tc's flows are reported under the same `ip_family` as the kernel's: na_ct holds the NAT state that the
        kernel's conntrack holds for the same packets in iptables mode (traffic from outside to NodePorts and
        external addresses), and deleting a stale entry there is the very act kube-proxy's reconciler counts;
        a dashboard of `kubeproxy_conntrack_reconciler_deleted_entries_total` then reads the same in either
        mode, and no label kube-proxy lacks is added. Each table is a pass of its own (one duration each)."""
        self._conntrack_observers.append(observer)
        self.conntrack.observers.append(observer)
        if self.tc_flows is not None:
            self.tc_flows.observers.append(observer)
        if self.external is not None:
            self.external.observe_conntrack(observer)

    def force_full_sync(self) -> None:
        self._need_full = True
        if self.external is not None:
            self.external.force_full_sync()

    def canaries_intact(self) -> bool:
        if self.external is None or (self.tc_active and not self._external_installed):
            return True
        return self.external.canaries_intact()

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
        masquerade_all = config.masquerade_all
        if full:
            loader.attach(self.datapath, self.cgroup)  # repairs a detach by someone else
            planned = plan(service_ports, endpoints, node_ips=node_ips, node_labels=config.node_labels,
                           masquerade_all=masquerade_all, family=self.family)
            split = dict(planned.external_stack)
            labels: set[str] | None = None
        else:
            keys = {f"{ref.namespace}/{ref.name}" for ref in changed}
            ports = {name for name in service_ports if f"{name.namespace}/{name.name}" in keys}
            labels = {str(name) for name in ports} | {
                i.entry.port_name for i in self._maps.installed.values() if i.entry.port_name.split(":")[0] in keys}
            planned = plan(service_ports, endpoints, node_ips=node_ips, node_labels=config.node_labels, only=ports,
                           masquerade_all=masquerade_all, family=self.family)
            split = {name: gaps for name, gaps in self.split.items()
                     if f"{name.namespace}/{name.name}" not in keys and name in service_ports}
            split.update(planned.external_stack)
        # A port moving to iptables gets its rules before tc is told to leave it to the stack; one moving to tc
        # keeps them until tc serves it (tc comes first on the wire): no new flow ever meets neither.
        self._sync_external(snapshot, config, changed, frozenset(split) | frozenset(self.split))
        if full:
            self._maps.adopt(planned.entries)
            stats = self._maps.apply(planned.entries)
        else:
            stats = self._maps.apply(planned.entries, only=labels)
        self._record_split(split)
        if self.tc_active and frozenset(split) != self._external_ports:
            self._sync_external(snapshot, config, changed, frozenset(split))
        if self.tc_active or self.external is None:
            # tc serves (some) external traffic: the whole snapshot's stale UDP flows are reconciled here (the
            # iptables side sees only its own ports), and only now that the maps hold no removed backend: a
            # datagram between a deletion and the maps' update would make a new flow to the removed backend that
            # nothing deletes (kube-proxy, too, cleans conntrack after iptables-restore, not before)
            self.conntrack.after_sync(snapshot.service_ports, snapshot.endpoints, changed)
            if self.tc_flows is not None:
                self.tc_flows.after_sync(snapshot.service_ports, snapshot.endpoints, changed)
        self._need_full = False
        self._config = config
        if full:
            self._last_full = started
        report = EbpfSyncReport(full, stats, self.clock() - started, len(self._maps.installed),
                                len(self._maps.backend_ids), dict(self.split) if self._reports_split else {},
                                self.tc_active, self.family)
        log.info("ebpf maps synced", family=f"IPv{self.family}", full=full, frontends_written=stats.written,
                 frontends_removed=stats.removed, map_updates=stats.map_updates, seconds=round(report.seconds, 4))
        return report

    def _record_split(self, split: dict[ServicePortName, tuple[TcGap, ...]]) -> None:
        """Remember (and log, when it changed) which ports' external traffic iptables serves, and why."""
        if not self._reports_split:
            return
        if split != self.split:
            log.info("external traffic split between tc and iptables", family=f"IPv{self.family}",
                     on_iptables={str(name): [str(g) for g in gaps] for name, gaps in sorted(
                         split.items(), key=lambda i: str(i[0]))},
                     moved_to_iptables=sorted(str(n) for n in split.keys() - self.split.keys()),
                     moved_to_tc=sorted(str(n) for n in self.split.keys() - split.keys()))
        self.split = split
        self.mode_detail = self._tc_detail() if self.family == 4 else self._ipv6_detail()

    def _ipv6_detail(self) -> str:
        if not self.split:
            return IPV6_DETAIL
        return IPV6_DETAIL + "; external on ip6tables: " + "; ".join(
            f"{name} ({', '.join(gaps)})" for name, gaps in sorted(self.split.items(), key=lambda i: str(i[0])))

    def _sync_external(self, snapshot: Snapshot, config: ProxyConfig, changed: AbstractSet[ObjectRef],
                       ports: frozenset[ServicePortName]) -> None:
        """Program the iptables side: every external path without tc; with tc, exactly `ports` (the rules are
        removed altogether when no port needs them)."""
        if self.external is not None and not self.tc_active:
            self.external.sync(snapshot, replace(config, external_only=True), changed)  # (reconciles conntrack)
            return
        if self.external is None:
            return
        if not ports:
            if self._external_installed:
                removed = iptables_cleanup.cleanup(self.external.ipt)
                log.info("external traffic served by tc only; iptables rules removed", removed=len(removed))
                self._external_installed = False
                self.external.force_full_sync()
            self._external_ports = ports
            return
        if ports != self._external_ports:
            self.external.force_full_sync()  # which ports are fed changed: rewrite (and drop the others')
        fed = replace(snapshot, service_ports={n: i for n, i in snapshot.service_ports.items() if n in ports},
                      endpoints={n: e for n, e in snapshot.endpoints.items() if n in ports})
        self._external_ports = None  # until the sync succeeds
        self._external_installed = True
        self.external.sync(fed, replace(config, external_only=True), changed)
        self._external_ports = ports

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
