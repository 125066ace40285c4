"""`nodeagent ztunnel`: the node tunnel."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nodeagent.cli.options import daemon_logging, parse_host_port, reported


class WorkerCount(click.ParamType):  # type: ignore[type-arg]
    """A positive number of workers, or `auto` (None: every CPU available)."""

    name = "N|auto"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or (isinstance(value, int) and value > 0):
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return None
        if text.isdigit() and int(text) > 0:
            return int(text)
        self.fail(f"{value!r} is not a positive number of workers or `auto`", param, ctx)


WORKERS = WorkerCount()


@click.command()
@click.option("--node", "node_name", envvar="NODE_NAME", required=True, help="this node's name [$NODE_NAME]")
@click.option("--manifests", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="a directory of Kubernetes YAML/JSON (else the API server)")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="a kubeconfig (default: in-cluster config in a pod, else $KUBECONFIG)")
@click.option("--context", default=None, help="kubeconfig context")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--ca-address", default="nodeagent-ca.nodeagent.svc:15012", show_default=True,
              help="the mesh CA, `nodeagent ca` (HOST:PORT)")
@click.option("--ca-token-file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="the token the CA authenticates this tunnel with: its projected ServiceAccount token "
                   "(audience nodeagent-ca), or a lab node token; read again for every request, as the "
                   "kubelet rotates it")
@click.option("--ca-root-file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="the mesh root certificate (root-cert.pem, the nodeagent-ca-root-cert ConfigMap)")
@click.option("--netns-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("/run/netns"),
              show_default=True, help="where the container runtime binds pod network namespaces")
@click.option("--netns-prefix", default="", help="only namespaces whose names start with this")
@click.option("--admin-address", default="127.0.0.1:15000", show_default=True, help="config dump (HOST:PORT)")
@click.option("--readiness-address", default="0.0.0.0:15021", show_default=True, help="/healthz/ready (HOST:PORT)")
@click.option("--metrics-address", default="0.0.0.0:15020", show_default=True,
              help="Prometheus /metrics, Istio's TCP metric names (HOST:PORT; empty: off)")
@click.option("--readiness-socket", default=None, type=click.Path(dir_okay=False),
              help="also answer /healthz/ready on this unix socket (for an exec probe in the tunnel's container: "
                   "during a rollout two tunnels share the node's readiness port)")
@click.option("--control-socket", default=None,
              help="the agent's control stream (unix socket): serve the pods it assigns; without it, serve "
                   "every enrolled pod of the node, namespaces found under --netns-dir")
@click.option("--no-policy-crds", is_flag=True,
              help="the cluster has no AuthorizationPolicy/PeerAuthentication CRDs: serve with no policies "
                   "(without it, inbound is refused and readiness fails until both kinds are listed)")
@click.option("--workers", envvar="NODEAGENT_ZTUNNEL_WORKERS", type=WORKERS, default="auto", show_default=True,
              help="processes carrying connections, one core each (SO_REUSEPORT listeners in every pod, a "
                   "coordinator for the agent, the API and the CA); `auto`: every CPU this process may use "
                   "(affinity, capped by its cgroup's CPU quota); a number is capped the same way; 1: one "
                   "process, no coordinator [$NODEAGENT_ZTUNNEL_WORKERS]")
@click.option("--drain-deadline", envvar="NODEAGENT_ZTUNNEL_DRAIN_DEADLINE", type=click.FloatRange(0, 3600),
              default=5.0, show_default=True,
              help="seconds open connections get to finish after SIGTERM: the listeners close at once (a new "
                   "tunnel listening beside this one takes the new connections), HBONE peers get a GOAWAY, "
                   "and what is still open at the deadline is closed and counted; keep it under the pod's "
                   "terminationGracePeriodSeconds [$NODEAGENT_ZTUNNEL_DRAIN_DEADLINE]")
@click.option("--dns/--no-dns", "dns", envvar="NODEAGENT_ZTUNNEL_DNS", default=True, show_default=True,
              help="the DNS proxy: 127.0.0.1:15053 (UDP and TCP) in every served pod answers A/AAAA for "
                   "Services from the tunnel's tables and forwards the rest to the pod's resolver; the pod's port "
                   "53 is captured to it unless annotated nodeagent.io/dns-capture: \"false\" "
                   "[$NODEAGENT_ZTUNNEL_DNS]")
@click.option("--dns-upstream", "dns_upstreams", multiple=True, metavar="IP[:PORT]",
              help="where the DNS proxy forwards UDP questions it does not answer (and TCP ones not captured), "
                   "tried in order; repeat for several (default: the nameservers of this process's "
                   "/etc/resolv.conf, as ztunnel; UDP under REDIRECT keeps no original destination)")
@click.option("--cluster-domain", envvar="CLUSTER_DOMAIN", default="cluster.local", show_default=True,
              help="the cluster's DNS domain (the kubelet's clusterDomain) [$CLUSTER_DOMAIN]")
def ztunnel(node_name: str, manifests: Path | None, kubeconfig: str | None, context: str | None, trust_domain: str,
            ca_address: str, ca_token_file: Path, ca_root_file: Path, netns_dir: Path, netns_prefix: str,
            admin_address: str, readiness_address: str, metrics_address: str, readiness_socket: str | None,
            control_socket: str | None,
            no_policy_crds: bool, workers: int | None, drain_deadline: float, dns: bool,
            dns_upstreams: tuple[str, ...], cluster_domain: str) -> None:
    """Run the node tunnel: HBONE (mTLS) for every enrolled pod of this node, until SIGTERM."""
    from nodeagent.daemon import tunnel
    from nodeagent.daemon.sources import SourceOptions
    from nodeagent.daemon.workers import available_cpus, worker_count
    from nodeagent.tunnel.dns.server import parse_upstream

    admin, readiness = parse_host_port(admin_address), parse_host_port(readiness_address)
    metrics = parse_host_port(metrics_address)
    if admin[1] is None or readiness[1] is None:
        raise click.BadParameter("the admin and readiness endpoints cannot be turned off")
    try:
        upstreams = tuple(parse_upstream(text) for text in dns_upstreams)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--dns-upstream") from exc
    options = tunnel.TunnelOptions(node=node_name, trust_domain=trust_domain, netns_dir=netns_dir,
                                   netns_prefix=netns_prefix, admin=(admin[0], admin[1]),
                                   readiness=(readiness[0], readiness[1]),
                                   metrics=None if metrics[1] is None else (metrics[0], metrics[1]),
                                   readiness_socket=readiness_socket, control_socket=control_socket,
                                   no_policy_crds=no_policy_crds,
                                   workers=worker_count(workers, available_cpus()), drain_deadline=drain_deadline,
                                   dns=dns, dns_upstreams=upstreams, cluster_domain=cluster_domain.rstrip("."),
                                   log_level=click.get_current_context().find_root().params.get("log_level")
                                   or "info")
    credentials = tunnel.CaCredentials(ca_address, ca_token_file, ca_root_file)
    daemon_logging()
    with reported():
        sys.exit(tunnel.main(options, credentials, SourceOptions(manifests, kubeconfig, context)))
