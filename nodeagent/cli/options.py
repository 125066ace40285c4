"""What several commands share: where the cluster state comes from, address and CIDR parsing, the lab
option, daemon logging."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from nodeagent.observability.logs import configure_logging

F = TypeVar("F", bound=Callable[..., Any])
LAB_OPTION = click.option("--lab", "lab_name", default="lab", envvar="NODEAGENT_LAB", show_default=True,
                          help="lab name: the prefix of all its namespaces and cgroups")


def lab_errors(func: F) -> F:
    """Turn lab errors into a one-paragraph message and exit status 1, not a traceback."""
    from nodeagent.lab.errors import LabError

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LabError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


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


def parse_cidrs(value: str) -> tuple[Any, ...]:
    import ipaddress

    try:
        return tuple(ipaddress.ip_network(part.strip()) for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def parse_host_port(value: str) -> tuple[str, int | None]:
    if value in ("", "0"):
        return "", None
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host or "0.0.0.0", int(port)
