"""The DNS proxy's answers on the wire, and what it does with hostile input (no sockets: `DnsProxy.answer`)."""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any, cast

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from prometheus_client import CollectorRegistry

from nodeagent.kernel.netns import OpenNetns
from nodeagent.tunnel.dns.records import DnsTable, dns_table
from nodeagent.tunnel.dns.server import (
    DnsOptions,
    DnsProxy,
    Upstream,
    _DnsPod,
    parse_upstream,
    resolv_conf_upstreams,
)
from nodeagent.tunnel.dns.wire import MAX_QUERY, Query, parse
from tests.support.objects import endpoint, endpoint_slice, namespace, service
from tests.support.services import snapshot_of

HEADLESS = 200  # endpoints of a big headless Service: its A answer cannot fit in 512 bytes


def _table() -> DnsTable:
    objects: list[dict[str, Any]] = [
        namespace("demo"), service("echo", "demo", "10.96.0.10"),
        service("big", "demo", "None", clusterIPs=["None"]),
        endpoint_slice("big-1", "big", [endpoint(f"10.244.{i // 250}.{i % 250 + 1}") for i in range(HEADLESS)],
                       "demo"),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "alias", "namespace": "demo"},
         "spec": {"type": "ExternalName", "externalName": "echo.demo.svc.cluster.local"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": "demo"},
         "spec": {"type": "ExternalName", "externalName": "example.com"}},
    ]
    table = dns_table(snapshot_of(*objects))
    assert table is not None
    return table


class Recorder:
    """A stand-in for the pod's resolver: records what is forwarded, answers as told."""

    def __init__(self, answer: str | None = "203.0.113.7") -> None:
        self.asked: list[tuple[str, int, str]] = []
        self.answer = answer

    async def __call__(self, pod: _DnsPod, query: Query, protocol: str, original: Upstream | None
                       ) -> bytes | None:
        self.asked.append((query.name.to_text(), query.rdtype, protocol))
        if self.answer is None:
            return None
        reply = dns.message.make_response(query.message)
        if query.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(query.name, 60, "IN", "A", self.answer))
        return reply.to_wire()


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> tuple[DnsProxy, _DnsPod, Recorder]:
    table = _table()
    made = DnsProxy(DnsOptions(upstreams=(("192.0.2.53", 53),)), lambda: table, CollectorRegistry())
    recorder = Recorder()
    monkeypatch.setattr(made, "_ask", recorder)
    return made, _DnsPod("10.244.1.2", "demo/client", OpenNetns("/nonexistent", -1)), recorder


def _ask(proxy: tuple[DnsProxy, _DnsPod, Recorder], data: bytes, protocol: str = "udp") -> bytes | None:
    return asyncio.run(proxy[0].answer(proxy[1], data, protocol))


def _query(name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kw)


def _sample(proxy: DnsProxy, name: str, **labels: str) -> float:
    value = proxy.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def test_service_answered_locally_authoritative(proxy: tuple[DnsProxy, _DnsPod, Recorder]) -> None:
    query = _query("Echo.Demo.svc.cluster.local.")
    reply = dns.message.from_wire(_ask(proxy, query.to_wire()) or b"")
    assert reply.id == query.id and reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.AA and reply.flags & dns.flags.QR
    assert [rr.to_text() for rrset in reply.answer for rr in rrset] == ["10.96.0.10"]
    assert reply.answer[0].ttl == 5
    assert proxy[2].asked == []
    assert _sample(proxy[0], "nodeagent_tunnel_dns_requests_total", outcome="local", type="A", protocol="udp") == 1


def test_nxdomain_and_nodata_carry_the_zone_soa(proxy: tuple[DnsProxy, _DnsPod, Recorder]) -> None:
    nx = dns.message.from_wire(_ask(proxy, _query("nope.demo.svc.cluster.local.").to_wire()) or b"")
    assert nx.rcode() == dns.rcode.NXDOMAIN and not nx.answer
    assert nx.authority[0].rdtype == dns.rdatatype.SOA and nx.authority[0].name.to_text() == "cluster.local."
    nodata = dns.message.from_wire(_ask(proxy, _query("echo.demo.svc.cluster.local.", "AAAA").to_wire()) or b"")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA


