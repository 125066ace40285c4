"""The concrete kernel objects of a lab, named and addressed, computed from its topology. No I/O.

Every name carries the lab's name as prefix so labs can live side by side and `lab down` can find
what belongs to it even without its state file:
  netns   <lab>-fabric, <lab>-node-<node>, <lab>-pod-<namespace>.<pod>   (namespaces have no dots)
  cgroup  <cgroup2 mount>/<lab>-lab/<node>/ for the node, and below it each pod's where the kubelet (systemd
          driver) makes it: kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice
Interface names are unique only inside their namespace: `br0` and one `n<hash>` port per node on
the fabric, `eth0` inside every node and pod, `lxc<hash>` on the node for each pod (as Cilium names them).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import PurePosixPath

from nodeagent.cluster import kubelet
from nodeagent.lab.errors import LabError
from nodeagent.lab.topology import LabNode, LabPod, LabTopology

LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
BRIDGE = "br0"
UPLINK = "eth0"


@dataclass(frozen=True)
class Route:
    """A route inside one namespace: to `dst`, via `gateway` or directly on the link."""

    dst: IPv4Network | IPv6Network
    dev: str
    gateway: IPv4Address | IPv6Address | None = None

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway else " scope link"
        return f"{self.dst} dev {self.dev}{via}"


@dataclass(frozen=True)
class NodePlan:
    """A node's namespace, cgroup, uplink to the fabric bridge and routes to the other nodes' pods."""

    node: LabNode
    netns: str
    cgroup: str
    fabric_port: str
    prefixlen: int
    routes: tuple[Route, ...]
    # the IPv6 node network's prefix length (a dual-stack lab's; `node.address6` is on the uplink with it)
    prefixlen6: int | None = None


@dataclass(frozen=True)
class PodPlan:
    """A pod's namespace and cgroup, and the veth that joins it to its node."""

    pod: LabPod
    netns: str
    node_netns: str
    cgroup: str
    host_ifname: str
    routes: tuple[Route, ...]


@dataclass(frozen=True)
class LabPlan:
    """Everything `lab up` creates, in creation order."""

    name: str
    fabric_netns: str
    cgroup_root: str
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]

    def all_netns(self) -> tuple[str, ...]:
        """Every namespace of the lab, fabric first, pods last."""
        return (self.fabric_netns, *(n.netns for n in self.nodes), *(p.netns for p in self.pods))

    def pod(self, ref: str) -> PodPlan:
        """Find a pod by `namespace/name`, or by `name` when that is unambiguous."""
        matches = [p for p in self.pods if ref in (p.pod.key, p.pod.name)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise LabError(f"lab {self.name!r} has no pod {ref!r}; it has {[p.pod.key for p in self.pods]}")
        raise LabError(f"pod name {ref!r} is ambiguous in lab {self.name!r}: {[p.pod.key for p in matches]}")

    def node(self, name: str) -> NodePlan:
        """Find a node by name."""
        for plan in self.nodes:
            if plan.node.name == name:
                return plan
        raise LabError(f"lab {self.name!r} has no node {name!r}; it has {[n.node.name for n in self.nodes]}")


def check_lab_name(name: str) -> str:
    """Lab names are short (they prefix netns names) and contain no '-' (it separates the prefix)."""
    if not LAB_NAME.match(name):
        raise LabError(f"invalid lab name {name!r}: 1-12 characters, lower-case letters and digits, "
                       "starting with a letter")
    return name


def _short_hash(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def netns_prefix(lab: str) -> str:
    """The prefix every namespace of lab `lab` starts with."""
    return f"{lab}-"


def pod_cgroup(node_cgroup: str, pod: LabPod) -> str:
    """The pod's cgroup (relative to the cgroup2 mount) under its node's, named as the kubelet with the systemd
    cgroup driver names it: the agents find it by the pod's UID and QoS class, as on a real node."""
    return str(kubelet.pod_cgroup(PurePosixPath(node_cgroup), kubelet.CgroupDriver.SYSTEMD, pod.uid, pod.qos_class))


def plan_lab(name: str, topology: LabTopology) -> LabPlan:
    """Name and address every kernel object of the lab described by `topology`."""
    check_lab_name(name)
    cgroup_root = f"{name}-lab"
    nodes = []
    for node in topology.nodes:
        # The service range goes on-link to the fabric, as a cluster node's default route would carry it:
        # a packet to a cluster IP that no DNAT rewrote must still reach the FORWARD hook (where
        # kube-proxy's REJECT for Services without endpoints lives), yet it never leaves the lab.
        routes = (
            *(Route(dst=other.pod_cidr, dev=UPLINK, gateway=other.address)
              for other in topology.nodes if other.name != node.name),
            Route(dst=topology.service_cidr, dev=UPLINK),
            *(Route(dst=other.pod_cidr6, dev=UPLINK, gateway=other.address6)
              for other in topology.nodes if other.name != node.name and other.pod_cidr6 is not None),
            *((Route(dst=topology.service_cidr6, dev=UPLINK),) if topology.service_cidr6 is not None else ()),
        )
        nodes.append(NodePlan(
            node=node,
            netns=f"{name}-node-{node.name}",
            cgroup=f"{cgroup_root}/{node.name}",
            fabric_port=f"n{_short_hash(node.name, 12)}",
            prefixlen=topology.node_cidr.prefixlen,
            routes=routes,
            prefixlen6=topology.node_cidr6.prefixlen if topology.node_cidr6 is not None else None,
        ))
    pods = []
    for pod in topology.pods:
        node = topology.node(pod.node)
        pods.append(PodPlan(
            pod=pod,
            netns=f"{name}-pod-{pod.namespace}.{pod.name}",
            node_netns=f"{name}-node-{node.name}",
            cgroup=pod_cgroup(f"{cgroup_root}/{node.name}", pod),
            host_ifname=f"lxc{_short_hash(pod.key, 11)}",
            routes=(
                Route(dst=IPv4Network(f"{node.gateway}/32"), dev=UPLINK),
                Route(dst=IPv4Network("0.0.0.0/0"), dev=UPLINK, gateway=node.gateway),
                *((Route(dst=IPv6Network(f"{node.gateway6}/128"), dev=UPLINK),
                   Route(dst=IPv6Network("::/0"), dev=UPLINK, gateway=node.gateway6))
                  if node.gateway6 is not None else ()),
            ),
        ))
    return LabPlan(name=name, fabric_netns=f"{name}-fabric", cgroup_root=cgroup_root,
                   nodes=tuple(nodes), pods=tuple(pods))
