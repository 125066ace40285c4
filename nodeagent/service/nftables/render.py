"""Snapshot -> the `kube-proxy` table kube-proxy's nftables mode programs. Pure.

This is `syncProxyRules` and `setupNFTables` of pkg/proxy/nftables/proxier.go, with `CategorizeEndpoints`
(pkg/proxy/topology.go, here `service.topology.categorize`): the same base chains and priorities, the same
verdict maps (`service-ips`, `service-nodeports`, `no-endpoint-services`, `no-endpoint-nodeports`,
`firewall-ips`), the `cluster-ips` and `nodeport-ips` sets, the per-service and per-endpoint chains with
kube-proxy's names, `numgen random mod N vmap` balancing and the per-endpoint affinity sets. Its proxier tests
are the specification (`tests/unit/service/nftables/test_render.py` holds their expectations).

The result is the table's content (`Rendered.table`); `service.nftables.transaction` turns the difference
from what the kernel holds into one `nft -f` transaction, as kube-proxy's partial syncs do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from nodeagent.cluster.model import IPAddress, ObjectRef
from nodeagent.service.config import ProxyConfig
from nodeagent.service.nftables import names as n
from nodeagent.service.nftables.ruleset import Chain, Container, Element, Table
from nodeagent.service.topology import (
    ZONE_LABEL,
    categorize,
    externally_accessible,
    uses_cluster_endpoints,
    uses_local_endpoints,
)
from nodeagent.state.translation import EndpointInfo, ServicePortInfo, ServicePortName, endpoints_of_family

# (name, type, hook, priority): nftablesBaseChains. Filter chains that must see pre-DNAT addresses run just
# before DNAT (dstnat - 10 = -110); the others at the filter priority (0), after DNAT.
BASE_CHAINS = (
    (n.FILTER_PREROUTING_PRE_DNAT, "filter", "prerouting", -110),
    (n.FILTER_OUTPUT_PRE_DNAT, "filter", "output", -110),
    (n.FILTER_FORWARD, "filter", "forward", 0),
    (n.FILTER_INPUT, "filter", "input", 0),
    (n.FILTER_OUTPUT, "filter", "output", 0),
    (n.NAT_PREROUTING, "nat", "prerouting", -100),
    (n.NAT_OUTPUT, "nat", "output", -100),
    (n.NAT_POSTROUTING, "nat", "postrouting", 100),
)
# (to, from, match): nftablesJumpChains, in kube-proxy's order (which decides each base chain's rule order)
JUMPS = (
    (n.NODEPORT_ENDPOINTS_CHECK, n.FILTER_INPUT, "ct state new"),
    (n.SERVICE_ENDPOINTS_CHECK, n.FILTER_INPUT, "ct state new"),
    (n.SERVICE_ENDPOINTS_CHECK, n.FILTER_FORWARD, "ct state new"),
    (n.SERVICE_ENDPOINTS_CHECK, n.FILTER_OUTPUT, "ct state new"),
    (n.FIREWALL_CHECK, n.FILTER_PREROUTING_PRE_DNAT, "ct state new"),
    (n.FIREWALL_CHECK, n.FILTER_OUTPUT_PRE_DNAT, "ct state new"),
    (n.SERVICES, n.NAT_OUTPUT, ""),
    (n.SERVICES, n.NAT_PREROUTING, ""),
    (n.MASQUERADING, n.NAT_POSTROUTING, ""),
    (n.CLUSTER_IPS_CHECK, n.FILTER_FORWARD, "ct state new"),
    (n.CLUSTER_IPS_CHECK, n.FILTER_OUTPUT, "ct state new"),
)
# the maps and sets setupNFTables declares: name -> (kind, key type after the address type, comment)
CONTAINERS = {
    n.CLUSTER_IPS: ("set", "", "Active ClusterIPs"),
    n.NODEPORT_IPS: ("set", "", "IPs that accept NodePort traffic"),
    n.NO_ENDPOINT_SERVICES: ("map", " . inet_proto . inet_service : verdict",
                             "vmap to drop or reject packets to services with no endpoints"),
    n.NO_ENDPOINT_NODEPORTS: ("map", "inet_proto . inet_service : verdict",
                              "vmap to drop or reject packets to service nodeports with no endpoints"),
    n.FIREWALL_IPS: ("map", " . inet_proto . inet_service : verdict",
                     "destinations that are subject to LoadBalancerSourceRanges"),
    n.SERVICE_IPS: ("map", " . inet_proto . inet_service : verdict",
                    "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
    n.SERVICE_NODEPORTS: ("map", "inet_proto . inet_service : verdict", "NodePort traffic"),
}
# the maps and sets whose elements a sync writes (nodeport-ips is filled by the setup, from the flags)
SYNCED_CONTAINERS = (n.CLUSTER_IPS, n.SERVICE_IPS, n.FIREWALL_IPS, n.NO_ENDPOINT_SERVICES, n.NO_ENDPOINT_NODEPORTS,
                     n.SERVICE_NODEPORTS)
# the chains setupNFTables creates (and flushes), besides the base chains
TOP_CHAINS = (n.NODEPORT_ENDPOINTS_CHECK, n.SERVICE_ENDPOINTS_CHECK, n.FIREWALL_CHECK, n.SERVICES, n.MASQUERADING,
              n.CLUSTER_IPS_CHECK, n.MARK_MASQ, n.REJECT_CHAIN)
REJECT_CHAIN_COMMENT = "helper for @no-endpoint-services / @no-endpoint-nodeports"


def family_words(family: int) -> tuple[str, str]:
    """("ip", "ipv4_addr") or ("ip6", "ipv6_addr"): the address match and the set key type."""
    return ("ip", "ipv4_addr") if family == 4 else ("ip6", "ipv6_addr")


def base_chain_spec(hook_type: str, hook: str, priority: int) -> str:
    return f"{{ type {hook_type} hook {hook} priority {priority} ; }}"


def container_spec(name: str, family: int) -> str:
    _, key, comment = CONTAINERS[name]
    addr = family_words(family)[1]
    key_type = addr + key if key.startswith(" ") or not key else key
    return f'{{ type {key_type} ; comment "{comment}" ; }}'


@dataclass(slots=True)
class PortPiece:
    """What one Service port contributes: its chains (in kube-proxy's creation order), its affinity sets and
    its elements in the synced maps and sets."""

    service: ObjectRef
    chains: list[Chain] = field(default_factory=list)
    affinity_sets: list[Container] = field(default_factory=list)
    elements: list[tuple[str, str, Element]] = field(default_factory=list)  # (map or set, key, element)


@dataclass
class Rendered:
    """The table one sync wants: the fixed part (`base`) and each Service port's piece. `table` (everything, as
    the kernel should hold it) and `owner` are put together when first read: a partial sync needs neither."""

    base: Table  # the table setupNFTables makes, without any Service
    pieces: dict[ServicePortName, PortPiece]
    setup_rules: dict[str, tuple[str, ...]]  # the fixed chains' rules (written by a full sync only)
    nodeport_ips: tuple[str, ...] | None  # the nodeport-ips set's addresses; None: every local address

    @cached_property
    def table(self) -> Table:
        """The whole table."""
        table = self.base.copy()
        chains, containers = table.chains, table.containers
        for piece in self.pieces.values():
            for chain in piece.chains:
                chains[chain.name] = chain
            for affinity in piece.affinity_sets:
                containers[affinity.name] = affinity
            for container, key, element in piece.elements:
                containers[container].elements[key] = element
        return table

    @cached_property
    def owner(self) -> dict[str, ObjectRef]:
        """Each per-service chain and affinity set -> its Service."""
        found: dict[str, ObjectRef] = {}
        for piece in self.pieces.values():
            found.update((chain.name, piece.service) for chain in piece.chains)
            found.update((affinity.name, piece.service) for affinity in piece.affinity_sets)
        return found

    def dump(self) -> str:
        """The table as kube-proxy's tests print it (`Table.dump`)."""
        return self.table.dump()


