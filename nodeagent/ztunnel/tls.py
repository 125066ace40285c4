"""TLS for HBONE with the stdlib `ssl`: TLS 1.3 only, ALPN h2, mutual authentication against the mesh root.

The stdlib verifies the chain and the validity dates; what it cannot express, the SPIFFE checks, is done
right after the handshake on the peer's leaf: the client insists the server is the destination's
identity, the server takes the client's identity (same trust domain) and hands it to policy.
"""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.ztunnel.identity import IdentityError, SpiffeId, spiffe_id_of

ALPN = "h2"


def _context(purpose: ssl.Purpose, chain_pem: list[str], key: ec.EllipticCurvePrivateKey, root_pem: str
             ) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                             else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN])
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False  # no SNI, no DNS names: the SPIFFE ID is checked after the handshake
    context.load_verify_locations(cadata=root_pem)
    # ssl loads keys and chains from files only; a private temporary directory holds them for the call.
    with tempfile.TemporaryDirectory(prefix="nodeagent-tls-") as scratch:
        cert_file, key_file = Path(scratch) / "chain.pem", Path(scratch) / "key.pem"
        cert_file.write_text("".join(chain_pem[:-1]) if len(chain_pem) > 1 else chain_pem[0])
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_file.chmod(0o600)
        context.load_cert_chain(cert_file, key_file)
    return context


def server_context(chain_pem: list[str], key: ec.EllipticCurvePrivateKey, root_pem: str) -> ssl.SSLContext:
    """The HBONE server side (15008): client certificates required."""
    return _context(ssl.Purpose.CLIENT_AUTH, chain_pem, key, root_pem)


def client_context(chain_pem: list[str], key: ec.EllipticCurvePrivateKey, root_pem: str) -> ssl.SSLContext:
    """The HBONE client side: presents the workload's chain, verifies the server's against the root."""
    return _context(ssl.Purpose.SERVER_AUTH, chain_pem, key, root_pem)


def peer_identity(tls: ssl.SSLObject | ssl.SSLSocket, trust_domain: str) -> SpiffeId:
    """The verified peer's SPIFFE ID; IdentityError if ALPN is not h2 or the identity is foreign."""
    if tls.selected_alpn_protocol() != ALPN:
        raise IdentityError(f"ALPN must be {ALPN!r}, peer chose {tls.selected_alpn_protocol()!r}")
    der = tls.getpeercert(binary_form=True)
    if der is None:
        raise IdentityError("peer presented no certificate")
    identity = spiffe_id_of(x509.load_der_x509_certificate(der))
    if identity.trust_domain != trust_domain:
        raise IdentityError(f"peer identity {identity} is not in trust domain {trust_domain!r}")
    return identity


def expect_identity(tls: ssl.SSLObject | ssl.SSLSocket, expected: SpiffeId) -> None:
    """Client side: the server must be exactly the destination workload's identity."""
    found = peer_identity(tls, expected.trust_domain)
    if found != expected:
        raise IdentityError(f"server identity {found} is not the destination's {expected}")
