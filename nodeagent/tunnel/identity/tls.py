"""TLS for HBONE with the stdlib `ssl`: TLS 1.3 only, ALPN h2, mutual authentication against the mesh root.

The stdlib verifies the chain and the validity dates; what it cannot express, the SPIFFE checks, is done
right after the handshake on the peer's leaf: the client insists the server is the destination's
identity, the server takes the client's identity (same trust domain) and hands it to policy.

What the server refuses, and where (each with a `reason` for nodeagent_hbone_protocol_violations_total):
- in the handshake, by OpenSSL (`handshake_failure` names it): TLS below 1.3 (`tls_version`), no client
  certificate (`no_client_certificate`), a chain not from the mesh root (`certificate_untrusted`, e.g. a
  foreign trust domain's CA), a leaf past or before its validity (`certificate_expired`,
  `certificate_not_yet_valid`), a stalled handshake (`handshake_timeout`);
- right after it (`peer_identity` raises `PeerRefused`): ALPN other than h2 (`alpn`; OpenSSL completes a
  handshake without ALPN when the offers do not overlap, RFC 7301 3.2 lets the server decide), no or
  several SPIFFE IDs (`identity`), a SPIFFE ID of another trust domain signed by our root (`trust_domain`).
"""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.ca.identity import IdentityError, SpiffeId, spiffe_id_of

ALPN = "h2"

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) for the validity dates; every other failure is "untrusted".
_X509_V_ERR_CERT_NOT_YET_VALID, _X509_V_ERR_CERT_HAS_EXPIRED = 9, 10


class PeerRefused(IdentityError):
    """A verified TLS peer the tunnel still refuses; `reason` is the metric's label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def handshake_failure(exc: BaseException) -> str:
    """The `reason` label for a server-side handshake that failed with `exc` (OpenSSL's own reason codes;
    the same under asyncio and uvloop, both drive the stdlib's SSLObject)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return {_X509_V_ERR_CERT_HAS_EXPIRED: "certificate_expired",
                _X509_V_ERR_CERT_NOT_YET_VALID: "certificate_not_yet_valid"}.get(exc.verify_code,
                                                                                 "certificate_untrusted")
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED"):
            return "no_client_certificate"
        if reason in ("UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER", "TLSV1_ALERT_PROTOCOL_VERSION"):
            return "tls_version"
        return "tls_handshake"
    if isinstance(exc, TimeoutError) or (isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc)):
        return "handshake_timeout"  # asyncio's and uvloop's ssl_handshake_timeout abort with this text
    return "handshake_aborted"  # the peer went away mid-handshake (a scan, a reset)


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
    """The verified peer's SPIFFE ID; PeerRefused (an IdentityError) if ALPN is not h2 or the identity is
    missing or foreign. Also checks the TLS version: the contexts allow 1.3 only, this keeps it so should a
    context ever be built elsewhere (ztunnel, too, speaks TLS 1.3 only)."""
    if tls.version() != "TLSv1.3":
        raise PeerRefused("tls_version", f"TLS version must be TLSv1.3, peer negotiated {tls.version()!r}")
    if tls.selected_alpn_protocol() != ALPN:
        raise PeerRefused("alpn", f"ALPN must be {ALPN!r}, peer chose {tls.selected_alpn_protocol()!r}")
    der = tls.getpeercert(binary_form=True)
    if der is None:
        raise PeerRefused("no_client_certificate", "peer presented no certificate")
    try:
        identity = spiffe_id_of(x509.load_der_x509_certificate(der))
    except IdentityError as exc:
        raise PeerRefused("identity", str(exc)) from exc
    if identity.trust_domain != trust_domain:
        raise PeerRefused("trust_domain", f"peer identity {identity} is not in trust domain {trust_domain!r}")
    return identity


def expect_identity(tls: ssl.SSLObject | ssl.SSLSocket, expected: SpiffeId) -> None:
    """Client side: the server must be exactly the destination workload's identity."""
    found = peer_identity(tls, expected.trust_domain)
    if found != expected:
        raise IdentityError(f"server identity {found} is not the destination's {expected}")
