"""`nodeagent snapshot`, `chains` and `cleanup`: what a node would program, and removing it."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import click

from nodeagent.cli.options import (
    config_option,
    parse_cidrs,
    proxy_options,
    proxy_settings,
    read_snapshot,
    reported,
    source_options,
)
from nodeagent.errors import NodeAgentError
from nodeagent.service.config import NFACCT_COUNTERS, ProxySettings
from nodeagent.state.tracker import Snapshot


@click.command()
@source_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def snapshot(kubeconfig: str | None, context: str | None, manifests: Path | None, source_lab: str | None,
             node_name: str | None, as_json: bool) -> None:
    """Show what the node would program: every Service port with its endpoints, and every rejection."""
    from nodeagent.state.describe import format_snapshot, snapshot_document

    state = read_snapshot(kubeconfig, context, manifests, source_lab, node_name)
    click.echo(json.dumps(snapshot_document(state), indent=2) if as_json else format_snapshot(state))


@dataclass(frozen=True)
class NodeFacts:
    """What `run` finds in a node's kernel at start and renders by (nothing, for an offline view)."""

    random_fully: bool = False
    nfacct_counters: frozenset[str] = frozenset()
    tcp_liberal: bool = False


def node_facts(netns: str | None) -> NodeFacts:
    """The kernel facts of the node in `netns` (this namespace when None), as `run` there found them."""
    from nodeagent.kernel import nfacct, sysctl
    from nodeagent.kernel.netfilter import supports_random_fully
    from nodeagent.kernel.netns import in_netns

    def read() -> NodeFacts:
        return NodeFacts(supports_random_fully(), nfacct.existing_counters(NFACCT_COUNTERS),
                         sysctl.enabled(sysctl.TCP_BE_LIBERAL))

    return read() if netns is None else in_netns(netns, read)


@click.command()
@config_option
@source_options
@click.option("--format", "output", type=click.Choice(["save", "list", "restore", "nft"]), default="save",
              show_default=True, help="save: as iptables-save prints it; list: as iptables -L -n; restore: our "
                                      "iptables-restore input; nft: the nftables mode's `kube-proxy` table as "
                                      "kube-proxy's nftables tests write it (also `nft -f` input)")
@click.option("--table", type=click.Choice(["nat", "filter"]), default=None, help="one table only")
@click.option("--cluster-cidr", default=None, help="as for run (a lab's pod range by default)")
@proxy_options
@click.option("--random-fully/--no-random-fully", default=None,
              help="MASQUERADE --random-fully [default: off; with --diff or --lab, as the node's iptables]")
@click.option("--nfacct-counter", "nfacct_counters", multiple=True, type=click.Choice(NFACCT_COUNTERS),
              help="an nfacct counter the node has (repeatable) [default: none; with --diff or --lab, the "
                   "node's]")
@click.option("--conntrack-tcp-be-liberal", "tcp_be_liberal", type=click.BOOL, default=None,
              help="the node has nf_conntrack_tcp_be_liberal set: no INVALID drop rule [default: false; with "
                   "--diff or --lab, as the node]")
@click.option("--family", type=click.Choice(["ipv4", "ipv6"]), default=None,
              help="one IP family's rules: IPv4 (iptables) or IPv6 (ip6tables) [default: both, each under its own "
                   "header; IPv4 alone, without header, when no Service has an IPv6 cluster IP]")
@click.option("--diff", is_flag=True, help="compare with the live tables of the node (root; ip6tables-save for IPv6); "
                                           "exit 1 on drift")
@click.option("--netns", default=None, help="the node's network namespace for --diff (a lab node's by default)")
@click.option("--service-cidr", default="", help="Service CIDRs, comma-separated (nftables: traffic to an unallocated "
                                                 "address in them is dropped, as kube-proxy with ServiceCIDRs)")
