"""The DNS proxy's table: which names it answers and how, against CoreDNS's kubernetes plugin."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address
from typing import Any

import pytest

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Deleted, Listed, Upserted
from nodeagent.cluster.model import Kind
from nodeagent.state.tracker import ChangeTracker
from nodeagent.tunnel.dns import DNS_CAPTURE, dns_capture_enabled
from nodeagent.tunnel.dns.records import DnsTable, Outcome, dashed, dns_table, resolve, search_names, stub_lookup
from tests.support.objects import endpoint, endpoint_slice, namespace, service
from tests.support.services import snapshot_of


def _dual(name: str, ns: str) -> dict[str, Any]:
    return service(name, ns, "10.96.0.20", clusterIPs=["10.96.0.20", "fd00:96::20"], ipFamilies=["IPv4", "IPv6"],
                   ipFamilyPolicy="PreferDualStack")


OBJECTS = (
    namespace("demo"), namespace("other"), namespace("empty"),
    service("echo", "demo", "10.96.0.10"),
    service("echo", "other", "10.96.0.11"),
    _dual("dual", "demo"),
    service("v6", "demo", "fd00:96::30", clusterIPs=["fd00:96::30"], ipFamilies=["IPv6"]),
    service("db", "demo", "None", clusterIPs=["None"]),
    endpoint_slice("db-1", "db", [endpoint("10.244.1.3"), endpoint("10.244.2.4"),
                                  endpoint("10.244.3.5", ready=False)], "demo"),
    service("lonely", "demo", "None", clusterIPs=["None"]),
    endpoint_slice("lonely-1", "lonely", [endpoint("10.244.1.9", ready=False)], "demo"),
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": "demo"},
     "spec": {"type": "ExternalName", "externalName": "Example.COM."}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "alias", "namespace": "demo"},
     "spec": {"type": "ExternalName", "externalName": "echo.other.svc.cluster.local"}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ipext", "namespace": "demo"},
     "spec": {"type": "ExternalName", "externalName": "192.0.2.1"}},
)


@pytest.fixture(scope="module")
def table() -> DnsTable:
    made = dns_table(snapshot_of(*OBJECTS))
    assert made is not None
    return made


def _ips(*text: str) -> tuple[object, ...]:
    return tuple(ip_address(t) for t in text)


def test_service_name_answers_its_cluster_ip(table: DnsTable) -> None:
    got = resolve(table, "echo.demo.svc.cluster.local", 4)
    assert (got.outcome, got.addresses) == (Outcome.ANSWER, _ips("10.96.0.10"))
    assert resolve(table, "echo.other.svc.cluster.local.", 4).addresses == _ips("10.96.0.11")


@pytest.mark.parametrize("name", ["echo", "echo.demo", "echo.demo.svc", "echo.demo.svc.cluster.local",
                                  "echo.demo.svc.cluster.local."])
def test_every_search_form_kubelet_allows_ends_at_the_service(table: DnsTable, name: str) -> None:
    # the pod's stub resolver walks kubelet's search list (ndots:5); each form must end at echo.demo.svc
    candidate, got = stub_lookup(table, name, "demo", 4)
    assert candidate == "echo.demo.svc.cluster.local"
    assert got.addresses == _ips("10.96.0.10")


def test_search_names_follow_resolv_conf() -> None:
    assert search_names("echo", "demo") == ["echo.demo.svc.cluster.local", "echo.svc.cluster.local",
                                            "echo.cluster.local", "echo"]
    assert search_names("a.b.c.d.e.f", "demo")[0] == "a.b.c.d.e.f"  # ndots reached: as written first
    assert search_names("echo.", "demo") == ["echo"]


def test_other_namespace_by_short_form_from_a_pod_elsewhere(table: DnsTable) -> None:
    candidate, got = stub_lookup(table, "echo.other", "demo", 4)
    assert (candidate, got.addresses) == ("echo.other.svc.cluster.local", _ips("10.96.0.11"))


def test_case_insensitive_and_trailing_dot(table: DnsTable) -> None:
    assert resolve(table, "ECHO.Demo.SVC.Cluster.Local.", 4).addresses == _ips("10.96.0.10")


def test_families_of_a_dual_stack_service(table: DnsTable) -> None:
    assert resolve(table, "dual.demo.svc.cluster.local", 4).addresses == _ips("10.96.0.20")
    assert resolve(table, "dual.demo.svc.cluster.local", 6).addresses == _ips("fd00:96::20")


def test_missing_family_is_nodata_not_nxdomain(table: DnsTable) -> None:
    # CoreDNS: the name exists (records of the other type): NOERROR with no answer
    assert resolve(table, "echo.demo.svc.cluster.local", 6).outcome is Outcome.NODATA
    got = resolve(table, "v6.demo.svc.cluster.local", 4)
    assert got.outcome is Outcome.NODATA and got.zone == "cluster.local"
    assert resolve(table, "v6.demo.svc.cluster.local", 6).addresses == _ips("fd00:96::30")


def test_headless_answers_ready_endpoints(table: DnsTable) -> None:
    got = resolve(table, "db.demo.svc.cluster.local", 4)
    assert got.outcome is Outcome.ANSWER
    assert got.addresses == _ips("10.244.1.3", "10.244.2.4")  # not the unready 10.244.3.5
    assert resolve(table, "db.demo.svc.cluster.local", 6).outcome is Outcome.NODATA


def test_headless_without_ready_endpoints_is_nxdomain(table: DnsTable) -> None:
    # CoreDNS's findServices finds no record for it: errNoItems, NXDOMAIN
    assert resolve(table, "lonely.demo.svc.cluster.local", 4).outcome is Outcome.NXDOMAIN


def test_headless_endpoint_by_dashed_address(table: DnsTable) -> None:
    assert dashed(ip_address("10.244.1.3")) == "10-244-1-3"
    got = resolve(table, "10-244-1-3.db.demo.svc.cluster.local", 4)
    assert got.addresses == _ips("10.244.1.3")
    # a hostname the model does not carry (a StatefulSet's): the pod's resolver knows it
    assert resolve(table, "db-0.db.demo.svc.cluster.local", 4).outcome is Outcome.FORWARD
    assert resolve(table, "x.lonely.demo.svc.cluster.local", 4).outcome is Outcome.NXDOMAIN


def test_port_and_protocol_form(table: DnsTable) -> None:
    assert resolve(table, "_http._tcp.echo.demo.svc.cluster.local", 4).addresses == _ips("10.96.0.10")
    assert resolve(table, "_grpc._tcp.echo.demo.svc.cluster.local", 4).outcome is Outcome.NXDOMAIN
    assert resolve(table, "a.b.c.echo.demo.svc.cluster.local", 4).outcome is Outcome.NXDOMAIN  # too long


def test_external_name_is_a_cname(table: DnsTable) -> None:
    got = resolve(table, "ext.demo.svc.cluster.local", 4)
    assert (got.outcome, got.cname) == (Outcome.CNAME, "example.com")
    # an external name that is an address is no CNAME: CoreDNS answers NXDOMAIN
    assert resolve(table, "ipext.demo.svc.cluster.local", 4).outcome is Outcome.NXDOMAIN


def test_nxdomain_for_missing_service_or_namespace(table: DnsTable) -> None:
    assert resolve(table, "nope.demo.svc.cluster.local", 4).outcome is Outcome.NXDOMAIN
    assert resolve(table, "echo.nowhere.svc.cluster.local", 4).outcome is Outcome.NXDOMAIN
    assert resolve(table, "nowhere.svc.cluster.local", 4).outcome is Outcome.NXDOMAIN


def test_empty_non_terminals_are_nodata(table: DnsTable) -> None:
    assert resolve(table, "empty.svc.cluster.local", 4).outcome is Outcome.NODATA
    assert resolve(table, "svc.cluster.local", 4).outcome is Outcome.NODATA
    assert resolve(table, "cluster.local.", 6).outcome is Outcome.NODATA  # the apex


def test_cluster_domain_names_neither_svc_nor_pod_are_nxdomain(table: DnsTable) -> None:
    # CoreDNS's errInvalidRequest; a search walk of a name with a dot must not wait on an absent cluster DNS
    assert resolve(table, "echo.demo.svc.cluster.local.cluster.local", 4).outcome is Outcome.NXDOMAIN
    assert resolve(table, "www.example.com.cluster.local", 4).outcome is Outcome.NXDOMAIN


@pytest.mark.parametrize("name", ["example.com", "10-244-1-3.demo.pod.cluster.local", "pod.cluster.local",
                                  "echo.demo.svc.other.domain", "svc.cluster.local.example.com"])
def test_names_outside_the_service_zone_are_forwarded(table: DnsTable, name: str) -> None:
    assert resolve(table, name, 4).outcome is Outcome.FORWARD


def test_no_table_forwards_everything() -> None:
    # before Services, EndpointSlices and Namespaces are listed: never NXDOMAIN a name that may exist
    assert resolve(None, "echo.demo.svc.cluster.local", 4).outcome is Outcome.FORWARD


def test_table_waits_for_its_kinds() -> None:
    snapshot = snapshot_of(*OBJECTS)
    assert dns_table(replace(snapshot, synced_kinds=snapshot.synced_kinds - {Kind.NAMESPACE})) is None


def test_other_cluster_domain() -> None:
    table = dns_table(snapshot_of(*OBJECTS), "corp.example.")
    assert table is not None
    assert resolve(table, "echo.demo.svc.corp.example", 4).addresses == _ips("10.96.0.10")
    assert resolve(table, "echo.demo.svc.cluster.local", 4).outcome is Outcome.FORWARD


@pytest.mark.parametrize(("annotations", "enabled"), [
    ({}, True), ({DNS_CAPTURE: "false"}, False), ({DNS_CAPTURE: " False "}, False), ({DNS_CAPTURE: "true"}, True),
    ({DNS_CAPTURE: "no"}, True), ({"other": "false"}, True)])
def test_dns_capture_opt_out(annotations: dict[str, str], enabled: bool) -> None:
    assert dns_capture_enabled(annotations) is enabled


def _tracker(*objects: dict[str, Any]) -> ChangeTracker:
    tracker = ChangeTracker("node1")
    by_kind: dict[Kind, list[Any]] = {kind: [] for kind in Kind}
    for raw in objects:
        by_kind[Kind(raw["kind"])].append((object_ref(raw), decode(raw)))
    tracker.apply_all(Listed(kind, tuple(items), "1") for kind, items in by_kind.items())
    return tracker


def _upsert(tracker: ChangeTracker, raw: dict[str, Any]) -> None:
    tracker.apply(Upserted(Kind(raw["kind"]), object_ref(raw), decode(raw)))


def _delete(tracker: ChangeTracker, raw: dict[str, Any]) -> None:
    ref = object_ref(raw)
    assert ref is not None
    tracker.apply(Deleted(ref))


def test_incremental_tables_equal_full_builds() -> None:
    tracker = _tracker(*OBJECTS)
    snapshot = tracker.snapshot()
    assert snapshot is not None
    table = dns_table(snapshot)
    assert table is not None
    steps: list[tuple[str, Any]] = [
        ("upsert", service("new", "demo", "10.96.0.50")),
        ("upsert", service("echo", "demo", "10.96.0.99")),  # a changed cluster IP
        ("delete", service("echo", "other", "10.96.0.11")),
        ("upsert", endpoint_slice("db-1", "db", [endpoint("10.244.1.3", ready=False), endpoint("10.244.2.4")],
                                  "demo")),  # a headless endpoint no longer ready
        ("delete", endpoint_slice("lonely-1", "lonely", [], "demo")),
        ("upsert", endpoint_slice("db-2", "db", [endpoint("10.244.9.9")], "demo")),  # a second slice
        ("upsert", namespace("later")),
        ("upsert", service("svc", "later", "10.96.0.60")),
    ]
    for action, raw in steps:
        (_upsert if action == "upsert" else _delete)(tracker, raw)
        following = tracker.snapshot()
        assert following is not None
        updated = dns_table(following, since=(table, snapshot))
        full = dns_table(following)
        assert updated is not None and full is not None
        assert (updated.services, updated.namespaces) == (full.services, full.namespaces), (action, raw)
        table, snapshot = updated, following
    assert set(resolve(table, "db.demo.svc.cluster.local", 4).addresses) == set(_ips("10.244.2.4", "10.244.9.9"))
    assert resolve(table, "echo.other.svc.cluster.local", 4).outcome is Outcome.NXDOMAIN
    assert resolve(table, "svc.later.svc.cluster.local", 4).addresses == _ips("10.96.0.60")


def test_a_change_dns_does_not_read_keeps_the_table() -> None:
    tracker = _tracker(*OBJECTS)
    before = tracker.snapshot()
    assert before is not None
    table = dns_table(before)
    assert table is not None
    changed = service("echo", "demo", "10.96.0.10", ports=[{"name": "http", "port": 80, "targetPort": 9090,
                                                               "protocol": "TCP"}])
    _upsert(tracker, changed)  # a target port: the Service changed, its DNS did not
    _upsert(tracker, endpoint_slice("echo-1", "echo", [endpoint("10.244.1.1")], "demo"))  # not headless
    after = tracker.snapshot()
    assert after is not None and after.services is not before.services
    assert dns_table(after, since=(table, before)) is table
