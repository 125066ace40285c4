"""The capture rules, exactly: the pod's rule set against Istio ambient's in-pod rules (chain names ours),
the node's probe SNAT, payloads rendered over live state, option validation, annotations."""

from __future__ import annotations

import dataclasses
from textwrap import dedent

import pytest

from nodeagent.mesh import annotations as ann
from nodeagent.mesh.iptables.render import (
    CaptureOptions,
    CaptureOptionsError,
    node_probe_snat,
    pod_capture,
    render_node_probe_snat,
    render_pod_capture,
    render_pod_cleanup,
)
from nodeagent.mesh.iptables.rules import LiveRules, parse_save

DEFAULT = pod_capture()
FP = DEFAULT.fingerprint


def test_default_pod_capture_is_istios_inpod_rule_set_with_our_chains() -> None:
    # Istio's AppendInpodRules (non-TPROXY, with RedirectDNS), ISTIO_PRERT/ISTIO_OUTPUT renamed; each
    # line as iptables-save prints it on both backends (checked in tests/integration/test_redirect_kernel.py).
    assert render_pod_capture() == dedent(f"""\
        *mangle
        :NODEAGENT_PRERT - [0:0]
        :NODEAGENT_OUTPUT - [0:0]
        -I PREROUTING 1 -m comment --comment "nodeagent capture {FP}" -j NODEAGENT_PRERT
        -I OUTPUT 1 -m comment --comment "nodeagent capture {FP}" -j NODEAGENT_OUTPUT
        -A NODEAGENT_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
        -A NODEAGENT_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
        COMMIT
        *nat
        :NODEAGENT_PRERT - [0:0]
        :NODEAGENT_OUTPUT - [0:0]
        -I PREROUTING 1 -m comment --comment "nodeagent capture {FP}" -j NODEAGENT_PRERT
        -I OUTPUT 1 -m comment --comment "nodeagent capture {FP}" -j NODEAGENT_OUTPUT
        -A NODEAGENT_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
        -A NODEAGENT_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
        -A NODEAGENT_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
        -A NODEAGENT_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
        -A NODEAGENT_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053
        -A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
        -A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
        -A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
        COMMIT
        """)  # noqa: E501 (rules are compared whole)


def test_policy_route_is_istios_fwmark_rule_and_local_table() -> None:
    assert DEFAULT.routing is not None
    assert DEFAULT.routing.describe() == ("ip rule fwmark 0x111/0xfff lookup 100 pref 32764",
                                          "ip route local 0.0.0.0/0 dev lo table 100")


def test_every_rule_says_why_it_exists() -> None:
    for rule in (*DEFAULT.rules, *node_probe_snat(["10.244.1.2"]).rules):
        assert len(rule.reason) > 20, rule


def test_udp_is_captured_for_dns_only_and_a_pod_may_opt_out() -> None:
    nat = [r.spec for r in DEFAULT.rules if r.table == "nat"]
    assert [spec for spec in nat if "udp" in spec] == [
        "! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053"]
    # the only protocol-agnostic nat rule lets traffic out of lo through, it captures nothing
    assert [s for s in nat if "-p tcp" not in s and "-p udp" not in s] == ["! -d 127.0.0.1/32 -o lo -j ACCEPT"]
    opted_out = [r.spec for r in pod_capture(CaptureOptions(dns_port=None)).rules]
    assert not any("--dport 53" in spec for spec in opted_out)
    from nodeagent.mesh.annotations import capture_options
    options, rejected = capture_options("demo/a", {"nodeagent.io/dns-capture": "false"})
    assert options.dns_port is None and not rejected
    assert capture_options("demo/a", {})[0].dns_port == 15053


def test_both_redirects_skip_the_tunnels_own_mark_and_inbound_skips_hbone() -> None:
    redirects = [r.spec for r in DEFAULT.rules if "REDIRECT" in r.spec]
    assert len(redirects) == 4  # inbound, DNS over UDP and TCP, outbound
    assert all("-m mark ! --mark 0x539/0xfff" in s for s in redirects)
    assert "! --dport 15008" in redirects[0]


