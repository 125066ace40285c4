"""The change tracker and snapshots: what a snapshot holds, and that its diff names exactly the changed ports."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Deleted, Event, Listed, Progressed, Unreadable, Upserted
from nodeagent.cluster.model import Kind, ObjectRef, Protocol
from nodeagent.state.tracker import ChangeTracker, Snapshot
from nodeagent.state.translation import ServicePortName
from tests.support import objects as k8s
from tests.support.events import listed


def up(raw: dict[str, Any], rv: str = "") -> Upserted:
    decoded = decode(raw)
    return Upserted(Kind(raw["kind"]), object_ref(raw), decoded, rv)




def spn(name: str, port: str = "http", namespace: str = "shop", protocol: Protocol = Protocol.TCP) -> ServicePortName:
    return ServicePortName(namespace, name, port, protocol)


def snap(tracker: ChangeTracker) -> Snapshot:
    snapshot = tracker.snapshot()
    assert snapshot is not None
    return snapshot


def endpoints(snapshot: Snapshot, port: ServicePortName) -> list[str]:
    return [str(e) for e in snapshot.endpoints_of(port)]


def seeded(node: str = "node1") -> ChangeTracker:
    tracker = ChangeTracker(node)
    tracker.apply_all([
        listed(Kind.SERVICE, [k8s.service("web"), k8s.service("db", cluster_ip="10.96.0.20",
                                                                ports=[{"name": "pg", "port": 5432}])], "10"),
        listed(Kind.ENDPOINT_SLICE, [
            k8s.endpoint_slice("web-a", "web", [k8s.endpoint("10.244.1.2"), k8s.endpoint("10.244.2.2", "node2")]),
            k8s.endpoint_slice("db-a", "db", [k8s.endpoint("10.244.1.9")], ports=[{"name": "pg", "port": 5432}]),
        ], "11"),
    ])
    return tracker


def test_first_snapshot_holds_every_port_with_its_endpoints_and_calls_them_all_changed() -> None:
    first = snap(seeded())
    assert first.generation == 1
    assert set(first.service_ports) == {spn("web"), spn("db", "pg")}
    assert first.changed_ports == {spn("web"), spn("db", "pg")}
    assert endpoints(first, spn("web")) == ["10.244.1.2:8080", "10.244.2.2:8080"]
    assert [e.is_local for e in first.endpoints_of(spn("web"))] == [True, False]
    assert first.resource_versions == {Kind.SERVICE: "10", Kind.ENDPOINT_SLICE: "11"}
    assert first.synced([Kind.SERVICE, Kind.ENDPOINT_SLICE]) and not first.synced([Kind.POD])
    assert str(spn("web")) == "shop/web:http"


def test_nothing_pending_means_no_new_snapshot() -> None:
    tracker = seeded()
    snap(tracker)
    assert tracker.snapshot() is None
    tracker.apply(Progressed(Kind.SERVICE, "12"))  # a bookmark alone does not make a snapshot
    assert tracker.snapshot() is None
    tracker.apply(up(k8s.service("web"), "13"))  # the same content again
    assert tracker.snapshot() is None


def test_one_endpoint_change_names_exactly_that_port_and_keeps_the_rest_shared() -> None:
    tracker = seeded()
    first = snap(tracker)
    tracker.apply(up(k8s.endpoint_slice("web-a", "web", [k8s.endpoint("10.244.1.2")]), "20"))
    second = snap(tracker)
    assert second.generation == 2
    assert second.changed_ports == {spn("web")} and second.changed_services == {spn("web").service}
    assert endpoints(second, spn("web")) == ["10.244.1.2:8080"]
    assert endpoints(first, spn("web")) == ["10.244.1.2:8080", "10.244.2.2:8080"], "old snapshot must not change"
    assert second.endpoints_of(spn("db", "pg")) is first.endpoints_of(spn("db", "pg"))
    assert second.services is first.services, "an unchanged kind is shared, not copied"
    assert second.resource_versions[Kind.ENDPOINT_SLICE] == "20"


def test_service_port_added_removed_and_changed_are_each_named() -> None:
    tracker = seeded()
    snap(tracker)
    tracker.apply(up(k8s.service("web", ports=[{"name": "http", "port": 81, "targetPort": 8080},
                                               {"name": "admin", "port": 9000}])))
    changed = snap(tracker).changed_ports
    assert changed == {spn("web"), spn("web", "admin")}
    tracker.apply(up(k8s.service("web", ports=[{"name": "admin", "port": 9000}])))
    assert snap(tracker).changed_ports == {spn("web")}
    tracker.apply(Deleted(ObjectRef(Kind.SERVICE, "shop", "db")))
    after = snap(tracker)
    assert after.changed_ports == {spn("db", "pg")} and spn("db", "pg") not in after.service_ports


def test_a_change_that_does_not_touch_translation_makes_a_snapshot_with_no_changed_ports() -> None:
    tracker = seeded()
    snap(tracker)
    labelled = k8s.service("web")
    labelled["metadata"]["labels"] = {"team": "a"}
    tracker.apply(up(labelled))
    snapshot = snap(tracker)
    assert snapshot.changed_ports == frozenset() and Kind.SERVICE in snapshot.changed_kinds


def test_endpoints_merge_across_slices_dedupe_and_sort_as_kube_proxy() -> None:
    tracker = ChangeTracker("node2")
    tracker.apply_all([
        up(k8s.service("web")),
        up(k8s.endpoint_slice("web-b", "web", [k8s.endpoint("10.244.1.10"), k8s.endpoint("10.244.2.2", "node2")])),
        up(k8s.endpoint_slice("web-a", "web", [k8s.endpoint("10.244.2.2", "node1"), k8s.endpoint("10.244.1.9")])),
    ])
    snapshot = snap(tracker)
    # string order, as kube-proxy sorts: "10.244.1.10" < "10.244.1.9"
    assert endpoints(snapshot, spn("web")) == ["10.244.1.10:8080", "10.244.1.9:8080", "10.244.2.2:8080"]
    duplicate = snapshot.endpoints_of(spn("web"))[2]
    assert duplicate.is_local and duplicate.node_name == "node2", "a local duplicate wins"


def test_slice_ports_match_service_ports_by_name_and_protocol() -> None:
    tracker = ChangeTracker("node1")
    tracker.apply_all([
        up(k8s.service("dns", ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                     {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])),
        up(k8s.endpoint_slice("dns-a", "dns", [k8s.endpoint("10.244.1.5")], ports=[
            {"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5354, "protocol": "TCP"},
            {"name": "metrics", "port": 9153, "protocol": "TCP"}])),
    ])
    snapshot = snap(tracker)
    assert endpoints(snapshot, spn("dns", "dns", protocol=Protocol.UDP)) == ["10.244.1.5:5353"]
    assert endpoints(snapshot, spn("dns", "dns-tcp")) == ["10.244.1.5:5354"]
    assert spn("dns", "metrics") not in snapshot.endpoints, "a slice port no Service port names translates nothing"


def test_conditions_reach_the_endpoints() -> None:
    tracker = ChangeTracker("node1")
    tracker.apply_all([up(k8s.service("web")), up(k8s.endpoint_slice("web-a", "web", [
        k8s.endpoint("10.244.1.2", ready=False, serving=True, terminating=True),
        k8s.endpoint("10.244.1.3", ready=False)]))])
    terminating, unready = snap(tracker).endpoints_of(spn("web"))
    assert (terminating.ready, terminating.serving, terminating.terminating) == (False, True, True)
    assert (unready.ready, unready.serving, unready.terminating) == (False, True, False)


def test_headless_and_external_name_services_are_skipped_with_a_reason() -> None:
    tracker = ChangeTracker("node1")
    tracker.apply_all([up(k8s.service("headless", cluster_ip="None")),
                       up({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": "shop"},
                           "spec": {"type": "ExternalName", "externalName": "db.example.com"}})])
    snapshot = snap(tracker)
    assert len(snapshot.service_ports) == 0
    assert "headless" in snapshot.skipped_services[ObjectRef(Kind.SERVICE, "shop", "headless")]
    assert "ExternalName" in snapshot.skipped_services[ObjectRef(Kind.SERVICE, "shop", "ext")]


def test_relist_removes_what_disappeared_and_keeps_what_stayed() -> None:
    tracker = seeded()
    first = snap(tracker)
    tracker.apply(listed(Kind.SERVICE, [k8s.service("web")], "30"))
    second = snap(tracker)
    assert set(second.services) == {ObjectRef(Kind.SERVICE, "shop", "web")}
    assert second.changed_ports == {spn("db", "pg")}
    assert second.endpoints_of(spn("web")) is first.endpoints_of(spn("web"))


def test_slice_moving_to_another_service_updates_both() -> None:
    tracker = seeded()
    snap(tracker)
    tracker.apply(up(k8s.endpoint_slice("web-a", "db", [k8s.endpoint("10.244.1.2")],
                                        ports=[{"name": "pg", "port": 5433}])))
    snapshot = snap(tracker)
    assert snapshot.changed_ports == {spn("web"), spn("db", "pg")}
    assert spn("web") not in snapshot.endpoints
    assert endpoints(snapshot, spn("db", "pg")) == ["10.244.1.2:5433", "10.244.1.9:5432"]


def test_rejections_are_kept_per_object_counted_and_cleared_when_fixed() -> None:
    tracker = seeded()
    snap(tracker)
    bad = k8s.service("web", ports=[{"name": "http", "port": 80}, {"name": "bad", "port": 70000}])
    tracker.apply(up(bad))
    snapshot = snap(tracker)
    ref = ObjectRef(Kind.SERVICE, "shop", "web")
    [rejection] = snapshot.rejections_of(ref)
    assert rejection.field == "spec.ports[1].port" and "65535" in rejection.reason
    assert snapshot.rejection_counts[("Service", "field")] == 1
    assert spn("web") in snapshot.service_ports, "the valid port stays"
    tracker.apply(up(k8s.service("web")))
    fixed = snap(tracker)
    assert fixed.rejections_of(ref) == () and fixed.rejection_counts[("Service", "field")] == 1


def test_an_object_that_becomes_unusable_is_withdrawn_and_says_why() -> None:
    tracker = seeded()
    snap(tracker)
    broken = k8s.service("web", cluster_ip="10.96.0.300")
    tracker.apply(up(broken))
    snapshot = snap(tracker)
    assert spn("web") not in snapshot.service_ports and spn("web") in snapshot.changed_ports
    [rejection] = snapshot.rejections_of(ObjectRef(Kind.SERVICE, "shop", "web"))
    assert rejection.whole_object and rejection.field == "spec.clusterIPs[0]"


def test_unreadable_input_is_counted_and_kept_for_inspect() -> None:
    tracker = seeded()
    snap(tracker)
    tracker.apply(Unreadable(Kind.POD, "watch /api/v1/pods", "not JSON: Expecting value"))
    tracker.apply(Upserted(Kind.POD, None, decode({"kind": "Pod", "metadata": {}})))
    snapshot = snap(tracker)
    assert snapshot.rejection_counts[("Pod", "unreadable")] == 1
    assert snapshot.rejection_counts[("Pod", "object")] == 1
    assert snapshot.unreadable[0].reason == "not JSON: Expecting value"


def test_on_change_fires_once_per_batch_of_pending_changes() -> None:
    calls: list[int] = []
    tracker = ChangeTracker("node1", on_change=lambda: calls.append(1))
    tracker.snapshot()
    tracker.apply(up(k8s.service("web")))
    tracker.apply(up(k8s.service("db", cluster_ip="10.96.0.20")))
    assert calls == [1]
    tracker.snapshot()
    tracker.apply(Deleted(ObjectRef(Kind.SERVICE, "shop", "web")))
    assert calls == [1, 1]


def test_each_kind_listed_for_the_first_time_is_told_even_while_changes_are_pending() -> None:
    """Kinds arrive one by one from an API server; the agent waits for Services and EndpointSlices before its
    first sync, so a notice swallowed while earlier changes were pending left it waiting for its periodic sync."""
    calls: list[Kind] = []
    tracker = ChangeTracker("node1", on_change=lambda: calls.append(Kind.NODE))
    tracker.apply(listed(Kind.NODE, [k8s.node("node1", "172.18.0.2", "10.244.1.0/24")]))
    tracker.apply(up(k8s.service("web")))  # pending already: no new notice
    assert len(calls) == 1
    tracker.apply(listed(Kind.SERVICE, [k8s.service("web")]))
    tracker.apply(listed(Kind.ENDPOINT_SLICE, []))
    assert len(calls) == 3
    tracker.apply(listed(Kind.SERVICE, [k8s.service("web")]))  # a relist: nothing newly listed
    assert len(calls) == 3


# --- the diff, checked against a from-scratch rebuild ----------------------------------------------------

_names = st.sampled_from(["a", "b", "c"])
_ips = st.integers(1, 6).map(lambda i: f"10.244.1.{i}")
_slice_event = st.builds(
    lambda svc, idx, ips, port: up(k8s.endpoint_slice(f"{svc}-{idx}", svc, [k8s.endpoint(ip) for ip in ips],
                                                      ports=[{"name": "http", "port": port}])),
    _names, st.integers(0, 1), st.lists(_ips, max_size=3), st.sampled_from([8080, 8081]))
_service_event = st.builds(
    lambda svc, port, affinity: up(k8s.service(svc, cluster_ip=f"10.96.0.{ord(svc)}", ports=[
        {"name": "http", "port": port}], sessionAffinity=affinity)),
    _names, st.sampled_from([80, 81]), st.sampled_from(["None", "ClientIP"]))
_delete_event = st.builds(lambda kind, svc, idx: Deleted(
    ObjectRef(kind, "shop", svc if kind is Kind.SERVICE else f"{svc}-{idx}")),
    st.sampled_from([Kind.SERVICE, Kind.ENDPOINT_SLICE]), _names, st.integers(0, 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.one_of(_slice_event, _service_event, _delete_event), max_size=4), min_size=1,
                max_size=6))
def test_incremental_snapshots_equal_a_rebuild_and_the_diff_names_exactly_what_differs(
        batches: list[list[Event]]) -> None:
    tracker = ChangeTracker("node1")
    history: list[Event] = []
    previous = snap(tracker)
    for batch in batches:
        tracker.apply_all(batch)
        history.extend(batch)
        current = tracker.snapshot() or previous
        rebuilt = ChangeTracker("node1")
        rebuilt.apply_all(history)
        expected = snap(rebuilt)
        assert dict(current.service_ports) == dict(expected.service_ports)
        assert dict(current.endpoints) == dict(expected.endpoints)
        truly_changed = {name for name in set(previous.service_ports) | set(current.service_ports)
                         if previous.service_ports.get(name) != current.service_ports.get(name)
                         or previous.endpoints_of(name) != current.endpoints_of(name)}
        if current is not previous:
            assert current.changed_ports == truly_changed
        else:
            assert truly_changed == set()
        previous = current


_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.text(max_size=8)
    | st.sampled_from(["10.244.1.50", "010.1.1.1", "fd00::1", "TCP", "SCTP", "Local", "http", "node1", "web"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["name", "port", "ports", "protocol", "targetPort", "clusterIP", "clusterIPs", "addresses",
                         "endpoints", "conditions", "ready", "serving", "nodeName", "type", "selector",
                         "addressType", "podIP", "podIPs", "nodePort", "labels"]),
        inner, max_size=5),
    max_leaves=15,
)
_API = {"EndpointSlice": "discovery.k8s.io/v1", "AuthorizationPolicy": "security.nodeagent.io/v1alpha1",
        "PeerAuthentication": "security.nodeagent.io/v1alpha1"}


@st.composite
def malformed_object(draw: st.DrawFn) -> Any:
    """An object of a known kind whose body is junk, or junk that is no object at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_junk)
    kind = draw(st.sampled_from([k.value for k in Kind]))
    name = draw(st.sampled_from(["junk-1", "junk-2", "Bad_Name", ""]))
    labels = draw(st.sampled_from([{}, {"kubernetes.io/service-name": "web"}, {"kubernetes.io/service-name": 7}]))
    return {"apiVersion": _API.get(kind, "v1"), "kind": kind,
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "spec": draw(_junk), "status": draw(_junk), "endpoints": draw(_junk), "ports": draw(_junk),
            "addressType": draw(st.sampled_from(["IPv4", "IPv6", "FQDN", 4]))}


