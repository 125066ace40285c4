"""One workload's certificate over time: fetched, used for new TLS connections, renewed at half life.

A TLS connection keeps the certificate it was established with, so renewing never drops one; only new
connections (and new HBONE pools) pick up the new context. `fetch` is whatever obtains a chain for a
key (the CA's gRPC service in the agent, the CA object in tests).
"""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.ca.identity import SpiffeId, new_key, rotation_due
from nodeagent.tunnel.identity.tls import client_context, server_context

log = structlog.get_logger("nodeagent.tunnel.identity.certs")

# (identity, key) -> chain, leaf first, root last
Fetch = Callable[[SpiffeId, ec.EllipticCurvePrivateKey], list[str]]


@dataclass
class WorkloadCertificate:
    """The current certificate of `identity` and the TLS contexts built from it."""

    identity: SpiffeId
    fetch: Fetch
    clock: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.UTC))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    chain: list[str] = field(default_factory=list)
    leaf: x509.Certificate | None = None
    server: ssl.SSLContext | None = None
    client: ssl.SSLContext | None = None
    renewals: int = 0

    def refresh(self, *, force: bool = False) -> bool:
        """Renew when there is no certificate yet, it is past half life, or `force`; returns whether it did."""
        with self._lock:
            if not force and self.leaf is not None and not rotation_due(self.leaf, self.clock()):
                return False
            key = new_key()
            chain = self.fetch(self.identity, key)
            root = chain[-1]
            self.server, self.client = server_context(chain, key, root), client_context(chain, key, root)
            self.chain, self.leaf = chain, x509.load_pem_x509_certificate(chain[0].encode())
            self.renewals += 1
        log.info("workload certificate", identity=str(self.identity), serial=f"{self.leaf.serial_number:x}",
                 expires=self.leaf.not_valid_after_utc.isoformat())
        return True

    def contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        """(server, client) contexts of the current certificate, renewing first if due."""
        self.refresh()
        assert self.server is not None and self.client is not None
        return self.server, self.client


def rotating_server_context(certificate: WorkloadCertificate) -> ssl.SSLContext:
    """A server context that hands every new handshake the certificate's *current* context.

    A listener is created with one SSLContext; the SNI callback runs on each handshake (also without
    SNI) and may swap the context, so a renewal reaches new connections while established ones keep
    theirs.
    """
    server, _ = certificate.contexts()

    def choose(tls: ssl.SSLObject, _name: str | None, _context: ssl.SSLContext) -> None:
        current, _ = certificate.contexts()
        tls.context = current

    server.sni_callback = choose
    return server