def test_exclusions_return_before_the_redirects() -> None:
    options = CaptureOptions(exclude_outbound_ports=(5432, 6379), exclude_inbound_ports=(9090,),
                             exclude_outbound_cidrs=("10.0.0.0/8",))
    nat = [r.line for r in pod_capture(options).rules if r.table == "nat"]
    assert nat == [
        "-A NODEAGENT_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
        "-A NODEAGENT_PRERT -p tcp -m tcp --dport 9090 -j RETURN",
        "-A NODEAGENT_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15006",
        "-A NODEAGENT_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
        "-A NODEAGENT_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
        "-A NODEAGENT_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT "
        "--to-ports 15053",
        "-A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT "
        "--to-ports 15053",
        "-A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
        "-A NODEAGENT_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A NODEAGENT_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN",
        "-A NODEAGENT_OUTPUT -d 10.0.0.0/8 -p tcp -j RETURN",
        "-A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
    ]
    assert pod_capture(options).fingerprint != FP


def test_other_ports_marks_and_probe_address_appear_in_the_rules() -> None:
    options = CaptureOptions(outbound_port=25001, inbound_plaintext_port=25006, hbone_port=25008, mark=0x77,
                             connection_mark=0x22, probe_address="169.254.9.9", route_table=42, rule_priority=1000)
    text = render_pod_capture(options)
    for expected in ("--to-ports 25001", "--to-ports 25006", "! --dport 25008", "! --mark 0x77/0xfff",
                     "--set-xmark 0x22/0xfff", "-s 169.254.9.9/32", "-d 169.254.9.9/32"):
        assert expected in text
    assert pod_capture(options).routing is not None
    assert pod_capture(options).routing.describe()[0] == "ip rule fwmark 0x22/0xfff lookup 42 pref 1000"  # type: ignore[union-attr]


def test_fingerprint_is_stable_and_follows_the_content() -> None:
    assert pod_capture(CaptureOptions()).fingerprint == FP
    assert len(FP) == 12
    assert pod_capture(CaptureOptions(exclude_inbound_ports=(1,))).fingerprint != FP


@pytest.mark.parametrize(("changes", "field"), [
    ({"outbound_port": 0}, "outbound_port"),
    ({"inbound_plaintext_port": 70000}, "inbound_plaintext_port"),
    ({"hbone_port": 15001}, "tunnel ports"),
    ({"mark": 0}, "mark"),
    ({"mark": 0x1000}, "mark"),
    ({"connection_mark": 0x539}, "connection_mark"),
    ({"probe_address": "169.254.7"}, "probe_address"),
    ({"route_table": 254}, "route_table"),
    ({"rule_priority": 32766}, "rule_priority"),
    ({"exclude_outbound_ports": (80, 0)}, "exclude_outbound_ports"),
    ({"exclude_inbound_ports": (True,)}, "exclude_inbound_ports"),
    ({"exclude_outbound_cidrs": ("10.0.0.1/8",)}, "exclude_outbound_cidrs"),
])
def test_bad_options_are_refused_naming_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(CaptureOptionsError) as caught:
        dataclasses.replace(CaptureOptions(), **changes)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert field in str(caught.value)


def test_render_over_live_state_keeps_present_jumps_and_drops_old_and_duplicate_ones() -> None:
    old = pod_capture(CaptureOptions(exclude_inbound_ports=(9090,)))
    live = LiveRules(
        chains=frozenset(DEFAULT.chains),
        jumps=(("nat", "OUTPUT", DEFAULT.jump_spec(DEFAULT.hooks[3])),
               ("nat", "OUTPUT", DEFAULT.jump_spec(DEFAULT.hooks[3])),
               ("nat", "PREROUTING", old.jump_spec(old.hooks[2])),
               ("mangle", "OUTPUT", "-j NODEAGENT_OUTPUT")))
    nat = render_pod_capture(live=live).split("*nat\n")[1]
    assert nat.splitlines()[:6] == [
        ":NODEAGENT_PRERT - [0:0]",
        ":NODEAGENT_OUTPUT - [0:0]",
        f'-D OUTPUT -m comment --comment "nodeagent capture {FP}" -j NODEAGENT_OUTPUT',
        f'-D PREROUTING -m comment --comment "nodeagent capture {old.fingerprint}" -j NODEAGENT_PRERT',
        f'-I PREROUTING 1 -m comment --comment "nodeagent capture {FP}" -j NODEAGENT_PRERT',
        "-A NODEAGENT_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
    ]
    mangle = render_pod_capture(live=live).split("*nat\n")[0]
    assert "-D OUTPUT -j NODEAGENT_OUTPUT" in mangle  # written by hand, without our comment


