"""The control stream's ordering rules (no root): nothing reaches a tunnel before the agent's first complete
pass, the socket is never connectable by others, and the mesh pass waits for Pods and Namespaces.

The bug these guard against: a tunnel that reconnects to a just-restarted agent was sent the agent's empty
initial set as a full state and dropped every pod it served.
"""

from __future__ import annotations

import json
import os
import queue
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from nodeagent.cluster.model import Kind, PodKey
from nodeagent.control.api import control_pb2, control_pb2_grpc
from nodeagent.control.assignments import Assignment
from nodeagent.control.server import ControlServer
from nodeagent.daemon.mesh import MeshLoop
from nodeagent.mesh.capture import CaptureState
from nodeagent.mesh.iptables.render import CaptureOptions
from nodeagent.mesh.reconciler import MeshPodState, MeshPodStatus, MeshReconciler
from nodeagent.state.tracker import ChangeTracker, Snapshot
from tests.support import objects as k8s
from tests.support.events import listed

POD = Assignment("demo/echo-0", "10.244.1.2", "demo", "echo", "/run/netns/echo-0")


class _Tunnel:
    """A tunnel's end of the stream, on its own thread: every update received goes to `updates`."""

    def __init__(self, socket_path: str) -> None:
        self.updates: queue.Queue[control_pb2.TunnelUpdate] = queue.Queue()
        self._close = threading.Event()
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _acks(self) -> Iterator[control_pb2.TunnelAck]:
        self._close.wait()  # a generator: grpc reads it on its own thread, so the call starts at once
        yield from ()

    def _run(self) -> None:
        try:
            for update in control_pb2_grpc.TunnelControlStub(self._channel).Connect(self._acks()):
                self.updates.put(update)
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self._close.set()
        self._channel.close()
        self._thread.join(timeout=5)


def test_a_tunnel_gets_no_full_state_before_the_agent_has_published(tmp_path: Path) -> None:
    server = ControlServer("node1").start(str(tmp_path / "control.sock"))
    tunnel = _Tunnel(str(tmp_path / "control.sock"))
    try:
        # Connected, and the agent has decided nothing yet: an empty "full state" now would make the
        # tunnel drop every pod it serves, so the stream must stay silent.
        deadline = time.monotonic() + 5
        while not server.connected:
            assert time.monotonic() < deadline, "the tunnel never connected"
            time.sleep(0.01)  # polling a condition with a deadline
        assert tunnel.updates.empty()
        try:
            early = tunnel.updates.get(timeout=0.5)
        except queue.Empty:
            early = None
        assert early is None, f"a full state was sent before the first publish: {early}"
        server.publish({POD.uid: POD})
        update = tunnel.updates.get(timeout=5)
        assert update.full_state and [a.uid for a in update.add] == [POD.uid]
    finally:
        tunnel.close()
        server.stop()


def test_an_empty_first_publish_is_sent_as_the_truth(tmp_path: Path) -> None:
    """A node that really has no enrolled pod says so (the tunnel then serves none)."""
    server = ControlServer("node1").start(str(tmp_path / "control.sock"))
    tunnel = _Tunnel(str(tmp_path / "control.sock"))
    try:
        server.publish({})
        update = tunnel.updates.get(timeout=5)
        assert update.full_state and not update.add
    finally:
        tunnel.close()
        server.stop()


def test_the_socket_is_0600_and_nothing_is_left_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("stale")  # a socket left by an earlier run is replaced
    server = ControlServer("node1").start(str(path))
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["control.sock"]
    finally:
        server.stop()
    assert not any(p.name.startswith(".control-") for p in tmp_path.iterdir())
    assert os.access(tmp_path, os.W_OK)


class _CountingReconciler(MeshReconciler):
    def __init__(self) -> None:
        self.node, self.passes = "node1", 0

    def sync(self, snapshot: Snapshot) -> None:
        self.passes += 1

    def waiting(self) -> bool:
        return False


