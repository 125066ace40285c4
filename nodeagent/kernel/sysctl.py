"""Kernel parameters under /proc/sys, read and set in the calling thread's network namespace.

The `net.*` parameters belong to a network namespace: /proc/sys/net resolves against the namespace of the
task that opens it, so an agent running in a node's namespace reads and sets that node's values only.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from nodeagent.errors import NodeAgentError

log = structlog.get_logger("nodeagent.kernel.sysctl")
ROOT = Path("/proc/sys")
ROUTE_LOCALNET = "net.ipv4.conf.all.route_localnet"
TCP_BE_LIBERAL = "net.netfilter.nf_conntrack_tcp_be_liberal"


class SysctlError(NodeAgentError):
    """A kernel parameter cannot be read or set."""


def path_of(name: str, root: Path = ROOT) -> Path:
    """The file of a parameter written with dots (net.ipv4.conf.all.route_localnet)."""
    return root.joinpath(*name.split("."))


def read(name: str, root: Path = ROOT) -> int:
    """The parameter's integer value; SysctlError when it does not exist or is not an integer."""
    try:
        return int(path_of(name, root).read_text().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise SysctlError(f"cannot read {name}: {exc}") from exc


def ensure(name: str, value: int, root: Path = ROOT) -> bool:
    """Set the parameter to `value` unless it already has it (kube-proxy's EnsureSysctl); True if changed."""
    current = read(name, root)
    if current == value:
        return False
    try:
        path_of(name, root).write_text(f"{value}\n")
    except OSError as exc:
        raise SysctlError(f"cannot set {name}={value}: {exc}") from exc
    log.info("changed sysctl", name=name, old=current, new=value)
    return True


def enabled(name: str, root: Path = ROOT) -> bool:
    """Whether the parameter is non-zero; False when it cannot be read (kube-proxy reads tcp_be_liberal so:
    without conntrack loaded, the parameter is absent and the INVALID rule stays)."""
    try:
        return read(name, root) != 0
    except SysctlError:
        return False
