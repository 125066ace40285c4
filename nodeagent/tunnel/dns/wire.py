"""The DNS wire format for the tunnel's DNS proxy: reading a pod's query, building the table's answers. Pure.

dnspython reads and writes every message; what this module decides is which input is answered at all:
- fewer than 12 bytes (no header), or a message with the QR bit (a response: answering it could loop two
  servers into each other), or more than `MAX_QUERY` bytes: dropped, no answer;
- an opcode other than QUERY: NOTIMP; a message dnspython cannot read (bad labels, a name over 255 octets,
  a compression loop, trailing junk) or one without exactly one question: FORMERR, as CoreDNS answers both
  (its server refuses `len(Question) != 1` with FORMERR);
- otherwise a `Query`.
Answers the table gives are authoritative (AA, as CoreDNS's kubernetes plugin sets), with recursion available
(the proxy forwards what it does not hold), a TTL of 5 s (the plugin's default `ttl`), and on NXDOMAIN or
NODATA the cluster domain's SOA in the authority section (the plugin's: `ns.dns.<domain>`,
`hostmaster.<domain>`, refresh 7200, retry 1800, expire 86400, minimum the TTL). Over UDP an answer larger
than the client can take (512 bytes, or its EDNS buffer size up to `MAX_UDP`) is sent truncated with TC set,
so the client asks again over TCP.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rrset

from nodeagent.cluster.model import IPAddress
from nodeagent.tunnel.dns.records import Outcome, Resolution

MAX_QUERY = 4096  # a query is one question and perhaps an OPT record: far below this; bigger ones are dropped
MAX_UDP = 1232  # the largest UDP answer sent (DNS flag day 2020's EDNS buffer size: no IP fragmentation)
PLAIN_UDP = 512  # RFC 1035's limit for a client without EDNS
TTL = 5
_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_KNOWN_TYPES = frozenset({"A", "AAAA", "CNAME", "SRV", "PTR", "TXT", "MX", "NS", "SOA", "ANY", "HTTPS", "SVCB",
                          "CAA", "NAPTR", "DS", "DNSKEY"})


@dataclass(frozen=True)
class Query:
    """A query the proxy answers or forwards: the message and its one question."""

    message: dns.message.Message
    data: bytes  # as received (what is forwarded)

    @property
    def name(self) -> dns.name.Name:
        """The question's name."""
        return self.message.question[0].name

    @property
    def rdtype(self) -> int:
        """The question's type."""
        return int(self.message.question[0].rdtype)

    @property
    def rdclass(self) -> int:
        """The question's class."""
        return int(self.message.question[0].rdclass)

    @property
    def family(self) -> int | None:
        """4 for an A question of class IN, 6 for AAAA, else None (not the table's to answer)."""
        if self.rdclass != dns.rdataclass.IN:
            return None
        return {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(dns.rdatatype.RdataType(self.rdtype))

    @property
    def question_wire(self) -> bytes:
        """The question as it is on the wire (name uncompressed, case kept, type, class)."""
        question = self.message.question[0]
        return (question.name.to_wire() or b"") + struct.pack("!HH", question.rdtype, question.rdclass)

    @property
    def udp_limit(self) -> int:
        """The largest UDP answer this client takes."""
        if self.message.edns < 0:
            return PLAIN_UDP
        return max(PLAIN_UDP, min(self.message.payload, MAX_UDP))


@dataclass(frozen=True)
class Malformed:
    """Input that is not a usable query: `reply` to send (None: drop it), and why, for the metrics."""

    reason: str  # short, one of a few: "short", "response", "oversize", "opcode", "malformed", "questions"
    reply: bytes | None = None
    rdtype: int | None = None


def type_label(rdtype: int | None) -> str:
    """A question type as a metric label: its mnemonic for the common types, else "other" (a flood of odd
    types must not make a series each)."""
    if rdtype is None:
        return "none"
    text = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))
    return text if text in _KNOWN_TYPES else "other"


def _header_only(data: bytes, rcode: int) -> bytes:
    """An answer of just a header: the query's id, opcode and RD, QR set, no records (for input not parsed)."""
    ident, flags = struct.unpack_from("!HH", data)
    keep = flags & (0x7800 | int(dns.flags.RD))  # opcode and RD
    return _HEADER.pack(ident, _QR | keep | rcode, 0, 0, 0, 0)


