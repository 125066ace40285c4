"""A dual-stack lab with agents in eBPF mode: Services reached over IPv4 and IPv6 through real connections, the
IPv6 ones translated by the cgroup programs (connect6, sendmsg6, recvmsg6, getpeername6) and not by ip6tables.
IPv6 traffic from outside the node (a NodePort dialled from the other node) is translated by tc
(bpf-src/nodeport_tc.c's IPv6 path, flows in na_ct6), TCP and UDP, to a backend on the node (DNAT only) and on the
other node (SNAT); ip6tables' rules in eBPF mode serve only what tc leaves to the stack (fragments here).

One lab (the default one plus `DUAL_STACK_CONFIG` and a UDP NodePort) is shared by the module; the client pod is
on node1 and the echo pods on node1 and node2, so every Service test crosses nodes. Marked `bcc`: the first load
compiles bpf-src/sock_lb.c and nodeport_tc.c; everything is attached to the lab's own cgroups and interfaces and
removed by `lab down`.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Iterator

import pytest

from nodeagent.kernel.bpf import loader
from nodeagent.kernel.bpf.syscall import MapHandle
from nodeagent.kernel.netns import command_in
from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.demo import request_from
from nodeagent.service.ebpf.flows import CT_KEY6, CT_VALUE6, TcFlow, TcFlowTable
from tests.integration.test_dualstack_lab import SERVICES, cluster_ips, from_node, peer_ip, target
from tests.support.agent_labs import lab_with_agents

pytestmark = [pytest.mark.root, pytest.mark.bcc]


UDP_NODE_PORT = """---
apiVersion: v1
kind: Service
metadata: {name: dual-udp-np, namespace: demo}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  selector: {app: echo}
  ports: [{name: udp, port: 53, targetPort: 8081, protocol: UDP, nodePort: 30092}]
"""
TCP_NODE_PORT, UDP_PORT = 30090, 30092


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("ebpf-ipv6-lab"), SERVICES + UDP_NODE_PORT, "ebpf",
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


def rule_packets(lab: labs.Lab, node: str, port: int) -> int:
    """Packets the node's ip6tables nat rules matching `--dport port` have counted (first packets of flows)."""
    saved = subprocess.run(command_in(lab.plan.node(node).netns, ["ip6tables-save", "-c", "-t", "nat"]),
                           capture_output=True, text=True, check=True).stdout
    lines = [line for line in saved.splitlines() if f"--dport {port} " in line and line.startswith("[")]
    assert lines, f"ip6tables keeps rules for the IPv6 NodePort {port} (for what tc leaves to the stack)"
    return sum(int(line[1:].split(":", 1)[0]) for line in lines)


def tc_flows6(lab: labs.Lab, node: str, port: int, protocol: str) -> list[TcFlow]:
    """The forward flows of `node`'s tc IPv6 flow map (na_ct6) to `port`."""
    pins = loader.pin_dir(f"{lab.record.name}-{node}")
    handle = MapHandle.pinned(str(pins / "na_ct6"), CT_KEY6.size, CT_VALUE6.size)
    try:
        return [f for f in TcFlowTable(handle, family=6).flows(6, protocol) if f.orig_dst_port == port]
    finally:
        handle.close()


def addresses6(lab: labs.Lab) -> tuple[str, str]:
    node1, node2 = lab.plan.node("node1").node, lab.plan.node("node2").node
    assert node1.address6 is not None and node2.address6 is not None
    return str(node1.address6), str(node2.address6)


