"""`lab up | down | status | exec | list`: building and removing labs, journaled so nothing leaks.

Order of `up`: read and validate manifests (pure; any problem stops here with nothing created),
check the machine, take the lab's lock, refuse if the lab or stray objects of it exist, then create
objects one by one, recording each before it is made. Any failure removes everything recorded and
reports what went wrong; `up` never leaves a half-built lab.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import structlog
import yaml

from nodeagent.lab import cgroups, netns, processes
from nodeagent.lab.errors import LabBuildError, LabEnvironmentError, LabError, LabExistsError, LabNotFoundError
from nodeagent.lab.manifests import DEFAULT_MANIFESTS, Document, load_default, load_directory, parse_text
from nodeagent.lab.plan import UPLINK, LabPlan, NodePlan, Route, check_lab_name, netns_prefix, plan_lab
from nodeagent.lab.state import LabRecord, Process, locked, recorded_labs
from nodeagent.lab.topology import ContainerPort, LabNode, LabTopology, build_topology

__all__ = ["Lab", "LabNotFoundError", "down", "exec_in", "kubeconfig", "kubectl", "load", "status", "up"]

log = structlog.get_logger("nodeagent.lab")
API_PORT = 6443
# The API server's cgroup under the lab's: "_" is in no DNS name, so no node's cgroup can be called so.
API_SERVER_CGROUP = "_apiserver"


@dataclass(frozen=True)
class Lab:
    """A lab that is up: its record, its plan and its topology."""

    record: LabRecord
    plan: LabPlan
    topology: LabTopology

    def cluster_ip(self, service: str, namespace: str = "demo") -> str:
        """The cluster IP the lab allocated to Service `namespace/service`."""
        for doc in self.topology.documents:
            meta = doc.get("metadata", {})
            if doc.get("kind") == "Service" and meta.get("name") == service and meta.get("namespace") == namespace:
                return str(doc["spec"]["clusterIP"])
        raise LabError(f"lab {self.record.name!r} has no Service {namespace}/{service}")


def require_root() -> None:
    """Labs create namespaces and cgroups: that needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)."""
    if os.geteuid() != 0:
        raise LabEnvironmentError("the lab creates network namespaces and cgroups and needs root: run it with sudo")


def read_manifests(directory: Path | None, dual_stack: bool = False) -> tuple[str, list[Document]]:
    """The documents of `directory`, or of the built-in default lab when it is None (dual-stack with
    `dual_stack`; a directory says so in its own LabConfig)."""
    if directory is None:
        return (f"{DEFAULT_MANIFESTS} (dual-stack)" if dual_stack else DEFAULT_MANIFESTS), load_default(dual_stack)
    if dual_stack:
        raise LabError("--dual-stack is for the built-in default lab; a directory makes its lab dual-stack with a "
                       "LabConfig (spec.serviceCIDR: <IPv4 CIDR>,<IPv6 CIDR>) or IPv6 Node addresses and podCIDRs")
    return str(directory), load_directory(directory)


def up(name: str, directory: Path | None = None, dual_stack: bool = False) -> Lab:
    """Create lab `name` from the manifests in `directory` (default lab if None, dual-stack with `dual_stack`);
    see the module doc."""
    check_lab_name(name)
    source, documents = read_manifests(directory, dual_stack)
    topology = build_topology(documents)
    plan = plan_lab(name, topology)
    require_root()
    cgroups.cgroup2_mount()
    with locked(name):
        _refuse_existing(name)
        record = LabRecord(name=name, source=source)
        record.save()
        try:
            _build(record, plan, topology)
        except BaseException as exc:
            log.error("lab.up.failed", lab=name, error=str(exc))
            _teardown(name, record)
            if isinstance(exc, LabError):
                raise LabBuildError(f"lab {name!r} could not be built, everything it had created was removed: "
                                    f"{exc}") from exc
            if isinstance(exc, Exception):
                raise LabBuildError(f"lab {name!r} could not be built ({type(exc).__name__}: {exc}); "
                                    "everything it had created was removed") from exc
            raise
    log.info("lab.up", lab=name, nodes=len(plan.nodes), pods=len(plan.pods), source=source)
    return Lab(record=record, plan=plan, topology=topology)


def _refuse_existing(name: str) -> None:
    existing = LabRecord.load(name)
    if existing is not None:
        raise LabExistsError(f"lab {name!r} already exists (phase {existing.phase}, from {existing.source}); "
                             f"remove it first with `nodeagent lab down --lab {name}`")
    stray = [ns for ns in netns.list_netns() if ns.startswith(netns_prefix(name))]
    if stray or cgroups.path_of(f"{name}-lab").exists():
        raise LabExistsError(f"lab {name!r} has no record but its objects exist ({stray or name + '-lab cgroup'}); "
                             f"`nodeagent lab down --lab {name}` removes them")


def _new_netns(record: LabRecord, name: str) -> None:
    record.netns.append(name)
    record.save()
    netns.create(name)


def _new_cgroup(record: LabRecord, relative: str) -> Path:
    record.cgroups.append(relative)
    record.save()
    return cgroups.create(relative)


def _build(record: LabRecord, plan: LabPlan, topology: LabTopology) -> None:
    _new_cgroup(record, plan.cgroup_root)
    _new_netns(record, plan.fabric_netns)
    netns.build_fabric(plan.fabric_netns, ipv6=topology.dual_stack)
    for node in plan.nodes:
        _new_netns(record, node.netns)
        netns.attach_node(plan.fabric_netns, node)
        _new_cgroup(record, node.cgroup)
    for pod in plan.pods:
        _new_netns(record, pod.netns)
        netns.attach_pod(pod)
        _new_cgroup(record, pod.cgroup)
    record.manifests_path.parent.mkdir(parents=True, exist_ok=True)
    record.manifests_path.write_text(yaml.safe_dump_all(topology.documents, sort_keys=False))

    started = [_start_api_server(record, plan, topology)]
    for pod in plan.pods:
        env = {"POD_NAME": pod.pod.name, "POD_NAMESPACE": pod.pod.namespace, "NODE_NAME": pod.pod.node,
               "POD_IP": str(pod.pod.ip), "NODEAGENT_LAB": plan.name}
        for container in pod.pod.containers:
            logfile = record.directory / "logs" / f"{pod.pod.namespace}.{pod.pod.name}.{container.name}.log"
            pid = processes.spawn(pod.netns, cgroups.path_of(pod.cgroup), container.argv,
                                  {**env, **dict(container.env)}, logfile)
            record.processes.append(Process(owner=pod.pod.key, container=container.name, pid=pid,
                                            log=str(logfile)))
            record.save()
            started.append((f"pod {pod.pod.key} container {container.name}", pid, cgroups.path_of(pod.cgroup),
                            container.ports, logfile))
    for what, pid, cgroup, ports, logfile in started:
        processes.wait_serving(what, pid, cgroup, ports, logfile)
    record.phase = "up"
    record.save()


def api_server_dir(record: LabRecord) -> Path:
    """The lab API server's files: certificates, tokens, kubeconfig, pid."""
    return record.directory / "apiserver"


