"""Translation paths of Service frontends, computed from the render functions the datapath itself uses:
`nodeagent.service.iptables.render.render` (the chains a new connection walks: KUBE-SERVICES → KUBE-SVC/EXT → KUBE-SEP
→ DNAT) and `nodeagent.service.ebpf.desired.plan` (the map entry a connect() is rewritten from, and whether tc or
iptables serves it from outside). Pure.

Both families: the IPv4 proxier's chains and, given the IPv6 proxier's configuration, ip6tables' (kube-proxy runs
a proxier per family). An IPv6 frontend or endpoint is written `[ip]:port` (a NodePort on any IPv6 node address
`[<node>]:port`), as ip6tables writes its DNAT destinations.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Collection, Iterable, Mapping, Sequence

from nodeagent.cluster.model import IPAddress
from nodeagent.inspect.model import Endpoint, ServicePath
from nodeagent.service.config import ProxyConfig
from nodeagent.service.ebpf.desired import Frontend, plan
from nodeagent.service.iptables.render import render
from nodeagent.state.translation import EndpointInfo, ServicePortInfo, ServicePortName

_TRANSLATING = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-")
ANY_NODE = "<node>"


def host_port(host: str, port: int) -> str:
    """`ip:port`, or `[ip]:port` for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str) -> tuple[str, int]:
    """`ip:port` or `[ip]:port` -> (ip, port); ValueError if the port is not a number."""
    host, _, port = text.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _fields(rule: str) -> dict[str, str]:
    """The options of one `-A CHAIN …` rule that matter for a path (the last value of each flag)."""
    words = shlex.split(rule)
    out = {"chain": words[1] if len(words) > 1 else ""}
    for flag, value in itertools.pairwise(words):
        if flag in ("-d", "--dport", "-j", "--probability", "--to-destination", "-p"):
            out[flag] = value
    return out


def _rules_by_chain(rules: Iterable[str]) -> dict[str, list[dict[str, str]]]:
    chains: dict[str, list[dict[str, str]]] = {}
    for rule in rules:
        if rule.startswith("-A "):
            fields = _fields(rule)
            chains.setdefault(fields["chain"], []).append(fields)
    return chains


def _match(rules: Sequence[dict[str, str]], ip: str | None, port: int, proto: str) -> str | None:
    for fields in rules:
        if fields.get("-p", proto) != proto or fields.get("--dport") != str(port):
            continue
        if ip is not None and fields.get("-d") not in (f"{ip}/32", f"{ip}/128", ip):
            continue
        return fields.get("-j")
    return None


def _endpoints(chains: Mapping[str, list[dict[str, str]]], chain: str) -> tuple[str, tuple[Endpoint, ...]]:
    """Follow EXT/FW chains to the SVC/SVL chain; then its KUBE-SEP jumps with their probabilities."""
    seen: set[str] = set()
    while chain.startswith(("KUBE-EXT-", "KUBE-FW-")) and chain not in seen:
        seen.add(chain)
        nxt = next((f["-j"] for f in chains.get(chain, ()) if f.get("-j", "").startswith(_TRANSLATING)), None)
        if nxt is None:
            break
        chain = nxt
    remaining, out = 1.0, []
    for fields in chains.get(chain, ()):
        target = fields.get("-j", "")
        if not target.startswith("KUBE-SEP-"):
            continue
        chance = float(fields.get("--probability", "1"))
        dnat = next((f.get("--to-destination", "") for f in chains.get(target, ()) if f.get("-j") == "DNAT"), "")
        out.append(Endpoint(dnat, round(remaining * chance, 6), target))
        remaining *= 1 - chance
    return chain, tuple(out)


def _frontends(info: ServicePortInfo, node_ips: Sequence[IPAddress],
               family: int = 4) -> list[tuple[str, str | None, int]]:
    """(kind, ip, port) of each frontend of a Service port in `family` (NodePort: any local address, ip None; in
    IPv6 only where the port has an IPv6 cluster IP, as kube-proxy's IPv6 proxier serves only those)."""
    out: list[tuple[str, str | None, int]] = [("ClusterIP", str(ip), info.port) for ip in info.cluster_ips
                                              if ip.version == family]
    out += [("ExternalIP", str(ip), info.port) for ip in (*info.external_ips, *info.load_balancer_ips)
            if ip.version == family]
    if info.node_port and (family == 4 or family in info.families):
        out.append(("NodePort", None, info.node_port))
    return out


def iptables_paths(service_ports: Mapping[ServicePortName, ServicePortInfo],
                   endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]], config: ProxyConfig,
                   node_ips: Sequence[IPAddress] = (), config6: ProxyConfig | None = None) -> list[ServicePath]:
    """Each frontend's path through the chains `render` writes for these Services: the IPv4 proxier's with
    `config`, then, with `config6` (the IPv6 proxier's configuration), ip6tables' for the IPv6 frontends."""
    paths = _family_paths(service_ports, endpoints, config, node_ips)
    if config6 is not None:
        paths += _family_paths(service_ports, endpoints, config6, node_ips)
    return paths


