"""Stale UDP conntrack flows found in the kernel's table, in a network namespace made for the test.

UDP flows are NATed by the proxier's rules to a Service's two endpoints; then a new proxier (the agent after a
restart: it knows nothing of the previous endpoints) syncs the Service with one endpoint removed. The flows of
the removed endpoint are gone, those of the remaining one stay (kube-proxy's conntrack reconciler). The kernel
side (listing, deleting by filter, counting) is checked against the `conntrack` binary on its own as well.

In the lab, node1's agent is killed, an endpoint of the UDP Service is removed while it is down, and the agent
is started again (in iptables mode, or in eBPF mode: flows NATed by iptables before the switch): the flows to the
removed endpoint are deleted by the restarted agent, those of the other one stay.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from nodeagent.kernel.bpf import loader
from nodeagent.kernel.bpf.syscall import MapHandle
from nodeagent.kernel.conntrack import Conntrack
from nodeagent.kernel.netfilter import Iptables
from nodeagent.lab import lab as labs
from nodeagent.lab.agents import AGENT_OWNER, agent_argv, spawn_owned
from nodeagent.lab.state import locked
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler, Filter
from nodeagent.service.ebpf.flows import CT_KEY, CT_VALUE, TcFlow, TcFlowTable
from nodeagent.service.iptables.proxier import IptablesProxier
from nodeagent.state.tracker import Snapshot
from tests.integration.conftest import unique_lab_name, wait_for
from tests.support.agent_labs import lab_with_agents, owner_process
from tests.support.fabric import fabric_client, spawn_in
from tests.support.services import ep, service, slice_, snapshot_of

pytestmark = pytest.mark.root

CONFIG = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("10.180.0.254"),
                     cluster_cidrs=(ipaddress.ip_network("10.180.0.0/16"),))
VIP, PORT, NODE_PORT = "172.30.0.10", 53, 30053
KEPT, REMOVED = "10.180.0.1", "10.180.0.2"
CLIENT_PORTS = range(40000, 40040)  # 40 flows: both endpoints are chosen (all on one: 2 * 2^-40)


@pytest.fixture
def netns() -> Iterator[str]:
    """A node namespace whose packets go nowhere: every route leads into a veth pair whose other end, in the same
    namespace, drops them (the first packet of a UDP flow is enough for conntrack to record it, NATed, and keep
    it for 30 s)."""
    name = unique_lab_name() + "-ct"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "link", "add", "out0", "type", "veth", "peer", "sink0"],
                     ["ip", "addr", "add", "10.180.0.254/24", "dev", "out0"], ["ip", "link", "set", "out0", "up"],
                     ["ip", "link", "set", "sink0", "up"], ["ip", "route", "add", "default", "dev", "out0"]):
            subprocess.run(["ip", "netns", "exec", name, *argv], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def send_udp(netns: str, destination: str, port: int, sources: range) -> None:
    """One datagram to destination:port from each source port, from inside the namespace."""
    code = ("import socket,sys\n"
            "for p in range(int(sys.argv[3]), int(sys.argv[4])):\n"
            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "    s.bind(('0.0.0.0', p)); s.sendto(b'x', (sys.argv[1], int(sys.argv[2]))); s.close()\n")
    subprocess.run(["ip", "netns", "exec", netns, "python3", "-c", code, destination, str(port),
                    str(sources.start), str(sources.stop)], check=True, timeout=30)


def replies(netns: str) -> dict[str, int]:
    """UDP flows to the Service address, by the endpoint that answers them (the DNAT target)."""
    found: dict[str, int] = {}
    for flow in Conntrack(netns).flows(4):
        if str(flow.orig_dst) == VIP and flow.orig_dst_port == PORT:
            found[str(flow.reply_src)] = found.get(str(flow.reply_src), 0) + 1
    return found


def dns(*endpoints: str) -> Snapshot:
    return snapshot_of(service("ns1", "dns", VIP, protocol="UDP", port=PORT, type_="NodePort", node_port=NODE_PORT),
                       slice_("ns1", "dns", *(ep(ip) for ip in endpoints), port=PORT, protocol="UDP"))


def test_after_a_restart_flows_of_a_removed_endpoint_are_deleted_and_the_others_stay(netns: str) -> None:
    ipt = Iptables("nft", netns)
    before = dns(KEPT, REMOVED)
    IptablesProxier(ipt).sync(before, CONFIG, before.changed_services)
    send_udp(netns, VIP, PORT, CLIENT_PORTS)
    flows = replies(netns)
    assert flows.keys() == {KEPT, REMOVED} and sum(flows.values()) == len(CLIENT_PORTS), flows
    restarted = IptablesProxier(ipt)  # the agent after a restart: no previous endpoints in memory
    after = dns(KEPT)
    report = restarted.sync(after, CONFIG, after.changed_services)
    assert report.conntrack is not None and report.conntrack.complete
    assert report.conntrack.deleted == flows[REMOVED]
    assert report.conntrack.filters == (Filter(ipaddress.ip_address(VIP), PORT, ipaddress.ip_address(REMOVED), PORT),)
    assert replies(netns) == {KEPT: flows[KEPT]}, "the remaining endpoint's flows stay"
    assert restarted.conntrack is not None and restarted.conntrack.deleted_total == flows[REMOVED]


def test_the_kernel_side_lists_deletes_by_filter_and_counts(netns: str) -> None:
    """Flows NATed by a plain DNAT rule (as an iptables datapath left them, before a switch to eBPF): a
    NodePort filter (no destination address) deletes only the flows NATed to the stale endpoint."""
    subprocess.run(["ip", "netns", "exec", netns, "iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "udp",
                    "--dport", str(NODE_PORT), "-m", "statistic", "--mode", "nth", "--every", "2", "--packet", "0",
                    "-j", "DNAT", "--to-destination", f"{REMOVED}:{PORT}"], check=True)
    subprocess.run(["ip", "netns", "exec", netns, "iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "udp",
                    "--dport", str(NODE_PORT), "-j", "DNAT", "--to-destination", f"{KEPT}:{PORT}"], check=True)
    send_udp(netns, "10.180.0.254", NODE_PORT, range(41000, 41010))
    table = Conntrack(netns)
    nodeport = [f for f in table.flows(4) if f.orig_dst_port == NODE_PORT]
    assert sorted(str(f.reply_src) for f in nodeport) == [KEPT] * 5 + [REMOVED] * 5
    reconciler = ConntrackReconciler(table)
    result = reconciler.after_sync(dns(KEPT).service_ports, dns(KEPT).endpoints, set())
    assert result is not None and result.deleted == 5 and result.complete
    assert result.filters == (Filter(None, NODE_PORT, ipaddress.ip_address(REMOVED), PORT),)
    assert sorted(str(f.reply_src) for f in table.flows(4) if f.orig_dst_port == NODE_PORT) == [KEPT] * 5
    assert table.delete(4, Filter(None, NODE_PORT, ipaddress.ip_address(REMOVED), PORT)) == 0, "nothing left"


# --- the lab: a real agent killed, an endpoint removed while it is down, the agent started again ---------------


@pytest.fixture(params=["iptables", pytest.param("ebpf", marks=pytest.mark.bcc)])
def restarted_mode(request: pytest.FixtureRequest) -> str:
    """The mode the agent comes back in (eBPF: flows NATed by the iptables datapath before the switch)."""
    return str(request.param)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path, "", "iptables", ["--min-sync-period", "0.1"]) as built:
        yield built


def lab_udp_flows(lab: labs.Lab, node: str, vip: str) -> dict[str, int]:
    """UDP flows to vip:53 in `node`'s conntrack table, by the endpoint that answers them."""
    found: dict[str, int] = {}
    for flow in Conntrack(lab.plan.node(node).netns).flows(4):
        if str(flow.orig_dst) == vip and flow.orig_dst_port == 53:
            found[str(flow.reply_src)] = found.get(str(flow.reply_src), 0) + 1
    return found