def chains(kubeconfig: str | None, context: str | None, manifests: Path | None, source_lab: str | None,
           node_name: str | None, output: str, table: str | None, cluster_cidr: str | None, masquerade_all: bool,
           masquerade_bit: int, localhost_nodeports: bool, nodeport_addresses: str, bind_address: str,
           random_fully: bool | None, nfacct_counters: tuple[str, ...], tcp_be_liberal: bool | None,
           family: str | None, diff: bool, netns: str | None, service_cidr: str) -> None:
    """Print the iptables rules the agent would program on a node (no root needed), or diff them with the kernel.

    The output depends only on the cluster's state and the options, never on this machine, except for a node
    of this machine (--diff, --lab): the kernel facts not given (random-fully, nfacct counters, TCP liberal)
    are then the node's, as `run` there found them."""
    import difflib

    from nodeagent.kernel.netfilter import Iptables, detect_backend
    from nodeagent.service.config import proxy_config
    from nodeagent.service.iptables.formats import format_list, format_save, node_tables, ours_only
    from nodeagent.service.iptables.render import render

    if source_lab is not None:
        from nodeagent.lab import views as lab_views

        node_name = node_name or lab_views.DEFAULT_NODE
        with reported():
            view = lab_views.node_view(source_lab, node_name)
        cluster_cidr = cluster_cidr if cluster_cidr is not None else view.cluster_cidr
        netns = netns or view.netns
    state = read_snapshot(kubeconfig, context, manifests, source_lab, node_name)
    settings = proxy_settings(cluster_cidr or "", masquerade_all, masquerade_bit, localhost_nodeports,
                              nodeport_addresses, bind_address)
    settings = replace(settings, service_cidrs=parse_cidrs(service_cidr))
    if output == "nft":
        _nftables_chains(state, settings, family, diff, netns)
        return
    facts = NodeFacts()
    if diff:
        with reported(f"reading the node{f' {netns}' if netns else ''}: "):
            facts = node_facts(netns)
    elif source_lab is not None:
        try:
            facts = node_facts(netns)
        except (NodeAgentError, OSError) as exc:  # e.g. not root: the lab's view without its kernel's facts
            click.echo(f"note: {node_name}'s kernel cannot be read ({exc}): rendered without random-fully, "
                       "nfacct counters and TCP liberal", err=True)
    settings = replace(settings, random_fully=facts.random_fully if random_fully is None else random_fully,
                       nfacct_counters=frozenset(nfacct_counters) if nfacct_counters else facts.nfacct_counters,
                       conntrack_tcp_liberal=facts.tcp_liberal if tcp_be_liberal is None else tcp_be_liberal)
    # One proxier per family, as kube-proxy runs them. The family headers appear only when asked for a family or
    # when some Service has an IPv6 cluster IP: IPv4-only clusters keep the exact output they always had (scripts
    # and the golden comparisons diff it), and an IPv6 section of nothing but base chains would say nothing.
    has_ipv6 = any(6 in info.families for info in state.service_ports.values())
    families = [int(family[-1])] if family is not None else ([4, 6] if has_ipv6 else [4])
    headed = family is not None or has_ipv6
    texts: dict[int, str] = {}
    expected: dict[int, str] = {}
    for each in families:
        rendered = render(state.service_ports, state.endpoints,
                          proxy_config(state.node_name, settings, state, (), family=each))
        views = [v for v in node_tables(rendered) if v.name in ((table,) if table else ("filter", "nat"))]
        if output == "restore":
            text = "".join(t.text() for t in (rendered.filter, rendered.nat) if table in (None, t.name))
        elif output == "list":
            text = "\n".join(format_list(v) for v in views)
        else:
            text = format_save(views)
        texts[each] = (_header(each) if headed else "") + text
        expected[each] = format_save(views)
    if not diff:
        click.echo("".join(texts[each] for each in families), nl=False)
        return
    where = f" of {netns}" if netns else ""
    drifted = False
    for each in families:
        try:
            ipt = Iptables(detect_backend(netns), netns, ipv6=each == 6)
            live = "".join(ipt.save(name) for name in ((table,) if table else ("filter", "nat")))
        except (NodeAgentError, OSError) as exc:
            raise click.ClickException(f"reading the live {'ip6tables ' if each == 6 else ''}tables{where}: {exc}") \
                from exc
        drift = list(difflib.unified_diff(ours_only(live), ours_only(expected[each]), "kernel", "expected",
                                          lineterm=""))
        if drift:
            drifted = True
            click.echo((_header(each) if headed else "") + "\n".join(drift))
        elif headed:
            click.echo(f"no drift (IPv{each}): the kernel{where} holds exactly the expected {_TOOL[each]} rules")
        else:
            click.echo(f"no drift: the kernel{where} holds exactly the expected rules")
    if drifted:
        sys.exit(1)


