"""Mesh capture in eBPF mode (bpf-src/mesh_capture.c): load and pin the programs, capture a pod (its cgroup
and its interface), install the tunnel's original-destination hook, read the live state.

Where each program goes, and why:
- the pod's cgroup (`PodTarget.cgroup`; in a cluster the pod-level `kubepods…/pod<uid>`, whose
  containers inherit it): connect4/6, sock_ops, getpeername4/6 (6: IPv6 where the pod has an IPv6 address,
  and IPv4-mapped addresses), and for DNS sendmsg4/6 and recvmsg4/6. Only
  sockets created by the pod's own processes pass them; the tunnel creates its sockets in the pod's
  namespace from its own process, so they belong to the tunnel's cgroup and are never captured (mark
  0x539 is checked too).
- the tunnel's cgroup (`attach_tunnel`; in the lab the node's cgroup, where `lab agents` runs the tunnel;
  in a cluster the tunnel pod's cgroup): getsockopt. The hook runs in the cgroup of the socket, and an
  accepted socket belongs to its listener's cgroup, i.e. the tunnel's. Never the root cgroup.
- tc ingress on the pod's interface, inside the pod's namespace: new inbound TCP connections are assigned
  to the tunnel's 15006 listener with bpf_sk_assign (TPROXY without iptables; kernel ≥ 5.7). Chosen over
  keeping iptables' REDIRECT for inbound because the eBPF mode then needs no netfilter in the pod at all,
  and the tunnel reads the original destination through the same getsockopt.

Pins: `/sys/fs/bpf/nodeagent/<scope>/mesh/v<LAYOUT>/` (programs and maps), adopted by a restarted agent
without compiling; attachments outlive the agent, as the service datapath's do. Apply never leaves a pod
half-captured: configuration first (inert alone), then tc, then the cgroup programs with connect4 last;
any failure removes everything of ours for the pod and raises `CaptureError`.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

from nodeagent.kernel.bpf.cgroup import cgroup_of_pid
from nodeagent.kernel.bpf.loader import ROOT, SOURCE_DIR, BpfError, ensure_pinned, program_id
from nodeagent.kernel.bpf.syscall import MapHandle
from nodeagent.kernel.netns import CommandError, cookie_key, netns_cookie
from nodeagent.mesh.capture import CaptureState, CaptureStatus
from nodeagent.mesh.ebpf.hooks import attach_cgroup, attach_tc, detach_cgroup, detach_tc, on_cgroup, tc_ours
from nodeagent.mesh.ebpf.state import (
    BY_NAME,
    CAPTURING,
    POD_PROGRAMS,
    PROGRAMS,
    STATS,
    TUNNEL_PROGRAMS,
    PodDesired,
    PodLive,
    assess_pod,
    assess_tunnel,
    decode_stats,
    encode_config,
    gone,
)
from nodeagent.mesh.iptables.apply import CaptureError, netns_present
from nodeagent.mesh.iptables.render import DEFAULT_OPTIONS, CaptureOptions

log = structlog.get_logger("nodeagent.mesh.ebpf.programs")

__all__ = [
    "LAYOUT", "MeshPrograms", "PodTarget", "apply_capture", "attach_tunnel", "capture_counters", "cgroup_of_pid",
    "cookie_key", "detach_tunnel", "live_state", "load", "mesh_dir", "netns_cookie", "remove_capture",
    "remove_pins", "source", "tunnel_state",
]

LAYOUT = 3  # 2: IPv6 in struct nm_config, and the IPv6 maps; 3: DNS capture (dns_port, the dns counter), IPv6 ranges
MAPS = {"nm_config": (8, 408), "nm_pod_ips": (4, 8), "nm_stats": (8, 48), "nm_pending": (24, 8), "nm_inbound": (12, 4),
        "nm_pending6": (48, 20), "nm_pod_ips6": (16, 8), "nm_inbound6": (36, 4)}
KERNEL_ONLY_MAPS = ("nm_orig", "nm_orig6")


def mesh_dir(scope: str) -> Path:
    """Where the capture of `scope` is pinned (beside the service datapath's versions)."""
    return ROOT / scope / "mesh" / f"v{LAYOUT}"


def source() -> str:
    """The C source of the capture programs."""
    return (SOURCE_DIR / "mesh_capture.c").read_text()


@dataclass(frozen=True, slots=True)
class PodTarget:
    """A pod as the capture sees it: name (for logs), network namespace path, cgroup v2 directory, IPv4 (and
    IPv6: its IPv6 connections are captured too)."""

    name: str
    netns: str
    cgroup: Path
    ip: str
    interface: str = "eth0"
    ip6: str | None = None


@dataclass
class MeshPrograms:
    """The pinned capture programs and open maps of one scope."""

    scope: str
    directory: Path
    maps: dict[str, MapHandle]
    program_ids: dict[str, int]
    adopted: bool

    def close(self) -> None:
        """Close the map handles (pins and attachments stay)."""
        for handle in self.maps.values():
            handle.close()

    def __enter__(self) -> MeshPrograms:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def load(scope: str, *, compile_if_missing: bool = True) -> MeshPrograms:
    """Adopt the pinned capture of `scope`, or compile, load and pin it; raises BpfError on failure."""
    directory = mesh_dir(scope)
    pins = (*MAPS, *KERNEL_ONLY_MAPS)
    if not compile_if_missing and not all((directory / n).exists() for n in (*BY_NAME, *pins)):
        raise BpfError(f"the mesh capture of scope {scope} is not pinned at {directory}")
    adopted = ensure_pinned(source(), directory, PROGRAMS, what="the mesh capture", also=pins)
    maps = {name: MapHandle.pinned(str(directory / name), *sizes) for name, sizes in MAPS.items()}
    ids = {name: program_id(directory / name) for name in BY_NAME}
    log.info("mesh capture programs ready", scope=scope, adopted=adopted, pins=str(directory))
    return MeshPrograms(scope, directory, maps, ids, adopted)


def remove_pins(scope: str) -> list[str]:
    """Remove the capture's pins of `scope` (every layout); programs go once nothing is attached."""
    directory = ROOT / scope / "mesh"
    if not directory.exists():
        return []
    removed = [str(p) for p in sorted(directory.rglob("*")) if not p.is_dir()]
    shutil.rmtree(directory)
    for empty in (ROOT / scope, ROOT):
        with contextlib.suppress(OSError):  # not empty: the service datapath is still pinned there
            empty.rmdir()
    return removed


def _read_pod(programs: MeshPrograms, pod: PodTarget, cookie: int) -> PodLive:
    tc = tuple(tc_ours(pod.netns, pod.interface))
    cgroup = tuple(a for a, _ in on_cgroup(pod.cgroup) if BY_NAME[a.name].on == "pod")
    cookie_of_ip = programs.maps["nm_pod_ips"].lookup(socket.inet_aton(pod.ip))
    cookie_of_ip6 = programs.maps["nm_pod_ips6"].lookup(_ip6_key(pod.ip6)) if pod.ip6 else None
    return PodLive(cgroup + tc, programs.maps["nm_config"].lookup(cookie_key(cookie)),
                   int.from_bytes(cookie_of_ip, sys.byteorder) if cookie_of_ip is not None else None,
                   int.from_bytes(cookie_of_ip6, sys.byteorder) if cookie_of_ip6 is not None else None)


def _ip6_key(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, address)


def _pod_gone(pod: PodTarget) -> str | None:
    if not netns_present(pod.netns):
        return f"network namespace {pod.netns}"
    if not pod.cgroup.is_dir():
        return f"cgroup {pod.cgroup}"
    return None


def live_state(programs: MeshPrograms, pod: PodTarget, options: CaptureOptions = DEFAULT_OPTIONS) -> CaptureState:
    """Read the capture of `pod` and name its state against `options`."""
    if (what := _pod_gone(pod)) is not None:
        return gone(pod.netns, what)
    try:
        cookie = netns_cookie(pod.netns)
        desired = PodDesired(programs.program_ids, encode_config(pod.ip, options, pod.ip6), cookie, bool(pod.ip6))
        return assess_pod(desired, _read_pod(programs, pod, cookie), netns=pod.netns)
    except (OSError, CommandError, BpfError):
        if (what := _pod_gone(pod)) is not None:
            return gone(pod.netns, what)
        raise


def apply_capture(programs: MeshPrograms, pod: PodTarget, options: CaptureOptions = DEFAULT_OPTIONS, *,
                  force: bool = False) -> CaptureState:
    """Make `pod` captured exactly as `options` say; returns the state after (installed, or netns-missing
    when the pod is gone). Raises CaptureError, with everything of ours for the pod removed again, when the
    kernel refuses; CaptureOptionsError when the options do not fit the programs."""
    config = encode_config(pod.ip, options, pod.ip6)
    if (what := _pod_gone(pod)) is not None:
        return gone(pod.netns, what)
    try:
        cookie = netns_cookie(pod.netns)
        before = assess_pod(PodDesired(programs.program_ids, config, cookie, bool(pod.ip6)),
                            _read_pod(programs, pod, cookie), netns=pod.netns)
        if before.status is CaptureStatus.INSTALLED and not force:
            return before
        ip_key = socket.inet_aton(pod.ip)
        previous = programs.maps["nm_pod_ips"].lookup(ip_key)
        if previous is not None and previous != cookie_key(cookie):
            programs.maps["nm_config"].delete(previous)  # the address's former namespace (a recreated pod)
        programs.maps["nm_config"].update(cookie_key(cookie), config)
        programs.maps["nm_pod_ips"].update(ip_key, cookie_key(cookie))
        if pod.ip6:
            programs.maps["nm_pod_ips6"].update(_ip6_key(pod.ip6), cookie_key(cookie))
        changed = attach_tc(programs.directory, programs.program_ids["nm_tc_inbound"], pod.netns, pod.interface)
        changed += attach_cgroup(programs.directory, programs.program_ids, pod.cgroup,
                                 tuple(p.name for p in POD_PROGRAMS if p.on == "pod"))
        after = live_state(programs, pod, options)
    except (OSError, CommandError, BpfError) as exc:
        if (what := _pod_gone(pod)) is not None:
            return gone(pod.netns, what)
        _undo(programs, pod)
        raise CaptureError(pod.name, pod.netns, str(exc)) from exc
    if after.status is not CaptureStatus.INSTALLED:
        _undo(programs, pod)
        raise CaptureError(pod.name, pod.netns, f"read back {after.status}: missing {list(after.missing)}, "
                                                f"unexpected {list(after.unexpected)}")
    log.info("mesh capture applied", pod=pod.name, netns=pod.netns, backend="ebpf", was=str(before.status),
             changed=changed)
    return after


def _undo(programs: MeshPrograms, pod: PodTarget) -> None:
    try:
        remove_capture(programs, pod)
    except CaptureError as exc:  # the original failure is what the caller needs to see
        log.error("mesh capture rollback failed", pod=pod.name, reason=str(exc))


def remove_capture(programs: MeshPrograms, pod: PodTarget) -> CaptureState:
    """Detach everything of ours from the pod and forget its configuration; returns `absent`, or
    `netns-missing` when the pod is gone (its configuration is forgotten all the same)."""
    try:
        removed = detach_cgroup(pod.cgroup, CAPTURING)  # first: no new capture from here on
        removed += detach_cgroup(pod.cgroup, tuple(p.name for p in POD_PROGRAMS))
        if netns_present(pod.netns):
            removed += detach_tc(pod.netns, pod.interface)
        ip_key = socket.inet_aton(pod.ip)
        cookies = {c for c in (programs.maps["nm_pod_ips"].lookup(ip_key),) if c is not None}
        if netns_present(pod.netns):
            cookies.add(cookie_key(netns_cookie(pod.netns)))
        for cookie in cookies:
            programs.maps["nm_config"].delete(cookie)
            programs.maps["nm_stats"].delete(cookie)
        programs.maps["nm_pod_ips"].delete(ip_key)
        if pod.ip6:
            programs.maps["nm_pod_ips6"].delete(_ip6_key(pod.ip6))
    except (OSError, CommandError, BpfError) as exc:
        if (what := _pod_gone(pod)) is not None:
            return gone(pod.netns, what)
        raise CaptureError(pod.name, pod.netns, f"removal failed: {exc}") from exc
    after = live_state(programs, pod)
    if after.status not in (CaptureStatus.ABSENT, CaptureStatus.NETNS_MISSING):
        raise CaptureError(pod.name, pod.netns, f"removal read back {after.status}: {list(after.unexpected)}")
    log.info("mesh capture removed", pod=pod.name, netns=pod.netns, backend="ebpf", removed=removed)
    return after


def capture_counters(programs: MeshPrograms, pod: PodTarget) -> dict[str, int]:
    """What the programs counted for the pod's namespace (outbound captured/skipped, inbound assigned/
    dropped, original destinations answered); zeros when nothing was counted."""
    value = programs.maps["nm_stats"].lookup(cookie_key(netns_cookie(pod.netns)))
    return decode_stats(value if value is not None else bytes(STATS.size))


def tunnel_state(programs: MeshPrograms, cgroup: Path) -> CaptureState:
    """The tunnel's original-destination hook on `cgroup` (netns-missing: the cgroup is gone)."""
    if not cgroup.is_dir():
        return gone(str(cgroup), f"cgroup {cgroup}")
    ours = tuple(a for a, _ in on_cgroup(cgroup) if BY_NAME[a.name].on == "tunnel")
    return assess_tunnel(programs.program_ids, ours, cgroup=str(cgroup))


def attach_tunnel(programs: MeshPrograms, cgroup: Path) -> CaptureState:
    """Install the original-destination hook on the tunnel's cgroup (idempotent); returns the state after."""
    if not cgroup.is_dir():
        return gone(str(cgroup), f"cgroup {cgroup}")
    changed = attach_cgroup(programs.directory, programs.program_ids, cgroup, tuple(p.name for p in TUNNEL_PROGRAMS))
    after = tunnel_state(programs, cgroup)
    if after.status is not CaptureStatus.INSTALLED:
        raise BpfError(f"tunnel hook on {cgroup} read back {after.status}: missing {list(after.missing)}, "
                       f"unexpected {list(after.unexpected)}")
    if changed:
        log.info("mesh tunnel hook attached", cgroup=str(cgroup), changed=changed)
    return after


def detach_tunnel(cgroup: Path) -> list[str]:
    """Detach the original-destination hook (every load of it) from `cgroup`; returns what was detached."""
    return detach_cgroup(cgroup, tuple(p.name for p in TUNNEL_PROGRAMS))


