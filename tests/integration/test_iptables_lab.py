"""The iptables datapath in a real lab: agents in each node's namespace, real connections through Services.

One lab (two nodes, echo pods on both, a client on node1) with agents running `nodeagent run --mode
iptables` is shared by the module; every test sends real TCP/UDP traffic from pods or nodes.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import yaml

from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.demo import request_from
from nodeagent.lab.errors import LabError
from tests.support.agent_labs import lab_with_agents

pytestmark = pytest.mark.root

EXTRA_SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: demo}
spec:
  selector: {app: echo}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: local-np, namespace: demo}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: demo}
spec:
  selector: {app: nothing-matches}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("iptables-lab"), EXTRA_SERVICES, "iptables",
                         ["--min-sync-period", "0.1"]) as built:
        yield built



def from_node(lab: labs.Lab, node: str, target: str) -> dict[str, str]:
    """The workload client run on a node itself (host network), as a NodePort client outside the pods."""
    plan = lab.plan.node(node)
    argv = processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup), ["nodeagent", "workload", "request", target])
    result = subprocess.run(argv, env=processes.child_env({}), capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


def wait_converged(lab: labs.Lab, timeout: float = 20.0) -> None:
    """Poll until every node's kernel holds what its manifests say (the agents picked up an edit)."""
    from click.testing import CliRunner

    from nodeagent.cli import main

    deadline = time.monotonic() + timeout
    for node in lab.plan.nodes:
        args = ["chains", "--lab", lab.record.name, "--node", node.node.name, "--diff"]
        while CliRunner().invoke(main, args).exit_code != 0:
            assert time.monotonic() < deadline, f"{node.node.name} did not converge"
            time.sleep(0.2)


def test_cluster_ip_spreads_over_both_backends(lab: labs.Lab) -> None:
    """60 connections, p=1/2 each: outside 15..45 has probability < 1e-4 if the split is fair."""
    vip = lab.cluster_ip("echo")
    seen = Counter(request_from(lab, "demo/client", f"{vip}:80")["pod"] for _ in range(60))
    assert set(seen) == {"demo/echo-0", "demo/echo-1"}, seen
    assert 15 <= seen["demo/echo-0"] <= 45, seen


def test_pod_traffic_keeps_its_source_address_through_a_cluster_ip(lab: labs.Lab) -> None:
    vip = lab.cluster_ip("echo")
    client_ip = str(lab.plan.pod("demo/client").pod.ip)
    answers = [request_from(lab, "demo/client", f"{vip}:80") for _ in range(6)]
    assert all(a["peer"].split(":")[0] == client_ip for a in answers), answers


def test_node_port_answers_from_the_other_node(lab: labs.Lab) -> None:
    node1 = lab.plan.node("node1").node.address
    seen = {from_node(lab, "node2", f"{node1}:30080")["pod"] for _ in range(20)}
    assert seen == {"demo/echo-0", "demo/echo-1"}


def test_session_affinity_pins_a_client(lab: labs.Lab) -> None:
    vip = lab.cluster_ip("sticky")
    seen = {request_from(lab, "demo/client", f"{vip}:80")["pod"] for _ in range(15)}
    assert len(seen) == 1, seen


def test_external_traffic_policy_local_keeps_the_client_address_and_stays_local(lab: labs.Lab) -> None:
    node1 = lab.plan.node("node1").node.address
    node2 = lab.plan.node("node2").node.address
    answers = [from_node(lab, "node2", f"{node1}:30081") for _ in range(10)]
    assert {a["pod"] for a in answers} == {"demo/echo-0"}, "only node1's own endpoint serves eTP=Local"
    assert {a["peer"].split(":")[0] for a in answers} == {str(node2)}, "the client address survives"


def test_a_service_without_endpoints_is_refused_at_once(lab: labs.Lab) -> None:
    vip = lab.cluster_ip("nobody")
    started = time.monotonic()
    with pytest.raises(LabError, match=r"Errno 111\]"):  # ECONNREFUSED, from the REJECT
        request_from(lab, "demo/client", f"{vip}:80", timeout=5)
    assert time.monotonic() - started < 3, "REJECT answers at once; a DROP would wait for the timeout"


def test_hairpin_a_pod_reaches_itself_through_its_service(lab: labs.Lab) -> None:
    vip = lab.cluster_ip("echo")
    answers = [request_from(lab, "demo/echo-0", f"{vip}:80") for _ in range(20)]
    own = [a for a in answers if a["pod"] == "demo/echo-0"]
    assert own, "in 20 tries at 1/2 the pod should have reached itself"
    gateway = str(lab.plan.node("node1").node.pod_cidr[1])
    assert {a["peer"].split(":")[0] for a in own} == {gateway}, "hairpin traffic is masqueraded"


