"""The kube-proxy settings and node facts that change what a datapath programs, shared by every mode."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from nodeagent.cluster.model import IPAddress, IPNetwork
from nodeagent.state.tracker import Snapshot


@dataclass(frozen=True)
class ProxySettings:
    """The kube-proxy flags that change what a datapath programs (kube-proxy's names where it has them)."""

    cluster_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    nodeport_addresses: tuple[IPNetwork, ...] = ()
    random_fully: bool = False


@dataclass(frozen=True)
class ProxyConfig:
    """The kube-proxy flags and node facts that change the rules."""

    node_name: str
    node_ip: IPAddress | None = None
    # --cluster-cidr (detect-local-mode ClusterCIDR); empty: local traffic cannot be told apart
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    # kube-proxy writes "%#08x" (0x00004000); its unit tests use "0x4000". Both load the same rule.
    masquerade_mark: str | None = None
    localhost_nodeports: bool = True
    # --nodeport-addresses resolved to this node's IPs; None when unset (every local address)
    nodeport_ips: tuple[IPAddress, ...] | None = None
    random_fully: bool = False
    nfacct: bool = False
    conntrack_tcp_liberal: bool = False
    family: int = 4
    # the eBPF mode translates node-local traffic in cgroup programs; iptables keeps only what enters
    # from outside (NodePort, externalIPs, load-balancer IPs), without the cluster IP captures
    external_only: bool = False
    node_labels: Mapping[str, str] = field(default_factory=dict)
    large_cluster_threshold: int = 1000

    @property
    def mark(self) -> str:
        """The masquerade mark as written in the rules."""
        return self.masquerade_mark or f"0x{1 << self.masquerade_bit:08x}"

    @property
    def localhost_nodeports_enabled(self) -> bool:
        """kube-proxy disables localhost NodePorts for IPv6 and when --nodeport-addresses excludes 127/8."""
        if self.family != 4 or not self.localhost_nodeports:
            return False
        return self.nodeport_ips is None or any(ip.is_loopback for ip in self.nodeport_ips)


def proxy_config(node_name: str, settings: ProxySettings, snapshot: Snapshot,
                 addresses: tuple[IPAddress, ...]) -> ProxyConfig:
    """The renderer's configuration from the flags, this node's Node object and its local `addresses`. Pure."""
    node = snapshot.node
    internal = [ip for ip in (node.internal_ips if node is not None else ()) if ip.version == 4]
    nodeport_ips = None
    if settings.nodeport_addresses:
        nodeport_ips = tuple(ip for ip in addresses if ip.version == 4
                             and any(ip in cidr for cidr in settings.nodeport_addresses if cidr.version == 4))
    return ProxyConfig(node_name=node_name, node_ip=internal[0] if internal else None,
                       cluster_cidrs=settings.cluster_cidrs, masquerade_all=settings.masquerade_all,
                       masquerade_bit=settings.masquerade_bit, nodeport_ips=nodeport_ips,
                       random_fully=settings.random_fully,
                       node_labels=dict(node.labels) if node is not None else {})
