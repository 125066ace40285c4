"""What several commands share: where the cluster state comes from, address and CIDR parsing, the lab
option, daemon logging, and turning nodeagent's errors into one-paragraph messages."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

import click

from nodeagent.cluster.model import IPAddress, IPNetwork
from nodeagent.errors import NodeAgentError
from nodeagent.observability.logs import configure_logging
from nodeagent.service.config import ProxySettings
from nodeagent.state.tracker import Snapshot

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., object])
LAB_OPTION = click.option("--lab", "lab_name", default="lab", envvar="NODEAGENT_LAB", show_default=True,
                          help="lab name: the prefix of all its namespaces and cgroups")


@contextmanager
def reported(prefix: str = "") -> Iterator[None]:
    """nodeagent's errors (and the machine's) inside become a click error, "PREFIXmessage", exit status 1,
    not a traceback."""
    try:
        yield
    except (NodeAgentError, OSError) as exc:
        raise click.ClickException(f"{prefix}{exc}") from exc


def lab_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn lab errors into a one-paragraph message and exit status 1, not a traceback."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with reported():
            return func(*args, **kwargs)

    return wrapper


def daemon_logging() -> None:
    """Logging for the long-running commands: JSON lines, `info` unless --log-level says otherwise."""
    level = click.get_current_context().find_root().params.get("log_level")
    configure_logging(json=True, level=level or "info")


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
                  node_name: str | None) -> Snapshot:
    """One complete snapshot from the chosen source; a click error naming what is wrong otherwise."""
    chosen = [flag for flag, value in (("--kubeconfig", kubeconfig or context), ("--manifests", manifests),
                                       ("--lab", source_lab)) if value]
    if len(chosen) > 1:
        raise click.UsageError(f"choose one source, not {' and '.join(chosen)}")
    from nodeagent.state.once import snapshot_of_cluster, snapshot_of_manifests

    if source_lab is not None:
        from nodeagent.lab import views

        with reported():
            manifests = views.manifests_dir(source_lab)
        node_name = node_name or views.DEFAULT_NODE
    if node_name is None:
        raise click.UsageError("--node (or $NODE_NAME) is needed: which node's view to show")
    try:
        with reported():
            if manifests is not None:
                return snapshot_of_manifests(manifests, node_name)
            return snapshot_of_cluster(kubeconfig, node_name, context=context)
    except Exception as exc:  # the kubernetes client's config errors have no common base class
        if type(exc).__module__.startswith("kubernetes"):
            raise click.ClickException(f"Kubernetes configuration: {exc}") from exc
        raise


def parse_cidrs(value: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs (empty: none); a bad one is a usage error naming it."""
    try:
        return tuple(ipaddress.ip_network(part.strip()) for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _config_defaults(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """--config FILE: the file's settings become the defaults of this command's options, so flags (and
    $NODE_NAME) still win; a KubeProxyConfiguration's fields that nodeagent does not implement are named in
    one warning."""
    if value is None:
        return
    from nodeagent.config import read_config

    try:
        config = read_config(value)
    except (NodeAgentError, OSError) as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc
    for warning in config.warnings:
        click.echo(f"warning: {value}: {warning}", err=True)
    names = {p.name for p in ctx.command.params}
    defaults = {k: v for k, v in config.run_defaults().items() if k in names}
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


config_option = click.option(
    "--config", type=click.Path(path_type=Path, dir_okay=False), is_eager=True, expose_value=False,
    callback=_config_defaults, help="a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) or "
                                    "NodeAgentConfiguration YAML file; flags given here override it")


def proxy_options(func: F) -> F:
    """kube-proxy's flags that change the rules, shared by `run` and `chains` (kube-proxy's names)."""
    func = click.option("--bind-address", "--node-ip", "bind_address", default="0.0.0.0", show_default=True,
                        help="this node's IP when not 0.0.0.0 (as kube-proxy's: overrides the Node object's "
                             "address of its family)")(func)
    func = click.option("--nodeport-addresses", default="",
                        help="CIDRs of the node addresses NodePorts answer on, or 'primary' (the node's IPs); "
                             "empty: every address")(func)
    func = click.option("--iptables-localhost-nodeports", "localhost_nodeports", type=click.BOOL, default=True,
                        show_default=True, help="NodePorts answer on 127.0.0.0/8 too (sets route_localnet)")(func)
    func = click.option("--iptables-masquerade-bit", "masquerade_bit", type=click.IntRange(0, 31), default=14,
                        show_default=True, help="the fwmark bit of packets to masquerade")(func)
    func = click.option("--masquerade-all", type=click.BOOL, default=False, is_flag=False, flag_value=True,
                        help="masquerade all traffic to Service cluster IPs")(func)
    return func


def parse_nodeport_addresses(value: str) -> tuple[tuple[IPNetwork, ...], bool]:
    """--nodeport-addresses: the CIDRs, and whether it is `primary` (only alone, as kube-proxy's)."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if "primary" in parts:
        if len(parts) > 1:
            raise click.BadParameter("can't use both 'primary' and CIDRs", param_hint="--nodeport-addresses")
        return (), True
    try:
        return tuple(ipaddress.ip_network(part) for part in parts), False
    except ValueError as exc:
        raise click.BadParameter(f"must be a valid CIDR: {exc}", param_hint="--nodeport-addresses") from exc


def parse_bind_address(value: str) -> IPAddress | None:
    """--bind-address: an IP (empty: none)."""
    if not value:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an IP address", param_hint="--bind-address") from exc


def proxy_settings(cluster_cidr: str, masquerade_all: bool, masquerade_bit: int, localhost_nodeports: bool,
                   nodeport_addresses: str, bind_address: str) -> ProxySettings:
    """The proxy settings from `proxy_options` and --cluster-cidr (the kernel's facts are left out)."""
    cidrs, primary = parse_nodeport_addresses(nodeport_addresses)
    return ProxySettings(cluster_cidrs=parse_cidrs(cluster_cidr), masquerade_all=masquerade_all,
                         masquerade_bit=masquerade_bit, localhost_nodeports=localhost_nodeports,
                         nodeport_addresses=cidrs, nodeport_primary=primary,
                         bind_address=parse_bind_address(bind_address))


def parse_host_port(value: str) -> tuple[str, int | None]:
    """HOST:PORT (host 0.0.0.0 when empty); "" or "0": off (port None)."""
    if value in ("", "0"):
        return "", None
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host or "0.0.0.0", int(port)
