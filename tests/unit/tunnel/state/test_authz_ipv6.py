"""L4 authorization over IPv6: ipBlocks/notIpBlocks of IPv6 ranges decide for IPv6 peers, an IPv4 peer seen on a
dual-stack socket (v4-mapped) is judged as the IPv4 address it is and never by an IPv6 block (ztunnel
canonicalizes peers, src/socket.rs to_canonical, before rbac.rs compares them), and an IPv6 CIDR the tunnel
cannot read fails closed with the policy and the field named."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.ca.identity import SpiffeId
from nodeagent.cluster.decode import decode
from nodeagent.cluster.model import AuthorizationPolicy
from nodeagent.tunnel.state.authz import Authorizer, AuthzRequest, Verdict

CLIENT = SpiffeId("cluster.local", "shop", "client")
GOOD, BAD = "fd00:10:244:1::5", "fd00:10:244:2::7"
WEB_V6 = "fd00:10:244:3::2"


def policy(name: str, spec: dict[str, Any]) -> AuthorizationPolicy:
    decoded = decode({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                      "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
    assert isinstance(decoded.obj, AuthorizationPolicy), decoded.rejections
    return decoded.obj


def check(authz: Authorizer, source_ip: str | None) -> Verdict:
    return authz.check(AuthzRequest("shop", {"app": "web"}, WEB_V6, 8080, CLIENT, source_ip))


def source(**fields: list[str]) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def test_an_ipv6_ipblock_allows_one_client_and_refuses_another() -> None:
    authz = Authorizer([policy("v6", {"action": "ALLOW", "rules": [source(ipBlocks=["fd00:10:244:1::/64"])]})], [])
    assert check(authz, GOOD).reason == "allowed by ALLOW policy shop/v6 rule 0"
    assert not check(authz, BAD).allowed
    assert not check(authz, "10.244.1.5").allowed  # an IPv4 peer is never in an IPv6 block


def test_an_ipv6_not_ipblock_denies_one_client_and_lets_the_other_through() -> None:
    authz = Authorizer([policy("d", {"action": "DENY", "rules": [source(ipBlocks=["fd00:10:244:2::/64"])]}),
                        policy("a", {"action": "ALLOW", "rules": [source(notIpBlocks=["fd00:10:244:2::7/128"])]})], [])
    assert check(authz, GOOD).allowed
    verdict = check(authz, BAD)
    assert not verdict.allowed and verdict.reason == "denied by DENY policy shop/d rule 0"


@pytest.mark.parametrize("block", ["::ffff:0:0/96", "::ffff:10.244.1.0/120", "::/0"])
def test_a_v4_mapped_peer_is_never_matched_by_an_ipv6_block(block: str) -> None:
    # As ztunnel: the peer is its IPv4 address; a v4-mapped block is an IPv6 block and matches IPv6 peers
    # only. To admit IPv4 clients, write the IPv4 range.
    mapped = "::ffff:10.244.1.5"
    allow = Authorizer([policy("p", {"action": "ALLOW", "rules": [source(ipBlocks=[block])]})], [])
    assert not check(allow, mapped).allowed
    deny = Authorizer([policy("d", {"action": "DENY", "rules": [source(ipBlocks=[block])]})], [])
    assert check(deny, mapped).allowed
    intended = Authorizer([policy("p", {"action": "ALLOW", "rules": [source(ipBlocks=["10.244.1.0/24"])]})], [])
    assert check(intended, mapped).allowed


@pytest.mark.parametrize("entry", ["fd00::/129", "fd00::g/64", "[fd00::]/64", "fd00::/64/1", "fd00::/-1",
                                   "fd00::/ 64", ":::/64"])
@pytest.mark.parametrize("field", ["ipBlocks", "notIpBlocks"])
def test_an_unreadable_ipv6_block_fails_closed_naming_policy_and_field(entry: str, field: str) -> None:
    rule = source(**{field: ["fd00:10:244:1::/64", entry]})
    allow = Authorizer([policy("p", {"action": "ALLOW", "rules": [rule]})], [])
    verdict = check(allow, GOOD)  # the readable entry would have decided either way: nothing is allowed
    assert not verdict.allowed
    assert verdict.reason.startswith(f"no ALLOW policy matched (shop/p rule 0 matches nothing: "
                                     f"rules[0].from[0].source.{field}[1] (")
    assert entry in verdict.reason and "is not an IP address or CIDR, unenforceable" in verdict.reason
    deny = Authorizer([policy("d", {"action": "DENY", "rules": [rule]})], [])
    for peer in (GOOD, BAD, "10.244.1.5", None):  # the field counts as matching: every client is denied
        denied = check(deny, peer)
        assert not denied.allowed and denied.policy is not None and denied.policy.key == "shop/d"
        assert f"source.{field}[1]" in denied.reason
