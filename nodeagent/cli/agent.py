"""`nodeagent run`: the node agent."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nodeagent.cli.options import (
    config_option,
    daemon_logging,
    parse_host_port,
    proxy_options,
    proxy_settings,
    reported,
    source_options,
)


@click.command()
@config_option
@click.option("--mode", type=click.Choice(["auto", "ebpf", "nftables", "iptables"]), default="auto",
              show_default=True, help="service datapath; auto: eBPF, else nftables where the kernel has it, else "
                                      "iptables (with the reasons logged)")
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
@proxy_options
@click.option("--random-fully/--no-random-fully", default=None,
              help="MASQUERADE --random-fully [default: when this node's iptables has it, as kube-proxy]")
@click.option("--conntrack-tcp-be-liberal", "tcp_be_liberal", type=click.BOOL, default=False, show_default=True,
              help="set net.netfilter.nf_conntrack_tcp_be_liberal=1 (then no INVALID drop rule, as kube-proxy)")
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
@click.option("--tunnel-cgroup", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="eBPF-mode capture: the node tunnel's cgroup, where the original-destination hook goes "
                   "(default: this process's cgroup, as in the lab)")
@click.option("--kubelet-cgroup-root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="eBPF-mode capture: the cgroup v2 root under which the kubelet makes pods' cgroups (the host's "
                   "as mounted here; a lab node's cgroup); pods' cgroups are found by pod UID (systemd or cgroupfs "
                   "driver). Without it the mesh captures with iptables in every mode")
@click.option("--cni-socket", default=None,
              help="serve nodeagent-cni on this unix socket (with --mesh): the plugin announces each pod sandbox "
                   "at creation and waits until the pod is captured, so its first connection already is")
def run(mode: str, cgroup_path: Path | None, bpf_scope: str, kubeconfig: str | None, context: str | None,
        manifests: Path | None, source_lab: str | None, node_name: str | None, min_sync_period: float,
        sync_period: float, cluster_cidr: str, masquerade_all: bool, masquerade_bit: int,
        localhost_nodeports: bool, nodeport_addresses: str, bind_address: str, random_fully: bool | None,
        tcp_be_liberal: bool, iptables_backend: str, healthz_bind_address: str, metrics_bind_address: str, mesh: bool,
        control_socket: str, netns_dir: Path,
        netns_prefix: str, tunnel_cgroup: Path | None,
        kubelet_cgroup_root: Path | None, cni_socket: str | None) -> None:
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
        proxy=proxy_settings(cluster_cidr, masquerade_all, masquerade_bit, localhost_nodeports, nodeport_addresses,
                             bind_address),
        random_fully=random_fully, conntrack_tcp_be_liberal=tcp_be_liberal,
        healthz=parse_host_port(healthz_bind_address),
        metrics=parse_host_port(metrics_bind_address),
        mesh=MeshOptions(control_socket, netns_dir, netns_prefix, tunnel_cgroup, cni_socket,
                         kubelet_cgroup_root) if mesh else None)
    daemon_logging()
    with reported():
        sys.exit(agent_daemon.run(options))
