"""`nodeagent chains` per IP family: one section per proxier (iptables, ip6tables), each under its own header;
an IPv4-only cluster keeps its output byte for byte (no header), whatever else changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from nodeagent.cli import main
from tests.support import objects as k8s
from tests.support.services import ep, service, slice_

V4_ONLY = [k8s.node("node1", "192.168.0.2", "10.244.1.0/24"),
           service("ns1", "svc1", "172.30.0.41", type_="NodePort", node_port=3001),
           slice_("ns1", "svc1", ep("10.244.1.5", node="node1"))]


def dual_stack_objects() -> list[dict[str, Any]]:
    node = k8s.node("node1", "192.168.0.2", "10.244.1.0/24")
    node["status"]["addresses"].append({"type": "InternalIP", "address": "2001:db8::2"})
    node["spec"]["podCIDRs"].append("fd00:10:1::/64")
    v6_slice = slice_("ns1", "svc1", ep("fd00:10:1::5", node="node1"))
    v6_slice["addressType"], v6_slice["metadata"]["name"] = "IPv6", "svc1-v6"
    return [node, service("ns1", "svc1", "172.30.0.41", type_="NodePort", node_port=3001,
                          clusterIPs=["172.30.0.41", "fd00:172:30::41"], ipFamilies=["IPv4", "IPv6"],
                          ipFamilyPolicy="PreferDualStack"),
            slice_("ns1", "svc1", ep("10.244.1.5", node="node1")), v6_slice,
            service("ns2", "lonely", "fd00:172:30::46", ipFamilies=["IPv6"])]


def run_chains(objects: list[dict[str, Any]], tmp_path: Path, *args: str) -> str:
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump_all(objects))
    result = CliRunner().invoke(main, ["chains", "--manifests", str(tmp_path), "--node", "node1", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_an_ipv4_only_cluster_prints_no_family_header(tmp_path: Path) -> None:
    default = run_chains(V4_ONLY, tmp_path)
    assert "# IPv" not in default and default.startswith("*filter")
    assert run_chains(V4_ONLY, tmp_path, "--family", "ipv4") == "# IPv4 (iptables)\n" + default
    only_v6 = run_chains(V4_ONLY, tmp_path, "--family", "ipv6")
    assert only_v6.startswith("# IPv6 (ip6tables)\n") and "ns1/svc1" not in only_v6


def test_a_dual_stack_cluster_prints_each_family_under_its_header(tmp_path: Path) -> None:
    text = run_chains(dual_stack_objects(), tmp_path, "--cluster-cidr", "10.244.0.0/16,fd00:10::/48")
    v4, v6 = text.split("# IPv6 (ip6tables)\n")
    assert v4.startswith("# IPv4 (iptables)\n")
    # the IPv4 section is what the same Service single-stack prints, byte for byte
    assert v4.removeprefix("# IPv4 (iptables)\n") == run_chains(V4_ONLY, tmp_path, "--cluster-cidr",
                                                                  "10.244.0.0/16,fd00:10::/48")
    assert "fd00" not in v4
    assert "-A KUBE-SERVICES -d fd00:172:30::41/128 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\"" in v6
    assert "--to-destination [fd00:10:1::5]:80" in v6
    assert "-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s fd00:10::/48 -d fd00:172:30::41/128 -p tcp" in v6
    # ip6tables-save's REJECT: ICMPv6 port unreachable
    assert ("-d fd00:172:30::46/128 -p tcp -m comment --comment \"ns2/lonely:p80 has no endpoints\" -m tcp "
            "--dport 80 -j REJECT --reject-with icmp6-port-unreachable") in v6
    # no localhost NodePorts on IPv6: the NodePort jump skips ::1 and there is no KUBE-FIREWALL rule
    assert "-A KUBE-SERVICES ! -d ::1/128 -m comment" in v6 and "-A KUBE-FIREWALL " not in v6
    assert "172.30.0.41" not in v6 and "10.244.1.5" not in v6


def test_restore_format_per_family(tmp_path: Path) -> None:
    text = run_chains(dual_stack_objects(), tmp_path, "--format", "restore", "--family", "ipv6")
    assert text.startswith("# IPv6 (ip6tables)\n*filter\n")
    assert ('-A KUBE-SERVICES -m comment --comment "ns2/lonely:p80 has no endpoints" -m tcp -p tcp '
            "-d fd00:172:30::46 --dport 80 -j REJECT") in text.splitlines()
