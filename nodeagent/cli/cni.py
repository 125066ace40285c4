"""`nodeagent cni install|uninstall`: put nodeagent-cni into the node's CNI chain (the DaemonSet's
`cni-install` container) and take it out again."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click

from nodeagent.cli.options import daemon_logging, reported

CONF_DIR = click.option("--cni-conf-dir", type=click.Path(path_type=Path, file_okay=False),
                        default=Path("/host/etc/cni/net.d"), show_default=True,
                        help="the node's CNI configuration directory, as mounted here")
BIN_DIR = click.option("--cni-bin-dir", type=click.Path(path_type=Path, file_okay=False),
                       default=Path("/host/opt/cni/bin"), show_default=True,
                       help="the node's CNI plugin directory, as mounted here")


@click.group("cni")
def cni() -> None:
    """The CNI plugin that enrolls pods in the mesh as their sandbox is created."""


@cni.command("install")
@CONF_DIR
@BIN_DIR
@click.option("--host-root", type=click.Path(path_type=Path, file_okay=False), default=Path("/host"),
              show_default=True, help="the node's / as mounted here (the plugin runs on its python3)")
@click.option("--agent-socket", default="/run/nodeagent/cni.sock", show_default=True,
              help="the agent's --cni-socket, as the node sees it")
@click.option("--timeout", type=click.FloatRange(0, 600, min_open=True), default=30.0, show_default=True,
              help="seconds the plugin waits for the agent on ADD")
@click.option("--on-agent-unreachable", type=click.Choice(["fail", "allow"]), default="fail", show_default=True,
              help="when the agent does not answer: fail the sandbox (the kubelet retries; no enrolled pod runs "
                   "uncaptured) or let the pod start and be captured later")
@click.option("--watch", is_flag=True, help="keep the plugin chained (until SIGTERM): the network plugin may "
                                            "rewrite its configuration without it")
@click.option("--uninstall-on-exit", is_flag=True, help="with --watch: take the plugin out at SIGTERM")
def install(cni_conf_dir: Path, cni_bin_dir: Path, host_root: Path, agent_socket: str, timeout: float,
            on_agent_unreachable: str, watch: bool, uninstall_on_exit: bool) -> None:
    """Copy the plugin into the CNI bin directory and chain it last into the runtime's configuration."""
    from nodeagent.cni import install as installer
    from nodeagent.cni.conflist import PluginSettings

    paths = installer.Paths(cni_conf_dir, cni_bin_dir, host_root)
    settings = PluginSettings(agent_socket, timeout, on_agent_unreachable)
    daemon_logging()
    with reported():
        if not watch:
            click.echo(str(installer.install(paths, settings)))
            return
        stop = threading.Event()

        def stopping(_signum: int, _frame: FrameType | None) -> None:
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stopping)
        installer.watch(paths, settings, stop)
        if uninstall_on_exit:
            installer.uninstall(paths)
        sys.exit(0)


@cni.command("uninstall")
@CONF_DIR
@BIN_DIR
def uninstall(cni_conf_dir: Path, cni_bin_dir: Path) -> None:
    """Take the plugin out of every CNI configuration that has it, and remove it from the bin directory."""
    from nodeagent.cni import install as installer

    daemon_logging()
    with reported():
        for path in installer.uninstall(installer.Paths(cni_conf_dir, cni_bin_dir)):
            click.echo(str(path))
