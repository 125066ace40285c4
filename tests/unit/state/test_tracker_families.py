"""The change tracker per IP family: a family the node does not serve is reported on the Service (naming the
field, counted as ("Service", "family")), never dropped silently; translation per family."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from typing import Any

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Listed, Upserted
from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.state.tracker import ChangeTracker, Snapshot
from nodeagent.state.translation import endpoints_of_family, service_port_infos
from tests.support import objects as k8s
from tests.support.events import listed

WEB = ObjectRef(Kind.SERVICE, "shop", "web")


def dual_stack(policy: str = "RequireDualStack", **spec: Any) -> dict[str, Any]:
    return k8s.service("web", clusterIPs=["10.96.0.10", "fd00::10"], ipFamilies=["IPv4", "IPv6"],
                       ipFamilyPolicy=policy, **spec)


def node(*addresses: str, cidrs: tuple[str, ...] = ("10.244.1.0/24",)) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}, "spec": {"podCIDRs": list(cidrs)},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}


def snap(tracker: ChangeTracker) -> Snapshot:
    snapshot = tracker.snapshot()
    assert snapshot is not None
    return snapshot


def tracker_with(*services: dict[str, Any], families: frozenset[int] | None = frozenset({4}),
                 node_raw: dict[str, Any] | None = None) -> ChangeTracker:
    tracker = ChangeTracker("node1", families=families)
    tracker.apply_all([listed(Kind.SERVICE, list(services), "1"), listed(Kind.ENDPOINT_SLICE, [], "1"),
                       listed(Kind.NODE, [node_raw or node("192.168.0.2")], "1")])
    return tracker


def test_a_require_dual_stack_service_on_an_ipv4_only_node_is_reported_and_counted() -> None:
    snapshot = snap(tracker_with(dual_stack()))
    assert snapshot.served_families == frozenset({4})
    (rejection,) = snapshot.rejections_of(WEB)
    assert rejection.field == "spec.ipFamilies[1]" and not rejection.whole_object
    assert "IPv6 is not served on this node" in rejection.reason and "fd00::10" in rejection.reason
    assert "RequireDualStack" in rejection.reason
    assert snapshot.rejection_counts[("Service", "family")] == 1
    # the IPv4 half is programmed as ever
    assert [str(ip) for info in snapshot.service_ports.values() for ip in info.cluster_ips] == ["10.96.0.10",
                                                                                               "fd00::10"]


def test_an_ipv6_only_service_on_an_ipv4_only_node_is_reported_whole() -> None:
    svc = k8s.service("web", cluster_ip="fd00::10", ipFamilies=["IPv6"], externalIPs=["2001:db8::7"])
    (rejection,) = snap(tracker_with(svc)).rejections_of(WEB)
    assert rejection.whole_object and "externalIPs 2001:db8::7" in rejection.reason
    assert str(rejection).endswith("(rejected)")


def test_the_report_goes_when_the_node_gains_ipv6_and_is_not_counted_twice() -> None:
    tracker = tracker_with(dual_stack())
    assert snap(tracker).rejections_of(WEB)
    raw = node("192.168.0.2", "2001:db8::2")
    tracker.apply(Upserted(Kind.NODE, object_ref(raw), decode(raw), "2"))
    snapshot = snap(tracker)
    assert snapshot.served_families == frozenset({4, 6})
    assert snapshot.rejections_of(WEB) == ()
    assert snapshot.rejection_counts[("Service", "family")] == 1
    # a pod CIDR of the family is enough, as is the agent's own cluster CIDR (its base families)
    assert snap(tracker_with(dual_stack(), node_raw=node("192.168.0.2", cidrs=("fd00:10:1::/64",)))).rejections == {}
    assert snap(tracker_with(dual_stack(), families=frozenset({4, 6}))).rejections == {}


def test_without_families_nothing_is_checked() -> None:
    """The tunnel's and the CA's trackers run no proxier: no family report."""
    snapshot = snap(tracker_with(dual_stack(), families=None))
    assert snapshot.rejections == {} and snapshot.served_families is None


def test_decode_rejections_and_family_reports_are_kept_side_by_side() -> None:
    tracker = tracker_with(dual_stack(externalIPs=["not-an-ip"]))
    assert [r.field for r in snap(tracker).rejections_of(WEB)] == ["spec.externalIPs[0]", "spec.ipFamilies[1]"]
    fixed = dual_stack()
    tracker.apply(Upserted(Kind.SERVICE, object_ref(fixed), decode(fixed), "3"))
    assert [r.field for r in snap(tracker).rejections_of(WEB)] == ["spec.ipFamilies[1]"]
    tracker.apply(Listed(Kind.SERVICE, (), "4"))
    assert snap(tracker).rejections_of(WEB) == ()


def test_translation_per_family_is_kube_proxys_service_port_per_family() -> None:
    raw = dual_stack(type="LoadBalancer", externalIPs=["192.0.2.7", "2001:db8::7"],
                     loadBalancerSourceRanges=["203.0.113.0/24", "2001:db8:1::/48"],
                     ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    raw["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"ip": "2001:db8:2::1"}]}}
    svc = decode(raw).obj
    assert svc is not None
    (info,) = service_port_infos(svc)  # type: ignore[arg-type]
    assert info.families == (4, 6)
    v4, v6 = info.for_family(4), info.for_family(6)
    assert v4 is not None and v6 is not None
    assert (v4.cluster_ips, v4.external_ips, v4.load_balancer_ips, v4.load_balancer_source_ranges) == (
        (ip_address("10.96.0.10"),), (ip_address("192.0.2.7"),), (ip_address("198.51.100.1"),),
        (ip_network("203.0.113.0/24"),))
    assert (v6.cluster_ips, v6.external_ips, v6.load_balancer_ips, v6.load_balancer_source_ranges) == (
        (ip_address("fd00::10"),), (ip_address("2001:db8::7"),), (ip_address("2001:db8:2::1"),),
        (ip_network("2001:db8:1::/48"),))
    assert v4.name == v6.name and v4.node_port == v6.node_port == 30080
    single = decode(k8s.service("web")).obj
    (single_info,) = service_port_infos(single)  # type: ignore[arg-type]
    assert single_info.for_family(4) is single_info and single_info.for_family(6) is None


def test_each_family_reads_only_its_own_endpoints() -> None:
    tracker = ChangeTracker("node1")
    tracker.apply_all([listed(Kind.SERVICE, [dual_stack()], "1"), listed(Kind.ENDPOINT_SLICE, [
        k8s.endpoint_slice("web-a", "web", [k8s.endpoint("10.244.1.2")]),
        {**k8s.endpoint_slice("web-b", "web", [k8s.endpoint("fd00:10:1::2")]), "addressType": "IPv6"},
    ], "1")])
    (endpoints,) = snap(tracker).endpoints.values()
    assert [str(e) for e in endpoints] == ["10.244.1.2:8080", "[fd00:10:1::2]:8080"]
    assert [str(e) for e in endpoints_of_family(endpoints, 6)] == ["[fd00:10:1::2]:8080"]
    assert [str(e) for e in endpoints_of_family(endpoints, 4)] == ["10.244.1.2:8080"]