@settings(max_examples=150, deadline=None)
@given(junk=st.lists(malformed_object(), max_size=8), as_updates=st.booleans())
def test_malformed_objects_never_escape_and_never_cost_a_valid_object(junk: list[Any], as_updates: bool) -> None:
    """decode → tracker → snapshot with junk mixed in: no exception, every rejection explained, valid state kept."""
    clean = snap(seeded())
    tracker = seeded()
    tracker.snapshot()
    events: list[Event] = []
    for raw in junk:
        ref, decoded = object_ref(raw), decode(raw)
        if ref is None:
            events.append(Unreadable(None, "test", "; ".join(r.reason for r in decoded.rejections)))
        elif as_updates:
            events.append(Upserted(ref.kind, ref, decoded, "20"))
        else:
            events.append(Listed(ref.kind, ((ref, decoded),), "20"))
    tracker.apply_all(e for e in events if not isinstance(e, Listed))
    if not as_updates:
        # A list replaces the kind: the valid objects come along, as a real relist would carry them.
        for kind, raws in ((Kind.SERVICE, [k8s.service("web"), k8s.service("db", cluster_ip="10.96.0.20",
                                                                           ports=[{"name": "pg", "port": 5432}])]),
                           (Kind.ENDPOINT_SLICE, [
                               k8s.endpoint_slice("web-a", "web", [k8s.endpoint("10.244.1.2"),
                                                                   k8s.endpoint("10.244.2.2", "node2")]),
                               k8s.endpoint_slice("db-a", "db", [k8s.endpoint("10.244.1.9")],
                                                  ports=[{"name": "pg", "port": 5432}])])):
            extra = tuple(item for e in events if isinstance(e, Listed) and e.kind is kind for item in e.items)
            tracker.apply(Listed(kind, tuple((object_ref(r), decode(r)) for r in raws) + extra, "21"))
        tracker.apply_all(e for e in events if isinstance(e, Listed) and e.kind not in
                          (Kind.SERVICE, Kind.ENDPOINT_SLICE))
    dirty = tracker.snapshot() or tracker.last()
    assert dirty is not None
    for port, info in clean.service_ports.items():
        assert dirty.service_ports.get(port) == info, port
        assert set(clean.endpoints_of(port)) <= set(dirty.endpoints_of(port)), port
    for rejections in dirty.rejections.values():
        for rejection in rejections:
            assert rejection.field and rejection.reason and "internal" not in rejection.reason, rejection
    assert all(u.reason for u in dirty.unreadable)
