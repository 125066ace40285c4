"""Decoding Kubernetes JSON into the model: what is kept, what is dropped alone, what rejects an object.

Plus a property: for any input, decode() never raises, every rejection names object, field and reason,
and a valid object survives any malformed sibling field being added.
"""

from __future__ import annotations

import copy
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.decode import decode
from nodeagent.lab.manifests import load_default
from nodeagent.lab.topology import build_topology
from nodeagent.model import (
    EndpointSlice,
    Kind,
    PeerAuthenticationMode,
    PolicyAction,
    Protocol,
    Service,
    ServiceType,
    SessionAffinity,
    TrafficPolicy,
)


def service(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    base.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"}, "spec": base}


def endpoint_slice(endpoints: list[Any], ports: list[Any] | None = None, address_type: str = "IPv4") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": address_type, "endpoints": endpoints,
            "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def fields(decoded: Any) -> list[str]:
    return [r.field for r in decoded.rejections]


def test_every_object_of_the_default_lab_decodes_without_rejection() -> None:
    documents = build_topology(load_default()).documents
    decoded = [decode(d) for d in documents]
    assert [r for d in decoded for r in d.rejections] == []
    kinds = sorted({d.obj.ref.kind for d in decoded if d.obj is not None})
    assert kinds == sorted([Kind.NAMESPACE, Kind.NODE, Kind.POD, Kind.SERVICE, Kind.ENDPOINT_SLICE])
    nodeport = next(d.obj for d in decoded if isinstance(d.obj, Service) and d.obj.ref.name == "echo-nodeport")
    assert nodeport.type is ServiceType.NODE_PORT and nodeport.ports[0].node_port == 30080


def test_a_full_service_decodes_to_every_field() -> None:
    raw = service(type="LoadBalancer", clusterIPs=["10.96.0.10", "fd00::10"], externalIPs=["192.0.2.7"],
                  loadBalancerSourceRanges=["203.0.113.0/24"], sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}, externalTrafficPolicy="Local",
                  internalTrafficPolicy="Local", healthCheckNodePort=31000, selector={"app": "web"},
                  trafficDistribution="PreferClose",
                  ports=[{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                         {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053}])
    raw["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"hostname": "lb.example"}]}}
    decoded = decode(raw)
    assert decoded.rejections == ()
    svc = decoded.obj
    assert isinstance(svc, Service)
    assert svc.cluster_ips == (ip_address("10.96.0.10"), ip_address("fd00::10"))
    assert [(p.name, p.protocol, p.port, p.target_port, p.node_port) for p in svc.ports] == [
        ("http", Protocol.TCP, 80, "http", 30080), ("dns", Protocol.UDP, 53, 5353, 30053)]
    assert svc.external_ips == (ip_address("192.0.2.7"),)
    assert svc.load_balancer_ips == (ip_address("198.51.100.1"),)
    assert svc.load_balancer_source_ranges == (ip_network("203.0.113.0/24"),)
    assert (svc.session_affinity, svc.affinity_timeout_seconds) == (SessionAffinity.CLIENT_IP, 60)
    assert svc.external_traffic_policy is TrafficPolicy.LOCAL and svc.internal_traffic_policy is TrafficPolicy.LOCAL
    assert svc.health_check_node_port == 31000 and svc.selector == {"app": "web"}
    assert svc.traffic_distribution == "PreferClose"
    assert svc.skip_reason is None


def test_a_traffic_distribution_that_is_not_a_string_is_dropped_alone() -> None:
    decoded = decode(service(trafficDistribution=["PreferClose"]))
    assert isinstance(decoded.obj, Service) and decoded.obj.traffic_distribution == ""
    (rejection,) = decoded.rejections
    assert rejection.field == "spec.trafficDistribution" and not rejection.whole_object


@pytest.mark.parametrize(("spec", "field", "reason"), [
    ({"clusterIP": "010.96.0.10"}, "spec.clusterIP", "not a valid IP"),
    ({"clusterIP": "10.96.0.300"}, "spec.clusterIP", "not a valid IP"),
    ({"clusterIP": None}, "spec.clusterIP", "missing"),
    ({"type": "Magic"}, "spec.type", "not one of"),
    ({"selector": {"app": 3}}, "spec.selector", "strings"),
    ({"sessionAffinity": "Cookie"}, "spec.sessionAffinity", "not one of"),
])
def test_a_service_that_cannot_be_programmed_is_rejected_whole(spec: dict[str, Any], field: str, reason: str) -> None:
    decoded = decode(service(**spec))
    assert decoded.obj is None
    (rejection,) = decoded.rejections
    assert rejection.whole_object and rejection.field == field and reason in rejection.reason
    assert str(rejection).startswith("Service shop/web: ")


def test_bad_ports_are_dropped_alone_and_the_service_keeps_its_good_ports() -> None:
    decoded = decode(service(ports=[
        {"name": "ok", "port": 80},
        {"name": "big", "port": 70000},
        {"name": "proto", "port": 81, "protocol": "ICMP"},
        {"name": "target", "port": 82, "targetPort": "Not_A_Name"},
        {"name": "ok", "port": 83},
        {"name": "dup", "port": 80},
        {"port": 84},
        {"name": "strtarget", "port": 85, "targetPort": "8085"},
    ]))
    assert isinstance(decoded.obj, Service)
    assert [(p.name, p.port, p.target_port) for p in decoded.obj.ports] == [("ok", 80, 80), ("strtarget", 85, 8085)]
    assert fields(decoded) == ["spec.ports[1].port", "spec.ports[2].protocol", "spec.ports[3].targetPort",
                               "spec.ports[4].name", "spec.ports[5]", "spec.ports[6].name"]
    assert not any(r.whole_object for r in decoded.rejections)


def test_wrong_family_and_invalid_external_ips_are_dropped() -> None:
    decoded = decode(service(externalIPs=["192.0.2.1", "2001:db8::1", "192.0.2.01", " 192.0.2.2"],
                             clusterIPs=["10.96.0.10", "10.96.0.11"]))
    assert isinstance(decoded.obj, Service)
    assert decoded.obj.external_ips == (ip_address("192.0.2.1"),)
    assert decoded.obj.cluster_ips == (ip_address("10.96.0.10"),)
    assert fields(decoded) == ["spec.clusterIPs[1]", "spec.externalIPs[1]", "spec.externalIPs[2]",
                               "spec.externalIPs[3]"]
    assert "IPv6 but the Service is IPv4" in decoded.rejections[1].reason


def test_headless_and_external_name_are_recognized_and_skipped_with_a_reason() -> None:
    headless = decode(service(clusterIP="None")).obj
    assert isinstance(headless, Service) and headless.headless
    assert "headless" in (headless.skip_reason or "")
    external = decode(service(type="ExternalName", externalName="db.example.com", clusterIP=None)).obj
    assert isinstance(external, Service) and "ExternalName" in (external.skip_reason or "")


def test_endpoint_slice_conditions_follow_the_api_defaults() -> None:
    decoded = decode(endpoint_slice([
        {"addresses": ["10.244.1.2"], "nodeName": "n1", "zone": "a", "hints": {"forZones": [{"name": "a"}]},
         "targetRef": {"kind": "Pod", "name": "web-0"}},
        {"addresses": ["10.244.1.3"], "conditions": {"ready": False, "serving": True, "terminating": True}},
        {"addresses": ["10.244.1.4"], "conditions": {"ready": False}},
    ]))
    slice_ = decoded.obj
    assert isinstance(slice_, EndpointSlice) and decoded.rejections == ()
    first, terminating, unready = slice_.endpoints
    assert (first.conditions.ready, first.conditions.serving, first.conditions.terminating) == (True, True, False)
    assert first.target is not None and first.target.key == "shop/web-0" and first.hint_zones == ("a",)
    assert (terminating.conditions.ready, terminating.conditions.serving, terminating.conditions.terminating) == (
        False, True, True)
    # kube-proxy reads an unset serving as true even when ready is false (EndpointSliceCache.addEndpoints)
    assert (unready.conditions.ready, unready.conditions.serving) == (False, True)
    assert slice_.service.key == "shop/web"


def test_bad_endpoints_are_dropped_alone() -> None:
    decoded = decode(endpoint_slice([
        {"addresses": ["10.244.1.2"]},
        {"addresses": ["fd00::1"]},
        {"addresses": ["10.244.01.3"]},
        "garbage",
    ], ports=[{"name": "http", "port": 8080}, {"name": "bad", "port": 0}, {"name": "p", "protocol": "XTP"}]))
    slice_ = decoded.obj
    assert isinstance(slice_, EndpointSlice)
    assert [str(e.addresses[0]) for e in slice_.endpoints] == ["10.244.1.2"]
    assert [p.port for p in slice_.ports] == [8080]
    assert fields(decoded) == ["endpoints[1].addresses[0]", "endpoints[1]", "endpoints[2].addresses[0]",
                               "endpoints[2]", "endpoints[3]", "ports[1].port", "ports[2].protocol"]


def test_a_slice_without_its_service_label_is_rejected() -> None:
    raw = endpoint_slice([{"addresses": ["10.244.1.2"]}])
    del raw["metadata"]["labels"]
    decoded = decode(raw)
    assert decoded.obj is None and decoded.rejections[0].field == "metadata.labels[kubernetes.io/service-name]"


def test_mesh_policies_decode_and_unenforceable_rules_reject_the_policy() -> None:
    policy = {"apiVersion": "security.nodeagent.io/v1alpha1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "allow-client", "namespace": "demo"},
              "spec": {"action": "ALLOW", "selector": {"matchLabels": {"app": "echo"}},
                       "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}],
                                  "to": [{"operation": {"ports": ["8080"]}}]}]}}
    decoded = decode(policy)
    assert decoded.rejections == () and decoded.obj is not None
    assert decoded.obj.action is PolicyAction.ALLOW  # type: ignore[union-attr]
    assert decoded.obj.rules[0].operations[0].ports == (8080,)  # type: ignore[union-attr]
    l7 = copy.deepcopy(policy)
    l7["spec"]["rules"][0]["to"][0]["operation"]["methods"] = ["GET"]
    rejected = decode(l7)
    assert rejected.obj is None and "need L7" in rejected.rejections[0].reason
    peer = decode({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                   "metadata": {"name": "default", "namespace": "demo"}, "spec": {"mtls": {"mode": "STRICT"}}})
    assert peer.obj is not None and peer.obj.mode is PeerAuthenticationMode.STRICT  # type: ignore[union-attr]