def test_external_name_cname_followed_in_the_table(proxy: tuple[DnsProxy, _DnsPod, Recorder]) -> None:
    reply = dns.message.from_wire(_ask(proxy, _query("alias.demo.svc.cluster.local.").to_wire()) or b"")
    assert [(r.rdtype, r.name.to_text()) for r in reply.answer] == [
        (dns.rdatatype.CNAME, "alias.demo.svc.cluster.local."), (dns.rdatatype.A, "echo.demo.svc.cluster.local.")]
    assert proxy[2].asked == []


def test_external_name_cname_target_asked_upstream(proxy: tuple[DnsProxy, _DnsPod, Recorder]) -> None:
    reply = dns.message.from_wire(_ask(proxy, _query("ext.demo.svc.cluster.local.").to_wire()) or b"")
    assert reply.answer[0].rdtype == dns.rdatatype.CNAME
    assert reply.answer[0][0].target.to_text() == "example.com."
    assert reply.answer[1].to_text().split()[-1] == "203.0.113.7"
    assert proxy[2].asked == [("example.com.", dns.rdatatype.A, "udp")]


def test_unknown_names_and_other_types_are_forwarded(proxy: tuple[DnsProxy, _DnsPod, Recorder]) -> None:
    query = _query("www.example.com.")
    reply = dns.message.from_wire(_ask(proxy, query.to_wire()) or b"")
    assert reply.id == query.id  # the pod's own id back, whatever id the forward used
    assert reply.answer[0].to_text().split()[-1] == "203.0.113.7"
    _ask(proxy, _query("echo.demo.svc.cluster.local.", "SRV").to_wire(), "tcp")
    assert proxy[2].asked == [("www.example.com.", dns.rdatatype.A, "udp"),
                              ("echo.demo.svc.cluster.local.", dns.rdatatype.SRV, "tcp")]
    assert _sample(proxy[0], "nodeagent_tunnel_dns_requests_total", outcome="forwarded", type="SRV",
                   protocol="tcp") == 1


def test_no_upstream_answer_is_servfail(proxy: tuple[DnsProxy, _DnsPod, Recorder]) -> None:
    proxy[2].answer = None
    reply = dns.message.from_wire(_ask(proxy, _query("www.example.com.").to_wire()) or b"")
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert _sample(proxy[0], "nodeagent_tunnel_dns_requests_total", outcome="failed", type="A", protocol="udp") == 1


def test_over_the_forward_limit_is_refused(proxy: tuple[DnsProxy, _DnsPod, Recorder]) -> None:
    proxy[0].in_flight = proxy[0].options.max_forwards
    reply = dns.message.from_wire(_ask(proxy, _query("www.example.com.").to_wire()) or b"")
    assert reply.rcode() == dns.rcode.REFUSED and proxy[2].asked == []
    # local answers need no forward: still answered
    local = dns.message.from_wire(_ask(proxy, _query("echo.demo.svc.cluster.local.").to_wire()) or b"")
    assert local.rcode() == dns.rcode.NOERROR and local.answer


def test_big_answer_truncated_over_udp_whole_over_tcp(proxy: tuple[DnsProxy, _DnsPod, Recorder]) -> None:
    query = _query("big.demo.svc.cluster.local.")
    udp = _ask(proxy, query.to_wire()) or b""
    assert len(udp) <= 512
    truncated = dns.message.from_wire(udp)
    assert truncated.flags & dns.flags.TC and not truncated.answer
    tcp = dns.message.from_wire(_ask(proxy, query.to_wire(), "tcp") or b"")
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == HEADLESS
    # with EDNS the client takes up to 1232 bytes: still too big for 200 addresses, truncated within it
    edns = _ask(proxy, _query("big.demo.svc.cluster.local.", use_edns=0, payload=4096).to_wire()) or b""
    assert len(edns) <= 1232 and dns.message.from_wire(edns).flags & dns.flags.TC


