"""L4 authorization of inbound connections: AuthorizationPolicy and PeerAuthentication, as Istio ambient's
ztunnel enforces them. Pure: `Authorizer.check()` takes one `AuthzRequest` (the destination workload, its
address and port, the source's identity, None for plaintext, and address) and returns a `Verdict` that
names the policy and rule deciding.

Which policies apply to a workload: those in its namespace whose selector matches its labels (no
selector, or an empty one, selects every workload of the namespace), and those in the root namespace
(`istio-system` by default, Istio's meshConfig.rootNamespace, so mesh-wide policies written for Istio
work unchanged), which apply in every namespace, their selector matched against the workload's labels.
A policy with `targetRefs` (meant for a waypoint or gateway, which ztunnel leaves alone) is applied by its
selector all the same, namespace-wide without one: nodeagent runs no waypoint, and applying a policy to
more workloads only ever narrows access (the decoder reports it).

Order, as ztunnel's `assert_rbac` (src/state.rs): plaintext is refused first where the PeerAuthentication
mode is STRICT (for the port: see below); then any matching DENY policy denies; then, if no ALLOW policy
applies, the connection is allowed; if any applies, one of their rules must match. A policy with no rules
matches nothing (an ALLOW policy without rules allows nothing); a rule with no `from`, `to` and `when`
matches everything (`rules: [{}]`). AUDIT and CUSTOM policies are ignored, as ztunnel ignores them
(istiod does not send them to it: "ztunnel does not support the ... action"); they never widen access,
since a policy that is ignored allows nothing either.

Matching, as ztunnel's src/rbac.rs (`Authorization::matches`): a rule matches when any of its sources
matches (or it has none), any of its operations matches (or none) and every `when` condition matches;
within a source, an operation or a condition every non-empty field must match, a positive list when any
entry matches, a negative list (`notPrincipals`, ...) when none does. Principals are written without the
scheme (`cluster.local/ns/a/sa/b`) and with namespaces accept `*` alone (anything present), `prefix*`
and `*suffix`. Service accounts (`ns/sa`, or `sa` in the policy's namespace) compare the identity's
namespace and service account exactly, whatever its trust domain. A plaintext source has no principal,
namespace or service account: `principals`/`namespaces`/`serviceAccounts` never match it, their `not`
forms always do (so a DENY with `notPrincipals: ["*"]` refuses plaintext, the usual Istio idiom).
`ipBlocks` and `remoteIpBlocks` (and `when` on `source.ip` and `remote.ip`) compare the connection's
peer address; `ports` and `destination.port` the destination port the workload listens on;
`destination.ip` the address the connection was made to.

Failing closed. A part the tunnel cannot enforce (an L7 attribute: `methods`, `paths`, `hosts`,
`requestPrincipals`, a `when` on `request.*` or `connection.sni`; an unknown field; a value it cannot
read) is kept on the rule as `Unenforceable` by `nodeagent.cluster.decode`, with ztunnel's semantics (istiod's
handleRule, pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go: "L7 policies never match
for ALLOW; for DENY they will always match, so it is more restrictive"; Istio's docs, ambient L4 policy:
"ztunnel proxy will simply drop all traffic as a defensive move"): an ALLOW rule holding one matches
nothing, a DENY rule holding one denies on its L4 parts alone (the unenforceable parts are taken as
matching). ztunnel itself skips an empty match, so for a DENY whose only `from` is L7 (or a `when` on an
L7 key) it matches nothing; we follow the documented intent instead, which is the restrictive one. The
same holds for what a request does not tell: a peer address that is not known or not parseable is taken
as matching in a DENY rule and as not matching in an ALLOW rule. So no unenforceable part ever widens
access; the verdict names it when it decides (a DENY) or when it made an ALLOW rule match nothing.

PeerAuthentication mode for a workload, as istiod resolves it for ambient
(convertedSelectorPeerAuthentications and convertPeerAuthentication in the same file): the mesh policy
(root namespace, no selector), overridden by the namespace's policy without selector unless its mode is
UNSET, overridden by the workload's policy (its namespace, selector matching) unless UNSET; PERMISSIVE
when nothing is set. DISABLE counts as PERMISSIVE (ambient cannot turn mTLS off, and istiod treats it as
not STRICT). Policies with a selector in the root namespace are ignored (Istio's PeerAuthentication docs).
The workload's policy's `portLevelMtls` then sets the mode of single ports (UNSET inherits the
workload's mode). Several at one level: the first by name decides (Istio takes the oldest; creation
times are not in the model).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from nodeagent.ca.identity import SpiffeId
from nodeagent.cluster.model import (
    AuthorizationPolicy,
    IPAddress,
    IPNetwork,
    ObjectRef,
    PeerAuthentication,
    PeerAuthenticationMode,
    PolicyAction,
    PolicyOperation,
    PolicyRule,
    PolicySource,
    Unenforceable,
)
from nodeagent.state.tracker import Snapshot

DEFAULT_ROOT_NAMESPACE = "istio-system"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """One inbound connection as L4 authorization sees it."""

    namespace: str  # destination workload's namespace
    labels: Mapping[str, str]  # destination workload's current labels
    destination_ip: str
    port: int  # destination port (the app's)
    source: SpiffeId | None  # None: plaintext
    source_ip: str | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a connection may proceed, and why (the policy `ns/name` and rule index that decided)."""

    allowed: bool
    reason: str
    policy: ObjectRef | None = None
    rule: int | None = None


