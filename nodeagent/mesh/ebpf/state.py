"""The eBPF mesh capture's pure half: the per-pod configuration the programs read (bpf-src/mesh_capture.c
`struct nm_config`), and what a pod's (or the tunnel's) capture looks like against what it should be.

States are the iptables capture's (`nodeagent.mesh.capture.CaptureStatus`, same `ACTION` table), so a
reconciler handles both modes alike. Their meaning here:
- absent:        no program of ours on the pod's cgroup or interface, no configuration for its namespace
                 or its address.
- installed:     each of our programs attached exactly once, each the one pinned now; the configuration
                 equals the desired one and the pod's address points at the pod's namespace.
- drifted:       some of it missing, doubled, or the configuration differs (detached or edited by hand).
- stale:         a program of ours from another load (another id than the pinned one) is attached.
- netns-missing: the pod's namespace or cgroup is gone; nothing to repair.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from nodeagent.mesh.capture import CaptureState, CaptureStatus
from nodeagent.mesh.iptables.render import DEFAULT_OPTIONS, CaptureOptions, CaptureOptionsError

BACKEND = "ebpf"
# The byte layouts of the maps the agent writes and reads; tests/integration/test_bpf_layouts.py compares them
# with what bcc compiles. Changing one changes a pinned map's layout: that bumps LAYOUT in programs.py.
MAX_EXCLUDE = 8  # must match bpf-src/mesh_capture.c NM_MAX_EXCLUDE
# must match `struct nm_config` in bpf-src/mesh_capture.c, field by field: pod_ip, probe_ip (network order),
# mark (host order: compared with the socket's mark), outbound_port, inbound_port, hbone_port (network order,
# as bytes), n_out_ports, n_in_ports, n_out_cidrs, n_out_cidrs6, dns_port (network order; 0: the pod's DNS is not
# captured), exclude_out_ports, exclude_in_ports (network order), exclude_out_cidrs (net, mask pairs, network
# order), pod_ip6, probe_ip6 (network order; pod_ip6 all zero: the pod has no IPv6 address and its IPv6
# connections are not captured), exclude_out_cidrs6 (net, mask pairs of 16 bytes each)
CONFIG = struct.Struct(f"=4s4sI2s2s2sBBBB2s{2 * MAX_EXCLUDE}s{2 * MAX_EXCLUDE}s{8 * MAX_EXCLUDE}s16s16s"
                       f"{32 * MAX_EXCLUDE}s")
CONFIG_SIZE = CONFIG.size  # 408
_PORTS = struct.Struct(f">{MAX_EXCLUDE}H")  # exclude_out_ports, exclude_in_ports
_PORT = struct.Struct(">H")
STATS_FIELDS = ("outbound", "outbound_skipped", "inbound", "inbound_dropped", "answered", "dns")
# must match `struct nm_stats` in bpf-src/mesh_capture.c: one u64 per name in STATS_FIELDS, in that order
STATS = struct.Struct(f"={len(STATS_FIELDS)}Q")


@dataclass(frozen=True, slots=True)
class Program:
    """One program of the capture: where it attaches and as what."""

    name: str
    prog_type: int  # enum bpf_prog_type
    attach_type: int  # enum bpf_attach_type (-1: none, tc)
    kind: str  # bpftool's attach argument, or "tc-ingress"
    json_kind: str  # the attach type as bpftool's JSON may print it (libbpf's name)
    on: str  # "pod" (the pod's cgroup), "tunnel" (the tunnel's cgroup) or "interface" (the pod's, tc)


PROGRAMS = (
    Program("nm_sockops", 13, 3, "sock_ops", "cgroup_sock_ops", "pod"),
    Program("nm_getpeername4", 18, 29, "getpeername4", "cgroup_inet4_getpeername", "pod"),
    Program("nm_getpeername6", 18, 30, "getpeername6", "cgroup_inet6_getpeername", "pod"),  # IPv6, IPv4-mapped
    Program("nm_recvmsg4", 18, 19, "recvmsg4", "cgroup_udp4_recvmsg", "pod"),  # a DNS answer's source
    Program("nm_recvmsg6", 18, 20, "recvmsg6", "cgroup_udp6_recvmsg", "pod"),
    # the capturing programs last: once they capture, sock_ops and the reverse views are there
    Program("nm_sendmsg6", 18, 15, "sendmsg6", "cgroup_udp6_sendmsg", "pod"),  # DNS over unconnected UDP
    Program("nm_sendmsg4", 18, 14, "sendmsg4", "cgroup_udp4_sendmsg", "pod"),
    Program("nm_connect6", 18, 11, "connect6", "cgroup_inet6_connect", "pod"),  # IPv6, IPv4-mapped
    Program("nm_connect4", 18, 10, "connect4", "cgroup_inet4_connect", "pod"),
    Program("nm_getsockopt", 25, 21, "getsockopt", "cgroup_getsockopt", "tunnel"),
    Program("nm_tc_inbound", 3, -1, "tc-ingress", "tc-ingress", "interface"),
)
BY_NAME = {p.name: p for p in PROGRAMS}
POD_PROGRAMS = tuple(p for p in PROGRAMS if p.on in ("pod", "interface"))
CAPTURING = ("nm_connect4", "nm_connect6", "nm_sendmsg4", "nm_sendmsg6")  # removal detaches these first
TUNNEL_PROGRAMS = tuple(p for p in PROGRAMS if p.on == "tunnel")


def _ip(field: str, value: str) -> bytes:
    try:
        return ipaddress.IPv4Address(value).packed
    except ValueError as exc:
        raise CaptureOptionsError(field, value, "not an IPv4 address") from exc


def _ip6(field: str, value: str) -> bytes:
    try:
        return ipaddress.IPv6Address(value).packed
    except ValueError as exc:
        raise CaptureOptionsError(field, value, "not an IPv6 address") from exc


def _bounded(field: str, values: tuple[object, ...], what: str = "") -> None:
    if len(values) > MAX_EXCLUDE:
        raise CaptureOptionsError(field, values,
                                  f"the eBPF capture holds at most {MAX_EXCLUDE}{what} (has {len(values)})")


def encode_config(pod_ip: str, options: CaptureOptions = DEFAULT_OPTIONS, pod_ip6: str | None = None) -> bytes:
    """`struct nm_config` for a pod at `pod_ip` (and `pod_ip6`: its IPv6 connections are captured too). The
    iptables-only options (connection mark, route table, rule priority) have no meaning here and are ignored."""
    o = options
    _bounded("exclude_outbound_ports", o.exclude_outbound_ports)
    _bounded("exclude_inbound_ports", o.exclude_inbound_ports)
    v4_cidrs, v6_cidrs = o.cidrs(4), o.cidrs(6)  # each family's programs read their own
    _bounded("exclude_outbound_cidrs", v4_cidrs, " IPv4 ranges")
    _bounded("exclude_outbound_cidrs", v6_cidrs, " IPv6 ranges")
    cidrs = b"".join(net.network_address.packed + net.netmask.packed
                     for net in (ipaddress.IPv4Network(c) for c in v4_cidrs))
    cidrs6 = b"".join(net.network_address.packed + net.netmask.packed
                      for net in (ipaddress.IPv6Network(c) for c in v6_cidrs))

    def ports(values: tuple[int, ...]) -> bytes:
        return _PORTS.pack(*values, *([0] * (MAX_EXCLUDE - len(values))))

    return CONFIG.pack(_ip("pod_ip", pod_ip), _ip("probe_address", o.probe_address), o.mark,
                       _PORT.pack(o.outbound_port), _PORT.pack(o.inbound_plaintext_port), _PORT.pack(o.hbone_port),
                       len(o.exclude_outbound_ports), len(o.exclude_inbound_ports), len(v4_cidrs), len(v6_cidrs),
                       _PORT.pack(o.dns_port) if o.dns_port is not None else bytes(2),
                       ports(o.exclude_outbound_ports), ports(o.exclude_inbound_ports), cidrs,
                       _ip6("pod_ip6", pod_ip6) if pod_ip6 else bytes(16), _ip6("probe_address_v6", o.probe_address_v6),
                       cidrs6)


def describe_config(value: bytes) -> str:
    """A readable line for a `struct nm_config` (what the state's missing/unexpected lines show)."""
    if len(value) != CONFIG_SIZE:
        return f"config of {len(value)} bytes (not ours)"
    (pod_ip, probe_ip, mark, out_port, in_port, hbone_port, n_out, n_in, n_cidr, n_cidr6, dns_port, out_list,
     in_list, cidr_list, pod_ip6, _, cidr6_list) = CONFIG.unpack(value)
    pod, probe = socket.inet_ntoa(pod_ip), socket.inet_ntoa(probe_ip)
    (out,), (inbound,), (hbone,) = _PORT.unpack(out_port), _PORT.unpack(in_port), _PORT.unpack(hbone_port)
    out_ports = _PORTS.unpack(out_list)[:n_out]
    in_ports = _PORTS.unpack(in_list)[:n_in]
    cidrs = [str(ipaddress.IPv4Network((socket.inet_ntoa(cidr_list[8 * i:8 * i + 4]),
                                        socket.inet_ntoa(cidr_list[8 * i + 4:8 * i + 8])), strict=False))
             for i in range(min(n_cidr, MAX_EXCLUDE))]
    cidrs += [str(ipaddress.IPv6Network((int.from_bytes(cidr6_list[32 * i:32 * i + 16], "big"),
                                         bin(int.from_bytes(cidr6_list[32 * i + 16:32 * i + 32], "big")).count("1"))))
              for i in range(min(n_cidr6, MAX_EXCLUDE))]
    (dns,) = _PORT.unpack(dns_port)
    if any(pod_ip6):
        pod += f" {ipaddress.IPv6Address(pod_ip6)}"
    return (f"pod {pod}: outbound -> 127.0.0.1:{out}, inbound -> {inbound} except {hbone}, mark {mark:#x}, "
            f"probe {probe}, exclude outbound ports {list(out_ports)}, inbound ports {list(in_ports)}, "
            f"outbound cidrs {cidrs}, DNS {'-> ' + str(dns) if dns else 'not captured'}")


def decode_stats(value: bytes) -> dict[str, int]:
    """`struct nm_stats` as a dict."""
    return dict(zip(STATS_FIELDS, STATS.unpack(value), strict=True))


@dataclass(frozen=True, slots=True)
class Attached:
    """A program of ours found attached (on a cgroup, or as a tc filter)."""

    name: str
    prog_id: int
    where: str


@dataclass(frozen=True, slots=True)
class PodLive:
    """One read of everything of ours for a pod."""

    attached: tuple[Attached, ...]
    config: bytes | None  # nm_config[netns cookie]
    cookie_of_ip: int | None  # nm_pod_ips[pod ip]
    cookie_of_ip6: int | None = None  # nm_pod_ips6[pod IPv6 address]


@dataclass(frozen=True, slots=True)
class PodDesired:
    """What a captured pod must have."""

    program_ids: Mapping[str, int]  # program name -> id of the program pinned now
    config: bytes
    cookie: int
    ipv6: bool = False  # the pod has an IPv6 address: nm_pod_ips6 must lead it to its namespace too

    @property
    def fingerprint(self) -> str:
        """Identifies configuration and programs together (changes when either does)."""
        ids = ",".join(f"{n}={i}" for n, i in sorted(self.program_ids.items()))
        return hashlib.sha256(self.config + ids.encode()).hexdigest()[:16]


def _programs(wanted: tuple[Program, ...], ids: Mapping[str, int], attached: tuple[Attached, ...]
              ) -> tuple[list[str], list[str], bool]:
    missing: list[str] = []
    unexpected: list[str] = []
    stale = False
    counts = Counter((a.name, a.prog_id) for a in attached)
    for program in wanted:
        want = ids[program.name]
        where = next((a.where for a in attached if a.name == program.name), program.on)
        if counts[(program.name, want)] == 0:
            missing.append(f"{program.kind} {program.name} (id {want})")
        elif counts[(program.name, want)] > 1:
            unexpected.append(f"{program.kind} {program.name} (id {want}) x{counts[(program.name, want)]} on {where}")
    for item in attached:
        if item.prog_id != ids.get(item.name, -1):
            stale = True
            unexpected.append(f"{BY_NAME[item.name].kind if item.name in BY_NAME else '?'} {item.name} "
                              f"(id {item.prog_id}, not the pinned program) on {item.where}")
    return missing, unexpected, stale


def _status(present: bool, missing: list[str], unexpected: list[str], stale: bool) -> CaptureStatus:
    if not present:
        return CaptureStatus.ABSENT
    if not missing and not unexpected:
        return CaptureStatus.INSTALLED
    return CaptureStatus.STALE if stale else CaptureStatus.DRIFTED


def assess_pod(desired: PodDesired, live: PodLive, *, netns: str) -> CaptureState:
    """Name the state of a pod's capture."""
    missing, unexpected, stale = _programs(POD_PROGRAMS, desired.program_ids, live.attached)
    if live.config is None:
        missing.append(f"config {describe_config(desired.config)}")
    elif live.config != desired.config:
        missing.append(f"config {describe_config(desired.config)}")
        unexpected.append(f"config {describe_config(live.config)}")
    if live.cookie_of_ip != desired.cookie:
        missing.append(f"pod address -> netns cookie {desired.cookie}")
        if live.cookie_of_ip is not None:
            unexpected.append(f"pod address -> netns cookie {live.cookie_of_ip} (another namespace)")
    if desired.ipv6 and live.cookie_of_ip6 != desired.cookie:
        missing.append(f"pod IPv6 address -> netns cookie {desired.cookie}")
        if live.cookie_of_ip6 is not None:
            unexpected.append(f"pod IPv6 address -> netns cookie {live.cookie_of_ip6} (another namespace)")
    present = (bool(live.attached) or live.config is not None or live.cookie_of_ip is not None
               or live.cookie_of_ip6 is not None)
    status = _status(present, missing, unexpected, stale)
    return CaptureState(status, netns, BACKEND, desired.fingerprint, (), tuple(missing), tuple(unexpected))


def assess_tunnel(program_ids: Mapping[str, int], attached: tuple[Attached, ...], *, cgroup: str) -> CaptureState:
    """Name the state of the tunnel's hook (the original-destination answer) on its cgroup."""
    missing, unexpected, stale = _programs(TUNNEL_PROGRAMS, program_ids, attached)
    status = _status(bool(attached), missing, unexpected, stale)
    fingerprint = ",".join(f"{p.name}={program_ids[p.name]}" for p in TUNNEL_PROGRAMS)
    return CaptureState(status, cgroup, BACKEND, fingerprint, (), tuple(missing), tuple(unexpected))


def gone(netns: str, what: str) -> CaptureState:
    """The state of a pod whose namespace or cgroup no longer exists."""
    return CaptureState(CaptureStatus.NETNS_MISSING, netns, BACKEND, missing=(what,))
