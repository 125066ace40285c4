"""The IPv6 in-pod capture (ip6tables): Istio ambient's in-pod rules as its builder writes them for IPv6
(`AppendVersionedRule("127.0.0.1/32", "::1/128", ...)`, HostProbeV6SNATAddress), the `ip -6` policy route,
excluded ranges split by family, and one state for both families."""

from __future__ import annotations

from textwrap import dedent

import pytest

from nodeagent.mesh import annotations as ann
from nodeagent.mesh.capture import CaptureState, CaptureStatus, combine, parse_ip_routes
from nodeagent.mesh.iptables.render import CaptureOptions, pod_capture, render_pod_capture

V6 = pod_capture(family=6)
FP6 = V6.fingerprint


def test_ipv6_pod_capture_is_istios_inpod_rule_set_for_ip6tables() -> None:
    assert render_pod_capture(family=6) == dedent(f"""\
        *mangle
        :NODEAGENT_PRERT - [0:0]
        :NODEAGENT_OUTPUT - [0:0]
        -I PREROUTING 1 -m comment --comment "nodeagent capture {FP6}" -j NODEAGENT_PRERT
        -I OUTPUT 1 -m comment --comment "nodeagent capture {FP6}" -j NODEAGENT_OUTPUT
        -A NODEAGENT_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
        -A NODEAGENT_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
        COMMIT
        *nat
        :NODEAGENT_PRERT - [0:0]
        :NODEAGENT_OUTPUT - [0:0]
        -I PREROUTING 1 -m comment --comment "nodeagent capture {FP6}" -j NODEAGENT_PRERT
        -I OUTPUT 1 -m comment --comment "nodeagent capture {FP6}" -j NODEAGENT_OUTPUT
        -A NODEAGENT_PRERT -s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -m tcp -j ACCEPT
        -A NODEAGENT_PRERT ! -d ::1/128 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
        -A NODEAGENT_OUTPUT -d fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -m tcp -j ACCEPT
        -A NODEAGENT_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
        -A NODEAGENT_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053
        -A NODEAGENT_OUTPUT ! -d ::1/128 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
        -A NODEAGENT_OUTPUT ! -d ::1/128 -o lo -j ACCEPT
        -A NODEAGENT_OUTPUT ! -d ::1/128 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
        COMMIT
        """)  # noqa: E501 (rules are compared whole)


def test_ipv6_policy_route_is_ip6_rule_and_local_default() -> None:
    assert V6.routing is not None
    assert V6.routing.describe() == ("ip -6 rule fwmark 0x111/0xfff lookup 100 pref 32764",
                                     "ip -6 route local ::/0 dev lo table 100")
    assert parse_ip_routes('[{"type":"local","dst":"::/0","dev":"lo"}]')
    assert parse_ip_routes('[{"type":"local","dst":"default","dev":"lo"}]')


def test_ipv4_rule_set_is_unchanged_by_the_ipv6_one() -> None:
    v4 = pod_capture()
    assert v4 == pod_capture(family=4) and v4.fingerprint != FP6
    assert not any("::" in r.spec or "fd16" in r.spec for r in v4.rules)
    assert not any("127.0.0.1" in r.spec or "169.254" in r.spec for r in V6.rules)


def test_excluded_ranges_go_to_their_familys_rule_set() -> None:
    options, rejected = ann.capture_options("demo/web", {
        ann.EXCLUDE_OUTBOUND_RANGES: "10.0.0.0/8, fd00:10::/64"})
    assert not rejected
    v4 = [r.spec for r in pod_capture(options, 4).rules if "RETURN" in r.spec]
    v6 = [r.spec for r in pod_capture(options, 6).rules if "RETURN" in r.spec]
    assert v4 == ["-d 10.0.0.0/8 -p tcp -j RETURN"]
    assert v6 == ["-d fd00:10::/64 -p tcp -j RETURN"]


@pytest.mark.parametrize("value", ["::/0", "0.0.0.0/0", "fd00::1/64", "fd00::/129", "[fd00::]/64"])
def test_unusable_ipv6_ranges_are_rejected(value: str) -> None:
    options, rejected = ann.capture_options("demo/web", {ann.EXCLUDE_OUTBOUND_RANGES: value})
    assert options == CaptureOptions()
    assert len(rejected) == 1 and value in str(rejected[0])


def test_family_other_than_4_or_6_is_refused() -> None:
    with pytest.raises(ValueError, match="IP family 5"):
        pod_capture(family=5)


def _state(status: CaptureStatus, missing: tuple[str, ...] = ()) -> CaptureState:
    return CaptureState(status, "/run/netns/p", "nft", "abc", (), missing)


@pytest.mark.parametrize(("v4", "v6", "both"), [
    (CaptureStatus.INSTALLED, CaptureStatus.INSTALLED, CaptureStatus.INSTALLED),
    (CaptureStatus.ABSENT, CaptureStatus.ABSENT, CaptureStatus.ABSENT),
    # half a capture is not installed: the other family's connections would pass around the tunnel
    (CaptureStatus.INSTALLED, CaptureStatus.ABSENT, CaptureStatus.DRIFTED),
    (CaptureStatus.ABSENT, CaptureStatus.INSTALLED, CaptureStatus.DRIFTED),
    (CaptureStatus.INSTALLED, CaptureStatus.STALE, CaptureStatus.STALE),
    (CaptureStatus.DRIFTED, CaptureStatus.INSTALLED, CaptureStatus.DRIFTED),
])
def test_both_families_state_is_installed_only_when_both_are(v4: CaptureStatus, v6: CaptureStatus,
                                                             both: CaptureStatus) -> None:
    combined = combine(_state(v4, ("nat: chain X",)), _state(v6, ("nat: chain Y",)))
    assert combined.status is both
    assert combined.missing == ("nat: chain X", "ip6tables nat: chain Y")
