"""The CA's gRPC service on loopback: node credentials, per-node identities, TTLs, bad CSRs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509

from nodeagent.ztunnel.ca_service import (
    CertificateRequestError,
    CertificateService,
    pods_on_node,
    request_certificate,
    serve,
)
from nodeagent.ztunnel.identity import CertificateAuthority, SpiffeId, new_key, spiffe_id_of

ECHO = SpiffeId("cluster.local", "demo", "echo")
CLIENT = SpiffeId("cluster.local", "demo", "client")


CA = CertificateAuthority.generate()
ROOT = CA.root_pem


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    service = CertificateService(CA, {"token-1": "node1", "token-2": "node2"},
                                 pods_on_node({"node1": {("demo", "client"), ("demo", "echo")},
                                               "node2": {("demo", "echo")}}))
    server, port = serve(service, "127.0.0.1:0")
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_a_node_gets_the_identity_of_a_pod_it_runs_with_the_ttl_asked_for(address: str) -> None:
    chain = request_certificate(address, "token-1", CLIENT, new_key(), ROOT, ttl=dt.timedelta(hours=2))
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert spiffe_id_of(leaf) == CLIENT and len(chain) == 3
    assert dt.timedelta(minutes=119) < leaf.not_valid_after_utc - leaf.not_valid_before_utc < dt.timedelta(hours=2,
                                                                                                          minutes=2)


def test_a_node_asking_for_another_nodes_identity_is_refused(address: str) -> None:
    with pytest.raises(CertificateRequestError) as refused:
        request_certificate(address, "token-2", CLIENT, new_key(), ROOT)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "node node2 runs no pod with identity spiffe://cluster.local/ns/demo/sa/client" in refused.value.details
    assert str(refused.value).startswith(f"CA {address}: PERMISSION_DENIED: node node2"), "one readable line"


def test_without_a_valid_node_credential_nothing_is_issued(address: str) -> None:
    with pytest.raises(CertificateRequestError) as refused:
        request_certificate(address, "guess", ECHO, new_key(), ROOT)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_malformed_csr_is_an_invalid_argument(address: str) -> None:
    from nodeagent.api import ca_pb2, ca_pb2_grpc
    from nodeagent.ztunnel.ca_service import channel as ca_channel

    with ca_channel(address, ROOT) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateCertificate(ca_pb2.IstioCertificateRequest(csr="not a csr"),
                                   metadata=(("authorization", "Bearer token-1"),), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_client_that_does_not_trust_the_mesh_root_cannot_talk_to_the_ca(address: str) -> None:
    stranger = CertificateAuthority.generate()
    with pytest.raises(CertificateRequestError) as refused:
        request_certificate(address, "token-1", CLIENT, new_key(), stranger.root_pem, timeout=3)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
