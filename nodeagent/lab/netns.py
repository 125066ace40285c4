"""Network namespaces, links, addresses and routes of a lab: the only place the lab talks netlink.

Every object is created inside a namespace the lab owns; veth peers are created directly in their
target namespace, so not even a transient link ever appears in the root network namespace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from nodeagent.lab.errors import LabEnvironmentError
from nodeagent.lab.plan import BRIDGE, UPLINK, NodePlan, PodPlan, Route

NETNS_DIR = Path("/run/netns")


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
    if route.gateway is None:
        ipr.route("add", dst=str(route.dst), oif=oif, scope="link")
    else:
        ipr.route("add", dst=str(route.dst), gateway=str(route.gateway), oif=oif)


def set_sysctl(name: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl (e.g. net.ipv4.ip_forward) inside namespace `name`."""
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", f"{key}={value}"], check=True,
                   capture_output=True, text=True)


def build_fabric(fabric: str) -> None:
    """The bridge that plays the nodes' L2 network."""
    with _ipr(fabric) as ipr:
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
        ipr.link("set", index=uplink, state="up")
        for route in plan.routes:
            _add_route(ipr, route)
    set_sysctl(plan.netns, "net.ipv4.ip_forward", "1")


def attach_pod(plan: PodPlan) -> None:
    """Join pod `plan` to its node: a veth, the node's gateway address on the node end, /32 routes."""
    node_gateway = plan.routes[0].dst.network_address
    with _ipr(plan.node_netns) as ipr:
        ipr.link("add", ifname=plan.host_ifname, kind="veth", peer={"ifname": UPLINK, "net_ns_fd": plan.netns})
        host = _index(ipr, plan.host_ifname)
        # The same /32 gateway address on every pod link of a node: each pod ARPs for it on its own link.
        ipr.addr("add", index=host, address=str(node_gateway), prefixlen=32)
        ipr.link("set", index=host, state="up")
        ipr.route("add", dst=f"{plan.pod.ip}/32", oif=host, scope="link")
    with _ipr(plan.netns) as ipr:
        uplink = _index(ipr, UPLINK)
        ipr.addr("add", index=uplink, address=str(plan.pod.ip), prefixlen=32)
        ipr.link("set", index=uplink, state="up")
        for route in plan.routes:
            _add_route(ipr, route)
