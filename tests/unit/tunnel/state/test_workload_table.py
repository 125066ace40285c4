"""Enrollment decisions and the tunnel's workload table, from snapshots (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.ca.identity import SpiffeId
from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.enrollment import enrollment
from nodeagent.cluster.events import Listed
from nodeagent.cluster.model import Kind, Namespace, ObjectRef, Pod, PodKey, PodKeyError
from nodeagent.errors import NodeAgentError
from nodeagent.state.tracker import ChangeTracker, Snapshot
from nodeagent.tunnel.state.workloads import workload_table
from tests.support import objects as k8s


def decoded(raw: dict[str, Any]) -> Any:
    result = decode(raw)
    assert result.obj is not None, result
    return result.obj


def snapshot(pods: list[dict[str, Any]], namespaces: list[dict[str, Any]]) -> Snapshot:
    tracker = ChangeTracker("node1")
    for kind, raws in ((Kind.POD, pods), (Kind.NAMESPACE, namespaces)):
        tracker.apply(Listed(kind, tuple((object_ref(r), decode(r)) for r in raws), "1"))
    result = tracker.snapshot()
    assert result is not None
    return result


def test_namespace_label_enrolls_and_pod_label_opts_out() -> None:
    meshed = decoded(k8s.namespace("shop", **{"nodeagent.io/mesh": "enabled"}))
    plain = decoded(k8s.namespace("shop"))
    pod: Pod = decoded(k8s.pod("a", "10.244.1.2"))
    opted_out: Pod = decoded(k8s.pod("b", "10.244.1.3", **{"nodeagent.io/mesh": "disabled"}))
    ambient: Pod = decoded(k8s.pod("c", "10.244.1.4", **{"istio.io/dataplane-mode": "ambient"}))
    assert enrollment(pod, meshed).enrolled
    assert enrollment(pod, meshed).reason == "namespace shop label nodeagent.io/mesh=enabled"
    assert not enrollment(pod, plain).enrolled
    assert not enrollment(pod, None).enrolled, "an unknown namespace enrolls nothing"
    assert enrollment(opted_out, meshed).reason == "pod label nodeagent.io/mesh=disabled opts out"
    assert enrollment(ambient, plain).enrolled


def test_pods_without_an_ip_host_network_or_finished_are_never_enrolled() -> None:
    meshed: Namespace = decoded(k8s.namespace("shop", **{"nodeagent.io/mesh": "enabled"}))
    raw = k8s.pod("a", "10.244.1.2")
    raw["status"] = {"phase": "Pending"}
    assert enrollment(decoded(raw), meshed).reason == "pod has no IP yet"
    raw = k8s.pod("a", "172.18.0.2")
    raw["spec"]["hostNetwork"] = True
    assert not enrollment(decoded(raw), meshed).enrolled
    raw = k8s.pod("a", "10.244.1.2")
    raw["status"]["phase"] = "Succeeded"
    assert enrollment(decoded(raw), meshed).reason == "pod phase Succeeded"


def test_table_knows_every_pod_by_ip_and_serves_only_enrolled_local_ones() -> None:
    remote = k8s.pod("r", "10.244.2.2", node="node2")
    remote["spec"]["serviceAccountName"] = "reviews"
    table = workload_table(snapshot(
        [k8s.pod("a", "10.244.1.2"), k8s.pod("b", "10.244.1.3", **{"nodeagent.io/mesh": "disabled"}), remote,
         k8s.pod("x", "10.244.1.9", namespace="other")],
        [k8s.namespace("shop", **{"nodeagent.io/mesh": "enabled"}), k8s.namespace("other")]), "node1")
    assert set(table.local) == {"10.244.1.2"}
    assert set(table.by_ip) == {"10.244.1.2", "10.244.1.3", "10.244.2.2", "10.244.1.9"}
    peer = table.lookup("10.244.2.2")
    assert peer is not None and peer.node == "node2" and peer.enrolled
    assert peer.identity == SpiffeId("cluster.local", "shop", "reviews")
    assert not table.by_ip["10.244.1.9"].enrolled
    assert set(table.decisions) == {"shop/a", "shop/b", "other/x"}, "decisions are for this node's pods"
    assert dict(table.local_pods) == {PodKey("shop", "a"): table.local["10.244.1.2"]}, "the mesh reconciler's view"


def test_a_pod_key_reads_and_writes_namespace_slash_name() -> None:
    key = PodKey.parse("shop/a")
    assert key == PodKey("shop", "a") and str(key) == "shop/a" and key.ref == ObjectRef(Kind.POD, "shop", "a")
    for bad in ("a", "/a", "shop/", "shop/a/b"):
        with pytest.raises(PodKeyError):
            PodKey.parse(bad)
    with pytest.raises(NodeAgentError):  # callers catch the one root
        PodKey.parse("a")
