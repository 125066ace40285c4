"""Snapshot -> the entries the socket load balancer's maps must hold. Pure.

Which frontends a Service port gets, and which endpoints each frontend uses, follow kube-proxy's
semantics for traffic that starts on this node (the only traffic a cgroup program sees):
- its cluster IP uses the internal-policy endpoints (Local: this node's only);
- its external IPs, load-balancer IPs and NodePort on this node's addresses use the Cluster-policy
  endpoints even with externalTrafficPolicy Local, as kube-proxy short-circuits pod and host traffic
  to external destinations ("pod traffic for ... external destinations");
- ready endpoints, else serving-terminating ones, and zone hints, exactly as the iptables renderer.

The same entries serve the tc programs (bpf-src/nodeport_tc.c) for traffic from outside the node. tc
implements a plain Cluster-policy Service only, so a Service port that needs more for its external
frontends (`tc_gaps`: externalTrafficPolicy Local, loadBalancerSourceRanges, ClientIP affinity, SCTP,
a reject without endpoints, masquerade-all) has them flagged `external_stack`: tc leaves that traffic
to the stack, where the eBPF proxier keeps kube-proxy's own iptables rules for exactly those ports.
Nothing kube-proxy would do is lost silently; `external_split` names the ports and why.

Each family is planned on its own (`plan(..., family=6)`), as kube-proxy runs one proxier per family: a port is
seen through `ServicePortInfo.for_family` (skipped without a cluster IP of the family; its external and
load-balancer IPs of the family only), with the endpoints of the family, and NodePorts on the node addresses of
the family. IPv6 frontends go to their own maps (na_services6, `Frontend.key`). tc translates both families, so
a port's gaps are the same in each (an IPv6 port needs what an IPv4 one would); a port of both families may still
differ per family through its endpoints (no endpoints of one family). For IPv6 the agent keeps kube-proxy's
ip6tables rules for every external frontend all the same: they serve the packets tc leaves to the stack (extension
headers, fragments), see the eBPF proxier.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from nodeagent.cluster.model import IPAddress, Protocol
from nodeagent.service.topology import ZONE_LABEL, categorize, externally_accessible, uses_cluster_endpoints
from nodeagent.state.translation import EndpointInfo, ServicePortInfo, ServicePortName, endpoints_of_family

PROTOCOL_NUMBERS = {Protocol.TCP: 6, Protocol.UDP: 17, Protocol.SCTP: 132}  # IPPROTO_* (linux/in.h): svc_key.proto

# must match `struct svc_key` in bpf-src/lib/maps.h (the na_services key): the address and port in network
# order as the programs read them from the socket or packet, the protocol number, a pad byte (zero).
SERVICE_KEY = struct.Struct(">4sHBx")
# must match `struct svc_key6` in bpf-src/lib/maps.h (the na_services6 key): the same with a 16-byte address
SERVICE_KEY6 = struct.Struct(">16sHBx")
FAMILIES = (4, 6)


@dataclass(frozen=True, order=True)
class Frontend:
    """An address a client may dial: (ip, port, protocol number). Its map key is `key`."""

    ip: str
    port: int
    protocol: int

    @property
    def family(self) -> int:
        """4 or 6: whose maps hold it."""
        return 6 if ":" in self.ip else 4

    @property
    def key(self) -> bytes:
        """Its na_services key (`struct svc_key`), or na_services6 key (`struct svc_key6`) for IPv6."""
        if self.family == 6:
            return SERVICE_KEY6.pack(socket.inet_pton(socket.AF_INET6, self.ip), self.port, self.protocol)
        return SERVICE_KEY.pack(socket.inet_aton(self.ip), self.port, self.protocol)

    @classmethod
    def from_key(cls, key: bytes) -> Frontend:
        """The frontend of an na_services or na_services6 key (told apart by size)."""
        if len(key) == SERVICE_KEY6.size:
            ip6, port, protocol = SERVICE_KEY6.unpack(key)
            return cls(str(ipaddress.IPv6Address(ip6)), port, protocol)
        ip, port, protocol = SERVICE_KEY.unpack(key)
        return cls(socket.inet_ntoa(ip), port, protocol)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.family == 6 else self.ip
        return f"{host}:{self.port}/{ {6: 'TCP', 17: 'UDP', 132: 'SCTP'}.get(self.protocol, self.protocol)}"


@dataclass(frozen=True, order=True)
class Backend:
    ip: str
    port: int
    weight: int = 1


@dataclass(frozen=True)
class ServiceEntry:
    """What one frontend resolves to. `external_stack`: tc leaves traffic from outside the node to this
    frontend to the stack (kube-proxy's iptables rules serve it; see `tc_gaps`)."""

    port_name: str
    backends: tuple[Backend, ...]
    affinity_seconds: int = 0
    external_stack: bool = False


class TcGap(StrEnum):
    """Something a Service port's external frontends need that the tc programs do not implement; any one
    keeps the port's traffic from outside the node on kube-proxy's iptables rules."""

    EXTERNAL_POLICY_LOCAL = "externalTrafficPolicy=Local"  # local endpoints only, client IP kept, else DROP
    SOURCE_RANGES = "loadBalancerSourceRanges"  # kube-proxy's firewall drops clients outside the ranges
    SESSION_AFFINITY = "sessionAffinity=ClientIP"  # tc picks per flow, not per client address
    SCTP = "SCTP"  # tc parses TCP and UDP only
    NO_ENDPOINTS = "no endpoints (reject)"  # kube-proxy answers ICMP port unreachable; tc would drop
    MASQUERADE_ALL = "masquerade-all"  # kube-proxy SNATs every Service packet; tc keeps the client IP locally


def tc_gaps(info: ServicePortInfo, backends: Sequence[Backend], *, masquerade_all: bool = False) -> tuple[TcGap, ...]:
    """What `info`'s external frontends need that tc lacks (empty: tc serves them as kube-proxy would).
    `backends` are those its external frontends would use (`info` as the proxier of one family sees it, the same
    rules for IPv4 and IPv6). A port with no external frontend needs nothing."""
    if not externally_accessible(info):
        return ()
    gaps: list[TcGap] = []
    if info.external_policy_local:
        gaps.append(TcGap.EXTERNAL_POLICY_LOCAL)
    if info.load_balancer_source_ranges and info.load_balancer_ips:  # the ranges filter LB IPs only
        gaps.append(TcGap.SOURCE_RANGES)
    if info.affinity_timeout_seconds:
        gaps.append(TcGap.SESSION_AFFINITY)
    if info.protocol is Protocol.SCTP:
        gaps.append(TcGap.SCTP)
    if not backends and not info.external_policy_local:  # (Local without local endpoints: DROP, as above)
        gaps.append(TcGap.NO_ENDPOINTS)
    if masquerade_all:
        gaps.append(TcGap.MASQUERADE_ALL)
    return tuple(gaps)


def desired_entries(service_ports: Mapping[ServicePortName, ServicePortInfo],
                    endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]], *, node_ips: Iterable[IPAddress],
                    node_labels: Mapping[str, str] | None = None,
                    only: set[ServicePortName] | None = None,
                    masquerade_all: bool = False, family: int | None = None) -> dict[Frontend, ServiceEntry]:
    """Every frontend and its entry (for the ports in `only`, when given; of `family`, when given)."""
    return plan(service_ports, endpoints, node_ips=node_ips, node_labels=node_labels, only=only,
                masquerade_all=masquerade_all, family=family).entries


