"""Projected ServiceAccount tokens the lab API server issues (TokenRequest), and its TokenReview answers.

A token is JWT-shaped (its payload carries `exp`, `aud` and the kubernetes.io claims, as a real bound
token does) but only this registry can vouch for it. Tokens come from the TokenRequest subresource
(`POST /api/v1/namespaces/<ns>/serviceaccounts/<sa>/token`, as the kubelet asks for a pod's projected
token; `token_request` checks its body, the server binds it to the pod) or from `issue()` in tests.
Reviews answer as kube-apiserver does: for a valid token, `status.authenticated`, `user.username`
`system:serviceaccount:<ns>:<sa>`, `user.extra` with the pod's name and uid and the node's name (and
uid, when the node was known at issue), and `audiences` (the asked-for audiences the token is for);
unauthenticated with an `error` for an expired or wrong-audience token. Unlike kube-apiserver it does
not check at review that the bound pod still exists: the CA's own check is what the tests exercise.
The lab stores no ServiceAccounts, so a TokenRequest for any name is served (kube-apiserver answers 404
for a ServiceAccount it does not have); the pod it binds to must name that ServiceAccount.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nodeagent.lab.apiserver.store import ApiError

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"  # the API server's own audience
TOKEN_GROUP = "authentication.k8s.io"
DEFAULT_EXPIRATION = 3600  # kube-apiserver's default for a TokenRequest without expirationSeconds
MIN_EXPIRATION = 600  # kube-apiserver refuses shorter ones (validation)
MAX_EXPIRATION = 1 << 32
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
NODE_NAME = "authentication.kubernetes.io/node-name"
NODE_UID = "authentication.kubernetes.io/node-uid"


class TokenRegistry:
    """The tokens issued so far (see the module doc)."""

    def __init__(self) -> None:
        self._tokens: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def issue(self, namespace: str, service_account: str, pod_name: str, pod_uid: str, node_name: str,
              audiences: Iterable[str] = ("nodeagent-ca",), expires: float | None = None, *,
              node_uid: str = "") -> str:
        """A new token for a pod of `namespace/service_account`; `expires` is a Unix time (default: in 1 h).
        An empty `pod_name` makes a token bound to no pod, an empty `node_name` one bound to no node."""
        now = time.time()
        bound: dict[str, Any] = {"namespace": namespace, "serviceaccount": {"name": service_account}}
        if pod_name:
            bound["pod"] = {"name": pod_name, "uid": pod_uid}
        if node_name:
            bound["node"] = {"name": node_name, **({"uid": node_uid} if node_uid else {})}
        claims = {"aud": list(audiences), "exp": int(expires if expires is not None else now + 3600), "iat": int(now),
                  "iss": API_AUDIENCE, "sub": f"system:serviceaccount:{namespace}:{service_account}",
                  "kubernetes.io": bound}

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
            extra: dict[str, list[str]] = {}
            if "pod" in bound:
                extra.update({POD_NAME: [bound["pod"]["name"]], POD_UID: [bound["pod"]["uid"]]})
            if "node" in bound:
                extra[NODE_NAME] = [bound["node"]["name"]]
                if bound["node"].get("uid"):
                    extra[NODE_UID] = [bound["node"]["uid"]]
            user: dict[str, Any] = {
                "username": claims["sub"], "uid": f"uid-of-{bound['serviceaccount']['name']}",
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]}
            if extra:
                user["extra"] = extra
            status = {"authenticated": True, "audiences": [a for a in asked if a in claims["aud"]], "user": user}
        return review_answer(spec, status)


def review_answer(spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """A TokenReview response."""
    return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {"creationTimestamp": None},
            "spec": spec, "status": status}


@dataclass(frozen=True)
class TokenRequestSpec:
    """A TokenRequest body, checked: what to issue and what to bind it to."""

    audiences: tuple[str, ...]
    expiration_seconds: int
    bound_kind: str  # "" (bound to nothing) or "Pod"
    bound_name: str
    bound_uid: str  # "" when the request names no uid


def _invalid(service_account: str, field_path: str, value: Any, message: str) -> ApiError:
    text = f"Invalid value: {json.dumps(value)}: {message}"  # as Go prints it: 60, "name"
    return ApiError(422, "Invalid", f'TokenRequest.{TOKEN_GROUP} "{service_account}" is invalid: {field_path}: '
                    f"{text}", {"name": service_account, "group": TOKEN_GROUP, "kind": "TokenRequest",
                                "causes": [{"reason": "FieldValueInvalid", "message": text, "field": field_path}]})


def token_request(service_account: str, body: Any) -> TokenRequestSpec:
    """Check a posted TokenRequest as kube-apiserver does (400 for a body that is not one, 422 for an
    expiration outside [10 min, 2^32 s], 400 for a bound object other than a Pod)."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the request body must be a JSON object")
    if body.get("kind", "TokenRequest") != "TokenRequest":
        raise ApiError(400, "BadRequest", f"the kind of the body ({body.get('kind')}) is not TokenRequest")
    spec = body.get("spec") or {}
    if not isinstance(spec, dict):
        raise ApiError(400, "BadRequest", "spec must be an object")
    audiences = spec.get("audiences") or [API_AUDIENCE]
    if not isinstance(audiences, list) or not all(isinstance(a, str) and a for a in audiences):
        raise _invalid(service_account, "spec.audiences", audiences, "must be a list of non-empty strings")
    seconds = spec.get("expirationSeconds")
    seconds = DEFAULT_EXPIRATION if seconds is None else seconds
    if not isinstance(seconds, int) or isinstance(seconds, bool):
        raise ApiError(400, "BadRequest", f"spec.expirationSeconds: {seconds!r} is not an integer")
    if seconds < MIN_EXPIRATION:
        raise _invalid(service_account, "spec.expirationSeconds", seconds,
                       "may not specify a duration less than 10 minutes")
    if seconds > MAX_EXPIRATION:
        raise _invalid(service_account, "spec.expirationSeconds", seconds,
                       "may not specify a duration larger than 2^32 seconds")
    ref = spec.get("boundObjectRef")
    if not ref:
        return TokenRequestSpec(tuple(audiences), seconds, "", "", "")
    if not isinstance(ref, dict):
        raise ApiError(400, "BadRequest", "spec.boundObjectRef must be an object")
    api_version, kind = str(ref.get("apiVersion") or "v1"), str(ref.get("kind") or "")
    group, _, version = api_version.rpartition("/")
    if group or kind != "Pod":
        raise ApiError(400, "BadRequest", f"cannot bind token to object of type {group}/{version}, Kind={kind}")
    name = str(ref.get("name") or "")
    if not name:
        raise _invalid(service_account, "spec.boundObjectRef.name", name, "name is required")
    return TokenRequestSpec(tuple(audiences), seconds, "Pod", name, str(ref.get("uid") or ""))


def token_request_answer(namespace: str, service_account: str, request: TokenRequestSpec, token: str,
                         expires: float, pod_uid: str) -> dict[str, Any]:
    """The TokenRequest the server answers with (201): the spec as applied and the token."""
    spec: dict[str, Any] = {"audiences": list(request.audiences), "expirationSeconds": request.expiration_seconds,
                            "boundObjectRef": None}
    if request.bound_kind:
        spec["boundObjectRef"] = {"kind": request.bound_kind, "apiVersion": "v1", "name": request.bound_name,
                                  "uid": pod_uid}
    return {"kind": "TokenRequest", "apiVersion": f"{TOKEN_GROUP}/v1",
            "metadata": {"name": service_account, "namespace": namespace,
                         "creationTimestamp": _timestamp(time.time())},
            "spec": spec, "status": {"token": token, "expirationTimestamp": _timestamp(expires)}}


def _timestamp(unix: float) -> str:
    return datetime.fromtimestamp(int(unix), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
