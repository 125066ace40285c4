"""The `nodeagent` command line."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from nodeagent import __version__
from nodeagent.observability.logs import configure_logging

F = TypeVar("F", bound=Callable[..., Any])
LAB_OPTION = click.option("--lab", "lab_name", default="lab", envvar="NODEAGENT_LAB", show_default=True,
                          help="lab name: the prefix of all its namespaces and cgroups")


def _lab_errors(func: F) -> F:
    """Turn lab errors into a one-paragraph message and exit status 1, not a traceback."""
    from nodeagent.lab.errors import LabError

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LabError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]),
              help="[default: info for `run` and `ztunnel`, warning otherwise]")
@click.option("--log-json", is_flag=True, help="JSON log lines (the default when stderr is not a terminal)")
def main(log_level: str | None, log_json: bool) -> None:
    """nodeagent: kube-proxy replacement and zero-trust mesh node agent."""
    configure_logging(json=log_json or not sys.stderr.isatty(), level=log_level or "warning")


def _daemon_logging() -> None:
    """Logging for the long-running commands: JSON lines, `info` unless --log-level says otherwise."""
    level = click.get_current_context().find_root().params.get("log_level")
    configure_logging(json=True, level=level or "info")


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"nodeagent {__version__}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def doctor(as_json: bool) -> None:
    """Check every prerequisite (kernel features, tools, bcc) and say how to fix what is missing."""
    from nodeagent.doctor import format_checks, run_all

    checks = run_all()
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        click.echo(format_checks(checks))
    sys.exit(0 if all(c.ok for c in checks) else 1)


@main.group()
def lab() -> None:
    """The local lab: nodes and pods as network namespaces and cgroups on this machine."""


@lab.command("up")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@LAB_OPTION
@_lab_errors
def lab_up(directory: Path | None, lab_name: str) -> None:
    """Create a lab from the Kubernetes manifests in DIRECTORY (the built-in default lab without one)."""
    from nodeagent.lab import lab as labs
    from nodeagent.lab.demo import describe

    created = labs.up(lab_name, directory)
    click.echo(describe(created))
    click.echo(f"manifests as the agent sees them: {created.record.manifests_path}")


@lab.command("agents")
@LAB_OPTION
@click.option("--mode", type=click.Choice(["auto", "ebpf", "iptables"]), default="auto", show_default=True)
@click.option("--mesh/--no-mesh", default=True, show_default=True,
              help="also run the node tunnel (`nodeagent ztunnel`) beside each agent")
@_lab_errors
def lab_agents(lab_name: str, mode: str, mesh: bool) -> None:
    """Start `nodeagent run` (and the tunnel) on every node of the lab (stopped by `lab down`)."""
    from nodeagent.lab.agents import start_agents

    lab = start_agents(lab_name, mode, mesh=mesh)
    logs = lab.record.directory / "logs"
    for node in lab.plan.nodes:
        name, address = node.node.name, node.node.address
        click.echo(f"agent on {name}: synced, healthz http://{address}:10256/healthz "
                   f"(in {node.netns}), log {logs / f'agent.{name}.log'}")
        if mesh:
            click.echo(f"tunnel on {name}: ready, http://{address}:15021/healthz/ready, "
                       f"log {logs / f'ztunnel.{name}.log'}")


@lab.command("down")
@LAB_OPTION
@_lab_errors
def lab_down(lab_name: str) -> None:
    """Remove everything the lab created (also after a crash)."""
    from nodeagent.lab import lab as labs

    for line in labs.down(lab_name):
        click.echo(f"removed {line}")


@lab.command("status")
@LAB_OPTION
@_lab_errors
def lab_status(lab_name: str) -> None:
    """Show the lab's recorded objects and whether each really exists."""
    from nodeagent.lab import lab as labs

    record, rows = labs.status(lab_name)
    click.echo(f"lab {record.name}: {record.phase} (from {record.source})")
    for row in rows:
        click.echo(f"  {'present' if row.present else 'MISSING'}  {row.kind:<8} {row.name}  {row.detail}")
    if not all(row.present for row in rows):
        sys.exit(1)


