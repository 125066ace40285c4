"""Cgroup attachments of pinned programs (bpftool): attach with BPF_F_ALLOW_MULTI, detach by id, list what
is attached by program name, and the cgroup of a process.

Attachments are found again by program name, so others' programs on the same cgroup are never touched.
The root cgroup is refused (`refuse_root`) where a caller's programs belong on pod or tunnel cgroups only.
"""

from __future__ import annotations

import subprocess
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from nodeagent.kernel.bpf.loader import BpfError, attached, cgroup2_root


def bpftool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run bpftool (never raises on its exit status)."""
    return subprocess.run(["bpftool", *args], capture_output=True, text=True, timeout=30, check=False)


@dataclass(frozen=True, slots=True)
class CgroupProgram:
    """A program attached directly to a cgroup: its name, kernel id and bpftool's name of its attach type."""

    name: str
    prog_id: int
    kind: str


def programs_on(cgroup: Path, names: Collection[str]) -> list[CgroupProgram]:
    """The programs named in `names` attached directly to `cgroup` (none if the cgroup is gone)."""
    if not cgroup.is_dir():
        return []
    return [CgroupProgram(str(r["name"]), int(str(r["id"])), str(r["attach_type"]))
            for r in attached(cgroup) if str(r.get("name", "")) in names]


def cgroup_of_pid(pid: int) -> Path:
    """The cgroup v2 directory of process `pid` (e.g. the tunnel's, for the original-destination hook)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return cgroup2_root() / line[3:].lstrip("/")
    raise BpfError(f"process {pid} is in no cgroup v2")


def refuse_root(cgroup: Path, what: str) -> None:
    """Raise BpfError for the root cgroup (however spelled): `what` belongs on a pod's or a tunnel's."""
    if cgroup.resolve() == cgroup2_root().resolve():
        raise BpfError(f"refusing to attach {what} to the root cgroup {cgroup}")


def attach_pinned(cgroup: Path, kind: str, pin: Path) -> None:
    """Attach the program pinned at `pin` to `cgroup` as `kind` (bpftool's attach argument), multi."""
    result = bpftool("cgroup", "attach", str(cgroup), kind, "pinned", str(pin), "multi")
    if result.returncode != 0:
        raise BpfError(f"attaching {pin.name} to {cgroup} failed: {result.stderr.strip()}")


def detach_id(cgroup: Path, kind: str, prog_id: int) -> bool:
    """Detach program `prog_id` (attached as `kind`) from `cgroup`; returns whether it was detached."""
    return bpftool("cgroup", "detach", str(cgroup), kind, "id", str(prog_id)).returncode == 0