_TOOL = {4: "iptables", 6: "ip6tables"}


def _nftables_chains(state: Snapshot, settings: ProxySettings, family: str | None, diff: bool,
                     netns: str | None) -> None:
    """`chains --format nft`: each family's `kube-proxy` table as kube-proxy's tests write it (in their sort
    order), or with --diff the difference from the table the kernel holds, element by element."""
    import difflib

    from nodeagent.kernel.nftables import Nft
    from nodeagent.service.config import proxy_config
    from nodeagent.service.nftables import names as nft_names
    from nodeagent.service.nftables.listing import canonical_dump, parse_listing
    from nodeagent.service.nftables.render import render

    has_ipv6 = any(6 in info.families for info in state.service_ports.values())
    families = [int(family[-1])] if family is not None else ([4, 6] if has_ipv6 else [4])
    headed = family is not None or has_ipv6
    where = f" of {netns}" if netns else ""
    drifted = False
    for each in families:
        rendered = render(state.service_ports, state.endpoints,
                          proxy_config(state.node_name, settings, state, (), family=each))
        header = f"# IPv{each} (nftables)\n" if headed else ""
        if not diff:
            click.echo(header + rendered.dump(), nl=False)
            continue
        nft_family = "ip" if each == 4 else "ip6"
        try:
            listing = Nft(netns).list_table(nft_family, nft_names.TABLE)
        except (NodeAgentError, OSError) as exc:
            raise click.ClickException(f"reading the live nftables table{where}: {exc}") from exc
        live = canonical_dump(parse_listing(listing)) if listing is not None else []
        drift = list(difflib.unified_diff(live, canonical_dump(rendered.table), "kernel", "expected", lineterm=""))
        if drift:
            drifted = True
            click.echo(header + "\n".join(drift))
        else:
            click.echo(f"no drift{f' (IPv{each})' if headed else ''}: the kernel{where} holds exactly the expected "
                       f"table {nft_family} {nft_names.TABLE}")
    if drifted:
        sys.exit(1)


def _header(family: int) -> str:
    """The line that opens one family's section (a comment to iptables-restore and iptables-save readers)."""
    return f"# IPv{family} ({_TOOL[family]})\n"


@click.command()
@click.option("--iptables-backend", type=click.Choice(["auto", "nft", "legacy", "both"]), default="both",
              show_default=True)
@click.option("--netns", default=None, help="clean a node network namespace instead of this one")
@click.option("--bpf-scope", default="host", show_default=True, help="whose pinned eBPF maps and programs to remove")
@click.option("--cgroup", "cgroup_path", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="cgroup v2 directory to detach the eBPF programs from (as given to run --cgroup)")
@click.option("--pod-netns-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("/run/netns"),
              show_default=True, help="where pod network namespaces are: the mesh capture is removed from each")
@click.option("--pod-netns-prefix", default="", help="only pod namespaces whose names start with this")
def cleanup(iptables_backend: str, netns: str | None, bpf_scope: str, cgroup_path: Path | None,
            pod_netns_dir: Path, pod_netns_prefix: str) -> None:
    """Remove what any datapath and the mesh created: the nftables mode's kube-proxy tables, iptables chains and
    jump rules (as kube-proxy --cleanup), eBPF attachments and pins, the mesh capture in pod namespaces and the
    node's probe SNAT; nothing else."""
    from nodeagent.daemon.cleanup import CleanupOptions
    from nodeagent.daemon.cleanup import cleanup as clean_node

    options = CleanupOptions(iptables_backend, netns, bpf_scope, cgroup_path, pod_netns_dir, pod_netns_prefix)
    with reported():
        for line in clean_node(options):
            click.echo(line)
