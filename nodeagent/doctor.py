"""`nodeagent doctor`: is every prerequisite there, and if not, what fixes it.

Each probe does the real thing in a throw-away place (a namespace made with `unshare --net` that
vanishes with its process, a cgroup of our own that is removed again) rather than reading kernel
config files, because a feature compiled in can still be refused (lockdown, seccomp, missing module).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodeagent.kernel.bpf import syscall
from nodeagent.lab import cgroups
from nodeagent.lab.errors import LabEnvironmentError

SETUP_HINT = "run scripts/setup.sh"


@dataclass(frozen=True)
class Check:
    """The outcome of one probe."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def _run(argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _first_line(result: subprocess.CompletedProcess[str]) -> str:
    text = (result.stderr or result.stdout).strip()
    return text.splitlines()[-1] if text else f"exit {result.returncode}"


def check_root() -> Check:
    """Root (or CAP_NET_ADMIN + CAP_SYS_ADMIN + CAP_BPF) is needed for every datapath operation."""
    ok = os.geteuid() == 0
    return Check("root", ok, "running as root" if ok else f"running as uid {os.geteuid()}",
                 "run as root (sudo), or in the DaemonSet which is privileged")


def check_tools() -> Check:
    """The command-line tools the agent and the lab run."""
    wanted = ["ip", "tc", "unshare", "iptables-legacy", "iptables-nft", "iptables-restore", "conntrack", "bpftool"]
    missing = [t for t in wanted if shutil.which(t) is None]
    return Check("tools", not missing, "all present" if not missing else f"missing: {' '.join(missing)}",
                 f"{SETUP_HINT} (installs iproute2 iptables conntrack bpftool)")


def check_netns() -> Check:
    """A new network namespace can be made (the lab and the tests need them)."""
    result = _run(["unshare", "--net", "true"])
    return Check("netns", result.returncode == 0, "unshare --net works" if result.returncode == 0
                 else _first_line(result), "kernel needs CONFIG_NET_NS; containers need CAP_SYS_ADMIN")


def check_cgroup2() -> Check:
    """A cgroup v2 hierarchy is mounted and writable (a child is created and removed)."""
    try:
        mount = cgroups.cgroup2_mount()
    except LabEnvironmentError as exc:
        return Check("cgroup v2", False, str(exc), "mount -t cgroup2 none /sys/fs/cgroup (or .../unified)")
    probe = mount / f"nodeagent-doctor-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return Check("cgroup v2", False, f"{mount} is not writable: {exc.strerror}", "run as root")
    return Check("cgroup v2", True, f"mounted at {mount}")


def check_bpf_cgroup_attach() -> list[Check]:
    """bpf(2) works and a cgroup sock_addr (connect4) program can be loaded, attached and detached."""
    try:
        fd = syscall.load_connect4_probe()
    except OSError as exc:
        return [Check("bpf syscall", False, f"BPF_PROG_LOAD failed: {exc.strerror}",
                      "kernel needs CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF; run as root; "
                      "check kernel.unprivileged_bpf_disabled / lockdown")]
    checks = [Check("bpf syscall", True, "loaded a cgroup/connect4 program")]
    try:
        mount = cgroups.cgroup2_mount()
        probe = mount / f"nodeagent-doctor-{os.getpid()}"
        probe.mkdir(exist_ok=True)
        try:
            syscall.attach_detach_connect4(fd, str(probe))
            checks.append(Check("cgroup sock_addr attach", True,
                                f"attached to and detached from a cgroup under {mount}"))
        finally:
            probe.rmdir()
    except (OSError, LabEnvironmentError) as exc:
        checks.append(Check("cgroup sock_addr attach", False, f"attach failed: {exc}",
                            "kernel needs CONFIG_CGROUP_BPF and a cgroup v2 mount"))
    finally:
        os.close(fd)
    return checks


def check_tc_clsact() -> Check:
    """A clsact qdisc (for tc BPF programs) can be added to a link (in a throw-away namespace)."""
    script = "ip link add na0 type veth peer name na1 && tc qdisc add dev na0 clsact"
    result = _run(["unshare", "--net", "sh", "-c", script])
    return Check("tc clsact", result.returncode == 0, "clsact qdisc added" if result.returncode == 0
                 else _first_line(result), "kernel needs CONFIG_NET_SCH_INGRESS (clsact) and CONFIG_VETH")


def check_btf() -> Check:
    """Kernel BTF, which CO-RE programs and bpftool's struct dumps use."""
    path = Path("/sys/kernel/btf/vmlinux")
    return Check("BTF", path.exists(), f"{path} present" if path.exists() else f"{path} missing",
                 "kernel needs CONFIG_DEBUG_INFO_BTF")


def check_bpffs() -> Check:
    """bpffs at /sys/fs/bpf, where the eBPF datapath pins programs and maps to outlive the agent."""
    mounted = any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in Path("/proc/mounts").read_text().splitlines())
    return Check("bpffs", mounted, "mounted at /sys/fs/bpf" if mounted else "/sys/fs/bpf is not a bpf mount",
                 "mount -t bpf bpf /sys/fs/bpf (the DaemonSet mounts the host's)")


def check_iptables(variant: str) -> Check:
    """The iptables variant can read the nat table (in a throw-away namespace)."""
    binary = f"iptables-{variant}"
    if shutil.which(binary) is None:
        return Check(binary, False, "not installed", f"{SETUP_HINT} (apt-get install iptables)")
    result = _run(["unshare", "--net", binary, "-w", "5", "-t", "nat", "-S"])
    return Check(binary, result.returncode == 0, "nat table readable" if result.returncode == 0
                 else _first_line(result), "kernel needs the ip_tables/nf_tables and iptable_nat/nft_nat modules")


def check_bcc() -> Check:
    """bcc imports and compiles+loads a cgroup program (needs kernel headers, see scripts/setup.sh)."""
    result = _run([sys.executable, "-m", "nodeagent.kernel.bpf.compile_check"], timeout=120)
    build = Path(f"/lib/modules/{os.uname().release}/build")
    fix = (f"{SETUP_HINT}: it installs python3-bpfcc and linux-headers-cloud-amd64 and links {build} and "
           f"{build.parent / 'source'} to them (bcc needs both)")
    return Check("bcc compile", result.returncode == 0, _first_line(result), fix)


def run_all() -> list[Check]:
    """Every probe, in the order a reader fixes things."""
    probes: list[Callable[[], Check | list[Check]]] = [
        check_root, check_tools, check_netns, check_cgroup2, check_bpf_cgroup_attach, check_tc_clsact,
        check_btf, check_bpffs, lambda: check_iptables("legacy"), lambda: check_iptables("nft"), check_bcc,
    ]
    checks: list[Check] = []
    for probe in probes:
        try:
            found = probe()
        except Exception as exc:  # a probe that crashes is a failed check, not a crashed doctor
            found = Check(getattr(probe, "__name__", "probe"), False, f"probe crashed: {exc}", "report a bug")
        checks.extend(found if isinstance(found, list) else [found])
    return checks


def format_checks(checks: list[Check]) -> str:
    """One line per check: ok/missing, name, detail, and the fix for what is missing."""
    lines = []
    for c in checks:
        lines.append(f"{'ok     ' if c.ok else 'missing'}  {c.name:<24} {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"{'':9}{'':24} fix: {c.fix}")
    return "\n".join(lines)