def api_server_plan(plan: LabPlan, topology: LabTopology) -> NodePlan:
    """The API server's own namespace on the fabric bridge, addressed like a node (so the fabric stays L2
    only), with routes to every node's pods so that pods reach it as they reach a cluster's API server."""
    address = topology.api_server_address
    return NodePlan(node=LabNode("apiserver", address, IPv4Network(f"{address}/32")),
                    netns=f"{plan.name}-apiserver", cgroup=f"{plan.cgroup_root}/{API_SERVER_CGROUP}",
                    fabric_port="apiserver0", prefixlen=topology.node_cidr.prefixlen,
                    routes=tuple(Route(dst=n.node.pod_cidr, dev=UPLINK, gateway=n.node.address) for n in plan.nodes))


def _start_api_server(record: LabRecord, plan: LabPlan,
                      topology: LabTopology) -> tuple[str, int, Path, tuple[ContainerPort, ...], Path]:
    """Start `nodeagent lab apiserver` in its namespace, loaded with the lab's manifests (waited for with the
    pods). Its namespace and cgroup are journaled, so `lab down` stops it with the cgroup; it is not one of
    `record.processes`, which are the pods' (and the agents')."""
    control = api_server_plan(plan, topology)
    _new_netns(record, control.netns)
    netns.attach_node(plan.fabric_netns, control)
    cgroup = _new_cgroup(record, control.cgroup)
    directory = api_server_dir(record)
    directory.mkdir(parents=True, exist_ok=True)
    logfile = record.directory / "logs" / "apiserver.log"
    argv = ["nodeagent", "--log-json", "--log-level", "info", "lab", "apiserver", "--lab", record.name,
            "--address", str(control.node.address), "--port", str(API_PORT), "--dir", str(directory),
            "--manifests", str(record.manifests_path), "--service-cidr", str(topology.service_cidrs)]
    pid = processes.spawn(control.netns, cgroup, argv, {"NODEAGENT_LAB": record.name}, logfile)
    (directory / "pid").write_text(f"{pid}\n")
    return "the lab API server", pid, cgroup, (ContainerPort(API_PORT),), logfile


