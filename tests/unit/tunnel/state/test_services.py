"""The tunnel's Service table: frontends as kube-proxy sees them, candidates, and incremental updates."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Deleted, Event, Upserted
from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.state.tracker import ChangeTracker, Snapshot
from nodeagent.tunnel.state.service_config import Locality
from nodeagent.tunnel.state.services import ServiceTable, service_table
from tests.support import objects as k8s

WEB = ObjectRef(Kind.SERVICE, "shop", "web")


def up(raw: dict[str, Any]) -> Upserted:
    return Upserted(Kind(raw["kind"]), object_ref(raw), decode(raw), "")


def zoned_node(name: str, ip: str, zone: str | None) -> dict[str, Any]:
    raw = k8s.node(name, ip, "10.244.0.0/24")
    raw["metadata"]["labels"] = {"topology.kubernetes.io/zone": zone} if zone else {}
    return raw


def web(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    raw = k8s.service("web", **spec)
    raw["metadata"]["annotations"] = annotations or {}
    return raw


def cluster(*extra: dict[str, Any], service: dict[str, Any] | None = None) -> ChangeTracker:
    tracker = ChangeTracker("node1")
    tracker.apply_all([up(o) for o in (
        zoned_node("node1", "172.18.0.2", "z1"), zoned_node("node2", "172.18.0.3", "z2"),
        zoned_node("node3", "172.18.0.4", None),
        service or web(),
        k8s.endpoint_slice("web-a", "web", [
            k8s.endpoint("10.244.1.2", "node1", pod="web-1"), k8s.endpoint("10.244.2.2", "node2", pod="web-2"),
            k8s.endpoint("10.244.3.2", "node3", ready=False, serving=True, terminating=True, pod="web-3")]),
        *extra)])
    return tracker


def snap(tracker: ChangeTracker) -> Snapshot:
    snapshot = tracker.snapshot()
    assert snapshot is not None
    return snapshot


def test_a_cluster_ip_leads_to_its_service_and_every_endpoint_with_zone_weight_and_conditions() -> None:
    tracker = cluster(service=web({"nodeagent.io/endpoint-weights": '{"web-2": 3}',
                                   "nodeagent.io/locality": "zone"}))
    table = service_table(snap(tracker))
    target = table.lookup("10.96.0.10", 80)
    assert target is not None and target is table.lookup(ip_address("10.96.0.10"), 80)
    assert target.service == WEB and str(target.port) == "shop/web:http" and not target.node_local_only
    assert target.config.locality is Locality.ZONE
    assert [(str(c), c.node, c.zone, c.weight, c.ready, c.serving, c.terminating) for c in target.endpoints] == [
        ("10.244.1.2:8080", "node1", "z1", 1, True, True, False),
        ("10.244.2.2:8080", "node2", "z2", 3, True, True, False),
        ("10.244.3.2:8080", "node3", None, 1, False, True, True)]
    assert target.endpoints[0].key == (ip_address("10.244.1.2"), 8080)
    assert target.endpoints[0].pod == ObjectRef(Kind.POD, "shop", "web-1")
    assert (table.node, table.zone, table.generation) == ("node1", "z1", 1)
    assert table.lookup("10.96.0.10", 81) is None and table.lookup("10.96.0.11", 80) is None


def test_internal_traffic_policy_local_restricts_the_cluster_ip_to_this_nodes_endpoints_only() -> None:
    table = service_table(snap(cluster(service=web(internalTrafficPolicy="Local", externalIPs=["192.0.2.7"]))))
    internal = table.lookup("10.96.0.10", 80)
    assert internal is not None and internal.node_local_only
    assert [str(c) for c in internal.endpoints] == ["10.244.1.2:8080"]
    external = table.lookup("192.0.2.7", 80)  # external frontends use every endpoint (kube-proxy)
    assert external is not None and len(external.endpoints) == 3 and not external.node_local_only


def test_external_and_load_balancer_ips_and_this_nodes_node_port_are_frontends_too() -> None:
    raw = web(type="LoadBalancer", externalIPs=["192.0.2.7"],
              ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                     {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30053}])
    raw["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
    table = service_table(snap(cluster(service=raw)))
    for frontend in (("10.96.0.10", 80), ("192.0.2.7", 80), ("198.51.100.1", 80), ("172.18.0.2", 30080)):
        target = table.lookup(*frontend)
        assert target is not None and target.service == WEB, frontend
    assert table.lookup("172.18.0.3", 30080) is None  # another node's address: that node's business
    assert table.lookup("10.96.0.10", 53) is None  # UDP: the tunnel carries TCP only
    assert len(table) == 4


def test_skipped_services_have_no_frontends_and_bad_annotations_are_reported() -> None:
    headless = k8s.service("hl", cluster_ip="None")
    table = service_table(snap(cluster(headless, service=web({"nodeagent.io/connect-attempts": "many"}))))
    assert table.config(ObjectRef(Kind.SERVICE, "shop", "hl")) is None
    (rejection,) = table.rejections(WEB)
    assert rejection.field == "metadata.annotations[nodeagent.io/connect-attempts]"
    assert list(table.all_rejections()) == [rejection]
    config = table.config(WEB)
    assert config is not None and config.connect_attempts == 3


def test_an_annotation_only_change_reaches_the_updated_table() -> None:
    tracker = cluster()
    table = service_table(snap(tracker))
    tracker.apply(up(web({"nodeagent.io/connect-timeout": "2s"})))
    second = snap(tracker)
    assert second.changed_services == frozenset()  # the translation did not change, the config did
    updated = table.updated(second)
    target = updated.lookup("10.96.0.10", 80)
    assert target is not None and target.config.connect_timeout == 2.0
    old = table.lookup("10.96.0.10", 80)
    assert old is not None and old.config.connect_timeout == 10.0  # the old table is untouched


def test_a_zone_change_or_a_skipped_generation_rebuilds_everything() -> None:
    tracker = cluster()
    table = service_table(snap(tracker))
    tracker.apply(up(zoned_node("node2", "172.18.0.3", "z9")))
    updated = table.updated(snap(tracker))
    target = updated.lookup("10.96.0.10", 80)
    assert target is not None and target.endpoints[1].zone == "z9"
    tracker.apply(up(k8s.service("db", cluster_ip="10.96.0.20")))
    snap(tracker)
    tracker.apply(up(k8s.service("cache", cluster_ip="10.96.0.30")))
    latest = snap(tracker)
    assert updated.updated(latest).lookup("10.96.0.20", 80) is not None  # generation 3 was never seen
    assert updated.updated(latest).generation == latest.generation == 4


NAMES = ["a", "b", "c", "d"]


def change(i: int, kind: str, name: str) -> Event:
    if kind == "delete-service":
        return Deleted(ObjectRef(Kind.SERVICE, "shop", name))
    if kind == "delete-slice":
        return Deleted(ObjectRef(Kind.ENDPOINT_SLICE, "shop", f"{name}-x"))
    if kind == "service":
        return up(k8s.service(name, cluster_ip=f"10.96.0.{NAMES.index(name) + 1}",
                              internalTrafficPolicy="Local" if i % 2 else "Cluster",
                              externalIPs=[f"192.0.2.{NAMES.index(name) + 1}"] if i % 3 == 0 else []))
    if kind == "annotate":
        raw = k8s.service(name, cluster_ip=f"10.96.0.{NAMES.index(name) + 1}")
        raw["metadata"]["annotations"] = {"nodeagent.io/connect-attempts": str(1 + i % 5)}
        return up(raw)
    if kind == "node":
        return up(zoned_node(f"node{i % 3}", f"172.18.0.{2 + i % 3}", f"z{i % 4}"))
    return up(k8s.endpoint_slice(f"{name}-x", name, [k8s.endpoint(f"10.244.{i % 3}.{j + 2}", f"node{(i + j) % 3}",
                                                                   ready=bool((i + j) % 2), pod=f"{name}-{j}")
                                                     for j in range(i % 4)]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["service", "annotate", "slice", "delete-service", "delete-slice",
                                           "node"]), st.sampled_from(NAMES)), min_size=1, max_size=25))
def test_updating_step_by_step_gives_the_table_a_fresh_build_gives(steps: list[tuple[str, str]]) -> None:
    tracker = ChangeTracker("node1")
    table: ServiceTable | None = None
    for i, (kind, name) in enumerate(steps):
        tracker.apply(change(i, kind, name))
        snapshot = tracker.snapshot()
        if snapshot is None:
            continue
        table = service_table(snapshot) if table is None else table.updated(snapshot)
        fresh = service_table(snapshot)
        assert dict(table.frontends()) == dict(fresh.frontends()), (i, kind, name)
        assert list(table.all_rejections()) == list(fresh.all_rejections())