# Per Service port: the inputs its piece was computed from (compared by identity: snapshots share unchanged
# values) and the piece, so a sync re-renders only the ports that changed.
RenderCache = dict[ServicePortName, "_Entry"]


@dataclass(slots=True)
class _Entry:
    info: ServicePortInfo
    endpoints: object
    piece: PortPiece


def render(service_ports: Mapping[ServicePortName, ServicePortInfo],
           endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
           config: ProxyConfig, *, cache: RenderCache | None = None) -> Rendered:
    """The `kube-proxy` table of `config.family` for these Service ports on this node."""
    base = Table("ip" if config.family == 4 else "ip6", n.TABLE, n.TABLE_COMMENT)
    setup_rules, nodeport_ips = _setup(base, config)
    zone = config.node_labels.get(ZONE_LABEL, "")
    pieces: dict[ServicePortName, PortPiece] = {}
    for name, info in service_ports.items():  # (any order: names are sorted where the order shows)
        port_endpoints = endpoints.get(name, ())
        hit = cache.get(name) if cache is not None else None
        if hit is None or hit.info is not info or hit.endpoints is not port_endpoints:
            piece = PortPiece(name.service)
            view = info.for_family(config.family)
            if view is not None:
                _render_port(config, piece, name, view, endpoints_of_family(port_endpoints, config.family), zone)
            if cache is not None:
                cache[name] = _Entry(info, port_endpoints, piece)
        else:
            piece = hit.piece
        pieces[name] = piece
    if cache is not None and len(cache) > len(service_ports):
        for gone in set(cache) - set(service_ports):
            del cache[gone]
    return Rendered(base, pieces, setup_rules, nodeport_ips)


