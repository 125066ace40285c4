"""Snapshot -> the filter and nat rules kube-proxy's iptables mode writes, as iptables-restore input. Pure.

This is kube-proxy's `syncProxyRules` (pkg/proxy/iptables/proxier.go) and `CategorizeEndpoints`
(pkg/proxy/topology.go) rule for rule: the same chains, hashes, comments (quoted where kube-proxy
quotes them), matches, probabilities and order. Its proxier tests are the specification
(`tests/unit/service/iptables/test_render.py` holds their expectations). Two deliberate differences:

- Services are visited in name order (kube-proxy iterates a Go map, so its order varies from sync
  to sync); the output is byte-stable, and equal to kube-proxy's after its own tests' sort.
- `partial` renders the per-service nat chains only for the Services named in it, as kube-proxy's
  partial sync does; the top-level chains are always complete.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain as concat

from nodeagent.cluster.model import IPAddress, ObjectRef
from nodeagent.service.config import (
    CT_STATE_INVALID_DROPPED,
    LOCALHOST_NODEPORTS_ACCEPTED,
    LOOPBACK_V4,
    LOOPBACK_V6,
    ProxyConfig,
)
from nodeagent.service.iptables import names as n
from nodeagent.service.topology import (
    ZONE_LABEL,
    categorize,
    externally_accessible,
    uses_cluster_endpoints,
    uses_local_endpoints,
)
from nodeagent.state.translation import EndpointInfo, ServicePortInfo, ServicePortName, endpoints_of_family


@dataclass(slots=True)
class Table:
    """One table's restore input: chain declarations, then rules, in writing order."""

    name: str
    chains: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # "-A CHAIN ..." or "-X CHAIN"

    def chain(self, name: str) -> None:
        self.chains.append(name)

    def add(self, *tokens: str) -> None:
        self.rules.append(" ".join(tokens))

    def text(self) -> str:
        lines = [f"*{self.name}", *(f":{c} - [0:0]" for c in self.chains), *self.rules, "COMMIT"]
        return "\n".join(lines) + "\n"