def _header(ident: int = 0x1234, flags: int = 0x0100, qd: int = 1) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, 0, 0, 0)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "short"), (b"\x12\x34\x01", "short"),
    (_header(flags=0x8100) + b"\x00\x00\x01\x00\x01", "response"),  # QR set: never answer a response
    (_header() + b"\x00" * (MAX_QUERY), "oversize"),
])
def test_hostile_input_dropped(proxy: tuple[DnsProxy, _DnsPod, Recorder], data: bytes, reason: str) -> None:
    assert _ask(proxy, data) is None
    assert _sample(proxy[0], "nodeagent_tunnel_dns_dropped_total", reason=reason) == 1
    assert proxy[2].asked == []


def _rcode(reply: bytes | None) -> int:
    assert reply is not None and len(reply) == 12
    ident, flags = struct.unpack_from("!HH", reply)
    assert ident == 0x1234 and flags & 0x8000
    return int(flags & 0xF)


@pytest.mark.parametrize("body", [
    b"\x3f" + b"a" * 10,  # a label longer than the packet
    b"\xc0\x0c\x00\x01\x00\x01",  # a compression pointer to itself: a loop
    b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00\x00\x01\x00\x01",  # a name over 255 octets
    b"\x01a\x00\x00\x01\x00\x01" + b"junk",  # trailing bytes
    b"\x80abc\x00\x00\x01\x00\x01",  # a label type that does not exist
])
def test_malformed_queries_get_formerr(proxy: tuple[DnsProxy, _DnsPod, Recorder], body: bytes) -> None:
    assert _rcode(_ask(proxy, _header() + body)) == dns.rcode.FORMERR
    assert proxy[2].asked == []
    assert _sample(proxy[0], "nodeagent_tunnel_dns_requests_total", outcome="malformed", type="none",
                   protocol="udp") == 1


def test_not_one_question_is_formerr_other_opcodes_notimp(proxy: tuple[DnsProxy, _DnsPod, Recorder]) -> None:
    two = _header(qd=2) + b"\x01a\x00\x00\x01\x00\x01" * 2
    assert _rcode(_ask(proxy, two)) == dns.rcode.FORMERR
    assert _rcode(_ask(proxy, _header(qd=0))) == dns.rcode.FORMERR
    assert _rcode(_ask(proxy, _header(flags=0x2800) + b"\x01a\x00\x00\x06\x00\x01")) == dns.rcode.NOTIMP  # UPDATE


def test_parse_keeps_the_question() -> None:
    query = parse(_query("echo.demo.svc.cluster.local.", "AAAA").to_wire())
    assert isinstance(query, Query) and query.family == 6 and query.udp_limit == 512


def test_upstreams_from_resolv_conf_and_flags() -> None:
    text = "# generated\nsearch demo.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a # six\n" \
           "nameserver bogus\noptions ndots:5\n"
    assert resolv_conf_upstreams(text) == (("10.96.0.10", 53), ("fd00::a", 53))
    assert parse_upstream("10.0.0.1:5353") == ("10.0.0.1", 5353)
    assert parse_upstream("[fd00::1]:54") == ("fd00::1", 54)
    assert parse_upstream("fd00::1") == ("fd00::1", 53)
    for bad in ("dns.example", "10.0.0.1:x", "[fd00::1]x", "10.0.0.1:70000"):
        with pytest.raises(ValueError):
            parse_upstream(bad)


