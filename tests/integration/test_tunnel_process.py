"""`nodeagent ztunnel` as the lab runs it: one process per node beside the agent, fed from the lab's
manifests, certificates from its agent's CA, listeners in every enrolled pod's namespace.

Capture here is a hand-written REDIRECT in one pod namespace (the mesh-redirect issue installs the real
one); what is under test is the tunnel process: it finds the pods, serves them, carries HBONE between
the nodes, answers captured plaintext inbound on 15006, and follows enrollment changes live.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.lab import lab as labs
from nodeagent.lab.demo import request_from
from tests.integration.agent_labs import lab_with_agents

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("tunnel"), "", "iptables", mesh=True) as lab:
        yield lab


def in_netns(netns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], check=True, capture_output=True, text=True).stdout


def admin_dump(lab: labs.Lab, node: str) -> dict[str, Any]:
    """The tunnel's /config_dump, read from inside its node (the admin port is localhost only)."""
    out = in_netns(lab.plan.node(node).netns, "python3", "-c",
                   "import urllib.request;print(urllib.request.urlopen("
                   "'http://127.0.0.1:15000/config_dump',timeout=5).read().decode())")
    result: dict[str, Any] = json.loads(out)
    return result


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)  # polling a condition with a deadline


def listeners(netns: str) -> set[int]:
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in in_netns(netns, "ss", "-Hltn").splitlines()}


def test_each_node_tunnel_serves_its_enrolled_pods_inside_their_namespaces(lab: labs.Lab) -> None:
    for node in ("node1", "node2"):
        dump = admin_dump(lab, node)
        local = [p for p in lab.plan.pods if p.pod.node == node]
        assert {p["ip"] for p in dump["pods"]} == {str(p.pod.ip) for p in local}, dump
        assert all(state == "served" for state in dump["states"].values()), dump["states"]
        for pod in dump["pods"]:
            assert sorted(pod["listeners"]) == [15001, 15006, 15008]
            assert pod["certificate"]["serial"]
    for plan in lab.plan.pods:
        assert {15001, 15006, 15008} <= listeners(plan.netns), plan.pod.key


def test_captured_connection_crosses_nodes_over_hbone_through_both_tunnel_processes(lab: labs.Lab) -> None:
    client, server = lab.plan.pod("demo/client"), lab.plan.pod("demo/echo-1")
    assert client.pod.node != server.pod.node
    rule = ["-p", "tcp", "-d", str(server.pod.ip), "--dport", "8080", "-m", "mark", "!", "--mark", "0x539",
            "-j", "REDIRECT", "--to-ports", "15001"]
    in_netns(client.netns, "iptables", "-t", "nat", "-A", "OUTPUT", *rule)
    try:
        answer = request_from(lab, "demo/client", f"{server.pod.ip}:8080")
        pools = next(p["pools"] for p in admin_dump(lab, "node1")["pods"] if p["ip"] == str(client.pod.ip))
    finally:
        in_netns(client.netns, "iptables", "-t", "nat", "-D", "OUTPUT", *rule)
    assert answer["pod"] == "demo/echo-1"
    # The server tunnel connects to the app from inside the server pod (the original source IP comes
    # with the mesh-redirect issue); the peer it sees is therefore its own address, not the client's.
    assert answer["peer"].split(":")[0] == str(server.pod.ip), answer
    assert pools and pools[0]["peer"] == f"{server.pod.ip}:15008", pools
    assert pools[0]["identity"] == "spiffe://cluster.local/ns/demo/sa/echo"


def test_captured_plaintext_inbound_on_15006_reaches_the_app(lab: labs.Lab) -> None:
    server = lab.plan.pod("demo/echo-0")
    rule = ["-p", "tcp", "--dport", "8080", "-j", "REDIRECT", "--to-ports", "15006"]
    in_netns(server.netns, "iptables", "-t", "nat", "-A", "PREROUTING", *rule)
    try:
        answer = request_from(lab, "demo/client", f"{server.pod.ip}:8080")
    finally:
        in_netns(server.netns, "iptables", "-t", "nat", "-D", "PREROUTING", *rule)
    assert answer["pod"] == "demo/echo-0"
    assert answer["peer"].split(":")[0] == str(server.pod.ip), "the tunnel, inside the pod, made the connection"


def test_enrollment_follows_labels_live(lab: labs.Lab) -> None:
    manifests = lab.record.manifests_path
    original = manifests.read_text()
    documents = list(yaml.safe_load_all(original))
    for document in documents:
        if document and document["kind"] == "Pod" and document["metadata"]["name"] == "echo-1":
            document["metadata"].setdefault("labels", {})["nodeagent.io/mesh"] = "disabled"
    echo1 = lab.plan.pod("demo/echo-1")
    _write(manifests, yaml.safe_dump_all(documents))
    try:
        wait_for(lambda: str(echo1.pod.ip) not in {p["ip"] for p in admin_dump(lab, "node2")["pods"]},
                 "the opted-out pod is released")
        assert 15008 not in listeners(echo1.netns)
        enrollment = admin_dump(lab, "node2")["enrollment"]["demo/echo-1"]
        assert enrollment == {"enrolled": False, "reason": "pod label nodeagent.io/mesh=disabled opts out"}
    finally:
        _write(manifests, original)
    wait_for(lambda: str(echo1.pod.ip) in {p["ip"] for p in admin_dump(lab, "node2")["pods"]},
             "the pod is served again")
    assert 15008 in listeners(echo1.netns)


def _write(path: Path, text: str) -> None:
    """Replace the file atomically (the sources never see half a file)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.rename(path)
