"""The mesh CA on loopback against the fake API server: TokenReview authentication of the tunnel's projected
token, identities of the tunnel's own node only, every refusal with its code, the review cache, the
endpoint's rotating certificate; the lab's static-token authenticator."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from cryptography import x509

from nodeagent.ca.auth import StaticTokens, TokenReviewAuthenticator
from nodeagent.ca.identity import CertificateAuthority, SpiffeId, new_key, spiffe_id_of
from nodeagent.ca.server import CaOptions, CaServer, PodIndex
from nodeagent.ca.service import (
    SERVICE_NAME,
    CaMetrics,
    CertificateRequestError,
    CertificateService,
    Refused,
    ServingCertificate,
    pods_on_node,
    request_certificate,
    serve,
)
from nodeagent.cluster.discovery.kubernetes import KubernetesSource
from nodeagent.cluster.discovery.tokenreview import PodBinding, ReviewConnection, TokenReview
from nodeagent.cluster.model import Kind
from tests.support.fakeapi import FakeApiServer

ECHO = SpiffeId("cluster.local", "demo", "echo")
CLIENT = SpiffeId("cluster.local", "demo", "client")
TUNNEL_NS, TUNNEL_SA = "nodeagent", "nodeagent-ztunnel"

CA = CertificateAuthority.generate()
ROOT = CA.root_pem


def pod(namespace: str, name: str, node: str, account: str, uid: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": namespace, "name": name, "uid": uid or f"uid-{namespace}-{name}"},
            "spec": {"nodeName": node, "serviceAccountName": account, "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]}}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)  # polling a condition with a deadline


@pytest.fixture(scope="module")
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    for obj in (pod(TUNNEL_NS, "ztunnel-a", "node1", TUNNEL_SA), pod(TUNNEL_NS, "ztunnel-b", "node2", TUNNEL_SA),
                pod("demo", "client", "node1", "client"), pod("demo", "echo-0", "node1", "echo"),
                pod("demo", "echo-1", "node2", "echo")):
        server.create(obj)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ca_server(api: FakeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaServer]:
    kubeconfig = api.write_kubeconfig(tmp_path_factory.mktemp("ca") / "kubeconfig")
    connection = ReviewConnection.connect(str(kubeconfig))
    metrics = CaMetrics()
    authenticator = TokenReviewAuthenticator(connection, "nodeagent-ca", (TUNNEL_NS, TUNNEL_SA), metrics=metrics)
    pods = PodIndex(lambda sink: KubernetesSource(connection, sink, "", kinds=(Kind.POD,), all_pods=True))
    server = CaServer(CaOptions(address="127.0.0.1:0", monitoring=("127.0.0.1", 0)), CA, authenticator, pods,
                      metrics).start()
    wait_until(pods.ready, "the CA listed the pods")
    yield server
    server.stop()
    connection.close()


@pytest.fixture()
def address(ca_server: CaServer) -> str:
    return f"127.0.0.1:{ca_server.port}"


def tunnel_token(api: FakeApiServer, pod_name: str = "ztunnel-a", node: str = "node1", **overrides: Any) -> str:
    fields: dict[str, Any] = {"namespace": TUNNEL_NS, "service_account": TUNNEL_SA, "pod_name": pod_name,
                              "pod_uid": f"uid-{TUNNEL_NS}-{pod_name}", "node_name": node, **overrides}
    return api.issue_token(**fields)


def refused(address: str, token: str, identity: SpiffeId = CLIENT) -> CertificateRequestError:
    with pytest.raises(CertificateRequestError) as caught:
        request_certificate(address, token, identity, new_key(), ROOT)
    return caught.value


def refusals(server: CaServer, reason: str) -> float:
    value = server.metrics.registry.get_sample_value("nodeagent_ca_refusals_total", {"reason": reason})
    return value or 0.0


# --- accepted ---------------------------------------------------------------------------------------------


def test_a_tunnel_gets_the_identity_of_a_pod_on_its_node_with_the_ttl_asked_for(api: FakeApiServer,
                                                                                address: str) -> None:
    chain = request_certificate(address, tunnel_token(api), CLIENT, new_key(), ROOT, ttl=dt.timedelta(hours=2))
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert spiffe_id_of(leaf) == CLIENT and len(chain) == 3
    assert dt.timedelta(minutes=119) < leaf.not_valid_after_utc - leaf.not_valid_before_utc < dt.timedelta(hours=2,
                                                                                                          minutes=2)


def test_the_node_comes_from_the_tunnels_own_pod_not_from_the_token(api: FakeApiServer, address: str) -> None:
    # ztunnel-b runs on node2, which runs echo-1: node2 may hold demo/echo but not demo/client.
    assert request_certificate(address, tunnel_token(api, "ztunnel-b", "node2"), ECHO, new_key(), ROOT)
    error = refused(address, tunnel_token(api, "ztunnel-b", "node2"))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "node node2 runs no pod with identity spiffe://cluster.local/ns/demo/sa/client" in error.details
    assert str(error).startswith(f"CA {address}: PERMISSION_DENIED: node node2"), "one readable line"


# --- refused ----------------------------------------------------------------------------------------------


def test_a_token_for_another_audience_is_unauthenticated(api: FakeApiServer, ca_server: CaServer,
                                                         address: str) -> None:
    before = refusals(ca_server, "token_invalid")
    error = refused(address, tunnel_token(api, audiences=("https://kubernetes.default.svc.cluster.local",)))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED and "audiences" in error.details
    assert refusals(ca_server, "token_invalid") == before + 1


def test_an_expired_token_is_unauthenticated(api: FakeApiServer, address: str) -> None:
    error = refused(address, tunnel_token(api, expires=time.time() - 5))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED and "expired" in error.details


def test_an_unknown_or_missing_token_is_unauthenticated(address: str) -> None:
    assert refused(address, "guess").code == grpc.StatusCode.UNAUTHENTICATED
    from nodeagent.ca.identity import make_csr
    from nodeagent.ca.service import channel as ca_channel
    from nodeagent.control.api import ca_pb2, ca_pb2_grpc

    with ca_channel(address, ROOT) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateCertificate(ca_pb2.IstioCertificateRequest(csr=make_csr(CLIENT, new_key()).decode()),
                                   timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and "no bearer token" in caught.value.details()


def test_a_token_of_another_service_account_is_denied(api: FakeApiServer, ca_server: CaServer,
                                                      address: str) -> None:
    # A workload on node1 with a projected token for the CA's audience: valid, but not the tunnel.
    token = api.issue_token("demo", "client", "client", "uid-demo-client", "node1")
    error = refused(address, token)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "system:serviceaccount:demo:client is not the tunnel's service account nodeagent/nodeagent-ztunnel" \
        in error.details
    assert refusals(ca_server, "not_the_tunnel_account") >= 1


def test_a_token_whose_pod_uid_does_not_match_is_unauthenticated(api: FakeApiServer, address: str) -> None:
    error = refused(address, tunnel_token(api, pod_uid="uid-of-an-earlier-pod"))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "uid uid-of-an-earlier-pod" in error.details and "uid-nodeagent-ztunnel-a" in error.details


def test_a_token_whose_node_claim_disagrees_with_its_pod_is_unauthenticated(api: FakeApiServer,
                                                                           address: str) -> None:
    error = refused(address, tunnel_token(api, node_name="node2"))  # ztunnel-a runs on node1
    assert error.code == grpc.StatusCode.UNAUTHENTICATED and "names node node2" in error.details


def test_a_token_of_a_deleted_tunnel_pod_is_unauthenticated(api: FakeApiServer, address: str) -> None:
    api.create(pod(TUNNEL_NS, "ztunnel-old", "node1", TUNNEL_SA))
    token = tunnel_token(api, "ztunnel-old")
    api.delete("Pod", TUNNEL_NS, "ztunnel-old")
    error = refused(address, token)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED and "no longer exists" in error.details


def test_a_pod_that_left_the_node_no_longer_gets_certificates(api: FakeApiServer, address: str) -> None:
    late = SpiffeId("cluster.local", "demo", "late")
    token = tunnel_token(api)
    api.create(pod("demo", "late", "node1", "late"))

    def issued() -> bool:
        try:
            return bool(request_certificate(address, token, late, new_key(), ROOT))
        except CertificateRequestError as exc:
            assert exc.code == grpc.StatusCode.PERMISSION_DENIED
            return False

    wait_until(issued, "the new pod's identity is issued once the CA's watch has it")
    api.delete("Pod", "demo", "late")
    wait_until(lambda: not issued(), "the identity is refused once the pod is gone")


def test_a_malformed_csr_is_an_invalid_argument(api: FakeApiServer, address: str) -> None:
    from nodeagent.ca.service import channel as ca_channel
    from nodeagent.control.api import ca_pb2, ca_pb2_grpc

    with ca_channel(address, ROOT) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateCertificate(ca_pb2.IstioCertificateRequest(csr="not a csr"),
                                   metadata=(("authorization", f"Bearer {tunnel_token(api)}"),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_client_that_does_not_trust_the_mesh_root_cannot_talk_to_the_ca(api: FakeApiServer, address: str) -> None:
    stranger = CertificateAuthority.generate()
    with pytest.raises(CertificateRequestError) as caught:
        request_certificate(address, tunnel_token(api), CLIENT, new_key(), stranger.root_pem, timeout=3)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_refusal_is_logged_naming_the_node_and_the_identity(api: FakeApiServer, address: str) -> None:
    with structlog.testing.capture_logs() as logs:
        refused(address, tunnel_token(api, "ztunnel-b", "node2"))
    [line] = [entry for entry in logs if entry["event"] == "certificate refused"]
    assert line["node"] == "node2" and line["identity"] == str(CLIENT) and line["reason"] == "identity_not_on_node"
    assert line["code"] == "PERMISSION_DENIED" and line["log_level"] == "warning"


def test_the_ca_serves_metrics_and_readiness(api: FakeApiServer, ca_server: CaServer) -> None:
    import urllib.request

    base = f"http://127.0.0.1:{ca_server.monitoring_port}"
    assert urllib.request.urlopen(f"{base}/ready", timeout=5).read() == b'{"ready": true}'
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    assert "nodeagent_ca_certificates_issued_total" in text and "nodeagent_ca_refusals_total" in text


# --- the review cache --------------------------------------------------------------------------------------


def test_a_burst_of_requests_with_one_token_costs_one_token_review(api: FakeApiServer, ca_server: CaServer,
                                                                   address: str) -> None:
    def reviews(result: str) -> float:
        return ca_server.metrics.registry.get_sample_value("nodeagent_ca_token_reviews_total",
                                                           {"result": result}) or 0.0

    token = tunnel_token(api)
    sent, cached = reviews("sent"), reviews("cached")
    for _ in range(5):
        request_certificate(address, token, ECHO, new_key(), ROOT)
    assert (reviews("sent") - sent, reviews("cached") - cached) == (1, 4)


class CountingReviewer:
    """A TokenReviewer answering from fixed results, counting calls."""

    def __init__(self, review: TokenReview, binding: PodBinding | None) -> None:
        self.answer, self.binding, self.reviews = review, binding, 0

    def review(self, token: str, audiences: Sequence[str]) -> TokenReview:
        self.reviews += 1
        return self.answer

    def pod(self, namespace: str, name: str) -> PodBinding | None:
        return self.binding


GOOD = TokenReview(True, f"system:serviceaccount:{TUNNEL_NS}:{TUNNEL_SA}", ("nodeagent-ca",),
                   {"authentication.kubernetes.io/pod-name": ("ztunnel-a",),
                    "authentication.kubernetes.io/pod-uid": ("u1",)})


def test_cached_reviews_expire_after_the_ttl_and_never_outlive_the_token() -> None:
    now = [1000.0]
    reviewer = CountingReviewer(GOOD, PodBinding(TUNNEL_NS, "ztunnel-a", "u1", "node1"))
    authenticator = TokenReviewAuthenticator(reviewer, cache_ttl=60, clock=lambda: now[0], wall_clock=lambda: now[0])
    assert authenticator.authenticate("opaque").node == "node1"
    now[0] += 59
    authenticator.authenticate("opaque")
    assert reviewer.reviews == 1
    now[0] += 2
    authenticator.authenticate("opaque")
    assert reviewer.reviews == 2, "reviewed again after the TTL"
    # a JWT-shaped token expiring in 10 s is cached 10 s, not 60
    token = FakeApiServer().issue_token(TUNNEL_NS, TUNNEL_SA, "ztunnel-a", "u1", "node1", expires=now[0] + 10)
    authenticator.authenticate(token)
    now[0] += 11
    authenticator.authenticate(token)
    assert reviewer.reviews == 4


def test_refusals_are_not_cached_and_an_unreachable_api_server_is_unavailable() -> None:
    reviewer = CountingReviewer(TokenReview(False, error="invalid bearer token"), None)
    authenticator = TokenReviewAuthenticator(reviewer)
    for _ in range(2):
        with pytest.raises(Refused) as caught:
            authenticator.authenticate("bad")
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert reviewer.reviews == 2

    class Down(CountingReviewer):
        def review(self, token: str, audiences: Sequence[str]) -> TokenReview:
            raise ConnectionRefusedError("connection refused")

    with pytest.raises(Refused) as caught:
        TokenReviewAuthenticator(Down(GOOD, None)).authenticate("any")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.reason == "token_review_failed"


def test_a_token_not_bound_to_a_pod_or_of_an_unscheduled_pod_is_refused() -> None:
    unbound = TokenReview(True, GOOD.username, GOOD.audiences, {})
    with pytest.raises(Refused) as caught:
        TokenReviewAuthenticator(CountingReviewer(unbound, None)).authenticate("t")
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "token_not_pod_bound")
    with pytest.raises(Refused) as caught:
        TokenReviewAuthenticator(CountingReviewer(GOOD, PodBinding(TUNNEL_NS, "ztunnel-a", "u1", ""))).authenticate("t")
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.PERMISSION_DENIED, "tunnel_pod_unscheduled")


def test_the_review_cache_is_bounded() -> None:
    reviewer = CountingReviewer(GOOD, PodBinding(TUNNEL_NS, "ztunnel-a", "u1", "node1"))
    authenticator = TokenReviewAuthenticator(reviewer, cache_size=3)
    for i in range(10):
        authenticator.authenticate(f"token-{i}")
    assert len(authenticator._cache) == 3
    authenticator.authenticate("token-0")
    assert reviewer.reviews == 11, "the oldest entries were dropped"


# --- the lab's static tokens --------------------------------------------------------------------------------


def test_static_tokens_map_a_token_file_to_its_node(tmp_path: Path) -> None:
    (tmp_path / "node1").write_text("secret-1\n")
    (tmp_path / "node2").write_text("secret-2\n")
    service = CertificateService(CA, StaticTokens(tmp_path), pods_on_node({"node1": {("demo", "client")}}))
    server, port = serve(service, "127.0.0.1:0")
    try:
        assert request_certificate(f"127.0.0.1:{port}", "secret-1", CLIENT, new_key(), ROOT)
        assert refused(f"127.0.0.1:{port}", "secret-2").code == grpc.StatusCode.PERMISSION_DENIED
        assert refused(f"127.0.0.1:{port}", "secret-3").code == grpc.StatusCode.UNAUTHENTICATED
        (tmp_path / "node2").write_text("rotated\n")  # read per request: a replaced file counts at once
        assert refused(f"127.0.0.1:{port}", "secret-2").code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(grace=None)


# --- the endpoint's own certificate -------------------------------------------------------------------------


def served_certificate(port: int) -> x509.Certificate:
    """The certificate the CA endpoint presents to a new TLS connection (as gRPC's client sees it)."""
    context = ssl.create_default_context(cadata=ROOT)
    context.set_alpn_protocols(["h2"])
    with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
          context.wrap_socket(raw, server_hostname=SERVICE_NAME) as tls):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_endpoint_certificate_is_renewed_before_it_expires(tmp_path: Path) -> None:
    metrics = CaMetrics()
    (tmp_path / "node1").write_text("secret-1\n")
    service = CertificateService(CA, StaticTokens(tmp_path), pods_on_node({"node1": {("demo", "client")}}),
                                 metrics=metrics)
    serving = ServingCertificate(CA, (SERVICE_NAME, "nodeagent-ca.nodeagent.svc"), dt.timedelta(seconds=4),
                                 metrics=metrics)
    server, port = serve(service, "127.0.0.1:0", serving)
    try:
        first = served_certificate(port)
        names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [SERVICE_NAME, "nodeagent-ca.nodeagent.svc"]
        assert served_certificate(port).serial_number == first.serial_number, "not renewed before half life"
        wait_until(lambda: served_certificate(port).serial_number != first.serial_number,
                   "a new connection gets a renewed certificate after half its life", timeout=10)
        wait_until(lambda: dt.datetime.now(dt.UTC) > first.not_valid_after_utc, "the first certificate expired")
        # still served: the certificate of the next connection is the current one, valid
        current = served_certificate(port)
        assert current.not_valid_after_utc > dt.datetime.now(dt.UTC)
        assert request_certificate(f"127.0.0.1:{port}", "secret-1", CLIENT, new_key(), ROOT), \
            "a tunnel still gets certificates once the first endpoint certificate has expired"
        assert (metrics.registry.get_sample_value("nodeagent_ca_serving_certificate_renewals_total") or 0) >= 1
    finally:
        server.stop(grace=None)


# --- the pod index ------------------------------------------------------------------------------------------


def test_the_pod_index_refuses_until_listed_and_ignores_terminated_pods() -> None:
    from nodeagent.ca.service import PodsIn
    from nodeagent.cluster.decode import decode, object_ref
    from nodeagent.cluster.events import Listed
    from nodeagent.state.tracker import ChangeTracker

    tracker = ChangeTracker("")
    authorize = PodsIn(lambda: tracker.snapshot() or tracker.last())
    with pytest.raises(Refused) as caught:
        authorize("node1", CLIENT)
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, "pods_not_synced")
    done = pod("demo", "job", "node1", "batch") | {"status": {"phase": "Succeeded", "podIP": "10.244.1.9"}}
    items = tuple((object_ref(raw), decode(raw)) for raw in (pod("demo", "client", "node1", "client"), done))
    tracker.apply(Listed(Kind.POD, items, "7"))
    assert authorize("node1", CLIENT) and not authorize("node2", CLIENT)
    assert not authorize("node1", SpiffeId("cluster.local", "demo", "batch")), "a finished pod holds no identity"