def test_stale_flows_are_deleted_when_the_agent_comes_back(lab: labs.Lab, restarted_mode: str) -> None:
    vip = str(lab.cluster_ip("echo"))
    send_udp(lab.plan.pod("demo/client").netns, vip, 53, range(42000, 42040))
    flows = lab_udp_flows(lab, "node1", vip)
    assert len(flows) == 2 and sum(flows.values()) == 40, flows
    removed, kept = sorted(flows)
    agent = owner_process(lab, AGENT_OWNER + "node1")
    os.kill(agent.pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(agent.pid) or agent.status() == psutil.STATUS_ZOMBIE, "agent gone")
    documents = list(yaml.safe_load_all(lab.record.manifests_path.read_text()))
    for doc in documents:
        if doc["kind"] == "EndpointSlice" and doc["metadata"]["labels"]["kubernetes.io/service-name"] == "echo":
            doc["endpoints"] = [e for e in doc["endpoints"] if e["addresses"] != [removed]]
    lab.record.manifests_path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    assert lab_udp_flows(lab, "node1", vip) == flows, "nobody deleted them while the agent was down"
    log = lab.record.directory / "logs" / f"{AGENT_OWNER.rstrip('/')}.node1.log"
    before = len(log.read_text().splitlines()) if log.exists() else 0
    with locked(lab.record.name):
        _, written = spawn_owned(labs.load(lab.record.name), "node1", AGENT_OWNER, "nodeagent",
                                 agent_argv(lab, "node1", restarted_mode, ["--min-sync-period", "0.1"]), None)
    assert written == log
    wait_for(lambda: removed not in lab_udp_flows(lab, "node1", vip), "the removed endpoint's flows deleted",
             timeout=30)
    assert lab_udp_flows(lab, "node1", vip) == {kept: flows[kept]}, "the remaining endpoint's flows stay"
    # (the log file is the killed agent's too; in eBPF mode with tc attached, the eBPF proxier's reconciler ran)
    deleted = [json.loads(line) for line in log.read_text().splitlines()[before:]
               if "stale UDP conntrack flows deleted" in line]
    assert deleted and deleted[0]["deleted"] == flows[removed], "the restarted agent deleted them (not a timeout)"


