"""Lab manifest validation: each named error names file, object and field, and all are reported."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from nodeagent.lab.errors import LabManifestError
from nodeagent.lab.manifests import load_default, parse_text
from nodeagent.lab.topology import build_topology

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
"""


def pod(name: str, node: str = "n1", ip: str | None = None) -> str:
    status = f"\nstatus: {{podIP: '{ip}'}}" if ip else ""
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  containers: [{{name: c, command: [nodeagent, workload, idle]}}]{status}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(LabManifestError) as caught:
        build_topology(list(parse_text(text, "lab.yaml")))
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize(("text", "expected"), [
    (NODES.replace("10.244.2.0/24", "10.244.2.0/33"), "lab.yaml#1: Node n2: spec.podCIDR: not an IPv4 CIDR"),
    (NODES.replace("10.244.2.0/24", "10.244.2.1/24"), "lab.yaml#1: Node n2: spec.podCIDR: not an IPv4 CIDR"),
    (NODES + pod("a", ip="10.244.1.5") + pod("b", ip="10.244.1.5"),
     "lab.yaml#3: Pod default/b: status.podIP: duplicate pod IP 10.244.1.5, also used by Pod default/a"),
    (NODES + pod("a", node="n9"), "lab.yaml#2: Pod default/a: spec.nodeName: unknown node 'n9'"),
    (NODES + "---\napiVersion: v1\nkind: Deployment\nmetadata: {name: d}\n",
     "lab.yaml#2: Deployment d: kind: unknown kind 'Deployment'"),
    (NODES + pod("a", ip="010.244.1.5"), "lab.yaml#2: Pod default/a: status.podIP: not an IPv4 address: '010.244.1.5'"),
    (NODES + pod("a", ip="10.244.2.5"), "Pod default/a: status.podIP: 10.244.2.5 is not a free pod address of node n1"),
    (NODES + pod("a", ip="10.244.1.1"), "Pod default/a: status.podIP: 10.244.1.1 is not a free pod address"),
    (NODES.replace("10.244.2.0/24", "10.244.1.128/25"), "Node n2: spec.podCIDR: 10.244.1.128/25 overlaps"),
])
def test_each_error_names_file_object_and_field(text: str, expected: str) -> None:
    assert any(line.startswith(expected) or expected in line for line in problems(text)), problems(text)


def test_every_problem_is_reported_not_just_the_first() -> None:
    found = problems(NODES + pod("a", node="n9") + pod("b", ip="10.244.1.300")
                     + "---\napiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n")
    assert len(found) == 3
    assert [f.split(": ")[2] for f in found] == ["kind", "spec.nodeName", "status.podIP"]


def test_allocation_is_deterministic_and_never_reuses_an_explicit_ip() -> None:
    text = NODES + pod("a") + pod("b", ip="10.244.1.2") + pod("c")
    first = build_topology(list(parse_text(text, "x")))
    again = build_topology(list(parse_text(text, "x")))
    assert {p.name: p.ip for p in first.pods} == {p.name: p.ip for p in again.pods} == {
        "a": IPv4Address("10.244.1.3"), "b": IPv4Address("10.244.1.2"), "c": IPv4Address("10.244.1.4")}


def test_the_default_lab_allocates_and_derives_as_a_cluster_would() -> None:
    topology = build_topology(load_default())
    assert {p.key: str(p.ip) for p in topology.pods} == {
        "demo/client": "10.244.1.2", "demo/echo-0": "10.244.1.3", "demo/echo-1": "10.244.2.2"}
    services = {d["metadata"]["name"]: d for d in topology.documents if d["kind"] == "Service"}
    assert services["echo"]["spec"]["clusterIP"] == "10.96.0.10"
    assert services["echo-nodeport"]["spec"]["ports"][0]["nodePort"] == 30080
    (echo_slice,) = [d for d in topology.documents if d["kind"] == "EndpointSlice"
                     and d["metadata"]["labels"]["kubernetes.io/service-name"] == "echo"]
    assert sorted(e["addresses"][0] for e in echo_slice["endpoints"]) == ["10.244.1.3", "10.244.2.2"]
    assert {p["name"]: p["port"] for p in echo_slice["ports"]} == {"http": 8080, "udp": 8081}
    assert {e["nodeName"] for e in echo_slice["endpoints"]} == {"node1", "node2"}


SERVICE = """---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"""


@pytest.mark.parametrize(("extra", "expected"), [
    ("  externalIPs: ['192.0.2.300']\n",
     "lab.yaml#2: Service default/web: spec.externalIPs[0]: "),
    ("  sessionAffinity: Sticky\n", "lab.yaml#2: Service default/web: spec.sessionAffinity: "),
    ("  loadBalancerSourceRanges: ['10.0.0.0/33']\n",
     "lab.yaml#2: Service default/web: spec.loadBalancerSourceRanges[0]: "),
])
def test_lab_refuses_what_the_agent_would_drop(extra: str, expected: str) -> None:
    """The lab runs the agent's decoder over its resolved objects; every drop is a named problem."""
    found = problems(NODES + SERVICE + extra)
    assert any(line.startswith(expected) and "(the agent would" in line for line in found), found


def test_lab_refuses_a_mesh_policy_the_agent_cannot_enforce_as_written() -> None:
    policy = """---
apiVersion: security.nodeagent.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: default}
spec:
  rules: [{to: [{operation: {paths: [/admin]}}]}]
"""
    found = problems(NODES + policy)
    # Kept, matching nothing (an ALLOW rule with an L7 part), which the lab says rather than run silently.
    assert any(line.startswith("lab.yaml#2: AuthorizationPolicy default/l7: spec.rules[0].to[0].operation")
               and "matches nothing" in line and "not apply it as written" in line for line in found), found
