"""Workload identity and the mesh CA, with real X.509 and a real TLS 1.3 handshake on loopback."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from nodeagent.ca.identity import (
    CertificateAuthority,
    IdentityError,
    SpiffeId,
    make_csr,
    new_key,
    rotation_due,
    spiffe_id_of,
)
from nodeagent.tunnel.identity.tls import client_context, expect_identity, peer_identity, server_context

ECHO = SpiffeId("cluster.local", "demo", "echo")
CLIENT = SpiffeId("cluster.local", "demo", "client")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


def workload(ca: CertificateAuthority, identity: SpiffeId, ttl: dt.timedelta | None = None) -> tuple[list[str], object]:
    key = new_key()
    issued, chain = ca.issue(make_csr(identity, key), ttl)
    assert issued == identity
    return chain, key


@pytest.mark.parametrize("uri", ["spiffe://cluster.local/ns/demo", "http://cluster.local/ns/a/sa/b",
                                 "spiffe://Cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/A/sa/b",
                                 "spiffe://cluster.local/ns/a/sa/b/extra"])
def test_malformed_spiffe_ids_are_refused(uri: str) -> None:
    with pytest.raises(IdentityError):
        SpiffeId.parse(uri)


def test_issued_certificates_carry_one_spiffe_id_and_chain_to_the_root(ca: CertificateAuthority) -> None:
    chain, _ = workload(ca, ECHO)
    leaf, intermediate, root = (x509.load_pem_x509_certificate(p.encode()) for p in chain)
    assert spiffe_id_of(leaf) == ECHO and str(ECHO) == "spiffe://cluster.local/ns/demo/sa/echo"
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    assert root == ca.root


def test_requested_ttl_is_honoured_up_to_the_maximum(ca: CertificateAuthority) -> None:
    short, _ = workload(ca, ECHO, dt.timedelta(hours=1))
    long, _ = workload(ca, ECHO, dt.timedelta(days=30))
    life = [x509.load_pem_x509_certificate(c[0].encode()) for c in (short, long)]
    lengths = [(c.not_valid_after_utc - c.not_valid_before_utc) for c in life]
    assert dt.timedelta(minutes=59) < lengths[0] < dt.timedelta(minutes=62)
    assert dt.timedelta(hours=23) < lengths[1] <= dt.timedelta(hours=24, minutes=1)


def test_csrs_that_are_not_one_workload_identity_of_this_domain_are_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(IdentityError, match="trust domain"):
        ca.issue(make_csr(SpiffeId("other.domain", "demo", "echo"), new_key()))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(ECHO))]), critical=True)
               .sign(rsa_key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization

    with pytest.raises(IdentityError, match="P-256"):
        ca.issue(rsa_csr.public_bytes(serialization.Encoding.PEM))
    two = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(ECHO)),
                                                       x509.DNSName("echo.demo")]), critical=True)
           .sign(new_key(), hashes.SHA256()))
    with pytest.raises(IdentityError, match="exactly one URI"):
        ca.issue(two.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(IdentityError, match="not a PEM"):
        ca.issue(b"-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n")


def test_the_ca_is_persisted_with_a_private_key_only_root_can_read(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path / "ca")
    again = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert again.root == first.root and again.intermediate == first.intermediate
    assert stat.S_IMODE((tmp_path / "ca" / "ca-key.pem").stat().st_mode) == 0o600
    (tmp_path / "ca" / "ca-cert.pem").unlink()
    with pytest.raises(IdentityError, match="incomplete"):
        CertificateAuthority.load_or_create(tmp_path / "ca")


def test_rotation_is_due_at_half_life(ca: CertificateAuthority) -> None:
    chain, _ = workload(ca, ECHO, dt.timedelta(hours=2))
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    start = leaf.not_valid_before_utc
    assert not rotation_due(leaf, start + dt.timedelta(minutes=50))
    assert rotation_due(leaf, start + dt.timedelta(minutes=62))


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[object, object, Exception | None]:
    """One TLS handshake over a socketpair; (server side peer identity or error, client ssl socket, error)."""
    left, right = socket.socketpair()
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(left, server_side=True) as tls:
                result["server"] = peer_identity(tls, "cluster.local")
                tls.recv(1)
        except (ssl.SSLError, OSError, IdentityError) as exc:
            result["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    error = None
    client = None
    try:
        client = client_ctx.wrap_socket(right)
        client.sendall(b"x")
    except (ssl.SSLError, OSError) as exc:
        error = exc
    thread.join(10)
    return result.get("server"), client, error


def test_mutual_tls_13_with_h2_and_spiffe_checks_both_ways(ca: CertificateAuthority) -> None:
    server_chain, server_key = workload(ca, ECHO)
    client_chain, client_key = workload(ca, CLIENT)
    server, client, error = handshake(server_context(server_chain, server_key, ca.root_pem),
                                      client_context(client_chain, client_key, ca.root_pem))
    assert error is None and server == CLIENT, (server, error)
    assert client.version() == "TLSv1.3" and client.selected_alpn_protocol() == "h2"
    expect_identity(client, ECHO)
    with pytest.raises(IdentityError, match="not the destination's"):
        expect_identity(client, SpiffeId("cluster.local", "demo", "other"))
    client.close()


def test_tls12_and_foreign_roots_are_refused(ca: CertificateAuthority) -> None:
    server_chain, server_key = workload(ca, ECHO)
    client_chain, client_key = workload(ca, CLIENT)
    old = client_context(client_chain, client_key, ca.root_pem)
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
    server, _, error = handshake(server_context(server_chain, server_key, ca.root_pem), old)
    assert isinstance(server, ssl.SSLError) and error is not None
    stranger = CertificateAuthority.generate()
    foreign_chain, foreign_key = workload(stranger, CLIENT)
    server, _, error = handshake(server_context(server_chain, server_key, ca.root_pem),
                                 client_context(foreign_chain, foreign_key, stranger.root_pem))
    assert isinstance(server, ssl.SSLError), "a client chain from another CA never completes the handshake"
