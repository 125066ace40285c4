"""The IPv6 proxier against the real kernel, in a network namespace made for the test: the rendered IPv6 ruleset
loads with ip6tables-restore, and an IPv6 connection to a ClusterIP reaches its backend through the DNAT, while a
Service without endpoints is refused with ICMPv6 port unreachable (REJECT's IPv6 default). iptables (IPv4)
stays untouched: the IPv6 proxier writes only with ip6tables; cleanup removes what it wrote.

Client and backend both live in the test's namespace: the client's connection to the cluster IP is translated
in nat OUTPUT (KUBE-SERVICES), as for a process on a node."""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Iterator

import pytest

from nodeagent.kernel.netfilter import Iptables
from nodeagent.kernel.netns import in_netns
from nodeagent.service.config import ProxyConfig
from nodeagent.service.iptables import cleanup
from nodeagent.service.iptables.formats import format_save, node_tables
from nodeagent.service.iptables.proxier import IptablesProxier
from tests.support.netns import netns_run, scratch_netns
from tests.support.services import ep, service, slice_, snapshot_of

pytestmark = pytest.mark.root

CLUSTER_IP, BACKEND, EMPTY_IP = "fd00:172:30::41", "fd00:10::5", "fd00:172:30::46"
CONFIG = ProxyConfig(node_name="test-node", cluster_cidrs=(ipaddress.ip_network("fd00:10::/64"),), family=6)


def objects() -> tuple[dict[str, object], ...]:
    backend = slice_("ns1", "svc1", ep(BACKEND, node="test-node"), port=8080)
    backend["addressType"] = "IPv6"
    return (service("ns1", "svc1", CLUSTER_IP, ipFamilies=["IPv6"]), backend,
            service("ns6", "svc6", EMPTY_IP, ipFamilies=["IPv6"]))


@pytest.fixture
def node() -> Iterator[str]:
    """A namespace with the backend's address on a link (a veth pair, both ends inside) and a route to the Service
    range (no DAD wait)."""
    with scratch_netns("na-v6") as name:
        netns_run(name, "ip", "link", "add", "pods0", "type", "veth", "peer", "name", "pods1")
        for link in ("pods0", "pods1"):
            netns_run(name, "ip", "link", "set", link, "up")
        netns_run(name, "ip", "-6", "addr", "add", f"{BACKEND}/64", "dev", "pods0", "nodad")
        netns_run(name, "ip", "-6", "route", "add", "fd00:172:30::/64", "dev", "pods0")
        yield name


def serve_once(listener: socket.socket, seen: list[tuple[str, int]]) -> None:
    """Accept one connection, record the address it arrived at, answer with it."""
    conn, _ = listener.accept()
    with conn:
        here = conn.getsockname()[:2]
        seen.append(here)
        conn.sendall(f"{here[0]} {here[1]}".encode())


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_an_ipv6_connection_to_a_cluster_ip_reaches_its_backend(node: str, backend: str) -> None:
    ipt = Iptables(backend, node, ipv6=True)
    report = IptablesProxier(ipt).sync(snapshot_of(*objects()), CONFIG, set())
    assert report.full
    # what the kernel holds is what `nodeagent chains --family ipv6` prints (ip6tables-save's own layout)
    # (packet counters of built-in chains aside: the links' own IPv6 traffic, neighbour discovery, counts there)
    live = "".join(ipt.save(table) for table in ("filter", "nat", "mangle"))
    assert [re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in live.splitlines() if not line.startswith("#")] == \
        format_save(node_tables(report.rendered)).splitlines()
    assert "KUBE-SERVICES" not in "".join(Iptables(backend, node).save(t) for t in ("filter", "nat"))

    listener = in_netns(node, lambda: socket.create_server((BACKEND, 8080), family=socket.AF_INET6))
    seen: list[tuple[str, int]] = []
    server = threading.Thread(target=serve_once, args=(listener, seen), name="v6-backend")
    server.start()
    try:
        client = in_netns(node, lambda: socket.create_connection((CLUSTER_IP, 80), timeout=10))
        with client:
            assert client.getpeername()[:2] == (CLUSTER_IP, 80), "the client sees the cluster IP (un-DNAT)"
            answer = client.recv(200).decode()
    finally:
        server.join(timeout=10)
        listener.close()
    assert seen == [(BACKEND, 8080)] and answer == f"{BACKEND} 8080", "DNAT to [fd00:10::5]:8080"

    # no endpoints: `-j REJECT` in filter KUBE-SERVICES answers ICMPv6 port unreachable, a refused connection
    with pytest.raises(ConnectionRefusedError):
        in_netns(node, lambda: socket.create_connection((EMPTY_IP, 80), timeout=10))

    # cleanup removes the IPv6 proxier's ip6tables state (daemon.cleanup runs it where there is any)
    assert cleanup.has_our_chains(ipt) and cleanup.cleanup(ipt)
    assert not cleanup.has_our_chains(ipt)
    assert "KUBE-" not in "".join(ipt.save(table) for table in ("filter", "nat", "mangle"))
