"""`nodeagent ztunnel` as the lab runs it: one process per node beside the agent, certificates from its
agent's CA, the pods to serve from its agent's control stream, listeners in every enrolled pod's
namespace; enrollment changes followed live (capture removed before the listeners). Traffic through the
tunnels is in test_mesh_lab.py and test_tunnel_balancing.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nodeagent.lab import lab as labs
from nodeagent.mesh.capture import CaptureStatus
from nodeagent.mesh.iptables.apply import live_state
from tests.integration.conftest import wait_for
from tests.support.agent_labs import lab_with_agents
from tests.support.netns import netns_run
from tests.support.tunnel import admin_dump

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("tunnel"), "", "iptables", mesh=True) as lab:
        yield lab


def in_netns(netns: str, *argv: str) -> str:
    return netns_run(netns, *argv)





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
        assert not captured(f"/run/netns/{echo1.netns}"), "the capture went with the enrollment"
    finally:
        _write(manifests, original)
    wait_for(lambda: str(echo1.pod.ip) in {p["ip"] for p in admin_dump(lab, "node2")["pods"]},
             "the pod is served again")
    assert 15008 in listeners(echo1.netns)
    wait_for(lambda: captured(f"/run/netns/{echo1.netns}"), "captured again once served")


def captured(netns: str) -> bool:
    return any(live_state(netns, backend=b).status is CaptureStatus.INSTALLED for b in ("nft", "legacy"))


def _write(path: Path, text: str) -> None:
    """Replace the file atomically (the sources never see half a file)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.rename(path)
