"""Network namespaces, links, addresses and routes of a lab: the only place the lab talks netlink.

Every object is created inside a namespace the lab owns; veth peers are created directly in their
target namespace, so not even a transient link ever appears in the root network namespace.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv6Network
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from nodeagent.lab.errors import LabEnvironmentError
from nodeagent.lab.plan import BRIDGE, UPLINK, NodePlan, PodPlan, Route

NETNS_DIR = Path("/run/netns")
# ifaddrmsg flag: the address is usable at once, without Duplicate Address Detection (the lab allocates
# every address itself, so there is nothing to detect, and a tentative address would refuse to be a source
# for a second or more after `lab up`)
IFA_F_NODAD = 0x02
# A dual-stack node's sysctls, set inside its own namespace: it routes IPv6 between its pods and the fabric,
# and links created in it later (the pods' veths) skip DAD too.
IPV6_NODE_SYSCTLS = ("net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.all.accept_dad=0",
                     "net.ipv6.conf.default.accept_dad=0")


def list_netns() -> list[str]:
    """Names of the namespaces under /run/netns."""
    return sorted(netns.listnetns())


def exists(name: str) -> bool:
    """True if /run/netns/<name> is there."""
    return (NETNS_DIR / name).exists()


def create(name: str) -> None:
    """Create the named namespace with its loopback up."""
    netns.create(name)
    with _ipr(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def remove(name: str) -> None:
    """Remove the named namespace (its links go with it); absent is fine."""
    if exists(name):
        netns.remove(name)


@contextmanager
def _ipr(name: str) -> Iterator[IPRoute]:
    """netlink in namespace `name`; kernel refusals become errors that say what is probably missing."""
    ipr = IPRoute(netns=name)
    try:
        yield ipr
    except NetlinkError as exc:
        raise LabEnvironmentError(
            f"netlink in namespace {name} refused an operation: {exc.args[-1]} (errno {exc.code}); if the "
            "kernel lacks veth or bridge support (CONFIG_VETH, CONFIG_BRIDGE), `nodeagent doctor` shows it"
        ) from exc
    finally:
        ipr.close()


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no link {ifname!r}")
    return int(found[0])


def _add_route(ipr: IPRoute, route: Route) -> None:
    oif = _index(ipr, route.dev)
    if route.gateway is None and route.dst.version == 6:
        ipr.route("add", dst=str(route.dst), oif=oif, family=socket.AF_INET6)
    elif route.gateway is None:
        ipr.route("add", dst=str(route.dst), oif=oif, scope="link")
    else:
        ipr.route("add", dst=str(route.dst), gateway=str(route.gateway), oif=oif)


def _add_address(ipr: IPRoute, index: int, address: str, prefixlen: int) -> None:
    """Put `address` on link `index`; an IPv6 one without DAD (IFA_F_NODAD), usable at once."""
    if ":" in address:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen, family=socket.AF_INET6,
                 flags=IFA_F_NODAD)
    else:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)


def set_sysctl(name: str, key: str, value: str, *more: str) -> None:
    """Set a per-namespace sysctl (e.g. net.ipv4.ip_forward) inside namespace `name`, and `more` `key=value`
    ones in the same call."""
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", f"{key}={value}", *more], check=True,
                   capture_output=True, text=True)


def build_fabric(fabric: str, ipv6: bool = False) -> None:
    """The bridge that plays the nodes' L2 network. With `ipv6`, without multicast snooping: nodes skip DAD
    and so may never report the solicited-node groups their neighbour solicitations go to; the bridge floods
    them, as a plain switch does."""
    with _ipr(fabric) as ipr:
        if ipv6:
            ipr.link("add", ifname=BRIDGE, kind="bridge", br_mcast_snooping=0)
        else:
            ipr.link("add", ifname=BRIDGE, kind="bridge")
        ipr.link("set", index=_index(ipr, BRIDGE), state="up")


def attach_node(fabric: str, plan: NodePlan) -> None:
    """Plug node `plan` into the fabric bridge, address it and route to the other nodes' pod CIDRs."""
    with _ipr(fabric) as ipr:
        ipr.link("add", ifname=plan.fabric_port, kind="veth",
                 peer={"ifname": UPLINK, "net_ns_fd": plan.netns})
        port = _index(ipr, plan.fabric_port)
        ipr.link("set", index=port, master=_index(ipr, BRIDGE))
        ipr.link("set", index=port, state="up")
    with _ipr(plan.netns) as ipr:
        uplink = _index(ipr, UPLINK)
        ipr.addr("add", index=uplink, address=str(plan.node.address), prefixlen=plan.prefixlen)
        if plan.node.address6 is not None and plan.prefixlen6 is not None:
            _add_address(ipr, uplink, str(plan.node.address6), plan.prefixlen6)
        ipr.link("set", index=uplink, state="up")
        for route in plan.routes:
            _add_route(ipr, route)
    if plan.node.address6 is not None:
        set_sysctl(plan.netns, "net.ipv4.ip_forward", "1", *IPV6_NODE_SYSCTLS)
    else:
        set_sysctl(plan.netns, "net.ipv4.ip_forward", "1")


def attach_pod(plan: PodPlan) -> None:
    """Join pod `plan` to its node: a veth, the node's gateway address on the node end, /32 routes."""
    # the host routes of the plan are the node's gateway addresses: /32 (and /128 in a dual-stack lab)
    gateways = [r.dst.network_address for r in plan.routes if r.gateway is None and r.dst.prefixlen in (32, 128)]
    with _ipr(plan.node_netns) as ipr:
        ipr.link("add", ifname=plan.host_ifname, kind="veth", peer={"ifname": UPLINK, "net_ns_fd": plan.netns})
        host = _index(ipr, plan.host_ifname)
        # The same /32 gateway address on every pod link of a node: each pod ARPs for it on its own link (and
        # the /128 IPv6 one, which each pod's neighbour solicitation finds on its own link).
        for gateway in gateways:
            _add_address(ipr, host, str(gateway), gateway.max_prefixlen)
        ipr.link("set", index=host, state="up")
        ipr.route("add", dst=f"{plan.pod.ip}/32", oif=host, scope="link")
        if plan.pod.ip6 is not None:
            _add_route(ipr, Route(dst=IPv6Network(f"{plan.pod.ip6}/128"), dev=plan.host_ifname))
    with _ipr(plan.netns) as ipr:
        uplink = _index(ipr, UPLINK)
        for address in plan.pod.ips:
            _add_address(ipr, uplink, str(address), address.max_prefixlen)
        ipr.link("set", index=uplink, state="up")
        for route in plan.routes:
            _add_route(ipr, route)
