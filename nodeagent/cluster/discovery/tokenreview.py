"""The two API calls the mesh CA makes to authenticate a tunnel: a TokenReview and the tunnel pod's binding.

A tunnel presents its projected ServiceAccount token. Only the API server can say whether that token is
valid, unexpired, meant for the CA's audience and still bound to a live pod: `review` asks it with a
TokenReview (POST /apis/authentication.k8s.io/v1/tokenreviews, `spec.audiences`), as istiod's
Kubernetes JWT authenticator does. `pod` then reads the pod the token is bound to (its uid and node),
because the node a tunnel may issue for is the node its own pod is scheduled on, never one the caller
names.

Both go through the official client and the connection `ApiConnection` configures (in-cluster service
account or kubeconfig); this module only adds the calls, so RBAC stays derivable from one place
(tests/unit/test_deployment.py): tokenreviews create, pods list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as k8s_client

from nodeagent.cluster.discovery.kubernetes import ApiConnection, ApiError
from nodeagent.cluster.discovery.wire import status_message

# user.extra keys the API server sets for a token bound to a pod (node-name and node-uid since 1.30)
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
NODE_NAME = "authentication.kubernetes.io/node-name"
REVIEW_TIMEOUT = 10.0


@dataclass(frozen=True)
class TokenReview:
    """The API server's verdict on one token (TokenReview `status`)."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    error: str = ""

    def extra_value(self, key: str) -> str:
        """The single value of `user.extra[key]`, or "" when absent."""
        values = self.extra.get(key, ())
        return values[0] if len(values) == 1 else ""


@dataclass(frozen=True)
class PodBinding:
    """What the API server says of a pod now: its uid and the node it is scheduled on."""

    namespace: str
    name: str
    uid: str
    node_name: str


class ReviewConnection(ApiConnection):
    """`ApiConnection` plus the CA's calls: TokenReview and one pod's binding."""

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> ReviewConnection:
        """As `ApiConnection.from_config`, typed as this class."""
        connection = cls.from_config(kubeconfig, context)
        assert isinstance(connection, ReviewConnection)
        return connection

    def review(self, token: str, audiences: Sequence[str]) -> TokenReview:
        """Ask the API server about `token` for `audiences`; ApiError when it cannot answer."""
        api = k8s_client.AuthenticationV1Api(self._api)
        body = k8s_client.V1TokenReview(spec=k8s_client.V1TokenReviewSpec(token=token, audiences=list(audiences)))
        try:
            answer = api.create_token_review(body, _request_timeout=(REVIEW_TIMEOUT, REVIEW_TIMEOUT))
        except k8s_client.ApiException as exc:
            body_of = exc.body.encode() if isinstance(exc.body, str) else exc.body
            raise ApiError(int(exc.status or 0), status_message(body_of) if body_of else str(exc.reason)) from exc
        status = answer.status
        if status is None:
            return TokenReview(False, error="the API server returned no TokenReview status")
        user = status.user
        extra = {key: tuple(values or ()) for key, values in ((user.extra or {}) if user else {}).items()}
        return TokenReview(bool(status.authenticated), (user.username or "") if user else "",
                           tuple(status.audiences or ()), extra, status.error or "")

    def pod(self, namespace: str, name: str) -> PodBinding | None:
        """The pod `namespace/name` as stored now, or None when it does not exist.

        A list with a field selector on name and namespace rather than a GET of the object: the same
        answer, one RBAC verb (list) the CA already holds for its pod watch.
        """
        selector = f"metadata.name={name},metadata.namespace={namespace}"
        response = self.get(f"/api/v1/namespaces/{namespace}/pods", [("fieldSelector", selector)], REVIEW_TIMEOUT)
        try:
            body: bytes = response.data
        finally:
            response.release_conn()
        if response.status != 200:
            raise ApiError(response.status, status_message(body))
        items: list[dict[str, Any]] = json.loads(body).get("items") or []
        for item in items:
            meta = item.get("metadata") or {}
            if meta.get("name") == name and meta.get("namespace", namespace) == namespace:
                return PodBinding(namespace, name, str(meta.get("uid") or ""),
                                  str((item.get("spec") or {}).get("nodeName") or ""))
        return None
