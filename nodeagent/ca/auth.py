"""Who is asking the CA: `Authenticator`s that turn a bearer token into the caller's node.

- `TokenReviewAuthenticator` (the default, in a cluster): the tunnel's projected ServiceAccount token
  (audience-bound, short-lived, rotated by the kubelet) is checked by the API server with a TokenReview;
  only the tunnel's ServiceAccount is accepted, and the node is the one the tunnel's own pod is scheduled
  on (the pod the token is bound to, its uid checked), never a node the caller names. Accepted reviews
  are cached for a bounded time, so a burst of CSRs (a node starting many pods) costs one review.
- `StaticTokens` (lab and development only): one token file per node in a directory; the file's name
  is the node. No API server is involved, so nothing proves where the caller runs: never use it in a
  cluster.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import structlog

from nodeagent.ca.service import Caller, CaMetrics, Refused
from nodeagent.cluster.discovery.tokenreview import NODE_NAME, POD_NAME, POD_UID, PodBinding, TokenReview

log = structlog.get_logger("nodeagent.ca.auth")

DEFAULT_AUDIENCE = "nodeagent-ca"
DEFAULT_TUNNEL_ACCOUNT = ("nodeagent", "nodeagent-ztunnel")  # daemonset/base/ztunnel.yaml's ServiceAccount
DEFAULT_CACHE_TTL = 60.0
DEFAULT_CACHE_SIZE = 4096


class TokenReviewer(Protocol):
    """The API calls the TokenReview authenticator makes (`ReviewConnection`; a fake in unit tests).
    Both raise when the API server cannot answer."""

    def review(self, token: str, audiences: Sequence[str]) -> TokenReview: ...

    def pod(self, namespace: str, name: str) -> PodBinding | None: ...


@dataclass(frozen=True)
class _Cached:
    caller: Caller
    expires: float  # monotonic


class TokenReviewAuthenticator:
    """Projected ServiceAccount tokens of the tunnel's ServiceAccount, reviewed by the API server."""

    def __init__(self, reviewer: TokenReviewer, audience: str = DEFAULT_AUDIENCE,
                 tunnel_account: tuple[str, str] = DEFAULT_TUNNEL_ACCOUNT, *, cache_ttl: float = DEFAULT_CACHE_TTL,
                 cache_size: int = DEFAULT_CACHE_SIZE, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, metrics: CaMetrics | None = None) -> None:
        self.reviewer, self.audience, self.tunnel_account = reviewer, audience, tunnel_account
        self.cache_ttl, self.cache_size, self.clock, self.wall_clock = cache_ttl, cache_size, clock, wall_clock
        self.metrics = metrics or CaMetrics()
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._lock = threading.Lock()

    def authenticate(self, token: str) -> Caller:
        """The node of the tunnel pod `token` is bound to; `Refused` naming why not."""
        key = hashlib.sha256(token.encode()).digest()  # the cache never holds a usable token
        now = self.clock()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and now < cached.expires:
                self.metrics.reviews.labels("cached").inc()
                return cached.caller
        caller = self._review(token)
        # Bounded by the cache TTL and by the token's own expiry: an expired token is reviewed (and
        # refused) again, and a pod deleted since is noticed within the TTL.
        lifetime = min(self.cache_ttl, _seconds_left(token, self.wall_clock()))
        if lifetime > 0:
            with self._lock:
                self._cache[key] = _Cached(caller, now + lifetime)
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return caller

    def _review(self, token: str) -> Caller:
        namespace, account = self.tunnel_account
        try:
            review = self.reviewer.review(token, [self.audience])
        except Exception as exc:  # the API server's errors have no common base (ApiError, urllib3, OSError)
            raise Refused(grpc.StatusCode.UNAVAILABLE, "token_review_failed",
                          f"the API server could not review the token: {exc}") from exc
        finally:
            self.metrics.reviews.labels("sent").inc()
        if not review.authenticated:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "token_invalid",
                          f"the API server rejected the token: {review.error or 'not authenticated'}")
        if self.audience not in review.audiences:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "wrong_audience",
                          f"the token is not for audience {self.audience!r} (it is for {list(review.audiences)})")
        expected = f"system:serviceaccount:{namespace}:{account}"
        if review.username != expected:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "not_the_tunnel_account",
                          f"{review.username} is not the tunnel's service account {namespace}/{account}")
        pod_name, pod_uid = review.extra_value(POD_NAME), review.extra_value(POD_UID)
        if not pod_name or not pod_uid:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "token_not_pod_bound",
                          f"the token of {expected} is not bound to a pod (a projected token is needed)")
        try:
            pod = self.reviewer.pod(namespace, pod_name)
        except Exception as exc:  # as above
            raise Refused(grpc.StatusCode.UNAVAILABLE, "pod_lookup_failed",
                          f"the API server could not say where pod {namespace}/{pod_name} runs: {exc}") from exc
        if pod is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "tunnel_pod_gone",
                          f"the token is bound to pod {namespace}/{pod_name}, which no longer exists")
        if pod.uid != pod_uid:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "tunnel_pod_uid_mismatch",
                          f"the token is bound to pod {namespace}/{pod_name} uid {pod_uid}, but that pod is now "
                          f"uid {pod.uid} (a token of a deleted pod)")
        if not pod.node_name:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "tunnel_pod_unscheduled",
                          f"pod {namespace}/{pod_name} is not scheduled on a node")
        claimed = review.extra_value(NODE_NAME)  # set by API servers since 1.30: must agree with the pod
        if claimed and claimed != pod.node_name:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "node_mismatch",
                          f"the token names node {claimed}, but pod {namespace}/{pod_name} runs on {pod.node_name}")
        log.info("tunnel authenticated", node=pod.node_name, pod=f"{namespace}/{pod_name}", uid=pod_uid)
        return Caller(pod.node_name, f"{review.username} (pod {namespace}/{pod_name})")


def _seconds_left(token: str, now: float) -> float:
    """Seconds until the token's `exp` claim, or infinity when it carries none we can read.

    Read without verifying the signature, only to bound how long an accepted review is reused; the
    API server verified the token itself.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return float("inf")
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return float(claims["exp"]) - now
    except (ValueError, KeyError, TypeError):
        return float("inf")


class StaticTokens:
    """Lab and development only: `<directory>/<node>` holds that node's token (read at every request, so a
    replaced file takes effect at once). Nothing proves the caller runs on the node: never in a cluster."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def authenticate(self, token: str) -> Caller:
        """The node whose token file holds `token`; `Refused` (UNAUTHENTICATED) otherwise."""
        try:
            files = sorted(p for p in self.directory.iterdir() if p.is_file())
        except OSError as exc:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "token_files_unreadable",
                          f"the CA cannot read its token directory: {exc}") from exc
        for path in files:
            try:
                known = path.read_text().strip()
            except OSError:
                continue
            if known and hmac.compare_digest(known.encode(), token.encode()):
                return Caller(path.name, f"static token of node {path.name}")
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "token_invalid", "the token is not a known node token")
