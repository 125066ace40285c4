"""The lab's cgroup v2 directories: create, fill with processes, empty, remove.

Only directories under `<cgroup2 mount>/<lab>-lab` are ever touched; the root cgroup is never
written to, and nothing is attached to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

from nodeagent.lab.errors import LabEnvironmentError

PROC_MOUNTS = Path("/proc/mounts")


def cgroup2_mount() -> Path:
    """Where the unified (v2) hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts."""
    for line in PROC_MOUNTS.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise LabEnvironmentError("no cgroup v2 hierarchy is mounted; mount one with "
                              "`mount -t cgroup2 none /sys/fs/cgroup/unified` (hybrid) or boot with "
                              "systemd.unified_cgroup_hierarchy=1")


def path_of(relative: str) -> Path:
    """Absolute path of a lab cgroup given relative to the cgroup2 mount."""
    if not relative or relative.startswith("/") or ".." in relative.split("/"):
        raise ValueError(f"lab cgroup paths are relative and stay under the mount: {relative!r}")
    return cgroup2_mount() / relative


def create(relative: str) -> Path:
    """Create the cgroup (and its parents); existing is fine."""
    path = path_of(relative)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pids(relative: str) -> list[int]:
    """Processes directly in the cgroup, or [] if it does not exist."""
    try:
        return [int(p) for p in (path_of(relative) / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def all_pids(relative: str) -> list[int]:
    """Processes in the cgroup and every cgroup below it."""
    root = path_of(relative)
    found: list[int] = []
    if root.is_dir():
        for directory, _, _ in os.walk(root):
            found.extend(pids(os.path.relpath(directory, cgroup2_mount())))
    return found


def kill_tree(relative: str, grace_seconds: float = 2.0) -> None:
    """Stop every process in the cgroup tree: SIGTERM, then SIGKILL what is left after the grace period."""
    for pid in all_pids(relative):
        _signal(pid, signal.SIGTERM)
    if _wait_empty(relative, grace_seconds):
        return
    kill_file = path_of(relative) / "cgroup.kill"
    if kill_file.exists():
        kill_file.write_text("1")
    else:
        for pid in all_pids(relative):
            _signal(pid, signal.SIGKILL)
    if not _wait_empty(relative, 5.0):
        raise LabEnvironmentError(f"processes {all_pids(relative)} in cgroup {relative} did not exit")


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    # Processes this one started (lab up in-process, tests) stay zombies until waited for.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _wait_empty(relative: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while left := all_pids(relative):
        for pid in left:
            _reap(pid)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def remove_tree(relative: str, timeout: float = 10.0) -> None:
    """Remove the cgroup and its children, deepest first, once their processes are gone.

    An exited process whose parent has not reaped it yet no longer shows in cgroup.procs but still
    keeps its cgroup busy (EBUSY); orphans are reaped by init, a little later. So rmdir is retried.
    """
    root = path_of(relative)
    if not root.exists():
        return
    deadline = time.monotonic() + timeout
    for directory, _, _ in sorted(os.walk(root), key=lambda entry: -entry[0].count("/")):
        while True:
            try:
                os.rmdir(directory)
                break
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    break
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise LabEnvironmentError(f"cannot remove cgroup {directory}: {exc.strerror}") from exc
                time.sleep(0.05)