@dataclass(frozen=True, slots=True)
class _Connection:
    """What the matchers compare: the request with its strings parsed once."""

    port: int
    principal: str | None
    namespace: str | None
    service_account: tuple[str, str] | None
    peer: IPAddress | None  # None: not known or not parseable
    destination: IPAddress | None

    @classmethod
    def of(cls, request: AuthzRequest) -> _Connection:
        source = request.source
        return cls(port=request.port,
                   principal=f"{source.trust_domain}/ns/{source.namespace}/sa/{source.service_account}"
                   if source else None,
                   namespace=source.namespace if source else None,
                   service_account=(source.namespace, source.service_account) if source else None,
                   peer=_address(request.source_ip), destination=_address(request.destination_ip))


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

    def mode(self, namespace: str, labels: Mapping[str, str], port: int | None = None
             ) -> tuple[PeerAuthenticationMode, ObjectRef | None]:
        """The effective mTLS mode (STRICT or PERMISSIVE) of a workload, on `port` if given (portLevelMtls),
        and the PeerAuthentication that sets it (None: nothing set, the PERMISSIVE default)."""
        mode, ref, _ = self._mode(namespace, labels, port)
        return mode, ref

    def _mode(self, namespace: str, labels: Mapping[str, str], port: int | None
              ) -> tuple[PeerAuthenticationMode, ObjectRef | None, bool]:
        """`mode()`, and whether a portLevelMtls entry decided it."""
        local = self._peer.get(namespace, ())
        levels = [next((p for p in self._peer.get(self.root_namespace, ()) if not p.selector), None),
                  next((p for p in local if not p.selector), None) if namespace != self.root_namespace else None,
                  next((p for p in local if p.selector and namespace != self.root_namespace
                        and _selects(p.selector, labels)), None)]
        mode, ref, by_port = PeerAuthenticationMode.PERMISSIVE, None, False
        for peer in levels:  # mesh, namespace, workload: a set mode overrides the level above
            if peer is not None and peer.mode is not PeerAuthenticationMode.UNSET:
                mode, ref = _effective(peer.mode), peer.ref
        workload = levels[2]
        if workload is not None and port is not None:
            port_mode = workload.port_level_mtls.get(port, PeerAuthenticationMode.UNSET)
            if port_mode is not PeerAuthenticationMode.UNSET:
                mode, ref, by_port = _effective(port_mode), workload.ref, True
        return mode, ref, by_port

    def check(self, request: AuthzRequest) -> Verdict:
        """May this connection proceed? PeerAuthentication first (plaintext where STRICT is refused), then
        DENY policies, then ALLOW policies (see the module doc)."""
        if request.source is None:
            mode, peer, by_port = self._mode(request.namespace, request.labels, request.port)
            if mode is PeerAuthenticationMode.STRICT:
                by = f"PeerAuthentication {peer.key}" if peer is not None else "the mesh default"
                where = f" on port {request.port} (portLevelMtls)" if by_port else ""
                return Verdict(False, f"plaintext refused: mTLS is STRICT{where} ({by})", peer)
        conn = _Connection.of(request)
        allows: list[AuthorizationPolicy] = []
        for policy in self._applicable(request.namespace, request.labels):
            if policy.action is PolicyAction.ALLOW:
                allows.append(policy)
            elif policy.action is PolicyAction.DENY:  # AUDIT, CUSTOM: ignored, as by ztunnel
                for index, rule in enumerate(policy.rules):
                    if _rule_matches(rule, conn, unknown=True):
                        return Verdict(False, f"denied by DENY policy {policy.ref.key} rule {index}"
                                              f"{_l4_alone(rule.all_unenforceable)}", policy.ref, index)
        if not allows:
            return Verdict(True, "allowed: no ALLOW policy applies")
        for policy in allows:
            for index, rule in enumerate(policy.rules):
                if not rule.all_unenforceable and _rule_matches(rule, conn, unknown=False):
                    return Verdict(True, f"allowed by ALLOW policy {policy.ref.key} rule {index}", policy.ref, index)
        return Verdict(False, f"no ALLOW policy matched ({', '.join(_describe_allow(p) for p in allows)})")

    def applicable(self, namespace: str, labels: Mapping[str, str]) -> list[AuthorizationPolicy]:
        """The AuthorizationPolicies that apply to a workload (for `inspect`), in evaluation order."""
        return list(self._applicable(namespace, labels))

    def _applicable(self, namespace: str, labels: Mapping[str, str]) -> Iterable[AuthorizationPolicy]:
        scopes = [self._policies.get(namespace, ())]
        if namespace != self.root_namespace:
            scopes.append(self._policies.get(self.root_namespace, ()))
        for policies in scopes:
            for policy in policies:
                if not policy.selector or _selects(policy.selector, labels):
                    yield policy


