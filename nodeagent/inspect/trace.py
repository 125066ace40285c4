"""`nodeagent trace`: the path one new connection from a pod would take, step by step, predicted from the same
functions the datapath uses: enrollment and the capture's exclusions (`nodeagent.cluster.enrollment`,
`nodeagent.mesh.iptables`), the tunnel's Service table and balancer (`nodeagent.tunnel.state.services`,
`nodeagent.tunnel.resilience.balance`), the
node's translation (`paths`: the rendered iptables chains or the eBPF map entries) and L4 authorization
(`nodeagent.tunnel.state.authz`). Pure.

An IPv6 destination is traced through the IPv6 proxier's paths (`paths.iptables_paths` with the IPv6
configuration); addresses are written `[ip]:port` for IPv6.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from nodeagent.ca.identity import SpiffeId
from nodeagent.errors import NodeAgentError
from nodeagent.inspect.model import ServicePath
from nodeagent.inspect.paths import host_port, split_host_port
from nodeagent.mesh.iptables.render import DEFAULT_OPTIONS, CaptureOptions
from nodeagent.state.tracker import Snapshot
from nodeagent.tunnel.resilience import balance
from nodeagent.tunnel.state.authz import Authorizer, AuthzRequest
from nodeagent.tunnel.state.services import Candidate, ServiceTarget, service_table
from nodeagent.tunnel.state.workloads import Workload, workload_table

CONNECTED, REFUSED, DENIED, PARTLY_DENIED = "connected", "refused", "denied", "denied for some candidates"


@dataclass(frozen=True)
class Hop:
    """One candidate destination and what happens there."""

    address: str  # ip:port the connection finally reaches
    probability: float
    pod: str  # namespace/name, "" when the address is no pod
    node: str
    transport: str  # HBONE to ip:15008 | plain TCP | kernel DNAT | direct
    allowed: bool
    verdict: str  # the policy decision and why
    via: str = ""  # the KUBE-SEP chain or map the node translates by (empty when the tunnel balances)


@dataclass(frozen=True)
class Trace:
    """The predicted path of one new connection."""

    source: str
    destination: str
    proto: str
    captured: bool
    steps: tuple[str, ...]
    hops: tuple[Hop, ...]
    outcome: str  # connected | refused | denied | denied for some candidates

    def pods(self) -> set[str]:
        """The pods the connection may end at (allowed hops)."""
        return {h.pod for h in self.hops if h.allowed and h.pod}


@dataclass(frozen=True)
class TraceInput:
    """What a prediction needs besides the snapshot."""

    source: str  # namespace/name
    ip: str
    port: int
    proto: str  # tcp | udp
    mode: str  # the node's datapath: iptables | ebpf
    paths: Sequence[ServicePath]  # the node's translation of every frontend (`paths`)
    node_ips: Sequence[str] = ()
    options: CaptureOptions = DEFAULT_OPTIONS
    trust_domain: str = "cluster.local"


class TraceError(NodeAgentError):
    """The trace cannot be computed (an unknown source pod, a bad address)."""


def _captured(source: Workload | None, ip: str, port: int, proto: str, options: CaptureOptions) -> tuple[bool, str]:
    """Whether the source's capture sends this connection to its node tunnel, and why (not)."""
    if source is None or not source.enrolled:
        return False, "not captured: the source pod is not in the mesh"
    if proto != "tcp":
        return False, "not captured: only TCP is captured (UDP goes through the node's datapath)"
    address = ipaddress.ip_address(ip)
    if address.is_loopback or any(address == ipaddress.ip_address(own) for own in source.addresses):
        return False, "not captured: loopback or the pod's own address"
    if port in options.exclude_outbound_ports:
        return False, f"not captured: port {port} is excluded (exclude_outbound_ports)"
    if any(address in ipaddress.ip_network(cidr) for cidr in options.exclude_outbound_cidrs):
        return False, "not captured: the destination is in an excluded CIDR"
    return True, f"captured: to the node tunnel at 127.0.0.1:{options.outbound_port} (original destination kept)"


def _dns_captured(source: Workload, given: TraceInput) -> str | None:
    """Why this connection goes to the tunnel's DNS proxy (the capture's port 53 part), or None. Both captures
    take it: the in-pod rules' RedirectDNS (iptables) and connect/sendmsg (eBPF)."""
    if not source.enrolled or given.port != 53 or given.options.dns_port is None:
        return None
    address = ipaddress.ip_address(given.ip)
    own = any(address == ipaddress.ip_address(a) for a in source.addresses)
    # iptables: UDP `! -o lo` (loopback and the pod itself), TCP `! -d 127.0.0.1`; eBPF: loopback and the pod
    # itself for both
    if address.is_loopback or (own and (given.proto == "udp" or given.mode == "ebpf")):
        return None
    return (f"captured: DNS ({given.proto.upper()} 53) to the node tunnel's DNS proxy at 127.0.0.1:"
            f"{given.options.dns_port} (the pod opts out with nodeagent.io/dns-capture: \"false\")")


def _node_path(paths: Sequence[ServicePath], ip: str, port: int, proto: str, node_ips: Sequence[str]
               ) -> ServicePath | None:
    """The frontend the kernel translates this destination by, if any (a NodePort: the one of the address's
    family, `[<node>]:port` for IPv6)."""
    wanted = f"{host_port(ip, port)}/{proto.upper()}"
    ipv6 = ":" in ip
    for path in paths:
        if path.frontend == wanted:
            return path
        if (path.kind == "NodePort" and ip in node_ips and path.frontend.startswith("[") == ipv6
                and path.frontend.endswith(f":{port}/{proto.upper()}")):
            return path
    return None


