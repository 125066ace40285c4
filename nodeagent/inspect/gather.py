"""Reading one pod's state for `inspect`: the agent (control socket), the tunnel (its config dump, from inside the
node's network namespace) and the kernel (the capture in the pod's namespace or on its cgroup, the node's
service chains). Thin I/O; the report itself is assembled by the pure modules of this package.

Works with the agent down: everything but the agent's named state and mode comes from the kernel, and the
report says so (`source: kernel`).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from nodeagent.ca.identity import SpiffeId
from nodeagent.cluster.enrollment import Enrollment
from nodeagent.cluster.model import IPNetwork
from nodeagent.errors import NodeAgentError
from nodeagent.inspect.agent_client import AgentUnreachable, query_agent
from nodeagent.inspect.build import compute_drift, policy_lines, tunnel_part
from nodeagent.inspect.model import Capture, PodReport, ProgramLine, RuleLine, ServicePath
from nodeagent.inspect.paths import captured_by_tunnel, ebpf_paths, iptables_paths, with_live
from nodeagent.mesh.annotations import capture_options
from nodeagent.mesh.capture import CaptureState, CaptureStatus
from nodeagent.mesh.iptables.apply import live_state
from nodeagent.mesh.iptables.render import CaptureOptions
from nodeagent.state.tracker import Snapshot
from nodeagent.tunnel.state.workloads import workload_table

log = structlog.get_logger("nodeagent.inspect")
ADMIN_URL = "http://127.0.0.1:15000/config_dump"


class InspectError(NodeAgentError):
    """Bad input or a vanished object: one line for the user, naming the object."""


@dataclass(frozen=True)
class Target:
    """Where one node's parts are: its snapshot, network namespace, control socket, eBPF scope, pod cgroups."""

    snapshot: Snapshot
    node: str
    node_netns: str | None  # a name under /run/netns (None: this namespace)
    control_socket: str
    bpf_scope: str
    netns_dir: Path
    netns_prefix: str
    kubelet_cgroup_root: Path | None = None  # where the kubelet makes pods' cgroups (eBPF capture)
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    trust_domain: str = "cluster.local"


def find_pod(snapshot: Snapshot, ref: str, namespace: str | None) -> Any:
    """The pod `ref` (`name` with `namespace`, or `namespace/name`); InspectError naming it otherwise."""
    key = ref if "/" in ref else f"{namespace or 'default'}/{ref}"
    pod = next((p for p in snapshot.pods.values() if p.ref.key == key), None)
    if pod is None:
        known = sorted(p.ref.key for p in snapshot.pods.values() if p.ref.name == key.split("/", 1)[1])
        hint = f"; pods of that name: {', '.join(known)}" if known else ""
        raise InspectError(f"no pod {key} in the cluster{hint}")
    return pod


def _pod_netns(target: Target, ip: str, key: str) -> str:
    from nodeagent.kernel import podnetns

    found = podnetns.locate([ip], target.netns_dir, target.netns_prefix).get(ip)
    if found is None or not os.path.exists(found):
        raise InspectError(f"pod {key}: no network namespace under {target.netns_dir} holds {ip} "
                           "(the pod's namespace vanished, or it is not on this node)")
    return found


def _save(netns: str, backend: str, table: str) -> str:
    from nodeagent.kernel.netns import command_in

    argv = command_in(netns, [f"iptables-{backend}-save", "-c", "-t", table])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return result.stdout if result.returncode == 0 else ""


def _our_rules(netns: str, backend: str) -> tuple[RuleLine, ...]:
    """Our chains' rules and the jumps into them, with packet counters, as iptables-save -c prints them."""
    out = []
    for table in ("mangle", "nat"):
        for line in _save(netns, backend, table).splitlines():
            if line.startswith("[") and "NODEAGENT_" in line:
                counters, rule = line.split("] ", 1)
                out.append(RuleLine(table, rule, int(counters[1:].split(":")[0])))
    return tuple(out)


def _iptables_capture(netns: str, options: CaptureOptions) -> tuple[CaptureState, str]:
    states = [(live_state(netns, options, backend=b), b) for b in ("nft", "legacy")]
    return next(((s, b) for s, b in states if s.status is not CaptureStatus.ABSENT), states[0])