def test_an_ipv6_node_port_from_the_other_node_goes_through_tc(lab: labs.Lab) -> None:
    """Both backends answer over TCP; the one on node1 sees the client's address (DNAT only), the one on node2
    node1's (SNAT); tc's na_ct6 holds the flows and not one packet met ip6tables' NodePort rules."""
    node1, node2 = addresses6(lab)
    before = rule_packets(lab, "node1", TCP_NODE_PORT)
    peers: dict[str, set[str]] = {}
    for _ in range(16):
        answer = from_node(lab, "node2", target(node1, TCP_NODE_PORT))
        peers.setdefault(answer["pod"], set()).add(peer_ip(answer))
    assert set(peers) == {"demo/echo-0", "demo/echo-1"}, peers
    assert peers["demo/echo-0"] == {node2}, "a backend on node1 sees the client (DNAT only)"
    assert peers["demo/echo-1"] == {node1}, "a backend on node2 sees node1 (SNAT to the frontend)"
    assert rule_packets(lab, "node1", TCP_NODE_PORT) == before, "ip6tables' NodePort rules saw none of it"
    flows = tc_flows6(lab, "node1", TCP_NODE_PORT, "tcp")
    assert {str(f.orig_dst) for f in flows} == {node1}
    assert {str(f.reply_src) for f in flows} == {str(lab.plan.pod(p).pod.ip6) for p in peers}, "tc kept them"


UDP_CLIENT = ("import socket,sys,json;out=[]\n"
              "for _ in range(int(sys.argv[3])):\n"
              " s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM);s.settimeout(5)\n"
              " s.sendto(b'x'*int(sys.argv[4]),(sys.argv[1],int(sys.argv[2])));data,src=s.recvfrom(65535)\n"
              " a=json.loads(data);out.append([a['pod'],a['peer'],src[0],src[1]]);s.close()\n"
              "print(json.dumps(out))")


def udp_from_node2(lab: labs.Lab, host: str, count: int, size: int) -> list[tuple[str, str, str, int]]:
    """`count` datagrams of `size` bytes from node2 (a new socket each) to host:UDP_PORT: (pod, the peer it saw,
    reply source address, reply source port) each."""
    plan = lab.plan.node("node2")
    argv = processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup),
                                ["python3", "-c", UDP_CLIENT, host, str(UDP_PORT), str(count), str(size)])
    result = subprocess.run(argv, env=processes.child_env({}), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [(pod, peer.rpartition(":")[0].strip("[]"), ip, port) for pod, peer, ip, port in json.loads(result.stdout)]


def test_udp_over_an_ipv6_node_port_from_the_other_node_goes_through_tc(lab: labs.Lab) -> None:
    node1, node2 = addresses6(lab)
    before = rule_packets(lab, "node1", UDP_PORT)
    answers = udp_from_node2(lab, node1, 16, 2)
    assert {pod for pod, _, _, _ in answers} == {"demo/echo-0", "demo/echo-1"}
    assert {(ip, port) for _, _, ip, port in answers} == {(node1, UDP_PORT)}, "replies come from the NodePort"
    assert {peer for pod, peer, _, _ in answers if pod == "demo/echo-0"} == {node2}, "DNAT only on node1"
    assert {peer for pod, peer, _, _ in answers if pod == "demo/echo-1"} == {node1}, "SNAT towards node2"
    assert rule_packets(lab, "node1", UDP_PORT) == before, "ip6tables' NodePort rules saw none of it"
    assert tc_flows6(lab, "node1", UDP_PORT, "udp"), "tc's na_ct6 holds the UDP flows"


def test_a_fragmented_ipv6_datagram_tc_leaves_to_the_stack_is_served_by_ip6tables(lab: labs.Lab) -> None:
    """tc parses no extension header: a datagram larger than the link's MTU leaves node2 in fragments (IPv6
    routers never fragment, the sender does), tc on node1 passes them to the stack, whose conntrack reassembles
    them and whose ip6tables rules (kept for every IPv6 external frontend for this) DNAT it, as kube-proxy does."""
    node1, _ = addresses6(lab)
    link = subprocess.run(command_in(lab.plan.node("node2").netns, ["ip", "-o", "link", "show", "eth0"]),
                          capture_output=True, text=True, check=True).stdout.split()
    mtu = int(link[link.index("mtu") + 1])
    before = rule_packets(lab, "node1", UDP_PORT)
    answers = udp_from_node2(lab, node1, 4, 2 * mtu)
    assert {pod for pod, _, _, _ in answers} <= {"demo/echo-0", "demo/echo-1"} and len(answers) == 4
    assert {(ip, port) for _, _, ip, port in answers} == {(node1, UDP_PORT)}
    assert rule_packets(lab, "node1", UDP_PORT) >= before + 4, "each datagram met ip6tables' NodePort rule"