def _setup(table: Table, config: ProxyConfig) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...] | None]:
    """`setupNFTables`: the base chains, the fixed chains and their rules, the maps and sets."""
    ip, _ = family_words(config.family)
    no_localhost = "ip daddr != 127.0.0.0/8" if config.family == 4 else "ip6 daddr != ::1"
    rules: dict[str, list[str]] = {}
    for name, hook_type, hook, priority in BASE_CHAINS:
        table.chains[name] = Chain(name, base_chain_spec(hook_type, hook, priority))
        rules[name] = []
    for name in TOP_CHAINS:
        table.chains[name] = Chain(name, f'{{ comment "{REJECT_CHAIN_COMMENT}" ; }}' if name == n.REJECT_CHAIN else "")
        rules[name] = []
    for to, from_, match in JUMPS:
        rules[from_].append(f"{match} jump {to}" if match else f"jump {to}")
    # kube-proxy writes "%#08x" (0x004000), its tests 0x4000, nft lists 0x00004000: the same mark. The shortest
    # is written, as kube-proxy's tests spell it, unless the configuration spells it
    mark = config.masquerade_mark or hex(1 << config.masquerade_bit)
    rules[n.MARK_MASQ].append(f"mark set mark or {mark}")
    rules[n.MASQUERADING] += [f"mark and {mark} == 0 return", f"mark set mark xor {mark}", "masquerade fully-random"]
    for name in CONTAINERS:
        table.containers[name] = Container(CONTAINERS[name][0], name, container_spec(name, config.family))
    rules[n.CLUSTER_IPS_CHECK].append(f'{ip} daddr @{n.CLUSTER_IPS} reject comment '
                                      '"Reject traffic to invalid ports of ClusterIPs"')
    service_cidrs = [str(c) for c in config.service_cidrs if c.version == config.family]
    if service_cidrs:
        rules[n.CLUSTER_IPS_CHECK].append(f'{ip} daddr {{ {",".join(service_cidrs)} }} drop comment '
                                          '"Drop traffic to unallocated ClusterIPs"')
    nodeport_ips: tuple[str, ...] | None = None
    if config.nodeport_ips is None:  # MatchAll: kube-proxy adds the set and deletes it again
        del table.containers[n.NODEPORT_IPS]
        rules[n.NODEPORT_ENDPOINTS_CHECK].append(
            f"{no_localhost} meta l4proto . th dport vmap @{n.NO_ENDPOINT_NODEPORTS}")
    else:
        # kube-proxy logs "localhost NodePorts are not supported" and skips loopback addresses
        nodeport_ips = tuple(str(ip_) for ip_ in _of_family(config.nodeport_ips, config.family)
                             if not ip_.is_loopback)
        table.containers[n.NODEPORT_IPS].elements.update((ip_, Element()) for ip_ in nodeport_ips)
        rules[n.NODEPORT_ENDPOINTS_CHECK].append(
            f"{ip} daddr @{n.NODEPORT_IPS} meta l4proto . th dport vmap @{n.NO_ENDPOINT_NODEPORTS}")
    rules[n.REJECT_CHAIN].append("reject")
    rules[n.SERVICE_ENDPOINTS_CHECK].append(
        f"{ip} daddr . meta l4proto . th dport vmap @{n.NO_ENDPOINT_SERVICES}")
    rules[n.FIREWALL_CHECK].append(f"{ip} daddr . meta l4proto . th dport vmap @{n.FIREWALL_IPS}")
    rules[n.SERVICES].append(f"{ip} daddr . meta l4proto . th dport vmap @{n.SERVICE_IPS}")
    if config.nodeport_ips is None:
        rules[n.SERVICES].append(
            f"fib daddr type local {no_localhost} meta l4proto . th dport vmap @{n.SERVICE_NODEPORTS}")
    else:
        rules[n.SERVICES].append(f"{ip} daddr @{n.NODEPORT_IPS} meta l4proto . th dport vmap @{n.SERVICE_NODEPORTS}")
    frozen = {name: tuple(lines) for name, lines in rules.items()}
    for name, lines in frozen.items():
        table.chains[name].rules = lines
    return frozen, nodeport_ips