def test_unknown_kinds_and_nameless_objects_are_rejected_with_a_reason() -> None:
    assert "unknown kind 'Deployment'" in decode({"kind": "Deployment", "metadata": {"name": "x"}}).rejections[0].reason
    assert decode({"kind": "Service", "metadata": {}}).rejections[0].field == "metadata.name"
    assert decode([1, 2]).rejections[0].reason == "not an object but list"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.text(max_size=12)
    | st.sampled_from(["10.96.0.1", "010.1.1.1", "fd00::1", "None", "TCP", "UDP", "ClientIP", "Local", "http"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "port", "ports", "protocol", "targetPort", "clusterIP", "clusterIPs", "addresses",
                         "endpoints", "conditions", "ready", "spec", "status", "selector", "type", "labels",
                         "nodePort", "podIPs", "ip", "rules", "from", "to", "source", "operation", "mtls"]),
        inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from([k.value for k in Kind]), spec=json_values, status=json_values, extra=json_values)
def test_decode_never_raises_and_every_rejection_is_explained(kind: str, spec: Any, status: Any, extra: Any) -> None:
    api = {"EndpointSlice": "discovery.k8s.io/v1", "AuthorizationPolicy": "security.nodeagent.io/v1alpha1",
           "PeerAuthentication": "security.istio.io/v1"}.get(kind, "v1")
    raw = {"apiVersion": api, "kind": kind, "metadata": {"name": "x", "namespace": "ns"}, "spec": spec,
           "status": status, "endpoints": extra, "ports": extra, "addressType": "IPv4"}
    decoded = decode(raw)
    for rejection in decoded.rejections:
        assert rejection.field and rejection.reason and rejection.ref.name in ("x", "<unknown>")
        assert "internal decoding error" not in rejection.reason, rejection
    if decoded.obj is None:
        assert any(r.whole_object for r in decoded.rejections)


@settings(max_examples=200, deadline=None)
@given(junk=json_values)
def test_a_valid_service_survives_a_malformed_extra_port(junk: Any) -> None:
    raw = service()
    raw["spec"]["ports"] = [raw["spec"]["ports"][0], junk]
    decoded = decode(raw)
    assert isinstance(decoded.obj, Service)
    assert decoded.obj.ports[0].port == 80 and decoded.obj.ports[0].name == "http"