def test_the_mesh_pass_waits_until_pods_and_namespaces_are_listed() -> None:
    tracker = ChangeTracker("node1")
    for kind in (Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.NODE, Kind.NAMESPACE):
        tracker.apply(listed(kind, []))
    tracker.snapshot()
    reconciler = _CountingReconciler()
    loop = MeshLoop(reconciler, tracker.last, poll=0.01).start()
    try:
        loop.request()
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # a bounded look for something that must not happen
            assert reconciler.passes == 0, "a mesh pass ran before Pods were listed"
            time.sleep(0.01)
        tracker.apply(listed(Kind.POD, []))
        tracker.snapshot()
        deadline = time.monotonic() + 5
        while reconciler.passes == 0:
            assert time.monotonic() < deadline, "no mesh pass once Pods and Namespaces were listed"
            time.sleep(0.01)  # polling a condition with a deadline
    finally:
        loop.stop()


def test_inspect_writes_pod_keys_and_mesh_states_as_the_strings_on_the_wire_today() -> None:
    server = ControlServer("node1")
    states = {PodKey("demo", "a"): MeshPodStatus(MeshPodState.CAPTURED),
              PodKey("demo", "b"): MeshPodStatus(MeshPodState.WAITING_FOR_TUNNEL),
              PodKey("demo", "c"): MeshPodStatus(MeshPodState.NETNS_MISSING, "/run/netns/c vanished"),
              PodKey("demo", "d"): MeshPodStatus(MeshPodState.ERROR, "iptables-restore failed")}
    server.inspect_status = lambda pod: {"mesh_states": dict(states), "captured": {PodKey("demo", "a"): "/ns/a"}}
    reply = json.loads(server.Inspect(control_pb2.InspectRequest(pod="demo/a"), None).json)  # type: ignore[arg-type]
    assert reply["mesh_states"] == {"demo/a": "captured", "demo/b": "waiting-for-tunnel",
                                    "demo/c": "netns-missing: /run/netns/c vanished",
                                    "demo/d": "error: iptables-restore failed"}
    assert reply["captured"] == {"demo/a": "/ns/a"}


def test_an_assignment_names_its_pod_by_key_and_sends_namespace_slash_name() -> None:
    assert Assignment.of(PodKey("demo", "echo-0"), "10.244.1.2", "echo", "/run/netns/echo-0") == POD
    assert POD.pod == PodKey("demo", "echo-0")


class _NoCapture:
    """A capture that must not be touched: no pod here is served, so none is captured."""

    def state(self, netns: str, options: CaptureOptions) -> CaptureState:
        raise AssertionError("no capture is read before the tunnel serves the pod")

    def apply(self, netns: str, options: CaptureOptions, pod: str) -> CaptureState:
        raise AssertionError("no capture is installed before the tunnel serves the pod")

    def remove(self, netns: str, pod: str) -> CaptureState:
        raise AssertionError("nothing was captured")

    def probe_snat(self, pod_ips: list[str]) -> None:
        pass


def test_a_pass_names_each_pods_state_by_key_and_publishes_namespace_slash_name_uids(tmp_path: Path) -> None:
    tracker = ChangeTracker("node1")
    tracker.apply(listed(Kind.POD, [k8s.pod("a", "10.244.1.2"), k8s.pod("b", "10.244.1.3")]))
    tracker.apply(listed(Kind.NAMESPACE, [k8s.namespace("shop", **{"nodeagent.io/mesh": "enabled"})]))
    snapshot = tracker.snapshot()
    assert snapshot is not None
    netns_a = tmp_path / "pod-a"
    netns_a.touch()  # found before: the pass only checks that the path still exists
    server = ControlServer("node1")
    reconciler = MeshReconciler("node1", server, _NoCapture(), netns_dir=tmp_path / "empty",
                                netns_of={"10.244.1.2": str(netns_a)}, _started=True)
    (tmp_path / "empty").mkdir()
    reconciler.sync(snapshot)
    assert reconciler.states == {
        PodKey("shop", "a"): MeshPodStatus(MeshPodState.WAITING_FOR_TUNNEL),
        PodKey("shop", "b"): MeshPodStatus(MeshPodState.NETNS_MISSING,
                                           f"no namespace under {tmp_path / 'empty'} holds 10.244.1.3")}
    assert str(reconciler.states[PodKey("shop", "b")]).startswith("netns-missing: no namespace under ")
    assert reconciler.waiting()
    assert server._log.current == {"shop/a": Assignment("shop/a", "10.244.1.2", "shop", "default", str(netns_a),
                                                            transparent=True)}