# --- eBPF mode: tc's own flow map (na_ct), which the kernel's conntrack never sees --------------------------------

TC_NODE_PORT = 30057
# One datagram at a time to node:port from ONE fixed source port (the same 5-tuple throughout), a line per answer
# with the pod that answered (null when none did within the timeout); the timeout paces it.
STICKY_SENDER = ("import json,socket,sys,time\n"
                 "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',int(sys.argv[3])))\n"
                 "s.settimeout(0.3)\n"
                 "while True:\n"
                 " s.sendto(b'x',(sys.argv[1],int(sys.argv[2])))\n"
                 " try: pod=json.loads(s.recvfrom(4096)[0])['pod']\n"
                 " except OSError: pod=None\n"
                 " print(json.dumps(pod),flush=True)\n"
                 " time.sleep(0.05)\n")  # pacing a traffic generator (about 20 datagrams a second), not a wait


def udp_node_port_objects(lab: labs.Lab, pods: list[str]) -> list[dict[str, Any]]:
    """A UDP NodePort Service without a selector and its EndpointSlice holding `pods` (the test's own: the lab's
    endpoint-slice controller leaves it alone)."""
    svc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "tc-dns", "namespace": "demo"},
        "spec": {"type": "NodePort", "ports": [{"name": "dns", "port": 53, "targetPort": 8081,
                                                 "nodePort": TC_NODE_PORT, "protocol": "UDP"}]}}
    endpoints = [{"addresses": [str(lab.plan.pod(pod).pod.ip)], "nodeName": lab.plan.pod(pod).pod.node,
                  "conditions": {"ready": True, "serving": True, "terminating": False}} for pod in pods]
    slice_doc: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "tc-dns-1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "tc-dns"}},
        "addressType": "IPv4", "ports": [{"name": "dns", "port": 8081, "protocol": "UDP"}], "endpoints": endpoints}
    return [svc, slice_doc]


