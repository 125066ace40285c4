"""Decoding per IP family: spec.ipFamilies / ipFamilyPolicy / clusterIPs, addresses of both families, IPv6
EndpointSlices and Nodes. What kube-proxy serves is what `GetClusterIPByFamily` gives each family's proxier
(pkg/proxy/util), so every disagreement is reported on its field and nothing is served in the wrong family."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from nodeagent.cluster.decode import decode
from nodeagent.cluster.model import (
    EndpointSlice,
    IPFamilyPolicy,
    LoadBalancerIngress,
    LoadBalancerIPMode,
    Node,
    Service,
)


def service(**spec: Any) -> dict[str, Any]:
    status = spec.pop("status", None)
    base: dict[str, Any] = {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    base.update(spec)
    raw = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": base}
    if status is not None:
        raw["status"] = status
    return raw


def decoded_service(**spec: Any) -> tuple[Service, list[tuple[str, str]]]:
    decoded = decode(service(**spec))
    assert isinstance(decoded.obj, Service), decoded.rejections
    return decoded.obj, [(r.field, r.reason) for r in decoded.rejections]


V4, V6 = "10.96.0.10", "fd00::10"


@pytest.mark.parametrize(("policy", "ips", "families", "served"), [
    ("SingleStack", [V4], ["IPv4"], (4,)),
    ("SingleStack", [V6], ["IPv6"], (6,)),
    ("PreferDualStack", [V4], ["IPv4"], (4,)),  # a single-stack cluster: one family allocated, nothing to report
    ("PreferDualStack", [V4, V6], ["IPv4", "IPv6"], (4, 6)),
    ("PreferDualStack", [V6, V4], ["IPv6", "IPv4"], (6, 4)),
    ("RequireDualStack", [V4, V6], ["IPv4", "IPv6"], (4, 6)),
    (None, [V4], ["IPv4"], (4,)),
])
def test_each_ip_family_policy_serves_the_families_of_its_cluster_ips(
        policy: str | None, ips: list[str], families: list[str], served: tuple[int, ...]) -> None:
    spec: dict[str, Any] = {"clusterIP": ips[0], "clusterIPs": ips, "ipFamilies": families}
    if policy is not None:
        spec["ipFamilyPolicy"] = policy
    svc, rejected = decoded_service(**spec)
    assert rejected == []
    assert svc.families == served and svc.ip_families == served
    assert svc.ip_family_policy == (IPFamilyPolicy(policy) if policy else None)
    for family in (4, 6):
        ip = svc.cluster_ip(family)
        assert (ip is not None) == (family in served)
        assert ip is None or ip.version == family


def test_require_dual_stack_with_one_cluster_ip_is_reported_and_served_single_stack() -> None:
    svc, rejected = decoded_service(clusterIPs=[V4], ipFamilies=["IPv4"], ipFamilyPolicy="RequireDualStack")
    assert svc.families == (4,)
    assert [f for f, _ in rejected] == ["spec.ipFamilyPolicy"]
    assert "RequireDualStack" in rejected[0][1] and "single-stack" in rejected[0][1]


def test_a_dual_stack_service_keeps_external_and_ingress_ips_of_both_families() -> None:
    """newBaseServiceInfo filters externalIPs, source ranges and VIPs per family: all of them are kept here,
    each family's proxier takes its own (state.translation.ServicePortInfo.for_family)."""
    svc, rejected = decoded_service(
        type="LoadBalancer", clusterIPs=[V6, V4], ipFamilies=["IPv6", "IPv4"], ipFamilyPolicy="PreferDualStack",
        externalIPs=["192.0.2.7", "2001:db8::7"], loadBalancerSourceRanges=["203.0.113.0/24", "2001:db8:1::/48"],
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
        status={"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"ip": "2001:db8:2::1", "ipMode": "VIP"}]}})
    assert rejected == []
    assert svc.external_ips == (ip_address("192.0.2.7"), ip_address("2001:db8::7"))
    assert svc.load_balancer_ingress == (LoadBalancerIngress(ip_address("198.51.100.1")),
                                         LoadBalancerIngress(ip_address("2001:db8:2::1"), LoadBalancerIPMode.VIP))
    assert svc.load_balancer_source_ranges == (ip_network("203.0.113.0/24"), ip_network("2001:db8:1::/48"))


def test_a_single_stack_service_drops_the_other_familys_external_and_vip_ingress_ips() -> None:
    """kube-proxy's IPv6 proxier skips a Service without an IPv6 clusterIP, the IPv4 one filters the IPv6
    addresses out: served by neither, so each is reported on its field. A Proxy-mode IP is kept (no rule)."""
    svc, rejected = decoded_service(
        type="LoadBalancer", clusterIPs=[V4], ipFamilies=["IPv4"], externalIPs=["2001:db8::7"],
        status={"loadBalancer": {"ingress": [{"ip": "2001:db8:2::1"}, {"ip": "2001:db8:2::2", "ipMode": "Proxy"}]}})
    assert svc.external_ips == ()
    assert [i.ip for i in svc.load_balancer_ingress] == [ip_address("2001:db8:2::2")]
    assert [f for f, _ in rejected] == ["status.loadBalancer.ingress[0].ip", "spec.externalIPs[0]"]
    assert all("is IPv6 but the Service is IPv4" in reason for _, reason in rejected)


def test_sloppy_ipv4_still_works_beside_an_ipv6_cluster_ip() -> None:
    decoded = decode(service(clusterIPs=["010.096.000.010", "fd00::10"], ipFamilies=["IPv4", "IPv6"],
                             ipFamilyPolicy="PreferDualStack", externalIPs=["192.0.2.01", "2001:db8::7"]))
    assert isinstance(decoded.obj, Service) and decoded.rejections == ()
    assert decoded.obj.cluster_ips == (ip_address("10.96.0.10"), ip_address("fd00::10"))
    assert decoded.obj.external_ips == (ip_address("192.0.2.1"), ip_address("2001:db8::7"))
    assert [(c.field, c.canonical) for c in decoded.canonicalized] == [
        ("spec.clusterIPs[0]", "10.96.0.10"), ("spec.externalIPs[0]", "192.0.2.1")]


@pytest.mark.parametrize(("spec", "field", "reason"), [
    ({"clusterIPs": [V4, "fd00::zz"], "ipFamilies": ["IPv4", "IPv6"]}, "spec.clusterIPs[1]", "not a valid IP"),
    ({"clusterIPs": [V4, "fd00::1%eth0"], "ipFamilies": ["IPv4", "IPv6"]}, "spec.clusterIPs[1]", "not a valid IP"),
    ({"clusterIPs": [V4, V6], "ipFamilies": ["IPv4", "IPv6"], "externalIPs": ["2001:db8::g"]},
     "spec.externalIPs[0]", "not a valid IP"),
    ({"clusterIPs": [V4, V6], "ipFamilies": ["IPv4", "IPv6"], "externalIPs": ["2001:db8:::7"]},
     "spec.externalIPs[0]", "not a valid IP"),
    ({"clusterIPs": [V4, V6], "ipFamilies": ["IPv4", "IPv6"], "type": "LoadBalancer",
      "loadBalancerSourceRanges": ["2001:db8::/129"]}, "spec.loadBalancerSourceRanges[0]", "not a CIDR"),
])
def test_a_malformed_ipv6_value_is_rejected_with_its_field(spec: dict[str, Any], field: str, reason: str) -> None:
    svc, rejected = decoded_service(**spec)
    assert svc.cluster_ips[0] == ip_address(V4)
    assert any(f == field and reason in r for f, r in rejected), rejected
    if field == "spec.clusterIPs[1]":
        assert svc.families == (4,)  # and the IPv6 half is not served (reported on its field, not silently)
        assert any(f == "spec.ipFamilies[1]" for f, _ in rejected)


def test_a_malformed_ipv6_primary_cluster_ip_rejects_the_service() -> None:
    decoded = decode(service(clusterIPs=["fd00::1::2"], ipFamilies=["IPv6"]))
    assert decoded.obj is None
    (rejection,) = decoded.rejections
    assert rejection.field == "spec.clusterIPs[0]" and rejection.whole_object


@pytest.mark.parametrize(("spec", "served", "fields"), [
    # an ipFamilies entry over an address of the other family: served in its own family, reported
    ({"clusterIPs": [V4], "ipFamilies": ["IPv6"]}, (4,), ["spec.ipFamilies[0]"]),
    # spec.ipFamilies decides which cluster IPs kube-proxy serves (GetClusterIPByFamily)
    ({"clusterIPs": [V4, V6], "ipFamilies": ["IPv4"]}, (4,), ["spec.clusterIPs[1]"]),
    ({"clusterIPs": [V4], "ipFamilies": ["IPv4", "IPv6"]}, (4,), ["spec.ipFamilies[1]"]),
    ({"clusterIPs": [V4], "ipFamilies": ["IPv5"]}, (4,), ["spec.ipFamilies[0]"]),
    ({"clusterIPs": [V4, V6], "ipFamilies": ["IPv4", "IPv4"]}, (4,), ["spec.ipFamilies[1]", "spec.clusterIPs[1]"]),
    ({"clusterIPs": [V4, "10.96.0.11"], "ipFamilies": ["IPv4", "IPv6"]}, (4,),
     ["spec.clusterIPs[1]", "spec.ipFamilies[1]"]),
    ({"clusterIPs": [V4, V6], "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "SingleStack"}, (4, 6),
     ["spec.ipFamilyPolicy"]),
    ({"clusterIPs": [V4], "ipFamilyPolicy": "TripleStack"}, (4,), ["spec.ipFamilyPolicy"]),
    # a manifest without ipFamilies (the API server always writes them): the cluster IPs are read as they are
    ({"clusterIPs": [V4, V6]}, (4, 6), []),
])
def test_family_disagreements_are_reported_on_their_field(spec: dict[str, Any], served: tuple[int, ...],
                                                          fields: list[str]) -> None:
    svc, rejected = decoded_service(**spec)
    assert svc.families == served
    assert [f for f, _ in rejected] == fields


def endpoint_slice(address_type: str, *addresses: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": address_type,
            "metadata": {"name": "web-v6", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [{"addresses": [a]} for a in addresses], "ports": [{"name": "http", "port": 8080}]}


def test_an_ipv6_endpoint_slice_keeps_its_ipv6_addresses_and_rejects_the_others_by_field() -> None:
    decoded = decode(endpoint_slice("IPv6", "fd00:10::1", "fd00:10::zz", "10.0.0.1", "::ffff:10.0.0.2", "FD00:10::3"))
    assert isinstance(decoded.obj, EndpointSlice)
    assert [e.addresses for e in decoded.obj.endpoints] == [(ip_address("fd00:10::1"),), (ip_address("fd00:10::3"),)]
    rejected = [(r.field, r.reason) for r in decoded.rejections]
    assert ("endpoints[1].addresses[0]", "'fd00:10::zz' is not a valid IPv6 address") in rejected
    assert ("endpoints[2].addresses[0]", "'10.0.0.1' is not a valid IPv6 address") in rejected
    # an IPv4-mapped address is IPv4 to kube-proxy (To4), so not an address of an IPv6 slice
    assert ("endpoints[3].addresses[0]", "'::ffff:10.0.0.2' is not a valid IPv6 address") in rejected


def test_a_node_has_the_families_of_its_addresses_and_pod_cidrs() -> None:
    def node(addresses: list[str], cidrs: list[str]) -> Node:
        raw = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
               "spec": {"podCIDRs": cidrs},
               "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}
        decoded = decode(raw)
        assert isinstance(decoded.obj, Node) and decoded.rejections == ()
        return decoded.obj

    assert node(["192.168.0.2"], ["10.244.1.0/24"]).families == {4}
    assert node(["192.168.0.2", "2001:db8::2"], ["10.244.1.0/24"]).families == {4, 6}
    assert node(["192.168.0.2"], ["10.244.1.0/24", "fd00:10:1::/64"]).families == {4, 6}
    assert node([], []).families == frozenset()
