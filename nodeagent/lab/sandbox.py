"""Pods created the way a container runtime creates them, after the lab is up: a sandbox (network namespace
and cgroup), then the CNI chain with that namespace (the lab's own bridge step first, which joins the
sandbox to its node as `lab up` joins every pod, then `nodeagent-cni`, the real plugin file run as the
runtime runs it: a process with the CNI_* environment and the configuration, with `prevResult`, on stdin),
and only when the chain succeeded the pod's process. A failed ADD leaves the pod's process unstarted, as a
runtime would (the kubelet retries). What is made is recorded in the lab's record, so `lab down` removes it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from nodeagent.cni.install import copy_plugin_to
from nodeagent.lab import cgroups, netns, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.plan import UPLINK, PodPlan, Route, pod_cgroup
from nodeagent.lab.state import Process, locked
from nodeagent.lab.topology import LabPod

CNI_VERSION = "1.0.0"


@dataclass(frozen=True)
class ChainOutcome:
    """What the CNI chain's last plugin printed, and its exit status."""

    code: int
    result: dict[str, Any]
    stderr: str

    @property
    def ok(self) -> bool:
        """Whether the chain succeeded (the runtime then starts the pod's containers)."""
        return self.code == 0


def plugin_path(lab: labs.Lab) -> Path:
    """The lab's CNI bin directory's nodeagent-cni (copied from this checkout on first use)."""
    path = lab.record.directory / "cni-bin" / "nodeagent-cni"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        copy_plugin_to(path)
    return path


def _free_ip(lab: labs.Lab, node: str) -> IPv4Address:
    """An address of the node's pod CIDR no pod of the lab holds, from the top of the range (`lab up`
    allocates from the bottom), remembered in the lab's directory."""
    taken_file = lab.record.directory / "sandbox-ips.json"
    taken = set(json.loads(taken_file.read_text())) if taken_file.exists() else set()
    cidr: IPv4Network = lab.topology.node(node).pod_cidr
    used = {str(p.pod.ip) for p in lab.plan.pods} | taken | {str(cidr.network_address + 1)}
    ip = next(a for a in reversed(list(cidr.hosts())) if str(a) not in used)
    taken_file.write_text(json.dumps(sorted(taken | {str(ip)})))
    return ip


def sandbox_plan(lab: labs.Lab, namespace: str, name: str, node: str, ip: IPv4Address, uid: str) -> PodPlan:
    """The plan of a pod made after `lab up` (IPv4, BestEffort), named and routed as `lab up` names and routes its
    pods, so the agents and tunnels find it under the lab's prefixes and its cgroup by `uid`."""
    lab_node = lab.topology.node(node)
    pod = LabPod(namespace=namespace, name=name, node=node, ip=ip, labels={}, containers=(), uid=uid)
    return PodPlan(pod=pod, netns=f"{lab.record.name}-pod-{namespace}.{name}", node_netns=lab.plan.node(node).netns,
                   cgroup=pod_cgroup(lab.plan.node(node).cgroup, pod),
                   host_ifname=f"lxc{hashlib.sha256(pod.key.encode()).hexdigest()[:11]}",  # as lab up names them
                   routes=(Route(dst=IPv4Network(f"{lab_node.gateway}/32"), dev=UPLINK),
                           Route(dst=IPv4Network("0.0.0.0/0"), dev=UPLINK, gateway=lab_node.gateway)))


def bridge_add(plan: PodPlan) -> dict[str, Any]:
    """The lab's network plugin: join the sandbox to its node; its CNI result (the chain's prevResult)."""
    netns.attach_pod(plan)
    gateway = next(r.dst.network_address for r in plan.routes if r.gateway is None)
    return {"cniVersion": CNI_VERSION,
            "interfaces": [{"name": UPLINK, "sandbox": f"/run/netns/{plan.netns}"}],
            "ips": [{"address": f"{plan.pod.ip}/32", "gateway": str(gateway), "interface": 0}]}


def run_plugin(lab: labs.Lab, plan: PodPlan, command: str, config: dict[str, Any], prev: dict[str, Any] | None,
               container_id: str, uid: str, timeout: float = 120) -> ChainOutcome:
    """Run nodeagent-cni as a runtime does, in the node's namespace: CNI_* in the environment, the network
    configuration (with `prevResult`) on stdin; its printed result or error, and exit status."""
    stdin = {"cniVersion": CNI_VERSION, "name": "lab", "type": "nodeagent-cni", **config}
    if prev is not None:
        stdin["prevResult"] = prev
    environment = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": f"/run/netns/{plan.netns}",
                   "CNI_IFNAME": UPLINK, "CNI_PATH": str(plugin_path(lab).parent),
                   "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={plan.pod.namespace};K8S_POD_NAME={plan.pod.name};"
                               f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}",
                   "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["ip", "netns", "exec", plan.node_netns, str(plugin_path(lab))], input=json.dumps(stdin),
                          env=environment, capture_output=True, text=True, timeout=timeout, check=False)
    try:
        result = json.loads(done.stdout) if done.stdout.strip() else {}
    except json.JSONDecodeError:
        result = {"unreadable": done.stdout[:500]}
    return ChainOutcome(done.returncode, result if isinstance(result, dict) else {"unreadable": result}, done.stderr)


def create(lab: labs.Lab, namespace: str, name: str, node: str, config: dict[str, Any], uid: str = ""
           ) -> tuple[PodPlan, ChainOutcome]:
    """Make the pod's sandbox and run the CNI chain for it (ADD); the pod's process is the caller's to
    start with `start`, and only when the chain succeeded. The pod's cgroup is made first, in the kubelet's
    layout by `uid` (a new one when not given), as the kubelet makes it before the sandbox."""
    uid = uid or str(uuid.uuid4())
    with locked(lab.record.name):
        record = labs.load(lab.record.name).record
        plan = sandbox_plan(lab, namespace, name, node, _free_ip(lab, node), uid)
        record.netns.append(plan.netns)
        record.cgroups.append(plan.cgroup)
        record.save()
        netns.create(plan.netns)
        cgroups.create(plan.cgroup)
    container_id = uuid.uuid4().hex
    prev = bridge_add(plan)
    return plan, run_plugin(lab, plan, "ADD", config, prev, container_id, uid)


def start(lab: labs.Lab, plan: PodPlan, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start the pod's process in its sandbox (namespace and cgroup), recorded so `lab down` stops it."""
    logfile = lab.record.directory / "logs" / f"{plan.pod.namespace}.{plan.pod.name}.sandbox.log"
    with locked(lab.record.name):
        record = labs.load(lab.record.name).record
        pid = processes.spawn(plan.netns, cgroups.path_of(plan.cgroup), argv,
                              {"POD_NAME": plan.pod.name, "POD_NAMESPACE": plan.pod.namespace,
                               "NODE_NAME": plan.pod.node, "POD_IP": str(plan.pod.ip), **(env or {})}, logfile)
        record.processes.append(Process(owner=plan.pod.key, container="sandbox", pid=pid, log=str(logfile)))
        record.save()
    return pid