def test_cleanup_removes_exactly_what_is_live_nat_first() -> None:
    live = parse_save({"nat": dedent(f"""\
        *nat
        :OUTPUT ACCEPT [0:0]
        :NODEAGENT_OUTPUT - [0:0]
        :FOREIGN - [0:0]
        -A OUTPUT -j FOREIGN
        -A OUTPUT -m comment --comment "nodeagent capture {FP}" -j NODEAGENT_OUTPUT
        -A NODEAGENT_OUTPUT -j RETURN
        COMMIT
        """), "mangle": "*mangle\n:NODEAGENT_PRERT - [0:0]\nCOMMIT\n"}, DEFAULT.owned())
    assert render_pod_cleanup(live) == dedent(f"""\
        *nat
        -D OUTPUT -m comment --comment "nodeagent capture {FP}" -j NODEAGENT_OUTPUT
        :NODEAGENT_OUTPUT - [0:0]
        -X NODEAGENT_OUTPUT
        COMMIT
        *mangle
        :NODEAGENT_PRERT - [0:0]
        -X NODEAGENT_PRERT
        COMMIT
        """)
    assert render_pod_cleanup(LiveRules()) == ""


def test_node_probe_snat_matches_each_enrolled_pod_for_local_sockets_only() -> None:
    snat = node_probe_snat(["10.244.1.3", "10.244.1.2", "10.244.1.2"])
    assert render_node_probe_snat(["10.244.1.3", "10.244.1.2"]) == dedent(f"""\
        *nat
        :NODEAGENT_POSTRT - [0:0]
        -I POSTROUTING 1 -m comment --comment "nodeagent probe-snat {snat.fingerprint}" -j NODEAGENT_POSTRT
        -A NODEAGENT_POSTRT -d 10.244.1.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127
        -A NODEAGENT_POSTRT -d 10.244.1.3/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127
        COMMIT
        """)
    assert snat.routing is None
    with pytest.raises(CaptureOptionsError, match=r"pod_ips='10\.244\.1'"):
        node_probe_snat(["10.244.1"])
    with pytest.raises(CaptureOptionsError, match="probe_address"):
        node_probe_snat([], "nope")



def test_ipv6_pods_get_the_ipv6_probe_snat_with_istios_ipv6_probe_address() -> None:
    """kubelet probes a pod at its primary IP: an IPv6-only pod (or an IPv6-primary cluster's) is probed over
    IPv6, and its capture lets only the IPv6 probe address through."""
    snat = node_probe_snat(["fd00:10:244:1::3"], family=6)
    assert [r.line for r in snat.rules] == [
        "-A NODEAGENT_POSTRT -d fd00:10:244:1::3/128 -p tcp -m owner --socket-exists -j SNAT --to-source "
        "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"]
    assert snat.family == 6 and node_probe_snat(["10.244.1.2"]).family == 4
    with pytest.raises(CaptureOptionsError, match=r"pod_ips='10\.244\.1\.2'"):
        node_probe_snat(["10.244.1.2"], family=6)


def test_the_tunnel_and_the_rules_agree_on_ports_and_mark() -> None:
    from nodeagent.mesh.iptables import render
    from nodeagent.tunnel.hbone import limits as hbone
    from nodeagent.tunnel.proxy import node as tunnel

    assert (render.OUTBOUND_PORT, render.INBOUND_PLAIN_PORT, render.HBONE_PORT) == (
        tunnel.OUTBOUND_PORT, tunnel.INBOUND_PLAIN_PORT, tunnel.HBONE_PORT)
    assert render.TUNNEL_MARK == hbone.SOCKET_MARK == 1337


def test_annotations_set_exclusions_and_a_bad_one_is_rejected_alone() -> None:
    options, rejected = ann.capture_options("demo/web", {
        ann.EXCLUDE_OUTBOUND_PORTS: "6379, 5432,5432",
        ann.EXCLUDE_INBOUND_PORTS: "80,x",
        ann.EXCLUDE_OUTBOUND_RANGES: "10.0.0.0/8,192.168.0.0/16",
        "unrelated": "1"})
    assert options.exclude_outbound_ports == (5432, 6379)
    assert options.exclude_inbound_ports == ()
    assert options.exclude_outbound_cidrs == ("10.0.0.0/8", "192.168.0.0/16")
    assert [str(r) for r in rejected] == [
        "pod demo/web: annotation traffic.sidecar.istio.io/excludeInboundPorts='80,x': 'x' is not a port (1-65535)"]


@pytest.mark.parametrize("value", ["*", "10.0.0.1/8", "::/0", "300.0.0.0/8"])
def test_unusable_ranges_are_rejected(value: str) -> None:
    options, rejected = ann.capture_options("demo/web", {ann.EXCLUDE_OUTBOUND_RANGES: value})
    assert options == CaptureOptions()
    assert len(rejected) == 1
    assert rejected[0].annotation == ann.EXCLUDE_OUTBOUND_RANGES
