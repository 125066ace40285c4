"""A dual-stack lab: IPv6 ranges beside IPv4 ones, addresses mirrored, routes per family, EndpointSlices per
address type; an IPv4-only lab unchanged."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from nodeagent.lab.errors import LabManifestError
from nodeagent.lab.manifests import DUAL_STACK_CONFIG, load_default, parse_text
from nodeagent.lab.plan import plan_lab
from nodeagent.lab.topology import LabTopology, build_topology

NODES = """
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.244.1.0/24}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
spec: {podCIDR: 10.244.2.0/24}
---
apiVersion: v1
kind: Pod
metadata: {name: a, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, command: [nodeagent, workload, idle], ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: b, labels: {app: web}}
spec:
  nodeName: n2
  containers: [{name: c, command: [nodeagent, workload, idle], ports: [{name: http, containerPort: 8080}]}]
"""


def service(name: str, extra: str = "") -> str:
    return f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
{extra}"""


def build(text: str) -> LabTopology:
    return build_topology(list(parse_text(text, "lab.yaml")))


def problems(text: str) -> list[str]:
    with pytest.raises(LabManifestError) as caught:
        build(text)
    return [str(p) for p in caught.value.problems]


def docs(topology: LabTopology, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: dict(d) for d in topology.documents if d["kind"] == kind}


DUAL = DUAL_STACK_CONFIG + "---\n" + NODES


def test_an_ipv4_lab_has_no_ipv6_anywhere() -> None:
    topology = build(NODES + service("web"))
    assert not topology.dual_stack
    assert all(n.address6 is None and n.pod_cidr6 is None for n in topology.nodes)
    assert all(p.ip6 is None for p in topology.pods)
    web = docs(topology, "Service")["web"]["spec"]
    assert (web["clusterIPs"], web["ipFamilies"], web["ipFamilyPolicy"]) == (["10.96.0.10"], ["IPv4"], "SingleStack")
    assert {d["addressType"] for d in docs(topology, "EndpointSlice").values()} == {"IPv4"}
    assert "LabConfig" not in {d["kind"] for d in topology.documents}
    plan = plan_lab("t", topology)
    assert all(r.dst.version == 4 for n in plan.nodes for r in n.routes)
    assert all(r.dst.version == 4 for p in plan.pods for r in p.routes)


def test_a_dual_stack_lab_mirrors_every_ipv4_address() -> None:
    topology = build(DUAL)
    assert topology.dual_stack
    assert {n.name: (str(n.address6), str(n.pod_cidr6)) for n in topology.nodes} == {
        "n1": ("fd00:18::2", "fd00:10:244:1::/64"), "n2": ("fd00:18::3", "fd00:10:244:2::/64")}
    assert {p.name: [str(ip) for ip in p.ips] for p in topology.pods} == {
        "a": ["10.244.1.2", "fd00:10:244:1::2"], "b": ["10.244.2.2", "fd00:10:244:2::2"]}
    assert topology.api_server_address6 == IPv6Address("fd00:18::fe")
    nodes = docs(topology, "Node")
    assert nodes["n1"]["spec"]["podCIDRs"] == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    assert [a["address"] for a in nodes["n1"]["status"]["addresses"] if a["type"] == "InternalIP"] == [
        "172.18.0.2", "fd00:18::2"]
    pod_a = docs(topology, "Pod")["a"]["status"]
    assert pod_a["podIP"] == "10.244.1.2"
    assert pod_a["podIPs"] == [{"ip": "10.244.1.2"}, {"ip": "fd00:10:244:1::2"}]


def test_a_dual_stack_lab_reads_back_as_the_same_lab() -> None:
    """`lab.load` builds the topology again from the resolved manifests: the ranges must survive."""
    config = DUAL_STACK_CONFIG.replace("fd00:10:96::/112", "fd00:99::/112")
    first = build(config + "---\n" + NODES + service("web", "  ipFamilyPolicy: PreferDualStack\n"))
    again = build_topology(list(parse_text("---\n".join(_dump(d) for d in first.documents), "resolved")))
    assert again.service_cidr6 == IPv6Network("fd00:99::/112")
    assert again.nodes == first.nodes and again.pods == first.pods


def _dump(doc: Any) -> str:
    import yaml

    return str(yaml.safe_dump(doc))


