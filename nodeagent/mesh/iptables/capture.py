"""The iptables capture as the mesh reconciler drives it (`nodeagent.mesh.reconciler.Capture`)."""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.mesh.capture import CaptureState
from nodeagent.mesh.iptables.apply import apply_capture, apply_probe_snat, live_state, remove_capture
from nodeagent.mesh.iptables.render import CaptureOptions


@dataclass
class IptablesCapture:
    """The iptables-mode capture (`nodeagent.mesh.iptables`) on one backend."""

    backend: str

    def state(self, netns: str, options: CaptureOptions) -> CaptureState:
        return live_state(netns, options, backend=self.backend)

    def apply(self, netns: str, options: CaptureOptions, pod: str) -> CaptureState:
        return apply_capture(netns, options, backend=self.backend, pod=pod)

    def remove(self, netns: str, pod: str) -> CaptureState:
        return remove_capture(netns, backend=self.backend, pod=pod)

    def probe_snat(self, pod_ips: list[str]) -> None:
        apply_probe_snat(None, pod_ips, backend=self.backend)
