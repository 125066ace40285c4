"""The nftables datapath in a real lab: agents running `nodeagent run --mode nftables` in each node's namespace,
real connections through Services.

One lab (two nodes, echo pods on both, a client on node1) is shared by the module; every traffic test sends
real TCP from pods or nodes. The table each node's kernel holds (`nft list table ip kube-proxy`) is, element by
element, what `nodeagent chains --format nft` prints for that node.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from nodeagent.cli import main
from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.demo import request_from
from nodeagent.lab.errors import LabError
from nodeagent.service.nftables.listing import canonical_dump, parse_listing
from nodeagent.service.nftables.ruleset import Table
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
    with lab_with_agents(tmp_path_factory.mktemp("nftables-lab"), EXTRA_SERVICES, "nftables",
                         ["--min-sync-period", "0.1"]) as built:
        wait_converged(built)
        yield built


def chains_nft(lab: labs.Lab, node: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["chains", "--lab", lab.record.name, "--node", node, "--format", "nft", *args])
    return result.exit_code, "".join(line for line in result.stdout.splitlines(keepends=True)
                                     if not line.startswith("{"))


def wait_converged(lab: labs.Lab, timeout: float = 30.0) -> None:
    """Poll until every node's table holds what its manifests say (the agents synced)."""
    deadline = time.monotonic() + timeout
    for node in lab.plan.nodes:
        while chains_nft(lab, node.node.name, "--diff")[0] != 0:
            assert time.monotonic() < deadline, f"{node.node.name} did not converge"
            time.sleep(0.2)


def live_table(lab: labs.Lab, node: str) -> str:
    return subprocess.run(["ip", "netns", "exec", lab.plan.node(node).netns, "nft", "list", "table", "ip",
                           "kube-proxy"], capture_output=True, text=True, check=True).stdout


def from_node(lab: labs.Lab, node: str, target: str) -> dict[str, str]:
    """The workload client run on a node itself (host network), as a NodePort client outside the pods."""
    plan = lab.plan.node(node)
    argv = processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup), ["nodeagent", "workload", "request", target])
    result = subprocess.run(argv, env=processes.child_env({}), capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


def test_cluster_ip_spreads_over_both_backends(lab: labs.Lab) -> None:
    """60 connections through `numgen random mod 2`: outside 15..45 has probability < 1e-4 if the split is fair."""
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
    with pytest.raises(LabError, match=r"Errno 111\]"):  # ECONNREFUSED: no-endpoint-services -> reject-chain
        request_from(lab, "demo/client", f"{vip}:80", timeout=5)
    assert time.monotonic() - started < 3, "reject answers at once; a drop would wait for the timeout"


def test_nft_list_in_a_node_equals_chains_format_nft(lab: labs.Lab) -> None:
    for node in ("node1", "node2"):
        code, shown = chains_nft(lab, node)
        assert code == 0, shown
        printed = Table("ip", "kube-proxy")
        printed.apply(shown)
        assert canonical_dump(parse_listing(live_table(lab, node))) == canonical_dump(printed), node


def test_chains_diff_finds_no_drift_then_names_a_deleted_element(lab: labs.Lab) -> None:
    code, clean = chains_nft(lab, "node2", "--diff")
    assert code == 0 and "no drift" in clean, clean
    vip = lab.cluster_ip("nobody")
    netns = lab.plan.node("node2").netns
    element = f"{vip} . tcp . 80"
    listed = live_table(lab, "node2")
    assert element in listed
    subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "element", "ip", "kube-proxy",
                    "no-endpoint-services", "{", element, "}"], check=True)
    try:
        code, drift = chains_nft(lab, "node2", "--diff")
        assert code == 1, drift
        assert (f'+add element ip kube-proxy no-endpoint-services {{ {element} comment "demo/nobody:http" : '
                f"goto reject-chain }}") in drift
    finally:
        subprocess.run(["ip", "netns", "exec", netns, "nft", "add", "element", "ip", "kube-proxy",
                        "no-endpoint-services", "{", element, "comment", '"demo/nobody:http"', ":", "goto",
                        "reject-chain", "}"], check=True)


def test_no_iptables_rules_and_nothing_in_the_root_namespace(lab: labs.Lab) -> None:
    """The agents programmed their nodes' nftables only: no KUBE chain in a node, no kube-proxy table in the root
    namespace."""
    netns = lab.plan.node("node1").netns
    saved = subprocess.run(["ip", "netns", "exec", netns, "iptables-nft-save"], capture_output=True, text=True,
                           check=False).stdout
    assert "KUBE-SERVICES" not in saved
    root = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    assert "kube-proxy" not in root
