"""The agent's mesh enrollment: for each enrolled pod of this node, in this order, find its network
namespace, assign it to the node tunnel (the control stream), and only once the tunnel acknowledges it
serves the pod, install the pod's capture. A pod leaving the mesh loses its capture first, then its
assignment. So there is never a window in which a pod's traffic is redirected to a listener that does
not exist (istio-cni and ztunnel order it the same way).

State is read back from the kernel, never assumed: after an agent restart a pod whose capture is
installed stays captured (the tunnel kept serving it), a capture left in a pod that is no longer
enrolled is removed, and drift (a rule deleted by hand) is repaired on the next pass. Every pod has a
named state for logs and `inspect`: `waiting-for-tunnel`, `captured`, `netns-missing`, `error: …`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.control.assignments import Assignment
from nodeagent.control.server import ControlServer
from nodeagent.kernel import podnetns
from nodeagent.mesh.annotations import capture_options
from nodeagent.mesh.capture import CaptureState, CaptureStatus
from nodeagent.mesh.iptables.apply import CaptureError
from nodeagent.mesh.iptables.render import CaptureOptions
from nodeagent.state.tracker import Snapshot
from nodeagent.tunnel.state.workloads import Workload, workload_table

log = structlog.get_logger("nodeagent.mesh.reconciler")

WAITING, CAPTURED, NETNS_MISSING = "waiting-for-tunnel", "captured", "netns-missing"
# A pass needs every Pod and Namespace listed: before that, an enrolled pod missing from the snapshot may
# exist, and publishing without it would tell the tunnel to drop it (after an agent restart, every pod).
MESH_INPUT_KINDS = (Kind.POD, Kind.NAMESPACE)


class Capture(Protocol):
    """How a pod's traffic is captured (iptables in the pod's namespace, or eBPF on its cgroup)."""

    def state(self, netns: str, options: CaptureOptions) -> CaptureState: ...
    def apply(self, netns: str, options: CaptureOptions, pod: str) -> CaptureState: ...
    def remove(self, netns: str, pod: str) -> CaptureState: ...
    def probe_snat(self, pod_ips: list[str]) -> None: ...


@dataclass
class MeshReconciler:
    """Keeps assignments and captures of this node's enrolled pods in step with snapshots."""

    node: str
    control: ControlServer
    capture: Capture
    netns_dir: Path = Path("/run/netns")
    netns_prefix: str = ""
    trust_domain: str = "cluster.local"
    transparent: bool = True
    states: dict[str, str] = field(default_factory=dict)  # uid -> named state
    netns_of: dict[str, str] = field(default_factory=dict)  # pod ip -> namespace path
    captured: dict[str, str] = field(default_factory=dict)  # uid -> namespace path holding our capture
    _started: bool = False

    def sync(self, snapshot: Snapshot) -> None:
        """One pass: assignments, capture of served pods, release of departed ones, probe SNAT."""
        table = workload_table(snapshot, self.node, self.trust_domain)
        local = {w.name: w for w in table.local.values()}
        self._locate([w.ip for w in local.values()])
        if not self._started:  # reconstruct: a capture left in a pod that is no longer enrolled goes
            self._started = True
            self._release_leftovers(snapshot, set(local))
        desired: dict[str, Assignment] = {}
        for uid, workload in sorted(local.items()):
            netns = self.netns_of.get(workload.ip)
            if netns is None:
                self._state(uid, f"{NETNS_MISSING}: no namespace under {self.netns_dir} holds {workload.ip}")
                continue
            desired[uid] = Assignment(uid, workload.ip, workload.identity.namespace,
                                      workload.identity.service_account, netns, self.transparent)
        for uid in [uid for uid in self.captured if uid not in desired or desired[uid].netns != self.captured[uid]]:
            self._release(uid, self.captured.pop(uid))  # capture off before the tunnel lets the pod go
        for uid in [uid for uid in self.states if uid not in local]:
            del self.states[uid]
        self.control.publish(desired)
        for uid, assignment in desired.items():
            self._capture_if_served(uid, assignment, local[uid], snapshot)
        try:
            self.capture.probe_snat(sorted(desired[uid].ip for uid in self.captured if uid in desired))
        except Exception as exc:  # the probe SNAT failing must not undo pods' captures
            log.warning("probe SNAT not applied", node=self.node, reason=str(exc))

    def waiting(self) -> bool:
        """Whether some pod waits for the tunnel (the caller then passes again soon)."""
        return any(state == WAITING for state in self.states.values())

    def _locate(self, ips: list[str]) -> None:
        missing = [ip for ip in ips if ip not in self.netns_of or not Path(self.netns_of[ip]).exists()]
        if missing:
            self.netns_of.update(podnetns.locate(missing, self.netns_dir, self.netns_prefix))

    def _capture_if_served(self, uid: str, assignment: Assignment, workload: Workload, snapshot: Snapshot) -> None:
        if not self.control.served(assignment):
            if uid not in self.captured:
                self._state(uid, WAITING)
            return
        namespace, _, name = uid.partition("/")
        pod = snapshot.pods.get(ObjectRef(Kind.POD, namespace, name))
        options, rejected = capture_options(uid, pod.annotations if pod is not None else {})
        for rejection in rejected:
            log.warning("capture annotation ignored", pod=uid, rejection=str(rejection))
        try:
            state = self.capture.state(assignment.netns, options)
            if state.status is not CaptureStatus.INSTALLED:
                if uid in self.captured:
                    log.warning("capture drifted, repairing", pod=uid, status=str(state.status),
                                missing=len(state.missing), unexpected=len(state.unexpected))
                state = self.capture.apply(assignment.netns, options, uid)
        except CaptureError as exc:
            self.captured.pop(uid, None)
            self._state(uid, f"error: {exc}")
            return
        if state.status is CaptureStatus.NETNS_MISSING:
            self.captured.pop(uid, None)
            self.netns_of.pop(workload.ip, None)
            self._state(uid, f"{NETNS_MISSING}: {assignment.netns} vanished")
            return
        self.captured[uid] = assignment.netns
        self._state(uid, CAPTURED)

    def _release(self, uid: str, netns: str) -> None:
        try:
            self.capture.remove(netns, uid)
            log.info("capture removed", pod=uid, netns=netns)
        except CaptureError as exc:
            log.warning("capture removal failed", pod=uid, netns=netns, reason=str(exc))

    def _release_leftovers(self, snapshot: Snapshot, enrolled: set[str]) -> None:
        others = {p.ref.key: p for p in snapshot.pods.values() if p.node_name == self.node and p.ips
                  and not p.host_network and p.ref.key not in enrolled}
        found = podnetns.locate([str(p.ips[0]) for p in others.values()], self.netns_dir, self.netns_prefix)
        for uid, pod in others.items():
            netns = found.get(str(pod.ips[0]))
            if netns is not None and self.capture.state(netns, CaptureOptions()).status is not CaptureStatus.ABSENT:
                log.info("capture left from an earlier run, removing", pod=uid, netns=netns)
                self._release(uid, netns)

    def _state(self, uid: str, state: str) -> None:
        if self.states.get(uid) != state:
            log.info("mesh pod state", pod=uid, state=state)
            self.states[uid] = state