def _shims(record: LabRecord | None) -> list[int]:
    """The supervising shims of the lab's processes: the recorded ones and the API server's."""
    if record is None:
        return []
    shims = [p.pid for p in record.processes]
    pid_file = api_server_dir(record) / "pid"
    if pid_file.exists():
        shims.append(int(pid_file.read_text()))
    return shims


def _teardown(name: str, record: LabRecord | None) -> list[str]:
    """Remove everything of lab `name`: recorded objects and any stray object with its prefix."""
    removed: list[str] = []
    cgroup_root = f"{name}-lab"
    _stop_processes(name, cgroup_root, _shims(record))
    cgroups.remove_tree(cgroup_root)
    removed.append(f"cgroup {cgroup_root}")
    removed.extend(_remove_bpf_pins(name))
    recorded = list(reversed(record.netns)) if record else []
    stray = [ns for ns in netns.list_netns() if ns.startswith(netns_prefix(name)) and ns not in recorded]
    for ns in recorded + sorted(stray, reverse=True):
        if netns.exists(ns):
            netns.remove(ns)
            removed.append(f"netns {ns}")
    if record is not None:
        for path in sorted(record.directory.rglob("*"), key=lambda p: -len(p.parts)):
            path.rmdir() if path.is_dir() else path.unlink()
        record.directory.rmdir()
    return removed


BPF_PINS = Path("/sys/fs/bpf/nodeagent")  # the agents' --bpf-scope in a lab is "<lab>-<node>"


def _remove_bpf_pins(name: str) -> list[str]:
    """Remove the pinned maps and programs of the lab's agents (their cgroups, and so attachments, are gone)."""
    removed = []
    for scope in sorted(BPF_PINS.glob(f"{name}-*")) if BPF_PINS.is_dir() else []:
        shutil.rmtree(scope)
        removed.append(f"bpf pins {scope}")
    if BPF_PINS.is_dir() and not any(BPF_PINS.iterdir()):
        BPF_PINS.rmdir()
    return removed


def _stop_processes(name: str, cgroup_root: str, shims: list[int], timeout: float = 15.0) -> None:
    """Stop the supervising shims and everything in the lab's cgroups, until both stay empty.

    Repeated because a shim that was still starting (lab up killed early) may put its child into a
    pod cgroup after the first sweep; SIGKILL after the first round for anything that ignores SIGTERM.
    """
    deadline = time.monotonic() + timeout
    sig = signal.SIGTERM
    while True:
        for pid in shims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        cgroups.kill_tree(cgroup_root)
        shims = processes.wait_gone(shims, timeout=2.0)
        if not shims and not cgroups.all_pids(cgroup_root):
            return
        if time.monotonic() > deadline:
            raise LabError(f"lab {name!r}: processes {shims + cgroups.all_pids(cgroup_root)} do not exit")
        sig = signal.SIGKILL


def down(name: str) -> list[str]:
    """Remove lab `name` (also a half-built or crashed one). Returns what was removed."""
    check_lab_name(name)
    require_root()
    with locked(name):
        record = LabRecord.load(name)
        stray = [ns for ns in netns.list_netns() if ns.startswith(netns_prefix(name))]
        if record is None and not stray and not cgroups.path_of(f"{name}-lab").exists():
            raise LabNotFoundError(f"no lab {name!r}; labs here: {recorded_labs() or 'none'}")
        removed = _teardown(name, record)
    log.info("lab.down", lab=name, removed=len(removed))
    return removed