def kubectl_apply(lab: labs.Lab, objects: list[dict[str, Any]]) -> None:
    """`kubectl apply` through the lab's API server (from a file: the lab's kubectl takes no stdin)."""
    path = Path(lab.record.directory) / "tc-flow-objects.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    result = labs.kubectl(lab.record.name, ["apply", "--validate=false", "-f", str(path)], capture=True, timeout=30)
    assert result.returncode == 0, result.stderr


class StickySender:
    """The outside client's continuous UDP flow from one source port, read from its output file."""

    def __init__(self, netns: str, output: Path, host: str, source_port: int) -> None:
        self.netns, self.host, self.output, self.source_port = netns, host, output, source_port
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return spawn_in(self.netns, [sys.executable, "-c", STICKY_SENDER, self.host, str(TC_NODE_PORT),
                                     str(self.source_port)], str(self.output))

    def answers(self) -> list[str | None]:
        lines = self.output.read_text().splitlines()
        return [json.loads(line) for line in lines[:-1]]  # the last line may be half written

    def recent(self, count: int) -> list[str | None]:
        """The pods that answered the last `count` datagrams ([] until that many were answered or not)."""
        seen = self.answers()
        return seen[-count:] if len(seen) >= count else []

    def settled_on(self, count: int = 5) -> str | None:
        """The pod that answered each of the last `count` datagrams, if one did."""
        recent = self.recent(count)
        return recent[0] if recent and recent[0] is not None and len(set(recent)) == 1 else None

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def ebpf_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[labs.Lab, str]]:
    """A lab in eBPF mode (tc serves traffic from outside) with a client on the fabric: (lab, client netns)."""
    with (lab_with_agents(tmp_path_factory.mktemp("tc-flows"), "", "ebpf", ["--min-sync-period", "0.1"]) as built,
          fabric_client(built) as (netns, _address)):
        yield built, netns


@pytest.fixture
def sender(ebpf_lab: tuple[labs.Lab, str], tmp_path: Path,
           request: pytest.FixtureRequest) -> Iterator[tuple[labs.Lab, StickySender]]:
    """Both echo pods behind the UDP NodePort, and the outside client's flow to node1's NodePort settled on one."""
    lab, netns = ebpf_lab
    kubectl_apply(lab, udp_node_port_objects(lab, ["demo/echo-0", "demo/echo-1"]))
    source_port = 46000 + zlib.crc32(request.node.name.encode()) % 1000  # each test its own 5-tuple
    flow = StickySender(netns, tmp_path / "answers", str(lab.plan.node("node1").node.address), source_port)
    try:
        wait_for(lambda: flow.settled_on(10) is not None, "the outside flow answered by one pod", timeout=30)
        yield lab, flow
    finally:
        flow.stop()


def tc_forward_flows(lab: labs.Lab, node: str, source_port: int | None = None) -> list[TcFlow]:
    """The forward UDP flows of `node`'s tc flow map to the test's NodePort (from `source_port`, if given)."""
    pins = loader.pin_dir(f"{lab.record.name}-{node}")
    table = TcFlowTable(MapHandle.pinned(str(pins / "na_ct"), CT_KEY.size, CT_VALUE.size))
    return [f for f in table.flows(4) if f.orig_dst_port == TC_NODE_PORT
            and (source_port is None or CT_KEY.unpack(f.key)[2] == source_port)]


