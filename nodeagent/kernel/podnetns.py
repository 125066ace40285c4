"""Finding a pod's network namespace by its IP, among the namespaces a container runtime binds in a
directory (`/run/netns/cni-…` for containerd and CRI-O; `/run/netns/<lab>-pod-…` in the lab).

istio-cni hands ztunnel the netns of each new pod from its CNI plugin. Without a CNI hook of our own, the
agent's mesh reconciler finds the namespace holding the pod's IP and sends it over the control stream; a
tunnel started without `--control-socket` scans for itself.
Each candidate namespace is entered once per scan by a short-lived thread that reads its addresses;
namespaces are told apart by inode so a bind mount seen twice is read once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import psutil

from nodeagent.kernel.netns import in_netns


def _ipv4_addresses() -> set[str]:
    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family.name == "AF_INET" and not a.address.startswith("127.")}


def candidates(directory: Path, prefix: str = "") -> list[Path]:
    """Namespace bind mounts in `directory` whose names start with `prefix`, one per namespace inode."""
    seen: set[tuple[int, int]] = set()
    out: list[Path] = []
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        if not path.name.startswith(prefix):
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue  # removed while we looked
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(path)
    return out


def locate(ips: Iterable[str], directory: Path, prefix: str = "") -> dict[str, str]:
    """{ip: netns path} for every wanted IP found in a namespace under `directory`."""
    wanted = set(ips)
    found: dict[str, str] = {}
    for path in candidates(directory, prefix):
        if not wanted - found.keys():
            break
        try:
            addresses = in_netns(str(path), _ipv4_addresses)
        except OSError:
            continue  # the namespace went away, or is not a network namespace
        for ip in wanted & addresses:
            found.setdefault(ip, str(path))
    return found
