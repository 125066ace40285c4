"""Which identities the tunnel considers held (pure): a peer presenting an identity no pod holds is refused
(its certificate outlived its pods), so the set must include a pod from its creation, before the kubelet
publishes its IP (nodeagent-cni enrolls it at sandbox creation and it may connect at once), and must not
include pods that have finished."""

from __future__ import annotations

from typing import Any

from nodeagent.ca.identity import SpiffeId
from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Listed
from nodeagent.cluster.model import Kind
from nodeagent.state.tracker import ChangeTracker
from nodeagent.tunnel.state.workloads import workload_table
from tests.support import objects as k8s


def pod(name: str, sa: str, phase: str, ip: str | None) -> dict[str, Any]:
    raw = k8s.pod(name, ip or "0.0.0.0")
    raw["spec"]["serviceAccountName"] = sa
    raw["status"] = {"phase": phase, **({"podIP": ip} if ip else {})}
    return raw


def test_a_pod_holds_its_identity_from_creation_until_it_finishes() -> None:
    tracker = ChangeTracker("node1")
    raws = [pod("new", "fresh", "Pending", None), pod("done", "finished", "Succeeded", "10.244.1.9"),
            pod("web", "web", "Running", "10.244.1.2")]
    tracker.apply(Listed(Kind.POD, tuple((object_ref(r), decode(r)) for r in raws), "1"))
    tracker.apply(Listed(Kind.NAMESPACE, (), "1"))
    snapshot = tracker.snapshot()
    assert snapshot is not None
    table = workload_table(snapshot, "node1")
    assert table.holds(SpiffeId("cluster.local", "shop", "fresh")), "a pod without an IP yet holds its identity"
    assert table.holds(SpiffeId("cluster.local", "shop", "web"))
    assert not table.holds(SpiffeId("cluster.local", "shop", "finished"))
    assert table.lookup("10.244.1.9") is not None and table.lookup("0.0.0.0") is None
