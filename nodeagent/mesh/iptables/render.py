"""The mesh capture rules (iptables mode): inside each enrolled pod's network namespace, and the one rule
on the node that lets kubelet's probes through. Pure: options in, rule sets and restore text out.

The rules mirror Istio ambient's in-pod rules (istio/istio cni/pkg/iptables/iptables.go:
`AppendInpodRules` without TPROXY, and `AppendHostRules` for the probe SNAT) rule for rule, with our
chain names (`NODEAGENT_PRERT`, `NODEAGENT_OUTPUT`, `NODEAGENT_POSTRT`) in place of `ISTIO_*`, the
same marks (0x539 on the tunnel's sockets, 0x111 on connections the tunnel made into the pod) and the
same probe address. Every rule carries the reason it exists (`Rule.reason`; `inspect` can show it).
DNS (UDP and TCP port 53, Istio's `RedirectDNS` rules) goes to the tunnel's DNS proxy unless the pod opts out
(`dns_port` None; the tunnel forwards what it does not answer, with its mark, which the rules skip).
Differences: optional exclusions, as the sidecar
annotations `traffic.sidecar.istio.io/exclude*` did, are RETURN rules placed before the REDIRECTs;
the probe SNAT matches the pod addresses one rule each instead of an ipset.

IPv6: the same rule set, written with ip6tables into the same namespace (`pod_capture(options, family=6)`),
as Istio's builder writes every in-pod rule for both families (`AppendVersionedRule("127.0.0.1/32",
"::1/128", ...)` and the probe address `HostProbeV6SNATAddress`, fd16:9254:7127:1337:ffff:ffff:ffff:ffff);
its policy route is `ip -6 rule ... lookup 100` with `local ::/0 dev lo table 100` (Istio's
AddInpodMarkIPRule adds the rule and the route for both families). Excluded ranges go to the rule set of
their family.

Source addresses survive the tunnel only if the tunnel connects to the application from the original
source (IP_TRANSPARENT, bound to the client's address, mark 0x539). The application's replies go to
an address that is not in the pod; the mangle rules and the policy route deliver them back to the
tunnel's socket instead of out of eth0 (see the reasons below).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from nodeagent.mesh.iptables.rules import (
    Hook,
    LiveRules,
    PolicyRoute,
    Rule,
    RuleSet,
    cleanup_payload,
    restore_payload,
)

# The tunnel's side of the contract (docs/ports-and-names.md); tests check these equal nodeagent.tunnel's.
OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT = 15001, 15006, 15008
DNS_PORT = 15053  # the tunnel's DNS proxy in every served pod (ztunnel's)
TUNNEL_MARK = 0x539  # SO_MARK on every socket the tunnel opens (Istio's InpodMark, 1337)
MARK_MASK = 0xFFF  # only our bits: other marks (kube-proxy's 0x4000, CNI bits) pass through
CONNECTION_MARK = 0x111  # connections the tunnel made into the pod (Istio's InpodTProxyMark)
RESTORE_MASK = 0xFFFFFFFF
PROBE_ADDRESS = "169.254.7.127"  # kubelet probes appear from here (Istio's HostProbeSNATAddress)
PROBE_ADDRESS_V6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"  # Istio's HostProbeV6SNATAddress
FAMILIES = (4, 6)
ROUTE_TABLE = 100  # Istio's RouteTableInbound
RULE_PRIORITY = 32764  # before `main` (32766)

PRERT, OUTPUT, POSTRT = "NODEAGENT_PRERT", "NODEAGENT_OUTPUT", "NODEAGENT_POSTRT"
POD_CHAINS = (("mangle", PRERT), ("mangle", OUTPUT), ("nat", PRERT), ("nat", OUTPUT))
NODE_CHAINS = (("nat", POSTRT),)


class CaptureOptionsError(ValueError):
    """An option of the capture is unusable; the message names the field and the value."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"capture option {field}={value!r}: {reason}")
        self.field, self.value, self.reason = field, value, reason


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """What changes a pod's capture rules; the defaults are the mesh's (docs/ports-and-names.md)."""

    outbound_port: int = OUTBOUND_PORT
    inbound_plaintext_port: int = INBOUND_PLAIN_PORT
    hbone_port: int = HBONE_PORT
    mark: int = TUNNEL_MARK
    connection_mark: int = CONNECTION_MARK
    probe_address: str = PROBE_ADDRESS
    probe_address_v6: str = PROBE_ADDRESS_V6
    route_table: int = ROUTE_TABLE
    rule_priority: int = RULE_PRIORITY
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    dns_port: int | None = DNS_PORT  # None: the pod's DNS is not captured (it opted out)

    def __post_init__(self) -> None:
        for name in ("outbound_port", "inbound_plaintext_port", "hbone_port"):
            _port(name, getattr(self, name))
        ports = (self.outbound_port, self.inbound_plaintext_port, self.hbone_port)
        if len(set(ports)) != 3:
            raise CaptureOptionsError("tunnel ports", ports, "the three tunnel ports must differ")
        if self.dns_port is not None:
            _port("dns_port", self.dns_port)
            if self.dns_port in ports:
                raise CaptureOptionsError("dns_port", self.dns_port, "must differ from the tunnel's other ports")
        for name in ("mark", "connection_mark"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 < value <= MARK_MASK:
                raise CaptureOptionsError(name, value, f"must be a non-zero mark within the mask {MARK_MASK:#x}")
        if self.mark == self.connection_mark:
            raise CaptureOptionsError("connection_mark", self.connection_mark, "must differ from mark")
        _ipv4("probe_address", self.probe_address)
        try:
            ipaddress.IPv6Address(self.probe_address_v6)
        except ValueError as exc:
            raise CaptureOptionsError("probe_address_v6", self.probe_address_v6, "not an IPv6 address") from exc
        if not isinstance(self.route_table, int) or not 0 < self.route_table < 253:  # 253-255: default/main/local
            raise CaptureOptionsError("route_table", self.route_table, "must be 1-252")
        if not isinstance(self.rule_priority, int) or not 0 < self.rule_priority < 32766:
            raise CaptureOptionsError("rule_priority", self.rule_priority, "must be 1-32765 (before `main`)")
        for name in ("exclude_outbound_ports", "exclude_inbound_ports"):
            for port in getattr(self, name):
                _port(name, port)
        for cidr in self.exclude_outbound_cidrs:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as exc:
                raise CaptureOptionsError("exclude_outbound_cidrs", cidr, f"not an IP network ({exc})") from exc

    def cidrs(self, family: int) -> tuple[str, ...]:
        """The excluded outbound ranges of one IP family (each family's rule set holds its own)."""
        return tuple(str(n) for n in map(ipaddress.ip_network, self.exclude_outbound_cidrs) if n.version == family)


def _port(field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise CaptureOptionsError(field, value, "not a port (1-65535)")


def _ipv4(field: str, value: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError as exc:
        raise CaptureOptionsError(field, value, "not an IPv4 address") from exc


DEFAULT_OPTIONS = CaptureOptions()


def _mark(value: int) -> str:
    return f"{value:#x}/{MARK_MASK:#x}"


def pod_capture(options: CaptureOptions = DEFAULT_OPTIONS, family: int = 4) -> RuleSet:
    """The rule set inside one enrolled pod's network namespace, for iptables (`family` 4) or ip6tables (6)."""
    if family not in FAMILIES:
        raise ValueError(f"IP family {family!r}: 4 or 6")
    o = options
    mark, conn = _mark(o.mark), _mark(o.connection_mark)
    probe = f"{o.probe_address}/32" if family == 4 else f"{o.probe_address_v6}/128"
    loopback = "127.0.0.1/32" if family == 4 else "::1/128"
    rules = [
        Rule("mangle", PRERT, f"-m mark --mark {mark} -j CONNMARK --set-xmark {conn}",
             "a packet the tunnel sent into the pod (to the app, looped through lo with its socket's mark) "
             "marks its connection, so that the app's replies can be told apart"),
        Rule("mangle", OUTPUT, f"-m connmark --mark {conn} -j CONNMARK --restore-mark "
             f"--nfmask {RESTORE_MASK:#x} --ctmask {RESTORE_MASK:#x}",
             "the app's replies on such a connection carry the connection's mark; the policy route then "
             "delivers them to the tunnel's transparent socket instead of out of eth0 toward the original source"),
        Rule("nat", PRERT, f"-s {probe} -p tcp -m tcp -j ACCEPT",
             "kubelet's probes (SNATed to the probe address on the node) reach the app directly"),
        *(Rule("nat", PRERT, f"-p tcp -m tcp --dport {port} -j RETURN", "inbound port excluded from capture")
          for port in o.exclude_inbound_ports),
        Rule("nat", PRERT, f"! -d {loopback} -p tcp -m tcp ! --dport {o.hbone_port} -m mark ! --mark {mark} "
             f"-j REDIRECT --to-ports {o.inbound_plaintext_port}",
             "inbound TCP that is not HBONE (which reaches the tunnel's own port directly) and not sent by the "
             "tunnel goes to the tunnel's plaintext inbound port"),
        Rule("nat", OUTPUT, f"-d {probe} -p tcp -m tcp -j ACCEPT",
             "connections toward the probe address (the answers to probes) are never captured"),
        Rule("nat", OUTPUT, f"-p tcp -m mark --mark {conn} -j ACCEPT",
             "traffic of connections the tunnel made into the pod is never captured again"),
        *((Rule("nat", OUTPUT, f"! -o lo -p udp -m mark ! --mark {mark} -m udp --dport 53 -j REDIRECT --to-ports "
                f"{o.dns_port}",
                "DNS queries (UDP) go to the tunnel's DNS proxy, which answers Service names and forwards the rest; "
                "its own forwards carry the tunnel's mark and pass"),
           Rule("nat", OUTPUT, f"! -d {loopback} -p tcp -m tcp --dport 53 -m mark ! --mark {mark} -j REDIRECT "
                f"--to-ports {o.dns_port}", "DNS queries over TCP go to the tunnel's DNS proxy too"))
          if o.dns_port is not None else ()),
        Rule("nat", OUTPUT, f"! -d {loopback} -o lo -j ACCEPT",
             "the app calling itself (its own pod address goes over lo) is not captured; 127.0.0.1 is "
             "left alone by the REDIRECT below"),
        *(Rule("nat", OUTPUT, f"-p tcp -m tcp --dport {port} -j RETURN", "outbound port excluded from capture")
          for port in o.exclude_outbound_ports),
        *(Rule("nat", OUTPUT, f"-d {cidr} -p tcp -j RETURN",
               "outbound destination range excluded from capture") for cidr in o.cidrs(family)),
        Rule("nat", OUTPUT, f"! -d {loopback} -p tcp -m mark ! --mark {mark} -j REDIRECT --to-ports "
             f"{o.outbound_port}",
             "outbound TCP not sent by the tunnel itself goes to the tunnel's outbound port"),
    ]
    hooks = (Hook("mangle", "PREROUTING", PRERT), Hook("mangle", "OUTPUT", OUTPUT),
             Hook("nat", "PREROUTING", PRERT), Hook("nat", "OUTPUT", OUTPUT))
    return RuleSet("capture", POD_CHAINS, tuple(rules), hooks,
                   PolicyRoute(o.connection_mark, MARK_MASK, o.route_table, o.rule_priority, family), family)


def render_pod_capture(options: CaptureOptions = DEFAULT_OPTIONS, live: LiveRules | None = None,
                       family: int = 4) -> str:
    """iptables-restore (ip6tables-restore for `family` 6) `--noflush` input installing (or repairing) the
    capture in a pod's namespace that holds `live` of ours (None: nothing). The policy route
    (`pod_capture(options, family).routing`) goes beside it."""
    return restore_payload(pod_capture(options, family), live)


def render_pod_cleanup(live: LiveRules) -> str:
    """iptables-restore `--noflush` input removing exactly the chains and jumps of ours in `live`."""
    return cleanup_payload(live)


def node_probe_snat(pod_ips: Iterable[str], probe_address: str | None = None, family: int = 4) -> RuleSet:
    """The rule set in the node's namespace: connections from the node's own processes (kubelet) to its
    enrolled pods leave with the probe address as source, which the pods' capture lets through. One set per
    IP family (`family` 6: the pods' IPv6 addresses, Istio's HostProbeV6SNATAddress, ip6tables), so a pod
    probed at its IPv6 address (an IPv6-only pod, or an IPv6-primary cluster) is let through too."""
    if family not in FAMILIES:
        raise ValueError(f"IP family {family!r}: 4 or 6")
    address = probe_address or (PROBE_ADDRESS if family == 4 else PROBE_ADDRESS_V6)
    parse = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    try:
        probe = parse(address)
    except ValueError as exc:
        raise CaptureOptionsError("probe_address", address, f"not an IPv{family} address") from exc
    addresses = set()
    for ip in pod_ips:
        try:
            addresses.add(parse(ip))
        except ValueError as exc:
            raise CaptureOptionsError("pod_ips", ip, f"not an IPv{family} address") from exc
    prefix = 32 if family == 4 else 128
    rules = tuple(
        Rule("nat", POSTRT, f"-d {ip}/{prefix} -p tcp -m owner --socket-exists -j SNAT --to-source {probe}",
             "a connection from a process of the node (a socket exists: not forwarded traffic) to an enrolled "
             "pod is a probe; the pod lets this source through uncaptured")
        for ip in sorted(addresses))
    return RuleSet("probe-snat", NODE_CHAINS, rules, (Hook("nat", "POSTROUTING", POSTRT),), family=family)


def render_node_probe_snat(pod_ips: Iterable[str], probe_address: str | None = None,
                           live: LiveRules | None = None, family: int = 4) -> str:
    """iptables-restore (ip6tables-restore for `family` 6) `--noflush` input for the node's probe SNAT,
    given what of it is `live`."""
    return restore_payload(node_probe_snat(pod_ips, probe_address, family), live)
