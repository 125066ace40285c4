"""Where the eBPF mesh capture meets the kernel: attaching its programs to cgroups (bpftool) and to a pod's
interface (tc, inside the pod's namespace), reading back what of ours is attached, and the identities the
programs key on (the namespace's cookie, a process's cgroup, the pod's address).

Cgroup attachments are made with BPF_F_ALLOW_MULTI and found again by program name, so others' programs on
the same cgroup are never touched; a program of ours with another id (an older load) is replaced after the
pinned one is in place. The root cgroup is refused outright: the capture belongs on pod and tunnel cgroups.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from nodeagent.kernel.bpf.loader import BpfError, attached, cgroup2_root
from nodeagent.kernel.netns import in_netns
from nodeagent.mesh.ebpf.state import BY_NAME, Attached

SO_NETNS_COOKIE = 71
TC_PRIORITY = "1"  # on the pod's own interface, where nothing else of ours is
TC_PROGRAM = "nm_tc_inbound"


def bpftool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run bpftool (never raises on its exit status)."""
    return subprocess.run(["bpftool", *args], capture_output=True, text=True, timeout=30, check=False)


def netns_cookie(netns: str) -> int:
    """The kernel's cookie of the network namespace at `netns` (what the programs key pods by)."""
    def make() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), sys.byteorder)

    return in_netns(netns, make)


def cookie_key(cookie: int) -> bytes:
    """A netns cookie as a u64 map key, in the kernel's byte order."""
    return cookie.to_bytes(8, sys.byteorder)


def cgroup_of_pid(pid: int) -> Path:
    """The cgroup v2 directory of process `pid` (e.g. the tunnel's, for the original-destination hook)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return cgroup2_root() / line[3:].lstrip("/")
    raise BpfError(f"process {pid} is in no cgroup v2")


def pod_ip_in(netns: str, interface: str = "eth0") -> str | None:
    """The first IPv4 address on `interface` inside the namespace at `netns` (None: none, or gone)."""
    shown = subprocess.run(["nsenter", f"--net={netns}", "ip", "-j", "-4", "addr", "show", "dev", interface],
                           capture_output=True, text=True, timeout=30, check=False)
    if shown.returncode != 0:
        return None
    return next((str(a["local"]) for link in json.loads(shown.stdout or "[]") for a in link.get("addr_info", [])),
                None)


def refuse_root(cgroup: Path) -> None:
    """Raise BpfError for the root cgroup (however spelled)."""
    if cgroup.resolve() == cgroup2_root().resolve():
        raise BpfError(f"refusing to attach the mesh capture to the root cgroup {cgroup}")


def on_cgroup(cgroup: Path) -> list[tuple[Attached, str]]:
    """Our programs attached directly to `cgroup`, with bpftool's name of their attach type."""
    if not cgroup.is_dir():
        return []
    return [(Attached(str(r["name"]), int(str(r["id"])), f"cgroup {cgroup}"), str(r["attach_type"]))
            for r in attached(cgroup) if str(r.get("name", "")) in BY_NAME]


def attach_cgroup(directory: Path, ids: dict[str, int], cgroup: Path, names: tuple[str, ...]) -> list[str]:
    """Attach each pinned program of `names` (multi) unless it is there; then detach older loads of it."""
    refuse_root(cgroup)
    present = on_cgroup(cgroup)
    changed = []
    for name in names:
        kind, wanted = BY_NAME[name].kind, ids[name]
        if not any(a.name == name and a.prog_id == wanted for a, _ in present):
            result = bpftool("cgroup", "attach", str(cgroup), kind, "pinned", str(directory / name), "multi")
            if result.returncode != 0:
                raise BpfError(f"attaching {name} to {cgroup} failed: {result.stderr.strip()}")
            changed.append(f"{kind} {name} -> {cgroup}")
        for stale, shown_kind in present:
            if stale.name == name and stale.prog_id != wanted:
                bpftool("cgroup", "detach", str(cgroup), shown_kind, "id", str(stale.prog_id))
                changed.append(f"{shown_kind} {name} id {stale.prog_id} <- {cgroup}")
    return changed


def detach_cgroup(cgroup: Path, names: tuple[str, ...]) -> list[str]:
    """Detach every load of the programs `names` from `cgroup`; returns what was detached."""
    removed = []
    for item, kind in on_cgroup(cgroup):
        if item.name in names:
            result = bpftool("cgroup", "detach", str(cgroup), kind, "id", str(item.prog_id))
            if result.returncode == 0:
                removed.append(f"{kind} {item.name} <- {cgroup}")
    return removed


def _tc(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`tc` inside the namespace (nsenter: runtimes hand us namespace paths, not names)."""
    result = subprocess.run(["nsenter", f"--net={netns}", "tc", *args], capture_output=True, text=True, timeout=30,
                            check=False)
    if check and result.returncode != 0:
        raise BpfError(f"tc {' '.join(args)} in {netns}: {result.stderr.strip() or result.returncode}")
    return result


def _filters(netns: str, interface: str) -> list[dict[str, object]]:
    shown: list[dict[str, object]] = json.loads(
        _tc(netns, "-j", "filter", "show", "dev", interface, "ingress").stdout or "[]")
    return shown


def tc_ours(netns: str, interface: str) -> list[Attached]:
    """Our filters on the interface's ingress, by program name (tc names a pinned filter `[*fsobj]`)."""
    found = []
    for item in _filters(netns, interface):
        options = item.get("options")
        prog = options.get("prog") if isinstance(options, dict) else None
        if isinstance(prog, dict) and prog.get("name") == TC_PROGRAM:
            found.append(Attached(TC_PROGRAM, int(prog["id"]), f"tc {interface} ingress pref {item.get('pref')}"))
    return found


def attach_tc(directory: Path, prog_id: int, netns: str, interface: str) -> list[str]:
    """The pinned tc program on the interface's ingress (clsact, direct action), unless it is there."""
    if any(a.prog_id == prog_id for a in tc_ours(netns, interface)):
        return []
    _tc(netns, "qdisc", "replace", "dev", interface, "clsact")
    _tc(netns, "filter", "replace", "dev", interface, "ingress", "prio", TC_PRIORITY, "handle", "1", "bpf",
        "object-pinned", str(directory / TC_PROGRAM), "direct-action")
    return [f"tc-ingress {TC_PROGRAM} -> {interface}"]


def detach_tc(netns: str, interface: str) -> list[str]:
    """Remove our filter (and clsact, when nothing else is left on it)."""
    if not tc_ours(netns, interface):
        return []
    _tc(netns, "filter", "del", "dev", interface, "ingress", "prio", TC_PRIORITY, "handle", "1", "bpf")
    if not _filters(netns, interface):
        _tc(netns, "qdisc", "del", "dev", interface, "clsact", check=False)
    return [f"tc-ingress {TC_PROGRAM} <- {interface}"]
