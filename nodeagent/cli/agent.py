"""`nodeagent run`: the node agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nodeagent.cli.options import (
    daemon_logging,
    parse_cidrs,
    parse_host_port,
    source_options,
)


def _clear_ebpf(scope: str, cgroup_path: Path | None) -> None:
    """Switching to iptables: programs of an earlier eBPF run must not keep translating beside the rules."""
    import structlog

    from nodeagent.kernel.bpf import loader

    try:
        cgroup = cgroup_path or loader.own_cgroup()
        removed = loader.detach(cgroup) + loader.remove_pins(scope)
    except (loader.BpfError, OSError) as exc:
        structlog.get_logger("nodeagent.run").warning("could not clear the eBPF datapath", reason=str(exc))
        return
    if removed:
        structlog.get_logger("nodeagent.run").info("eBPF datapath of an earlier run removed", removed=removed)


def _config_defaults(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """`run --config FILE`: the file's settings become the defaults, so flags (and $NODE_NAME) still win."""
    if value is None:
        return
    from nodeagent.config import ConfigError, read_config

    try:
        ctx.default_map = {**(ctx.default_map or {}), **read_config(value).run_defaults()}
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


@click.command()
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False), is_eager=True, expose_value=False,
              callback=_config_defaults, help="a NodeAgentConfiguration YAML file (kube-proxy's field names); "
                                              "flags given here override it")
@click.option("--mode", type=click.Choice(["auto", "ebpf", "iptables"]), default="auto", show_default=True,
              help="service datapath; auto: eBPF, or iptables (with the reason logged) where eBPF cannot load")
@click.option("--cgroup", "cgroup_path", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="cgroup v2 directory the eBPF programs attach to (default: this process's own cgroup; "
                   "the DaemonSet passes the host's cgroup root)")
@click.option("--bpf-scope", default="host", show_default=True,
              help="name of this agent's pinned maps and programs under /sys/fs/bpf/nodeagent/")
@source_options
@click.option("--min-sync-period", type=float, default=1.0, show_default=True,
              help="seconds between syncs at most this often (changes are coalesced)")
@click.option("--sync-period", type=float, default=30.0, show_default=True,
              help="seconds between syncs at least this often; also the full-resync period")
@click.option("--cluster-cidr", default="", help="pod CIDR(s): traffic from outside it is masqueraded")
@click.option("--masquerade-all", is_flag=True, help="masquerade all traffic to Service cluster IPs")
@click.option("--nodeport-addresses", default="", help="CIDRs of the node addresses NodePorts answer on")
@click.option("--iptables-backend", type=click.Choice(["auto", "nft", "legacy"]), default="auto",
              show_default=True)
@click.option("--healthz-bind-address", default="0.0.0.0:10256", show_default=True,
              help="HOST:PORT of /healthz (empty: off)")
@click.option("--metrics-bind-address", default="127.0.0.1:10249", show_default=True,
              help="HOST:PORT of /metrics and /proxyMode (empty: off)")
@click.option("--mesh/--no-mesh", default=False, show_default=True,
              help="enroll this node's pods in the mesh: assign them to the node tunnel over the control "
                   "socket and capture their traffic once the tunnel serves them")
@click.option("--control-socket", default="/run/nodeagent/control.sock", show_default=True,
              help="unix socket of the control stream to the node tunnel (with --mesh)")
@click.option("--netns-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("/run/netns"),
              show_default=True, help="where the container runtime binds pod network namespaces (with --mesh)")
@click.option("--netns-prefix", default="", help="only namespaces whose names start with this (with --mesh)")
@click.option("--pod-cgroup-parent", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="eBPF-mode capture: pods' cgroups are <DIR>/<netns name minus --netns-prefix> (the lab's "
                   "layout); without it the mesh captures with iptables in every mode")
@click.option("--tunnel-cgroup", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="eBPF-mode capture: the node tunnel's cgroup, where the original-destination hook goes "
                   "(default: this process's cgroup, as in the lab)")
