"""The lab's CA authenticates tunnels as in a cluster: TokenRequest and TokenReview on the lab API server.

The first tests run one lab API server in process (HTTPS on loopback) and talk to it with the official
Python client: a token requested for a pod (the TokenRequest subresource, as the kubelet asks for a
projected token) is reviewed as kube-apiserver reviews it, and the requests kube-apiserver refuses are
refused with its codes. The CA's own authenticator (`TokenReviewAuthenticator` over `ReviewConnection`)
then takes the node from such a token.

The last test brings up a lab with the mesh (root, throw-away namespaces): the tunnels' pods are in the
API, each tunnel's token was requested for its pod, the real lab CA process reviews them with the lab API
server, and a token of node1's tunnel cannot get an identity of a pod that runs only on node2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from nodeagent.ca.auth import TokenReviewAuthenticator
from nodeagent.ca.service import Refused
from nodeagent.cluster.discovery.tokenreview import ReviewConnection
from nodeagent.lab.apiserver import LabApiServer
from tests.support import objects as k8s

TUNNEL_NS, TUNNEL_SA = "nodeagent", "nodeagent-ztunnel"


@dataclass
class Api:
    server: LabApiServer
    kubeconfig: Path
    core: Any
    auth: Any

    def request(self, pod: str | None, *, namespace: str = TUNNEL_NS, account: str = TUNNEL_SA,
                uid: str | None = None, audiences: list[str] | None = None, seconds: int | None = 3600) -> Any:
        """A TokenRequest through the official client (create_namespaced_service_account_token)."""
        ref = None if pod is None else k8s_client.V1BoundObjectReference(api_version="v1", kind="Pod", name=pod,
                                                                         uid=uid)
        body = k8s_client.AuthenticationV1TokenRequest(spec=k8s_client.V1TokenRequestSpec(
            audiences=audiences if audiences is not None else ["nodeagent-ca"], expiration_seconds=seconds,
            bound_object_ref=ref))
        return self.core.create_namespaced_service_account_token(account, namespace, body)

    def review(self, token: str, audiences: list[str]) -> Any:
        return self.auth.create_token_review(k8s_client.V1TokenReview(
            spec=k8s_client.V1TokenReviewSpec(token=token, audiences=audiences))).status

    def refused(self, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        pod = kwargs.pop("pod")
        with pytest.raises(k8s_client.ApiException) as error:
            self.request(pod, **kwargs)
        return int(error.value.status), json.loads(error.value.body or "{}")


def tunnel_pod(name: str, node: str, account: str = TUNNEL_SA, namespace: str = TUNNEL_NS) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "serviceAccountName": account, "hostNetwork": True,
                     "containers": [{"name": "ztunnel", "image": "nodeagent"}]}}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    server = LabApiServer(token="lab-token").start()
    server.create_many([k8s.node("node1", "172.18.0.2", "10.244.1.0/24"),
                        k8s.node("node2", "172.18.0.3", "10.244.2.0/24")])
    kubeconfig = server.write_kubeconfig(tmp_path_factory.mktemp("apiserver") / "kubeconfig")
    api_client = k8s_config.new_client_from_config(str(kubeconfig))  # type: ignore[no-untyped-call]
    core = k8s_client.CoreV1Api(api_client)
    core.create_namespace(k8s_client.V1Namespace(metadata=k8s_client.V1ObjectMeta(name=TUNNEL_NS)))
    for node in ("node1", "node2"):
        core.create_namespaced_pod(TUNNEL_NS, tunnel_pod(f"ztunnel-{node}", node))  # type: ignore[arg-type]
    try:
        yield Api(server, kubeconfig, core, k8s_client.AuthenticationV1Api(api_client))
    finally:
        api_client.close()
        server.stop()


def test_a_token_requested_for_a_pod_is_reviewed_as_bound_to_it_and_its_node(api: Api) -> None:
    pod = api.core.read_namespaced_pod("ztunnel-node1", TUNNEL_NS)
    node = api.core.read_node("node1")
    before = time.time()
    answer = api.request("ztunnel-node1", uid=pod.metadata.uid)
    expires = answer.status.expiration_timestamp.timestamp()
    assert before + 3600 - 2 <= expires <= time.time() + 3600 + 1
    assert answer.spec.bound_object_ref.uid == pod.metadata.uid and answer.spec.audiences == ["nodeagent-ca"]
    status = api.review(answer.status.token, ["nodeagent-ca"])
    assert status.authenticated and status.audiences == ["nodeagent-ca"]
    assert status.user.username == f"system:serviceaccount:{TUNNEL_NS}:{TUNNEL_SA}"
    assert status.user.extra == {"authentication.kubernetes.io/pod-name": ["ztunnel-node1"],
                                 "authentication.kubernetes.io/pod-uid": [pod.metadata.uid],
                                 "authentication.kubernetes.io/node-name": ["node1"],
                                 "authentication.kubernetes.io/node-uid": [node.metadata.uid]}
    # Without a uid in the reference the pod's own is bound (kube-apiserver fills it in).
    unpinned = api.request("ztunnel-node2")
    assert unpinned.spec.bound_object_ref.uid == api.core.read_namespaced_pod("ztunnel-node2", TUNNEL_NS).metadata.uid
    assert api.review(unpinned.status.token, ["nodeagent-ca"]).user.extra[
        "authentication.kubernetes.io/node-name"] == ["node2"]


def test_a_review_for_another_audience_is_not_authenticated(api: Api) -> None:
    token = api.request("ztunnel-node1").status.token
    status = api.review(token, ["vault"])
    assert not status.authenticated and "audiences" in status.error
    # Without audiences in the request, the token is for the API server's own audience, as kube-apiserver's.
    default = api.request("ztunnel-node1", audiences=[]).status.token
    assert api.review(default, []).authenticated
    assert not api.review(default, ["nodeagent-ca"]).authenticated


def test_a_token_bound_to_no_pod_carries_no_pod_or_node(api: Api) -> None:
    status = api.review(api.request(None).status.token, ["nodeagent-ca"])
    assert status.authenticated and not status.user.extra


def test_refusals_are_kube_apiservers(api: Api) -> None:
    code, body = api.refused(pod="ztunnel-node9")
    assert (code, body["reason"], body["message"]) == (404, "NotFound", 'pods "ztunnel-node9" not found')
    code, body = api.refused(pod="ztunnel-node1", uid="not-its-uid")
    assert (code, body["reason"]) == (409, "Conflict")
    assert body["message"].startswith('Operation cannot be fulfilled on Pod "ztunnel-node1": the UID in the bound '
                                      "object reference (not-its-uid) does not match the UID in record")
    code, body = api.refused(pod="ztunnel-node1", account="someone-else")
    assert (code, body["reason"]) == (400, "BadRequest") and "different serviceaccount name" in body["message"]
    code, body = api.refused(pod="ztunnel-node1", seconds=60)
    assert (code, body["reason"]) == (422, "Invalid")
    assert body["message"] == ('TokenRequest.authentication.k8s.io "nodeagent-ztunnel" is invalid: '
                               "spec.expirationSeconds: Invalid value: 60: may not specify a duration less than "
                               "10 minutes")


def test_the_cas_authenticator_takes_the_node_from_the_requested_token(api: Api) -> None:
    authenticator = TokenReviewAuthenticator(ReviewConnection.connect(str(api.kubeconfig)), cache_ttl=0)
    assert authenticator.authenticate(api.request("ztunnel-node2").status.token).node == "node2"
    # Another ServiceAccount's token, bound to its own pod: not the tunnel's.
    api.core.create_namespaced_pod(TUNNEL_NS, tunnel_pod("impostor", "node1", account="impostor"))
    with pytest.raises(Refused) as refused:
        authenticator.authenticate(api.request("impostor", account="impostor").status.token)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    # The pod deleted and made again under the same name: the old token names the old uid.
    old = api.request("impostor", account="impostor").status.token
    api.core.delete_namespaced_pod("impostor", TUNNEL_NS)
    with pytest.raises(Refused) as refused:
        TokenReviewAuthenticator(ReviewConnection.connect(str(api.kubeconfig)), audience="nodeagent-ca",
                                 tunnel_account=(TUNNEL_NS, "impostor"), cache_ttl=0).authenticate(old)
    assert refused.value.reason == "tunnel_pod_gone"


# --- in a lab, with the real CA process ------------------------------------------------------------------

LONELY = """
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: lonely, namespace: plain, labels: {app: lonely}}
spec:
  nodeName: node2
  serviceAccountName: lonely
  containers:
  - {name: sleep, command: [nodeagent, workload, idle]}
