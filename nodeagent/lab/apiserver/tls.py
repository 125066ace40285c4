"""The lab API server's certificates: a lab CA (what the kubeconfig trusts) and a serving certificate it
signs, with the server's addresses as subject alternative names (clients check the IP they dialled).

A CA plus a leaf, not one self-signed certificate: Go (kubectl) and OpenSSL both verify a chain to a
trusted root, and a leaf that is also a CA is refused by strict verifiers.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class ServingCredentials:
    """PEM of the CA certificate, and of the serving certificate and its key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def context(self) -> ssl.SSLContext:
        """A server-side TLS context (HTTP/1.1 only: kubectl asks for h2 by ALPN and falls back)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # load_cert_chain reads files only: a private temporary directory, removed at once.
        with tempfile.TemporaryDirectory() as directory:
            cert, key = Path(directory) / "tls.crt", Path(directory) / "tls.key"
            cert.write_bytes(self.cert_pem)
            key.write_bytes(self.key_pem)
            context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["http/1.1"])
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_credentials(hosts: Sequence[str]) -> ServingCredentials:
    """A new CA and a serving certificate for `hosts` (IP addresses or DNS names)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("nodeagent-lab-apiserver-ca")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + VALIDITY)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name("nodeagent-lab-apiserver")).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return ServingCredentials(ca.public_bytes(serialization.Encoding.PEM),
                              cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def load_or_make(directory: Path, hosts: Sequence[str]) -> ServingCredentials:
    """The credentials kept in `directory` (ca.crt, tls.crt, tls.key), made and written there if absent,
    so a restarted server keeps the certificate its kubeconfig trusts."""
    files = [directory / "ca.crt", directory / "tls.crt", directory / "tls.key"]
    if all(f.exists() for f in files):
        return ServingCredentials(*(f.read_bytes() for f in files))
    credentials = make_credentials(hosts)
    directory.mkdir(parents=True, exist_ok=True)
    for path, data in zip(files, (credentials.ca_pem, credentials.cert_pem, credentials.key_pem), strict=True):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    return credentials
