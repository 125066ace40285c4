"""The mesh CA as a gRPC service in the shape of Istio's IstioCertificateService, and the tunnel's client.

The CA runs apart from the nodes (`nodeagent ca`, its own Deployment), as istiod does: no node holds the
signing key, so a compromised node cannot mint identities. A caller authenticates with a bearer token
(`authorization: Bearer <token>`); an `Authenticator` turns it into the node the caller runs on (the
TokenReview authenticator in a cluster, static tokens in the lab), and the caller may then obtain only
identities of pods scheduled on that node (the Kubernetes rule ztunnel relies on istiod to enforce).
Every refusal is a gRPC status naming why, a count in `nodeagent_ca_refusals_total{reason}` and a log
line naming the node and the identity.

The endpoint's own TLS certificate is issued by the CA and renewed at half its life: gRPC asks for the
current certificate before every new handshake (`dynamic_ssl_server_credentials`), so renewal needs no
restart and established connections keep theirs.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry, Counter

from nodeagent.ca.identity import CertificateAuthority, IdentityError, SpiffeId, make_csr, new_key
from nodeagent.cluster.model import Kind
from nodeagent.control.api import ca_pb2, ca_pb2_grpc
from nodeagent.errors import NodeAgentError
from nodeagent.state.tracker import Snapshot

log = structlog.get_logger("nodeagent.tunnel.ca")

SERVICE_NAME = "nodeagent-ca"  # a DNS SAN of the CA endpoint's own certificate, the name tunnels verify
SERVING_TTL = dt.timedelta(hours=12)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the node it runs on, and who it is (for logs)."""

    node: str
    principal: str


class Refused(NodeAgentError):
    """A request the CA will not serve: the gRPC status, a short reason (the metric label) and a message."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class Authenticator(Protocol):
    """Token -> the caller's node, or `Refused` (UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE)."""

    def authenticate(self, token: str) -> Caller: ...


# (node name, identity) -> may that node's tunnel hold the identity? May raise Refused (e.g. not synced).
Authorizer = Callable[[str, SpiffeId], bool]


def pods_on_node(pods: Mapping[str, set[tuple[str, str]]]) -> Authorizer:
    """An authorizer from node name -> {(namespace, service account)} of the pods scheduled there."""
    return lambda node, identity: (identity.namespace, identity.service_account) in pods.get(node, set())


_FINISHED = ("Succeeded", "Failed")  # a pod that has terminated holds no identity any more


class PodsIn:
    """An authorizer over the latest pod snapshot: the node runs a (not terminated) pod with the identity's
    namespace and service account, so a pod that left no longer gets certificates. Refuses with
    UNAVAILABLE until the pods have been listed once (the tunnel retries).

    The snapshot is indexed by node once per generation: a burst of requests does not rescan every pod.
    """

    def __init__(self, snapshot: Callable[[], Snapshot | None]) -> None:
        self.snapshot = snapshot
        self._lock = threading.Lock()
        self._generation = -1
        self._by_node: dict[str, frozenset[tuple[str, str]]] = {}

    def __call__(self, node: str, identity: SpiffeId) -> bool:
        current = self.snapshot()
        if current is None or not current.synced((Kind.POD,)):
            raise Refused(grpc.StatusCode.UNAVAILABLE, "pods_not_synced", "the CA has not listed the pods yet")
        with self._lock:
            if self._generation != current.generation:
                by_node: dict[str, set[tuple[str, str]]] = {}
                for pod in current.pods.values():
                    if pod.node_name and pod.phase not in _FINISHED:
                        by_node.setdefault(pod.node_name, set()).add((pod.ref.namespace, pod.service_account))
                self._by_node = {name: frozenset(ids) for name, ids in by_node.items()}
                self._generation = current.generation
            return (identity.namespace, identity.service_account) in self._by_node.get(node, frozenset())


def pods_in(snapshot: Callable[[], Snapshot | None]) -> Authorizer:
    """`PodsIn` over `snapshot` (the CA's pod index)."""
    return PodsIn(snapshot)


