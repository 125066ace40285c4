"""The eBPF mesh capture as the agent's mesh reconciler drives a capture (`nodeagent.mesh.reconciler.Capture`: a pod is
named by its network namespace path), and how a pod's cgroup and address are found from that path.

The eBPF capture needs more than the namespace: the pod's cgroup (its programs attach there) and its address
(inbound is matched by it). `locate` supplies both; `CgroupBesideNetns` is the lab's layout. Kubelet's
layout (`kubepods…/pod<uid>`) needs the pod's UID, which the reconciler knows and the protocol does not
pass; that locator is the agent's to provide.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodeagent.kernel.bpf.loader import BpfError
from nodeagent.kernel.netns import ipv4_address, run_in
from nodeagent.mesh.capture import CaptureState, CaptureStatus
from nodeagent.mesh.ebpf.programs import (
    MeshPrograms,
    PodTarget,
    apply_capture,
    attach_tunnel,
    live_state,
    remove_capture,
    tunnel_state,
)
from nodeagent.mesh.ebpf.state import gone
from nodeagent.mesh.iptables.apply import CaptureError, netns_present
from nodeagent.mesh.iptables.render import CaptureOptions

UNLOCATED = "the pod (its namespace, address or cgroup)"


@dataclass(frozen=True)
class CgroupBesideNetns:
    """Finds a pod whose cgroup is named like its namespace: `<parent>/<namespace name minus prefix>`, as in
    the lab (`/run/netns/<lab>-pod-<ns>.<pod>` beside `<node cgroup>/<ns>.<pod>`)."""

    parent: Path
    netns_prefix: str
    interface: str = "eth0"

    def __call__(self, netns: str, pod: str) -> PodTarget | None:
        """The pod at `netns` (None: not one of ours, or its namespace or address is gone)."""
        name = Path(netns).name
        if not name.startswith(self.netns_prefix) or not netns_present(netns):
            return None
        address = ipv4_address(netns, self.interface)
        if address is None:
            return None
        return PodTarget(pod or name, netns, self.parent / name[len(self.netns_prefix):], address, self.interface,
                         ipv6_address(netns, self.interface))


def ipv6_address(netns: str, interface: str = "eth0") -> str | None:
    """The first global IPv6 address on `interface` inside `netns` (None: none, or gone): the address the pod's
    IPv6 connections leave from, which its capture must not redirect (the pod calling itself)."""
    shown = run_in(netns, ["ip", "-j", "-6", "addr", "show", "dev", interface, "scope", "global"])
    if shown.returncode != 0:
        return None
    return next((str(a["local"]) for link in json.loads(shown.stdout or "[]") for a in link.get("addr_info", [])),
                None)


@dataclass
class EbpfCapture:
    """`nodeagent.mesh.reconciler.Capture` in eBPF mode. The tunnel's hook is kept on `tunnel_cgroup` (checked on every
    apply: a pod is never captured without it); the node's probe SNAT stays the iptables rule of
    `nodeagent.mesh.iptables` on `backend` (kubelet's probes come from the node, not through a pod's cgroup)."""

    programs: MeshPrograms
    locate: Callable[[str, str], PodTarget | None]
    backend: str
    tunnel_cgroup: Path | None = None

    def state(self, netns: str, options: CaptureOptions) -> CaptureState:
        """The pod's capture, named (netns-missing when the pod cannot be located). A pod whose capture is
        complete but whose tunnel lost its hook is drifted: its captured connections would get no original
        destination, and the reconciler repairs drift by applying again."""
        pod = self.locate(netns, "")
        if pod is None:
            return gone(netns, UNLOCATED)
        state = live_state(self.programs, pod, options)
        if state.status is CaptureStatus.INSTALLED and self.tunnel_cgroup is not None:
            hook = tunnel_state(self.programs, self.tunnel_cgroup)
            if hook.status is not CaptureStatus.INSTALLED:
                return dataclasses.replace(state, status=CaptureStatus.DRIFTED, missing=tuple(
                    f"tunnel hook on {self.tunnel_cgroup}: {line}" for line in hook.missing or (str(hook.status),)),
                                           unexpected=hook.unexpected)
        return state

    def apply(self, netns: str, options: CaptureOptions, pod: str) -> CaptureState:
        """Capture the pod, the tunnel's hook first."""
        target = self.locate(netns, pod)
        if target is None:
            return gone(netns, UNLOCATED)
        if self.tunnel_cgroup is not None:
            try:
                attach_tunnel(self.programs, self.tunnel_cgroup)
            except BpfError as exc:
                raise CaptureError(pod, netns, f"the tunnel's original-destination hook: {exc}") from exc
        return apply_capture(self.programs, target, options)

    def remove(self, netns: str, pod: str) -> CaptureState:
        """Release the pod."""
        target = self.locate(netns, pod)
        return gone(netns, UNLOCATED) if target is None else remove_capture(self.programs, target)

    def probe_snat(self, pod_ips: list[str]) -> None:
        """The node's probe SNAT to the probe address, as in iptables mode."""
        from nodeagent.mesh.iptables.apply import apply_probe_snat

        apply_probe_snat(None, pod_ips, backend=self.backend)