def predict(snapshot: Snapshot, node: str, given: TraceInput) -> Trace:
    """The path a new connection from `given.source` to `given.ip:given.port` would take."""
    table = workload_table(snapshot, node, given.trust_domain)
    source = next((w for w in table.by_ip.values() if w.name == given.source), None)
    if source is None:
        raise TraceError(f"pod {given.source}: no such pod with an address")
    authorizer = Authorizer.from_snapshot(snapshot)
    dest = host_port(given.ip, given.port)
    steps = [f"source {given.source} ({source.ip}, {source.identity}, "
             f"{'enrolled' if source.enrolled else 'not enrolled'}) on node {node}"]
    dns = _dns_captured(source, given)
    if dns is not None:
        steps.append(dns)
        proxy = f"127.0.0.1:{given.options.dns_port}"
        hop = Hop(proxy, 1.0, "", node, "the node tunnel's DNS proxy in the pod: Service names answered from its "
                  "tables, other names forwarded to the tunnel's resolvers", True, "no policy: DNS")
        steps.append(f"  -> {proxy} p=1 (the tunnel's DNS proxy) on {node}: {hop.transport}")
        return Trace(given.source, dest, given.proto, True, tuple(steps), (hop,), CONNECTED)
    captured, why = _captured(source, given.ip, given.port, given.proto, given.options)
    steps.append(why)
    candidates: list[tuple[str, int, float, str]] = []  # (ip, port, probability, via)
    if captured:
        target = service_table(snapshot).lookup(given.ip, given.port)
        if target is not None:
            tier, pool = _tunnel_pool(target, node, snapshot)
            total = sum(c.weight for c in pool) or 1
            candidates = [(str(c.ip), c.port, c.weight / total, "") for c in pool]
            steps.append(f"tunnel: {dest} is Service {target.port}; balancer picks by weight among "
                         f"{len(pool)} endpoint(s) ({tier})" if pool else
                         f"tunnel: {dest} is Service {target.port} with no usable endpoint: the tunnel closes it")
        else:
            candidates = [(given.ip, given.port, 1.0, "")]
            steps.append(f"tunnel: {dest} is no Service frontend: to the address itself")
    else:
        path = _node_path(given.paths, given.ip, given.port, given.proto, given.node_ips)
        if path is not None:
            steps.append(f"node ({given.mode}): {path.frontend} is Service {path.service} via {path.via}: "
                         f"{path.verdict}")
            candidates = [(*split_host_port(e.address), e.probability, e.via) for e in path.endpoints]
        else:
            candidates = [(given.ip, given.port, 1.0, "")]
            steps.append(f"node ({given.mode}): {dest} is no Service frontend: routed as is")
    hops = tuple(dataclasses.replace(_hop(table.lookup(ip), ip, port, p, captured, source, given, authorizer),
                                     via=via) for ip, port, p, via in candidates)
    for hop in hops:
        steps.append(f"  -> {hop.address} p={hop.probability:.3g} {hop.pod or '(no pod)'} on {hop.node or '?'}: "
                     f"{hop.transport}; {hop.verdict}")
    if not hops:
        outcome = REFUSED
    elif all(not h.allowed for h in hops):
        outcome = DENIED
    elif any(not h.allowed for h in hops):
        outcome = PARTLY_DENIED
    else:
        outcome = CONNECTED
    return Trace(given.source, dest, given.proto, captured, tuple(steps), hops, outcome)


def _tunnel_pool(target: ServiceTarget, node: str, snapshot: Snapshot) -> tuple[str, list[Candidate]]:
    """The endpoints the tunnel's balancer would draw from (ready ones, else serving-terminating ones, then
    its locality tier), as `balance.choose` computes them."""
    pool = [c for c in target.endpoints if c.ready and c.weight]
    if not pool:
        pool = [c for c in target.endpoints if c.serving and c.terminating and c.weight]
    if not pool:
        return "none", []
    zone = next((n.labels.get("topology.kubernetes.io/zone") for n in snapshot.nodes.values()
                 if n.ref.name == node), None)
    tier, closest = balance._closest(pool, target.config.locality, node, zone)  # the balancer's own tiering
    return str(tier), list(closest)


def _hop(workload: Workload | None, ip: str, port: int, probability: float, captured: bool, source: Workload,
         given: TraceInput, authorizer: Authorizer) -> Hop:
    address = host_port(ip, port)
    if workload is None:
        return Hop(address, probability, "", "", "plain TCP (not a pod)" if captured else "direct", True,
                   "no policy: not a mesh workload")
    if not workload.enrolled:
        return Hop(address, probability, workload.name, workload.node,
                   "plain TCP from the pod's address (destination not in the mesh)" if captured else "direct",
                   True, "no policy: the destination is not in the mesh")
    if given.proto != "tcp":
        return Hop(address, probability, workload.name, workload.node, "direct (UDP is not captured)", True,
                   "no policy: UDP")
    identity: SpiffeId | None = source.identity if captured else None
    # the destination sees the source pod's address either way: HBONE is dialled from inside the source pod,
    # plaintext keeps the pod's address
    verdict = authorizer.check(AuthzRequest(workload.namespace, workload.labels, ip, port, identity, source.ip))
    transport = (f"HBONE to {host_port(ip, 15008)} (node {workload.node}'s tunnel), mTLS as {source.identity}"
                 if captured else "plaintext, captured inbound at the destination (15006)")
    return Hop(address, probability, workload.name, workload.node, transport, verdict.allowed, verdict.reason)


def to_text(trace: Trace) -> str:
    """The trace as a person reads it."""
    lines = [f"trace {trace.source} -> {trace.destination}/{trace.proto.upper()}", *trace.steps,
             f"prediction: {trace.outcome}" + (f" (one of {', '.join(sorted(trace.pods()))})" if trace.pods() else "")]
    return "\n".join(lines) + "\n"