def load(name: str) -> Lab:
    """The lab `name` as recorded, with its plan rebuilt from the manifests it was created with."""
    check_lab_name(name)
    record = LabRecord.load(name)
    if record is None:
        raise LabNotFoundError(f"no lab {name!r}; labs here: {recorded_labs() or 'none'} "
                               "(create one with `nodeagent lab up`)")
    if not record.manifests_path.exists():
        raise LabError(f"lab {name!r} is {record.phase} and has no manifests yet")
    documents = list(parse_text(record.manifests_path.read_text(), str(record.manifests_path)))
    topology = build_topology(documents)
    return Lab(record=record, plan=plan_lab(name, topology), topology=topology)


@dataclass(frozen=True)
class ObjectStatus:
    """One object of a lab and whether it is really there."""

    kind: str
    name: str
    present: bool
    detail: str = ""


def status(name: str) -> tuple[LabRecord, list[ObjectStatus]]:
    """Compare what lab `name` recorded against what exists in the kernel now."""
    check_lab_name(name)
    record = LabRecord.load(name)
    if record is None:
        raise LabNotFoundError(f"no lab {name!r}; labs here: {recorded_labs() or 'none'}")
    rows = [ObjectStatus("netns", ns, netns.exists(ns)) for ns in record.netns]
    rows += [ObjectStatus("cgroup", cg, cgroups.path_of(cg).is_dir(), f"{len(cgroups.pids(cg))} process(es)")
             for cg in record.cgroups]
    rows += [ObjectStatus("process", f"{p.owner}/{p.container}", Path(f"/proc/{p.pid}").exists(),
                          f"pid {p.pid}, log {p.log}") for p in record.processes]
    pid_file = api_server_dir(record) / "pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        rows.append(ObjectStatus("process", "apiserver", Path(f"/proc/{pid}").exists(),
                                 f"pid {pid}, log {record.directory / 'logs' / 'apiserver.log'}, "
                                 f"kubeconfig {api_server_dir(record) / 'kubeconfig'}"))
    return record, rows


def kubeconfig(name: str) -> Path:
    """The kubeconfig of lab `name`'s API server (reachable from the lab's namespaces, not from the root one)."""
    check_lab_name(name)
    record = LabRecord.load(name)
    if record is None:
        raise LabNotFoundError(f"no lab {name!r}; labs here: {recorded_labs() or 'none'}")
    path = api_server_dir(record) / "kubeconfig"
    if not path.exists():
        raise LabError(f"lab {name!r} has no API server kubeconfig (is it {record.phase}? was it made by an older "
                       "version? `lab down` and `lab up` again)")
    return path


def kubectl(name: str, arguments: Sequence[str], *, timeout: float | None = None,
            capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real `kubectl` with the lab's kubeconfig inside the API server's namespace (the server lives
    inside the lab, so that is where it is reachable); its discovery cache stays in the lab's directory."""
    path = kubeconfig(name)
    binary = shutil.which("kubectl")
    if binary is None:
        raise LabEnvironmentError("kubectl is not installed: the Debian package `kubectl` (1.32) provides it; "
                                  "scripts/setup.sh installs it where an apt repository offers it")
    lab = load(name)
    control = api_server_plan(lab.plan, lab.topology)
    command = [binary, "--kubeconfig", str(path), "--cache-dir", str(path.parent / "kubectl-cache"), *arguments]
    argv = processes.enter_argv(control.netns, cgroups.path_of(control.cgroup), command)
    return subprocess.run(argv, env=processes.child_env({"NODEAGENT_LAB": name}), timeout=timeout, check=False,
                          text=True, capture_output=capture)


def exec_in(name: str, command: Sequence[str], *, pod: str | None = None, node: str | None = None,
            timeout: float | None = None) -> int:
    """Run `command` in a pod's (or node's) netns and cgroup with this terminal; return its exit code."""
    lab = load(name)
    if (pod is None) == (node is None):
        raise LabError("name exactly one pod or one node to run the command in")
    if pod is not None:
        target = lab.plan.pod(pod)
        where, cgroup = target.netns, target.cgroup
        env = {"POD_NAME": target.pod.name, "POD_NAMESPACE": target.pod.namespace, "NODE_NAME": target.pod.node}
    else:
        node_plan = lab.plan.node(node or "")
        where, cgroup, env = node_plan.netns, node_plan.cgroup, {"NODE_NAME": node_plan.node.name}
    argv = processes.enter_argv(where, cgroups.path_of(cgroup), command)
    return subprocess.run(argv, env=processes.child_env({**env, "NODEAGENT_LAB": name}), timeout=timeout,
                          check=False).returncode
