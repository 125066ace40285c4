"""`nodeagent inspect` and `trace`: one pod, a Service or a connection as the node sees it (read-only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from nodeagent.cli.options import parse_cidrs, read_snapshot, reported, source_options
from nodeagent.errors import NodeAgentError

if TYPE_CHECKING:
    from nodeagent.inspect.gather import Target


@click.command()
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
@click.option("--kubelet-cgroup-root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="as the agent's (eBPF-mode capture; a lab node's cgroup with --lab)")
@click.option("-o", "--output", type=click.Choice(["human", "json", "yaml"]), default="human", show_default=True)
def inspect(pod_ref: str | None, namespace: str | None, service: str | None, kubeconfig: str | None,
            context: str | None, manifests: Path | None, source_lab: str | None, node_name: str | None,
            control_socket: str | None, netns_dir: Path, netns_prefix: str, bpf_scope: str,
            kubelet_cgroup_root: Path | None, output: str) -> None:
    """Show one pod as its node sees it: identity, enrollment, datapath, capture as installed (rules with
    counters, or eBPF programs and map entries), the tunnel's view, the Services' translation paths, and every
    difference between desired and live state (marked !!; exit 3 when there is any). Without --pod: a Service's
    frontends (--service), or every pod of the node. Read-only."""
    from nodeagent.inspect.gather import inspect_node, inspect_pod, inspect_service
    from nodeagent.inspect.output import node_text, service_text
    from nodeagent.inspect.output import render as render_report

    target, _ = _inspect_target(pod_ref, namespace, kubeconfig, context, manifests, source_lab, node_name,
                                control_socket, netns_dir, netns_prefix, bpf_scope, kubelet_cgroup_root)
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
    except (NodeAgentError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(render_report(report, output), nl=False)
    sys.exit(3 if report.drifted else 0)


def _inspect_target(pod_ref: str | None, namespace: str | None, kubeconfig: str | None, context: str | None,
                    manifests: Path | None, source_lab: str | None, node_name: str | None, control_socket: str | None,
                    netns_dir: Path, netns_prefix: str, bpf_scope: str, kubelet_cgroup_root: Path | None
                    ) -> tuple[Target, str]:
    """Where the pod's node keeps its parts (a lab's node: the pod's own unless --node), and the node's address."""
    from nodeagent.inspect.gather import Target, find_pod

    node_netns, cidrs, address = None, "", ""
    if source_lab is not None:
        from nodeagent.lab import views

        with reported():
            if node_name is None and pod_ref is not None:  # the pod's own node
                first = read_snapshot(None, None, None, source_lab, None)
                node_name = find_pod(first, pod_ref, namespace).node_name or views.DEFAULT_NODE
            node_name = node_name or views.DEFAULT_NODE
            view = views.node_view(source_lab, node_name)
        node_netns, cidrs, address = view.netns, view.cluster_cidr, view.address
        control_socket = control_socket or str(view.control_socket)
        netns_prefix, bpf_scope, kubelet_cgroup_root = view.pod_netns_prefix, view.bpf_scope, view.kubelet_cgroup_root
    state = read_snapshot(kubeconfig, context, manifests, source_lab, node_name)
    return Target(state, state.node_name, node_netns, control_socket or "/run/nodeagent/control.sock", bpf_scope,
                  netns_dir, netns_prefix, kubelet_cgroup_root, parse_cidrs(cidrs)), address


@click.command()
@click.option("--from", "source", required=True, help="the source pod: NAMESPACE/NAME (or NAME with -n)")
@click.option("-n", "--namespace", default=None, help="the source pod's namespace [default]")
@click.option("--to", "destination", required=True, help="HOST:PORT the pod connects to (a Service or pod address; "
              "[IPV6]:PORT)")
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
    from nodeagent.inspect.trace import TraceInput, predict, to_text
    from nodeagent.mesh.annotations import capture_options

    host, _, port = destination.rpartition(":")
    if not port.isdigit() or not host:
        raise click.BadParameter(f"{destination!r} is not HOST:PORT", param_hint="--to")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise click.BadParameter(f"{destination!r}: write an IPv6 address in brackets, [IPV6]:PORT",
                                 param_hint="--to")
    host = host.removeprefix("[").removesuffix("]")
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
    except (NodeAgentError, ValueError, OSError) as exc:  # ValueError: a malformed address
        raise click.ClickException(str(exc)) from exc
    result = None
    if probe:
        assert target.node_netns is not None and source_lab is not None
        from nodeagent.lab import views

        with reported():
            node_of = views.node_locator(source_lab)
        result = probing.probe(predicted, probing.lab_sender(source_lab, pod.ref.key, destination, proto == "udp"),
                               target.node_netns, address, mode, node_of)
    if output == "json":
        click.echo(json.dumps({"trace": dataclasses.asdict(predicted), "mode": mode,
                               "probe": None if result is None else dataclasses.asdict(result)}, indent=2))
    else:
        click.echo(f"datapath: {mode}\n" + to_text(predicted) + ("" if result is None else probing.to_text(result)),
                   nl=False)
    sys.exit(3 if result is not None and not result.confirmed else 0)