def _effective(mode: PeerAuthenticationMode) -> PeerAuthenticationMode:
    # DISABLE: plaintext accepted, like PERMISSIVE (istiod: "isMtlsModePermissive || isMtlsModeDisable").
    return PeerAuthenticationMode.STRICT if mode is PeerAuthenticationMode.STRICT else PeerAuthenticationMode.PERMISSIVE


def _l4_alone(parts: Sequence[Unenforceable]) -> str:
    return f" (on its L4 parts alone: {', '.join(map(str, parts))})" if parts else ""


def _describe_allow(policy: AuthorizationPolicy) -> str:
    """`ns/name`, with the rules that match nothing because of an unenforceable part."""
    skipped = [f"rule {i} matches nothing: {', '.join(map(str, r.all_unenforceable))}"
               for i, r in enumerate(policy.rules) if r.all_unenforceable]
    return f"{policy.ref.key} {'; '.join(skipped)}" if skipped else policy.ref.key


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _address(value: str | None) -> IPAddress | None:
    """A parsed address, IPv4-mapped IPv6 unwrapped (a dual-stack socket reports v4 peers so)."""
    if value is None:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _rule_matches(rule: PolicyRule, conn: _Connection, unknown: bool) -> bool:
    """Whether `rule` matches; `unknown` is what a field the request cannot tell (no peer address)
    counts as: True in a DENY rule, False in an ALLOW rule, so it never widens access."""
    return ((not rule.sources or any(_source_matches(s, conn, unknown) for s in rule.sources))
            and (not rule.operations or any(_operation_matches(o, conn, unknown) for o in rule.operations))
            and all(_source_matches(c.source, conn, unknown) and _operation_matches(c.operation, conn, unknown)
                    for c in rule.conditions))


def _source_matches(source: PolicySource, conn: _Connection, unknown: bool) -> bool:
    return (_list_matches(source.principals, source.not_principals, lambda p: pattern_matches(p, conn.principal))
            and _list_matches(source.namespaces, source.not_namespaces,
                              lambda p: pattern_matches(p, conn.namespace))
            and _list_matches(source.service_accounts, source.not_service_accounts,
                              lambda sa: sa == conn.service_account)
            and _networks_match(source.ip_blocks, source.not_ip_blocks, conn.peer, unknown)
            and _networks_match(source.remote_ip_blocks, source.not_remote_ip_blocks, conn.peer, unknown))


def _operation_matches(operation: PolicyOperation, conn: _Connection, unknown: bool) -> bool:
    return (_list_matches(operation.ports, operation.not_ports, lambda p: p == conn.port)
            and _networks_match(operation.destination_ips, operation.not_destination_ips, conn.destination,
                                unknown))


def _networks_match(positive: Sequence[IPNetwork], negative: Sequence[IPNetwork], address: IPAddress | None,
                    unknown: bool) -> bool:
    if not positive and not negative:
        return True
    if address is None:
        return unknown
    return _list_matches(positive, negative, lambda network: address in network)


def _list_matches(positive: Sequence[T], negative: Sequence[T], matches: Callable[[T], bool]) -> bool:
    """rbac.rs' matches_internal: any positive entry matches (or none given) and no negative one does."""
    if positive and not any(matches(p) for p in positive):
        return False
    return not (negative and any(matches(n) for n in negative))


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