def parse(data: bytes) -> Query | Malformed:
    """Read one query from a pod (see the module doc for what is dropped, refused or answered FORMERR)."""
    if len(data) < _HEADER.size:
        return Malformed("short")
    if len(data) > MAX_QUERY:
        return Malformed("oversize")
    _, flags = struct.unpack_from("!HH", data)
    if flags & _QR:
        return Malformed("response")
    if (flags >> 11) & 0xF != dns.opcode.QUERY:
        return Malformed("opcode", _header_only(data, dns.rcode.NOTIMP))
    try:
        message = dns.message.from_wire(data)
    except (dns.exception.DNSException, ValueError, IndexError, struct.error):
        # every error dnspython raises on bad input is a DNSException; the others are belt and braces
        return Malformed("malformed", _header_only(data, dns.rcode.FORMERR))
    if len(message.question) != 1:
        return Malformed("questions", _header_only(data, dns.rcode.FORMERR))
    return Query(message, data)


def _response(query: Query) -> dns.message.Message:
    return dns.message.make_response(query.message, recursion_available=True, our_payload=MAX_UDP)


def local_answer(query: Query, resolution: Resolution, *, serial: int = 0,
                 chain: tuple[tuple[str, Resolution], ...] = ()) -> dns.message.Message:
    """The table's answer to `query`: `resolution` for its name, then `chain` (each CNAME target and what it
    resolved to, as far as it was followed)."""
    response = _response(query)
    response.flags |= dns.flags.AA
    rdtype = dns.rdatatype.RdataType(query.rdtype)
    last = resolution
    steps = [(query.name, resolution), *((dns.name.from_text(f"{name}."), step) for name, step in chain)]
    for step_owner, step in steps:
        last = step
        if step.outcome is Outcome.CNAME:
            response.answer.append(dns.rrset.from_text(step_owner, TTL, "IN", "CNAME", f"{step.cname}."))
        elif step.outcome is Outcome.ANSWER and step.addresses:
            response.answer.append(_addresses(step_owner, rdtype, step.addresses))
    if last.outcome is Outcome.NXDOMAIN:
        response.set_rcode(dns.rcode.NXDOMAIN)
    if last.outcome in (Outcome.NXDOMAIN, Outcome.NODATA) and last.zone:
        zone = last.zone
        response.authority.append(dns.rrset.from_text(
            f"{zone}.", TTL, "IN", "SOA", f"ns.dns.{zone}. hostmaster.{zone}. {serial & 0xFFFFFFFF} 7200 1800 86400 "
            f"{TTL}"))
    return response


def _addresses(owner: dns.name.Name, rdtype: dns.rdatatype.RdataType, addresses: tuple[IPAddress, ...]
               ) -> dns.rrset.RRset:
    # rdata made directly: from_text would run dnspython's tokenizer over every address
    kind = dns.rdtypes.IN.A.A if rdtype == dns.rdatatype.A else dns.rdtypes.IN.AAAA.AAAA
    return dns.rrset.from_rdata_list(owner, TTL, [kind(dns.rdataclass.IN, rdtype, str(ip)) for ip in addresses])


def error_answer(query: Query, rcode: int) -> bytes:
    """An answer with only the question and `rcode` (SERVFAIL: no upstream answered; REFUSED: over a limit)."""
    response = _response(query)
    response.set_rcode(dns.rcode.Rcode.make(rcode))
    return response.to_wire()


def encode(response: dns.message.Message, limit: int | None) -> bytes:
    """`response` on the wire; with a `limit` (UDP), truncated with TC set when it does not fit."""
    if limit is None:
        return response.to_wire()
    return response.to_wire(max_size=limit, prefer_truncation=True)


def with_id(data: bytes, ident: int) -> bytes:
    """A message with its id replaced (forwarded queries carry an id of the proxy's own)."""
    return struct.pack("!H", ident) + data[2:]


def answers_query(reply: bytes, ident: int, query: Query) -> bool:
    """Whether the upstream's `reply` answers `query` as forwarded with id `ident`: a response with that id
    and, byte for byte, the same one question (so also the name's case, which 0x20-randomizing clients
    check). Compared on the wire, not parsed: a forwarded answer is passed back as it came, and parsing it
    cost as much as the rest of the forward (a late, stray or spoofed datagram fails the comparison)."""
    if len(reply) < _HEADER.size:
        return False
    got_id, flags, questions = struct.unpack_from("!HHH", reply)
    question = query.question_wire
    return (got_id == ident and bool(flags & _QR) and questions == 1
            and reply[_HEADER.size:_HEADER.size + len(question)] == question)


def read_answer(reply: bytes) -> dns.message.Message | None:
    """An upstream's answer parsed (for the records of a followed CNAME); None if dnspython cannot read it."""
    try:
        return dns.message.from_wire(reply)
    except (dns.exception.DNSException, ValueError, IndexError, struct.error):
        return None


def lookup_query(name: str, rdtype: int) -> Query:
    """A query of the proxy's own (to follow a CNAME to a name it does not hold)."""
    message = dns.message.make_query(f"{name}.", dns.rdatatype.RdataType(rdtype), use_edns=0, payload=MAX_UDP)
    return Query(message, message.to_wire())
