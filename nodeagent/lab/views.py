"""A lab seen from outside: what the read-only commands (`snapshot`, `chains`, `inspect`, `trace` with
`--lab`) and `lab agents` need to know of a lab node, named here so the command line knows no lab layout
(the `<lab>-pod-` namespace prefix, the `<lab>-<node>` eBPF scope, the node's cgroup, its control socket)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodeagent.lab import cgroups
from nodeagent.lab import lab as labs
from nodeagent.lab.agents import cluster_cidr, control_socket

DEFAULT_NODE = "node1"  # the node whose view is shown when none is named
HEALTHZ_PORT, READINESS_PORT = 10256, 15021  # the agents' /healthz and the tunnels' /healthz/ready in a lab


def pod_netns_prefix(lab_name: str) -> str:
    """The prefix of the lab's pod network namespaces."""
    return f"{lab_name}-pod-"


def bpf_scope(lab_name: str, node: str) -> str:
    """The eBPF scope (pins under /sys/fs/bpf/nodeagent/) of the agent on a lab node."""
    return f"{lab_name}-{node}"


def manifests_dir(lab_name: str) -> Path:
    """The directory of the lab's manifests as its agents see them. Raises LabError for an unknown lab."""
    return labs.load(lab_name).record.manifests_path.parent


@dataclass(frozen=True)
class LabNodeView:
    """Where one lab node keeps its parts, as its agent was started with them."""

    node: str
    netns: str  # the node's network namespace (a name under /run/netns)
    address: str
    cluster_cidr: str
    control_socket: Path
    pod_netns_prefix: str
    bpf_scope: str
    kubelet_cgroup_root: Path  # the node's cgroup: its pods' are below, in the kubelet's layout


def node_view(lab_name: str, node: str) -> LabNodeView:
    """The parts of `node` of lab `lab_name`. Raises LabError for an unknown lab or node."""
    lab = labs.load(lab_name)
    plan = lab.plan.node(node)
    return LabNodeView(node=node, netns=plan.netns, address=str(plan.node.address), cluster_cidr=cluster_cidr(lab),
                       control_socket=control_socket(lab, node), pod_netns_prefix=pod_netns_prefix(lab_name),
                       bpf_scope=bpf_scope(lab_name, node), kubelet_cgroup_root=cgroups.path_of(plan.cgroup))


def node_locator(lab_name: str) -> Callable[[str], tuple[str, str]]:
    """node name -> (its network namespace, its address), for following a probe across the lab's nodes."""
    plan = labs.load(lab_name).plan

    def locate(name: str) -> tuple[str, str]:
        return plan.node(name).netns, str(plan.node(name).node.address)

    return locate


def agents_summary(lab: labs.Lab, mesh: bool) -> list[str]:
    """What `lab agents` started on each node: where its endpoints answer and where it logs."""
    logs = lab.record.directory / "logs"
    lines = []
    for node in lab.plan.nodes:
        name, address = node.node.name, node.node.address
        lines.append(f"agent on {name}: synced, healthz http://{address}:{HEALTHZ_PORT}/healthz "
                     f"(in {node.netns}), log {logs / f'agent.{name}.log'}")
        if mesh:
            lines.append(f"tunnel on {name}: ready, http://{address}:{READINESS_PORT}/healthz/ready, "
                         f"log {logs / f'ztunnel.{name}.log'}")
    return lines
