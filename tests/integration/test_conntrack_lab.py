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
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from nodeagent.kernel.conntrack import Conntrack
from nodeagent.kernel.netfilter import Iptables
from nodeagent.lab import lab as labs
from nodeagent.lab.agents import AGENT_OWNER, agent_argv, spawn_owned
from nodeagent.lab.state import locked
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler, Filter
from nodeagent.service.iptables.proxier import IptablesProxier
from nodeagent.state.tracker import Snapshot
from tests.integration.conftest import unique_lab_name, wait_for
from tests.support.agent_labs import lab_with_agents, owner_process
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
