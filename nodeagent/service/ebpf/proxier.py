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
  configuration. tc translates IPv6 too (na_ct6 its flows, reconciled like na_ct), with the same gaps per port as
  IPv4, reported the same way. Its iptables side (ip6tables, `external_only`) is fed every IPv6 port's external
  paths all the same, not only the gaps': tc leaves IPv6 packets with extension headers or fragments to the stack
  (as it leaves IPv4 options and fragments), and kube-proxy serves those (its conntrack reassembles fragments), so
  the rules stay for them. They never see what tc translated (DNATed before netfilter, or sent past it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
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
from nodeagent.service.ebpf.flows import LAYOUTS, TcFlowTable
from nodeagent.service.ebpf.maps import FAMILY_MAPS, MapSync, SyncStats
from nodeagent.service.iptables import cleanup as iptables_cleanup
from nodeagent.service.iptables.proxier import IptablesProxier
from nodeagent.state.tracker import Snapshot
from nodeagent.state.translation import ServicePortName

log = structlog.get_logger("nodeagent.service.ebpf.proxier")
EXTERNAL_PATHS = "iptables (NodePort, externalIPs and load-balancer IPs from outside the node)"
IPV6_DETAIL = ("ebpf (IPv6): cgroup connect6/sendmsg6/recvmsg6/getpeername6 (v4-mapped addresses to IPv4 Services "
               "too); external: ip6tables (tc unavailable)")
# the IPv6 side with tc: what ip6tables keeps besides the ports tc lacks something for
IPV6_FALLBACK = "ip6tables kept for the packets tc leaves to the stack (extension headers, fragments)"


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
        """Entries of ours per map after the sync (IPv6: the IPv6 maps), and with tc the ports kept on iptables
        by gap (the agent publishes each family's under its `ip_family`)."""
        names = FAMILY_MAPS[self.family]
        by_gap = {str(gap): count for gap, count in self.external_on_iptables_by_gap().items()} if self.tc else {}
        return Gauges(map_entries={names.services: self.services, names.backends: self.backends},
                      external_on_iptables=by_gap)

    def external_on_iptables_by_gap(self) -> dict[TcGap, int]:
        """Service ports kept on iptables for their external traffic, per gap (every gap, zeros included)."""
        return {gap: sum(gap in gaps for gaps in self.external_on_iptables.values()) for gap in TcGap}


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
        getpeername6 are loaded and attached with the IPv4 ones; the tc programs parse both families), the IPv6
        maps, tc's IPv6 flow map (na_ct6) when tc serves, and `external` (an ip6tables proxier) for every IPv6
        external path: the ports tc lacks something for, and the packets tc leaves to the stack."""
        assert self.datapath is not None, "start() first"
        side = EbpfProxier(self.scope, self.cgroup, external=external, sync_period=self.sync_period, clock=self.clock,
                           datapath=self.datapath, _maps=MapSync(self.datapath.maps, family=6), family=6,
                           conntrack=ConntrackReconciler(Conntrack(), family=6), tc_interfaces=list(self.tc_interfaces),
                           tc_active=self.tc_active)
        if side.tc_active:
            side.tc_flows = side._open_tc_flows()
        side.mode_detail = side._ipv6_detail()
        return side

    @property
    def _reports_split(self) -> bool:
        """Whether this proxier's external traffic is split between tc and iptables (else iptables serves all)."""
        return self.tc_active

    @property
    def _external_fed_all(self) -> bool:
        """Whether the iptables side is fed every port's external paths: without tc; and on the IPv6 side always,
        as its rules serve the IPv6 packets tc leaves to the stack (extension headers, fragments)."""
        return not self.tc_active or self.family == 6

    def _open_tc_flows(self) -> ConntrackReconciler | None:
        """The reconciler of tc's flow map of this family (na_ct, na_ct6), or None when it cannot be opened."""
        assert self.datapath is not None
        layout = LAYOUTS[self.family]
        try:
            return ConntrackReconciler(TcFlowTable(MapHandle.pinned(
                str(self.datapath.directory / layout.map_name), layout.key.size, layout.value.size), self.family),
                family=self.family, observers=list(self._conntrack_observers))
        except OSError as exc:  # tc serves all the same; only its stale UDP flows wait for eviction
            log.warning("tc's flow map unreadable; its stale UDP flows are not reconciled", map=layout.map_name,
                        reason=str(exc))
            return None

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
            self.tc_flows = self._open_tc_flows()
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
        if not self._external_fed_all and frozenset(split) != self._external_ports:
            self._sync_external(snapshot, config, changed, frozenset(split))
        # Stale UDP flows are reconciled only now that the maps hold no removed backend: a datagram between a
        # deletion and the maps' update would make a new flow to the removed backend that nothing deletes
        # (kube-proxy, too, cleans conntrack after iptables-restore, not before).
        if self.external is None or not self._external_fed_all:
            # the kernel's table for the whole snapshot here: the iptables side sees only its own ports
            self.conntrack.after_sync(snapshot.service_ports, snapshot.endpoints, changed)
        if self.tc_flows is not None:  # tc's own flows (na_ct, na_ct6), which the kernel's table never sees
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
        if not self.tc_active:
            return IPV6_DETAIL
        detail = IPV6_DETAIL.replace("ip6tables (tc unavailable)", "tc on " + ", ".join(self.tc_interfaces)
                                     + f" ({IPV6_FALLBACK})")
        if not self.split:
            return detail
        return detail + "; external on ip6tables (tc lacks what they need): " + "; ".join(
            f"{name} ({', '.join(gaps)})" for name, gaps in sorted(self.split.items(), key=lambda i: str(i[0])))

    def _sync_external(self, snapshot: Snapshot, config: ProxyConfig, changed: AbstractSet[ObjectRef],
                       ports: frozenset[ServicePortName]) -> None:
        """Program the iptables side: every external path without tc; with tc, exactly `ports` (the rules are
        removed altogether when no port needs them)."""
        if self.external is not None and self._external_fed_all:
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
    """Interfaces of this network namespace that traffic from other hosts arrives on (`choose_external`
    over the namespace's addresses)."""
    import psutil

    return choose_external({name: [(a.family.name, a.address, a.netmask) for a in addrs]
                            for name, addrs in psutil.net_if_addrs().items()})


def choose_external(addresses: Mapping[str, Sequence[tuple[str, str, str | None]]]) -> list[str]:
    """The interfaces, of `addresses` (name -> (family name, address, netmask)), with a routable address of
    either family: not loopback, not IPv6 link-local, and on a network wider than one host (a /32 or /128 is a
    pod-gateway address, the lab's and Calico-style pod links). An IPv6-only node's uplink counts too."""
    import ipaddress

    found = []
    for name, addrs in addresses.items():
        for family, address, netmask in addrs:
            if family not in ("AF_INET", "AF_INET6") or not netmask:
                continue
            try:  # psutil gives IPv6 masks as addresses (ffff:ffff:...::), which ipaddress reads only as lengths
                mask = ipaddress.ip_address(netmask)
                length = bin(int(mask)).count("1") if mask.version == 6 else netmask
                network = ipaddress.ip_interface(f"{address.split('%', 1)[0]}/{length}")
            except ValueError:
                continue
            if network.ip.is_loopback or network.ip.is_link_local or network.network.prefixlen >= network.max_prefixlen:
                continue
            found.append(name)
            break
    return sorted(found)
