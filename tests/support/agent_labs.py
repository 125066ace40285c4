"""A lab built from the default manifests plus extra documents, with agents on every node (shared by the
datapath lab tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import yaml

from nodeagent.lab import lab as labs
from nodeagent.lab.agents import start_agents
from nodeagent.lab.manifests import load_default
from tests.integration.conftest import unique_lab_name
from tests.support.netns import netns_run

# A namespace outside the mesh with one idle pod on node1: the lab tests' plaintext peer.
OUTSIDER = """
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: plain, labels: {app: outsider}}
spec:
  nodeName: node1
  containers:
  - {name: sleep, command: [nodeagent, workload, idle]}
"""


@contextmanager
def lab_with_agents(directory: Path, extra_yaml: str, mode: str, agent_args: Sequence[str] = (), *,
                    mesh: bool = False, capture: bool = True, tunnel_workers: int = 1) -> Iterator[labs.Lab]:
    """Bring the lab up with agents in `mode` (and tunnels with `mesh`, each of `tunnel_workers` processes,
    the agents capturing enrolled pods unless not `capture`); always take it down."""
    documents = [dict(d.body) for d in load_default()] + list(yaml.safe_load_all(extra_yaml))
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all(documents))
    name = unique_lab_name()
    labs.up(name, directory)
    try:
        yield start_agents(name, mode, extra=agent_args, mesh=mesh, capture=capture, tunnel_workers=tunnel_workers)
    finally:
        labs.down(name)


def unserved_resolver(lab: labs.Lab, family: int = 4) -> str:
    """An address of the Service range (of `family`) that no Service holds: what a pod's resolver would be with
    the cluster DNS absent (not the range's .10: the default lab's `echo` Service may hold it, with a UDP
    port 53)."""
    cidr = lab.topology.service_cidr if family == 4 else lab.topology.service_cidr6
    assert cidr is not None, "the lab has no IPv6 Service range"
    address = str(cidr.broadcast_address - 1)
    held = {str(ip) for d in lab.topology.documents if d.get("kind") == "Service"
            for ip in (d["spec"].get("clusterIP"), *d["spec"].get("clusterIPs", ()))}
    assert address not in held
    return address


def api_fault(lab: labs.Lab, action: str, body: dict[str, Any] | None = None) -> None:
    """POST /admin/<action> (fault injection: delay, refuse, drop-watches, compact, restart, ...) to the lab's
    API server, from inside the namespace its address lives in, with its admin token."""
    directory = labs.api_server_dir(lab.record)
    script = ("import ssl,sys,urllib.request as u\n"
              "c=ssl.create_default_context(cafile=sys.argv[2])\n"
              "r=u.Request(sys.argv[1],data=sys.argv[4].encode(),method='POST',headers={'Authorization':"
              "'Bearer '+open(sys.argv[3]).read().strip(),'Content-Type':'application/json'})\n"
              "print(u.urlopen(r,context=c,timeout=5).status)")
    url = f"https://{lab.topology.api_server_address}:6443/admin/{action}"
    subprocess.run(["ip", "netns", "exec", labs.api_server_plan(lab.plan, lab.topology).netns, sys.executable, "-c",
                    script, url, str(directory / "ca.crt"), str(directory / "admin-token"), json.dumps(body or {})],
                   check=True, capture_output=True, text=True, timeout=20)


def owner_process(lab: labs.Lab, owner: str) -> psutil.Process:
    """The command (not its supervising shim) of the lab process recorded as `owner` (e.g. "agent/node1")."""
    record = labs.load(lab.record.name).record
    shim = next(p.pid for p in reversed(record.processes) if p.owner == owner)
    children = psutil.Process(shim).children(recursive=True)
    return next(c for c in children if "nodeagent" in " ".join(c.cmdline()) and "enter" not in c.cmdline()[1:3])


def api_state(lab: labs.Lab) -> dict[str, Any]:
    """GET /admin/state of the lab's API server (resourceVersion, oldest, openWatches, history), from inside
    its namespace, with its admin token."""
    directory = labs.api_server_dir(lab.record)
    script = ("import ssl,sys,urllib.request as u\n"
              "c=ssl.create_default_context(cafile=sys.argv[2])\n"
              "r=u.Request(sys.argv[1],headers={'Authorization':'Bearer '+open(sys.argv[3]).read().strip()})\n"
              "print(u.urlopen(r,context=c,timeout=5).read().decode())")
    url = f"https://{lab.topology.api_server_address}:6443/admin/state"
    out = subprocess.run(["ip", "netns", "exec", labs.api_server_plan(lab.plan, lab.topology).netns, sys.executable,
                          "-c", script, url, str(directory / "ca.crt"), str(directory / "admin-token")],
                         check=True, capture_output=True, text=True, timeout=20).stdout
    state: dict[str, Any] = json.loads(out)
    return state


def agent_healthz(lab: labs.Lab, node: str) -> tuple[int, dict[str, Any]]:
    """(status, body) of `node`'s agent /healthz, read inside the node's namespace; (0, {}) when nothing answers."""
    address = lab.plan.node(node).node.address
    script = ("import json,sys,urllib.request,urllib.error\n"
              "try:\n"
              " r=urllib.request.urlopen(sys.argv[1],timeout=2);print(r.status,r.read().decode())\n"
              "except urllib.error.HTTPError as e: print(e.code,e.read().decode())\n"
              "except OSError: print(0,'{}')")
    out = netns_run(lab.plan.node(node).netns, sys.executable, "-c", script, f"http://{address}:10256/healthz")
    status, _, body = out.strip().partition(" ")
    answer: dict[str, Any] = json.loads(body)
    return int(status), answer
