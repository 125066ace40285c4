"""Reading `conntrack -L` lines and writing `conntrack -D` options (no root: the binary is not run)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from nodeagent.kernel.conntrack import Conntrack, Flow, filter_arguments, parse_flow

IPAddress = IPv4Address | IPv6Address


def test_default_and_extended_output_lines_are_read_as_original_destination_and_reply_source() -> None:
    line = ("udp      17 28 src=10.0.0.5 dst=172.30.0.10 sport=40000 dport=53 [UNREPLIED] src=10.180.0.1 "
            "dst=10.0.0.5 sport=5353 dport=40000 mark=0 use=1")
    expected = Flow("udp", ip_address("172.30.0.10"), 53, ip_address("10.180.0.1"), 5353)
    assert parse_flow(line) == expected
    assert parse_flow("ipv4     2 " + line.replace(" mark=0", " zone=3 mark=0")) == expected
    assert parse_flow("udp      17 118 src=10.0.0.5 dst=172.30.0.10 sport=1 dport=53 packets=2 bytes=90 "
                      "src=10.180.0.1 dst=10.0.0.5 sport=53 dport=1 packets=1 bytes=40 [ASSURED] mark=0 use=1") \
        == Flow("udp", ip_address("172.30.0.10"), 53, ip_address("10.180.0.1"), 53)
    six = parse_flow("udp      17 29 src=fd00::5 dst=fd00:10::a sport=1000 dport=53 src=fd00:180::1 dst=fd00::5 "
                     "sport=53 dport=1000 mark=0 use=1")
    assert six == Flow("udp", ip_address("fd00:10::a"), 53, ip_address("fd00:180::1"), 53)


def test_lines_that_are_no_flow_with_ports_are_skipped() -> None:
    for line in ("", "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown.",
                 "icmp     1 29 src=10.0.0.5 dst=10.0.0.1 type=8 code=0 id=7 "
                 "src=10.0.0.1 dst=10.0.0.5 type=0 code=0 id=7",
                 "udp 17 28 src=10.0.0.5 dst=garbage sport=1 dport=53 src=10.0.0.1 dst=10.0.0.5 sport=53 dport=1"):
        assert parse_flow(line) is None


@dataclass(frozen=True)
class Match:
    orig_dst: IPAddress | None
    orig_dst_port: int | None
    reply_src: IPAddress | None
    reply_src_port: int | None
    protocol: str = "udp"


def test_filters_become_conntrack_options_and_an_empty_one_deletes_nothing() -> None:
    assert filter_arguments(Match(ip_address("172.30.0.10"), 53, ip_address("10.180.0.1"), 5353)) == [
        "-p", "udp", "--orig-dst", "172.30.0.10", "--orig-port-dst", "53", "--reply-src", "10.180.0.1",
        "--reply-port-src", "5353"]
    assert filter_arguments(Match(None, 30053, ip_address("10.180.0.1"), 53)) == [
        "-p", "udp", "--orig-port-dst", "30053", "--reply-src", "10.180.0.1", "--reply-port-src", "53"]
    # protocol alone would delete every UDP flow: refused before any process runs
    assert Conntrack("no-such-namespace").delete(4, Match(None, None, None, None)) == 0
