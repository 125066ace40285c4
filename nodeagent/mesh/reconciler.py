"""The agent's mesh enrollment: for each enrolled pod of this node, in this order, find its network
namespace, assign it to the node tunnel (the control stream), and only once the tunnel acknowledges it
serves the pod, install the pod's capture. A pod leaving the mesh loses its capture first, then its
assignment. So there is never a window in which a pod's traffic is redirected to a listener that does
not exist (istio-cni and ztunnel order it the same way).

State is read back from the kernel, never assumed: after an agent restart a pod whose capture is
installed stays captured (the tunnel kept serving it), a capture left in a pod that is no longer
enrolled is removed, and drift (a rule deleted by hand) is repaired on the next pass. Every pod has a
named state for logs and `inspect` (`MeshPodStatus`): `waiting-for-tunnel`, `captured`, `netns-missing: …`,
`error: …`. Pods are keyed by `PodKey`; its `namespace/name` form is their uid on the control stream.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import structlog

from nodeagent.cluster.enrollment import Enrollment
from nodeagent.cluster.model import Kind, PodKey
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

# A pass needs every Pod and Namespace listed: before that, an enrolled pod missing from the snapshot may
# exist, and publishing without it would tell the tunnel to drop it (after an agent restart, every pod).
MESH_INPUT_KINDS = (Kind.POD, Kind.NAMESPACE)
SANDBOX_TTL = 600.0  # an announced sandbox whose pod the agent never sees is forgotten after this


class MeshPodState(StrEnum):
    """Where an enrolled pod of this node stands (its value is the word logs and `inspect` show)."""

    WAITING_FOR_TUNNEL = "waiting-for-tunnel"  # assigned; the tunnel has not acknowledged serving it yet
    CAPTURED = "captured"  # served by the tunnel, capture installed
    NETNS_MISSING = "netns-missing"  # no network namespace holds its IP (not yet created, or gone)
    ERROR = "error"  # the capture could not be read or installed


@dataclass(frozen=True, slots=True)
class MeshPodStatus:
    """A pod's state and what about it (the namespace that is missing, the error)."""

    state: MeshPodState
    detail: str = ""

    @property
    def text(self) -> str:
        """`state` or `state: detail`, the form on the control socket and in logs."""
        return f"{self.state}: {self.detail}" if self.detail else str(self.state)

    def __str__(self) -> str:
        return self.text


WAITING = MeshPodStatus(MeshPodState.WAITING_FOR_TUNNEL)
CAPTURED = MeshPodStatus(MeshPodState.CAPTURED)


