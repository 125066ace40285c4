"""Finding a pod's cgroup where the kubelet makes it, for the eBPF capture on a real node (cgroup v2); the names
are `nodeagent.cluster.kubelet`'s.

The pod's cgroup exists before its sandbox is created (the kubelet makes it first), so it can be found at
CNI time, before any process of the pod is in it; programs attached to it apply to every container cgroup
below it. The lab makes its pods' cgroups in the systemd driver's layout under each node's cgroup, so the
same code runs there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.cluster.kubelet import POD_CGROUP_PATTERNS, PodCgroupKey, candidates
from nodeagent.kernel.netns import ipv4_address, ipv6_address
from nodeagent.mesh.ebpf.programs import PodTarget
from nodeagent.mesh.iptables.apply import netns_present


@dataclass
class KubeletCgroups:
    """Locates a pod for the eBPF capture by its UID in the kubelet's cgroup layout (either driver).

    `pod_key(netns, pod)` gives the UID and QoS class of the pod named `pod` (`namespace/name`), or when that
    is empty of the pod in `netns`: the agent's reconciler answers it from its snapshots and from the CNI
    plugin's announcements (which carry the UID before the agent's watch has the pod)."""

    root: Path
    pod_key: Callable[[str, str], tuple[str, str] | None] = field(default=lambda _netns, _pod: None)
    interface: str = "eth0"

    def cgroup_of(self, netns: str, pod: str) -> Path | None:
        """The pod's cgroup, if the kubelet made it where expected."""
        found = self.pod_key(netns, pod)
        return self.cgroup_of_uid(*found) if found is not None and found[0] else None

    def cgroup_of_uid(self, uid: str, qos_class: str = "") -> Path | None:
        """The cgroup of the pod with `uid`, if the kubelet made it where expected."""
        return next((path for path in candidates(self.root, PodCgroupKey(uid, qos_class)) if path.is_dir()), None)

    def __call__(self, netns: str, pod: str) -> PodTarget | None:
        """The pod at `netns` (None: not known, or its namespace, address or cgroup is gone)."""
        if not netns_present(netns):
            return None
        cgroup = self.cgroup_of(netns, pod)
        address = ipv4_address(netns, self.interface) if cgroup is not None else None
        if cgroup is None or address is None:
            return None
        return PodTarget(pod or Path(netns).name, netns, cgroup, address, self.interface,
                         ipv6_address(netns, self.interface))


def pod_cgroups(root: Path) -> list[Path]:
    """Every pod cgroup the kubelet has under `root`, in either driver's layout (what `cleanup` detaches the
    capture from on a real node)."""
    return sorted(path for pattern in POD_CGROUP_PATTERNS for path in root.glob(pattern) if path.is_dir())


def detach_from_pods(root: Path) -> list[str]:
    """Detach the mesh capture from every kubelet pod cgroup under `root`; what was detached."""
    from nodeagent.mesh.ebpf.hooks import detach_cgroup
    from nodeagent.mesh.ebpf.state import POD_PROGRAMS

    names = tuple(p.name for p in POD_PROGRAMS)
    return [line for cgroup in pod_cgroups(root) for line in detach_cgroup(cgroup, names)]
