"""Starting pod processes in their namespace and cgroup, and waiting until they serve their ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import psutil

from nodeagent.lab.errors import LabBuildError
from nodeagent.lab.topology import ContainerPort

# /proc/<pid>/net/* show the sockets of the process's network namespace; state 0A is LISTEN (TCP), and
# an unconnected UDP socket shows state 07 (CLOSE).
_PROC_TABLES = {"TCP": (("tcp", "tcp6"), "0A"), "UDP": (("udp", "udp6"), "07"), "SCTP": ((), "")}


def enter_argv(netns: str, cgroup: Path, command: Sequence[str], *, supervise: bool = False) -> list[str]:
    """The argv that runs `command` inside `netns` and `cgroup` through the enter shim."""
    return [sys.executable, "-m", "nodeagent.lab.enter", *(["--supervise"] if supervise else []),
            "--netns", netns, "--cgroup", str(cgroup), "--", *command]


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of lab processes: ours, with this interpreter's bin dir first (`nodeagent` resolves)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "/usr/bin:/bin")])
    env.update(extra)
    return env


def spawn(netns: str, cgroup: Path, command: Sequence[str], env: Mapping[str, str], log: Path) -> int:
    """Start `command` as a daemon in `netns` and `cgroup`, under a supervising shim that stays outside
    them; output goes to `log`. Returns the shim's pid (it lives exactly as long as the command)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(enter_argv(netns, cgroup, command, supervise=True), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=child_env(env), start_new_session=True)
    return proc.pid


def bound_ports(pids: Iterable[int], protocol: str) -> set[int]:
    """Ports bound (listening, for TCP) in the network namespace of the first live process of `pids`."""
    tables, state = _PROC_TABLES[protocol]
    ports: set[int] = set()
    pid = next(iter(pids), None)
    if pid is None:
        return ports
    for table in tables:
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == state:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_serving(what: str, pid: int, cgroup: Path, ports: Iterable[ContainerPort], log: Path,
                 timeout: float = 20.0) -> None:
    """Poll until the pod (the processes of `cgroup`) has bound every declared TCP/UDP port; fail early
    if the supervised command (shim `pid`) exits."""
    wanted = [p for p in ports if p.protocol in ("TCP", "UDP")]
    deadline = time.monotonic() + timeout
    while True:
        members = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
        missing = [p for p in wanted if p.port not in bound_ports(members, p.protocol)]
        if not missing:
            return
        if _exited(pid):
            raise LabBuildError(f"{what}: the process exited before serving its ports; its log "
                                f"({log}) ends with:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise LabBuildError(f"{what}: ports {[f'{p.port}/{p.protocol}' for p in missing]} not bound after "
                                f"{timeout:.0f}s; log {log}:\n{_tail(log)}")
        time.sleep(0.02)


def _exited(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not Path(f"/proc/{pid}").exists()
    return waited == pid


def _tail(log: Path, lines: int = 10) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def wait_gone(pids: Iterable[int], timeout: float = 5.0) -> list[int]:
    """Poll until every process of `pids` has exited (a zombie counts as exited); return those that did not."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left:
        left = [pid for pid in left if _running(pid)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return left


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
