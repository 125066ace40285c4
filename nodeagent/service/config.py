"""The kube-proxy settings and node facts that change what a datapath programs, shared by every mode."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network

from nodeagent.cluster.model import IPAddress, IPNetwork, Node
from nodeagent.state.tracker import Snapshot

# kube-proxy's nfacct counters (pkg/proxy/metrics): packets dropped by the INVALID rule, and packets accepted
# on localhost NodePorts. Each is rendered only when its object exists in the kernel.
CT_STATE_INVALID_DROPPED = "ct_state_invalid_dropped_pkts"
LOCALHOST_NODEPORTS_ACCEPTED = "localhost_nps_accepted_pkts"
NFACCT_COUNTERS = (CT_STATE_INVALID_DROPPED, LOCALHOST_NODEPORTS_ACCEPTED)
LOOPBACK_V4: IPAddress = ip_address("127.0.0.1")
LOOPBACK_V6: IPAddress = ip_address("::1")
_LOOPBACK_NET = ip_address("127.0.0.0")


@dataclass(frozen=True)
class ProxySettings:
    """The kube-proxy flags that change what a datapath programs (kube-proxy's names where it has them), and
    the facts about the kernel `run` detects at start (random-fully, nfacct counters, TCP liberal)."""

    cluster_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    # --iptables-localhost-nodeports
    localhost_nodeports: bool = True
    # --nodeport-addresses: CIDRs (empty: every address), or `primary` (the node's primary IPs)
    nodeport_addresses: tuple[IPNetwork, ...] = ()
    nodeport_primary: bool = False
    # --bind-address: when not unspecified, the node IP of its family (as kube-proxy's detectNodeIPs)
    bind_address: IPAddress | None = None
    random_fully: bool = False
    # the nfacct objects that exist (kube-proxy renders `-m nfacct` only for those it ensured)
    nfacct_counters: frozenset[str] = frozenset()
    # net.netfilter.nf_conntrack_tcp_be_liberal is set: no INVALID drop rule
    conntrack_tcp_liberal: bool = False
    # --service-cluster-ip-range (kube-proxy's ServiceCIDRs): the nftables mode drops traffic to addresses in
    # them that no Service holds; empty: not known, no such rule
    service_cidrs: tuple[IPNetwork, ...] = ()

    @property
    def may_use_localhost_nodeports(self) -> bool:
        """Whether IPv4 localhost NodePorts can be on before the Node object is known (`run` then sets
        route_localnet). `primary` resolves to the node's IP, which excludes loopback, once the Node is known."""
        if not self.localhost_nodeports or self.nodeport_primary:
            return False
        return contains_ipv4_loopback(self.nodeport_addresses)


def node_ips(node: Node | None, bind_address: IPAddress | None) -> dict[int, IPAddress]:
    """The node IP per family, as kube-proxy's detectNodeIPs: the Node's first InternalIP (else ExternalIP)
    sets the primary family, the first of the other family the secondary; a bind address that is not
    unspecified overrides its family's; loopback where nothing is known."""
    found: dict[int, IPAddress] = {4: LOOPBACK_V4, 6: LOOPBACK_V6}
    if node is not None:
        candidates = [*node.addresses.get("InternalIP", ()), *node.addresses.get("ExternalIP", ())]
        if candidates:
            found[candidates[0].version] = candidates[0]
            other = next((ip for ip in candidates if ip.version != candidates[0].version), None)
            if other is not None:
                found[other.version] = other
    if bind_address is not None and not bind_address.is_unspecified:
        found[bind_address.version] = bind_address
    return found


def contains_ipv4_loopback(cidrs: tuple[IPNetwork, ...]) -> bool:
    """kube-proxy's NodePortAddresses.ContainsIPv4Loopback for the IPv4 proxier (no IPv4 CIDR: 0.0.0.0/0)."""
    v4 = [cidr for cidr in cidrs if cidr.version == 4]
    return not v4 or any(_LOOPBACK_NET in cidr or cidr.network_address.is_loopback for cidr in v4)


def nodeport_cidrs(settings: ProxySettings, ips: dict[int, IPAddress], family: int) -> tuple[IPNetwork, ...]:
    """--nodeport-addresses for one family, as kube-proxy's NewNodePortAddresses: `primary` becomes the node
    IPs (loopback skipped); CIDRs of the other family are dropped; none left, or a zero CIDR: () (every
    local address)."""
    cidrs = settings.nodeport_addresses
    if settings.nodeport_primary:
        cidrs = tuple(ip_network(ip) for ip in ips.values() if not ip.is_loopback)
    own = tuple(cidr for cidr in cidrs if cidr.version == family)
    if any(cidr.prefixlen == 0 for cidr in own):
        return ()
    return own


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
    # --nodeport-addresses resolved to this node's IPs; None: every local address (kube-proxy's matchAll)
    nodeport_ips: tuple[IPAddress, ...] | None = None
    random_fully: bool = False
    # the nfacct counters to count in (each only where its object exists)
    nfacct_counters: frozenset[str] = frozenset()
    conntrack_tcp_liberal: bool = False
    family: int = 4
    # the eBPF mode translates node-local traffic in cgroup programs; iptables keeps only what enters
    # from outside (NodePort, externalIPs, load-balancer IPs), without the cluster IP captures
    external_only: bool = False
    node_labels: Mapping[str, str] = field(default_factory=dict)
    large_cluster_threshold: int = 1000
    # the Service CIDRs (nftables mode: traffic to an unallocated address in them is dropped)
    service_cidrs: tuple[IPNetwork, ...] = ()

    @property
    def mark(self) -> str:
        """The masquerade mark as written in the rules."""
        return self.masquerade_mark or f"0x{1 << self.masquerade_bit:08x}"

    @property
    def localhost_nodeports_enabled(self) -> bool:
        """kube-proxy has no localhost NodePorts on IPv6; `proxy_config` turns them off when
        --nodeport-addresses excludes 127.0.0.0/8."""
        return self.family == 4 and self.localhost_nodeports


def base_families(settings: ProxySettings) -> frozenset[int]:
    """The IP families served whatever the Node object says: IPv4 (the agent always runs its IPv4 proxier) and
    the families of --cluster-cidr."""
    return frozenset({4} | {cidr.version for cidr in settings.cluster_cidrs})


def served_families(node: Node | None, settings: ProxySettings) -> frozenset[int]:
    """The families a proxier runs for: `base_families` and those of the Node's addresses and pod CIDRs.

    kube-proxy runs its IPv6 proxier wherever ip6tables works (server_linux.go platformCheckSupported); nodeagent
    runs it only where the node has IPv6 to serve, so an IPv4-only node never touches ip6tables, and reports the
    IPv6 Services it does not serve (`state.tracker.ChangeTracker`)."""
    return base_families(settings) | (node.families if node is not None else frozenset())


def proxy_config(node_name: str, settings: ProxySettings, snapshot: Snapshot,
                 addresses: tuple[IPAddress, ...], family: int = 4) -> ProxyConfig:
    """The renderer's configuration of the proxier of `family` from the flags and this node's Node object. Pure.

    --nodeport-addresses are resolved against `addresses` (the agent's interfaces, as kube-proxy's), or
    without them (an offline view of any node) against the Node's status.addresses and loopback. Each family
    has its own node IP, NodePort addresses and local-traffic CIDR (kube-proxy's proxier per family); there
    are no localhost NodePorts on IPv6 (`ProxyConfig.localhost_nodeports_enabled`)."""
    node = snapshot.node
    ips = node_ips(node, settings.bind_address)
    cidrs = nodeport_cidrs(settings, ips, family)
    # `primary` before any node IP is known (no Node object yet, no bind address): kube-proxy waits for the Node
    # before it programs anything (cmd/kube-proxy/app/server.go), so NodePorts answer on no address until then,
    # not on every address (what an empty `primary` would otherwise fall back to), localhost included
    unresolved_primary = settings.nodeport_primary and all(ip.is_loopback for ip in ips.values())
    localhost = (family == 4 and settings.localhost_nodeports and not unresolved_primary
                 and contains_ipv4_loopback(cidrs))
    nodeport_ips: tuple[IPAddress, ...] | None = None
    if unresolved_primary:
        nodeport_ips = ()
    elif cidrs:
        if not addresses:
            known = [ip for values in (node.addresses.values() if node is not None else ()) for ip in values]
            addresses = tuple(sorted({*known, LOOPBACK_V4, LOOPBACK_V6}, key=lambda ip: (ip.version, int(ip))))
        nodeport_ips = tuple(ip for ip in addresses if any(ip in cidr for cidr in cidrs))
    node_ip = ips[family]
    return ProxyConfig(node_name=node_name, node_ip=None if node_ip.is_loopback else node_ip,
                       cluster_cidrs=settings.cluster_cidrs, masquerade_all=settings.masquerade_all,
                       masquerade_bit=settings.masquerade_bit, localhost_nodeports=localhost,
                       nodeport_ips=nodeport_ips, random_fully=settings.random_fully,
                       nfacct_counters=settings.nfacct_counters,
                       conntrack_tcp_liberal=settings.conntrack_tcp_liberal, family=family,
                       node_labels=dict(node.labels) if node is not None else {},
                       service_cidrs=settings.service_cidrs)
