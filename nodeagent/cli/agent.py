"""`nodeagent run`: the node agent."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nodeagent.cli.options import (
    daemon_logging,
    parse_cidrs,
    parse_host_port,
    reported,
    source_options,
)
from nodeagent.errors import NodeAgentError


def _config_defaults(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """`run --config FILE`: the file's settings become the defaults, so flags (and $NODE_NAME) still win."""
    if value is None:
        return
    from nodeagent.config import read_config

    try:
        ctx.default_map = {**(ctx.default_map or {}), **read_config(value).run_defaults()}
    except (NodeAgentError, OSError) as exc:
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
    from nodeagent.daemon import run as agent_daemon
    from nodeagent.daemon.mesh import MeshOptions
    from nodeagent.daemon.sources import SourceOptions
    from nodeagent.state.sync import SyncSchedule

    if source_lab is not None:
        raise click.UsageError("--lab is for reading a lab from outside; the agent in a lab node uses --manifests")
    if node_name is None:
        raise click.UsageError("--node (or $NODE_NAME) is needed")
    try:
        SyncSchedule(min_sync_period, sync_period)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    options = agent_daemon.RunOptions(
        node_name=node_name, source=SourceOptions(manifests, kubeconfig, context),
        mode=agent_daemon.ModeRequest(mode), cgroup=cgroup_path, bpf_scope=bpf_scope,
        iptables_backend=iptables_backend, min_sync_period=min_sync_period, sync_period=sync_period,
        cluster_cidrs=parse_cidrs(cluster_cidr), masquerade_all=masquerade_all,
        nodeport_addresses=parse_cidrs(nodeport_addresses), healthz=parse_host_port(healthz_bind_address),
        metrics=parse_host_port(metrics_bind_address),
        mesh=MeshOptions(control_socket, netns_dir, netns_prefix, pod_cgroup_parent, tunnel_cgroup) if mesh else None)
    daemon_logging()
    with reported():
        sys.exit(agent_daemon.run(options))
