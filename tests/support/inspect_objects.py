"""A small cluster's objects and its snapshot, shared by the inspect and trace tests."""

from __future__ import annotations

from typing import Any

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Upserted
from nodeagent.cluster.model import Kind
from nodeagent.state.tracker import ChangeTracker, Snapshot
from tests.support import objects as k8s

OBJECTS: list[dict[str, Any]] = [
    k8s.node("node1", "172.18.0.2", "10.244.1.0/24"), k8s.node("node2", "172.18.0.3", "10.244.2.0/24"),
    k8s.namespace("shop", **{"nodeagent.io/mesh": "enabled"}),
    k8s.pod("client", "10.244.1.5", "node1", app="client"),
    k8s.pod("web-1", "10.244.1.2", "node1", app="web"), k8s.pod("web-2", "10.244.2.2", "node2", app="web"),
    k8s.service("web", ports=[{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
                                "nodePort": 30080}], type="NodePort"),
    k8s.endpoint_slice("web-a", "web", [k8s.endpoint("10.244.1.2", "node1", pod="web-1"),
                                        k8s.endpoint("10.244.2.2", "node2", pod="web-2")]),
    k8s.service("empty", cluster_ip="10.96.0.20"),
]


def snapshot(objects: list[dict[str, Any]] = OBJECTS) -> Snapshot:
    tracker = ChangeTracker("node1")
    tracker.apply_all([Upserted(Kind(o["kind"]), object_ref(o), decode(o), "") for o in objects])
    state = tracker.snapshot()
    assert state is not None
    return state
