"""`nodeagent ca`: the mesh CA process. The signing key, the pods of the cluster, the gRPC endpoint.

One process holds the key (Istio's plug-in CA files, a mounted Secret); tunnels reach it over TLS on
:15012 with their projected ServiceAccount token. It keeps no state of its own besides caches: the pods
come from a watch (or, in the lab, a manifests directory), identities are decided per request. So it
scales out as istiod does: several replicas mounting the same key Secret behind one Service, any of
them answers any tunnel.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import structlog
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nodeagent.ca.identity import CertificateAuthority, IdentityError
from nodeagent.ca.service import (
    SERVICE_NAME,
    Authenticator,
    CaMetrics,
    CertificateService,
    ServingCertificate,
    pods_in,
    serve,
)
from nodeagent.cluster.events import Sink
from nodeagent.cluster.model import Kind
from nodeagent.observability.http import RouteServer
from nodeagent.state.tracker import ChangeTracker, Snapshot

log = structlog.get_logger("nodeagent.ca")

CA_FILES = ("root-cert.pem", "ca-cert.pem", "ca-key.pem")


class Source(Protocol):
    """A source of cluster objects (KubernetesSource, ManifestSource)."""

    def start(self) -> object: ...

    def stop(self) -> None: ...


class PodIndex:
    """Every pod of the cluster as the CA sees it: one source into a change tracker (pods only matter)."""

    def __init__(self, make_source: Callable[[Sink], Source]) -> None:
        self.tracker = ChangeTracker("")
        self.source = make_source(self.tracker.apply)
        self.authorize = pods_in(self.current)

    def current(self) -> Snapshot | None:
        """The latest snapshot (built now if events arrived since the last)."""
        return self.tracker.snapshot() or self.tracker.last()

    def ready(self) -> bool:
        """Whether the pods have been listed completely once."""
        return self.tracker.synced((Kind.POD,))


def load_ca(directory: Path, trust_domain: str) -> CertificateAuthority:
    """The CA in `directory` (Istio's plug-in CA file names); never created here: the CA process only
    loads the key it is given, so there is exactly one, made once (daemonset/make-ca-secret.sh)."""
    missing = [name for name in CA_FILES if not (directory / name).is_file()]
    if missing:
        raise IdentityError(f"no CA in {directory}: {', '.join(missing)} missing (daemonset/make-ca-secret.sh makes "
                            "the Secret with root-cert.pem, ca-cert.pem and ca-key.pem)")
    return CertificateAuthority.load_or_create(directory, trust_domain)


@dataclass(frozen=True)
class CaOptions:
    """Where the CA listens and what it issues."""

    address: str = "0.0.0.0:15012"
    monitoring: tuple[str, int] | None = ("0.0.0.0", 15014)
    max_ttl: dt.timedelta = dt.timedelta(hours=24)
    serving_ttl: dt.timedelta = dt.timedelta(hours=12)
    dns_names: tuple[str, ...] = (SERVICE_NAME,)


class CaServer:
    """The CA's gRPC endpoint (TLS, rotating certificate), its pod index, /metrics and /ready."""

    def __init__(self, options: CaOptions, ca: CertificateAuthority, authenticator: Authenticator, pods: PodIndex,
                 metrics: CaMetrics) -> None:
        self.options, self.ca, self.pods, self.metrics = options, ca, pods, metrics
        self.service = CertificateService(ca, authenticator, pods.authorize, options.max_ttl, metrics)
        names = options.dns_names if SERVICE_NAME in options.dns_names else (SERVICE_NAME, *options.dns_names)
        self.serving = ServingCertificate(ca, names, options.serving_ttl, metrics=metrics)
        self._server: grpc.Server | None = None
        self._monitoring: RouteServer | None = None
        self.port = 0
        self.monitoring_port = 0

    def start(self) -> CaServer:
        """Start watching pods, listening for CSRs and serving /metrics and /ready."""
        self.pods.source.start()
        server, self.port = serve(self.service, self.options.address, self.serving)
        self._server = server
        if self.options.monitoring is not None:
            host, port = self.options.monitoring
            self._monitoring = RouteServer({"/metrics": self._metrics, "/ready": self._ready}, host, port,
                                           "ca-monitoring").start()
            self.monitoring_port = self._monitoring.port
        log.info("CA serving", address=self.options.address, port=self.port, monitoring=self.monitoring_port,
                 trust_domain=self.ca.trust_domain)
        return self

    def _metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)

    def _ready(self) -> tuple[int, str, bytes]:
        # Ready once the pods are listed: before that every request would be refused as UNAVAILABLE.
        ready = self.pods.ready()
        return 200 if ready else 503, "application/json", json.dumps({"ready": ready}).encode()

    def stop(self) -> None:
        """Stop listening (requests in flight get two seconds), then the pod source."""
        if self._monitoring is not None:
            self._monitoring.stop()
        if self._server is not None:
            self._server.stop(grace=2).wait()
        self.pods.source.stop()


def run_until_stopped(server: CaServer) -> None:
    """Run `server` until SIGTERM or SIGINT."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    try:
        stop.wait()
    finally:
        server.stop()
        log.info("CA stopped")
