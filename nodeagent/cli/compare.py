"""`nodeagent compare-modes`: per Service port, what would behave differently if a node switched between the
iptables and the eBPF datapath (service/compare.py decides; this prints)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from nodeagent.cli.options import read_snapshot, source_options


@click.command("compare-modes")
@source_options
@click.option("--masquerade-all", is_flag=True, help="as for run: every Service packet is masqueraded")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def compare_modes(kubeconfig: str | None, context: str | None, manifests: Path | None, source_lab: str | None,
                  node_name: str | None, masquerade_all: bool, as_json: bool) -> None:
    """Per Service port of a node: what serves its traffic from outside in eBPF mode (tc, or kube-proxy's
    iptables rules where tc lacks what the port needs, and why) and what would behave differently after a
    switch between iptables and eBPF mode (source addresses, affinity). No root needed."""
    from nodeagent.service.compare import compare_modes as compare
    from nodeagent.service.compare import format_comparison
    from nodeagent.service.config import ProxySettings, proxy_config

    state = read_snapshot(kubeconfig, context, manifests, source_lab, node_name)
    config = proxy_config(state.node_name, ProxySettings(masquerade_all=masquerade_all), state, ())
    node_ips = config.nodeport_ips if config.nodeport_ips is not None else (
        (config.node_ip,) if config.node_ip is not None else ())
    ports = compare(state.service_ports, state.endpoints, node_ips=node_ips, node_labels=config.node_labels,
                    masquerade_all=config.masquerade_all)
    if as_json:
        click.echo(json.dumps([p.document() for p in ports], indent=2))
    else:
        click.echo(format_comparison(ports), nl=False)
