"""`nodeagent ca`: the mesh CA."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nodeagent.cli.options import daemon_logging, parse_host_port, reported


@click.command("ca")
@click.option("--ca-dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="the CA's files: root-cert.pem, ca-cert.pem, ca-key.pem (Istio's plug-in CA names; the "
                   "mounted nodeagent-ca Secret)")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--address", default="0.0.0.0:15012", show_default=True, help="gRPC over TLS (HOST:PORT)")
@click.option("--monitoring-address", default="0.0.0.0:15014", show_default=True,
              help="/metrics and /ready (HOST:PORT; empty: off)")
@click.option("--dns-name", "dns_names", multiple=True, default=("nodeagent-ca", "nodeagent-ca.nodeagent.svc"),
              show_default=True, help="names in the CA endpoint's own certificate (repeat the option)")
@click.option("--serving-cert-ttl", type=click.IntRange(min=10), default=43200, show_default=True,
              help="seconds the endpoint's own certificate is valid; renewed at half its life")
@click.option("--max-workload-ttl", type=click.IntRange(min=60), default=86400, show_default=True,
              help="seconds at most a workload certificate is valid")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
              help="a kubeconfig (default: in-cluster config in a pod, else $KUBECONFIG)")
@click.option("--context", default=None, help="kubeconfig context")
@click.option("--manifests", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="lab/dev: the pods from a directory of Kubernetes YAML/JSON instead of the API server")
@click.option("--audience", default="nodeagent-ca", show_default=True,
              help="the audience tunnels' projected tokens must be for")
@click.option("--tunnel-service-account", default="nodeagent/nodeagent-ztunnel", show_default=True,
              help="NAMESPACE/NAME: the only ServiceAccount whose tokens are accepted")
@click.option("--review-cache-ttl", type=click.FloatRange(min=0, max=300), default=60.0, show_default=True,
              help="seconds an accepted TokenReview is reused (never past the token's expiry)")
@click.option("--token-file-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="lab/dev authenticator: DIR/<node> holds that node's static token, and no TokenReview is "
                   "made; nothing then proves where a caller runs: never in a cluster")
def ca(ca_dir: Path, trust_domain: str, address: str, monitoring_address: str, dns_names: tuple[str, ...],
       serving_cert_ttl: int, max_workload_ttl: int, kubeconfig: str | None, context: str | None,
       manifests: Path | None, audience: str, tunnel_service_account: str, review_cache_ttl: float,
       token_file_dir: Path | None) -> None:
    """Run the mesh CA: the only holder of the signing key; signs a tunnel's CSRs for the identities of pods
    on the tunnel's own node, after a TokenReview of its projected token. Until SIGTERM."""
    import datetime as dt

    from nodeagent.ca.server import CaOptions
    from nodeagent.daemon import ca as ca_daemon
    from nodeagent.daemon.sources import SourceOptions

    namespace, _, account = tunnel_service_account.partition("/")
    if not namespace or not account or "/" in account:
        raise click.BadParameter(f"{tunnel_service_account!r} is not NAMESPACE/NAME",
                                 param_hint="--tunnel-service-account")
    monitoring = parse_host_port(monitoring_address)
    server = CaOptions(address=address, monitoring=None if monitoring[1] is None else (monitoring[0], monitoring[1]),
                       max_ttl=dt.timedelta(seconds=max_workload_ttl),
                       serving_ttl=dt.timedelta(seconds=serving_cert_ttl), dns_names=dns_names)
    options = ca_daemon.CaRunOptions(ca_dir=ca_dir, tunnel_account=(namespace, account), trust_domain=trust_domain,
                                     server=server, source=SourceOptions(manifests, kubeconfig, context),
                                     audience=audience, review_cache_ttl=review_cache_ttl,
                                     token_file_dir=token_file_dir)
    daemon_logging()
    with reported():
        sys.exit(ca_daemon.main(options))
