"""Running `nodeagent run` on every node of a lab, as the DaemonSet runs it on every node of a cluster.

Each agent runs in its node's network namespace and cgroup under the lab's supervising shim, reads
the lab's resolved manifests, and is recorded with the pods' processes, so `lab down` stops it.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.errors import LabBuildError, LabError
from nodeagent.lab.state import Process, locked

AGENT_OWNER = "agent/"


def cluster_cidr(lab: labs.Lab) -> str:
    """The smallest IPv4 network holding every node's pod CIDR (the lab's --cluster-cidr)."""
    cidrs = [node.node.pod_cidr for node in lab.plan.nodes]
    net = cidrs[0]
    while not all(c.subnet_of(net) for c in cidrs):
        net = net.supernet()
    return str(net)


def agent_argv(lab: labs.Lab, node: str, mode: str, extra: Sequence[str] = ()) -> list[str]:
    """The command line of the agent on `node`."""
    address = lab.plan.node(node).node.address
    return ["nodeagent", "--log-json", "--log-level", "info", "run", "--mode", mode,
            "--bpf-scope", f"{lab.record.name}-{node}",
            "--manifests", str(lab.record.manifests_path.parent), "--node", node,
            "--cluster-cidr", cluster_cidr(lab), "--healthz-bind-address", f"{address}:10256",
            "--metrics-bind-address", f"{address}:10249", *extra]


def start_agents(name: str, mode: str = "iptables", *, extra: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 timeout: float = 60.0) -> labs.Lab:
    """Start one agent per node of lab `name` and wait until each has programmed its node once."""
    lab = labs.load(name)
    with locked(name):
        if any(p.owner.startswith(AGENT_OWNER) for p in lab.record.processes):
            raise LabError(f"lab {name!r} already runs agents; `nodeagent lab down` and up again to restart them")
        started = []
        for node in lab.plan.nodes:
            logfile = lab.record.directory / "logs" / f"agent.{node.node.name}.log"
            pid = processes.spawn(node.netns, cgroups.path_of(node.cgroup),
                                  agent_argv(lab, node.node.name, mode, extra),
                                  {"NODE_NAME": node.node.name, "NODEAGENT_LAB": name, **(env or {})}, logfile)
            lab.record.processes.append(Process(owner=AGENT_OWNER + node.node.name, container="nodeagent", pid=pid,
                                                log=str(logfile)))
            lab.record.save()
            started.append((node, pid, logfile))
    for node, pid, logfile in started:
        _wait_first_sync(node.netns, node.node.address, pid, logfile, timeout)
    return lab


def _wait_first_sync(netns: str, address: ipaddress.IPv4Address, pid: int, logfile: Path, timeout: float) -> None:
    """Poll the agent's /healthz (from inside the node) until it reports a completed sync."""
    deadline = time.monotonic() + timeout
    probe = ["ip", "netns", "exec", netns, "python3", "-c",
             "import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],timeout=2).read().decode())",
             f"http://{address}:10256/healthz"]
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise LabBuildError(f"the agent in {netns} exited; its log: {logfile}")
        result = subprocess.run(probe, capture_output=True, text=True, timeout=10, check=False)
        if result.returncode == 0 and json.loads(result.stdout).get("lastUpdated"):
            return
        time.sleep(0.1)  # polling a condition with a deadline
    raise LabBuildError(f"the agent in {netns} did not complete a sync within {timeout:.0f} s; its log: {logfile}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
