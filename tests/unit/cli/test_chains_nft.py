"""`nodeagent chains --format nft` prints kube-proxy's nftables table for a cluster, offline: the text of kube-proxy's
nftables proxier tests for the same objects under the same flags (its fake proxier's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from nodeagent.cli import main
from nodeagent.service.nftables.ruleset import sort_transaction
from tests.support import objects as k8s
from tests.support.services import OVERALL_OBJECTS
from tests.unit.service.nftables.test_render import BASE_RULES, OVERALL

# NewFakeProxier's settings as flags
FAKE_PROXIER_FLAGS = ("--cluster-cidr", "10.0.0.0/8", "--service-cidr", "172.30.0.0/16",
                      "--nodeport-addresses", "192.168.0.2/32,2001:db8::1/128")


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    objects = [k8s.node("test-node", "192.168.0.2", "10.0.0.0/24"), *OVERALL_OBJECTS]
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump_all(objects))
    return tmp_path


def chains(cluster: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["chains", "--manifests", str(cluster), "--node", "test-node", "--format", "nft",
                                       *args])
    assert result.exit_code == 0, result.output
    # (the decoder's warnings are JSON log lines, on stderr outside the test runner)
    return "".join(line for line in result.output.splitlines(keepends=True) if not line.startswith("{"))


def test_overall_table_is_kube_proxys(cluster: Path) -> None:
    text = chains(cluster, *FAKE_PROXIER_FLAGS)
    assert sort_transaction(text) == sort_transaction(BASE_RULES + OVERALL)
    assert text.splitlines() == sort_transaction(text)  # printed in kube-proxy's test order already


def test_defaults_answer_nodeports_on_every_local_address(cluster: Path) -> None:
    text = chains(cluster)
    assert "add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport " \
           "vmap @service-nodeports" in text.splitlines()
    assert "Drop traffic to unallocated ClusterIPs" not in text
    assert "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000" in text.splitlines()


def test_ipv6_only_when_asked(cluster: Path) -> None:
    text = chains(cluster, "--family", "ipv6")
    assert text.startswith("# IPv6 (nftables)\nadd table ip6 kube-proxy")
