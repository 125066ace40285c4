"""Projected ServiceAccount tokens the lab API server issues, and its TokenReview answers.

A token is JWT-shaped (its payload carries `exp`, `aud` and the kubernetes.io claims, as a real bound
token does) but only this registry can vouch for it. Reviews answer as kube-apiserver does: for a
valid token, `status.authenticated`, `user.username` `system:serviceaccount:<ns>:<sa>`, `user.extra`
with the pod's name and uid and the node's name, and `audiences` (the asked-for audiences the token is
for); unauthenticated with an `error` for an expired or wrong-audience token. Unlike kube-apiserver it
does not check that the bound pod still exists: the CA's own check is what the tests exercise.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"  # the API server's own audience


class TokenRegistry:
    """The tokens issued so far (see the module doc)."""

    def __init__(self) -> None:
        self._tokens: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def issue(self, namespace: str, service_account: str, pod_name: str, pod_uid: str, node_name: str,
              audiences: Iterable[str] = ("nodeagent-ca",), expires: float | None = None) -> str:
        """A new token for a pod of `namespace/service_account`; `expires` is a Unix time (default: in 1 h)."""
        now = time.time()
        claims = {"aud": list(audiences), "exp": int(expires if expires is not None else now + 3600), "iat": int(now),
                  "iss": API_AUDIENCE, "sub": f"system:serviceaccount:{namespace}:{service_account}",
                  "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": service_account},
                                    "pod": {"name": pod_name, "uid": pod_uid}, "node": {"name": node_name}}}

        def segment(data: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

        token = ".".join((segment({"alg": "RS256", "kid": "lab"}), segment(claims),
                          base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")))
        with self._lock:
            self._tokens[token] = claims
        return token

    def review(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The TokenReview answer to a posted TokenReview `body`; None for a token this registry never issued."""
        spec = body.get("spec") or {}
        asked = list(spec.get("audiences") or [API_AUDIENCE])
        with self._lock:
            claims = self._tokens.get(str(spec.get("token") or ""))
        if claims is None:
            return None
        status: dict[str, Any] = {"authenticated": False, "user": {}}
        if claims["exp"] <= time.time():
            status["error"] = "[invalid bearer token, service account token has expired]"
        elif not set(asked) & set(claims["aud"]):
            status["error"] = f"[invalid bearer token, token audiences {claims['aud']} is invalid for the target " \
                              f"audiences {asked}]"
        else:
            bound = claims["kubernetes.io"]
            namespace = bound["namespace"]
            status = {"authenticated": True, "audiences": [a for a in asked if a in claims["aud"]], "user": {
                "username": claims["sub"], "uid": f"uid-of-{bound['serviceaccount']['name']}",
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                "extra": {"authentication.kubernetes.io/pod-name": [bound["pod"]["name"]],
                          "authentication.kubernetes.io/pod-uid": [bound["pod"]["uid"]],
                          "authentication.kubernetes.io/node-name": [bound["node"]["name"]]}}}
        return review_answer(spec, status)


def review_answer(spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """A TokenReview response."""
    return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {"creationTimestamp": None},
            "spec": spec, "status": status}