def run(mode: str, cgroup_path: Path | None, bpf_scope: str, kubeconfig: str | None, context: str | None,
        manifests: Path | None, source_lab: str | None, node_name: str | None, min_sync_period: float,
        sync_period: float, cluster_cidr: str, masquerade_all: bool, nodeport_addresses: str,
        iptables_backend: str, healthz_bind_address: str, metrics_bind_address: str, mesh: bool,
        control_socket: str, netns_dir: Path,
        netns_prefix: str, pod_cgroup_parent: Path | None, tunnel_cgroup: Path | None) -> None:
    """Run the node agent: watch the source, keep this node's datapath in sync, until SIGTERM."""
    import signal
    import threading

    import structlog

    from nodeagent.daemon.agent import Agent, AgentOptions
    from nodeagent.kernel.netfilter import Iptables, detect_backend, supports_random_fully
    from nodeagent.service.iptables.proxier import IptablesProxier
    from nodeagent.state.sync import SyncSchedule

    if source_lab is not None:
        raise click.UsageError("--lab is for reading a lab from outside; the agent in a lab node uses --manifests")
    if node_name is None:
        raise click.UsageError("--node (or $NODE_NAME) is needed")
    try:
        SyncSchedule(min_sync_period, sync_period)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    host, port = parse_host_port(healthz_bind_address)
    metrics_host, metrics_port = parse_host_port(metrics_bind_address)
    daemon_logging()
    options = AgentOptions(node_name=node_name, min_sync_period=min_sync_period, sync_period=sync_period,
                           cluster_cidrs=parse_cidrs(cluster_cidr), masquerade_all=masquerade_all,
                           nodeport_addresses=parse_cidrs(nodeport_addresses), random_fully=supports_random_fully(),
                           healthz_host=host, healthz_port=port, metrics_host=metrics_host, metrics_port=metrics_port)
    backend = detect_backend() if iptables_backend == "auto" else iptables_backend
    iptables_proxier = IptablesProxier(Iptables(backend), sync_period=sync_period)
    proxier: Any = iptables_proxier
    active, reason = "iptables", "asked for (--mode iptables)"
    if mode in ("auto", "ebpf"):
        from nodeagent.kernel.bpf.loader import BpfError, own_cgroup
        from nodeagent.service.ebpf.proxier import EbpfProxier, external_interfaces

        try:
            cgroup = cgroup_path or own_cgroup()
            ebpf = EbpfProxier(bpf_scope, cgroup, external=iptables_proxier, sync_period=sync_period,
                               tc_interfaces=external_interfaces()).start()
            proxier, active, reason = ebpf, "ebpf", ebpf.mode_detail
        except (BpfError, OSError) as exc:
            if mode == "ebpf":
                raise click.ClickException(f"eBPF datapath unavailable: {exc}. `nodeagent doctor` says what this "
                                           "machine lacks; `--mode auto` falls back to iptables") from exc
            reason = f"eBPF unavailable, fell back to iptables: {exc}"
            structlog.get_logger("nodeagent.run").warning("falling back to iptables", reason=str(exc))

    def make_source(sink: Any) -> Any:
        if manifests is not None:
            from nodeagent.cluster.discovery.manifests import ManifestSource

            return ManifestSource(manifests, sink)
        from nodeagent.cluster.discovery.kubernetes import ApiConnection, KubernetesSource

        return KubernetesSource(ApiConnection.from_config(kubeconfig, context), sink, node_name)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if active == "iptables":
        _clear_ebpf(bpf_scope, cgroup_path)
    agent = Agent(options, make_source, proxier)
    agent.health.mode, agent.health.mode_reason = active, reason
    agent.start()
    capture = _mesh_capture(active, backend, bpf_scope, netns_prefix, pod_cgroup_parent, tunnel_cgroup) if mesh \
        else None
    mesh_loop = _start_mesh(node_name, capture, control_socket, netns_dir, netns_prefix, agent) if mesh else None
    try:
        stop.wait()
    finally:
        if mesh_loop is not None:
            mesh_loop.stop()
            mesh_loop.reconciler.control.stop()
        agent.stop()


def _mesh_capture(active: str, backend: str, bpf_scope: str, netns_prefix: str, pod_cgroup_parent: Path | None,
                  tunnel_cgroup: Path | None) -> Any:
    """How pods are captured: eBPF on their cgroups when the datapath is eBPF and their cgroups can be
    found, else iptables in their namespaces."""
    from nodeagent.mesh.iptables.capture import IptablesCapture

    if active != "ebpf" or pod_cgroup_parent is None:
        return IptablesCapture(backend)
    from nodeagent.kernel.bpf.loader import BpfError, own_cgroup
    from nodeagent.mesh.ebpf import programs as bpf_mesh
    from nodeagent.mesh.ebpf.capture import CgroupBesideNetns, EbpfCapture

    try:
        programs = bpf_mesh.load(bpf_scope)
        return EbpfCapture(programs, CgroupBesideNetns(pod_cgroup_parent, netns_prefix), backend,
                           tunnel_cgroup or own_cgroup())
    except (BpfError, OSError) as exc:
        raise click.ClickException(f"eBPF mesh capture unavailable: {exc}; drop --pod-cgroup-parent to capture "
                                   "with iptables") from exc


def _start_mesh(node_name: str, capture: Any, control_socket: str, netns_dir: Path, netns_prefix: str,
                agent: Any) -> Any:
    """The control stream to the node tunnel and the loop that enrolls and captures this node's pods."""
    from nodeagent.control.server import ControlServer
    from nodeagent.daemon.mesh import MeshLoop
    from nodeagent.mesh.iptables.capture import IptablesCapture
    from nodeagent.mesh.reconciler import MeshReconciler

    Path(control_socket).parent.mkdir(parents=True, exist_ok=True)
    control = ControlServer(node_name)
    try:
        control.start(control_socket)
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(f"control socket {control_socket}: {exc}") from exc
    # Transparent connects need the iptables capture's policy routing for the replies (eBPF mode has none).
    reconciler = MeshReconciler(node_name, control, capture, netns_dir=netns_dir, netns_prefix=netns_prefix,
                                transparent=isinstance(capture, IptablesCapture))
    loop = MeshLoop(reconciler, agent.tracker.last)
    control.on_ack = loop.request

    def inspect_status(pod: str) -> dict[str, Any]:  # for `nodeagent inspect`, over the control socket
        snapshot = agent.tracker.last()
        report: dict[str, Any] = agent.health.report()[1]
        return {"mode": agent.health.mode, "mode_reason": agent.health.mode_reason, "syncs": agent.syncs,
                "generation": None if snapshot is None else snapshot.generation, "health": report,
                "capture": type(capture).__name__, "mesh_states": dict(reconciler.states),
                "captured": dict(reconciler.captured)}

    control.inspect_status = inspect_status
    return loop.start()