def _family_paths(service_ports: Mapping[ServicePortName, ServicePortInfo],
                  endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]], config: ProxyConfig,
                  node_ips: Sequence[IPAddress]) -> list[ServicePath]:
    rendered = render(service_ports, endpoints, config)
    nat, filt = _rules_by_chain(rendered.nat.rules), _rules_by_chain(rendered.filter.rules)
    paths = []
    for name, info in sorted(service_ports.items()):
        proto = info.protocol.value.lower()
        for kind, ip, port in _frontends(info, node_ips, config.family):
            top = "KUBE-NODEPORTS" if kind == "NodePort" else "KUBE-SERVICES"
            where = host_port(ip or ANY_NODE, port) if config.family == 4 else f"[{ip or ANY_NODE}]:{port}"
            frontend = f"{where}/{proto.upper()}"
            chain = _match(nat.get(top, []), ip, port, proto)
            if chain is None or chain == "KUBE-MARK-MASQ":
                rejected = _match(filt.get("KUBE-SERVICES", []) + filt.get("KUBE-EXTERNAL-SERVICES", []),
                                  ip, port, proto)
                verdict = "reject (no endpoints)" if rejected in ("REJECT", "DROP") else "not translated"
                paths.append(ServicePath(str(name), frontend, kind, f"filter {rejected or '-'}", (), verdict))
                continue
            via, eps = _endpoints(nat, chain)
            via = f"{top} -> {chain}" + (f" -> {via}" if via != chain else "")
            paths.append(ServicePath(str(name), frontend, kind, via, eps,
                                     "translated" if eps else "reject (no endpoints)"))
    return paths


def ebpf_paths(service_ports: Mapping[ServicePortName, ServicePortInfo],
               endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]], node_ips: Sequence[IPAddress],
               node_labels: Mapping[str, str] | None = None) -> list[ServicePath]:
    """Each frontend's map entry (`desired.plan`): backends chosen by weight; an external frontend whose
    traffic from outside tc leaves to kube-proxy's iptables rules says so, and why."""
    planned = plan(service_ports, endpoints, node_ips=node_ips, node_labels=node_labels)
    entries = planned.entries
    gaps = {str(name): ", ".join(found) for name, found in planned.external_stack.items()}
    kinds = {}
    for info in service_ports.values():
        for kind, ip, port in _frontends(info, node_ips):
            kinds[(ip, port)] = kind
    paths = []
    for frontend, entry in sorted(entries.items(), key=lambda item: (item[1].port_name, item[0])):
        total = sum(b.weight for b in entry.backends)
        eps = tuple(Endpoint(f"{b.ip}:{b.port}", round(b.weight / total, 6), "backend map", b.weight)
                    for b in entry.backends)
        kind = kinds.get((frontend.ip, frontend.port)) or kinds.get((None, frontend.port), "NodePort")
        via = f"service map [{frontend}]"
        if entry.external_stack:
            via += f"; from outside: iptables (tc lacks: {gaps.get(entry.port_name, '?')})"
        paths.append(ServicePath(entry.port_name, str(frontend), kind, via, eps,
                                 "translated" if eps else "reject (no endpoints: connect() gets ECONNREFUSED)"))
    return paths


def captured_by_tunnel(paths: Iterable[ServicePath], dns_port: int | None = None) -> list[ServicePath]:
    """An enrolled pod's TCP never reaches the node's translation: its capture sends it to the node tunnel,
    which balances over the same endpoints (weighted, healthy only). With `dns_port` (the pod not opted
    out of the DNS capture), port 53 over UDP and TCP goes to the tunnel's DNS proxy, which answers itself."""
    out = []
    for path in paths:
        if dns_port is not None and path.frontend.rsplit("/", 1)[0].endswith(":53"):
            path = ServicePath(path.service, path.frontend, path.kind, f"capture -> tunnel DNS proxy {dns_port} "
                               f"(node: {path.via})", path.endpoints,
                               "captured (the tunnel's DNS proxy answers; the Service's port 53 is not reached)",
                               path.live)
        elif path.frontend.endswith("/TCP") and path.endpoints:
            path = ServicePath(path.service, path.frontend, path.kind, f"capture -> tunnel 15001 (node: {path.via})",
                               path.endpoints, "captured (the node tunnel balances)", path.live)
        out.append(path)
    return out


def with_live(paths: Iterable[ServicePath], live_chains: Collection[str] | None) -> list[ServicePath]:
    """Mark each iptables path by whether every chain it names exists in the live nat table."""
    if live_chains is None:
        return list(paths)
    out = []
    for path in paths:
        named = set(re.findall(r"KUBE-[A-Z]+-[A-Z0-9]+", path.via)) | {e.via for e in path.endpoints}
        live = "present" if all(c in live_chains for c in named) else "missing"
        out.append(ServicePath(path.service, path.frontend, path.kind, path.via, path.endpoints, path.verdict, live))
    return out


def frontend_key(path: ServicePath) -> Frontend | None:
    """The eBPF map key of a path's frontend (None for a NodePort on any address)."""
    where, _, proto = path.frontend.partition("/")
    address, port = split_host_port(where)
    if address == ANY_NODE:
        return None
    return Frontend(address, port, {"TCP": 6, "UDP": 17, "SCTP": 132}[proto])