class CaMetrics:
    """The CA's counters, in their own registry (served on the CA's /metrics)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.issued = Counter("nodeagent_ca_certificates_issued", "Workload certificates issued",
                              registry=self.registry)
        self.refusals = Counter("nodeagent_ca_refusals", "Certificate requests refused, by reason", ["reason"],
                                registry=self.registry)
        self.reviews = Counter("nodeagent_ca_token_reviews", "Token authentications: TokenReviews sent to the API "
                               "server, or answered from the cache", ["result"], registry=self.registry)
        self.serving_renewals = Counter("nodeagent_ca_serving_certificate_renewals",
                                        "Renewals of the CA endpoint's own TLS certificate", registry=self.registry)


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    """CreateCertificate over `ca`, for callers `authenticator` accepts, of identities `authorize` allows."""

    def __init__(self, ca: CertificateAuthority, authenticator: Authenticator, authorize: Authorizer,
                 max_ttl: dt.timedelta = dt.timedelta(hours=24), metrics: CaMetrics | None = None) -> None:
        self.ca, self.authenticator, self.authorize, self.max_ttl = ca, authenticator, authorize, max_ttl
        self.metrics = metrics or CaMetrics()

    def CreateCertificate(self, request: ca_pb2.IstioCertificateRequest,
                          context: grpc.ServicerContext) -> ca_pb2.IstioCertificateResponse:
        caller: Caller | None = None
        requested: SpiffeId | None = None
        try:
            caller = self.authenticator.authenticate(_bearer(context))
            requested = _identity_in(request.csr.encode())
            if not self.authorize(caller.node, requested):
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, "identity_not_on_node",
                              f"node {caller.node} runs no pod with identity {requested}")
            ttl = dt.timedelta(seconds=request.validity_duration) if request.validity_duration > 0 else None
            identity, chain = self.ca.issue(request.csr.encode(), ttl, max_ttl=self.max_ttl)
        except IdentityError as exc:
            refusal = Refused(grpc.StatusCode.INVALID_ARGUMENT, "bad_csr", str(exc))
        except Refused as exc:
            refusal = exc
        else:
            self.metrics.issued.inc()
            log.info("certificate issued", node=caller.node, caller=caller.principal, identity=str(identity))
            return ca_pb2.IstioCertificateResponse(cert_chain=chain)
        self.metrics.refusals.labels(refusal.reason).inc()
        log.warning("certificate refused", node=caller.node if caller else None,
                    caller=caller.principal if caller else None, identity=str(requested) if requested else None,
                    code=refusal.code.name, reason=refusal.reason, message=refusal.message)
        context.abort(refusal.code, refusal.message)
        raise AssertionError("abort raises")  # for the type checker: context.abort never returns


def _bearer(context: grpc.ServicerContext) -> str:
    header = dict(context.invocation_metadata()).get("authorization", "")
    token = header.removeprefix("Bearer ").strip() if isinstance(header, str) and header.startswith("Bearer ") else ""
    if not token:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no_token", "no bearer token in `authorization`")
    return token


def _identity_in(csr_pem: bytes) -> SpiffeId:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise IdentityError(f"csr: no SPIFFE ID to authorize: {exc}") from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError("csr: subjectAltName must hold exactly one URI, the SPIFFE ID")
    return SpiffeId.parse(uris[0])


class ServingCertificate:
    """The CA endpoint's own certificate, renewed at half its life for the next handshake.

    `fetch` is gRPC's certificate_configuration_fetcher: called before every new TLS handshake, it
    returns a new configuration once the current certificate is past half its life (None: keep it).
    """

    def __init__(self, ca: CertificateAuthority, dns_names: Sequence[str] = (SERVICE_NAME,),
                 ttl: dt.timedelta = SERVING_TTL, clock: Callable[[], float] = time.time,
                 metrics: CaMetrics | None = None) -> None:
        self.ca, self.dns_names, self.ttl, self.clock = ca, tuple(dns_names), ttl, clock
        self.metrics = metrics
        self._lock = threading.Lock()
        self.configuration, self.serial, self.renew_at = self._issue()

    def _issue(self) -> tuple[grpc.ServerCertificateConfiguration, int, float]:
        key = new_key()
        chain = _serving_chain(self.ca, self.dns_names, key, self.ttl)
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        configuration = grpc.ssl_server_certificate_configuration([(pem_key, "".join(chain[:-1]).encode())])
        log.info("CA serving certificate issued", serial=f"{leaf.serial_number:x}", names=list(self.dns_names),
                 expires=leaf.not_valid_after_utc.isoformat())
        return configuration, leaf.serial_number, self.clock() + self.ttl.total_seconds() / 2

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A renewed configuration when the current one is past half its life, else None (keep it)."""
        with self._lock:
            if self.clock() < self.renew_at:
                return None
            try:
                self.configuration, self.serial, self.renew_at = self._issue()
            except Exception:  # never fail a handshake over a renewal: the current certificate still serves
                log.exception("CA serving certificate renewal failed")
                self.renew_at = self.clock() + 10.0
                return None
            if self.metrics is not None:
                self.metrics.serving_renewals.inc()
            return self.configuration

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that ask `fetch` before every handshake."""
        return grpc.dynamic_ssl_server_credentials(self.configuration, self.fetch)


def _serving_chain(ca: CertificateAuthority, names: Sequence[str], key: ec.EllipticCurvePrivateKey,
                   ttl: dt.timedelta) -> list[str]:
    """A server certificate for `names` (DNS SANs; the first is the subject), leaf first, as PEM strings.

    Valid from a minute ago (clocks of the CA and the nodes differ a little) until `ttl` from now; the
    renewal is due half of `ttl` after issuing.
    """
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.intermediate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + ttl)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca.intermediate_key, hashes.SHA256()))
    pem = [c.public_bytes(serialization.Encoding.PEM).decode() for c in (cert, ca.intermediate, ca.root)]
    return pem


def serve(service: CertificateService, address: str, serving: ServingCertificate | None = None,
          workers: int = 8) -> tuple[grpc.Server, int]:
    """Start the service on `address` (host:port, port 0 for any) over TLS with a certificate from the CA
    itself (clients trust the mesh root), renewed by `serving`; returns the server and its port."""
    serving = serving or ServingCertificate(service.ca, metrics=service.metrics)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(service, server)
    port = server.add_secure_port(address, serving.credentials())
    if port == 0:
        raise OSError(f"the CA cannot listen on {address}")
    server.start()
    return server, port


def channel(address: str, root_pem: str) -> grpc.Channel:
    """A TLS channel to the CA, trusting only the mesh root and expecting the CA's service name."""
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root_pem.encode()),
                               options=(("grpc.ssl_target_name_override", SERVICE_NAME),))


def request_certificate(address: str, token: str, identity: SpiffeId, key: object, root_pem: str,
                        ttl: dt.timedelta | None = None, timeout: float = 10.0) -> list[str]:
    """The tunnel's side: a CSR for `identity` with `key`, sent with the tunnel's token over TLS."""
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


class CertificateRequestError(NodeAgentError):
    """The CA did not issue a certificate (unreachable, refused, or the request was bad)."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"CA {address}: {code.name}: {details}")
        self.code, self.details = code, details


def node_token(path: Path) -> str:
    """A static node token in `path` (the lab's authenticator), created (random, mode 0600) when absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if not token:
            raise IdentityError(f"{path}: the node token file is empty") from None
        return token
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()