def test_ipv6_on_one_node_makes_the_whole_lab_dual_stack() -> None:
    text = NODES.replace("spec: {podCIDR: 10.244.2.0/24}",
                         "spec: {podCIDR: 10.244.2.0/24, podCIDRs: [10.244.2.0/24, 'fd00:77::/64']}\n"
                         "status: {addresses: [{type: InternalIP, address: 172.18.0.9}, "
                         "{type: InternalIP, address: 'fd00:18::99'}]}")
    topology = build(text)
    n1, n2 = topology.nodes
    assert (str(n2.address6), str(n2.pod_cidr6)) == ("fd00:18::99", "fd00:77::/64")
    assert (str(n1.address6), str(n1.pod_cidr6)) == ("fd00:18::2", "fd00:10:244:1::/64")
    assert str(topology.pods[1].ip6) == "fd00:77::2"
    assert topology.service_cidr6 == IPv6Network("fd00:10:96::/112")


def test_dual_stack_routes_per_family() -> None:
    plan = plan_lab("t", build(DUAL))
    node1 = plan.node("n1")
    assert [str(r) for r in node1.routes] == [
        "10.244.2.0/24 dev eth0 via 172.18.0.3", "10.96.0.0/12 dev eth0 scope link",
        "fd00:10:244:2::/64 dev eth0 via fd00:18::3", "fd00:10:96::/112 dev eth0 scope link"]
    assert node1.prefixlen6 == 64
    assert [str(r) for r in plan.pod("a").routes] == [
        "10.244.1.1/32 dev eth0 scope link", "0.0.0.0/0 dev eth0 via 10.244.1.1",
        "fd00:10:244:1::1/128 dev eth0 scope link", "::/0 dev eth0 via fd00:10:244:1::1"]


@pytest.mark.parametrize(("extra", "families", "policy", "ips"), [
    ("", ["IPv4"], "SingleStack", ["10.96.0.10"]),
    ("  ipFamilyPolicy: PreferDualStack\n", ["IPv4", "IPv6"], "PreferDualStack", ["10.96.0.10", "fd00:10:96::a"]),
    ("  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6]\n", ["IPv6", "IPv4"], "RequireDualStack",
     ["fd00:10:96::a", "10.96.0.10"]),
    ("  ipFamilies: [IPv6]\n", ["IPv6"], "SingleStack", ["fd00:10:96::a"]),
    ("  clusterIP: 'fd00:10:96::99'\n", ["IPv6"], "SingleStack", ["fd00:10:96::99"]),
    ("  ipFamilyPolicy: PreferDualStack\n  clusterIP: 10.96.0.50\n", ["IPv4", "IPv6"], "PreferDualStack",
     ["10.96.0.50", "fd00:10:96::a"]),
])
def test_services_get_families_and_cluster_ips_as_kube_apiserver_gives_them(
        extra: str, families: list[str], policy: str, ips: list[str]) -> None:
    spec = docs(build(DUAL + service("web", extra)), "Service")["web"]["spec"]
    assert (spec["ipFamilies"], spec["ipFamilyPolicy"], spec["clusterIPs"], spec["clusterIP"]) == (
        families, policy, ips, ips[0])


def test_prefer_dual_stack_in_an_ipv4_lab_is_single_stack() -> None:
    spec = docs(build(NODES + service("web", "  ipFamilyPolicy: PreferDualStack\n")), "Service")["web"]["spec"]
    assert (spec["ipFamilies"], spec["clusterIPs"]) == (["IPv4"], ["10.96.0.10"])


@pytest.mark.parametrize(("extra", "expected"), [
    ("  ipFamilyPolicy: RequireDualStack\n",
     "Service default/web: spec.ipFamilyPolicy: this cluster is not configured for dual-stack services"),
    ("  ipFamilies: [IPv6]\n", "Service default/web: spec.ipFamilies[0]: IPv6 is not configured on this cluster"),
    ("  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv4, IPv6]\n",
     "Service default/web: spec.ipFamilyPolicy: must be 'RequireDualStack' or 'PreferDualStack'"),
])
def test_an_ipv4_lab_refuses_what_kube_apiserver_refuses(extra: str, expected: str) -> None:
    assert any(expected in line for line in problems(NODES + service("web", extra))), problems(
        NODES + service("web", extra))