@dataclass(frozen=True, slots=True)
class Sandbox:
    """A pod's sandbox as the CNI plugin announced it at creation: the addresses the network plugin gave it
    and its network namespace (the runtime's path), before the kubelet publishes the pod's IPs."""

    ips: tuple[str, ...]
    netns: str
    container_id: str = ""
    uid: str = ""  # the pod's UID (K8S_POD_UID): names its cgroup before the agent's watch has the pod
    at: float = field(default_factory=time.monotonic)  # when it was announced


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
    states: dict[PodKey, MeshPodStatus] = field(default_factory=dict)
    netns_of: dict[str, str] = field(default_factory=dict)  # pod ip -> namespace path
    captured: dict[PodKey, str] = field(default_factory=dict)  # pod -> namespace path holding our capture
    _started: bool = False
    # Announced by the CNI plugin (another thread writes it: replaced whole, read as a copy)
    sandboxes: dict[PodKey, Sandbox] = field(default_factory=dict)
    decisions: dict[str, Enrollment] = field(default_factory=dict)  # this node's pods, as of the last pass
    decided_generation: int = -1  # the snapshot generation of the last pass
    pass_started: float = -1.0  # when the last complete pass began (time.monotonic)
    # pod key and namespace path -> (UID, QoS class) of this node's pods: how a capture on kubelet's cgroups
    # finds a pod's cgroup (replaced whole each pass; read from the capture's calls)
    cgroup_keys: dict[str, tuple[str, str]] = field(default_factory=dict)

    def cgroup_key(self, netns: str, pod: str) -> tuple[str, str] | None:
        """(UID, QoS class) of the pod named `pod`, else of the one in `netns`; None when not known."""
        keys = self.cgroup_keys
        return keys.get(pod) if pod else keys.get(netns)

    def announce(self, pod: PodKey, sandbox: Sandbox) -> None:
        """The CNI plugin created `pod`'s sandbox: use its namespace and addresses from the next pass on."""
        self.sandboxes = {**self.sandboxes, pod: sandbox}

    def forget(self, pod: PodKey, container_id: str = "") -> None:
        """The sandbox was deleted (CNI DEL); a newer sandbox of the same pod (another container id) stays."""
        current = self.sandboxes.get(pod)
        if current is not None and (not container_id or current.container_id in ("", container_id)):
            self.sandboxes = {k: v for k, v in self.sandboxes.items() if k != pod}

    def _record_cgroup_keys(self, snapshot: Snapshot) -> None:
        """Every local pod's UID and QoS class by its key and by its namespace path (enrolled or not: a pod
        leaving the mesh is released through the same lookup); an announced sandbox's UID stands in until
        the agent's watch has the pod."""
        keys: dict[str, tuple[str, str]] = {}
        sandboxes = self.sandboxes
        for pod, sandbox in sandboxes.items():
            if sandbox.uid:
                keys[str(pod)] = (sandbox.uid, "")
                if sandbox.netns:
                    keys[sandbox.netns] = (sandbox.uid, "")
        for obj in snapshot.pods.values():
            if obj.node_name != self.node or not obj.uid:
                continue
            key = (obj.uid, obj.qos_class)
            keys[f"{obj.ref.namespace}/{obj.ref.name}"] = key
            for ip in obj.ips:
                netns = self.netns_of.get(str(ip))
                if netns is not None:
                    keys[netns] = key
        self.cgroup_keys = keys

    def _prune_sandboxes(self, snapshot: Snapshot) -> None:
        """Drop announcements whose pod the snapshot does not hold SANDBOX_TTL after they came: the runtime's
        DEL normally forgets them, but a DEL sent while the agent was down never arrives. (A pod missing for
        less than that is one the agent's watch has not caught up with.)"""
        known = {PodKey(ref.namespace, ref.name) for ref in snapshot.pods}
        now = time.monotonic()
        stale = [pod for pod, sandbox in self.sandboxes.items() if pod not in known and now - sandbox.at > SANDBOX_TTL]
        if stale:
            self.sandboxes = {pod: s for pod, s in self.sandboxes.items() if pod not in stale}

    def _with_sandboxes(self, snapshot: Snapshot) -> Snapshot:
        """The snapshot with announced sandboxes' addresses on pods the kubelet has not given IPs yet, and the
        announced namespaces known for those addresses (no scan needed)."""
        sandboxes = self.sandboxes
        if not sandboxes:
            return snapshot
        for sandbox in sandboxes.values():
            for ip in sandbox.ips:
                if sandbox.netns:
                    self.netns_of[ip] = sandbox.netns
        pods = None
        for pod, sandbox in sandboxes.items():
            ref = pod.ref
            obj = snapshot.pods.get(ref)
            if obj is not None and not obj.ips and sandbox.ips and obj.node_name == self.node:
                pods = pods if pods is not None else dict(snapshot.pods)
                pods[ref] = dataclasses.replace(obj, ips=tuple(ipaddress.ip_address(ip) for ip in sandbox.ips))
        return snapshot if pods is None else dataclasses.replace(snapshot, pods=pods)

    def sync(self, snapshot: Snapshot) -> None:
        """One pass: assignments, capture of served pods, release of departed ones, probe SNAT."""
        started = time.monotonic()
        snapshot = self._with_sandboxes(snapshot)
        table = workload_table(snapshot, self.node, self.trust_domain)
        local = table.local_pods
        self._locate([w.ip for w in local.values()])
        if not self._started:  # reconstruct: a capture left in a pod that is no longer enrolled goes
            self._started = True
            self._release_leftovers(snapshot, set(local))
        desired: dict[PodKey, Assignment] = {}
        for pod, workload in sorted(local.items()):
            netns = self.netns_of.get(workload.ip)
            if netns is None:
                self._state(pod, MeshPodStatus(MeshPodState.NETNS_MISSING,
                                               f"no namespace under {self.netns_dir} holds {workload.ip}"))
                continue
            desired[pod] = Assignment.of(pod, workload.ip, workload.identity.service_account, netns, self.transparent)
        self._record_cgroup_keys(snapshot)
        for pod in [pod for pod in self.captured if pod not in desired or desired[pod].netns != self.captured[pod]]:
            self._release(pod, self.captured.pop(pod))  # capture off before the tunnel lets the pod go
        for pod in [pod for pod in self.states if pod not in local]:
            del self.states[pod]
        self._prune_sandboxes(snapshot)
        self.control.publish({a.uid: a for a in desired.values()})
        for pod, assignment in desired.items():
            self._capture_if_served(pod, assignment, local[pod], snapshot)
        try:
            # every address of each captured pod: kubelet probes a pod at its primary IP, which is the IPv6 one
            # in an IPv6-only or IPv6-primary cluster
            self.capture.probe_snat(sorted({ip for pod in self.captured if pod in desired
                                            for ip in (local[pod].ips or (local[pod].ip,))}))
        except Exception as exc:  # the probe SNAT failing must not undo pods' captures
            log.warning("probe SNAT not applied", node=self.node, reason=str(exc))
        self.decisions, self.decided_generation = dict(table.decisions), snapshot.generation
        self.pass_started = started

    def waiting(self) -> bool:
        """Whether some pod waits for the tunnel (the caller then passes again soon)."""
        return any(status.state is MeshPodState.WAITING_FOR_TUNNEL for status in self.states.values())

    def _locate(self, ips: list[str]) -> None:
        missing = [ip for ip in ips if ip not in self.netns_of or not Path(self.netns_of[ip]).exists()]
        if missing:
            self.netns_of.update(podnetns.locate(missing, self.netns_dir, self.netns_prefix))

    def _capture_if_served(self, pod: PodKey, assignment: Assignment, workload: Workload,
                           snapshot: Snapshot) -> None:
        if not self.control.served(assignment):
            if pod not in self.captured:
                self._state(pod, WAITING)
            return
        uid = str(pod)
        obj = snapshot.pods.get(pod.ref)
        options, rejected = capture_options(uid, obj.annotations if obj is not None else {})
        for rejection in rejected:
            log.warning("capture annotation ignored", pod=uid, rejection=str(rejection))
        try:
            state = self.capture.state(assignment.netns, options)
            if state.status is not CaptureStatus.INSTALLED:
                if pod in self.captured:
                    log.warning("capture drifted, repairing", pod=uid, status=str(state.status),
                                missing=len(state.missing), unexpected=len(state.unexpected))
                state = self.capture.apply(assignment.netns, options, uid)
        except CaptureError as exc:
            self.captured.pop(pod, None)
            self._state(pod, MeshPodStatus(MeshPodState.ERROR, str(exc)))
            return
        if state.status is CaptureStatus.NETNS_MISSING:
            self.captured.pop(pod, None)
            self.netns_of.pop(workload.ip, None)
            self._state(pod, MeshPodStatus(MeshPodState.NETNS_MISSING, f"{assignment.netns} vanished"))
            return
        self.captured[pod] = assignment.netns
        self._state(pod, CAPTURED)

    def _release(self, pod: PodKey, netns: str) -> None:
        try:
            self.capture.remove(netns, str(pod))
            log.info("capture removed", pod=str(pod), netns=netns)
        except CaptureError as exc:
            log.warning("capture removal failed", pod=str(pod), netns=netns, reason=str(exc))

    def _release_leftovers(self, snapshot: Snapshot, enrolled: set[PodKey]) -> None:
        others = {PodKey.of(p.ref): p for p in snapshot.pods.values() if p.node_name == self.node and p.ips
                  and not p.host_network and PodKey.of(p.ref) not in enrolled}
        found = podnetns.locate([str(p.ips[0]) for p in others.values()], self.netns_dir, self.netns_prefix)
        for key, obj in others.items():
            netns = found.get(str(obj.ips[0]))
            if netns is not None and self.capture.state(netns, CaptureOptions()).status is not CaptureStatus.ABSENT:
                log.info("capture left from an earlier run, removing", pod=str(key), netns=netns)
                self._release(key, netns)

    def _state(self, pod: PodKey, status: MeshPodStatus) -> None:
        if self.states.get(pod) != status:
            log.info("mesh pod state", pod=str(pod), state=status.text)
            self.states[pod] = status
