"""External traffic policies in a real lab, in both datapaths: loadBalancerSourceRanges and
externalTrafficPolicy: Local, seen by a client outside the cluster.

The client lives in a network namespace of its own on the lab's fabric bridge (an address of the node
network that is no node's), so no agent translates its connects: its packets reach a node's interface as
an outside client's would. In eBPF mode the tc programs leave these Services' external frontends to
kube-proxy's iptables rules (tc does not implement them); the tests prove the effect is the same in both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest
from pyroute2 import IPRoute

from nodeagent.kernel.netns import command_in
from nodeagent.lab import lab as labs
from nodeagent.lab.plan import BRIDGE
from tests.support.agent_labs import lab_with_agents

pytestmark = pytest.mark.root

LB_IP = "192.0.2.10"  # a load-balancer address the outside routes to node1 (TEST-NET-1: never on a real link)
INSIDE, OUTSIDE = 200, 201  # the outside client's two addresses: host numbers in the node network
EXTRA = f"""
apiVersion: v1
kind: Service
metadata: {{name: ranged, namespace: demo}}
spec:
  type: LoadBalancer
  selector: {{app: echo}}
  loadBalancerSourceRanges: [172.18.0.{INSIDE}/32]
  ports: [{{name: http, port: 8090, targetPort: 8080, nodePort: 30090}}]
status:
  loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: local-np, namespace: demo}}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30091}}]
"""

# Connect from `source` to host:port, send a line, print the echo server's JSON answer, or the error's name.
REQUEST = ("import socket,sys,json\n"
           "s=socket.socket();s.settimeout(3);s.bind((sys.argv[1],0))\n"
           "try:\n s.connect((sys.argv[2],int(sys.argv[3])));s.sendall(b'x\\n')\n"
           " print(s.makefile().readline().strip())\n"
           "except OSError as e:\n print(json.dumps({'error':type(e).__name__}))\n")


class Outside:
    """A client outside the cluster: its own namespace on the fabric bridge, two addresses."""

    mode = ""  # the agents' datapath

    def __init__(self, lab: labs.Lab) -> None:
        self.netns = f"{lab.record.name}-outside"
        network = IPv4Network(f"{lab.plan.node('node1').node.address}/{lab.plan.node('node1').prefixlen}",
                              strict=False)
        self.inside, self.outside = str(network[INSIDE]), str(network[OUTSIDE])
        assert self.inside == f"172.18.0.{INSIDE}", "the manifests' source range names this address"
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        try:
            fabric = lab.plan.fabric_netns
            with IPRoute(netns=fabric) as ipr:
                ipr.link("add", ifname="outside0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.netns})
                port = ipr.link_lookup(ifname="outside0")[0]
                ipr.link("set", index=port, master=ipr.link_lookup(ifname=BRIDGE)[0], state="up")
            with IPRoute(netns=self.netns) as ipr:
                eth0 = ipr.link_lookup(ifname="eth0")[0]
                for address in (self.inside, self.outside):
                    ipr.addr("add", index=eth0, address=address, prefixlen=network.prefixlen)
                ipr.link("set", index=eth0, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.route("add", dst=f"{LB_IP}/32", gateway=str(lab.plan.node("node1").node.address))
            # node1 routes the load-balancer IP on (as a node with a default route would), so a packet its rules
            # do not translate reaches the FORWARD hook, where kube-proxy's firewall drops it, instead of
            # being answered "no route" (the lab's nodes have no default route)
            with IPRoute(netns=lab.plan.node("node1").netns) as ipr:
                ipr.route("add", dst=f"{LB_IP}/32", gateway=self.outside)
        except BaseException:
            self.remove()
            raise

    def request(self, source: str, host: str, port: int) -> dict[str, str]:
        result = subprocess.run(command_in(self.netns, [sys.executable, "-c", REQUEST, source, host, str(port)]),
                                capture_output=True, text=True, timeout=20, check=False)
        assert result.returncode == 0, result.stderr
        answer: dict[str, str] = json.loads(result.stdout)
        return answer

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.netns], check=False, capture_output=True)


@pytest.fixture(scope="module", params=["iptables", pytest.param("ebpf", marks=pytest.mark.bcc)])
def lab(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[labs.Lab, Outside]]:
    mode = request.param
    with lab_with_agents(tmp_path_factory.mktemp(f"policies-{mode}"), EXTRA, mode,
                         ["--min-sync-period", "0.1"]) as built:
        outside = Outside(built)
        outside.mode = mode
        try:
            yield built, outside
        finally:
            outside.remove()


def firewall_drops(built: labs.Lab) -> int:
    """Packets node1's KUBE-PROXY-FIREWALL dropped for the ranged Service."""
    listing = subprocess.run(command_in(built.plan.node("node1").netns, ["iptables", "-t", "filter", "-L",
                                                                         "KUBE-PROXY-FIREWALL", "-v", "-n", "-x"]),
                             capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[0]) for line in listing.splitlines() if "demo/ranged:http" in line)


def test_source_ranges_admit_a_client_inside_and_refuse_one_outside(lab: tuple[labs.Lab, Outside]) -> None:
    built, client = lab
    admitted = client.request(client.inside, LB_IP, 8090)
    assert admitted.get("pod") in {"demo/echo-0", "demo/echo-1"}, admitted
    before = firewall_drops(built)
    assert client.request(client.outside, LB_IP, 8090) == {"error": "TimeoutError"}, "dropped, as kube-proxy does"
    assert firewall_drops(built) > before, "by kube-proxy's firewall rule"


def test_external_policy_local_reaches_only_the_local_endpoint_and_keeps_the_client_ip(
        lab: tuple[labs.Lab, Outside]) -> None:
    built, client = lab
    for node, pod in (("node1", "demo/echo-0"), ("node2", "demo/echo-1")):
        address = str(built.plan.node(node).node.address)
        answers = [client.request(client.inside, address, 30091) for _ in range(12)]
        assert {a.get("pod") for a in answers} == {pod}, answers
        assert {a["peer"].split(":")[0] for a in answers} == {client.inside}, "the client's address is kept"


def test_in_ebpf_mode_only_the_services_tc_lacks_are_left_on_iptables(lab: tuple[labs.Lab, Outside]) -> None:
    built, client = lab
    node1 = built.plan.node("node1")
    nat = subprocess.run(command_in(node1.netns, ["iptables-save", "-t", "nat"]), capture_output=True, text=True,
                         check=True).stdout
    assert "demo/local-np:http" in nat and "demo/ranged:http" in nat
    filters = subprocess.run(command_in(node1.netns, ["tc", "filter", "show", "dev", "eth0", "ingress"]),
                             capture_output=True, text=True, check=True).stdout
    if client.mode == "ebpf":
        assert "na_tc_ingress" in filters, "tc serves traffic from outside"
        assert "demo/echo:" not in nat and "demo/echo-nodeport:" not in nat, "plain Services are tc's alone"