@dataclass(frozen=True)
class Plan:
    """The map entries, and the Service ports whose external frontends stay on iptables, with why."""

    entries: dict[Frontend, ServiceEntry]
    external_stack: dict[ServicePortName, tuple[TcGap, ...]]


def plan(service_ports: Mapping[ServicePortName, ServicePortInfo],
         endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]], *, node_ips: Iterable[IPAddress],
         node_labels: Mapping[str, str] | None = None,
         only: set[ServicePortName] | None = None, masquerade_all: bool = False,
         family: int | None = None) -> Plan:
    """Every frontend and its entry, and the split of external traffic between tc and iptables (for the
    ports in `only`, when given). `family` 4 or 6: that family's only (what its proxier writes); None: both
    (a port of both families is in `external_stack` with the gaps of both)."""
    if family is None:
        out: dict[Frontend, ServiceEntry] = {}
        stack: dict[ServicePortName, tuple[TcGap, ...]] = {}
        for each in FAMILIES:
            part = plan(service_ports, endpoints, node_ips=node_ips, node_labels=node_labels, only=only,
                        masquerade_all=masquerade_all, family=each)
            out.update(part.entries)
            for name, gaps in part.external_stack.items():
                stack[name] = tuple(dict.fromkeys((*stack.get(name, ()), *gaps)))
        return Plan(out, stack)
    zone = (node_labels or {}).get(ZONE_LABEL, "")
    node_addresses = [str(ip) for ip in node_ips if ip.version == family]
    out = {}
    stack = {}
    for name, whole in service_ports.items():
        if only is not None and name not in only:
            continue
        info = whole.for_family(family)
        if info is None:  # no cluster IP of this family: this family's proxier skips it, as kube-proxy's
            continue
        proto = PROTOCOL_NUMBERS[info.protocol]
        eps = endpoints_of_family(endpoints.get(name, ()), family)
        cat = categorize(eps, info, zone)
        internal = cat.local if info.internal_policy_local else cat.cluster
        external = cat.cluster if uses_cluster_endpoints(info) else cat.local
        affinity = info.affinity_timeout_seconds or 0
        label = str(name)

        weights = dict(info.endpoint_weights)

        def backends_of(chosen: Sequence[EndpointInfo], weights: dict[str, int] = weights) -> tuple[Backend, ...]:
            members = ((e, weights.get(e.pod.name, 1) if e.pod is not None else 1) for e in chosen)
            return tuple(Backend(str(e.ip), e.port, w) for e, w in members if w > 0)

        external_backends = backends_of(external)
        gaps = tc_gaps(info, external_backends, masquerade_all=masquerade_all)
        if gaps:
            stack[name] = gaps
        internal_entry = ServiceEntry(label, backends_of(internal), affinity)
        external_entry = ServiceEntry(label, external_backends, affinity, external_stack=bool(gaps))

        for address in info.cluster_ips:
            if address.version == family:
                out[Frontend(str(address), info.port, proto)] = internal_entry
        for address in (*info.external_ips, *info.load_balancer_ips):
            if address.version == family:
                out[Frontend(str(address), info.port, proto)] = external_entry
        if info.node_port:
            for node_ip in node_addresses:
                out[Frontend(node_ip, info.node_port, proto)] = external_entry
    return Plan(out, stack)