def _udp_exchange(lab: labs.Lab, target: str, source_port: int) -> str:
    """Send one datagram from the client pod's fixed source port; the answering pod's name."""
    plan = lab.plan.pod("demo/client")
    code = ("import socket,sys,json;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            f"s.bind(('0.0.0.0',{source_port}));s.settimeout(3);h,p=sys.argv[1].rsplit(':',1);"
            "s.sendto(b'hi',(h,int(p)));print(json.loads(s.recv(4096))['pod'])")
    result = subprocess.run(["ip", "netns", "exec", plan.netns, "python3", "-c", code, target],
                            capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_udp_client_moves_to_a_live_backend_when_its_endpoint_goes(lab: labs.Lab) -> None:
    """The conntrack entry of a removed endpoint is deleted, so the same 5-tuple is NATed afresh."""
    vip = f"{lab.cluster_ip('echo')}:53"
    first = _udp_exchange(lab, vip, 40053)
    assert _udp_exchange(lab, vip, 40053) == first, "a UDP flow sticks to its backend while it lives"
    removed_ip = str(lab.plan.pod(first).pod.ip)
    manifests = lab.record.manifests_path
    original = manifests.read_text()
    documents = list(yaml.safe_load_all(original))
    for doc in documents:
        if doc["kind"] == "EndpointSlice" and doc["metadata"]["labels"]["kubernetes.io/service-name"] == "echo":
            doc["endpoints"] = [e for e in doc["endpoints"] if e["addresses"] != [removed_ip]]
    try:
        manifests.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            # the removed pod still runs and would still answer if the old conntrack entry survived
            if _udp_exchange(lab, vip, 40053) != first:
                break
            time.sleep(0.2)
        assert _udp_exchange(lab, vip, 40053) != first
    finally:
        manifests.write_text(original)
        wait_converged(lab)


def test_healthz_reports_the_last_sync(lab: labs.Lab) -> None:
    node = lab.plan.node("node1")
    result = subprocess.run(["ip", "netns", "exec", node.netns, "python3", "-c",
                             "import urllib.request,sys;r=urllib.request.urlopen(sys.argv[1]);"
                             "print(r.status, r.read().decode())", f"http://{node.node.address}:10256/healthz"],
                            capture_output=True, text=True, timeout=20, check=False)
    status, _, body = result.stdout.partition(" ")
    assert status == "200" and '"status":{"IPv4":{"lastUpdated":"20' in body, result  # its last sync


def test_nothing_reaches_the_root_namespace(lab: labs.Lab) -> None:
    """The agents programmed their nodes only: the root namespace has no KUBE chain."""
    out = subprocess.run(["iptables-nft-save"], capture_output=True, text=True, check=False).stdout
    assert "KUBE-SERVICES" not in out


def test_iptables_list_in_a_node_equals_chains_format_list(lab: labs.Lab) -> None:
    from click.testing import CliRunner

    from nodeagent.cli import main

    for node in ("node1", "node2"):
        netns = lab.plan.node(node).netns
        for table in ("nat", "filter"):
            shown = CliRunner().invoke(main, ["chains", "--lab", lab.record.name, "--node", node, "--format", "list",
                                              "--table", table])
            assert shown.exit_code == 0, shown.output
            live = subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", table, "-L", "-n"],
                                  capture_output=True, text=True, check=True).stdout
            assert shown.stdout.splitlines() == live.splitlines(), f"{node} {table}"


def test_chains_diff_finds_no_drift_then_names_a_deleted_rule(lab: labs.Lab) -> None:
    from click.testing import CliRunner

    from nodeagent.cli import main

    args = ["chains", "--lab", lab.record.name, "--node", "node2", "--diff"]
    clean = CliRunner().invoke(main, args)
    assert clean.exit_code == 0 and "no drift" in clean.stdout, clean.output
    netns = lab.plan.node("node2").netns
    rule = ["-m", "comment", "--comment", "kubernetes forwarding conntrack rule", "-m", "conntrack", "--ctstate",
            "RELATED,ESTABLISHED", "-j", "ACCEPT"]
    subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", "filter", "-D", "KUBE-FORWARD", *rule],
                   check=True)
    try:
        drift = CliRunner().invoke(main, args)
        assert drift.exit_code == 1, drift.output
        assert '+-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule"' in drift.stdout
    finally:
        subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", "filter", "-A", "KUBE-FORWARD", *rule],
                       check=True)
