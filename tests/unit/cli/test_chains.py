"""`nodeagent chains` renders any node's view offline from the options alone (kube-proxy's flags), never from
this machine; bad settings are usage errors that name the flag."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from nodeagent.cli import main
from tests.support import objects as k8s
from tests.support.services import ep, service, slice_

TAIL = '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in ' \
       'this chain"'


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    objects = [k8s.node("node1", "192.168.0.2", "10.244.1.0/24"),
               service("ns1", "svc1", "172.30.0.41", type_="NodePort", node_port=3001),
               slice_("ns1", "svc1", ep("10.244.1.5", node="node1"))]
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump_all(objects))
    return tmp_path


def chains(cluster: Path, *args: str) -> str:
    """Our iptables-restore input, kube-proxy's rule text."""
    result = CliRunner().invoke(main, ["chains", "--manifests", str(cluster), "--node", "node1", "--format",
                                       "restore", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_the_default_view_is_kube_proxys_defaults_without_the_workstations_kernel(cluster: Path) -> None:
    text = chains(cluster)
    assert f"{TAIL} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS" in text
    assert "--random-fully" not in text and "nfacct" not in text
    assert "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP" in text
    assert "-A KUBE-FIREWALL " in text


def test_kube_proxys_settings_as_options(cluster: Path) -> None:
    text = chains(cluster, "--masquerade-all", "--random-fully", "--nfacct-counter", "localhost_nps_accepted_pkts",
                  "--conntrack-tcp-be-liberal", "true", "--iptables-masquerade-bit", "10")
    assert "-j MASQUERADE --random-fully" in text and "--or-mark 0x00000400" in text
    assert "--nfacct-name localhost_nps_accepted_pkts" in text and "ct_state_invalid_dropped_pkts" not in text
    assert "--ctstate INVALID" not in text
    masquerade_all = '"ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-MARK-MASQ'
    assert masquerade_all in text and masquerade_all not in chains(cluster, "--masquerade-all=false")
    off = chains(cluster, "--iptables-localhost-nodeports=false")
    assert f"{TAIL} -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS" in off
    assert "KUBE-FIREWALL" not in off


def test_nodeport_addresses_resolve_against_the_nodes_addresses(cluster: Path) -> None:
    assert f"{TAIL} -d 192.168.0.2 -j KUBE-NODEPORTS" in chains(cluster, "--nodeport-addresses", "primary")
    assert f"{TAIL} -d 192.168.0.2 -j KUBE-NODEPORTS" in chains(cluster, "--nodeport-addresses", "192.168.0.0/16")
    bound = chains(cluster, "--nodeport-addresses", "primary", "--node-ip", "192.168.7.7")
    assert f"{TAIL} -d 192.168.0.2" not in bound


@pytest.mark.parametrize(("args", "message"), [
    (["--nodeport-addresses", "primary,10.0.0.0/8"], "can't use both 'primary' and CIDRs"),
    (["--nodeport-addresses", "10.0.0.300/8"], "must be a valid CIDR"),
    (["--iptables-masquerade-bit", "32"], "0<=x<=31"),
    (["--bind-address", "node1"], "'node1' is not an IP address"),
])
def test_bad_settings_name_the_flag(cluster: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["chains", "--manifests", str(cluster), "--node", "node1", *args])
    assert result.exit_code == 2 and message in result.output
