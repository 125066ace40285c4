"""L4 authorization: policy selection, DENY before ALLOW, every match field, PeerAuthentication modes."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.decode import decode
from nodeagent.model import AuthorizationPolicy, Kind, ObjectRef, PeerAuthentication, PeerAuthenticationMode
from nodeagent.ztunnel.authz import Authorizer, pattern_matches
from nodeagent.ztunnel.identity import SpiffeId

WEB = {"app": "web"}
CLIENT = SpiffeId("cluster.local", "shop", "client")
OTHER = SpiffeId("cluster.local", "other", "robot")


def policy(name: str, spec: dict[str, Any], namespace: str = "shop") -> AuthorizationPolicy:
    decoded = decode({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                      "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    assert isinstance(decoded.obj, AuthorizationPolicy), decoded.rejections
    return decoded.obj


def peer(name: str, mode: str, namespace: str = "shop", selector: dict[str, str] | None = None) -> PeerAuthentication:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    decoded = decode({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                      "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    assert isinstance(decoded.obj, PeerAuthentication), decoded.rejections
    return decoded.obj


def allow_from(*principals: str, **extra: Any) -> dict[str, Any]:
    return {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": list(principals), **extra}}]}]}


def test_no_policy_allows_everything_including_plaintext() -> None:
    verdict = Authorizer([], []).check("shop", WEB, 8080, None)
    assert verdict.allowed and verdict.reason == "allowed: no ALLOW policy applies" and verdict.policy is None


def test_an_allow_policy_admits_only_what_it_matches_and_names_the_rule() -> None:
    authz = Authorizer([policy("p", {**allow_from("cluster.local/ns/other/sa/robot"), "selector": {
        "matchLabels": WEB}}), policy("q", {"action": "ALLOW", "rules": [
            {"to": [{"operation": {"ports": ["9090"]}}]},
            {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}]})], [])
    verdict = authz.check("shop", WEB, 8080, CLIENT)
    assert verdict.allowed and verdict.reason == "allowed by ALLOW policy shop/q rule 1"
    assert (verdict.policy, verdict.rule) == (ObjectRef(Kind.AUTHORIZATION_POLICY, "shop", "q"), 1)
    denied = authz.check("shop", WEB, 8080, SpiffeId("cluster.local", "shop", "stranger"))
    assert not denied.allowed and denied.reason == "no ALLOW policy matched (shop/p, shop/q)"
    assert authz.check("shop", WEB, 9090, SpiffeId("cluster.local", "shop", "stranger")).allowed


def test_deny_wins_over_allow() -> None:
    authz = Authorizer([policy("allow-all", {"action": "ALLOW", "rules": [{}]}),
                        policy("deny-other", {"action": "DENY", "rules": [{"from": [{"source": {
                            "namespaces": ["other"]}}]}]})], [])
    verdict = authz.check("shop", WEB, 8080, OTHER)
    assert not verdict.allowed and verdict.reason == "denied by DENY policy shop/deny-other rule 0"
    assert authz.check("shop", WEB, 8080, CLIENT).reason == "allowed by ALLOW policy shop/allow-all rule 0"


def test_an_allow_policy_without_rules_allows_nothing_and_a_deny_without_rules_denies_nothing() -> None:
    assert not Authorizer([policy("nothing", {"action": "ALLOW"})], []).check("shop", WEB, 80, CLIENT).allowed
    assert Authorizer([policy("noop", {"action": "DENY"})], []).check("shop", WEB, 80, CLIENT).allowed


def test_selectors_and_namespaces_decide_which_policies_apply() -> None:
    authz = Authorizer([policy("db-only", {"action": "ALLOW", "selector": {"matchLabels": {"app": "db"}}}),
                        policy("elsewhere", {"action": "ALLOW"}, namespace="other")], [])
    assert authz.check("shop", WEB, 80, CLIENT).reason == "allowed: no ALLOW policy applies"
    assert not authz.check("shop", {"app": "db", "tier": "x"}, 80, CLIENT).allowed
    assert not authz.check("other", WEB, 80, CLIENT).allowed


def test_root_namespace_policies_apply_in_every_namespace_with_their_selector() -> None:
    root = [policy("deny-robots", {"action": "DENY", "rules": [{"from": [{"source": {
        "principals": ["*/sa/robot"]}}]}]}, namespace="istio-system"),
            policy("web-ports", {"action": "ALLOW", "selector": {"matchLabels": WEB}, "rules": [
                {"to": [{"operation": {"ports": ["8080"]}}]}]}, namespace="istio-system")]
    authz = Authorizer(root, [])
    assert authz.check("shop", WEB, 8080, OTHER).reason == "denied by DENY policy istio-system/deny-robots rule 0"
    assert authz.check("shop", WEB, 8080, CLIENT).allowed
    assert not authz.check("shop", WEB, 9090, CLIENT).allowed
    assert authz.check("shop", {"app": "db"}, 9090, CLIENT).allowed
    assert Authorizer(root, [], root_namespace="mesh-root").check("shop", WEB, 8080, OTHER).allowed


@pytest.mark.parametrize(("source", "source_identity", "allowed"), [
    ({"principals": ["cluster.local/ns/shop/sa/client"]}, CLIENT, True),
    ({"principals": ["cluster.local/ns/shop/*"]}, CLIENT, True),
    ({"principals": ["*/sa/client"]}, CLIENT, True),
    ({"principals": ["*"]}, CLIENT, True),
    ({"principals": ["*"]}, None, False),
    ({"principals": ["cluster.local/ns/shop/sa/clientele"]}, CLIENT, False),
    ({"notPrincipals": ["cluster.local/ns/shop/*"]}, CLIENT, False),
    ({"notPrincipals": ["cluster.local/ns/shop/*"]}, OTHER, True),
    ({"notPrincipals": ["*"]}, None, True),
    ({"namespaces": ["shop"]}, CLIENT, True),
    ({"namespaces": ["sh*"]}, CLIENT, True),
    ({"namespaces": ["*op"]}, OTHER, False),
    ({"namespaces": ["*"]}, None, False),
    ({"notNamespaces": ["shop"]}, CLIENT, False),
    ({"notNamespaces": ["shop"]}, None, True),
    ({"principals": ["*"], "namespaces": ["other"]}, CLIENT, False),  # every field must match
    ({"principals": ["cluster.local/ns/x/sa/y", "*/sa/robot"], "notNamespaces": ["shop"]}, OTHER, True),
])
def test_source_fields_match_as_istio(source: dict[str, Any], source_identity: SpiffeId | None,
                                     allowed: bool) -> None:
    authz = Authorizer([policy("p", {"action": "ALLOW", "rules": [{"from": [{"source": source}]}]})], [])
    assert authz.check("shop", WEB, 8080, source_identity).allowed is allowed


@pytest.mark.parametrize(("operation", "port", "allowed"), [
    ({"ports": ["8080", "9090"]}, 9090, True), ({"ports": ["8080"]}, 9090, False),
    ({"notPorts": ["8080"]}, 8080, False), ({"notPorts": ["8080"]}, 9090, True),
    ({"ports": ["8080", "9090"], "notPorts": ["9090"]}, 9090, False),
])
def test_ports_and_not_ports(operation: dict[str, Any], port: int, allowed: bool) -> None:
    authz = Authorizer([policy("p", {"action": "ALLOW", "rules": [{"to": [{"operation": operation}]}]})], [])
    assert authz.check("shop", WEB, port, CLIENT).allowed is allowed


def test_a_rule_needs_a_matching_source_and_a_matching_operation() -> None:
    authz = Authorizer([policy("p", {"action": "ALLOW", "rules": [{
        "from": [{"source": {"namespaces": ["other"]}}, {"source": {"principals": ["*/sa/client"]}}],
        "to": [{"operation": {"ports": ["8080"]}}]}]})], [])
    assert authz.check("shop", WEB, 8080, CLIENT).allowed and authz.check("shop", WEB, 8080, OTHER).allowed
    assert not authz.check("shop", WEB, 9090, CLIENT).allowed


def test_strict_peer_authentication_refuses_plaintext_and_permissive_accepts_it() -> None:
    allow_any = [policy("any", {"action": "ALLOW", "rules": [{}]})]
    strict = Authorizer(allow_any, [peer("strict", "STRICT")])
    verdict = strict.check("shop", WEB, 8080, None)
    assert not verdict.allowed
    assert verdict.reason == "plaintext refused: mTLS is STRICT (PeerAuthentication shop/strict)"
    assert strict.check("shop", WEB, 8080, CLIENT).allowed  # mTLS is what STRICT asks for
    assert Authorizer(allow_any, [peer("p", "PERMISSIVE")]).check("shop", WEB, 8080, None).allowed


def test_peer_authentication_precedence_workload_then_namespace_then_mesh_then_permissive() -> None:
    mesh = peer("mesh", "STRICT", namespace="istio-system")
    namespace = peer("ns", "PERMISSIVE")
    workload = peer("web", "STRICT", selector=WEB)
    authz = Authorizer([], [mesh, namespace, workload])
    assert authz.mode("shop", WEB) == (PeerAuthenticationMode.STRICT, workload.ref)
    assert authz.mode("shop", {"app": "db"}) == (PeerAuthenticationMode.PERMISSIVE, namespace.ref)
    assert authz.mode("other", WEB) == (PeerAuthenticationMode.STRICT, mesh.ref)
    assert Authorizer([], []).mode("shop", WEB) == (PeerAuthenticationMode.PERMISSIVE, None)
    # a selector in the root namespace is a workload policy of that namespace, not mesh-wide
    assert Authorizer([], [peer("sel", "STRICT", "istio-system", WEB)]).mode("shop", WEB)[1] is None
    assert not Authorizer([], [mesh]).check("other", WEB, 80, None).allowed


@pytest.mark.parametrize(("pattern", "value", "matches"), [
    ("*", "x", True), ("*", "", False), ("*", None, False), ("a/*", "a/b", True), ("a/*", "b/a", False),
    ("*/b", "a/b", True), ("*/b", "a/bc", False), ("a/b", "a/b", True), ("a/b", "a/b/", False),
    ("a*b", "a*b", True), ("a*b", "axb", False),  # `*` only at an end is a wildcard
])
def test_patterns_match_as_prefix_suffix_presence_or_exact(pattern: str, value: str | None, matches: bool) -> None:
    assert pattern_matches(pattern, value) is matches
