"""The tunnel's view of dual-stack pods and its IPv6 sockets' pure parts: every address of a pod finds it, the
address dialled is the one asked for (in its family) and only ever the pod's own, an IPv6 original destination is
read from a `sockaddr_in6`, and a v4-mapped address is the IPv4 one (ztunnel's `to_canonical`)."""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

import pytest

from nodeagent.ca.identity import SpiffeId
from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Listed
from nodeagent.cluster.model import Kind
from nodeagent.state.tracker import ChangeTracker
from nodeagent.tunnel.proxy.admission import Refusal, check_target
from nodeagent.tunnel.proxy.sockets import canonical, family_of, original_destination
from nodeagent.tunnel.state.services import service_table
from nodeagent.tunnel.state.workloads import Workload, with_known_addresses, workload_table
from tests.support import objects as k8s

V4, V6 = "10.244.1.5", "fd00:10:244:1::5"
DUAL = Workload(V4, SpiffeId("cluster.local", "shop", "web"), "node1", "/run/netns/web", name="shop/web",
                ips=(V4, V6))


def dual_stack_pod(name: str, *ips: str) -> dict[str, Any]:
    raw = k8s.pod(name, ips[0])
    raw["status"]["podIPs"] = [{"ip": ip} for ip in ips]
    return raw


@pytest.mark.parametrize("order", [(V4, V6), (V6, V4)])
def test_a_dual_stack_pod_is_one_workload_under_both_addresses_served_by_its_ipv4(order: tuple[str, str]) -> None:
    tracker = ChangeTracker("node1")
    pods = [dual_stack_pod("web", *order)]
    namespaces = [k8s.namespace("shop", **{"nodeagent.io/mesh": "enabled"})]
    for kind, raws in ((Kind.POD, pods), (Kind.NAMESPACE, namespaces)):
        tracker.apply(Listed(kind, tuple((object_ref(r), decode(r)) for r in raws), "1"))
    snapshot = tracker.snapshot()
    assert snapshot is not None
    table = workload_table(snapshot, "node1")
    assert table.lookup(V4) is table.lookup(V6) is table.lookup(V4)
    workload = table.lookup(V6)
    assert workload is not None and workload.ip == V4 and workload.addresses == (V4, V6)
    assert list(table.local) == [V4]  # served once (one set of listeners), by its IPv4 address


def test_an_ipv6_only_pod_is_served_by_its_ipv6_address() -> None:
    tracker = ChangeTracker("node1")
    tracker.apply(Listed(Kind.POD, ((object_ref(raw := dual_stack_pod("v6", V6)), decode(raw)),), "1"))
    tracker.apply(Listed(Kind.NAMESPACE, ((object_ref(ns := k8s.namespace("shop", **{"nodeagent.io/mesh": "enabled"})),
                                          decode(ns)),), "1"))
    snapshot = tracker.snapshot()
    assert snapshot is not None
    assert list(workload_table(snapshot, "node1").local) == [V6]


@pytest.mark.parametrize(("asked", "dialled"), [
    (V6, V6), ("fd00:10:244:1:0:0:0:5", V6), (V4, V4),
    ("fd00:10:244:1::6", V4), ("::ffff:10.244.1.5", V4), ("not-an-address", V4)])
def test_the_address_dialled_is_the_pods_own_in_the_family_asked(asked: str, dialled: str) -> None:
    assert DUAL.address_for(asked) == dialled


def test_either_address_of_the_pod_is_a_target_and_no_other() -> None:
    assert check_target(DUAL.addresses, V6, 8080) is None
    assert check_target(DUAL.addresses, "fd00:10:244:1:0::5", 8080) is None
    assert check_target(DUAL.addresses, V4, 8080) is None
    refused = check_target(DUAL.addresses, "fd00:10:244:1::6", 8080)
    assert refused is not None and refused.refusal is Refusal.NOT_THIS_POD and V6 in refused.reason
    tunnel_port = check_target(DUAL.addresses, V6, 15008)
    assert tunnel_port is not None and tunnel_port.refusal is Refusal.TUNNEL_PORT


def test_families_and_canonical_addresses() -> None:
    assert family_of(V6) == socket.AF_INET6 and family_of(V4) == socket.AF_INET
    assert canonical("::ffff:10.244.1.5") == V4
    assert canonical("FD00:10:244:1:0:0:0:5") == V6
    assert canonical("garbage") == "garbage"


class _Redirected:
    """A socket whose IPv4 SO_ORIGINAL_DST fails (an IPv6 connection) and whose IPv6 one answers `answer`."""

    family = socket.AF_INET6

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.asked: list[tuple[int, int, int]] = []

    def getsockopt(self, level: int, name: int, size: int) -> bytes:
        self.asked.append((level, name, size))
        if level == socket.SOL_IP:
            raise OSError(2, "No such file or directory")
        return self.answer


def _sockaddr_in6(address: str, port: int) -> bytes:
    return (socket.AF_INET6.to_bytes(2, sys.byteorder) + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, address) + b"\0" * 4)


def test_an_ipv6_original_destination_is_read_from_ip6t_so_original_dst() -> None:
    sock = _Redirected(_sockaddr_in6("fd00:10:244:2::9", 8443))
    assert original_destination(sock) == ("fd00:10:244:2::9", 8443)  # type: ignore[arg-type]
    assert sock.asked == [(socket.SOL_IP, 80, 16), (socket.IPPROTO_IPV6, 80, 28)]


def test_an_answer_that_is_not_a_sockaddr_in6_is_an_error() -> None:
    with pytest.raises(OSError, match="not a sockaddr_in6"):
        original_destination(_Redirected(b"\x02\x00" + b"\0" * 26))  # type: ignore[arg-type]


def test_a_dual_stack_services_frontends_lead_to_endpoints_of_their_own_family() -> None:
    tracker = ChangeTracker("node1")
    service = k8s.service("web", cluster_ip="10.96.0.10", clusterIPs=["10.96.0.10", "fd00:96::10"],
                          ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="PreferDualStack")
    objects = [k8s.node("node1", "172.18.0.2", "10.244.1.0/24"), service,
               k8s.endpoint_slice("web-v4", "web", [k8s.endpoint(V4, pod="web-1")]),
               k8s.endpoint_slice("web-v6", "web", [k8s.endpoint(V6, pod="web-1")], address_type="IPv6")]
    tracker.apply(Listed(Kind.NODE, ((object_ref(objects[0]), decode(objects[0])),), "1"))
    tracker.apply(Listed(Kind.SERVICE, ((object_ref(service), decode(service)),), "1"))
    tracker.apply(Listed(Kind.ENDPOINT_SLICE, tuple((object_ref(o), decode(o)) for o in objects[2:]), "1"))
    snapshot = tracker.snapshot()
    assert snapshot is not None
    table = service_table(snapshot)
    v4, v6 = table.lookup("10.96.0.10", 80), table.lookup("fd00:96::10", 80)
    assert v4 is not None and v6 is not None
    assert [str(c.key[0]) for c in v4.endpoints] == [V4]
    assert [str(c.key[0]) for c in v6.endpoints] == [V6]


def test_a_pod_served_by_one_address_gains_the_others_the_table_knows() -> None:
    assigned = Workload(V4, DUAL.identity, "node1", "/run/netns/web", name="shop/web")
    assert with_known_addresses(assigned, DUAL).addresses == (V4, V6)
    assert with_known_addresses(assigned, None) is assigned
    other = Workload(V4, DUAL.identity, "node1", name="shop/other", ips=(V4, "fd00::99"))
    assert with_known_addresses(assigned, other) is assigned  # an address reused by another pod: not ours
