"""tc's own flow tables (`na_ct`, and `na_ct6` for IPv6) read as conntrack tables, so the conntrack reconciler's
decision also clears the UDP flows that tc keeps pointing at removed endpoints.

`bpf-src/nodeport_tc.c` remembers every flow from outside in `na_ct` (`na_ct6`: an IPv6 flow; LRU maps, no
timeout): a UDP client keeps being sent to the backend it was first given, also after that endpoint is gone, until
the entry is evicted. The kernel's conntrack never sees these flows (tc translates before netfilter), so
kube-proxy's reconciler, which reads the kernel's table, cannot find them. This adapter presents tc's forward
entries as flows (original destination: the frontend; reply source: the backend), so the same decision
(`service.conntrack.stale_filters`) selects them; a deletion removes the forward entry and its reply entry, and the
client's next packet is given a live backend. One table per family, as one reconciler per family asks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from nodeagent.cluster.model import IPAddress
from nodeagent.service.conntrack import UDP, Filter

# must match `struct ct_key` in bpf-src/lib/maps.h: addresses and ports as on the wire (network order)
CT_KEY = struct.Struct("!4s4sHHBB2x")
# must match `struct ct_val` in bpf-src/lib/maps.h
CT_VALUE = struct.Struct("!4sH2x4sH2x")
# must match `struct ct_key6` in bpf-src/lib/maps.h (na_ct6): the same with 16-byte addresses
CT_KEY6 = struct.Struct("!16s16sHHBB2x")
# must match `struct ct_val6` in bpf-src/lib/maps.h (na_ct6)
CT_VALUE6 = struct.Struct("!16sH2x16sH2x")
# must match `enum na_ct_dir` in bpf-src/lib/maps.h
NA_CT_FORWARD, NA_CT_REPLY_LOCAL, NA_CT_REPLY_SNAT = 0, 1, 2
_PROTOCOLS = {6: "tcp", 17: UDP, 132: "sctp"}


@dataclass(frozen=True, slots=True)
class FlowLayout:
    """One family's flow map: its name under the pin directory, key and value layouts, and address type."""

    map_name: str
    key: struct.Struct
    value: struct.Struct
    address: type[IPv4Address] | type[IPv6Address]
    no_address: bytes  # an unset address field (a forward entry without SNAT)


LAYOUTS = {4: FlowLayout("na_ct", CT_KEY, CT_VALUE, IPv4Address, bytes(4)),
           6: FlowLayout("na_ct6", CT_KEY6, CT_VALUE6, IPv6Address, bytes(16))}


class FlowMap(Protocol):
    """What is used of the pinned `na_ct` or `na_ct6` map (`kernel.bpf.syscall.MapHandle`)."""

    def items(self) -> dict[bytes, bytes]: ...
    def delete(self, key: bytes) -> bool: ...


@dataclass(frozen=True, slots=True)
class TcFlow:
    """One flow tc translates: a forward entry of `na_ct` (`na_ct6`) and the key of its reply entry."""

    protocol: str
    orig_dst: IPAddress
    orig_dst_port: int
    reply_src: IPAddress
    reply_src_port: int
    key: bytes
    reply_key: bytes


def tc_flows(entries: dict[bytes, bytes], family: int = 4) -> Iterator[TcFlow]:
    """The forward flows among the entries of `family`'s flow map, each with the key of the reply entry tc wrote
    beside it."""
    layout = LAYOUTS[family]
    for key, value in entries.items():
        client, frontend, client_port, frontend_port, proto, direction = layout.key.unpack(key)
        if direction != NA_CT_FORWARD:
            continue
        backend, backend_port, snat, snat_port = layout.value.unpack(value)
        if snat != layout.no_address:  # a backend elsewhere: its replies come back to the address we masqueraded as
            reply = layout.key.pack(backend, snat, backend_port, snat_port, proto, NA_CT_REPLY_SNAT)
        else:  # a backend on this node: its replies leave towards the client
            reply = layout.key.pack(backend, client, backend_port, client_port, proto, NA_CT_REPLY_LOCAL)
        yield TcFlow(_PROTOCOLS.get(proto, str(proto)), layout.address(frontend), frontend_port,
                     layout.address(backend), backend_port, key, reply)


@dataclass
class TcFlowTable:
    """`family`'s flow map (`na_ct`, or `na_ct6` for 6) as a `service.conntrack.ConntrackTable`; asked about the
    other family it holds nothing (each family's reconciler has its own table)."""

    flow_map: FlowMap
    family: int = 4

    def flows(self, family: int, protocol: str = UDP) -> list[TcFlow]:
        """tc's forward flows of `protocol` (none for another family than the map's)."""
        if family != self.family:
            return []
        return [flow for flow in tc_flows(self.flow_map.items(), family) if flow.protocol == protocol]

    def delete(self, family: int, match: Filter) -> int:
        """Delete the flows `match` selects, each with its reply entry; how many flows went."""
        deleted = 0
        for flow in self.flows(family, match.protocol):
            if match.matches(flow):
                deleted += self.flow_map.delete(flow.key)
                self.flow_map.delete(flow.reply_key)
        return deleted
