"""`inspect` and `trace` on a dual-stack node: IPv6 frontends from the IPv6 proxier's chains (`[ip]:port`), an
IPv6 cluster IP and an IPv6 pod address traced to their endpoints, the NodePort of each family."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

from nodeagent.inspect.model import ServicePath
from nodeagent.inspect.paths import frontend_key, iptables_paths, split_host_port
from nodeagent.inspect.trace import CONNECTED, TraceInput, predict
from nodeagent.service.config import ProxySettings, proxy_config
from nodeagent.state.tracker import Snapshot
from tests.support import objects as k8s
from tests.support.inspect_objects import snapshot


def dual_node(name: str, ip: str, ip6: str, cidr: str, cidr6: str) -> dict[str, Any]:
    body = k8s.node(name, ip, cidr)
    body["spec"]["podCIDRs"] = [cidr, cidr6]
    body["status"]["addresses"].append({"type": "InternalIP", "address": ip6})
    return body


def dual_pod(name: str, ip: str, ip6: str, node: str, **labels: str) -> dict[str, Any]:
    body = k8s.pod(name, ip, node, **labels)
    body["status"]["podIPs"] = [{"ip": ip}, {"ip": ip6}]
    return body


OBJECTS: list[dict[str, Any]] = [
    dual_node("node1", "172.18.0.2", "fd00:18::2", "10.244.1.0/24", "fd00:10:244:1::/64"),
    dual_node("node2", "172.18.0.3", "fd00:18::3", "10.244.2.0/24", "fd00:10:244:2::/64"),
    k8s.namespace("shop"),
    dual_pod("client", "10.244.1.5", "fd00:10:244:1::5", "node1", app="client"),
    dual_pod("web-1", "10.244.1.2", "fd00:10:244:1::2", "node1", app="web"),
    dual_pod("web-2", "10.244.2.2", "fd00:10:244:2::2", "node2", app="web"),
    k8s.service("web", ports=[{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}],
                type="NodePort", clusterIPs=["10.96.0.10", "fd00:10:96::a"], ipFamilies=["IPv4", "IPv6"],
                ipFamilyPolicy="PreferDualStack"),
    k8s.endpoint_slice("web-4", "web", [k8s.endpoint("10.244.1.2", "node1", pod="web-1"),
                                        k8s.endpoint("10.244.2.2", "node2", pod="web-2")]),
    k8s.endpoint_slice("web-6", "web", [k8s.endpoint("fd00:10:244:1::2", "node1", pod="web-1"),
                                        k8s.endpoint("fd00:10:244:2::2", "node2", pod="web-2")], address_type="IPv6"),
    k8s.service("six", cluster_ip="fd00:10:96::b", ipFamilies=["IPv6"], selector={"app": "web"}),
    k8s.endpoint_slice("six-6", "six", [k8s.endpoint("fd00:10:244:2::2", "node2", pod="web-2")], address_type="IPv6"),
]
NODE_IPS = (ip_address("172.18.0.2"), ip_address("fd00:18::2"))


def paths(state: Snapshot, ipv6: bool = True) -> list[ServicePath]:
    settings = ProxySettings()
    config6 = proxy_config("node1", settings, state, (), family=6) if ipv6 else None
    return iptables_paths(state.service_ports, state.endpoints, proxy_config("node1", settings, state, ()),
                          NODE_IPS, config6)


def test_ipv6_frontends_follow_the_ip6tables_chains_to_ipv6_endpoints() -> None:
    state = snapshot(OBJECTS)
    found = {p.frontend: p for p in paths(state)}
    assert set(found) == {"10.96.0.10:80/TCP", "<node>:30080/TCP", "[fd00:10:96::a]:80/TCP", "[<node>]:30080/TCP",
                          "[fd00:10:96::b]:80/TCP"}
    six = found["[fd00:10:96::a]:80/TCP"]
    assert six.verdict == "translated" and six.via.startswith("KUBE-SERVICES -> KUBE-SVC-")
    assert sorted((e.address, e.probability) for e in six.endpoints) == [
        ("[fd00:10:244:1::2]:8080", 0.5), ("[fd00:10:244:2::2]:8080", 0.5)]
    assert [e.address for e in found["[fd00:10:96::b]:80/TCP"].endpoints] == ["[fd00:10:244:2::2]:8080"]
    assert sorted(e.address for e in found["[<node>]:30080/TCP"].endpoints) == [
        "[fd00:10:244:1::2]:8080", "[fd00:10:244:2::2]:8080"]
    # the IPv4 frontends are the IPv4 proxier's, as before
    assert sorted(e.address for e in found["10.96.0.10:80/TCP"].endpoints) == ["10.244.1.2:8080", "10.244.2.2:8080"]


def test_without_the_ipv6_configuration_only_ipv4_frontends() -> None:
    assert all("[" not in p.frontend for p in paths(snapshot(OBJECTS), ipv6=False))


def given(state: Snapshot, ip: str, port: int) -> TraceInput:
    return TraceInput("shop/client", ip, port, "tcp", "iptables", paths(state), tuple(str(a) for a in NODE_IPS))


def test_trace_to_an_ipv6_cluster_ip() -> None:
    state = snapshot(OBJECTS)
    trace = predict(state, "node1", given(state, "fd00:10:96::a", 80))
    assert trace.destination == "[fd00:10:96::a]:80" and trace.outcome == CONNECTED
    assert trace.pods() == {"shop/web-1", "shop/web-2"}
    assert sorted(h.address for h in trace.hops) == ["[fd00:10:244:1::2]:8080", "[fd00:10:244:2::2]:8080"]
    assert all(h.via.startswith("KUBE-SEP-") for h in trace.hops)
    assert any("[fd00:10:96::a]:80/TCP is Service shop/web:http" in step for step in trace.steps)


def test_trace_to_an_ipv6_pod_address_and_an_ipv6_node_port() -> None:
    state = snapshot(OBJECTS)
    direct = predict(state, "node1", given(state, "fd00:10:244:2::2", 8080))
    assert direct.pods() == {"shop/web-2"} and [h.node for h in direct.hops] == ["node2"]
    assert any("is no Service frontend: routed as is" in step for step in direct.steps)
    nodeport = predict(state, "node1", given(state, "fd00:18::2", 30080))
    assert sorted(h.address for h in nodeport.hops) == ["[fd00:10:244:1::2]:8080", "[fd00:10:244:2::2]:8080"]
    ipv4 = predict(state, "node1", given(state, "172.18.0.2", 30080))
    assert sorted(h.address for h in ipv4.hops) == ["10.244.1.2:8080", "10.244.2.2:8080"]


def test_addresses_are_split_and_keyed_per_family() -> None:
    assert split_host_port("[fd00::1]:80") == ("fd00::1", 80)
    assert split_host_port("10.0.0.1:80") == ("10.0.0.1", 80)
    six = ServicePath("s", "[fd00:10:96::a]:80/TCP", "ClusterIP", "", (), "translated")
    key = frontend_key(six)
    assert key is not None and (key.ip, key.port, key.family) == ("fd00:10:96::a", 80, 6)
    assert frontend_key(ServicePath("s", "[<node>]:30080/TCP", "NodePort", "", (), "translated")) is None