@lab.command("list")
def lab_list() -> None:
    """List the labs recorded on this machine."""
    from nodeagent.lab.state import LabRecord, recorded_labs

    for name in recorded_labs():
        record = LabRecord.load(name)
        if record is not None:
            click.echo(f"{name}\t{record.phase}\t{len(record.netns)} netns\t{record.source}")


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@LAB_OPTION
@click.option("--node", help="run in this node's namespace instead of a pod's")
@click.argument("target", required=False)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_lab_errors
def lab_exec(lab_name: str, node: str | None, target: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND in pod TARGET (ns/name or name), e.g. `lab exec demo/client -- ip addr`."""
    from nodeagent.lab import lab as labs

    if node is not None and target is not None:
        command = (target, *command)
        target = None
    sys.exit(labs.exec_in(lab_name, command, pod=target, node=node))


@lab.command("demo")
@LAB_OPTION
@click.option("--keep", is_flag=True, help="leave the lab up afterwards")
@_lab_errors
def lab_demo(lab_name: str, keep: bool) -> None:
    """Bring up the default lab, show requests between pods on both nodes, tear it down."""
    from nodeagent.lab.demo import run_demo

    run_demo(lab_name, keep, click.echo)


@lab.command("apiserver")
@LAB_OPTION
@click.option("--address", default="127.0.0.1", show_default=True, help="the address to listen on (and certify)")
@click.option("--port", default=6443, show_default=True, type=int)
@click.option("--dir", "directory", required=True, type=click.Path(path_type=Path),
              help="its files: certificates, tokens, the kubeconfig it writes (reused when present)")
@click.option("--manifests", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="a YAML file of objects to serve from the start")
@click.option("--follow/--no-follow", default=True, show_default=True,
              help="apply every later change of --manifests (objects created through the API are kept)")
@click.option("--service-cidr", default=None, help="give Services created through the API cluster IPs from it")
def lab_apiserver(lab_name: str, address: str, port: int, directory: Path, manifests: Path | None, follow: bool,
                  service_cidr: str | None) -> None:
    """Serve the lab's Kubernetes API over HTTPS until SIGTERM (`lab up` runs it inside the lab)."""
    from ipaddress import IPv4Network

    from nodeagent.lab.apiserver.process import serve

    _daemon_logging()
    serve(address, port, directory, manifests, name=lab_name, follow=follow,
          service_cidr=IPv4Network(service_cidr) if service_cidr else None)


@lab.command("kubeconfig")
@LAB_OPTION
@_lab_errors
def lab_kubeconfig(lab_name: str) -> None:
    """Print the path of the kubeconfig of the lab's API server (usable inside the lab: see `lab kubectl`)."""
    from nodeagent.lab import lab as labs

    click.echo(labs.kubeconfig(lab_name))


@lab.command("kubectl", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@LAB_OPTION
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
@_lab_errors
def lab_kubectl(lab_name: str, arguments: tuple[str, ...]) -> None:
    """Run kubectl against the lab's API server, inside the lab: `lab kubectl -- get svc -A`."""
    from nodeagent.lab import lab as labs

    sys.exit(labs.kubectl(lab_name, arguments).returncode)


def source_options(func: F) -> F:
    """The options that say where the cluster's state comes from (exactly one of them)."""
    func = click.option("--node", "node_name", envvar="NODE_NAME", default=None,
                        help="the node whose view is shown [$NODE_NAME; node1 for a lab]")(func)
    func = click.option("--lab", "source_lab", default=None, help="a lab on this machine (its manifests)")(func)
    func = click.option("--manifests", type=click.Path(path_type=Path, file_okay=False), default=None,
                        help="a directory of Kubernetes YAML/JSON")(func)
    func = click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
                        help="a kubeconfig (default: in-cluster config in a pod, else $KUBECONFIG)")(func)
    func = click.option("--context", default=None, help="kubeconfig context")(func)
    return func


def read_snapshot(kubeconfig: str | None, context: str | None, manifests: Path | None, source_lab: str | None,
                  node_name: str | None) -> Any:
    """One complete snapshot from the chosen source; a click error naming what is wrong otherwise."""
    chosen = [flag for flag, value in (("--kubeconfig", kubeconfig or context), ("--manifests", manifests),
                                       ("--lab", source_lab)) if value]
    if len(chosen) > 1:
        raise click.UsageError(f"choose one source, not {' and '.join(chosen)}")
    from nodeagent.state.once import SourceTimeout, snapshot_of_cluster, snapshot_of_manifests

    if source_lab is not None:
        from nodeagent.lab import lab as labs
        from nodeagent.lab.errors import LabError

        try:
            manifests = labs.load(source_lab).record.manifests_path.parent
        except LabError as exc:
            raise click.ClickException(str(exc)) from exc
        node_name = node_name or "node1"
    if node_name is None:
        raise click.UsageError("--node (or $NODE_NAME) is needed: which node's view to show")
    try:
        if manifests is not None:
            return snapshot_of_manifests(manifests, node_name)
        return snapshot_of_cluster(kubeconfig, node_name, context=context)
    except (OSError, SourceTimeout) as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # the kubernetes client's config errors have no common base class
        if type(exc).__module__.startswith("kubernetes"):
            raise click.ClickException(f"Kubernetes configuration: {exc}") from exc
        raise


@main.command()
@source_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def snapshot(kubeconfig: str | None, context: str | None, manifests: Path | None, source_lab: str | None,
             node_name: str | None, as_json: bool) -> None:
    """Show what the node would program: every Service port with its endpoints, and every rejection."""
    from nodeagent.state.describe import format_snapshot, snapshot_document

    state = read_snapshot(kubeconfig, context, manifests, source_lab, node_name)
    click.echo(json.dumps(snapshot_document(state), indent=2) if as_json else format_snapshot(state))


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


def _cidrs(value: str) -> tuple[Any, ...]:
    import ipaddress

    try:
        return tuple(ipaddress.ip_network(part.strip()) for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _host_port(value: str) -> tuple[str, int | None]:
    if value in ("", "0"):
        return "", None
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host or "0.0.0.0", int(port)


def _config_defaults(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """`run --config FILE`: the file's settings become the defaults, so flags (and $NODE_NAME) still win."""
    if value is None:
        return
    from nodeagent.config import ConfigError, read_config

    try:
        ctx.default_map = {**(ctx.default_map or {}), **read_config(value).run_defaults()}
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


@main.command()
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
    host, port = _host_port(healthz_bind_address)
    metrics_host, metrics_port = _host_port(metrics_bind_address)
    _daemon_logging()
    options = AgentOptions(node_name=node_name, min_sync_period=min_sync_period, sync_period=sync_period,
                           cluster_cidrs=_cidrs(cluster_cidr), masquerade_all=masquerade_all,
                           nodeport_addresses=_cidrs(nodeport_addresses), random_fully=supports_random_fully(),
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


@main.command()
@click.option("--node", "node_name", envvar="NODE_NAME", required=True, help="this node's name [$NODE_NAME]")
@click.option("--manifests", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="a directory of Kubernetes YAML/JSON (else the API server)")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="a kubeconfig (default: in-cluster config in a pod, else $KUBECONFIG)")
@click.option("--context", default=None, help="kubeconfig context")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--ca-address", default="nodeagent-ca.nodeagent.svc:15012", show_default=True,
              help="the mesh CA, `nodeagent ca` (HOST:PORT)")
@click.option("--ca-token-file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="the token the CA authenticates this tunnel with: its projected ServiceAccount token "
                   "(audience nodeagent-ca), or a lab node token; read again for every request, as the "
                   "kubelet rotates it")
@click.option("--ca-root-file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="the mesh root certificate (root-cert.pem, the nodeagent-ca-root-cert ConfigMap)")
@click.option("--netns-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("/run/netns"),
              show_default=True, help="where the container runtime binds pod network namespaces")
@click.option("--netns-prefix", default="", help="only namespaces whose names start with this")
@click.option("--admin-address", default="127.0.0.1:15000", show_default=True, help="config dump (HOST:PORT)")
@click.option("--readiness-address", default="0.0.0.0:15021", show_default=True, help="/healthz/ready (HOST:PORT)")
@click.option("--metrics-address", default="0.0.0.0:15020", show_default=True,
              help="Prometheus /metrics, Istio's TCP metric names (HOST:PORT; empty: off)")
@click.option("--control-socket", default=None,
              help="the agent's control stream (unix socket): serve the pods it assigns; without it, serve "
                   "every enrolled pod of the node, namespaces found under --netns-dir")
@click.option("--no-policy-crds", is_flag=True,
              help="the cluster has no AuthorizationPolicy/PeerAuthentication CRDs: serve with no policies "
                   "(without it, inbound is refused and readiness fails until both kinds are listed)")
def ztunnel(node_name: str, manifests: Path | None, kubeconfig: str | None, context: str | None, trust_domain: str,
            ca_address: str, ca_token_file: Path, ca_root_file: Path, netns_dir: Path, netns_prefix: str,
            admin_address: str, readiness_address: str, metrics_address: str, control_socket: str | None,
            no_policy_crds: bool) -> None:
    """Run the node tunnel: HBONE (mTLS) for every enrolled pod of this node, until SIGTERM."""
    from nodeagent.ca.service import request_certificate
    from nodeagent.daemon.tunnel import TunnelOptions, TunnelProcess, run_forever

    admin, readiness, metrics = _host_port(admin_address), _host_port(readiness_address), _host_port(metrics_address)
    if admin[1] is None or readiness[1] is None:
        raise click.BadParameter("the admin and readiness endpoints cannot be turned off")
    try:
        root_pem = ca_root_file.read_text()
        ca_token_file.read_text()
    except OSError as exc:
        raise click.ClickException(f"tunnel credentials: {exc}") from exc
    _daemon_logging()

    def fetch(identity: Any, key: Any) -> list[str]:
        # Read per request: the kubelet rotates a projected token on disk; no restart needed.
        return request_certificate(ca_address, ca_token_file.read_text().strip(), identity, key, root_pem)

    def make_source(sink: Any) -> Any:
        if manifests is not None:
            from nodeagent.cluster.discovery.manifests import ManifestSource

            return ManifestSource(manifests, sink)
        from nodeagent.cluster.discovery.kubernetes import CORE_KINDS, MESH_KINDS, ApiConnection, KubernetesSource

        # Every node's pods: the tunnel checks the identity of destinations on other nodes.
        return KubernetesSource(ApiConnection.from_config(kubeconfig, context), sink, node_name, all_pods=True,
                                kinds=CORE_KINDS if no_policy_crds else CORE_KINDS + MESH_KINDS)

    options = TunnelOptions(node=node_name, trust_domain=trust_domain, netns_dir=netns_dir, netns_prefix=netns_prefix,
                            admin=(admin[0], admin[1]), readiness=(readiness[0], readiness[1]),
                            metrics=None if metrics[1] is None else (metrics[0], metrics[1]),
                            control_socket=control_socket, no_policy_crds=no_policy_crds)
    run_forever(TunnelProcess(options, fetch, make_source))


@main.command("ca")
@click.option("--ca-dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="the CA's files: root-cert.pem, ca-cert.pem, ca-key.pem (Istio's plug-in CA names; the "
                   "mounted nodeagent-ca Secret)")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--address", default="0.0.0.0:15012", show_default=True, help="gRPC over TLS (HOST:PORT)")
@click.option("--monitoring-address", default="0.0.0.0:15014", show_default=True,
              help="/metrics and /ready (HOST:PORT; empty: off)")
@click.option("--dns-name", "dns_names", multiple=True, default=("nodeagent-ca", "nodeagent-ca.nodeagent.svc"),
              show_default=True, help="names in the CA endpoint's own certificate (repeat the option)")
@click.option("--serving-cert-ttl", type=click.IntRange(min=10), default=43200, show_default=True,
              help="seconds the endpoint's own certificate is valid; renewed at half its life")
@click.option("--max-workload-ttl", type=click.IntRange(min=60), default=86400, show_default=True,
              help="seconds at most a workload certificate is valid")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="a kubeconfig (default: in-cluster config in a pod, else $KUBECONFIG)")
@click.option("--context", default=None, help="kubeconfig context")
@click.option("--manifests", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="lab/dev: the pods from a directory of Kubernetes YAML/JSON instead of the API server")
@click.option("--audience", default="nodeagent-ca", show_default=True,
              help="the audience tunnels' projected tokens must be for")
@click.option("--tunnel-service-account", default="nodeagent/nodeagent-ztunnel", show_default=True,
              help="NAMESPACE/NAME: the only ServiceAccount whose tokens are accepted")
@click.option("--review-cache-ttl", type=click.FloatRange(min=0, max=300), default=60.0, show_default=True,
              help="seconds an accepted TokenReview is reused (never past the token's expiry)")
@click.option("--token-file-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="lab/dev authenticator: DIR/<node> holds that node's static token, and no TokenReview is "
                   "made; nothing then proves where a caller runs: never in a cluster")
def ca(ca_dir: Path, trust_domain: str, address: str, monitoring_address: str, dns_names: tuple[str, ...],
       serving_cert_ttl: int, max_workload_ttl: int, kubeconfig: str | None, context: str | None,
       manifests: Path | None, audience: str, tunnel_service_account: str, review_cache_ttl: float,
       token_file_dir: Path | None) -> None:
    """Run the mesh CA: the only holder of the signing key; signs a tunnel's CSRs for the identities of pods
    on the tunnel's own node, after a TokenReview of its projected token. Until SIGTERM."""
    import datetime as dt

    from nodeagent.ca.identity import IdentityError
    from nodeagent.ca.server import CaOptions, CaServer, PodIndex, load_ca, run_until_stopped
    from nodeagent.ca.service import CaMetrics

    namespace, _, account = tunnel_service_account.partition("/")
    if not namespace or not account or "/" in account:
        raise click.BadParameter(f"{tunnel_service_account!r} is not NAMESPACE/NAME",
                                 param_hint="--tunnel-service-account")
    monitoring = _host_port(monitoring_address)
    try:
        authority = load_ca(ca_dir, trust_domain)
    except IdentityError as exc:
        raise click.ClickException(f"mesh CA: {exc}") from exc
    _daemon_logging()
    metrics = CaMetrics()
    connection: Any = None
    if manifests is None or token_file_dir is None:
        from nodeagent.cluster.discovery.tokenreview import ReviewConnection

        connection = ReviewConnection.connect(kubeconfig, context)
    if token_file_dir is not None:
        from nodeagent.ca.auth import StaticTokens

        authenticator: Any = StaticTokens(token_file_dir)
    else:
        from nodeagent.ca.auth import TokenReviewAuthenticator

        authenticator = TokenReviewAuthenticator(connection, audience, (namespace, account),
                                                 cache_ttl=review_cache_ttl, metrics=metrics)

    def make_source(sink: Any) -> Any:
        if manifests is not None:
            from nodeagent.cluster.discovery.manifests import ManifestSource

            return ManifestSource(manifests, sink)
        from nodeagent.cluster.discovery.kubernetes import KubernetesSource
        from nodeagent.cluster.model import Kind

        # Every node's pods, and nothing else: which identities each node runs.
        return KubernetesSource(connection, sink, "", kinds=(Kind.POD,), all_pods=True)

    options = CaOptions(address=address, monitoring=None if monitoring[1] is None else (monitoring[0], monitoring[1]),
                        max_ttl=dt.timedelta(seconds=max_workload_ttl),
                        serving_ttl=dt.timedelta(seconds=serving_cert_ttl), dns_names=dns_names)
    try:
        run_until_stopped(CaServer(options, authority, authenticator, PodIndex(make_source), metrics))
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(f"mesh CA: {exc}") from exc


@main.command()
@source_options
@click.option("--format", "output", type=click.Choice(["save", "list", "restore"]), default="save", show_default=True,
              help="save: as iptables-save prints it; list: as iptables -L -n; restore: our iptables-restore input")
@click.option("--table", type=click.Choice(["nat", "filter"]), default=None, help="one table only")
@click.option("--cluster-cidr", default=None, help="as for run (a lab's pod range by default)")
@click.option("--masquerade-all", is_flag=True)
@click.option("--diff", is_flag=True, help="compare with the live tables of the node (root); exit 1 on drift")
@click.option("--netns", default=None, help="the node's network namespace for --diff (a lab node's by default)")
def chains(kubeconfig: str | None, context: str | None, manifests: Path | None, source_lab: str | None,
           node_name: str | None, output: str, table: str | None, cluster_cidr: str | None, masquerade_all: bool,
           diff: bool, netns: str | None) -> None:
    """Print the iptables rules the agent would program on a node (no root needed), or diff them with the kernel."""
    import difflib

    from nodeagent.daemon.agent import AgentOptions, proxy_config
    from nodeagent.kernel.netfilter import Iptables, IptablesError, detect_backend, supports_random_fully
    from nodeagent.service.iptables.formats import format_list, format_save, node_tables, ours_only
    from nodeagent.service.iptables.render import render

    if source_lab is not None:
        from nodeagent.lab import lab as labs
        from nodeagent.lab.agents import cluster_cidr as lab_cluster_cidr
        from nodeagent.lab.errors import LabError

        try:
            the_lab = labs.load(source_lab)
        except LabError as exc:
            raise click.ClickException(str(exc)) from exc
        cluster_cidr = cluster_cidr if cluster_cidr is not None else lab_cluster_cidr(the_lab)
        node_name = node_name or "node1"
        netns = netns or the_lab.plan.node(node_name).netns
    state = read_snapshot(kubeconfig, context, manifests, source_lab, node_name)
    options = AgentOptions(node_name=state.node_name, cluster_cidrs=_cidrs(cluster_cidr or ""),
                           masquerade_all=masquerade_all, random_fully=supports_random_fully())
    rendered = render(state.service_ports, state.endpoints, proxy_config(options, state, ()))
    views = [v for v in node_tables(rendered) if v.name in ((table,) if table else ("filter", "nat"))]
    if output == "restore":
        text = "".join(t.text() for t in (rendered.filter, rendered.nat) if table in (None, t.name))
    elif output == "list":
        text = "\n".join(format_list(v) for v in views)
    else:
        text = format_save(views)
    if not diff:
        click.echo(text, nl=False)
        return
    try:
        ipt = Iptables(detect_backend(netns), netns)
        live = "".join(ipt.save(v.name) for v in views)
    except (IptablesError, OSError) as exc:
        raise click.ClickException(f"reading the live tables{f' of {netns}' if netns else ''}: {exc}") from exc
    drift = list(difflib.unified_diff(ours_only(live), ours_only(format_save(views)), "kernel", "expected",
                                      lineterm=""))
    if drift:
        click.echo("\n".join(drift))
        sys.exit(1)
    click.echo(f"no drift: the kernel{f' of {netns}' if netns else ''} holds exactly the expected rules")


@main.command()
@click.option("--pod", "pod_ref", default=None, help="the pod: NAME (with -n) or NAMESPACE/NAME (without it and "
              "--service: every pod of the node)")
@click.option("-n", "--namespace", default=None, help="the pod's namespace [default]")
@click.option("--service", default=None, help="NAMESPACE/NAME[:PORT]: only its paths (with --pod), or its "
              "frontends on the node (alone)")
@source_options
@click.option("--control-socket", default=None,
              help="the agent's control socket [/run/nodeagent/control.sock; the node's with --lab]")
@click.option("--netns-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("/run/netns"),
              show_default=True, help="where pod network namespaces are")
@click.option("--netns-prefix", default="", help="only pod namespaces whose names start with this")
@click.option("--bpf-scope", default="host", show_default=True,
              help="the agent's --bpf-scope (a lab node's with --lab)")
@click.option("--pod-cgroup-parent", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="as the agent's (eBPF-mode capture; a lab node's cgroup with --lab)")
@click.option("-o", "--output", type=click.Choice(["human", "json", "yaml"]), default="human", show_default=True)
def inspect(pod_ref: str | None, namespace: str | None, service: str | None, kubeconfig: str | None,
            context: str | None, manifests: Path | None, source_lab: str | None, node_name: str | None,
            control_socket: str | None, netns_dir: Path, netns_prefix: str, bpf_scope: str,
            pod_cgroup_parent: Path | None, output: str) -> None:
    """Show one pod as its node sees it: identity, enrollment, datapath, capture as installed (rules with
    counters, or eBPF programs and map entries), the tunnel's view, the Services' translation paths, and every
    difference between desired and live state (marked !!; exit 3 when there is any). Without --pod: a Service's
    frontends (--service), or every pod of the node. Read-only."""
    from nodeagent.inspect.gather import InspectError, inspect_node, inspect_pod, inspect_service
    from nodeagent.inspect.output import node_text, service_text
    from nodeagent.inspect.output import render as render_report
    from nodeagent.mesh.iptables.apply import RedirectError

    target, _ = _inspect_target(pod_ref, namespace, kubeconfig, context, manifests, source_lab, node_name,
                                control_socket, netns_dir, netns_prefix, bpf_scope, pod_cgroup_parent)
    try:
        if pod_ref is None and service is not None:
            paths = inspect_service(target, service)
            click.echo(service_text(paths, output), nl=False)
            sys.exit(3 if any(p.live == "missing" for p in paths) else 0)
        if pod_ref is None:
            reports = inspect_node(target)
            click.echo(node_text(target.node, reports, output), nl=False)
            sys.exit(3 if any(r.drifted for r in reports) else 0)
        report = inspect_pod(target, pod_ref, namespace, service)
    except (InspectError, RedirectError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(render_report(report, output), nl=False)
    sys.exit(3 if report.drifted else 0)


def _inspect_target(pod_ref: str | None, namespace: str | None, kubeconfig: str | None, context: str | None,
                    manifests: Path | None, source_lab: str | None, node_name: str | None, control_socket: str | None,
                    netns_dir: Path, netns_prefix: str, bpf_scope: str, pod_cgroup_parent: Path | None
                    ) -> tuple[Any, str]:
    """Where the pod's node keeps its parts (a lab's node: the pod's own unless --node), and the node's address."""
    from nodeagent.inspect.gather import InspectError, Target, find_pod

    node_netns, cidrs, address = None, "", ""
    if source_lab is not None:
        from nodeagent.lab import cgroups
        from nodeagent.lab import lab as labs
        from nodeagent.lab.agents import cluster_cidr
        from nodeagent.lab.agents import control_socket as lab_socket
        from nodeagent.lab.errors import LabError

        try:
            the_lab = labs.load(source_lab)
            if node_name is None and pod_ref is not None:  # the pod's own node
                first = read_snapshot(None, None, None, source_lab, None)
                node_name = find_pod(first, pod_ref, namespace).node_name or "node1"
            node_name = node_name or "node1"
            plan = the_lab.plan.node(node_name)
        except (LabError, InspectError) as exc:
            raise click.ClickException(str(exc)) from exc
        node_netns, cidrs, address = plan.netns, cluster_cidr(the_lab), str(plan.node.address)
        control_socket = control_socket or str(lab_socket(the_lab, node_name))
        netns_prefix, bpf_scope = f"{source_lab}-pod-", f"{source_lab}-{node_name}"
        pod_cgroup_parent = cgroups.path_of(plan.cgroup)
    state = read_snapshot(kubeconfig, context, manifests, source_lab, node_name)
    return Target(state, state.node_name, node_netns, control_socket or "/run/nodeagent/control.sock", bpf_scope,
                  netns_dir, netns_prefix, pod_cgroup_parent, _cidrs(cidrs)), address


@main.command()
@click.option("--from", "source", required=True, help="the source pod: NAMESPACE/NAME (or NAME with -n)")
@click.option("-n", "--namespace", default=None, help="the source pod's namespace [default]")
@click.option("--to", "destination", required=True, help="HOST:PORT the pod connects to (a Service or pod address)")
@click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--probe", is_flag=True, help="also send the real connection (lab only) and confirm the prediction "
                                            "from where it ended and the counters that moved; exit 3 if not")
@source_options
@click.option("--control-socket", default=None,
              help="the agent's control socket, for the datapath mode [/run/nodeagent/control.sock; a lab node's]")
@click.option("--bpf-scope", default="host", show_default=True, help="the agent's --bpf-scope (a lab node's)")
@click.option("-o", "--output", type=click.Choice(["human", "json"]), default="human", show_default=True)
def trace(source: str, namespace: str | None, destination: str, proto: str, probe: bool, kubeconfig: str | None,
          context: str | None, manifests: Path | None, source_lab: str | None, node_name: str | None,
          control_socket: str | None, bpf_scope: str, output: str) -> None:
    """Predict the path of one new connection from a pod, step by step (capture or not, which rule or map entry,
    the candidates and their chances, which tunnel, the policy verdict), from the datapath's own functions."""
    import dataclasses

    from nodeagent.inspect import probe as probing
    from nodeagent.inspect.gather import InspectError, datapath_mode, find_pod, service_paths
    from nodeagent.inspect.trace import TraceError, TraceInput, predict, to_text
    from nodeagent.mesh.annotations import capture_options

    host, _, port = destination.rpartition(":")
    if not port.isdigit() or not host:
        raise click.BadParameter(f"{destination!r} is not HOST:PORT", param_hint="--to")
    if probe and source_lab is None:
        raise click.UsageError("--probe runs the connection in a lab pod: give --lab")
    target, address = _inspect_target(source, namespace, kubeconfig, context, manifests, source_lab, node_name,
                                      control_socket, Path("/run/netns"), "", bpf_scope, None)
    try:
        pod = find_pod(target.snapshot, source, namespace)
        if pod.node_name != target.node:
            raise InspectError(f"pod {pod.ref.key} runs on node {pod.node_name}, not {target.node}")
        mode = datapath_mode(target)
        options, _ = capture_options(pod.ref.key, pod.annotations)
        given = TraceInput(pod.ref.key, host, int(port), proto, mode, service_paths(target, mode),
                           tuple(str(ip) for ip in (target.snapshot.node.internal_ips if target.snapshot.node
                                                    else ())), options)
        predicted = predict(target.snapshot, target.node, given)
    except (InspectError, TraceError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    result = None
    if probe:
        assert target.node_netns is not None and source_lab is not None
        from nodeagent.lab import lab as labs

        plan = labs.load(source_lab).plan

        def node_of(name: str) -> tuple[str, str]:
            return plan.node(name).netns, str(plan.node(name).node.address)

        result = probing.probe(predicted, probing.lab_sender(source_lab, pod.ref.key, destination, proto == "udp"),
                               target.node_netns, address, mode, node_of)
    if output == "json":
        click.echo(json.dumps({"trace": dataclasses.asdict(predicted), "mode": mode,
                               "probe": None if result is None else dataclasses.asdict(result)}, indent=2))
    else:
        click.echo(f"datapath: {mode}\n" + to_text(predicted) + ("" if result is None else probing.to_text(result)),
                   nl=False)
    sys.exit(3 if result is not None and not result.confirmed else 0)


@main.command()
@click.option("--iptables-backend", type=click.Choice(["auto", "nft", "legacy", "both"]), default="both",
              show_default=True)
@click.option("--netns", default=None, help="clean a node network namespace instead of this one")
@click.option("--bpf-scope", default="host", show_default=True, help="whose pinned eBPF maps and programs to remove")
@click.option("--cgroup", "cgroup_path", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="cgroup v2 directory to detach the eBPF programs from (as given to run --cgroup)")
@click.option("--pod-netns-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("/run/netns"),
              show_default=True, help="where pod network namespaces are: the mesh capture is removed from each")
@click.option("--pod-netns-prefix", default="", help="only pod namespaces whose names start with this")
def cleanup(iptables_backend: str, netns: str | None, bpf_scope: str, cgroup_path: Path | None,
            pod_netns_dir: Path, pod_netns_prefix: str) -> None:
    """Remove what either datapath and the mesh created: iptables chains and jump rules (as kube-proxy
    --cleanup), eBPF attachments and pins, the mesh capture in pod namespaces and the node's probe SNAT;
    nothing else."""
    from nodeagent.kernel.bpf import loader, tc
    from nodeagent.kernel.netfilter import Iptables, IptablesError, detect_backend, legacy_tables_exist
    from nodeagent.service.iptables import cleanup as iptables_cleanup

    try:
        detached = loader.detach(cgroup_path) if cgroup_path is not None else []
        for line in detached + tc.detach_tc(netns=netns) + loader.remove_pins(bpf_scope):
            click.echo(f"removed (ebpf) {line}")
    except (loader.BpfError, OSError) as exc:
        raise click.ClickException(f"cleanup (ebpf): {exc}") from exc

    if iptables_backend == "both":
        backends = ["nft"] + (["legacy"] if legacy_tables_exist(netns) else [])
    else:
        backends = [detect_backend(netns) if iptables_backend == "auto" else iptables_backend]
    for backend in backends:
        try:
            removed = iptables_cleanup.cleanup(Iptables(backend, netns))
        except (IptablesError, OSError) as exc:
            raise click.ClickException(f"cleanup ({backend}): {exc}") from exc
        for line in removed:
            click.echo(f"removed ({backend}) {line}")
    _cleanup_mesh(backends, netns, pod_netns_dir, pod_netns_prefix)


def _cleanup_mesh(backends: list[str], netns: str | None, pod_netns_dir: Path, pod_netns_prefix: str) -> None:
    """The mesh capture of every pod namespace that holds one, then the node's probe SNAT."""
    from nodeagent.kernel.podnetns import candidates
    from nodeagent.mesh.capture import CaptureStatus
    from nodeagent.mesh.iptables.apply import RedirectError, live_state, remove_capture, remove_probe_snat

    node = f"/run/netns/{netns}" if netns else None
    for backend in backends:
        try:
            for path in candidates(pod_netns_dir, pod_netns_prefix):
                if str(path) == node:
                    continue
                if live_state(str(path), backend=backend).status is not CaptureStatus.ABSENT:
                    remove_capture(str(path), backend=backend, pod=path.name)
                    click.echo(f"removed ({backend}) mesh capture in {path}")
            remove_probe_snat(node, backend=backend)
        except (RedirectError, OSError) as exc:
            raise click.ClickException(f"cleanup (mesh, {backend}): {exc}") from exc


@main.group(hidden=True)
def workload() -> None:
    """The lab's pod workload (echo server and client)."""


@workload.command("serve")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--udp-port", type=int, default=None)
def workload_serve(port: int, udp_port: int | None) -> None:
    """Echo server answering with its pod name and the peer address it saw."""
    from nodeagent.lab.workload import serve

    asyncio.run(serve(port, udp_port))


@workload.command("request")
@click.argument("target")
@click.option("--udp", is_flag=True)
@click.option("--message", default="hello", show_default=True)
@click.option("--timeout", type=float, default=5.0, show_default=True)
def workload_request(target: str, udp: bool, message: str, timeout: float) -> None:
    """Send one request to TARGET (ip:port) and print the JSON answer."""
    from nodeagent.lab.workload import request_tcp, request_udp

    host, _, port = target.rpartition(":")
    try:
        if udp:
            answer = request_udp(host, int(port), message, timeout)
        else:
            answer = asyncio.run(request_tcp(host, int(port), message, timeout))
    except (OSError, TimeoutError, ValueError) as exc:
        raise click.ClickException(f"{target}: {exc or type(exc).__name__}") from exc
    click.echo(json.dumps(answer))


@workload.command("idle")
def workload_idle() -> None:
    """Do nothing until terminated (a pod's main process)."""
    from nodeagent.lab.workload import idle

    idle()


if __name__ == "__main__":
    main()