def _ebpf_capture(target: Target, netns: str, key: str, options: CaptureOptions) -> tuple[CaptureState, Capture] | None:
    """The eBPF capture of the pod, when the node's mesh programs are pinned and its cgroup can be found."""
    if target.kubelet_cgroup_root is None:
        return None
    from nodeagent.kernel.bpf.loader import BpfError
    from nodeagent.kernel.netns import cookie_key, netns_cookie
    from nodeagent.mesh.ebpf import programs as bpf_mesh
    from nodeagent.mesh.ebpf.capture import EbpfCapture
    from nodeagent.mesh.ebpf.hooks import on_cgroup, tc_ours
    from nodeagent.mesh.ebpf.kubelet import KubeletCgroups
    from nodeagent.mesh.ebpf.state import describe_config

    found = find_pod(target.snapshot, key, None)
    locate = KubeletCgroups(target.kubelet_cgroup_root, lambda _netns, _pod: (found.uid, found.qos_class))
    try:
        with bpf_mesh.load(target.bpf_scope, compile_if_missing=False) as programs:
            state = EbpfCapture(programs, locate, "nft").state(netns, options)
            pod = locate(netns, key)
            if pod is None:
                return state, Capture("ebpf", "ebpf", str(state.status), netns)
            attached = [a for a, _ in on_cgroup(pod.cgroup)] + list(tc_ours(netns, pod.interface))
            config = programs.maps["nm_config"].lookup(cookie_key(netns_cookie(netns)))
            entries = (f"nm_config[netns cookie {netns_cookie(netns)}] = {describe_config(config)}",) \
                if config is not None else ()
            counters = bpf_mesh.capture_counters(programs, pod)
    except (BpfError, OSError):
        return None  # nothing pinned: no eBPF capture on this node
    return state, Capture("ebpf", "ebpf", str(state.status), netns,
                          programs=tuple(ProgramLine(a.name, a.prog_id, a.where) for a in attached),
                          map_entries=entries, counters=counters)


def read_dump(node_netns: str | None, timeout: float = 3.0) -> tuple[dict[str, Any] | None, str]:
    """The tunnel's config dump, asked from inside the node's namespace (its admin port is localhost only)."""
    def fetch() -> dict[str, Any]:
        with urllib.request.urlopen(ADMIN_URL, timeout=timeout) as answer:
            data: dict[str, Any] = json.loads(answer.read())
            return data

    try:
        if node_netns is None:
            return fetch(), ""
        from nodeagent.kernel.netns import in_netns

        return in_netns(f"/run/netns/{node_netns}", fetch), ""
    except (OSError, ValueError) as exc:
        return None, f"{ADMIN_URL} in {node_netns or 'this namespace'}: {exc}"


def _live_nat_chains(node_netns: str | None, ipv6: bool = False) -> set[str] | None:
    from nodeagent.kernel.netfilter import Iptables, IptablesError, detect_backend

    try:
        text = Iptables(detect_backend(node_netns), node_netns, ipv6=ipv6).save("nat")
    except (IptablesError, OSError):
        return None
    return {line[1:].split()[0] for line in text.splitlines() if line.startswith(":")}


def datapath_mode(target: Target) -> str:
    """The node's service datapath: the agent's word, else what is pinned (eBPF) or not (iptables)."""
    try:
        return str(query_agent(target.control_socket).get("mode") or "iptables")
    except AgentUnreachable:
        from nodeagent.kernel.bpf.loader import ROOT

        return "ebpf" if any((ROOT / target.bpf_scope).glob("v*")) else "iptables"


def service_paths(target: Target, mode: str) -> list[ServicePath]:
    """Every Service frontend's path on the node, from the datapath's render functions."""
    return _services(target, mode, False, None)


def _services(target: Target, mode: str, enrolled: bool, only: str | None, dns_port: int | None = None
              ) -> list[ServicePath]:
    from nodeagent.service.addresses import local_addresses
    from nodeagent.service.config import ProxySettings, proxy_config, served_families

    snapshot = target.snapshot
    node = snapshot.node
    node_ips: Sequence[Any] = tuple(node.internal_ips) if node is not None else ()
    if mode == "ebpf":
        paths = ebpf_paths(snapshot.service_ports, snapshot.endpoints, node_ips,
                           dict(node.labels) if node is not None else None)
    else:
        settings = ProxySettings(cluster_cidrs=target.cluster_cidrs)
        addresses = () if target.node_netns else local_addresses()
        config = proxy_config(target.node, settings, snapshot, addresses)
        # the IPv6 proxier's paths where the node has IPv6 to serve, as the agent runs that proxier
        config6 = (proxy_config(target.node, settings, snapshot, addresses, family=6)
                   if 6 in served_families(node, settings) else None)
        live = _live_nat_chains(target.node_netns)
        live6 = _live_nat_chains(target.node_netns, ipv6=True) if config6 is not None else set()
        paths = with_live(iptables_paths(snapshot.service_ports, snapshot.endpoints, config, node_ips, config6),
                          None if live is None or live6 is None else live | live6)
    if only is not None:
        paths = [p for p in paths if p.service == only or p.service.startswith(f"{only}:")]
    return captured_by_tunnel(paths, dns_port) if enrolled else paths