@dataclass
class Rendered:
    """What one sync writes: the filter and nat tables, and every per-service nat chain that should exist."""

    filter: Table
    nat: Table
    active_nat_chains: set[str]
    large_cluster: bool
    port_chains: list[list[str]] = field(default_factory=list)  # per Service port written, its own nat chains
    nat_top_rules: list[str] = field(default_factory=list)  # the nat rules of top-level chains only
    family: int = 4  # the proxier's IP family: 6 for ip6tables-restore

    def text(self) -> str:
        """The whole iptables-restore input."""
        return self.filter.text() + self.nat.text()

    def top_level(self) -> dict[tuple[str, str], tuple[str, ...]]:
        """The rules of every top-level (not per-service) chain, by (table, chain)."""
        found: dict[tuple[str, str], list[str]] = {}
        for table, rules in ((self.filter, self.filter.rules), (self.nat, self.nat_top_rules)):
            for chain in table.chains:
                if not n.is_service_chain(chain):
                    found[(table.name, chain)] = []
            for line in rules:
                key = (table.name, line.split(maxsplit=2)[1])
                if line.startswith("-A ") and key in found:
                    found[key].append(line)
        return {key: tuple(lines) for key, lines in found.items()}

    def drop_unchanged(self, previous: Mapping[tuple[str, str], tuple[str, ...]]) -> list[str]:
        """Leave out top-level chains whose rules equal `previous` (what the kernel holds); returns their names.

        kube-proxy rewrites KUBE-SERVICES and friends on every sync; with --noflush an undeclared chain
        is left as it is, so skipping an unchanged one changes nothing in the kernel but the cost: at
        10,000 Services KUBE-SERVICES alone is 10,000 rules per restore.
        """
        skipped = [key for key, lines in self.top_level().items() if previous.get(key) == lines]
        for table in (self.filter, self.nat):
            gone = {chain for name, chain in skipped if name == table.name}
            table.chains = [c for c in table.chains if c not in gone]
            table.rules = [r for r in table.rules if not (r.startswith("-A ") and r.split(maxsplit=2)[1] in gone)]
        return [f"{table}/{chain}" for table, chain in skipped]

    def in_batches(self, ports_per_batch: int) -> tuple[Iterator[str], str]:
        """The same rules as `text()`, split: restores of the per-service chains of a few ports each, then
        one restore of everything else (top-level chains, filter table, stale-chain deletions).

        iptables-nft-restore takes time quadratic in the size of one restore (1,000 Services: 3.8 s in one
        restore, 1.4 s in batches of 100; 2,000: 18 s against 3.0 s). Each batch is consistent by itself
        (a Service's chains only jump to chains of the same batch or to KUBE-MARK-MASQ, which exists),
        and the top-level chains that make new chains reachable come last, so every state in between
        is a working rule set.

        The batches' text is made one at a time, as they are consumed: all of them at once were ~30 MB at
        10,000 Services, in malloc blocks of ~150 KB that stayed in the agent's heap after the sync.
        """
        batch_of = {c: i // ports_per_batch for i, chains in enumerate(self.port_chains) for c in chains}
        count = -(-len(self.port_chains) // ports_per_batch)
        lines_of: list[list[str]] = [[] for _ in range(count)]
        rest: list[str] = []
        for line in self.nat.rules:
            if line.startswith("-A ") and (batch := batch_of.get(line.split(maxsplit=2)[1])) is not None:
                lines_of[batch].append(line)  # (in nat.rules order: each chain's rules keep their order)
            else:
                rest.append(line)
        top = Table("nat", chains=[c for c in self.nat.chains if c not in batch_of], rules=rest)

        def batches() -> Iterator[str]:
            for batch in range(count):
                start = batch * ports_per_batch
                chains = [c for group in self.port_chains[start:start + ports_per_batch] for c in group]
                rules, lines_of[batch] = lines_of[batch], []
                yield Table("nat", chains=chains, rules=rules).text()

        return batches(), self.filter.text() + top.text()

    def delete_stale(self, existing_nat_chains: Iterable[str]) -> list[str]:
        """Flush and delete per-service nat chains that exist but are no longer wanted; returns their names."""
        stale = sorted(c for c in existing_nat_chains if n.is_service_chain(c) and c not in self.active_nat_chains)
        for chain in stale:
            self.nat.chain(chain)
            self.nat.rules.append(f"-X {chain}")
        return stale


def probability(count: int) -> str:
    """kube-proxy's `computeProbability`: 1/n with ten decimals."""
    return f"{1.0 / count:0.10f}"


def quoted(text: str) -> str:
    return f'"{text}"'


def _of_family(ips: Iterable[IPAddress], family: int) -> list[IPAddress]:
    return [ip for ip in ips if ip.version == family]


@dataclass(slots=True)
class PortRules:
    """The rules one Service port contributes: filter rules, top-level nat rules, its own nat chains."""

    filter: Table = field(default_factory=lambda: Table("filter"))
    top: Table = field(default_factory=lambda: Table("nat"))
    own: Table = field(default_factory=lambda: Table("nat"))
    # (its active chains are own.chains: every chain a port declares is one it keeps)
    # own.rules once kept in the cache: "\n"-joined and compressed. A full sync writes every port's own
    # chains again, so they are kept, but as lines (~290,000 str objects at 10,000 Services x 10) they
    # were ~40 MB of the agent's RSS; packed ~5 MB, and unpacking all of them takes ~0.1 s.
    packed: bytes | None = None

    def own_rules(self) -> list[str]:
        if self.packed is None:
            return self.own.rules
        return zlib.decompress(self.packed).decode().split("\n")

    def pack(self) -> None:
        if self.packed is None and self.own.rules:
            self.packed = zlib.compress("\n".join(self.own.rules).encode(), 1)
            self.own.rules = []


# Per Service port: the inputs its rules were computed from (compared by identity: snapshots share
# unchanged values) and the rules. Lets a sync re-render only the ports that changed.
RenderCache = dict[ServicePortName, "_Entry"]


def render(service_ports: Mapping[ServicePortName, ServicePortInfo],
           endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
           config: ProxyConfig, *, partial: AbstractSet[ObjectRef] | None = None,
           cache: RenderCache | None = None) -> Rendered:
    """Every rule kube-proxy would write for these Service ports on this node.

    `partial`: the Services whose per-service nat chains are rewritten (None: all of them, a full sync).
    `cache`: per-port results of earlier renders with the same `config`, reused where inputs are unchanged.
    """
    filt, nat = Table("filter"), Table("nat")
    for chain in (n.KUBE_SERVICES, n.KUBE_EXTERNAL_SERVICES, n.KUBE_FORWARD, n.KUBE_NODEPORTS, n.KUBE_PROXY_FIREWALL):
        filt.chain(chain)
    for chain in (n.KUBE_SERVICES, n.KUBE_NODEPORTS, n.KUBE_POSTROUTING, n.KUBE_MARK_MASQ):
        nat.chain(chain)
    mark = config.mark
    nat.add("-A", n.KUBE_POSTROUTING, "-m", "mark", "!", "--mark", f"{mark}/{mark}", "-j", "RETURN")
    nat.add("-A", n.KUBE_POSTROUTING, "-j", "MARK", "--xor-mark", mark)
    nat.add("-A", n.KUBE_POSTROUTING, "-m", "comment", "--comment", quoted("kubernetes service traffic requiring SNAT"),
            "-j", "MASQUERADE", *(["--random-fully"] if config.random_fully else []))
    nat.add("-A", n.KUBE_MARK_MASQ, "-j", "MARK", "--or-mark", mark)
    if config.localhost_nodeports_enabled:
        filt.chain(n.KUBELET_FIREWALL)
        filt.add("-A", n.KUBELET_FIREWALL, "-m", "comment", "--comment", quoted("block incoming localnet connections"),
                 "-d", "127.0.0.0/8", "!", "-s", "127.0.0.0/8", "-m", "conntrack", "!", "--ctstate",
                 "RELATED,ESTABLISHED,DNAT", "-j", "DROP")

    family = config.family
    ordered = sorted(service_ports, key=_order)
    entries: list[tuple[ServicePortName, ServicePortInfo, Sequence[EndpointInfo], _Entry | None]] = []
    total = 0
    for name in ordered:
        info, port_endpoints = service_ports[name], endpoints.get(name, ())
        hit = cache.get(name) if cache is not None else None
        if hit is None or hit.info is not info or hit.endpoints is not port_endpoints:
            hit = None
            # (a port without a cluster IP of this family has no endpoint of it worth counting or reading)
            total += len(endpoints_of_family(port_endpoints, family)) if family in info.families else 0
        else:
            total += hit.count
        entries.append((name, info, port_endpoints, hit))
    large = total > config.large_cluster_threshold
    zone = config.node_labels.get(ZONE_LABEL, "")
    local_if, not_local_if = _local_detector(config)

    pieces: list[PortRules] = []
    written: list[PortRules] = []
    fresh: list[PortRules] = []
    for name, info, port_endpoints, hit in entries:
        if hit is not None and hit.large == large:
            rules = hit.rules
        else:
            rules = PortRules()
            # the port as this family's proxier sees it (None: no cluster IP of the family, kube-proxy skips it)
            view = info.for_family(family)
            family_endpoints = endpoints_of_family(port_endpoints, family) if view is not None else []
            if view is not None and (not config.external_only or externally_accessible(view)):
                _render_port(config, rules.filter, rules.top, rules.own, set(), str(name),
                             view.protocol.lower(), view, family_endpoints, zone, large, local_if, not_local_if)
            if cache is not None:
                cache[name] = _Entry(info, port_endpoints, large, rules, len(family_endpoints))
                fresh.append(rules)
        pieces.append(rules)
        if partial is None or name.service in partial:
            written.append(rules)
    if cache is not None and len(cache) > len(entries):
        for gone in set(cache) - set(ordered):
            del cache[gone]

    filt.rules.extend(concat.from_iterable(p.filter.rules for p in pieces))
    nat.rules.extend(concat.from_iterable(p.top.rules for p in pieces))
    nat_top = list(nat.rules)
    nat.chains.extend(concat.from_iterable(p.own.chains for p in written))
    nat.rules.extend(concat.from_iterable(p.own_rules() for p in written))
    active: set[str] = set(concat.from_iterable(p.own.chains for p in pieces))
    tail = len(nat.rules)
    _render_tail(config, filt, nat)
    nat_top.extend(nat.rules[tail:])
    for rules in fresh:  # the lines stay in `nat.rules` for this sync; the cache keeps them packed
        rules.pack()
    return Rendered(filter=filt, nat=nat, active_nat_chains=active, large_cluster=large,
                    port_chains=[p.own.chains for p in written], nat_top_rules=nat_top, family=family)


@dataclass(slots=True)
class _Entry:
    info: ServicePortInfo
    endpoints: object
    large: bool
    rules: PortRules
    count: int


@lru_cache(maxsize=1 << 17)
def _order(name: ServicePortName) -> tuple[str, str]:
    return str(name), name.protocol


def _local_detector(config: ProxyConfig) -> tuple[list[str], list[str]]:
    cidrs = [c for c in config.cluster_cidrs if c.version == config.family]
    if not cidrs:
        return [], []
    return ["-s", str(cidrs[0])], ["!", "-s", str(cidrs[0])]


def _render_port(config: ProxyConfig, filt: Table, nat: Table, svc_nat: Table, active: set[str], port_name: str,
                 proto: str, info: ServicePortInfo, endpoints: list[EndpointInfo], zone: str, large: bool,
                 local_if: list[str], not_local_if: list[str]) -> None:
    family = config.family
    cluster_ip = str(_of_family(info.cluster_ips, family)[0])
    port = str(info.port)
    cat = categorize(endpoints, info, zone)  # endpoints come in kube-proxy's order (by "ip:port" string)
    has_endpoints = cat.has_any
    cluster_chain = n.cluster_chain(port_name, proto)
    local_chain = n.local_chain(port_name, proto)
    fw_chain = n.firewall_chain(port_name, proto)
    ext_chain = n.external_chain(port_name, proto)
    uses_cluster_chain = bool(cat.cluster) and uses_cluster_endpoints(info)
    uses_local_chain = bool(cat.local) and uses_local_endpoints(info)

    internal_chain, has_internal = cluster_chain, has_endpoints
    if info.internal_policy_local:
        internal_chain = local_chain
        has_internal = has_internal and bool(cat.local)
    external_policy_chain, has_external = cluster_chain, has_endpoints
    if info.external_policy_local:
        external_policy_chain = local_chain
        has_external = has_external and bool(cat.local)
    external_ips = [str(ip) for ip in _of_family(info.external_ips, family)]
    lb_ips = [str(ip) for ip in _of_family(info.load_balancer_ips, family)]
    source_ranges = [r for r in info.load_balancer_source_ranges if r.version == family]
    uses_ext_chain = has_endpoints and externally_accessible(info)
    uses_fw_chain = has_endpoints and bool(lb_ips) and bool(source_ranges)
    lb_chain = fw_chain if uses_fw_chain else ext_chain

    internal_target = internal_comment = external_target = external_comment = ""
    if not has_endpoints:
        internal_target = external_target = "REJECT"
        internal_comment = external_comment = quoted(f"{port_name} has no endpoints")
    else:
        if not has_internal:
            internal_target, internal_comment = "DROP", quoted(f"{port_name} has no local endpoints")
        if not has_external:
            external_target, external_comment = "DROP", quoted(f"{port_name} has no local endpoints")

    match = ["-m", proto, "-p", proto]
    if not config.external_only:  # (with external_only, cgroup programs translate cluster IPs)
        if has_internal:
            nat.add("-A", n.KUBE_SERVICES, "-m", "comment", "--comment", quoted(f"{port_name} cluster IP"),
                    *match, "-d", cluster_ip, "--dport", port, "-j", internal_chain)
        else:
            filt.add("-A", n.KUBE_SERVICES, "-m", "comment", "--comment", internal_comment,
                     *match, "-d", cluster_ip, "--dport", port, "-j", internal_target)

    for ip in external_ips:
        if has_endpoints:
            nat.add("-A", n.KUBE_SERVICES, "-m", "comment", "--comment", quoted(f"{port_name} external IP"),
                    *match, "-d", ip, "--dport", port, "-j", ext_chain)
        if not has_external:
            filt.add("-A", n.KUBE_EXTERNAL_SERVICES, "-m", "comment", "--comment", external_comment,
                     *match, "-d", ip, "--dport", port, "-j", external_target)

    for ip in lb_ips:
        if has_endpoints:
            nat.add("-A", n.KUBE_SERVICES, "-m", "comment", "--comment", quoted(f"{port_name} loadbalancer IP"),
                    *match, "-d", ip, "--dport", port, "-j", lb_chain)
        if uses_fw_chain:
            filt.add("-A", n.KUBE_PROXY_FIREWALL, "-m", "comment", "--comment",
                     quoted(f"{port_name} traffic not accepted by {fw_chain}"),
                     *match, "-d", ip, "--dport", port, "-j", "DROP")
    if not has_external:
        for ip in lb_ips:
            filt.add("-A", n.KUBE_EXTERNAL_SERVICES, "-m", "comment", "--comment", external_comment,
                     *match, "-d", ip, "--dport", port, "-j", external_target)

    if info.node_port:
        node_port = str(info.node_port)
        if has_endpoints:
            if config.localhost_nodeports_enabled and LOCALHOST_NODEPORTS_ACCEPTED in config.nfacct_counters:
                nat.add("-A", n.KUBE_NODEPORTS, "-m", "comment", "--comment", port_name, *match,
                        "-d", "127.0.0.0/8", "--dport", node_port, "-m", "nfacct", "--nfacct-name",
                        LOCALHOST_NODEPORTS_ACCEPTED, "-j", ext_chain)
            nat.add("-A", n.KUBE_NODEPORTS, "-m", "comment", "--comment", port_name, *match,
                    "--dport", node_port, "-j", ext_chain)
        if not has_external:
            filt.add("-A", n.KUBE_EXTERNAL_SERVICES, "-m", "comment", "--comment", external_comment,
                     "-m", "addrtype", "--dst-type", "LOCAL", *match, "--dport", node_port, "-j", external_target)

    if info.health_check_node_port:
        filt.add("-A", n.KUBE_NODEPORTS, "-m", "comment", "--comment", quoted(f"{port_name} health check node port"),
                 "-m", "tcp", "-p", "tcp", "--dport", str(info.health_check_node_port), "-j", "ACCEPT")

    # Per-service chains (skipped, but still counted as active, in a partial sync).
    if has_internal and not config.external_only:
        capture = ["-m", "comment", "--comment", quoted(f"{port_name} cluster IP"), *match,
                   "-d", cluster_ip, "--dport", port]
        if config.masquerade_all:
            svc_nat.add("-A", internal_chain, *capture, "-j", n.KUBE_MARK_MASQ)
        elif not_local_if:
            svc_nat.add("-A", internal_chain, *capture, *not_local_if, "-j", n.KUBE_MARK_MASQ)

    if uses_ext_chain:
        svc_nat.chain(ext_chain)
        active.add(ext_chain)
        if not info.external_policy_local:
            svc_nat.add("-A", ext_chain, "-m", "comment", "--comment",
                        quoted(f"masquerade traffic for {port_name} external destinations"), "-j", n.KUBE_MARK_MASQ)
        else:
            if local_if:
                svc_nat.add("-A", ext_chain, "-m", "comment", "--comment",
                            quoted(f"pod traffic for {port_name} external destinations"), *local_if,
                            "-j", cluster_chain)
            svc_nat.add("-A", ext_chain, "-m", "comment", "--comment",
                        quoted(f"masquerade LOCAL traffic for {port_name} external destinations"),
                        "-m", "addrtype", "--src-type", "LOCAL", "-j", n.KUBE_MARK_MASQ)
            svc_nat.add("-A", ext_chain, "-m", "comment", "--comment",
                        quoted(f"route LOCAL traffic for {port_name} external destinations"),
                        "-m", "addrtype", "--src-type", "LOCAL", "-j", cluster_chain)
        if has_external:
            svc_nat.add("-A", ext_chain, "-j", external_policy_chain)

    if uses_fw_chain:
        svc_nat.chain(fw_chain)
        active.add(fw_chain)
        head = ["-A", fw_chain, "-m", "comment", "--comment", quoted(f"{port_name} loadbalancer IP")]
        allow_from_node = False
        # kube-proxy's node IP is loopback when it knows none (detectNodeIPs)
        node_ip = config.node_ip or (LOOPBACK_V4 if config.family == 4 else LOOPBACK_V6)
        for cidr in source_ranges:
            svc_nat.add(*head, "-s", str(cidr), "-j", ext_chain)
            if node_ip.version == cidr.version and node_ip in cidr:
                allow_from_node = True
        if allow_from_node:
            for ip in lb_ips:
                svc_nat.add(*head, "-s", ip, "-j", ext_chain)
        svc_nat.add("-A", fw_chain, "-m", "comment", "--comment",
                    quoted(f"other traffic to {port_name} will be dropped by KUBE-PROXY-FIREWALL"))

    affinity = info.affinity_timeout_seconds
    # Each endpoint's "ip:port" and chain name, computed once (hashing dominates a large render).
    seps: dict[int, tuple[str, str]] = {}
    for endpoint in (*cat.cluster, *cat.local):
        if id(endpoint) not in seps:
            text = str(endpoint)
            seps[id(endpoint)] = (text, n.endpoint_chain(port_name, proto, text))
    if uses_cluster_chain:
        svc_nat.chain(cluster_chain)
        active.add(cluster_chain)
        _service_to_endpoints(svc_nat, port_name, cluster_chain, cat.cluster, seps, affinity, large)
    if uses_local_chain:
        svc_nat.chain(local_chain)
        active.add(local_chain)
        _service_to_endpoints(svc_nat, port_name, local_chain, cat.local, seps, affinity, large)

    for endpoint in cat.reachable:
        text, chain = seps[id(endpoint)]
        svc_nat.chain(chain)
        active.add(chain)
        head = ["-A", chain, *([] if large else ["-m", "comment", "--comment", port_name])]
        # the address as written in "ip:port" / "[ip]:port": str() of an IPv6 address costs ~10 us in Python,
        # half an IPv6 render's time when made twice per endpoint
        svc_nat.add(*head, "-s", text.rpartition(":")[0].strip("[]"), "-j", n.KUBE_MARK_MASQ)
        recent = ["-m", "recent", "--name", chain, "--set"] if affinity is not None else []
        svc_nat.add(*head, *recent, *match, "-j", "DNAT", "--to-destination", text)


def _service_to_endpoints(nat: Table, port_name: str, chain: str, endpoints: list[EndpointInfo],
                          seps: dict[int, tuple[str, str]], affinity: int | None, large: bool) -> None:
    """kube-proxy's `writeServiceToEndpointRules`: affinity checks first, then the random split."""
    def head(text: str) -> list[str]:
        return ["-A", chain, *([] if large else ["-m", "comment", "--comment", quoted(f"{port_name} -> {text}")])]

    if affinity is not None:
        for endpoint in endpoints:
            text, sep = seps[id(endpoint)]
            nat.add(*head(text), "-m", "recent", "--name", sep, "--rcheck", "--seconds", str(affinity),
                    "--reap", "-j", sep)
    count = len(endpoints)
    for i, endpoint in enumerate(endpoints):
        text, sep = seps[id(endpoint)]
        last = i == count - 1
        split = [] if last else ["-m", "statistic", "--mode", "random", "--probability", probability(count - i)]
        nat.add(*head(text), *split, "-j", sep)


def _render_tail(config: ProxyConfig, filt: Table, nat: Table) -> None:
    """The rules after every Service: the NodePort tail call and KUBE-FORWARD."""
    comment = quoted("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
    if config.nodeport_ips is None:
        destinations = ["-m", "addrtype", "--dst-type", "LOCAL"]
        if config.family == 6:
            destinations += ["!", "-d", "::1/128"]
        elif not config.localhost_nodeports_enabled:
            destinations += ["!", "-d", "127.0.0.0/8"]
        nat.add("-A", n.KUBE_SERVICES, "-m", "comment", "--comment", comment, *destinations, "-j", n.KUBE_NODEPORTS)
    else:
        for ip in config.nodeport_ips:
            if ip.is_loopback and not config.localhost_nodeports_enabled:
                continue  # kube-proxy logs and skips: localhost NodePorts are off
            nat.add("-A", n.KUBE_SERVICES, "-m", "comment", "--comment", comment, "-d", str(ip),
                    "-j", n.KUBE_NODEPORTS)
    if not config.conntrack_tcp_liberal:
        nfacct = (["-m", "nfacct", "--nfacct-name", CT_STATE_INVALID_DROPPED]
                  if CT_STATE_INVALID_DROPPED in config.nfacct_counters else [])
        filt.add("-A", n.KUBE_FORWARD, "-m", "conntrack", "--ctstate", "INVALID", *nfacct, "-j", "DROP")
    filt.add("-A", n.KUBE_FORWARD, "-m", "comment", "--comment", quoted("kubernetes forwarding rules"),
             "-m", "mark", "--mark", f"{config.mark}/{config.mark}", "-j", "ACCEPT")
    filt.add("-A", n.KUBE_FORWARD, "-m", "comment", "--comment", quoted("kubernetes forwarding conntrack rule"),
             "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")
