"""The eBPF mesh capture as the agent's mesh reconciler drives a capture (`nodeagent.mesh.reconciler.Capture`: a pod is
named by its network namespace path), and how a pod's cgroup and address are found from that path.

The eBPF capture needs more than the namespace: the pod's cgroup (its programs attach there) and its addresses
(inbound is matched by them). `locate` supplies both: `nodeagent.mesh.ebpf.kubelet.KubeletCgroups` finds the
cgroup in the kubelet's layout by the pod's UID, which the agent's reconciler knows (the lab makes its pods'
cgroups in that layout too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodeagent.kernel.bpf.loader import BpfError
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
from nodeagent.mesh.iptables.apply import CaptureError
from nodeagent.mesh.iptables.render import CaptureOptions

UNLOCATED = "the pod (its namespace, address or cgroup)"


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
