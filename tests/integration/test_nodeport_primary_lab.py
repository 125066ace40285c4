"""`--nodeport-addresses primary` in the lab when the Services reach the agents before their Node objects (the
lab's API server holds the Nodes back): the agents program the Services at once, with NodePorts on no address
until each node's InternalIP is known, and then on exactly that address (kube-proxy resolves `primary` against
the node IP, which it waits for; see tests/unit/service/test_config.py for the decision itself).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nodeagent.kernel.netns import command_in
from nodeagent.lab import lab as labs
from nodeagent.lab.agents import start_agents
from nodeagent.lab.manifests import load_default
from tests.integration.conftest import unique_lab_name, wait_for
from tests.support.agent_labs import api_fault

pytestmark = pytest.mark.root

NODES_HELD = 12.0  # seconds the API server holds the agents' lists of Nodes


def nodeport_jumps(lab: labs.Lab, node: str) -> list[str]:
    """The rules of `node` that send traffic to KUBE-NODEPORTS (the addresses NodePorts answer on)."""
    nat = subprocess.run(command_in(lab.plan.node(node).netns, ["iptables-save", "-t", "nat"]), capture_output=True,
                         text=True, check=True).stdout
    return [re.sub(r' -m comment --comment "[^"]*"', "", line) for line in nat.splitlines()
            if line.startswith("-A KUBE-SERVICES") and "KUBE-NODEPORTS" in line]


def kube_services_rules(lab: labs.Lab, node: str) -> int:
    nat = subprocess.run(command_in(lab.plan.node(node).netns, ["iptables-save", "-t", "nat"]), capture_output=True,
                         text=True, check=True).stdout
    return sum(line.startswith("-A KUBE-SERVICES") for line in nat.splitlines())


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[labs.Lab]:
    """The default lab, its agents started with `--nodeport-addresses primary` while the Nodes are held back."""
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump_all([dict(d.body) for d in load_default()]))
    name = unique_lab_name()
    labs.up(name, tmp_path)
    try:
        api_fault(labs.load(name), "delay", {"seconds": NODES_HELD, "count": 2, "plural": "nodes"})
        yield start_agents(name, "iptables", extra=["--nodeport-addresses", "primary", "--min-sync-period", "0.1"])
    finally:
        labs.down(name)


def test_nodeports_wait_for_the_nodes_internal_ip(lab: labs.Lab) -> None:
    # programmed once (start_agents waits for it) with the Services, before any Node arrived
    for node in ("node1", "node2"):
        assert kube_services_rules(lab, node) > 0, "the Services are programmed"
        assert nodeport_jumps(lab, node) == [], f"{node}: NodePorts on no address while its IP is unknown"
    expected = {node: [f"-A KUBE-SERVICES -d {lab.plan.node(node).node.address}/32 -j KUBE-NODEPORTS"]
                for node in ("node1", "node2")}
    wait_for(lambda: {node: nodeport_jumps(lab, node) for node in expected} == expected,
             "NodePorts on each node's InternalIP once its Node is known", timeout=NODES_HELD + 20)