def test_repeated_question_answered_again_with_its_own_id(proxy: tuple[DnsProxy, _DnsPod, Recorder]) -> None:
    first, second = _query("echo.demo.svc.cluster.local."), _query("echo.demo.svc.cluster.local.")
    second.id = (first.id + 1) % 65536
    replies = [dns.message.from_wire(_ask(proxy, q.to_wire()) or b"") for q in (first, second)]
    assert [r.id for r in replies] == [first.id, second.id]
    assert _addresses(replies[0]) == _addresses(replies[1]) == ["10.96.0.10"]
    assert len(proxy[0]._cache) == 1
    assert _sample(proxy[0], "nodeagent_tunnel_dns_requests_total", outcome="local", type="A", protocol="udp") == 2
    # the name's case as asked is echoed (0x20 randomization): a different question, not the kept answer
    mixed = dns.message.from_wire(_ask(proxy, _query("eCHo.demo.svc.cluster.local.").to_wire()) or b"")
    assert mixed.question[0].name.to_text() == "eCHo.demo.svc.cluster.local."


def test_kept_answers_end_with_their_table() -> None:
    tables = [_table()]
    changed = dns_table(snapshot_of(namespace("demo"), service("echo", "demo", "10.96.0.99")))
    made = DnsProxy(DnsOptions(), lambda: tables[-1], CollectorRegistry())
    pod = _DnsPod("10.244.1.2", "demo/client", OpenNetns("/nonexistent", -1))
    wire = _query("echo.demo.svc.cluster.local.").to_wire()
    assert _addresses(dns.message.from_wire(asyncio.run(made.answer(pod, wire, "udp")) or b"")) == ["10.96.0.10"]
    assert changed is not None
    tables.append(changed)
    assert _addresses(dns.message.from_wire(asyncio.run(made.answer(pod, wire, "udp")) or b"")) == ["10.96.0.99"]


def _addresses(reply: dns.message.Message) -> list[str]:
    return [rr.to_text() for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for rr in rrset]


class _Transport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def sendto(self, data: bytes, addr: object = None) -> None:
        self.sent.append(data)


def test_datagrams_in_progress_are_released_with_their_pod() -> None:
    table = _table()
    made = DnsProxy(DnsOptions(max_pending=2), lambda: table, CollectorRegistry())
    pod = _DnsPod("10.244.1.2", "demo/client", OpenNetns("/dev/null", os.open("/dev/null", os.O_RDONLY)))
    made.pods[pod.ip] = pod
    transport = _Transport()
    wire = _query("echo.demo.svc.cluster.local.").to_wire()

    async def scenario() -> None:
        for _ in range(3):  # the third is over max_pending: dropped, counted
            made.datagram(pod, cast(Any, transport), wire, ("127.0.0.1", 5000))
        assert made.pending == 2
        made.remove_pod(pod.ip)  # cancels both before they ran
        for _ in range(5):  # a cancelled task ends on the next loop pass, its callbacks on the one after
            await asyncio.sleep(0)
        assert made.pending == 0 and not pod.tasks
        assert transport.sent == []

    asyncio.run(scenario())
    assert _sample(made, "nodeagent_tunnel_dns_dropped_total", reason="busy") == 1


def test_only_the_answer_to_the_forwarded_question_is_taken() -> None:
    from nodeagent.tunnel.dns.wire import answers_query, with_id
    asked = _query("WwW.example.com.")
    query = parse(asked.to_wire())
    assert isinstance(query, Query)
    reply = dns.message.make_response(asked)
    reply.answer.append(dns.rrset.from_text("www.example.com.", 30, "IN", "A", "203.0.113.7"))
    wire = with_id(reply.to_wire(), 4242)
    assert answers_query(wire, 4242, query)
    assert not answers_query(wire, 4243, query)  # another id: a stray or spoofed datagram
    assert not answers_query(with_id(asked.to_wire(), 4242), 4242, query)  # not a response
    lower = dns.message.make_response(_query("www.example.com."))
    assert not answers_query(with_id(lower.to_wire(), 4242), 4242, query)  # the name's case differs (0x20)
    aaaa = dns.message.make_response(_query("WwW.example.com.", "AAAA"))
    assert not answers_query(with_id(aaaa.to_wire(), 4242), 4242, query)
    assert not answers_query(wire[:14], 4242, query)
