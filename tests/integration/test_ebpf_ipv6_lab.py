"""A dual-stack lab with agents in eBPF mode: Services reached over IPv4 and IPv6 through real connections, the
IPv6 ones translated by the cgroup programs (connect6, sendmsg6, recvmsg6, getpeername6) and not by ip6tables,
whose rules in eBPF mode serve IPv6 traffic from outside the node only (tc translates IPv4 only).

One lab (the default one plus `DUAL_STACK_CONFIG`) is shared by the module; the client pod is on node1 and the
echo pods on node1 and node2, so every Service test crosses nodes. Marked `bcc`: the first load compiles
bpf-src/sock_lb.c; everything is attached to the lab's own cgroups and removed by `lab down`.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Iterator

import pytest

from nodeagent.kernel.netns import command_in
from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.demo import request_from
from tests.integration.test_dualstack_lab import SERVICES, cluster_ips, from_node, target
from tests.support.agent_labs import lab_with_agents

pytestmark = [pytest.mark.root, pytest.mark.bcc]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("ebpf-ipv6-lab"), SERVICES, "ebpf",
                         ["--min-sync-period", "0.1"]) as built:
        yield built


def in_pod(lab: labs.Lab, pod: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python `code` in the pod's network namespace and cgroup (where the programs apply)."""
    plan = lab.plan.pod(pod)
    argv = processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup), ["python3", "-c", code, *args])
    return subprocess.run(argv, env=processes.child_env({}), capture_output=True, text=True, timeout=30, check=False)


def ip6tables_nat(lab: labs.Lab, node: str) -> str:
    return subprocess.run(command_in(lab.plan.node(node).netns, ["ip6tables-save", "-t", "nat"]),
                          capture_output=True, text=True, check=True).stdout


def test_a_dual_stack_service_is_reached_over_both_families_in_ebpf_mode(lab: labs.Lab) -> None:
    ipv4, ipv6 = cluster_ips(lab, "dual")
    assert ":" not in ipv4 and ":" in ipv6
    for vip in (ipv4, ipv6):
        seen = Counter(request_from(lab, "demo/client", target(vip, 80))["pod"] for _ in range(12))
        assert set(seen) == {"demo/echo-0", "demo/echo-1"}, (vip, seen)


def test_ipv6_cluster_ips_are_translated_at_connect_not_by_ip6tables(lab: labs.Lab) -> None:
    _, ipv6 = cluster_ips(lab, "dual")
    assert ipv6 not in ip6tables_nat(lab, "node1"), "ip6tables holds external paths only in eBPF mode"
    code = ("import socket,sys,json;s=socket.create_connection((sys.argv[1],80),timeout=5);"
            "s.sendall(b'x\\n');a=json.loads(s.makefile().readline());print(json.dumps([s.getpeername()[0],a['pod']]))")
    result = in_pod(lab, "demo/client", code, ipv6)
    assert result.returncode == 0, result.stderr
    peer, pod = json.loads(result.stdout)
    assert peer == ipv6, "getpeername6 shows the address dialed"
    assert pod in {"demo/echo-0", "demo/echo-1"}


def test_udp_over_the_ipv6_cluster_ip_replies_from_the_vip(lab: labs.Lab) -> None:
    _, ipv6 = cluster_ips(lab, "dual")
    code = ("import socket,sys,json;out=[]\n"
            "for _ in range(16):\n"
            " s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM);s.settimeout(3)\n"
            " s.sendto(b'hi',(sys.argv[1],53));data,src=s.recvfrom(4096);out.append([json.loads(data)['pod'],src[0]])\n"
            "print(json.dumps(out))")
    result = in_pod(lab, "demo/client", code, ipv6)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert {pod for pod, _ in answers} == {"demo/echo-0", "demo/echo-1"}
    assert {src for _, src in answers} == {ipv6}, "recvmsg6 reports the Service address"


def test_an_ipv6_node_port_from_the_other_node_is_served_by_ip6tables(lab: labs.Lab) -> None:
    node1 = lab.plan.node("node1").node
    assert node1.address6 is not None
    assert "30090" in ip6tables_nat(lab, "node1"), "the IPv6 NodePort's rules are kept (tc translates IPv4 only)"
    seen = {from_node(lab, "node2", target(str(node1.address6), 30090))["pod"] for _ in range(12)}
    assert seen == {"demo/echo-0", "demo/echo-1"}
