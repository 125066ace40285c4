"""The agent's mesh part: how pods are captured, the control stream to the node tunnel, and the reconciler's
loop, a thread that passes after each new snapshot, periodically, and while a pod waits for the tunnel's
acknowledgement. `start_mesh` wires them: the control server's callbacks go to the loop and the agent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from nodeagent.control.server import ControlServer
from nodeagent.daemon.agent import Agent
from nodeagent.daemon.cni import CniServer
from nodeagent.daemon.errors import StartError
from nodeagent.errors import NodeAgentError
from nodeagent.mesh.ebpf.capture import EbpfCapture
from nodeagent.mesh.ebpf.kubelet import KubeletCgroups
from nodeagent.mesh.iptables.capture import IptablesCapture
from nodeagent.mesh.reconciler import MESH_INPUT_KINDS, MeshReconciler
from nodeagent.state.tracker import Snapshot

log = structlog.get_logger("nodeagent.daemon.mesh")


@dataclass
class MeshLoop:
    """Runs the reconciler on a thread: after each new snapshot, every `period`, and soon again while a
    pod waits for the tunnel's acknowledgement."""

    reconciler: MeshReconciler
    snapshot: Callable[[], Snapshot | None]
    period: float = 10.0  # a full pass at least this often (drift repair)
    poll: float = 0.25
    _stop: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    errors: int = 0
    cni: CniServer | None = None  # nodeagent-cni's socket, stopped with the loop

    def start(self) -> MeshLoop:
        self._thread = threading.Thread(target=self._run, name="mesh", daemon=True)
        self._thread.start()
        return self

    def request(self) -> None:
        """Pass again now (a new snapshot, or the tunnel acknowledged something)."""
        self._wake.set()

    def stop(self) -> None:
        if self.cni is not None:
            self.cni.stop()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        generation, due = -1, 0.0
        while not self._stop.is_set():
            snapshot = self.snapshot()
            woken = self._wake.is_set()
            self._wake.clear()
            if snapshot is not None and snapshot.synced(MESH_INPUT_KINDS) and (
                    woken or snapshot.generation != generation or self.reconciler.waiting()
                    or time.monotonic() >= due):
                try:
                    self.reconciler.sync(snapshot)
                except Exception:  # a bug in one pass must not end the loop; logged with the traceback
                    self.errors += 1
                    log.exception("mesh pass failed", node=self.reconciler.node)
                generation, due = snapshot.generation, time.monotonic() + self.period
            # New snapshots are noticed within the poll; the tunnel's acknowledgements wake it at once.
            self._wake.wait(self.poll)


@dataclass(frozen=True)
class MeshOptions:
    """The mesh flags of `nodeagent run`."""

    control_socket: str = "/run/nodeagent/control.sock"
    netns_dir: Path = Path("/run/netns")
    netns_prefix: str = ""
    tunnel_cgroup: Path | None = None  # where the original-destination hook goes (None: this process's cgroup)
    cni_socket: str | None = None  # nodeagent-cni announces sandboxes here (None: pods are found by scanning)
    # eBPF-mode capture: the cgroup v2 root under which the kubelet makes pods' cgroups (the host's, or a lab
    # node's); None: iptables in every mode
    kubelet_cgroup_root: Path | None = None


def mesh_capture(ebpf_datapath: bool, backend: str, bpf_scope: str, options: MeshOptions
                 ) -> IptablesCapture | EbpfCapture:
    """How pods are captured: eBPF on their cgroups when the datapath is eBPF and their cgroups can be
    found, else iptables in their namespaces (`backend`)."""
    if not ebpf_datapath or options.kubelet_cgroup_root is None:
        return IptablesCapture(backend)
    from nodeagent.kernel.bpf.loader import own_cgroup
    from nodeagent.mesh.ebpf import programs as bpf_mesh

    # Pods are found in the kubelet's layout by UID; `start_mesh` connects the locator to the reconciler,
    # which knows the UIDs.
    locate = KubeletCgroups(options.kubelet_cgroup_root)
    try:
        programs = bpf_mesh.load(bpf_scope)
        return EbpfCapture(programs, locate, backend, options.tunnel_cgroup or own_cgroup())
    except (NodeAgentError, OSError) as exc:
        raise StartError(f"eBPF mesh capture unavailable: {exc}; drop --kubelet-cgroup-root "
                         "to capture with iptables") from exc


def start_mesh(agent: Agent, capture: IptablesCapture | EbpfCapture, options: MeshOptions) -> MeshLoop:
    """The control stream to the node tunnel and the loop that enrolls and captures the agent's node's pods,
    started; the control server's acknowledgements wake the loop, and its inspect calls read the agent."""
    node = agent.options.node_name
    Path(options.control_socket).parent.mkdir(parents=True, exist_ok=True)
    control = ControlServer(node)
    try:
        control.start(options.control_socket)
    except (OSError, RuntimeError) as exc:
        raise StartError(f"control socket {options.control_socket}: {exc}") from exc
    # Transparent connects need the iptables capture's policy routing for the replies (eBPF mode has none).
    reconciler = MeshReconciler(node, control, capture, netns_dir=options.netns_dir,
                                netns_prefix=options.netns_prefix, transparent=isinstance(capture, IptablesCapture))
    loop = MeshLoop(reconciler, agent.tracker.last)
    control.on_ack = loop.request
    if isinstance(capture, EbpfCapture) and isinstance(capture.locate, KubeletCgroups):
        locate = capture.locate
        locate.pod_key = reconciler.cgroup_key  # pods' UIDs, from snapshots and CNI announcements
        if options.tunnel_cgroup is None:
            # The hook goes on the newest tunnel's pod cgroup, found by the UID it gives; an older tunnel's
            # hook stays where it was put (a rollout's old tunnel keeps working until it drains).
            def acked() -> None:
                uids = control.tunnel_pod_uids()
                cgroup = locate.cgroup_of_uid(uids[-1]) if uids else None
                if cgroup is not None and capture.tunnel_cgroup != cgroup:
                    log.info("tunnel hook cgroup", cgroup=str(cgroup), tunnel_pod_uid=uids[-1])
                    capture.tunnel_cgroup = cgroup
                loop.request()

            control.on_ack = acked
    if options.cni_socket is not None:
        try:
            loop.cni = CniServer(reconciler, agent.tracker.last, loop.request).start(options.cni_socket)
        except OSError as exc:
            control.stop()
            raise StartError(f"CNI socket {options.cni_socket}: {exc}") from exc

    def inspect_status(pod: str) -> dict[str, object]:  # for `nodeagent inspect`, over the control socket
        snapshot = agent.tracker.last()
        return {"mode": agent.health.mode, "mode_reason": agent.health.mode_reason, "syncs": agent.syncs,
                "generation": None if snapshot is None else snapshot.generation, "health": agent.health.report()[1],
                "capture": type(capture).__name__, "mesh_states": dict(reconciler.states),
                "captured": dict(reconciler.captured)}

    control.inspect_status = inspect_status
    return loop.start()
