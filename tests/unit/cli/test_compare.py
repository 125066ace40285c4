"""`nodeagent compare-modes` from manifests (no root, no cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from nodeagent.cli import main
from tests.support.services import ep, service, slice_

NODE = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}}


def test_compare_modes_lists_each_port_with_its_external_path(tmp_path: Path) -> None:
    documents = [NODE, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}},
                 service("ns", "local", "172.30.0.2", type_="NodePort", node_port=30002,
                         externalTrafficPolicy="Local"),
                 slice_("ns", "local", ep("10.0.0.2", "node1"))]
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump_all(documents))
    result = CliRunner().invoke(main, ["compare-modes", "--manifests", str(tmp_path), "--node", "node1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{
        "port": "ns/local:p80", "externalFrontends": ["192.168.0.2:30002/TCP"], "ebpfExternalPath": "iptables",
        "ebpfIptablesBecause": ["externalTrafficPolicy=Local"], "differences": []}]
    text = CliRunner().invoke(main, ["compare-modes", "--manifests", str(tmp_path), "--node", "node1"]).output
    assert "ns/local:p80: from outside: kube-proxy's iptables rules in both modes (tc lacks: " \
           "externalTrafficPolicy=Local)" in text
