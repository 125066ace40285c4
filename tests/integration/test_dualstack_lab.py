"""A dual-stack lab with agents in iptables mode (mesh off): Services reached over IPv4 and IPv6 through real
connections, as the ip6tables proxier beside the IPv4 one programs them from the lab's Kubernetes API.

One lab (the default one plus `DUAL_STACK_CONFIG`: nodes and pods with both families) is shared by the module;
the client pod is on node1 and the echo pods on node1 and node2, so every Service test crosses nodes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.demo import request_from
from nodeagent.lab.manifests import DUAL_STACK_CONFIG
from tests.integration.conftest import wait_for
from tests.support.agent_labs import lab_with_agents
from tests.support.netns import netns_run

pytestmark = pytest.mark.root

SERVICES = DUAL_STACK_CONFIG + """---
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: demo}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}, {name: udp, port: 53, targetPort: 8081, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: six, namespace: demo}
spec:
  ipFamilies: [IPv6]
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: dual-np, namespace: demo}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30090}]
---
apiVersion: v1
kind: Service
metadata: {name: dual-lb, namespace: demo}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 30257
  ipFamilyPolicy: RequireDualStack
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30091}]
"""
HEALTH_PORT = 30257


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("dualstack-lab"), SERVICES, "iptables",
                         ["--min-sync-period", "0.1"]) as built:
        yield built


def cluster_ips(lab: labs.Lab, service: str) -> list[str]:
    """spec.clusterIPs the lab allocated to demo/`service`."""
    for doc in lab.topology.documents:
        if doc["kind"] == "Service" and doc["metadata"]["name"] == service:
            return list(doc["spec"]["clusterIPs"])
    raise AssertionError(f"no Service {service}")


def target(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def peer_ip(answer: dict[str, str]) -> str:
    return answer["peer"].rpartition(":")[0].strip("[]")


def from_node(lab: labs.Lab, node: str, where: str) -> dict[str, str]:
    """The workload client run on a node itself (host network), as a NodePort client outside the pods."""
    plan = lab.plan.node(node)
    argv = processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup),
                                ["nodeagent", "workload", "request", "--timeout", "5", where])
    result = subprocess.run(argv, env=processes.child_env({}), capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


def test_a_dual_stack_service_answers_over_both_families_from_both_nodes(lab: labs.Lab) -> None:
    ipv4, ipv6 = cluster_ips(lab, "dual")
    assert ":" not in ipv4 and ":" in ipv6
    client = lab.plan.pod("demo/client").pod
    for vip, own in ((ipv4, str(client.ip)), (ipv6, str(client.ip6))):
        answers = [request_from(lab, "demo/client", target(vip, 80)) for _ in range(24)]
        seen = Counter(a["pod"] for a in answers)
        # echo-1 is on node2: the client on node1 reaches it across the fabric, in this family
        assert set(seen) == {"demo/echo-0", "demo/echo-1"}, (vip, seen)
        assert {peer_ip(a) for a in answers} == {own}, "the pod's own address of the family survives the DNAT"


def test_udp_through_the_ipv6_cluster_ip(lab: labs.Lab) -> None:
    _, ipv6 = cluster_ips(lab, "dual")
    seen = {request_from(lab, "demo/client", target(ipv6, 53), udp=True)["pod"] for _ in range(16)}
    assert seen == {"demo/echo-0", "demo/echo-1"}


def test_an_ipv6_only_service(lab: labs.Lab) -> None:
    (ipv6,) = cluster_ips(lab, "six")
    assert ":" in ipv6
    seen = {request_from(lab, "demo/client", target(ipv6, 80))["pod"] for _ in range(16)}
    assert seen == {"demo/echo-0", "demo/echo-1"}


def test_node_port_over_ipv6_from_the_other_node(lab: labs.Lab) -> None:
    node1 = lab.plan.node("node1").node
    assert node1.address6 is not None
    seen = {from_node(lab, "node2", target(str(node1.address6), 30090))["pod"] for _ in range(16)}
    assert seen == {"demo/echo-0", "demo/echo-1"}
    # and over IPv4, on the same Service
    assert from_node(lab, "node2", target(str(node1.address), 30090))["pod"] in {"demo/echo-0", "demo/echo-1"}


def test_the_ipv4_services_of_the_lab_stay_ipv4_only(lab: labs.Lab) -> None:
    """echo is SingleStack (no ipFamilyPolicy): no IPv6 cluster IP, and its IPv4 one still serves."""
    assert len(cluster_ips(lab, "echo")) == 1
    assert request_from(lab, "demo/client", target(lab.cluster_ip("echo"), 80))["pod"].startswith("demo/echo-")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_shows_both_families(lab: labs.Lab, tmp_path: Path) -> None:
    """The real client reads what the lab's API server serves: families, cluster IPs, slices, node addresses."""
    def get(*args: str) -> dict[str, object]:
        result = labs.kubectl(lab.record.name, ["get", *args, "-o", "yaml"], timeout=30, capture=True)
        assert result.returncode == 0, result.stderr
        loaded: dict[str, object] = yaml.safe_load(result.stdout)
        return loaded

    spec = get("svc", "-n", "demo", "dual")["spec"]
    assert isinstance(spec, dict)
    assert spec["ipFamilies"] == ["IPv4", "IPv6"] and spec["ipFamilyPolicy"] == "PreferDualStack"
    assert spec["clusterIPs"] == cluster_ips(lab, "dual")
    slices = get("endpointslices", "-n", "demo", "-l", "kubernetes.io/service-name=dual")["items"]
    assert isinstance(slices, list)
    assert sorted(s["addressType"] for s in slices) == ["IPv4", "IPv6"]
    node = get("node", "node1")
    internal = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]  # type: ignore[index]
    assert internal == ["172.18.0.2", "fd00:18::2"]
    assert node["spec"]["podCIDRs"] == ["10.244.1.0/24", "fd00:10:244:1::/64"]  # type: ignore[index]


def health(lab: labs.Lab, from_node: str, address: str) -> tuple[int, int]:
    """(status, localEndpoints) of dual-lb's health check node port at `address`, asked from `from_node`."""
    script = ("import json,sys,urllib.request,urllib.error\n"
              "try:\n r=urllib.request.urlopen(sys.argv[1],timeout=2);s,b=r.status,r.read()\n"
              "except urllib.error.HTTPError as e: s,b=e.code,e.read()\n"
              "except OSError: s,b=0,b'{}'\n"
              "print(json.dumps([s,json.loads(b).get('localEndpoints',-1)]))")
    out = netns_run(lab.plan.node(from_node).netns, sys.executable, "-c", script,
                    f"http://{target(address, HEALTH_PORT)}/")
    status, count = json.loads(out)
    return int(status), int(count)


def test_the_health_check_node_port_answers_over_both_families(lab: labs.Lab) -> None:
    """node1 has one local echo endpoint per family: its IPv4 listener and its IPv6 one (an IPv6-only socket
    beside 0.0.0.0) answer 200 with one endpoint each, asked from node2."""
    node1 = lab.plan.node("node1").node
    for address in (str(node1.address), str(node1.address6)):
        wait_for(lambda address=address: health(lab, "node2", address)[0] == 200,  # type: ignore[misc]
                 f"the health check on {address}")
        assert health(lab, "node2", address) == (200, 1)
