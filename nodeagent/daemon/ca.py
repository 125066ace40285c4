"""`nodeagent ca` assembled: the CA's keys, the authenticator (TokenReview of the tunnels' projected tokens,
or static lab tokens), the index of every pod from the chosen source, and the gRPC server. Runs until SIGTERM."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.ca.auth import StaticTokens, TokenReviewAuthenticator
from nodeagent.ca.identity import IdentityError
from nodeagent.ca.server import CaOptions, CaServer, PodIndex, load_ca, run_until_stopped
from nodeagent.ca.service import CaMetrics
from nodeagent.cluster.events import Sink
from nodeagent.cluster.model import Kind
from nodeagent.daemon.errors import StartError
from nodeagent.daemon.sources import Source, SourceOptions, source_factory


@dataclass(frozen=True)
class CaRunOptions:
    """The flags of `nodeagent ca`, parsed."""

    ca_dir: Path  # root-cert.pem, ca-cert.pem, ca-key.pem
    tunnel_account: tuple[str, str]  # (namespace, name): the only ServiceAccount whose tokens are accepted
    trust_domain: str = "cluster.local"
    server: CaOptions = field(default_factory=CaOptions)
    source: SourceOptions = field(default_factory=SourceOptions)
    audience: str = "nodeagent-ca"
    review_cache_ttl: float = 60.0
    token_file_dir: Path | None = None  # lab/dev: static node tokens, no TokenReview


def main(options: CaRunOptions) -> int:
    """Run the mesh CA until SIGTERM or SIGINT; the exit status. Raises StartError when its keys cannot be
    loaded or its endpoints cannot be served."""
    try:
        authority = load_ca(options.ca_dir, options.trust_domain)
    except IdentityError as exc:
        raise StartError(f"mesh CA: {exc}") from exc
    metrics = CaMetrics()
    source = options.source
    connection = None
    if source.manifests is None or options.token_file_dir is None:
        from nodeagent.cluster.discovery.tokenreview import ReviewConnection

        connection = ReviewConnection.connect(source.kubeconfig, source.context)
    authenticator: StaticTokens | TokenReviewAuthenticator
    if options.token_file_dir is not None:
        authenticator = StaticTokens(options.token_file_dir)
    else:
        assert connection is not None  # made above whenever there is no static token directory
        authenticator = TokenReviewAuthenticator(connection, options.audience, options.tunnel_account,
                                                 cache_ttl=options.review_cache_ttl, metrics=metrics)
    if source.manifests is not None:
        make_source = source_factory(source, "")
    else:
        assert connection is not None

        def make_source(sink: Sink) -> Source:
            from nodeagent.cluster.discovery.kubernetes import KubernetesSource

            # Every node's pods, and nothing else: which identities each node runs (the review's connection).
            return KubernetesSource(connection, sink, "", kinds=(Kind.POD,), all_pods=True)

    try:
        run_until_stopped(CaServer(options.server, authority, authenticator, PodIndex(make_source), metrics))
    except (OSError, RuntimeError) as exc:
        raise StartError(f"mesh CA: {exc}") from exc
    return 0
