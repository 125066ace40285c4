"""The `nodeagent` command line: click only. Each command group has its module; what a command runs is
assembled in nodeagent.daemon (the long-running commands) or the job packages."""

from __future__ import annotations

import sys

import click

from nodeagent import __version__
from nodeagent.cli import ca as ca_commands
from nodeagent.cli import chains as chains_commands
from nodeagent.cli import cni as cni_commands
from nodeagent.cli import compare as compare_commands
from nodeagent.cli import doctor as doctor_commands
from nodeagent.cli import inspect as inspect_commands
from nodeagent.cli import lab as lab_commands
from nodeagent.cli import ztunnel as ztunnel_commands
from nodeagent.cli.agent import run
from nodeagent.observability.logs import configure_logging

__all__ = ["main", "run"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]),
              help="[default: info for `run` and `ztunnel`, warning otherwise]")
@click.option("--log-json", is_flag=True, help="JSON log lines (the default when stderr is not a terminal)")
def main(log_level: str | None, log_json: bool) -> None:
    """nodeagent: kube-proxy replacement and zero-trust mesh node agent."""
    configure_logging(json=log_json or not sys.stderr.isatty(), level=log_level or "warning")


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"nodeagent {__version__}")


for command in (doctor_commands.doctor, lab_commands.lab, lab_commands.workload, chains_commands.snapshot, run,
                ztunnel_commands.ztunnel, ca_commands.ca, chains_commands.chains, inspect_commands.inspect,
                inspect_commands.trace, chains_commands.cleanup, compare_commands.compare_modes, cni_commands.cni):
    main.add_command(command)


if __name__ == "__main__":
    main()
