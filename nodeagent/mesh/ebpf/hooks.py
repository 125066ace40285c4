"""What of the eBPF mesh capture is attached where, by the capture's program names: its cgroup programs
(`kernel.bpf.cgroup`) and its inbound filter on a pod's interface (`kernel.bpf.tc`, inside the pod's
namespace). The kernel calls live in `nodeagent.kernel`; this module only knows which programs are ours.

A program of ours with another id (an older load) is replaced after the pinned one is in place. The root
cgroup is refused outright: the capture belongs on pod and tunnel cgroups.
"""

from __future__ import annotations

from pathlib import Path

from nodeagent.kernel.bpf import cgroup as kcgroup
from nodeagent.kernel.bpf import tc as ktc
from nodeagent.mesh.ebpf.state import BY_NAME, Attached

TC_PRIORITY = 1  # on the pod's own interface, where nothing else of ours is
TC_PROGRAM = "nm_tc_inbound"


def on_cgroup(cgroup: Path) -> list[tuple[Attached, str]]:
    """Our programs attached directly to `cgroup`, with bpftool's name of their attach type."""
    return [(Attached(p.name, p.prog_id, f"cgroup {cgroup}"), p.kind) for p in kcgroup.programs_on(cgroup, BY_NAME)]


def attach_cgroup(directory: Path, ids: dict[str, int], cgroup: Path, names: tuple[str, ...]) -> list[str]:
    """Attach each pinned program of `names` (multi) unless it is there; then detach older loads of it."""
    kcgroup.refuse_root(cgroup, "the mesh capture")
    present = on_cgroup(cgroup)
    changed = []
    for name in names:
        kind, wanted = BY_NAME[name].kind, ids[name]
        if not any(a.name == name and a.prog_id == wanted for a, _ in present):
            kcgroup.attach_pinned(cgroup, kind, directory / name)
            changed.append(f"{kind} {name} -> {cgroup}")
        for stale, shown_kind in present:
            if stale.name == name and stale.prog_id != wanted:
                kcgroup.detach_id(cgroup, shown_kind, stale.prog_id)
                changed.append(f"{shown_kind} {name} id {stale.prog_id} <- {cgroup}")
    return changed


def detach_cgroup(cgroup: Path, names: tuple[str, ...]) -> list[str]:
    """Detach every load of the programs `names` from `cgroup`; returns what was detached."""
    return [f"{kind} {item.name} <- {cgroup}" for item, kind in on_cgroup(cgroup)
            if item.name in names and kcgroup.detach_id(cgroup, kind, item.prog_id)]


def tc_ours(netns: str, interface: str) -> list[Attached]:
    """Our filters on the interface's ingress, by program name."""
    return [Attached(TC_PROGRAM, f.prog_id, f"tc {interface} ingress pref {f.priority}")
            for f in ktc.pinned_filters(netns, interface, TC_PROGRAM)]


def attach_tc(directory: Path, prog_id: int, netns: str, interface: str) -> list[str]:
    """The pinned tc program on the interface's ingress (clsact, direct action), unless it is there."""
    if any(a.prog_id == prog_id for a in tc_ours(netns, interface)):
        return []
    ktc.attach_pinned(netns, interface, directory / TC_PROGRAM, priority=TC_PRIORITY)
    return [f"tc-ingress {TC_PROGRAM} -> {interface}"]


def detach_tc(netns: str, interface: str) -> list[str]:
    """Remove our filter (and clsact, when nothing else is left on it)."""
    return [f"tc-ingress {TC_PROGRAM} <- {interface}"] if ktc.detach_pinned(netns, interface, TC_PROGRAM) else []