def inspect_pod(target: Target, ref: str, namespace: str | None = None, service: str | None = None) -> PodReport:
    """The whole report of one pod of `target.node`; InspectError for bad input."""
    pod = find_pod(target.snapshot, ref, namespace)
    key = pod.ref.key
    if pod.node_name != target.node:
        raise InspectError(f"pod {key} runs on node {pod.node_name or '(unscheduled)'}, not {target.node}: "
                           f"inspect it on that node (--node {pod.node_name})")
    ips = tuple(str(ip) for ip in pod.ips)
    table = workload_table(target.snapshot, target.node, target.trust_domain)
    decision = table.decisions.get(key, Enrollment(False, "not a pod of this node"))
    identity = SpiffeId(target.trust_domain, pod.ref.namespace, pod.service_account)
    try:
        agent: dict[str, Any] | None = query_agent(target.control_socket, key)
        source, note = "agent", f"the agent on {target.control_socket}"
    except AgentUnreachable as exc:
        agent, source, note = None, "kernel", f"{exc}: the agent is not running; read from the kernel only"
    if pod.host_network or not ips:
        raise InspectError(f"pod {key} has no network namespace of its own ({decision.reason})")
    netns = _pod_netns(target, ips[0], key)
    options, _ = capture_options(key, pod.annotations)
    ebpf = _ebpf_capture(target, netns, key, options)
    if ebpf is not None and ebpf[0].status is not CaptureStatus.ABSENT:
        state, capture = ebpf
    else:
        state, backend = _iptables_capture(netns, options)
        capture = Capture("iptables" if state.status is not CaptureStatus.ABSENT else "none",
                          backend, str(state.status), netns, rules=_our_rules(netns, backend))
    mode = str(agent.get("mode", "")) if agent else ("ebpf" if ebpf is not None else "iptables")
    reason = str(agent.get("mode_reason", "")) if agent else (
        "guessed from the kernel: the mesh eBPF programs are pinned" if ebpf is not None
        else "guessed from the kernel: no mesh eBPF programs are pinned")
    agent_state = str(agent.get("mesh_states", {}).get(key, "")) if agent else ""
    relevant = decision.enrolled or state.status is not CaptureStatus.ABSENT
    dump, dump_error = read_dump(target.node_netns)
    tunnel = tunnel_part(dump, ips[0], dump_error)
    # Both captures take the pod's DNS into the tunnel's proxy (unless the pod opted out: dns_port None).
    services = _services(target, mode, decision.enrolled, service, options.dns_port)
    drift = compute_drift(enrolled=decision.enrolled, capture=capture,
                          missing=state.missing if relevant else (), unexpected=state.unexpected if relevant else (),
                          agent_state=agent_state or None, tunnel=tunnel, services=services)
    log.debug("pod inspected", pod=key, source=source, drift=len(drift))
    return PodReport(key, target.node, ips, str(identity), decision.enrolled, decision.reason, source, note,
                     mode, reason, agent_state, capture, tunnel, tuple(services), drift,
                     policy_lines(target.snapshot, pod.ref.namespace, pod.labels))


def inspect_service(target: Target, service: str) -> list[ServicePath]:
    """Every frontend of `service` (namespace/name[:port]) on the node: its path and whether the kernel holds it."""
    paths = _services(target, datapath_mode(target), False, service)
    if not paths:
        raise InspectError(f"no Service port {service} in the cluster (or it is headless/ExternalName)")
    return paths


def inspect_node(target: Target) -> list[PodReport]:
    """The report of every pod of the node that has a network namespace of its own (host-network and IP-less
    pods have none); a pod whose namespace vanished is left out with a warning."""
    reports = []
    for pod in sorted(target.snapshot.pods.values(), key=lambda p: p.ref.key):
        if pod.node_name != target.node or pod.host_network or not pod.ips:
            continue
        try:
            reports.append(inspect_pod(target, pod.ref.key))
        except InspectError as exc:
            log.warning("pod left out", pod=pod.ref.key, reason=str(exc))
    return reports
