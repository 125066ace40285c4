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

from nodeagent.cluster.model import IPNetwork
from nodeagent.errors import NodeAgentError
from nodeagent.observability.logs import configure_logging
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


def parse_host_port(value: str) -> tuple[str, int | None]:
    """HOST:PORT (host 0.0.0.0 when empty); "" or "0": off (port None)."""
    if value in ("", "0"):
        return "", None
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host or "0.0.0.0", int(port)