def test_endpoint_slices_per_address_type() -> None:
    topology = build(DUAL + service("web", "  ipFamilyPolicy: PreferDualStack\n")
                     + service("six", "  ipFamilies: [IPv6]\n"))
    slices = [d for d in topology.documents if d["kind"] == "EndpointSlice"]
    by_service: dict[str, dict[str, list[str]]] = {}
    for s in slices:
        addresses = sorted(e["addresses"][0] for e in s["endpoints"])
        by_service.setdefault(s["metadata"]["labels"]["kubernetes.io/service-name"], {})[s["addressType"]] = addresses
    assert by_service == {
        "web": {"IPv4": ["10.244.1.2", "10.244.2.2"], "IPv6": ["fd00:10:244:1::2", "fd00:10:244:2::2"]},
        "six": {"IPv6": ["fd00:10:244:1::2", "fd00:10:244:2::2"]},
    }
    assert len({s["metadata"]["name"] for s in slices}) == len(slices)


def test_the_ipv4_slice_keeps_its_name_when_the_lab_goes_dual_stack() -> None:
    four = docs(build(NODES + service("web")), "EndpointSlice")
    dual = docs(build(DUAL + service("web", "  ipFamilyPolicy: PreferDualStack\n")), "EndpointSlice")
    (name,) = four
    assert dual[name]["addressType"] == "IPv4"


def test_explicit_ipv6_pod_address_and_its_problems() -> None:
    pod_c = """---
apiVersion: v1
kind: Pod
metadata: {name: c}
spec:
  nodeName: n1
  containers: [{name: c, command: [nodeagent, workload, idle]}]
status: {podIP: 10.244.1.9, podIPs: [{ip: 10.244.1.9}, {ip: 'fd00:10:244:1::2'}]}
"""
    topology = build(DUAL + pod_c)
    ips = {p.name: str(p.ip6) for p in topology.pods}
    # c claimed a's mirror first, so a moves to the next free address
    assert ips == {"a": "fd00:10:244:1::3", "b": "fd00:10:244:2::2", "c": "fd00:10:244:1::2"}
    assert any("status.podIPs[1].ip: fd00:10:244:2::2 is not a free pod address of node n1"
               in line for line in problems(DUAL + pod_c.replace("fd00:10:244:1::2", "fd00:10:244:2::2")))
    assert any("status.podIPs[1].ip: the lab is not dual-stack" in line for line in problems(NODES + pod_c))


@pytest.mark.parametrize(("config", "expected"), [
    ("serviceCIDR: 'fd00:10:96::/112,10.96.0.0/12'", "LabConfig dual-stack: spec.serviceCIDR: not an IPv4 CIDR"),
    ("serviceCIDR: '10.96.0.0/12,10.97.0.0/16'", "spec.serviceCIDR: not an IPv4 CIDR and an IPv6 CIDR"),
    ("nodeCIDR: '172.18.0.0/24,fd00:18::/125'", "spec.nodeCIDR: the IPv6 node CIDR fd00:18::/125 must hold"),
])
def test_lab_config_problems(config: str, expected: str) -> None:
    text = ("apiVersion: lab.nodeagent.io/v1alpha1\nkind: LabConfig\nmetadata: {name: dual-stack}\n"
            f"spec: {{{config}}}\n---\n" + NODES)
    assert any(expected in line for line in problems(text)), problems(text)


def test_ipv6_node_address_problems() -> None:
    text = NODES.replace("spec: {podCIDR: 10.244.2.0/24}", "spec: {podCIDR: 10.244.2.0/24}\n"
                         "status: {addresses: [{type: InternalIP, address: 'fd00:99::2'}]}")
    assert any("status.addresses[0].address: fd00:99::2 is not a host address of the lab's IPv6 node CIDR "
               "fd00:18::/64" in line for line in problems(text))
    text = NODES.replace("spec: {podCIDR: 10.244.2.0/24}", "spec: {podCIDR: 10.244.2.0/24, podCIDRs: "
                         "[10.244.2.0/24, 'fd00:18::/64']}")
    assert any("spec.podCIDRs[1]: fd00:18::/64 overlaps the IPv6 node CIDR" in line for line in problems(text))


def test_the_dual_stack_default_lab() -> None:
    topology = build_topology(load_default(dual_stack=True))
    assert topology.dual_stack and topology.service_cidr == IPv4Network("10.96.0.0/12")
    dual = docs(topology, "Service")["echo-dual"]["spec"]
    assert dual["ipFamilies"] == ["IPv4", "IPv6"] and dual["clusterIPs"][1] == "fd00:10:96::a"
    # the IPv4 default lab's objects are what they were
    plain = {(d["kind"], d["metadata"]["name"]) for d in build_topology(load_default()).documents}
    assert ("Service", "echo-dual") not in plain
