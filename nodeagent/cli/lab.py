"""`nodeagent lab …` (the local lab) and the hidden `nodeagent workload …` (its pods' process)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from nodeagent.cli.options import (
    LAB_OPTION,
    daemon_logging,
    lab_errors,
)


@click.group()
def lab() -> None:
    """The local lab: nodes and pods as network namespaces and cgroups on this machine."""


@lab.command("up")
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@LAB_OPTION
@click.option("--dual-stack", is_flag=True, default=False,
              help="the default lab with IPv6 beside IPv4 (nodes, pods, a PreferDualStack Service)")
@lab_errors
def lab_up(directory: Path | None, lab_name: str, dual_stack: bool) -> None:
    """Create a lab from the Kubernetes manifests in DIRECTORY (the built-in default lab without one)."""
    from nodeagent.lab import lab as labs
    from nodeagent.lab.demo import describe

    created = labs.up(lab_name, directory, dual_stack=dual_stack)
    click.echo(describe(created))
    click.echo(f"manifests as the agent sees them: {created.record.manifests_path}")


@lab.command("agents")
@LAB_OPTION
@click.option("--mode", type=click.Choice(["auto", "ebpf", "iptables"]), default="auto", show_default=True)
@click.option("--mesh/--no-mesh", default=True, show_default=True,
              help="also run the node tunnel (`nodeagent ztunnel`) beside each agent")
@lab_errors
def lab_agents(lab_name: str, mode: str, mesh: bool) -> None:
    """Start `nodeagent run` (and the tunnel) on every node of the lab (stopped by `lab down`)."""
    from nodeagent.lab.agents import start_agents
    from nodeagent.lab.views import agents_summary

    for line in agents_summary(start_agents(lab_name, mode, mesh=mesh), mesh):
        click.echo(line)


@lab.command("down")
@LAB_OPTION
@lab_errors
def lab_down(lab_name: str) -> None:
    """Remove everything the lab created (also after a crash)."""
    from nodeagent.lab import lab as labs

    for line in labs.down(lab_name):
        click.echo(f"removed {line}")


@lab.command("status")
@LAB_OPTION
@lab_errors
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
@lab_errors
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
@click.option("--dual-stack", is_flag=True, default=False,
              help="the dual-stack default lab, and a dual-stack Service reached over IPv4 and IPv6")
@lab_errors
def lab_demo(lab_name: str, keep: bool, dual_stack: bool) -> None:
    """Bring up the default lab, show requests between pods on both nodes, tear it down."""
    from nodeagent.lab.demo import run_demo

    run_demo(lab_name, keep, click.echo, dual_stack=dual_stack)


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
@click.option("--service-cidr", default=None,
              help="give Services created through the API cluster IPs from it (IPv4[,IPv6] for dual-stack)")
def lab_apiserver(lab_name: str, address: str, port: int, directory: Path, manifests: Path | None, follow: bool,
                  service_cidr: str | None) -> None:
    """Serve the lab's Kubernetes API over HTTPS until SIGTERM (`lab up` runs it inside the lab)."""
    from nodeagent.lab.apiserver.process import serve
    from nodeagent.lab.families import ServiceCIDRs

    daemon_logging()
    serve(address, port, directory, manifests, name=lab_name, follow=follow,
          service_cidr=ServiceCIDRs.parse(service_cidr) if service_cidr else None)


@lab.command("kubeconfig")
@LAB_OPTION
@lab_errors
def lab_kubeconfig(lab_name: str) -> None:
    """Print the path of the kubeconfig of the lab's API server (usable inside the lab: see `lab kubectl`)."""
    from nodeagent.lab import lab as labs

    click.echo(labs.kubeconfig(lab_name))


@lab.command("kubectl", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@LAB_OPTION
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
@lab_errors
def lab_kubectl(lab_name: str, arguments: tuple[str, ...]) -> None:
    """Run kubectl against the lab's API server, inside the lab: `lab kubectl -- get svc -A`."""
    from nodeagent.lab import lab as labs

    sys.exit(labs.kubectl(lab_name, arguments).returncode)


@click.group(hidden=True)
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
    from nodeagent.lab.workload import request_tcp, request_udp, split_target

    try:
        host, port = split_target(target)
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
