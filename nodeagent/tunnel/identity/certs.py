"""One workload's certificate over time: fetched, used for new TLS connections, renewed at half life.

A TLS connection keeps the certificate it was established with, so renewing never drops one; only new
connections (and new HBONE pools) pick up the new context. `fetch` is whatever obtains a chain for a
key (the CA's gRPC service in the agent, the CA object in tests).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
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
    fetch: Fetch | None  # None: installed by a coordinator (`install`), never fetched here
    clock: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.UTC))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    chain: list[str] = field(default_factory=list)
    leaf: x509.Certificate | None = None
    server: ssl.SSLContext | None = None
    client: ssl.SSLContext | None = None
    key: ec.EllipticCurvePrivateKey | None = None
    renewals: int = 0

    @classmethod
    def installed(cls, identity: SpiffeId, key_pem: bytes, chain: list[str]) -> WorkloadCertificate:
        """A certificate that holds what it is given and never fetches (a tunnel worker's)."""
        certificate = cls(identity, None)
        certificate.install(key_pem, chain)
        return certificate

    def refresh(self, *, force: bool = False) -> bool:
        """Renew when there is no certificate yet, it is past half life, or `force`; returns whether it did."""
        if self.fetch is None:
            # Installed: renewal is the coordinator's, which installs the next one (see `install`).
            if self.leaf is None:
                raise LookupError(f"no certificate installed for {self.identity}")
            return False
        with self._lock:
            if not force and self.leaf is not None and not rotation_due(self.leaf, self.clock()):
                return False
            key = new_key()
            leaf = self._use(key, self.fetch(self.identity, key))
        log.info("workload certificate", identity=str(self.identity), serial=f"{leaf.serial_number:x}",
                 expires=leaf.not_valid_after_utc.isoformat())
        return True

    def install(self, key_pem: bytes, chain: list[str]) -> None:
        """Use `key_pem` (PKCS#8, unencrypted) and `chain` (leaf first, root last) from now on: new handshakes
        and new pool connections take them, open connections keep theirs (as after a renewal)."""
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.identity}: a workload key is an EC key, not {type(key).__name__}")
        with self._lock:
            self._use(key, chain)

    def key_pem(self) -> bytes:
        """The current key as unencrypted PKCS#8 PEM, for a tunnel worker over its private socket only."""
        if self.key is None:
            raise LookupError(f"no certificate yet for {self.identity}")
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def _use(self, key: ec.EllipticCurvePrivateKey, chain: list[str]) -> x509.Certificate:
        root = chain[-1]
        self.server, self.client = server_context(chain, key, root), client_context(chain, key, root)
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        self.key, self.chain, self.leaf = key, chain, leaf
        self.renewals += 1
        return leaf

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


class Certificates(dict[SpiffeId, WorkloadCertificate]):
    """The certificates a tunnel holds, one per identity: pods sharing a service account share one (one CSR per
    identity, as ztunnel's cache). The single-process tunnel and the workers' coordinator both keep theirs here."""

    def __init__(self, fetch: Fetch) -> None:
        super().__init__()
        self.fetch = fetch

    def of(self, identity: SpiffeId) -> WorkloadCertificate:
        """The certificate of `identity`, made (not yet fetched) on first use."""
        certificate = self.get(identity)
        if certificate is None:
            certificate = self[identity] = WorkloadCertificate(identity, self.fetch)
        return certificate

    async def ready(self, identity: SpiffeId) -> WorkloadCertificate:
        """The certificate of `identity`, fetched or renewed if due (in a thread: the CA call blocks)."""
        certificate = self.of(identity)
        await asyncio.to_thread(certificate.refresh)
        return certificate

    async def renew(self) -> list[WorkloadCertificate]:
        """Renew every certificate past half life (in a thread); those renewed. One the CA cannot renew now is
        logged and keeps serving with its current certificate."""
        renewed = []
        for certificate in list(self.values()):
            try:
                if await asyncio.to_thread(certificate.refresh):
                    renewed.append(certificate)
            except Exception as exc:  # the CA may be down: keep serving with the current certificate
                log.warning("certificate renewal failed", identity=str(certificate.identity), reason=str(exc))
        return renewed
