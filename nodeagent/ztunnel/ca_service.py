"""The agent's CA as a gRPC service in the shape of Istio's IstioCertificateService.

A caller authenticates with its node's credential (`authorization: Bearer <token>`); it may obtain only
identities of pods scheduled on that node (the Kubernetes rule ztunnel relies on istiod to enforce). A
tunnel that asks for another node's workload identity is refused with PERMISSION_DENIED, naming both.
"""

from __future__ import annotations

import datetime as dt
import hmac
import os
import secrets
from collections.abc import Callable, Mapping
from concurrent import futures
from pathlib import Path

import grpc
import structlog

from nodeagent.api import ca_pb2, ca_pb2_grpc
from nodeagent.state import Snapshot
from nodeagent.ztunnel.identity import CertificateAuthority, IdentityError, SpiffeId, make_csr

log = structlog.get_logger("nodeagent.ztunnel.ca")

# (node name, identity) -> may that node's tunnel hold the identity?
Authorizer = Callable[[str, SpiffeId], bool]


def pods_on_node(pods: Mapping[str, set[tuple[str, str]]]) -> Authorizer:
    """An authorizer from node name -> {(namespace, service account)} of the pods scheduled there."""
    return lambda node, identity: (identity.namespace, identity.service_account) in pods.get(node, set())


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    """CreateCertificate over `ca`, for callers holding one of `tokens` (token -> node name)."""

    def __init__(self, ca: CertificateAuthority, tokens: Mapping[str, str], authorize: Authorizer,
                 max_ttl: dt.timedelta = dt.timedelta(hours=24)) -> None:
        self.ca, self.tokens, self.authorize, self.max_ttl = ca, dict(tokens), authorize, max_ttl

    def _node(self, context: grpc.ServicerContext) -> str | None:
        header = dict(context.invocation_metadata()).get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if isinstance(header, str) else ""
        for known, node in self.tokens.items():
            if token and hmac.compare_digest(known, token):
                return node
        return None

    def CreateCertificate(self, request: ca_pb2.IstioCertificateRequest,
                          context: grpc.ServicerContext) -> ca_pb2.IstioCertificateResponse:
        node = self._node(context)
        if node is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid node credential in `authorization`")
            raise AssertionError("abort raises")  # for the type checker: context.abort never returns
        ttl = dt.timedelta(seconds=request.validity_duration) if request.validity_duration > 0 else None
        try:
            requested = _identity_in(request.csr.encode())
            if not self.authorize(node, requested):
                log.warning("certificate refused", node=node, identity=str(requested))
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"node {node} runs no pod with identity {requested}")
            identity, chain = self.ca.issue(request.csr.encode(), ttl, max_ttl=self.max_ttl)
        except IdentityError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("certificate issued", node=node, identity=str(identity))
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)


def _identity_in(csr_pem: bytes) -> SpiffeId:
    from cryptography import x509

    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise IdentityError(f"csr: no SPIFFE ID to authorize: {exc}") from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError("csr: subjectAltName must hold exactly one URI, the SPIFFE ID")
    return SpiffeId.parse(uris[0])


SERVICE_NAME = "nodeagent-ca"  # the DNS SAN of the CA endpoint's own certificate


def serve(service: CertificateService, address: str) -> tuple[grpc.Server, int]:
    """Start the service on `address` (host:port, port 0 for any) over TLS with a certificate from the CA
    itself (clients trust the mesh root); returns the server and its port."""
    from cryptography.hazmat.primitives import serialization

    from nodeagent.ztunnel.identity import new_key

    key = new_key()
    chain = service.ca.issue_service(SERVICE_NAME, key)
    credentials = grpc.ssl_server_credentials([(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        "".join(chain[:-1]).encode())])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(service, server)
    port = server.add_secure_port(address, credentials)
    server.start()
    return server, port


def channel(address: str, root_pem: str) -> grpc.Channel:
    """A TLS channel to the CA, trusting only the mesh root and expecting the CA's service name."""
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root_pem.encode()),
                               options=(("grpc.ssl_target_name_override", SERVICE_NAME),))


def request_certificate(address: str, token: str, identity: SpiffeId, key: object, root_pem: str,
                        ttl: dt.timedelta | None = None, timeout: float = 10.0) -> list[str]:
    """The tunnel's side: a CSR for `identity` with `key`, sent with the node's credential over TLS."""
    with channel(address, root_pem) as channel_:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel_)
        try:
            response = stub.CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=make_csr(identity, key).decode(),  # type: ignore[arg-type]
                                               validity_duration=int(ttl.total_seconds()) if ttl else 0),
                metadata=(("authorization", f"Bearer {token}"),), timeout=timeout)
        except grpc.RpcError as exc:  # a one-line reason for logs and the admin dump, not grpc's repr
            raise CertificateRequestError(address, exc.code(), exc.details()) from exc
    return list(response.cert_chain)


class CertificateRequestError(Exception):
    """The CA did not issue a certificate (unreachable, refused, or the request was bad)."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"CA {address}: {code.name}: {details}")
        self.code, self.details = code, details


def node_token(path: Path) -> str:
    """The node's CA credential in `path`, created (random, mode 0600) when it does not exist yet.

    The agent serves its own node's tunnel only, so the credential never leaves the node: the agent
    and the tunnel share it through a node-local file.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if not token:
            raise IdentityError(f"{path}: the node's CA credential file is empty") from None
        return token
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def pods_in(snapshot: Callable[[], Snapshot | None]) -> Authorizer:
    """An authorizer over the agent's latest snapshot: the node runs a pod with the identity's namespace
    and service account (a pod that left no longer gets certificates)."""
    def authorize(node: str, identity: SpiffeId) -> bool:
        current = snapshot()
        return current is not None and any(
            pod.node_name == node and pod.ref.namespace == identity.namespace
            and pod.service_account == identity.service_account for pod in current.pods.values())
    return authorize