def _of_family(ips: Sequence[IPAddress], family: int) -> list[IPAddress]:
    return [ip for ip in ips if ip.version == family]


def _local_matches(config: ProxyConfig) -> tuple[str, str]:
    """The local traffic detector's `IfLocalNFT` / `IfNotLocalNFT` (detect-local-mode ClusterCIDR); ("", "")
    when it is not implemented (no cluster CIDR of the family)."""
    cidrs = [c for c in config.cluster_cidrs if c.version == config.family]
    if not cidrs:
        return "", ""
    ip = family_words(config.family)[0]
    return f"{ip} saddr {cidrs[0]}", f"{ip} saddr != {cidrs[0]}"


def _render_port(config: ProxyConfig, piece: PortPiece, name: ServicePortName, info: ServicePortInfo,
                 endpoints: list[EndpointInfo], zone: str) -> None:
    """One Service port, as the body of syncProxyRules' loop."""
    ip, addr_type = family_words(config.family)
    protocol = info.protocol.lower()
    port_name = str(name)
    base = n.port_base(name.namespace, name.name, protocol, name.port)
    cluster_chain, local_chain = n.CLUSTER_PREFIX + base, n.LOCAL_PREFIX + base
    external_chain, fw_chain = n.EXTERNAL_PREFIX + base, n.FIREWALL_PREFIX + base
    cat = categorize(endpoints, info, zone)
    has_endpoints = cat.has_any
    affinity = info.affinity_timeout_seconds
    # each endpoint's "ip:port", chain and affinity set, computed once
    names: dict[int, tuple[str, str, str]] = {}
    for endpoint in (*cat.cluster, *cat.local):
        if id(endpoint) not in names:
            text = str(endpoint)
            ep_base = n.endpoint_base(name.namespace, name.name, protocol, name.port, text)
            names[id(endpoint)] = (text, n.ENDPOINT_PREFIX + ep_base, n.AFFINITY_PREFIX + ep_base)
    chains: dict[str, list[str]] = {}  # in ensureChain order
    for endpoint in cat.reachable:
        chains[names[id(endpoint)][1]] = []
    uses_cluster_chain = bool(cat.cluster) and uses_cluster_endpoints(info)
    if uses_cluster_chain:
        chains[cluster_chain] = []
    uses_local_chain = bool(cat.local) and uses_local_endpoints(info)
    if uses_local_chain:
        chains[local_chain] = []

    internal_chain, has_internal = cluster_chain, has_endpoints
    if info.internal_policy_local:
        internal_chain, has_internal = local_chain, has_endpoints and bool(cat.local)
    external_policy_chain, has_external = cluster_chain, has_endpoints
    if info.external_policy_local:
        external_policy_chain, has_external = local_chain, has_endpoints and bool(cat.local)
    uses_external_chain = has_endpoints and externally_accessible(info)
    if uses_external_chain:
        chains[external_chain] = []

    internal_verdict = external_verdict = ""
    if not has_endpoints:
        internal_verdict = external_verdict = f"goto {n.REJECT_CHAIN}"
    else:
        internal_verdict = "" if has_internal else "drop"
        external_verdict = "" if has_external else "drop"

    port = str(info.port)
    elements = piece.elements
    cluster_ip = str(_of_family(info.cluster_ips, config.family)[0])
    elements.append((n.CLUSTER_IPS, cluster_ip, Element()))
    if has_internal:
        elements.append((n.SERVICE_IPS, f"{cluster_ip} . {protocol} . {port}", Element(f"goto {internal_chain}")))
    else:
        elements.append((n.NO_ENDPOINT_SERVICES, f"{cluster_ip} . {protocol} . {port}",
                         Element(internal_verdict, port_name)))
    for external_ip in _of_family(info.external_ips, config.family):
        key = f"{external_ip} . {protocol} . {port}"
        if has_endpoints:
            elements.append((n.SERVICE_IPS, key, Element(f"goto {external_chain}")))
        if not has_external:
            elements.append((n.NO_ENDPOINT_SERVICES, key, Element(external_verdict, port_name)))
    lb_ips = _of_family(info.load_balancer_ips, config.family)
    source_ranges = [c for c in info.load_balancer_source_ranges if c.version == config.family]
    uses_fw_chain = bool(lb_ips) and bool(source_ranges)
    if uses_fw_chain:
        chains[fw_chain] = []
    for lb_ip in lb_ips:
        key = f"{lb_ip} . {protocol} . {port}"
        if has_endpoints:
            elements.append((n.SERVICE_IPS, key, Element(f"goto {external_chain}")))
        if uses_fw_chain:
            elements.append((n.FIREWALL_IPS, key, Element(f"goto {fw_chain}")))
    if not has_external:
        for lb_ip in lb_ips:
            elements.append((n.NO_ENDPOINT_SERVICES, f"{lb_ip} . {protocol} . {port}",
                             Element(external_verdict, port_name)))
    if info.node_port:
        key = f"{protocol} . {info.node_port}"
        if has_endpoints:
            elements.append((n.SERVICE_NODEPORTS, key, Element(f"goto {external_chain}")))
        if not has_external:
            elements.append((n.NO_ENDPOINT_NODEPORTS, key, Element(external_verdict, port_name)))

    local_if, not_local_if = _local_matches(config)
    if has_internal:
        if config.masquerade_all:
            chains[internal_chain].append(f"{ip} daddr {cluster_ip} jump {n.MARK_MASQ}")
        elif not_local_if:
            chains[internal_chain].append(f"{ip} daddr {cluster_ip} {not_local_if} jump {n.MARK_MASQ}")
    if uses_external_chain:
        ext = chains[external_chain]
        if not info.external_policy_local:
            ext.append(f"jump {n.MARK_MASQ}")
        else:
            if local_if:
                ext.append(f'{local_if} goto {cluster_chain} comment "short-circuit pod traffic"')
            ext.append(f'fib saddr type local jump {n.MARK_MASQ} comment "masquerade local traffic"')
            ext.append(f'fib saddr type local goto {cluster_chain} comment "short-circuit local traffic"')
        if has_external:
            ext.append(f"goto {external_policy_chain}")
    if uses_fw_chain:
        sources = [str(c) for c in source_ranges]
        # kube-proxy's node IP is loopback when it knows none (detectNodeIPs)
        node_ip = config.node_ip
        if node_ip is not None and any(node_ip.version == c.version and node_ip in c for c in source_ranges):
            sources += [str(lb) for lb in lb_ips]
        chains[fw_chain].append(f"{ip} saddr != {{ {' , '.join(sources)} }} drop")
    if affinity is not None:
        for endpoint in cat.reachable:
            piece.affinity_sets.append(Container(
                "set", names[id(endpoint)][2],
                f"{{ type {addr_type} ; flags dynamic,timeout ; timeout {affinity}s ; }}"))
    if uses_cluster_chain:
        _service_to_endpoints(chains[cluster_chain], ip, cat.cluster, names, affinity)
    if uses_local_chain:
        _service_to_endpoints(chains[local_chain], ip, cat.local, names, affinity)
    for endpoint in cat.reachable:
        text, chain, affinity_set = names[id(endpoint)]
        rules = chains[chain]
        rules.append(f"{ip} saddr {text.rpartition(':')[0].strip('[]')} jump {n.MARK_MASQ}")
        if affinity is not None:
            rules.append(f"update @{affinity_set} {{ {ip} saddr }}")
        rules.append(f"meta l4proto {protocol} dnat to {text}")
    piece.chains = [Chain(chain, "", tuple(rules)) for chain, rules in chains.items()]


def _service_to_endpoints(rules: list[str], ip: str, endpoints: list[EndpointInfo],
                          names: dict[int, tuple[str, str, str]], affinity: int | None) -> None:
    """`writeServiceToEndpointRules`: affinity lookups first, then the random split."""
    if affinity is not None:
        for endpoint in endpoints:
            _, chain, affinity_set = names[id(endpoint)]
            rules.append(f"{ip} saddr @{affinity_set} goto {chain}")
    vmap = " , ".join(f"{i} : goto {names[id(e)][1]}" for i, e in enumerate(endpoints))
    rules.append(f"numgen random mod {len(endpoints)} vmap {{ {vmap} }}")