@pytest.mark.bcc
def test_tc_flow_to_a_removed_endpoint_moves_to_a_remaining_one(sender: tuple[labs.Lab, StickySender]) -> None:
    lab, flow = sender
    stuck = flow.settled_on(10)
    assert stuck is not None
    other = "demo/echo-1" if stuck == "demo/echo-0" else "demo/echo-0"
    assert [str(f.reply_src) for f in tc_forward_flows(lab, "node1", flow.source_port)] == [
        str(lab.plan.pod(stuck).pod.ip)], "tc (not the kernel) keeps the flow"
    kubectl_apply(lab, udp_node_port_objects(lab, [other]))  # the stuck endpoint leaves the slice (its pod lives)
    # the pod still answers what reaches it: only deleting tc's entry moves the flow (a new one goes to `other`)
    took = wait_for(lambda: flow.settled_on(5) == other, f"the same 5-tuple answered by {other}", timeout=15)
    print(f"the flow moved to the remaining endpoint {took:.2f} s after the slice changed")
    assert [str(f.reply_src) for f in tc_forward_flows(lab, "node1", flow.source_port)] == [
        str(lab.plan.pod(other).pod.ip)]


@pytest.mark.bcc
def test_a_restarted_agent_deletes_the_tc_flow_of_an_endpoint_removed_while_it_was_down(
        sender: tuple[labs.Lab, StickySender]) -> None:
    lab, flow = sender
    stuck = flow.settled_on(10)
    assert stuck is not None
    other = "demo/echo-1" if stuck == "demo/echo-0" else "demo/echo-0"
    agent = owner_process(lab, AGENT_OWNER + "node1")
    os.kill(agent.pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(agent.pid) or agent.status() == psutil.STATUS_ZOMBIE, "agent gone")
    kubectl_apply(lab, udp_node_port_objects(lab, [other]))
    # nobody deletes it while the agent is down: the flow keeps reaching the removed endpoint (tc still serves)
    answered = len(flow.answers())
    wait_for(lambda: len(flow.answers()) >= answered + 10, "ten more datagrams while the agent is down")
    assert set(flow.answers()[answered:]) == {stuck}, "the stale flow stays while nobody reconciles"
    removed_ip = str(lab.plan.pod(stuck).pod.ip)
    # (an earlier test's flow to the same NodePort may point at the removed endpoint too: it goes as well)
    stale = sum(str(f.reply_src) == removed_ip for f in tc_forward_flows(lab, "node1"))
    assert stale >= 1
    log = lab.record.directory / "logs" / f"{AGENT_OWNER.rstrip('/')}.node1.log"
    before = len(log.read_text().splitlines()) if log.exists() else 0
    # The client keeps sending across the restart: a datagram between the restarted agent's first reconcile and
    # its maps' update would make a new flow to the removed backend, so the proxier reconciles only after the
    # maps are written (this failed 2 of 5 runs when it reconciled first).
    with locked(lab.record.name):
        spawn_owned(labs.load(lab.record.name), "node1", AGENT_OWNER, "nodeagent",
                    agent_argv(lab, "node1", "ebpf", ["--min-sync-period", "0.1"]), None)
    wait_for(lambda: any("ebpf maps synced" in line for line in log.read_text().splitlines()[before:]),
             "the restarted agent's first sync", timeout=60)
    try:
        wait_for(lambda: flow.settled_on(5) == other, f"the same 5-tuple answered by {other} after the restart",
                 timeout=30)
    except AssertionError as exc:
        lines = log.read_text().splitlines()[before:]
        raise AssertionError(f"{exc}; answers {flow.answers()[-5:]}; tc flows "
                             f"{[str(f.reply_src) for f in tc_forward_flows(lab, 'node1')]}; the restarted agent "
                             f"logged:\n" + "\n".join(lines[-40:])) from exc
    deleted = [json.loads(line) for line in log.read_text().splitlines()[before:]
               if "stale UDP conntrack flows deleted" in line]
    assert deleted and deleted[0]["deleted"] == stale, "the restarted agent deleted tc's entries (not an eviction)"
    assert removed_ip not in {str(f.reply_src) for f in tc_forward_flows(lab, "node1")}