"""

# A CSR from inside a node's namespace, with a token file: prints "OK" or the gRPC status name.
CSR = """
import sys
from pathlib import Path
from nodeagent.ca.service import CertificateRequestError, request_certificate
from nodeagent.ca.identity import SpiffeId, new_key
address, token, root, namespace, account = sys.argv[1:6]
try:
    request_certificate(address, Path(token).read_text().strip(), SpiffeId("cluster.local", namespace, account),
                        new_key(), Path(root).read_text())
    print("OK")
except CertificateRequestError as exc:
    print(exc.code.name, exc.details)
"""


@pytest.mark.root
def test_a_labs_tunnel_token_gets_only_its_own_nodes_identities(tmp_path: Path) -> None:
    from nodeagent.lab import lab as labs
    from nodeagent.lab.agents import (
        CA_OWNER,
        CA_PORT,
        TUNNEL_NAMESPACE,
        api_request,
        ca_address,
        ca_dir,
        token_file,
        tunnel_pod_name,
    )
    from tests.support.agent_labs import lab_with_agents, owner_process

    with lab_with_agents(tmp_path, LONELY, "iptables", mesh=True) as lab:
        # The CA reviews tokens with the lab API server: no static tokens, no manifests.
        argv = owner_process(lab, CA_OWNER).cmdline()
        assert "--kubeconfig" in argv and "--token-file-dir" not in argv and "--manifests" not in argv
        # The tunnels' pods are API objects (hostNetwork), which the lab gave no namespace or process.
        control = labs.api_server_plan(lab.plan, lab.topology).netns
        code, pods = api_request(lab, control, "GET", "/api/v1/namespaces/nodeagent/pods")
        assert code == 200
        items: list[dict[str, Any]] = pods["items"]  # type: ignore[assignment]
        assert {(p["metadata"]["name"], p["spec"]["nodeName"], p["spec"]["hostNetwork"]) for p in items} == {
            ("ztunnel-node1", "node1", True), ("ztunnel-node2", "node2", True)}
        assert all("ztunnel" not in p.pod.name for p in lab.plan.pods)

        def csr(node: str, namespace: str, account: str) -> str:
            result = subprocess.run(["ip", "netns", "exec", lab.plan.node(node).netns, sys.executable, "-c", CSR,
                                     f"{ca_address(lab)}:{CA_PORT}", str(token_file(lab, node)),
                                     str(ca_dir(lab) / "root-cert.pem"), namespace, account],
                                    capture_output=True, text=True, timeout=60, check=False)
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()

        assert csr("node2", "plain", "lonely") == "OK"
        assert csr("node1", "demo", "client") == "OK"
        refused = csr("node1", "plain", "lonely")
        assert refused.startswith("PERMISSION_DENIED"), refused
        refused = csr("node2", "demo", "client")
        assert refused.startswith("PERMISSION_DENIED"), refused
        log = [json.loads(line) for line in (lab.record.directory / "logs" / "ca.log").read_text().splitlines()
               if line.startswith("{")]
        authenticated = {line.get("pod") for line in log if line.get("event") == "tunnel authenticated"}
        assert {f"{TUNNEL_NAMESPACE}/{tunnel_pod_name(node)}" for node in ("node1", "node2")} <= authenticated
