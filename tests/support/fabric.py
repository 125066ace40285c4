"""A client outside the cluster: a network namespace of its own on the lab's fabric bridge, with an address of
the node network that is no node's, so no agent translates what it sends (its packets reach a node's interface
as an outside client's would, through the node's tc programs in eBPF mode)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Network

from pyroute2 import IPRoute

from nodeagent.kernel.netns import command_in
from nodeagent.lab import lab as labs
from nodeagent.lab.plan import BRIDGE


@contextmanager
def fabric_client(lab: labs.Lab, host: int = 210, suffix: str = "outer") -> Iterator[tuple[str, str]]:
    """(netns, address) of a client namespace on the fabric bridge, holding host number `host` of the node
    network; removed (with its veth) on exit, also on failure."""
    netns = f"{lab.record.name}-{suffix}"
    assert netns not in lab.plan.all_netns(), f"{netns} is one of the lab's own namespaces"
    first = lab.plan.node("node1")
    network = IPv4Network(f"{first.node.address}/{first.prefixlen}", strict=False)
    address = str(network[host])
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        with IPRoute(netns=lab.plan.fabric_netns) as ipr:
            ipr.link("add", ifname=f"{suffix[:8]}0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": netns})
            port = ipr.link_lookup(ifname=f"{suffix[:8]}0")[0]
            ipr.link("set", index=port, master=ipr.link_lookup(ifname=BRIDGE)[0], state="up")
        with IPRoute(netns=netns) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=address, prefixlen=network.prefixlen)
            ipr.link("set", index=eth0, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        yield netns, address
    finally:
        # deleting the namespace deletes its veth end, and with it the peer on the bridge
        subprocess.run(["ip", "netns", "delete", netns], check=False, capture_output=True)


def spawn_in(netns: str, argv: list[str], output: str) -> subprocess.Popen[bytes]:
    """Start `argv` in `netns` with its standard output going to the file `output` (read while it runs)."""
    with open(output, "wb") as sink:
        return subprocess.Popen(command_in(netns, argv), stdout=sink, stderr=subprocess.STDOUT)
