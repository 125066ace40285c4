"""The agent's side of nodeagent-cni (no root): a sandbox announced at creation is assigned to the tunnel
with the runtime's namespace and the network plugin's addresses before the kubelet publishes the pod's IP,
ADD is answered only once the pod is captured (or known not to be enrolled), and bad requests are refused
naming the field. The plugin used is the real one, over the real socket."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cluster.model import Kind, PodKey
from nodeagent.cni import plugin
from nodeagent.control.assignments import Assignment
from nodeagent.control.server import ControlServer
from nodeagent.daemon.cni import BadRequest, CniServer, sandbox_of
from nodeagent.mesh.capture import CaptureState, CaptureStatus
from nodeagent.mesh.iptables.render import CaptureOptions
from nodeagent.mesh.reconciler import MeshPodState, MeshReconciler, Sandbox
from nodeagent.state.tracker import ChangeTracker, Snapshot
from tests.support import objects as k8s
from tests.support.control_tunnel import Tunnel
from tests.support.events import listed

NETNS = "/var/run/netns/cni-0f1e"


class RecordingCapture:
    """Installs nothing; says every capture is in place once applied."""

    def __init__(self) -> None:
        self.applied: list[str] = []

    def state(self, netns: str, options: CaptureOptions) -> CaptureState:
        return CaptureState(CaptureStatus.INSTALLED if netns in self.applied else CaptureStatus.ABSENT, netns, "test")

    def apply(self, netns: str, options: CaptureOptions, pod: str) -> CaptureState:
        self.applied.append(netns)
        return CaptureState(CaptureStatus.INSTALLED, netns, "test")

    def remove(self, netns: str, pod: str) -> CaptureState:
        return CaptureState(CaptureStatus.ABSENT, netns, "test")

    def probe_snat(self, pod_ips: list[str]) -> None:
        pass


def pending_pod(name: str, namespace: str = "shop") -> dict[str, Any]:
    """A pod bound to node1 whose sandbox is being created: no IP in its status yet."""
    pod = k8s.pod(name, "0.0.0.0", namespace=namespace)
    pod["status"] = {"phase": "Pending"}
    return pod


def snapshot_with(*pods: dict[str, Any], enrolled: bool = True) -> Snapshot:
    tracker = ChangeTracker("node1")
    tracker.apply(listed(Kind.POD, list(pods)))
    labels = {"nodeagent.io/mesh": "enabled"} if enrolled else {}
    tracker.apply(listed(Kind.NAMESPACE, [k8s.namespace("shop", **labels)]))
    snapshot = tracker.snapshot()
    assert snapshot is not None
    return snapshot


def reconciler(tmp_path: Path, capture: RecordingCapture | None = None) -> MeshReconciler:
    (tmp_path / "netns").mkdir(exist_ok=True)
    return MeshReconciler("node1", ControlServer("node1"), capture or RecordingCapture(), netns_dir=tmp_path / "netns",
                          _started=True)


def test_an_announced_sandbox_is_assigned_before_the_kubelet_publishes_the_pods_ip(tmp_path: Path) -> None:
    mesh = reconciler(tmp_path)
    snapshot = snapshot_with(pending_pod("web-0"))
    mesh.sync(snapshot)
    assert mesh.control._log.current == {}, "without an IP and without the plugin, the pod waits"
    mesh.announce(PodKey("shop", "web-0"), Sandbox(("10.244.1.9",), NETNS, "abc"))
    mesh.sync(snapshot)
    assert mesh.control._log.current == {"shop/web-0": Assignment("shop/web-0", "10.244.1.9", "shop", "default",
                                                                  NETNS, transparent=True)}
    assert mesh.states[PodKey("shop", "web-0")].state is MeshPodState.WAITING_FOR_TUNNEL
    # DEL of another sandbox of the pod leaves this one; DEL of this one forgets it.
    mesh.forget(PodKey("shop", "web-0"), "other")
    assert PodKey("shop", "web-0") in mesh.sandboxes
    mesh.forget(PodKey("shop", "web-0"), "abc")
    assert not mesh.sandboxes


@pytest.mark.parametrize(("body", "field"), [
    ([], "body"), ({"podName": "a"}, "podNamespace"), ({"podNamespace": "a"}, "podName"),
    ({"podNamespace": "a", "podName": "b", "netns": "relative"}, "netns"),
    ({"podNamespace": "a", "podName": "b", "ips": "10.0.0.1"}, "ips"),
    ({"podNamespace": "a", "podName": "b", "ips": ["10.0.0.300"]}, "ips"),
])
def test_a_malformed_announcement_is_refused_naming_the_field(body: object, field: str) -> None:
    with pytest.raises(BadRequest, match=f"^{field}"):
        sandbox_of(body)


class Agent:
    """A reconciler behind a started CniServer, passes run on a thread as the mesh loop does; the tunnel's
    acknowledgement is given by the test."""

    def __init__(self, tmp_path: Path, snapshot: Snapshot, add_wait: float = 5.0) -> None:
        self.tmp_path = tmp_path
        self.tunnel: Tunnel | None = None
        self.capture = RecordingCapture()
        self.mesh = reconciler(tmp_path, self.capture)
        self.snapshot = snapshot
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.socket = str(tmp_path / "cni.sock")
        self.server = CniServer(self.mesh, lambda: self.snapshot, self.wake.set, add_wait=add_wait).start(self.socket)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.mesh.sync(self.snapshot)
            self.wake.wait(0.02)
            self.wake.clear()

    def serve_everything(self) -> None:
        """A tunnel on the control stream that serves every pod it is assigned."""
        control_socket = str(self.tmp_path / "control.sock")
        self.mesh.control.start(control_socket)
        self.tunnel = Tunnel(control_socket)
        self.tunnel.serve_everything()

    def close(self) -> None:
        self.stop.set()
        self.server.stop()
        self.thread.join(timeout=5)
        if self.tunnel is not None:
            self.tunnel.close()
            self.mesh.control.stop()


def add(socket: str, namespace: str, name: str, ip: str = "10.244.1.9", timeout: float = 10) -> tuple[int, Any]:
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "nodeagent-cni",
                        "agentSocket": socket, "timeoutSeconds": timeout,
                        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": f"{ip}/24"}]}})
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0",
               "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"}
    return plugin.run(stdin, environ, io.StringIO())


def test_add_returns_once_the_pod_is_captured_in_the_announced_namespace(tmp_path: Path) -> None:
    agent = Agent(tmp_path, snapshot_with(pending_pod("web-0")))
    try:
        agent.serve_everything()
        code, out = add(agent.socket, "shop", "web-0")
        assert code == 0, out
        assert agent.capture.applied == [NETNS], "captured in the sandbox's namespace before ADD returned"
    finally:
        agent.close()


def test_add_of_a_pod_outside_the_mesh_is_answered_at_once(tmp_path: Path) -> None:
    agent = Agent(tmp_path, snapshot_with(pending_pod("web-0"), enrolled=False))
    try:
        started = time.monotonic()
        code, _ = add(agent.socket, "shop", "web-0")
        assert code == 0 and time.monotonic() - started < 2
        assert agent.capture.applied == []
    finally:
        agent.close()


def test_add_fails_when_the_tunnel_never_serves_the_pod(tmp_path: Path) -> None:
    agent = Agent(tmp_path, snapshot_with(pending_pod("web-0")), add_wait=0.5)
    try:
        code, out = add(agent.socket, "shop", "web-0")
        assert code == 1 and out["code"] == plugin.TRY_AGAIN_LATER and "waiting-for-tunnel" in out["msg"]
    finally:
        agent.close()


def test_add_waits_for_a_pod_the_agents_watch_has_not_delivered_yet(tmp_path: Path) -> None:
    agent = Agent(tmp_path, snapshot_with())  # the pod is not in the agent's snapshot yet
    try:
        agent.serve_everything()
        result: list[tuple[int, Any]] = []
        thread = threading.Thread(target=lambda: result.append(add(agent.socket, "shop", "web-0")))
        thread.start()
        thread.join(0.3)
        assert not result, "answered before the agent knew the pod"
        agent.snapshot = snapshot_with(pending_pod("web-0"))  # the watch catches up
        thread.join(10)
        assert result and result[0][0] == 0, result
    finally:
        agent.close()


def test_the_socket_is_the_owners_only_and_answers_status(tmp_path: Path) -> None:
    agent = Agent(tmp_path, snapshot_with())
    try:
        assert Path(agent.socket).stat().st_mode & 0o777 == 0o600
        status, answer = plugin.ask_agent(agent.socket, "/v1/cni/status", None, 5)
        assert (status, answer) == (200, {"ready": True})
        status, answer = plugin.ask_agent(agent.socket, "/v1/cni/add", {"podName": "x"}, 5)
        assert status == 400 and answer["reason"].startswith("podNamespace")
    finally:
        agent.close()


def test_the_reconciler_knows_each_local_pods_cgroup_key_from_the_api_and_from_the_plugin(tmp_path: Path) -> None:
    """What a capture on kubelet's cgroups asks: a pod's UID and QoS class, by its key or its namespace."""
    running = k8s.pod("db-0", "10.244.1.5")
    running["metadata"]["uid"] = "uid-db"
    running["status"]["qosClass"] = "Guaranteed"
    mesh = reconciler(tmp_path)
    mesh.netns_of["10.244.1.5"] = "/run/netns/db"
    mesh.announce(PodKey("shop", "web-0"), Sandbox(("10.244.1.9",), NETNS, "abc", "uid-web"))
    mesh.sync(snapshot_with(running, pending_pod("web-0")))
    assert mesh.cgroup_key("", "shop/db-0") == ("uid-db", "Guaranteed")
    assert mesh.cgroup_key("/run/netns/db", "") == ("uid-db", "Guaranteed")
    assert mesh.cgroup_key(NETNS, "") == ("uid-web", "")
    assert mesh.cgroup_key("", "shop/nobody") is None
