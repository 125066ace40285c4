"""L4 authorization of inbound connections: AuthorizationPolicy and PeerAuthentication, as Istio ambient's
ztunnel enforces them. Pure: `Authorizer.check()` takes the destination workload, the port and the
source's identity (None for plaintext) and returns a `Verdict` that names the policy and rule deciding.

Which policies apply to a workload: those in its namespace whose selector matches its labels (no
selector, or an empty one, selects every workload of the namespace), and those in the root namespace
(`istio-system` by default, Istio's meshConfig.rootNamespace, so mesh-wide policies written for Istio
work unchanged), which apply in every namespace, their selector matched against the workload's labels.

Order, as Istio's: a STRICT PeerAuthentication refuses plaintext first; then any matching DENY policy
denies; then, if no ALLOW policy applies, the connection is allowed; if any applies, one of their rules
must match. A policy with no rules matches nothing (an ALLOW policy without rules allows nothing); a rule
with no `from` and no `to` matches everything (`rules: [{}]`).

Matching, as ztunnel's src/rbac.rs: a rule matches when any of its sources matches (or it has none) and
any of its operations matches (or none); within a source or an operation every non-empty field must
match, a positive list when any entry matches, a negative list (`notPrincipals`, ...) when none does.
Principals are written without the scheme (`cluster.local/ns/a/sa/b`) and with namespaces accept `*`
alone (anything present), `prefix*` and `*suffix`. A plaintext source has no principal and no namespace:
`principals`/`namespaces` never match it, `notPrincipals`/`notNamespaces` always do (so a DENY with
`notPrincipals: ["*"]` refuses plaintext, the usual Istio idiom). Ports are the destination port the
workload listens on.

PeerAuthentication mode for a workload: the policy in its namespace whose selector matches it, else the
namespace's policy without selector, else the root namespace's policy without selector, else PERMISSIVE
(Istio's default). Several at one level: the first by name decides (Istio takes the oldest; creation
times are not in the model). A policy without a mode is decoded as PERMISSIVE, where Istio would inherit
the level above (UNSET); see `nodeagent.decode`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nodeagent.model import (
    AuthorizationPolicy,
    ObjectRef,
    PeerAuthentication,
    PeerAuthenticationMode,
    PolicyAction,
    PolicyOperation,
    PolicyRule,
    PolicySource,
)
from nodeagent.state import Snapshot
from nodeagent.ztunnel.identity import SpiffeId

DEFAULT_ROOT_NAMESPACE = "istio-system"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a connection may proceed, and why (the policy `ns/name` and rule index that decided)."""

    allowed: bool
    reason: str
    policy: ObjectRef | None = None
    rule: int | None = None


class Authorizer:
    """The policies of one snapshot, indexed by namespace; rebuild it when the policies change."""

    def __init__(self, policies: Iterable[AuthorizationPolicy], peer_authentications: Iterable[PeerAuthentication],
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> None:
        self.root_namespace = root_namespace
        self._policies: dict[str, list[AuthorizationPolicy]] = {}
        for policy in sorted(policies, key=lambda p: p.ref):
            self._policies.setdefault(policy.ref.namespace, []).append(policy)
        self._peer: dict[str, list[PeerAuthentication]] = {}
        for peer in sorted(peer_authentications, key=lambda p: p.ref):
            self._peer.setdefault(peer.ref.namespace, []).append(peer)

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> Authorizer:
        """The authorizer for the policies of `snapshot`."""
        return cls(snapshot.authorization_policies.values(), snapshot.peer_authentications.values(), root_namespace)

    def __repr__(self) -> str:
        return (f"<Authorizer root={self.root_namespace} policies={sum(map(len, self._policies.values()))} "
                f"peer_authentications={sum(map(len, self._peer.values()))}>")

    def mode(self, namespace: str, labels: Mapping[str, str]) -> tuple[PeerAuthenticationMode, ObjectRef | None]:
        """The mTLS mode of a workload and the PeerAuthentication that sets it (None: the mesh default)."""
        local = self._peer.get(namespace, ())
        for peer in local:
            if peer.selector and _selects(peer.selector, labels):
                return peer.mode, peer.ref
        for peers in (local, self._peer.get(self.root_namespace, ())):
            for peer in peers:
                if not peer.selector:
                    return peer.mode, peer.ref
        return PeerAuthenticationMode.PERMISSIVE, None

    def check(self, namespace: str, labels: Mapping[str, str], port: int, source: SpiffeId | None) -> Verdict:
        """May `source` (None: a plaintext connection) reach `port` of the workload `namespace` + `labels`?"""
        if source is None:
            mode, peer = self.mode(namespace, labels)
            if mode is PeerAuthenticationMode.STRICT:
                by = f"PeerAuthentication {peer.key}" if peer is not None else "the mesh default"
                return Verdict(False, f"plaintext refused: mTLS is STRICT ({by})", peer)
        principal = f"{source.trust_domain}/ns/{source.namespace}/sa/{source.service_account}" if source else None
        source_namespace = source.namespace if source else None
        allows: list[AuthorizationPolicy] = []
        for policy in self._applicable(namespace, labels):
            if policy.action is PolicyAction.ALLOW:
                allows.append(policy)
                continue
            rule = _matching_rule(policy.rules, port, principal, source_namespace)
            if rule is not None:
                return Verdict(False, f"denied by DENY policy {policy.ref.key} rule {rule}", policy.ref, rule)
        if not allows:
            return Verdict(True, "allowed: no ALLOW policy applies")
        for policy in allows:
            rule = _matching_rule(policy.rules, port, principal, source_namespace)
            if rule is not None:
                return Verdict(True, f"allowed by ALLOW policy {policy.ref.key} rule {rule}", policy.ref, rule)
        return Verdict(False, f"no ALLOW policy matched ({', '.join(p.ref.key for p in allows)})")

    def _applicable(self, namespace: str, labels: Mapping[str, str]) -> Iterable[AuthorizationPolicy]:
        scopes = [self._policies.get(namespace, ())]
        if namespace != self.root_namespace:
            scopes.append(self._policies.get(self.root_namespace, ()))
        for policies in scopes:
            for policy in policies:
                if not policy.selector or _selects(policy.selector, labels):
                    yield policy


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _matching_rule(rules: Sequence[PolicyRule], port: int, principal: str | None,
                   namespace: str | None) -> int | None:
    """The index of the first rule that matches, or None."""
    for index, rule in enumerate(rules):
        if ((not rule.sources or any(_source_matches(s, principal, namespace) for s in rule.sources))
                and (not rule.operations or any(_operation_matches(o, port) for o in rule.operations))):
            return index
    return None


def _source_matches(source: PolicySource, principal: str | None, namespace: str | None) -> bool:
    return (_list_matches(source.principals, source.not_principals, principal)
            and _list_matches(source.namespaces, source.not_namespaces, namespace))


def _operation_matches(operation: PolicyOperation, port: int) -> bool:
    return ((not operation.ports or port in operation.ports)
            and (not operation.not_ports or port not in operation.not_ports))


def _list_matches(positive: Sequence[str], negative: Sequence[str], value: str | None) -> bool:
    if positive and not any(pattern_matches(p, value) for p in positive):
        return False
    return not (negative and any(pattern_matches(p, value) for p in negative))


def pattern_matches(pattern: str, value: str | None) -> bool:
    """Istio's string match: `*` = any non-empty value, `prefix*`, `*suffix`, else exact; None never matches."""
    if not value:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern
