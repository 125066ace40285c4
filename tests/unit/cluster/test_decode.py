"""Decoding Kubernetes JSON into the model: what is kept, what is dropped alone, what rejects an object.

Plus a property: for any input, decode() never raises, every rejection names object, field and reason,
and a valid object survives any malformed sibling field being added.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.cluster.decode import decode, parse_cidr_sloppy, parse_ip_sloppy
from nodeagent.cluster.model import (
    AuthorizationPolicy,
    EndpointSlice,
    Kind,
    LoadBalancerIngress,
    LoadBalancerIPMode,
    Node,
    PeerAuthentication,
    PeerAuthenticationMode,
    Pod,
    PolicyAction,
    PolicyOperation,
    PolicySource,
    Protocol,
    Service,
    ServiceType,
    SessionAffinity,
    TrafficPolicy,
)
from nodeagent.lab.manifests import load_default
from nodeagent.lab.topology import build_topology


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
    assert svc.load_balancer_ingress == (LoadBalancerIngress(ip_address("198.51.100.1")),)
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
    ({"clusterIP": "10.96.0.300"}, "spec.clusterIP", "not a valid IP"),
    ({"clusterIP": "10.96.0x0.1"}, "spec.clusterIP", "not a valid IP"),
    ({"clusterIP": " 10.96.0.10"}, "spec.clusterIP", "not a valid IP"),
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
    # kube-proxy's MapIPsByIPFamily does not trim: " 192.0.2.2" is not an address to it either
    decoded = decode(service(externalIPs=["192.0.2.1", "2001:db8::1", "192.0.2.300", " 192.0.2.2"],
                             clusterIPs=["10.96.0.10", "10.96.0.11"]))
    assert isinstance(decoded.obj, Service)
    assert decoded.obj.external_ips == (ip_address("192.0.2.1"),)
    assert decoded.obj.cluster_ips == (ip_address("10.96.0.10"),)
    assert fields(decoded) == ["spec.clusterIPs[1]", "spec.externalIPs[1]", "spec.externalIPs[2]",
                               "spec.externalIPs[3]"]
    assert "IPv6 but the Service is IPv4" in decoded.rejections[1].reason
    assert "'192.0.2.300' is not a valid IP address" in decoded.rejections[2].reason


def test_legacy_addresses_are_read_as_kube_proxy_reads_them_and_reported() -> None:
    """ParseIPSloppy: leading zeros are decimal (010 is 10, not 8), an IPv4-mapped address is IPv4."""
    decoded = decode(service(clusterIPs=["010.096.000.010", "fd00::0010"],
                             externalIPs=["192.0.2.01", "::ffff:192.0.2.2", "192.0.2.3"]))
    assert isinstance(decoded.obj, Service) and decoded.rejections == ()
    assert decoded.obj.cluster_ips == (ip_address("10.96.0.10"), ip_address("fd00::10"))
    assert decoded.obj.external_ips == (ip_address("192.0.2.1"), ip_address("192.0.2.2"), ip_address("192.0.2.3"))
    assert [str(c) for c in decoded.canonicalized] == [
        "Service shop/web: spec.clusterIPs[0]: '010.096.000.010' read as 10.96.0.10",
        "Service shop/web: spec.externalIPs[0]: '192.0.2.01' read as 192.0.2.1",
        "Service shop/web: spec.externalIPs[1]: '::ffff:192.0.2.2' read as 192.0.2.2",
    ]


def test_legacy_source_ranges_are_trimmed_and_masked_as_kube_proxy_does() -> None:
    """MapCIDRsByIPFamily: TrimSpace, then ParseCIDRSloppy's network (host bits masked); a netmask or a
    prefix beyond the family is not a CIDR to it."""
    decoded = decode(service(type="LoadBalancer", loadBalancerSourceRanges=[
        "203.0.113.000/025", " 198.51.100.7/24 ", "192.0.2.0/24", "10.0.0.0/255.0.0.0", "10.0.0.0/33", ""]))
    assert isinstance(decoded.obj, Service)
    assert decoded.obj.load_balancer_source_ranges == (
        ip_network("203.0.113.0/25"), ip_network("198.51.100.0/24"), ip_network("192.0.2.0/24"))
    assert [(c.field, c.written) for c in decoded.canonicalized] == [
        ("spec.loadBalancerSourceRanges[0]", "203.0.113.000/025"),
        ("spec.loadBalancerSourceRanges[1]", " 198.51.100.7/24 ")]
    assert fields(decoded) == ["spec.loadBalancerSourceRanges[3]", "spec.loadBalancerSourceRanges[4]",
                               "spec.loadBalancerSourceRanges[5]"]


@pytest.mark.parametrize(("written", "expected"), [
    ("172.30.0.041", "172.30.0.41"), ("0001.02.003.0004", "1.2.3.4"), ("099.0.0.1", "99.0.0.1"),
    ("::ffff:1.2.3.004", "1.2.3.4"), ("::ffff:0102:0304", "1.2.3.4"), ("00001::1", "1::1"),
    ("2001:db8::10.0.0.01", "2001:db8::a00:1"), ("::", "::"),
    ("172.17.0.300", None), ("0x0a.0.0.1", None), (" 10.0.0.1", None), ("10.0.0.1 ", None), ("10.0.0", None),
    ("10.0.0.1.2", None), ("10..0.1", None), ("fe80::1%eth0", None), ("1::2::3", None), ("1:2:3:4:5:6:7:8::", None),
    ("\uff11.2.3.4", None), ("", None),
])
def test_parse_ip_sloppy_is_go_1_16s_parse_ip(written: str, expected: str | None) -> None:
    parsed = parse_ip_sloppy(written.encode().decode("unicode_escape"))
    assert (None if parsed is None else str(parsed)) == expected


@pytest.mark.parametrize(("written", "expected"), [
    ("203.0.113.000/025", "203.0.113.0/25"), ("203.0.113.77/25", "203.0.113.0/25"), ("0.0.0.0/0", "0.0.0.0/0"),
    ("2001:db8::1/032", "2001:db8::/32"), ("::ffff:1.2.3.4/120", "1.2.3.0/24"),
    ("10.0.0.0/255.0.0.0", None), ("10.0.0.0/33", None), ("10.0.0.0/", None), ("10.0.0.0/+8", None),
    (" 10.0.0.0/8", None), ("10.0.0.300/8", None), ("10.0.0.0", None), ("fd00::/129", None),
])
def test_parse_cidr_sloppy_is_go_1_16s_parse_cidr(written: str, expected: str | None) -> None:
    parsed = parse_cidr_sloppy(written)
    assert (None if parsed is None else str(parsed)) == expected


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
        {"addresses": ["10.244.1.300"]},
        "garbage",
        {"addresses": ["10.244.01.3"]},  # a legacy address: kube-proxy reads it as 10.244.1.3
    ], ports=[{"name": "http", "port": 8080}, {"name": "bad", "port": 0}, {"name": "p", "protocol": "XTP"}]))
    slice_ = decoded.obj
    assert isinstance(slice_, EndpointSlice)
    assert [str(e.addresses[0]) for e in slice_.endpoints] == ["10.244.1.2", "10.244.1.3"]
    assert [(c.field, c.written, c.canonical) for c in decoded.canonicalized] == [
        ("endpoints[4].addresses[0]", "10.244.01.3", "10.244.1.3")]
    assert [p.port for p in slice_.ports] == [8080]
    assert fields(decoded) == ["endpoints[1].addresses[0]", "endpoints[1]", "endpoints[2].addresses[0]",
                               "endpoints[2]", "endpoints[3]", "ports[1].port", "ports[2].protocol"]


def test_a_slice_without_its_service_label_is_rejected() -> None:
    raw = endpoint_slice([{"addresses": ["10.244.1.2"]}])
    del raw["metadata"]["labels"]
    decoded = decode(raw)
    assert decoded.obj is None and decoded.rejections[0].field == "metadata.labels[kubernetes.io/service-name]"


def mesh_policy(spec: dict[str, Any], kind: str = "AuthorizationPolicy") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"name": "p", "namespace": "shop"},
            "spec": spec}


def test_mesh_policies_decode_every_l4_field() -> None:
    decoded = decode(mesh_policy({"action": "DENY", "selector": {"matchLabels": {"app": "echo"}}, "rules": [{
        "from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"], "notNamespaces": ["x"],
                             "ipBlocks": ["10.0.0.0/8", "192.0.2.1", "fd00::/8", "fd00::1"],
                             "notIpBlocks": ["10.1.0.0/16"], "remoteIpBlocks": ["203.0.113.0/24"],
                             "notRemoteIpBlocks": ["2001:db8::1"]}},
                 {"source": {"serviceAccounts": ["demo/client", "robot"], "notServiceAccounts": ["shop/x"]}}],
        "to": [{"operation": {"ports": ["8080", 9090], "notPorts": ["22"]}}],
        "when": [{"key": "source.ip", "values": ["10.2.0.0/16"], "notValues": ["10.2.0.1"]},
                 {"key": "remote.ip", "values": ["10.3.0.0/16"]},
                 {"key": "source.namespace", "values": ["demo"]},
                 {"key": "source.principal", "notValues": ["*/sa/bad"]},
                 {"key": "destination.ip", "values": ["10.244.0.0/16"]},
                 {"key": "destination.port", "values": ["8080"], "notValues": ["9090"]}]}]}))
    assert decoded.rejections == () and isinstance(decoded.obj, AuthorizationPolicy)
    policy = decoded.obj
    assert policy.action is PolicyAction.DENY and policy.selector == {"app": "echo"}
    rule = policy.rules[0]
    assert rule.all_unenforceable == ()
    first, second = rule.sources
    assert first.principals == ("cluster.local/ns/demo/sa/client",) and first.not_namespaces == ("x",)
    assert first.ip_blocks == (ip_network("10.0.0.0/8"), ip_network("192.0.2.1/32"), ip_network("fd00::/8"),
                               ip_network("fd00::1/128"))
    assert first.not_ip_blocks == (ip_network("10.1.0.0/16"),)
    assert first.remote_ip_blocks == (ip_network("203.0.113.0/24"),)
    assert first.not_remote_ip_blocks == (ip_network("2001:db8::1/128"),)
    # a bare service account is in the policy's own namespace (Istio's Source.serviceAccounts)
    assert second.service_accounts == (("demo", "client"), ("shop", "robot"))
    assert second.not_service_accounts == (("shop", "x"),)
    assert rule.operations == (PolicyOperation(ports=(8080, 9090), not_ports=(22,)),)
    by_key = {c.key: c for c in rule.conditions}
    assert by_key["source.ip"].source == PolicySource(ip_blocks=(ip_network("10.2.0.0/16"),),
                                                      not_ip_blocks=(ip_network("10.2.0.1/32"),))
    assert by_key["remote.ip"].source == PolicySource(remote_ip_blocks=(ip_network("10.3.0.0/16"),))
    assert by_key["source.namespace"].source == PolicySource(namespaces=("demo",))
    assert by_key["source.principal"].source == PolicySource(not_principals=("*/sa/bad",))
    assert by_key["destination.ip"].operation == PolicyOperation(destination_ips=(ip_network("10.244.0.0/16"),))
    assert by_key["destination.port"].operation == PolicyOperation(ports=(8080,), not_ports=(9090,))


@pytest.mark.parametrize(("rule", "field", "reason"), [
    ({"to": [{"operation": {"methods": ["GET"]}}]}, "rules[0].to[0].operation.methods", "is L7"),
    ({"to": [{"operation": {"ports": ["80"], "paths": ["/a"], "hosts": ["h"]}}]},
     "rules[0].to[0].operation.hosts", "is L7"),
    ({"to": [{"operation": {"notPaths": ["/a"]}}]}, "rules[0].to[0].operation.notPaths", "is L7"),
    ({"from": [{"source": {"requestPrincipals": ["*"]}}]}, "rules[0].from[0].source.requestPrincipals", "is L7"),
    ({"from": [{"source": {"namespaces": ["a"]}}, {"source": {"notRequestPrincipals": ["a/b"]}}]},
     "rules[0].from[1].source.notRequestPrincipals", "is L7"),
    ({"when": [{"key": "request.headers[x]", "values": ["y"]}]}, "rules[0].when[0]", "(request.headers[x]) is L7"),
    ({"when": [{"key": "connection.sni", "values": ["y"]}]}, "rules[0].when[0]", "(connection.sni) is L7"),
    ({"when": [{"key": "source.serviceAccount", "values": ["y"]}]}, "rules[0].when[0]",
     "(source.serviceAccount) is not a condition key of Istio"),
    ({"when": [{"key": "destination.port"}]}, "rules[0].when[0]", "(destination.port) has neither values"),
    ({"when": [{"values": ["x"]}]}, "rules[0].when[0]", "has no key"),
    ({"when": [{"key": "source.ip", "values": ["10.0.0.0/33"]}]}, "rules[0].when[0].values[0]",
     "is not an IP address or CIDR"),
    ({"from": [{"source": {"ipBlocks": ["10.0.0.0/8", "010.0.0.1"]}}]}, "rules[0].from[0].source.ipBlocks[1]",
     "is not an IP address or CIDR"),
    ({"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}, "rules[0].from[0].source.serviceAccounts[0]",
     "is not a service account"),
    ({"from": [{"source": {"principals": [""]}}]}, "rules[0].from[0].source.principals",
     "is not a list of non-empty strings"),
    ({"to": [{"operation": {"ports": ["0"]}}]}, "rules[0].to[0].operation.ports[0]", "is not a port"),
    ({"to": [{"operation": {"ports": "80"}}]}, "rules[0].to[0].operation.ports", "is not a list"),
    ({"from": [{"source": {"ipRanges": ["x"]}}]}, "rules[0].from[0].source.ipRanges", "is not a field"),
    ({"from": [{"source": {}}]}, "rules[0].from[0].source", "is empty"),
    ({"from": [{}]}, "rules[0].from[0].source", "is not an object"),
    ({"to": [{"operation": {}}]}, "rules[0].to[0].operation", "is empty"),
    ({"other": 1}, "rules[0].other", "is not a field"),
])
def test_unenforceable_parts_are_kept_on_the_rule_and_reported_with_what_the_tunnel_does(
        rule: dict[str, Any], field: str, reason: str) -> None:
    for action, effect in (("ALLOW", "this ALLOW rule matches nothing"),
                           ("DENY", "this DENY rule denies on its other parts alone")):
        decoded = decode(mesh_policy({"action": action, "rules": [rule]}))
        assert isinstance(decoded.obj, AuthorizationPolicy), decoded.rejections  # never the whole policy
        parts = {u.field: u for u in decoded.obj.rules[0].all_unenforceable}
        assert field in parts and reason in parts[field].reason, parts
        rejection = next(r for r in decoded.rejections if r.field == f"spec.{field}")
        assert not rejection.whole_object and rejection.reason.endswith(effect), rejection
        assert rejection.reason.startswith(parts[field].reason)


def test_an_empty_l7_list_constrains_nothing_and_is_not_reported() -> None:
    decoded = decode(mesh_policy({"rules": [{"to": [{"operation": {"ports": ["80"], "methods": []}}]}]}))
    assert decoded.rejections == () and decoded.obj.rules[0].all_unenforceable == ()  # type: ignore[union-attr]


def test_rules_that_are_not_a_list_are_one_rule_that_cannot_be_enforced() -> None:
    decoded = decode(mesh_policy({"action": "DENY", "rules": {"from": []}}))
    assert isinstance(decoded.obj, AuthorizationPolicy) and len(decoded.obj.rules) == 1
    assert decoded.obj.rules[0].unenforceable[0].field == "rules"


@pytest.mark.parametrize("action", ["AUDIT", "CUSTOM"])
def test_audit_and_custom_are_kept_and_reported_as_not_enforced(action: str) -> None:
    decoded = decode(mesh_policy({"action": action, "provider": {"name": "ext"}, "rules": [
        {"to": [{"operation": {"paths": ["/admin"]}}]}]}))
    assert isinstance(decoded.obj, AuthorizationPolicy) and decoded.obj.action is PolicyAction(action)
    assert [(r.field, r.whole_object) for r in decoded.rejections] == [("spec.action", False)]
    assert "not enforced by the tunnel" in decoded.rejections[0].reason
    assert decode(mesh_policy({"action": "BLOCK"})).obj is None  # not an action at all


def test_target_refs_are_reported() -> None:
    decoded = decode(mesh_policy({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}], "rules": [{}]}))
    assert decoded.obj is not None and fields(decoded) == ["spec.targetRefs"]


def test_peer_authentication_modes_unset_and_port_level_mtls() -> None:
    strict = decode(mesh_policy({"mtls": {"mode": "STRICT"}}, "PeerAuthentication"))
    assert isinstance(strict.obj, PeerAuthentication) and strict.obj.mode is PeerAuthenticationMode.STRICT
    specs: list[dict[str, Any]] = [{}, {"mtls": {}}, {"mtls": {"mode": "UNSET"}}]
    for spec in specs:
        unset = decode(mesh_policy(spec, "PeerAuthentication"))
        assert unset.rejections == () and unset.obj.mode is PeerAuthenticationMode.UNSET  # type: ignore[union-attr]
    disable = decode(mesh_policy({"mtls": {"mode": "DISABLE"}}, "PeerAuthentication"))
    assert disable.obj.mode is PeerAuthenticationMode.DISABLE  # type: ignore[union-attr]
    ports = decode(mesh_policy({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {
        "8080": {"mode": "PERMISSIVE"}, "9090": {"mode": "STRICT"}, "7070": {}}}, "PeerAuthentication"))
    assert ports.rejections == () and isinstance(ports.obj, PeerAuthentication)
    assert ports.obj.mode is PeerAuthenticationMode.UNSET
    assert dict(ports.obj.port_level_mtls) == {8080: PeerAuthenticationMode.PERMISSIVE,
                                               9090: PeerAuthenticationMode.STRICT, 7070: PeerAuthenticationMode.UNSET}
    # Istio honours portLevelMtls only with a selector
    no_selector = decode(mesh_policy({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}},
                                     "PeerAuthentication"))
    assert isinstance(no_selector.obj, PeerAuthentication) and no_selector.obj.port_level_mtls == {}
    assert fields(no_selector) == ["spec.portLevelMtls"] and not no_selector.rejections[0].whole_object
    bad_port = decode(mesh_policy({"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"http": {}}},
                                  "PeerAuthentication"))
    assert bad_port.obj is None and fields(bad_port) == ["spec.portLevelMtls[http]"]


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
                         "nodePort", "podIPs", "ip", "rules", "from", "to", "source", "operation", "mtls", "when",
                         "key", "values", "notValues", "ipBlocks", "serviceAccounts", "methods", "action", "mode",
                         "portLevelMtls", "8080", "matchLabels"]),
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


def test_an_ipv4_mapped_endpoint_address_is_ipv4_as_kube_proxy_reads_it() -> None:
    v4 = decode(endpoint_slice([{"addresses": ["::ffff:10.244.1.2"]}]))
    assert isinstance(v4.obj, EndpointSlice) and v4.obj.endpoints[0].addresses == (ip_address("10.244.1.2"),)
    assert [c.canonical for c in v4.canonicalized] == ["10.244.1.2"]
    v6 = decode(endpoint_slice([{"addresses": ["::ffff:10.244.1.2"]}, {"addresses": ["fd00::1"]}],
                               address_type="IPv6"))
    assert isinstance(v6.obj, EndpointSlice) and [e.addresses for e in v6.obj.endpoints] == [(ip_address("fd00::1"),)]
    assert fields(v6) == ["endpoints[0].addresses[0]", "endpoints[0]"] and v6.canonicalized == ()


def test_load_balancer_ingress_keeps_its_ip_mode_as_kube_proxy_reads_it() -> None:
    """newBaseServiceInfo: no IP (hostname-only or "") skipped silently; Proxy mode exempt from the family
    check; an ipMode other than VIP/Proxy is not VIP (no rule), dropped with the field named."""
    raw = service(type="LoadBalancer")
    raw["status"] = {"loadBalancer": {"ingress": [
        {"ip": "198.51.100.1", "ipMode": "VIP"}, {"ip": "198.51.100.2", "ipMode": "Proxy"}, {"ip": "198.51.100.3"},
        {"hostname": "lb.example"}, {"ip": ""}, {"ip": "2001:db8::1", "ipMode": "Proxy"},
        {"ip": "198.51.100.4", "ipMode": "Tunnel"}, {"ip": "2001:db8::2"}]}}
    decoded = decode(raw)
    assert isinstance(decoded.obj, Service)
    assert [(str(i.ip), i.ip_mode, i.is_vip) for i in decoded.obj.load_balancer_ingress] == [
        ("198.51.100.1", LoadBalancerIPMode.VIP, True), ("198.51.100.2", LoadBalancerIPMode.PROXY, False),
        ("198.51.100.3", None, True), ("2001:db8::1", LoadBalancerIPMode.PROXY, False)]
    assert fields(decoded) == ["status.loadBalancer.ingress[6].ipMode", "status.loadBalancer.ingress[7].ip"]
    assert "'Tunnel' is not VIP or Proxy" in decoded.rejections[0].reason


def test_node_hints_are_read_beside_zone_hints() -> None:
    decoded = decode(endpoint_slice([
        {"addresses": ["10.244.1.2"], "hints": {"forZones": [{"name": "a"}], "forNodes": [{"name": "n1"}, {"x": 1}]}},
        {"addresses": ["10.244.1.3"], "hints": {"forNodes": "n1"}},
    ]))
    assert isinstance(decoded.obj, EndpointSlice)
    hinted, malformed = decoded.obj.endpoints
    assert (hinted.hint_zones, hinted.hint_nodes) == (("a",), ("n1",))
    assert malformed.hint_nodes == () and fields(decoded) == ["endpoints[1].hints.forNodes"]


@pytest.mark.parametrize(("metadata", "spec", "deleting", "taints"), [
    ({}, {}, False, frozenset()),
    ({"deletionTimestamp": "2026-12-07T01:00:00Z"}, {}, True, frozenset()),
    ({}, {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1733", "effect": "NoSchedule"},
                     {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]},
     False, frozenset({"ToBeDeletedByClusterAutoscaler", "node.kubernetes.io/unschedulable"})),
])
def test_a_node_says_whether_it_is_going_away(metadata: dict[str, Any], spec: dict[str, Any], deleting: bool,
                                              taints: frozenset[str]) -> None:
    """kube-proxy's /healthz reads the Node's deletionTimestamp and taints (nodeEligible)."""
    decoded = decode({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1", **metadata}, "spec": spec,
                      "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}})
    node = decoded.obj
    assert isinstance(node, Node) and not decoded.rejections
    assert node.being_deleted is deleting and node.taint_keys == taints


def test_a_pods_uid_and_qos_class_name_its_cgroup_and_a_bad_class_is_rejected_by_field() -> None:
    raw = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1"},
           "spec": {"nodeName": "node1"},
           "status": {"phase": "Running", "podIP": "10.244.1.2", "qosClass": "Burstable"}}
    decoded = decode(raw)
    assert isinstance(decoded.obj, Pod) and (decoded.obj.uid, decoded.obj.qos_class) == ("u-1", "Burstable")
    raw["status"]["qosClass"] = "Platinum"
    decoded = decode(raw)
    assert isinstance(decoded.obj, Pod) and decoded.obj.qos_class == ""
    [rejection] = decoded.rejections
    assert rejection.field == "status.qosClass" and "Platinum" in rejection.reason
