"""Workload identity: SPIFFE IDs, the mesh CA, CSRs and certificate checks. No I/O besides the CA's files.

- Identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service account>` (docs/security.md), carried as the
  single URI SAN of an ECDSA P-256 certificate, as Istio's workload certificates carry it.
- The CA (root + intermediate) is generated at first start and persisted, or loaded from files; leaf
  certificates are issued from CSRs with the requested TTL capped at a maximum, like Istio's
  `CreateCertificate`. Who may ask for which identity is decided by the caller (the gRPC service knows
  the node that asks and the pods scheduled there); `issue()` only checks the CSR itself.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeagent.errors import NodeAgentError

DEFAULT_TRUST_DOMAIN = "cluster.local"
MAX_LEAF_TTL = dt.timedelta(hours=24)
DEFAULT_LEAF_TTL = dt.timedelta(hours=24)
_SEGMENT = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9._]{0,253}[a-z0-9])?$")


# certificate and CRL signing only
_CA_USAGE = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)


class IdentityError(NodeAgentError):
    """A CSR, certificate or identity that cannot be accepted; the message says which field and why."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    """spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>."""

    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """The identity in `uri`; IdentityError naming what is wrong."""
        match = re.fullmatch(r"spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)", uri)
        if match is None:
            raise IdentityError(f"{uri!r} is not spiffe://<trust domain>/ns/<namespace>/sa/<service account>")
        domain, namespace, account = match.groups()
        if not _TRUST_DOMAIN.match(domain):
            raise IdentityError(f"{uri!r}: invalid trust domain {domain!r}")
        for what, value in (("namespace", namespace), ("service account", account)):
            if not _SEGMENT.match(value):
                raise IdentityError(f"{uri!r}: invalid {what} {value!r}")
        return cls(domain, namespace, account)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key, the key type of Istio's workload certificates."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR for `identity` (its only SAN), signed with `key`."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.trust_domain)]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                          critical=True)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def spiffe_id_of(certificate: x509.Certificate) -> SpiffeId:
    """The one SPIFFE ID a workload certificate names; IdentityError if it names none or several."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise IdentityError("certificate has no subjectAltName") from exc
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    if len(uris) != 1:
        raise IdentityError(f"certificate must name exactly one SPIFFE ID, names {len(uris)}")
    return SpiffeId.parse(uris[0])


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class CertificateAuthority:
    """Root and intermediate of one trust domain; issues workload certificates from CSRs."""

    trust_domain: str
    root: x509.Certificate
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey

    @classmethod
    def load_or_create(cls, directory: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        """Load root-cert.pem, ca-cert.pem, ca-key.pem from `directory` (Istio's plug-in CA file names),
        or create and persist them (keys 0600) when none exist."""
        root_path, cert_path = directory / "root-cert.pem", directory / "ca-cert.pem"
        key_path = directory / "ca-key.pem"
        if root_path.exists() or cert_path.exists() or key_path.exists():
            try:
                root = x509.load_pem_x509_certificate(root_path.read_bytes())
                intermediate = x509.load_pem_x509_certificate(cert_path.read_bytes())
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            except (OSError, ValueError) as exc:
                raise IdentityError(f"CA files in {directory} are incomplete or unreadable: {exc}") from exc
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise IdentityError(f"{key_path}: the CA key must be an EC key")
            return cls(trust_domain, root, intermediate, key)
        ca = cls.generate(trust_domain)
        directory.mkdir(parents=True, exist_ok=True)
        root_path.write_text(_pem(ca.root))
        cert_path.write_text(_pem(ca.intermediate))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(ca.intermediate_key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
        return ca

    @classmethod
    def generate(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        """A new self-signed root (10 years) and an intermediate it signs (5 years)."""
        now = dt.datetime.now(dt.UTC)
        root_key, intermediate_key = new_key(), new_key()
        root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                               x509.NameAttribute(NameOID.COMMON_NAME, "nodeagent root CA")])
        root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
                .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
                .add_extension(_CA_USAGE, critical=True)
                .sign(root_key, hashes.SHA256()))
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                          x509.NameAttribute(NameOID.COMMON_NAME, "nodeagent intermediate CA")])
        intermediate = (x509.CertificateBuilder().subject_name(name).issuer_name(root_name)
                        .public_key(intermediate_key.public_key()).serial_number(x509.random_serial_number())
                        .not_valid_before(now - dt.timedelta(minutes=5))
                        .not_valid_after(now + dt.timedelta(days=1825))
                        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                        .add_extension(_CA_USAGE, critical=True)
                        .sign(root_key, hashes.SHA256()))
        return cls(trust_domain, root, intermediate, intermediate_key)

    def issue(self, csr_pem: bytes, ttl: dt.timedelta | None = None, *,
              max_ttl: dt.timedelta = MAX_LEAF_TTL) -> tuple[SpiffeId, list[str]]:
        """Sign a workload CSR: (its identity, the chain leaf-first as PEM strings)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise IdentityError(f"csr: not a PEM certificate request: {exc}") from exc
        if not csr.is_signature_valid:
            raise IdentityError("csr: signature does not verify")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise IdentityError("csr: the key must be ECDSA P-256")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as exc:
            raise IdentityError("csr: no subjectAltName with a SPIFFE ID") from exc
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1 or san.get_values_for_type(x509.DNSName) or san.get_values_for_type(x509.IPAddress):
            raise IdentityError("csr: subjectAltName must hold exactly one URI, the SPIFFE ID")
        identity = SpiffeId.parse(uris[0])
        if identity.trust_domain != self.trust_domain:
            raise IdentityError(f"csr: trust domain {identity.trust_domain!r} is not {self.trust_domain!r}")
        lifetime = min(ttl or DEFAULT_LEAF_TTL, max_ttl)
        if lifetime <= dt.timedelta(0):
            raise IdentityError("csr: requested validity must be positive")
        now = dt.datetime.now(dt.UTC)
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([]))
                .issuer_name(self.intermediate.subject).public_key(key).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + lifetime)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                               critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.intermediate_key, hashes.SHA256()))
        return identity, [_pem(leaf), _pem(self.intermediate), _pem(self.root)]

    def issue_service(self, dns_name: str, key: ec.EllipticCurvePrivateKey,
                      ttl: dt.timedelta = dt.timedelta(days=30)) -> list[str]:
        """A server certificate for one of the agent's own services (the CA's gRPC endpoint), by DNS name."""
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
                .issuer_name(self.intermediate.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + ttl)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self.intermediate_key, hashes.SHA256()))
        return [_pem(cert), _pem(self.intermediate), _pem(self.root)]

    @property
    def root_pem(self) -> str:
        return _pem(self.root)


def rotation_due(certificate: x509.Certificate, now: dt.datetime | None = None) -> bool:
    """Whether a workload certificate is past half its life (when the tunnel renews it)."""
    now = now or dt.datetime.now(dt.UTC)
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return now >= start + (end - start) / 2
