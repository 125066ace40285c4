"""What would behave differently, per Service port, if a node switched between the iptables and the eBPF
datapath (`nodeagent compare-modes`). Pure: a snapshot and the proxy configuration in, one record per port out.

The eBPF mode translates traffic that starts on the node (pods, host) in cgroup programs at connect() and
sendmsg(), and traffic from outside (NodePort, externalIPs, load-balancer IPs) with tc programs, except for
the ports whose external frontends need what tc lacks (`service.ebpf.desired.tc_gaps`): those keep
kube-proxy's own iptables rules in eBPF mode too. This module states the differences an operator can observe;
it assumes the tc programs load (without them, eBPF mode serves all external traffic with iptables).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from nodeagent.cluster.model import IPAddress
from nodeagent.service.ebpf.desired import Frontend, TcGap, plan
from nodeagent.service.topology import externally_accessible
from nodeagent.state.translation import EndpointInfo, ServicePortInfo, ServicePortName


class ExternalPath(StrEnum):
    """What serves a port's traffic from outside the node in eBPF mode."""

    NONE = "none"  # no external frontend (ClusterIP only)
    TC = "tc"
    IPTABLES = "iptables"  # kube-proxy's rules, kept in eBPF mode for this port


# Node-wide differences, the same for every port (shown once).
NODE_NOTES = (
    "pods and host: eBPF translates at connect()/sendmsg() (no DNAT, no kernel conntrack entry for Service "
    "flows); iptables DNATs every packet in the kernel. Applications see the same addresses (getpeername "
    "and UDP replies show the Service address).",
    "from outside, tc-served ports: flows are tracked in the na_ct map, not the kernel's conntrack table "
    "(`conntrack -L` does not show them); IPv4 fragments and packets with IP options are left to the stack (no "
    "iptables rule serves them there), IPv6 fragments and packets with extension headers to the ip6tables rules "
    "kept for every IPv6 external frontend (na_ct6 for what tc translates).",
    "the comparison assumes tc loads; without it eBPF mode serves all external traffic with iptables "
    "(`/proxyMode` says which).",
)


@dataclass(frozen=True)
class PortComparison:
    """One Service port: what serves it in each mode and what would behave differently."""

    port: ServicePortName
    external_frontends: tuple[str, ...]
    external_path: ExternalPath
    gaps: tuple[TcGap, ...]  # why the external path is iptables in eBPF mode
    differences: tuple[str, ...]  # empty: the switch changes nothing observable for this port

    def document(self) -> dict[str, object]:
        """As JSON-ready data."""
        return {"port": str(self.port), "externalFrontends": list(self.external_frontends),
                "ebpfExternalPath": str(self.external_path), "ebpfIptablesBecause": [str(g) for g in self.gaps],
                "differences": list(self.differences)}


def compare_modes(service_ports: Mapping[ServicePortName, ServicePortInfo],
                  endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]], *, node_ips: Iterable[IPAddress],
                  node_labels: Mapping[str, str] | None = None,
                  masquerade_all: bool = False) -> list[PortComparison]:
    """Every Service port of the snapshot, in name order."""
    planned = plan(service_ports, endpoints, node_ips=tuple(node_ips), node_labels=node_labels,
                   masquerade_all=masquerade_all)
    frontends: dict[str, list[Frontend]] = {}
    for frontend, entry in planned.entries.items():
        frontends.setdefault(entry.port_name, []).append(frontend)
    out = []
    for name in sorted(service_ports, key=str):
        info = service_ports[name]
        cluster_ips = {str(ip) for ip in info.cluster_ips}
        external = tuple(str(f) for f in sorted(frontends.get(str(name), ()))
                         if not (f.ip in cluster_ips and f.port == info.port))
        gaps = planned.external_stack.get(name, ())
        # tc serves a port's external frontends of both families unless a gap (of either family: the plan of both
        # merges them) keeps them on iptables
        if not externally_accessible(info):
            path = ExternalPath.NONE
        else:
            path = ExternalPath.IPTABLES if gaps else ExternalPath.TC
        out.append(PortComparison(name, external, path, gaps, _differences(info, path, gaps)))
    return out


def _differences(info: ServicePortInfo, path: ExternalPath, gaps: tuple[TcGap, ...]) -> tuple[str, ...]:
    found = []
    if info.affinity_timeout_seconds:
        found.append("ClientIP affinity from pods and host: eBPF keys it by network namespace (each pod, and the "
                     "host as one client), iptables by source address")
    if any(ip.version == 6 for ip in (*info.cluster_ips, *info.external_ips, *info.load_balancer_ips)):
        found.append("IPv6 addresses: from pods and host the eBPF programs translate them at connect()/sendmsg() "
                     "(connect6, sendmsg6), ip6tables DNATs in iptables mode; from outside tc translates them as IPv4 "
                     "(its na_ct6 map), the ip6tables rules kept for the packets tc leaves to the stack (extension "
                     "headers, fragments)")
    if path is not ExternalPath.NONE and not info.external_policy_local:
        found.append("source IP from pods and host dialling an external frontend: the endpoint sees the pod's "
                     "address with eBPF (translated at connect()), a node address with iptables (externalTraffic"
                     "Policy Cluster masquerades)")
    if path is ExternalPath.TC:
        found.append("source IP from outside: a local endpoint sees the client's address with eBPF (tc DNATs "
                     "only), a node address with iptables (externalTrafficPolicy Cluster masquerades)")
        if info.external_ips or info.load_balancer_ips:
            found.append("source IP from outside: a remote endpoint sees the external/load-balancer IP the client "
                         "dialled with eBPF (tc SNATs to the frontend), the node's address with iptables")
    return tuple(found)


def format_comparison(ports: Sequence[PortComparison]) -> str:
    """The text `compare-modes` prints: the node-wide notes, then one block per port."""
    lines = ["Switching this node between iptables and eBPF mode:", ""]
    lines += [f"  - {note}" for note in NODE_NOTES]
    lines.append("")
    for item in ports:
        if item.external_path is ExternalPath.NONE:
            path = "no external frontend"
        elif item.external_path is ExternalPath.TC:
            path = "from outside: tc in eBPF mode, iptables in iptables mode"
        else:
            path = ("from outside: kube-proxy's iptables rules in both modes (tc lacks: "
                    + ", ".join(item.gaps) + ")")
        lines.append(f"{item.port}: {path}")
        if item.external_frontends:
            lines.append(f"    external frontends: {', '.join(item.external_frontends)}")
        lines += [f"    differs: {d}" for d in item.differences] or ["    no observable difference"]
    same = sum(1 for p in ports if not p.differences)
    lines += ["", f"{len(ports)} Service ports: {same} behave the same in both modes, {len(ports) - same} differ "
                  f"as listed; {sum(1 for p in ports if p.external_path is ExternalPath.IPTABLES)} keep iptables "
                  "for external traffic in eBPF mode"]
    return "\n".join(lines) + "\n"
