"""L4 authorization: policy selection, DENY before ALLOW, every match field under both actions, parts the
tunnel cannot enforce (never widening access, a property), PeerAuthentication modes with inheritance and
portLevelMtls."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.ca.identity import SpiffeId
from nodeagent.cluster.decode import decode
from nodeagent.cluster.model import AuthorizationPolicy, Kind, ObjectRef, PeerAuthentication, PeerAuthenticationMode
from nodeagent.tunnel.state.authz import Authorizer, AuthzRequest, Verdict, pattern_matches

WEB = {"app": "web"}
CLIENT = SpiffeId("cluster.local", "shop", "client")
OTHER = SpiffeId("cluster.local", "other", "robot")
CLIENT_IP, WEB_IP = "10.244.1.5", "10.244.2.2"


def policy(name: str, spec: dict[str, Any], namespace: str = "shop") -> AuthorizationPolicy:
    decoded = decode({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                      "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    assert isinstance(decoded.obj, AuthorizationPolicy), decoded.rejections
    return decoded.obj


def peer(name: str, mode: str | None, namespace: str = "shop", selector: dict[str, str] | None = None,
         ports: dict[str, str] | None = None) -> PeerAuthentication:
    spec: dict[str, Any] = {"mtls": {"mode": mode} if mode else {}}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports is not None:
        spec["portLevelMtls"] = {port: {"mode": m} for port, m in ports.items()}
    decoded = decode({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                      "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    assert isinstance(decoded.obj, PeerAuthentication), decoded.rejections
    return decoded.obj


def check(authz: Authorizer, port: int = 8080, source: SpiffeId | None = CLIENT, labels: dict[str, str] | None = None,
          namespace: str = "shop", source_ip: str | None = CLIENT_IP, destination_ip: str = WEB_IP) -> Verdict:
    return authz.check(AuthzRequest(namespace, WEB if labels is None else labels, destination_ip, port, source,
                                    source_ip))


def allow_from(*principals: str, **extra: Any) -> dict[str, Any]:
    return {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": list(principals), **extra}}]}]}


def test_no_policy_allows_everything_including_plaintext() -> None:
    verdict = check(Authorizer([], []), source=None)
    assert verdict.allowed and verdict.reason == "allowed: no ALLOW policy applies" and verdict.policy is None


def test_an_allow_policy_admits_only_what_it_matches_and_names_the_rule() -> None:
    authz = Authorizer([policy("p", {**allow_from("cluster.local/ns/other/sa/robot"), "selector": {
        "matchLabels": WEB}}), policy("q", {"action": "ALLOW", "rules": [
            {"to": [{"operation": {"ports": ["9090"]}}]},
            {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}]})], [])
    verdict = check(authz)
    assert verdict.allowed and verdict.reason == "allowed by ALLOW policy shop/q rule 1"
    assert (verdict.policy, verdict.rule) == (ObjectRef(Kind.AUTHORIZATION_POLICY, "shop", "q"), 1)
    stranger = SpiffeId("cluster.local", "shop", "stranger")
    denied = check(authz, source=stranger)
    assert not denied.allowed and denied.reason == "no ALLOW policy matched (shop/p, shop/q)"
    assert check(authz, 9090, stranger).allowed


def test_deny_wins_over_allow() -> None:
    authz = Authorizer([policy("allow-all", {"action": "ALLOW", "rules": [{}]}),
                        policy("deny-other", {"action": "DENY", "rules": [{"from": [{"source": {
                            "namespaces": ["other"]}}]}]})], [])
    verdict = check(authz, source=OTHER)
    assert not verdict.allowed and verdict.reason == "denied by DENY policy shop/deny-other rule 0"
    assert check(authz).reason == "allowed by ALLOW policy shop/allow-all rule 0"


def test_an_allow_policy_without_rules_allows_nothing_and_a_deny_without_rules_denies_nothing() -> None:
    assert not check(Authorizer([policy("nothing", {"action": "ALLOW"})], [])).allowed
    assert check(Authorizer([policy("noop", {"action": "DENY"})], [])).allowed


def test_selectors_and_namespaces_decide_which_policies_apply() -> None:
    authz = Authorizer([policy("db-only", {"action": "ALLOW", "selector": {"matchLabels": {"app": "db"}}}),
                        policy("elsewhere", {"action": "ALLOW"}, namespace="other")], [])
    assert check(authz).reason == "allowed: no ALLOW policy applies"
    assert not check(authz, labels={"app": "db", "tier": "x"}).allowed
    assert not check(authz, namespace="other").allowed


def test_root_namespace_policies_apply_in_every_namespace_with_their_selector() -> None:
    root = [policy("deny-robots", {"action": "DENY", "rules": [{"from": [{"source": {
        "principals": ["*/sa/robot"]}}]}]}, namespace="istio-system"),
            policy("web-ports", {"action": "ALLOW", "selector": {"matchLabels": WEB}, "rules": [
                {"to": [{"operation": {"ports": ["8080"]}}]}]}, namespace="istio-system")]
    authz = Authorizer(root, [])
    assert check(authz, source=OTHER).reason == "denied by DENY policy istio-system/deny-robots rule 0"
    assert check(authz).allowed
    assert not check(authz, 9090).allowed
    assert check(authz, 9090, labels={"app": "db"}).allowed
    assert check(Authorizer(root, [], root_namespace="mesh-root"), source=OTHER).allowed


# --- every L4 field, both actions -----------------------------------------------------------------
# (rule, request, matches): under ALLOW the request is allowed exactly when the rule matches, under DENY
# it is denied exactly then.

V6_PEER = "fd00:10:244::5"
FIELD_CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    ("principal exact", {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}, {}, True),
    ("principal prefix", {"from": [{"source": {"principals": ["cluster.local/ns/shop/*"]}}]}, {}, True),
    ("principal suffix", {"from": [{"source": {"principals": ["*/sa/client"]}}]}, {}, True),
    ("principal presence", {"from": [{"source": {"principals": ["*"]}}]}, {}, True),
    ("principal presence, plaintext", {"from": [{"source": {"principals": ["*"]}}]}, {"source": None}, False),
    ("principal other", {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/clientele"]}}]}, {}, False),
    ("notPrincipals hit", {"from": [{"source": {"notPrincipals": ["cluster.local/ns/shop/*"]}}]}, {}, False),
    ("notPrincipals miss", {"from": [{"source": {"notPrincipals": ["cluster.local/ns/shop/*"]}}]},
     {"source": OTHER}, True),
    ("notPrincipals *, plaintext", {"from": [{"source": {"notPrincipals": ["*"]}}]}, {"source": None}, True),
    ("namespace", {"from": [{"source": {"namespaces": ["shop"]}}]}, {}, True),
    ("namespace prefix", {"from": [{"source": {"namespaces": ["sh*"]}}]}, {}, True),
    ("namespace suffix miss", {"from": [{"source": {"namespaces": ["*op"]}}]}, {"source": OTHER}, False),
    ("namespace *, plaintext", {"from": [{"source": {"namespaces": ["*"]}}]}, {"source": None}, False),
    ("notNamespaces hit", {"from": [{"source": {"notNamespaces": ["shop"]}}]}, {}, False),
    ("notNamespaces, plaintext", {"from": [{"source": {"notNamespaces": ["shop"]}}]}, {"source": None}, True),
    ("every field must match", {"from": [{"source": {"principals": ["*"], "namespaces": ["other"]}}]}, {}, False),
    ("any entry of a list", {"from": [{"source": {"principals": ["cluster.local/ns/x/sa/y", "*/sa/robot"],
                                                   "notNamespaces": ["shop"]}}]}, {"source": OTHER}, True),
    ("serviceAccount ns/sa", {"from": [{"source": {"serviceAccounts": ["shop/client"]}}]}, {}, True),
    ("serviceAccount bare: the policy's namespace", {"from": [{"source": {"serviceAccounts": ["client"]}}]},
     {}, True),
    ("serviceAccount bare, other namespace", {"from": [{"source": {"serviceAccounts": ["robot"]}}]},
     {"source": OTHER}, False),
    ("serviceAccount any trust domain", {"from": [{"source": {"serviceAccounts": ["shop/client"]}}]},
     {"source": SpiffeId("td.example", "shop", "client")}, True),
    ("serviceAccount, plaintext", {"from": [{"source": {"serviceAccounts": ["shop/client"]}}]},
     {"source": None}, False),
    ("notServiceAccounts hit", {"from": [{"source": {"notServiceAccounts": ["shop/client"]}}]}, {}, False),
    ("notServiceAccounts, plaintext", {"from": [{"source": {"notServiceAccounts": ["shop/client"]}}]},
     {"source": None}, True),
    ("ipBlocks CIDR", {"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}]}, {}, True),
    ("ipBlocks bare IP", {"from": [{"source": {"ipBlocks": ["10.244.1.5"]}}]}, {}, True),
    ("ipBlocks bare IP other", {"from": [{"source": {"ipBlocks": ["10.244.1.6"]}}]}, {}, False),
    ("ipBlocks CIDR miss", {"from": [{"source": {"ipBlocks": ["10.244.2.0/24"]}}]}, {}, False),
    ("ipBlocks host bits set", {"from": [{"source": {"ipBlocks": ["10.244.1.1/24"]}}]}, {}, True),
    ("ipBlocks v6 CIDR", {"from": [{"source": {"ipBlocks": ["fd00:10:244::/64"]}}]}, {"source_ip": V6_PEER}, True),
    ("ipBlocks v6 bare", {"from": [{"source": {"ipBlocks": [V6_PEER]}}]}, {"source_ip": V6_PEER}, True),
    ("ipBlocks v6 vs v4 peer", {"from": [{"source": {"ipBlocks": ["fd00:10:244::/64"]}}]}, {}, False),
    ("ipBlocks v4-mapped peer", {"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}]},
     {"source_ip": "::ffff:10.244.1.5"}, True),
    ("notIpBlocks hit", {"from": [{"source": {"notIpBlocks": ["10.244.1.0/24"]}}]}, {}, False),
    ("notIpBlocks miss", {"from": [{"source": {"notIpBlocks": ["10.0.0.0/16"]}}]}, {}, True),
    ("notIpBlocks v6 hit", {"from": [{"source": {"notIpBlocks": ["fd00::/8"]}}]}, {"source_ip": V6_PEER}, False),
    ("remoteIpBlocks is the peer", {"from": [{"source": {"remoteIpBlocks": ["10.244.1.0/24"]}}]}, {}, True),
    ("remoteIpBlocks miss", {"from": [{"source": {"remoteIpBlocks": ["192.0.2.1"]}}]}, {}, False),
    ("notRemoteIpBlocks hit", {"from": [{"source": {"notRemoteIpBlocks": ["10.244.1.5"]}}]}, {}, False),
    ("ports", {"to": [{"operation": {"ports": ["8080", "9090"]}}]}, {"port": 9090}, True),
    ("ports miss", {"to": [{"operation": {"ports": ["8080"]}}]}, {"port": 9090}, False),
    ("notPorts hit", {"to": [{"operation": {"notPorts": ["8080"]}}]}, {}, False),
    ("notPorts miss", {"to": [{"operation": {"notPorts": ["8080"]}}]}, {"port": 9090}, True),
    ("ports and notPorts", {"to": [{"operation": {"ports": ["8080", "9090"], "notPorts": ["9090"]}}]},
     {"port": 9090}, False),
    ("any source and any operation", {"from": [{"source": {"namespaces": ["other"]}},
                                               {"source": {"principals": ["*/sa/client"]}}],
                                      "to": [{"operation": {"ports": ["8080"]}}]}, {}, True),
    ("a source but no operation", {"from": [{"source": {"namespaces": ["shop"]}}],
                                   "to": [{"operation": {"ports": ["8080"]}}]}, {"port": 9090}, False),
    ("when source.ip", {"when": [{"key": "source.ip", "values": ["10.244.1.0/24"]}]}, {}, True),
    ("when source.ip notValues", {"when": [{"key": "source.ip", "notValues": ["10.244.1.5"]}]}, {}, False),
    ("when remote.ip", {"when": [{"key": "remote.ip", "values": ["10.244.0.0/16"]}]}, {}, True),
    ("when remote.ip v6 miss", {"when": [{"key": "remote.ip", "values": ["fd00::/8"]}]}, {}, False),
    ("when source.namespace", {"when": [{"key": "source.namespace", "values": ["sh*"]}]}, {}, True),
    ("when source.namespace notValues", {"when": [{"key": "source.namespace", "notValues": ["shop"]}]}, {}, False),
    ("when source.namespace, plaintext", {"when": [{"key": "source.namespace", "values": ["*"]}]},
     {"source": None}, False),
    ("when source.principal", {"when": [{"key": "source.principal", "values": ["*/sa/client"]}]}, {}, True),
    ("when source.principal notValues, plaintext", {"when": [{"key": "source.principal", "notValues": ["*"]}]},
     {"source": None}, True),
    ("when destination.ip", {"when": [{"key": "destination.ip", "values": ["10.244.2.0/24"]}]}, {}, True),
    ("when destination.ip notValues", {"when": [{"key": "destination.ip", "notValues": [WEB_IP]}]}, {}, False),
    ("when destination.port", {"when": [{"key": "destination.port", "values": ["8080"]}]}, {}, True),
    ("when destination.port notValues", {"when": [{"key": "destination.port", "notValues": ["8080"]}]}, {}, False),
    ("when values and notValues", {"when": [{"key": "source.namespace", "values": ["*"],
                                             "notValues": ["shop"]}]}, {}, False),
    ("every when must match", {"when": [{"key": "destination.port", "values": ["8080"]},
                                        {"key": "source.namespace", "values": ["other"]}]}, {}, False),
    ("when and from together", {"from": [{"source": {"namespaces": ["shop"]}}],
                                "when": [{"key": "destination.port", "values": ["8080"]}]}, {}, True),
]


def _request(request: dict[str, Any]) -> dict[str, Any]:
    return {"port": 8080, "source": CLIENT, "source_ip": CLIENT_IP, **request}


@pytest.mark.parametrize(("rule", "request_", "matches"), [pytest.param(r, q, m, id=i) for i, r, q, m in FIELD_CASES])
def test_every_l4_field_under_allow_and_deny(rule: dict[str, Any], request_: dict[str, Any], matches: bool) -> None:
    allow = Authorizer([policy("p", {"action": "ALLOW", "rules": [rule]})], [])
    assert check(allow, **_request(request_)).allowed is matches
    deny = Authorizer([policy("d", {"action": "DENY", "rules": [rule]})], [])
    verdict = check(deny, **_request(request_))
    assert verdict.allowed is not matches
    assert verdict.reason == ("denied by DENY policy shop/d rule 0" if matches else "allowed: no ALLOW policy applies")


@pytest.mark.parametrize("rule", [
    {"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}]},
    {"from": [{"source": {"notRemoteIpBlocks": ["192.0.2.0/24"]}}]},
    {"when": [{"key": "source.ip", "notValues": ["192.0.2.1"]}]},
])
def test_an_unknown_peer_address_never_widens_access(rule: dict[str, Any]) -> None:
    """Without the peer's address an IP field cannot be judged: an ALLOW rule on it does not match, a DENY
    rule on it does."""
    assert not check(Authorizer([policy("p", {"action": "ALLOW", "rules": [rule]})], []), source_ip=None).allowed
    assert not check(Authorizer([policy("d", {"action": "DENY", "rules": [rule]})], []), source_ip=None).allowed
    assert not check(Authorizer([policy("d", {"action": "DENY", "rules": [rule]})], []), source_ip="junk").allowed


# --- parts the tunnel cannot enforce --------------------------------------------------------------
# (rule with an unenforceable part, request, whether its L4 parts match): an ALLOW rule never matches; a
# DENY rule denies on its L4 parts alone.

UNENFORCEABLE_CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    ("methods", {"to": [{"operation": {"methods": ["GET"]}}]}, {}, True),
    ("methods and a port that matches", {"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]}, {}, True),
    ("methods and a port that does not", {"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]},
     {"port": 9090}, False),
    ("paths", {"to": [{"operation": {"paths": ["/admin"]}}]}, {}, True),
    ("notPaths", {"to": [{"operation": {"notPaths": ["/public"]}}]}, {}, True),
    ("hosts", {"to": [{"operation": {"hosts": ["example.com"]}}]}, {}, True),
    ("notHosts", {"to": [{"operation": {"notHosts": ["example.com"]}}]}, {}, True),
    ("notMethods", {"to": [{"operation": {"notMethods": ["GET"]}}]}, {}, True),
    ("requestPrincipals", {"from": [{"source": {"requestPrincipals": ["*"]}}]}, {}, True),
    ("requestPrincipals and a namespace", {"from": [{"source": {"requestPrincipals": ["*"],
                                                                 "namespaces": ["other"]}}]}, {}, False),
    ("notRequestPrincipals", {"from": [{"source": {"notRequestPrincipals": ["x/y"]}}]}, {}, True),
    ("when request.headers", {"when": [{"key": "request.headers[x-user]", "values": ["admin"]}]}, {}, True),
    ("when request.auth.claims", {"from": [{"source": {"namespaces": ["shop"]}}],
                                  "when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}, {}, True),
    ("when connection.sni", {"when": [{"key": "connection.sni", "values": ["x.example"]}]}, {}, True),
    ("when source.serviceAccount (no such Istio key)",
     {"when": [{"key": "source.serviceAccount", "values": ["shop/client"]}]}, {}, True),
    ("when without values", {"when": [{"key": "source.ip"}]}, {}, True),
    ("unknown source field", {"from": [{"source": {"principals": ["*"], "ipRanges": ["10.0.0.0/8"]}}]}, {}, True),
    ("unknown rule key", {"to": [{"operation": {"ports": ["9090"]}}], "unless": [{"x": 1}]}, {}, False),
    ("invalid ipBlocks entry", {"from": [{"source": {"ipBlocks": ["10.244.3.0/24", "10.0.0.0/33"]}}]}, {}, True),
    ("invalid port", {"to": [{"operation": {"ports": ["9090", "http"]}}]}, {}, True),
    ("wildcard service account", {"from": [{"source": {"serviceAccounts": ["shop/*"]}}]}, {}, True),
    ("empty source", {"from": [{"source": {}}]}, {}, True),
    ("from entry without source", {"from": [{}], "to": [{"operation": {"ports": ["8080"]}}]}, {}, True),
]


@pytest.mark.parametrize(("rule", "request_", "l4_matches"),
                         [pytest.param(r, q, m, id=i) for i, r, q, m in UNENFORCEABLE_CASES])
def test_unenforceable_parts_make_allow_match_nothing_and_deny_decide_on_l4_alone(
        rule: dict[str, Any], request_: dict[str, Any], l4_matches: bool) -> None:
    allow = policy("p", {"action": "ALLOW", "rules": [rule]})
    assert allow.rules[0].all_unenforceable
    assert not check(Authorizer([allow], []), **_request(request_)).allowed
    deny = Authorizer([policy("d", {"action": "DENY", "rules": [rule]})], [])
    assert check(deny, **_request(request_)).allowed is not l4_matches


def test_verdicts_name_the_unenforceable_field() -> None:
    l7 = {"from": [{"source": {"namespaces": ["shop"]}}], "to": [{"operation": {"methods": ["GET"]}}]}
    only = Authorizer([policy("p", {"action": "ALLOW", "rules": [l7]})], [])
    assert check(only).reason == ("no ALLOW policy matched (shop/p rule 0 matches nothing: "
                                  "rules[0].to[0].operation.methods is L7, unenforceable at L4)")
    two = Authorizer([policy("p", {"action": "ALLOW", "rules": [l7, {"to": [{"operation": {"ports": ["1"]}}]}]}),
                      policy("q", allow_from("*/sa/nobody"))], [])
    assert check(two).reason == ("no ALLOW policy matched (shop/p rule 0 matches nothing: "
                                 "rules[0].to[0].operation.methods is L7, unenforceable at L4, shop/q)")
    # another rule of the same policy still allows what it matches
    assert check(two, 1).reason == "allowed by ALLOW policy shop/p rule 1"
    deny = Authorizer([policy("d", {"action": "DENY", "rules": [{**l7, "when": [
        {"key": "request.headers[x]", "values": ["y"]}]}]})], [])
    verdict = check(deny)
    assert not verdict.allowed and verdict.rule == 0
    assert verdict.reason == ("denied by DENY policy shop/d rule 0 (on its L4 parts alone: "
                              "rules[0].to[0].operation.methods is L7, unenforceable at L4, "
                              "rules[0].when[0] (request.headers[x]) is L7, unenforceable at L4)")
    assert check(deny, source=OTHER).allowed  # its L4 part (namespaces: shop) does not match


@pytest.mark.parametrize("action", ["AUDIT", "CUSTOM"])
def test_audit_and_custom_policies_are_ignored_as_by_ztunnel(action: str) -> None:
    ignored = policy("x", {"action": action, "provider": {"name": "ext"}, "rules": [{}]})
    # they neither deny what they match nor count as an ALLOW policy that applies
    assert check(Authorizer([ignored], [])).reason == "allowed: no ALLOW policy applies"
    allow = policy("p", allow_from("*/sa/nobody"))
    assert check(Authorizer([ignored, allow], [])).reason == "no ALLOW policy matched (shop/p)"


# --- the property: unenforceable parts never widen access -------------------------------------------

_sources = st.fixed_dictionaries({}, optional={
    "principals": st.lists(st.sampled_from(["*", "cluster.local/ns/shop/sa/client", "*/sa/robot", "x/*"]),
                           min_size=1, max_size=2),
    "notPrincipals": st.lists(st.sampled_from(["*", "*/sa/client"]), min_size=1, max_size=2),
    "namespaces": st.lists(st.sampled_from(["shop", "other", "*"]), min_size=1, max_size=2),
    "notNamespaces": st.lists(st.sampled_from(["shop", "other"]), min_size=1, max_size=2),
    "serviceAccounts": st.lists(st.sampled_from(["client", "other/robot"]), min_size=1, max_size=2),
    "ipBlocks": st.lists(st.sampled_from(["10.244.1.0/24", "10.244.1.5", "fd00::/8", "0.0.0.0/0"]),
                         min_size=1, max_size=2),
    "notIpBlocks": st.lists(st.sampled_from(["10.244.1.5", "192.0.2.0/24"]), min_size=1, max_size=2),
    "remoteIpBlocks": st.lists(st.sampled_from(["10.244.0.0/16", "fd00::1"]), min_size=1, max_size=2),
}).filter(bool).map(lambda source: {"source": source})
_operations = st.fixed_dictionaries({}, optional={
    "ports": st.lists(st.sampled_from(["80", "8080", "9090"]), min_size=1, max_size=2),
    "notPorts": st.lists(st.sampled_from(["80", "9090"]), min_size=1, max_size=2),
}).filter(bool).map(lambda operation: {"operation": operation})
_conditions = st.builds(
    lambda key, values, negative: {"key": key, ("notValues" if negative else "values"): values},
    st.sampled_from(["source.namespace", "destination.port", "source.ip"]),
    st.sampled_from([["shop"], ["8080"], ["10.244.1.0/24"], ["*"]]), st.booleans())
_rules = st.fixed_dictionaries({}, optional={"from": st.lists(_sources, min_size=1, max_size=2),
                                             "to": st.lists(_operations, min_size=1, max_size=2),
                                             "when": st.lists(_conditions, min_size=1, max_size=2)})
_policies = st.lists(st.tuples(st.sampled_from(["ALLOW", "DENY"]), st.lists(_rules, min_size=1, max_size=3)),
                     min_size=1, max_size=3)
# one unenforceable part and where it goes: (part of the rule, key, value)
_unenforceable = st.sampled_from([
    ("to", "methods", ["GET"]), ("to", "paths", ["/admin"]), ("to", "hosts", ["x.example"]),
    ("from", "requestPrincipals", ["*"]), ("from", "notRequestPrincipals", ["a/b"]),
    ("from", "ipBlocks", ["not-an-ip"]), ("from", "serviceAccounts", ["shop/*"]), ("from", "future", ["x"]),
    ("when", "request.headers[x]", ["y"]), ("when", "connection.sni", ["x"]), ("when", "source.ip", ["300.1.1.1"]),
    ("rule", "unless", [{"key": "x"}]),
])
_requests = st.builds(
    lambda port, source, source_ip, destination_ip: AuthzRequest("shop", WEB, destination_ip, port, source, source_ip),
    st.sampled_from([80, 8080, 9090]), st.sampled_from([CLIENT, OTHER, None]),
    st.sampled_from([CLIENT_IP, "10.244.9.9", "192.0.2.7", "fd00::1", None]), st.sampled_from([WEB_IP, "fd00::2"]))


def _add(rule: dict[str, Any], part: tuple[str, str, list[Any]], entry: int) -> None:
    """Add the unenforceable `part` to `rule`, in one of its entries or a new one."""
    where, key, value = part
    if where == "rule":
        rule[key] = value
    elif where == "when":
        rule.setdefault("when", []).append({"key": key, "values": value})
    else:
        field = "source" if where == "from" else "operation"
        entries = rule.setdefault(where, [])
        if entries:
            entries[entry % len(entries)][field][key] = value
        else:
            entries.append({field: {key: value}})


@settings(max_examples=300, deadline=None)
@given(policies=_policies, part=_unenforceable, target=st.integers(0, 20), entry=st.integers(0, 3),
       requests=st.lists(_requests, min_size=1, max_size=8))
def test_an_unenforceable_part_never_widens_access(policies: list[tuple[str, list[dict[str, Any]]]],
                                                   part: tuple[str, str, list[Any]], target: int, entry: int,
                                                   requests: list[AuthzRequest]) -> None:
    """Adding an L7, unknown or invalid part to any rule, of an ALLOW or a DENY policy, never allows a
    request the policies denied before."""
    specs: list[dict[str, Any]] = [{"action": action, "rules": rules} for action, rules in policies]
    before = Authorizer([policy(f"p{i}", s) for i, s in enumerate(specs)], [])
    widened = copy.deepcopy(specs)
    all_rules = [rule for spec in widened for rule in spec["rules"]]
    rule = all_rules[target % len(all_rules)]
    _add(rule, part, entry)
    after = Authorizer([policy(f"p{i}", s) for i, s in enumerate(widened)], [])
    assert any(r.all_unenforceable for s in widened for r in policy("x", s).rules)
    for request in requests:
        if not before.check(request).allowed:
            assert not after.check(request).allowed, (request, after.check(request))


@settings(max_examples=200, deadline=None)
@given(rules=st.lists(_rules, min_size=1, max_size=3), part=_unenforceable, requests=st.lists(_requests, max_size=8))
def test_an_allow_rule_with_an_unenforceable_part_allows_nothing(rules: list[dict[str, Any]],
                                                                 part: tuple[str, str, list[Any]],
                                                                 requests: list[AuthzRequest]) -> None:
    for rule in rules:
        _add(rule, part, 0)
    authz = Authorizer([policy("p", {"action": "ALLOW", "rules": rules})], [])
    assert not any(authz.check(request).allowed for request in requests)


# --- PeerAuthentication -------------------------------------------------------------------------

STRICT, PERMISSIVE = PeerAuthenticationMode.STRICT, PeerAuthenticationMode.PERMISSIVE


def test_strict_peer_authentication_refuses_plaintext_and_permissive_accepts_it() -> None:
    allow_any = [policy("any", {"action": "ALLOW", "rules": [{}]})]
    strict = Authorizer(allow_any, [peer("strict", "STRICT")])
    verdict = check(strict, source=None)
    assert not verdict.allowed
    assert verdict.reason == "plaintext refused: mTLS is STRICT (PeerAuthentication shop/strict)"
    assert check(strict).allowed  # mTLS is what STRICT asks for
    assert check(Authorizer(allow_any, [peer("p", "PERMISSIVE")]), source=None).allowed


def test_peer_authentication_precedence_workload_then_namespace_then_mesh_then_permissive() -> None:
    mesh = peer("mesh", "STRICT", namespace="istio-system")
    namespace = peer("ns", "PERMISSIVE")
    workload = peer("web", "STRICT", selector=WEB)
    authz = Authorizer([], [mesh, namespace, workload])
    assert authz.mode("shop", WEB) == (STRICT, workload.ref)
    assert authz.mode("shop", {"app": "db"}) == (PERMISSIVE, namespace.ref)
    assert authz.mode("other", WEB) == (STRICT, mesh.ref)
    assert Authorizer([], []).mode("shop", WEB) == (PERMISSIVE, None)
    # a selector in the root namespace is ignored (Istio: "ignored when deployed in the root namespace")
    assert Authorizer([], [peer("sel", "STRICT", "istio-system", WEB)]).mode("shop", WEB) == (PERMISSIVE, None)
    assert Authorizer([], [peer("sel", "STRICT", "istio-system", WEB)]).mode("istio-system", WEB)[1] is None
    assert not check(Authorizer([], [mesh]), source=None, namespace="other").allowed


@pytest.mark.parametrize(("mesh", "namespace", "workload", "expected", "by"), [
    ("STRICT", None, None, STRICT, "mesh"),
    ("STRICT", "UNSET", None, STRICT, "mesh"),  # UNSET inherits
    ("STRICT", "", None, STRICT, "mesh"),  # no mode written: UNSET
    ("STRICT", "UNSET", "UNSET", STRICT, "mesh"),
    ("STRICT", "PERMISSIVE", "UNSET", PERMISSIVE, "ns"),
    ("PERMISSIVE", "STRICT", "", STRICT, "ns"),
    ("STRICT", "DISABLE", None, PERMISSIVE, "ns"),  # DISABLE accepts plaintext like PERMISSIVE
    ("STRICT", None, "DISABLE", PERMISSIVE, "web"),
    (None, "UNSET", "UNSET", PERMISSIVE, None),  # nothing set anywhere: PERMISSIVE
    ("UNSET", None, "STRICT", STRICT, "web"),
])
def test_unset_inherits_from_the_level_above(mesh: str | None, namespace: str | None, workload: str | None,
                                             expected: PeerAuthenticationMode, by: str | None) -> None:
    peers = [p for p in (
        peer("mesh", mesh, "istio-system") if mesh is not None else None,
        peer("ns", namespace) if namespace is not None else None,
        peer("web", workload, selector=WEB) if workload is not None else None) if p is not None]
    mode, ref = Authorizer([], peers).mode("shop", WEB)
    assert mode is expected and (ref.name if ref else None) == by
    assert check(Authorizer([], peers), source=None).allowed is (expected is PERMISSIVE)


@pytest.mark.parametrize(("namespace", "workload", "ports", "port", "expected"), [
    (None, "STRICT", {"8080": "PERMISSIVE"}, 8080, PERMISSIVE),
    (None, "STRICT", {"8080": "PERMISSIVE"}, 9090, STRICT),
    (None, "PERMISSIVE", {"8080": "STRICT"}, 8080, STRICT),
    (None, "PERMISSIVE", {"8080": "STRICT"}, 9090, PERMISSIVE),
    ("STRICT", "UNSET", {"8080": "PERMISSIVE"}, 8080, PERMISSIVE),  # the workload inherits STRICT, the port not
    ("STRICT", "UNSET", {"8080": "PERMISSIVE"}, 9090, STRICT),
    ("STRICT", None, {"8080": "DISABLE"}, 8080, PERMISSIVE),
    ("PERMISSIVE", "STRICT", {"8080": "UNSET"}, 8080, STRICT),  # an UNSET port inherits the workload's mode
    (None, "UNSET", {"8080": "STRICT"}, 8080, STRICT),
])
def test_port_level_mtls_sets_the_mode_of_single_ports(namespace: str | None, workload: str | None,
                                                       ports: dict[str, str], port: int,
                                                       expected: PeerAuthenticationMode) -> None:
    peers = [peer("web", workload, selector=WEB, ports=ports)]
    if namespace is not None:
        peers.append(peer("ns", namespace))
    authz = Authorizer([], peers)
    assert authz.mode("shop", WEB, port)[0] is expected
    verdict = check(authz, port, source=None)
    assert verdict.allowed is (expected is PERMISSIVE)
    if not verdict.allowed and ports.get(str(port), "UNSET") != "UNSET":
        assert verdict.reason == ("plaintext refused: mTLS is STRICT on port 8080 (portLevelMtls) "
                                  "(PeerAuthentication shop/web)")
    assert authz.mode("shop", {"app": "db"}, port)[0] is (STRICT if namespace == "STRICT" else PERMISSIVE)


def test_port_level_mtls_without_a_port_is_the_workload_mode() -> None:
    authz = Authorizer([], [peer("web", "STRICT", selector=WEB, ports={"8080": "PERMISSIVE"})])
    assert authz.mode("shop", WEB) == (STRICT, ObjectRef(Kind.PEER_AUTHENTICATION, "shop", "web"))


@pytest.mark.parametrize(("pattern", "value", "matches"), [
    ("*", "x", True), ("*", "", False), ("*", None, False), ("a/*", "a/b", True), ("a/*", "b/a", False),
    ("*/b", "a/b", True), ("*/b", "a/bc", False), ("a/b", "a/b", True), ("a/b", "a/b/", False),
    ("a*b", "a*b", True), ("a*b", "axb", False),  # `*` only at an end is a wildcard
])
def test_patterns_match_as_prefix_suffix_presence_or_exact(pattern: str, value: str | None, matches: bool) -> None:
    assert pattern_matches(pattern, value) is matches


@pytest.mark.parametrize("selector", [["app", "web"], {"matchLabels": {"app": 7}}, {"matchLabels": "app=web"}, "web"])
def test_an_unreadable_selector_never_widens_access(selector: Any) -> None:
    """Dropping such a policy would fail open; it applies namespace-wide instead, a DENY as written and an
    ALLOW matching nothing (so a workload another ALLOW does not admit is refused)."""
    deny = policy("deny", {"selector": selector, "action": "DENY",
                           "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}]}]})
    assert deny.selector is None
    assert not check(Authorizer([deny], [])).allowed
    assert check(Authorizer([deny], []), source=OTHER).allowed
    allow = policy("allow", {"selector": selector, "action": "ALLOW", "rules": [{}]})
    verdict = check(Authorizer([allow], []))
    assert not verdict.allowed and "matches nothing" in verdict.reason
    raw = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": "deny", "namespace": "shop"}, "spec": {"selector": selector, "action": "DENY"}}
    assert any(r.field == "spec.selector" and "every workload of the namespace" in r.reason
               for r in decode(raw).rejections)
