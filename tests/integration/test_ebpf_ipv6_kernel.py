"""The socket load balancer's IPv6 hooks against the real kernel: connect6, sendmsg6, recvmsg6 and getpeername6
attached to a cgroup the test makes, clients run in that cgroup inside a network namespace the test makes.

- a TCP connect to an IPv6 ClusterIP reaches an IPv6 backend, and getpeername shows the VIP;
- UDP sendto an IPv6 VIP reaches a backend, and recvfrom reports the reply from the VIP;
- an IPv4 Service dialed v4-mapped (::ffff:VIP4) from an IPv6 socket, TCP and UDP, as Cilium's
  sock6_xlate_v4_in_v6 / sock6_xlate_rev_v4_in_v6 (bpf/bpf_sock.c) do it;
- a dual-stack Service over both families; ClientIP affinity and weights of IPv6 backends; an IPv6 Service
  without endpoints refuses the connect.

The map entries are what the agent writes: `desired.plan(..., family=6)` of Services and EndpointSlices,
written by `MapSync(family=6)`. Backends are addresses on the namespace's loopback, served by this process
(outside the test cgroup, so its own sockets are never translated). No route leads to any VIP: a connect that
is not translated fails at once (ENETUNREACH), so each test fails without the IPv6 programs.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nodeagent.kernel.bpf import loader
from nodeagent.kernel.netns import in_netns
from nodeagent.service.ebpf.desired import plan
from nodeagent.service.ebpf.maps import MapSync
from tests.support.netns import netns_run, scratch_netns
from tests.support.services import ep, service, slice_, snapshot_of

pytestmark = [pytest.mark.root, pytest.mark.bcc]

V6_BACKENDS = ("fd00:10::5", "fd00:10::6")
V4_BACKEND = "10.0.0.5"
PORT = 8080
V6_VIP, V6_STICKY, V6_EMPTY, V6_WEIGHTED = "fd00:172:30::41", "fd00:172:30::42", "fd00:172:30::43", "fd00:172:30::44"
V4_VIP = "172.30.0.41"
DUAL_V4, DUAL_V6 = "172.30.0.50", "fd00:172:30::50"


TWO_PORTS = [{"name": "p80", "port": 80, "protocol": "TCP", "targetPort": PORT},
             {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": PORT}]


def v6_slice(name: str, *endpoints: dict[str, Any]) -> dict[str, Any]:
    made = slice_("ns", name, *endpoints, port=PORT)
    made["addressType"] = "IPv6"
    made["metadata"]["name"] = f"{name}-v6"
    return made


def both_ports(made: dict[str, Any]) -> dict[str, Any]:
    """The slice with the TCP port p80 and the UDP port dns, both on PORT."""
    made["ports"] = [{"name": "p80", "port": PORT, "protocol": "TCP"}, {"name": "dns", "port": PORT, "protocol": "UDP"}]
    return made


def objects() -> tuple[dict[str, Any], ...]:
    both = [ep(ip) for ip in V6_BACKENDS]
    weighted = service("ns", "weighted", V6_WEIGHTED, ipFamilies=["IPv6"])
    weighted["metadata"]["annotations"] = {"nodeagent.io/endpoint-weights": '{"b": 0}'}
    dual = service("ns", "dual", DUAL_V4, ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack")
    dual["spec"]["clusterIPs"] = [DUAL_V4, DUAL_V6]
    return (
        service("ns", "web", V6_VIP, ipFamilies=["IPv6"], ports=TWO_PORTS),
        both_ports(v6_slice("web", ep(V6_BACKENDS[0]))),
        service("ns", "sticky", V6_STICKY, ipFamilies=["IPv6"], sessionAffinity="ClientIP"),
        v6_slice("sticky", *both),
        service("ns", "empty", V6_EMPTY, ipFamilies=["IPv6"]),
        weighted,
        v6_slice("weighted", *(dict(ep(ip), targetRef={"kind": "Pod", "name": name})
                               for ip, name in zip(V6_BACKENDS, "ab", strict=True))),
        service("ns", "four", V4_VIP, ports=TWO_PORTS),
        both_ports(slice_("ns", "four", ep(V4_BACKEND), port=PORT)),
        dual,
        slice_("ns", "dual", ep(V4_BACKEND), port=PORT),
        v6_slice("dual", ep(V6_BACKENDS[1])),
    )


@dataclass
class Node:
    """The test's namespace, cgroup and loaded programs, and what the backends saw."""

    netns: str
    cgroup: Path
    seen: list[tuple[str, str]] = field(default_factory=list)  # (protocol, local address) per request served

    def run(self, code: str, *args: str) -> Any:
        """Run Python `code` in the namespace and the cgroup (where the programs translate); its JSON output."""
        result = subprocess.run(
            [sys.executable, "-m", "nodeagent.lab.enter", "--netns", self.netns, "--cgroup", str(self.cgroup), "--",
             sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)


def serve_tcp(listener: socket.socket, seen: list[tuple[str, str]]) -> None:
    """Answer each connection with the address it arrived at (the backend it reached)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            here = conn.getsockname()[0]
            seen.append(("tcp", here))
            conn.sendall(here.encode())


def serve_udp(sock: socket.socket, seen: list[tuple[str, str]]) -> None:
    """Answer each datagram with the address it arrived at."""
    here = sock.getsockname()[0]
    while True:
        try:
            _, peer = sock.recvfrom(2048)
        except OSError:
            return
        seen.append(("udp", here))
        sock.sendto(here.encode(), peer)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    name = f"na-ebpf6-{secrets.token_hex(3)}"
    cgroup = loader.cgroup2_root() / name
    with scratch_netns("na-ebpf6") as netns:
        for address in (*V6_BACKENDS,):
            netns_run(netns, "ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
        netns_run(netns, "ip", "addr", "add", f"{V4_BACKEND}/32", "dev", "lo")
        cgroup.mkdir()
        sockets: list[socket.socket] = []
        try:
            datapath = loader.load(name)
            loader.attach(datapath, cgroup)
            snapshot = snapshot_of(*objects())
            for family in (4, 6):
                planned = plan(snapshot.service_ports, snapshot.endpoints, node_ips=[], family=family)
                MapSync(datapath.maps, family=family).apply(planned.entries)
            built = Node(netns, cgroup)
            for address, family in ((V6_BACKENDS[0], socket.AF_INET6), (V6_BACKENDS[1], socket.AF_INET6),
                                    (V4_BACKEND, socket.AF_INET)):
                listener = in_netns(netns, lambda a=address, f=family: socket.create_server((a, PORT), family=f))
                udp = in_netns(netns, lambda f=family: socket.socket(f, socket.SOCK_DGRAM))
                udp.bind((address, PORT))
                sockets += [listener, udp]
                threading.Thread(target=serve_tcp, args=(listener, built.seen), daemon=True).start()
                threading.Thread(target=serve_udp, args=(udp, built.seen), daemon=True).start()
            yield built
            datapath.close()
        finally:
            for each in sockets:
                each.close()
            loader.detach(cgroup)
            cgroup.rmdir()
            loader.remove_pins(name)


TCP = """
import json, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
out = []
for _ in range(int(sys.argv[3])):
    s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(5)
    s.connect((sys.argv[1], int(sys.argv[2])))
    out.append({"peer": list(s.getpeername()[:2]), "served_by": s.recv(100).decode()}); s.close()
print(json.dumps(out))
"""

UDP = """
import json, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(b"hi", (sys.argv[1], int(sys.argv[2])))
data, source = s.recvfrom(100)
print(json.dumps({"source": list(source[:2]), "served_by": data.decode()}))
"""


def test_tcp_to_an_ipv6_cluster_ip_reaches_its_backend_and_getpeername_shows_the_vip(node: Node) -> None:
    (answer,) = node.run(TCP, V6_VIP, "80", "1")
    assert answer["served_by"] == V6_BACKENDS[0]
    assert answer["peer"] == [V6_VIP, 80], "getpeername6 shows the address dialed"


def test_udp_sendmsg6_reaches_a_backend_and_the_reply_comes_from_the_vip(node: Node) -> None:
    answer = node.run(UDP, V6_VIP, "53")
    assert answer["served_by"] == V6_BACKENDS[0]
    assert answer["source"] == [V6_VIP, 53], "recvmsg6 reports the Service address"


def test_a_v4_mapped_address_reaches_an_ipv4_service_as_cilium_does(node: Node) -> None:
    mapped = f"::ffff:{V4_VIP}"
    (answer,) = node.run(TCP, mapped, "80", "1")
    assert answer == {"peer": [mapped, 80], "served_by": V4_BACKEND}
    # UDP: the kernel hands a v4-mapped send to udp_sendmsg (sendmsg4); recvmsg6 finds its IPv4 reverse entry
    answer = node.run(UDP, mapped, "53")
    assert answer == {"source": [mapped, 53], "served_by": V4_BACKEND}


def test_a_dual_stack_service_is_reached_over_both_families(node: Node) -> None:
    (v4,) = node.run(TCP, DUAL_V4, "80", "1")
    (v6,) = node.run(TCP, DUAL_V6, "80", "1")
    assert v4 == {"peer": [DUAL_V4, 80], "served_by": V4_BACKEND}
    assert v6 == {"peer": [DUAL_V6, 80], "served_by": V6_BACKENDS[1]}


def test_client_ip_affinity_keeps_one_ipv6_backend_and_weights_choose(node: Node) -> None:
    sticky = Counter(a["served_by"] for a in node.run(TCP, V6_STICKY, "80", "20"))
    assert len(sticky) == 1 and set(sticky) <= set(V6_BACKENDS), sticky
    weighted = Counter(a["served_by"] for a in node.run(TCP, V6_WEIGHTED, "80", "20"))
    assert weighted == {V6_BACKENDS[0]: 20}, "weight 0 takes pod b out"


def test_an_ipv6_service_without_endpoints_refuses_the_connect(node: Node) -> None:
    code = ("import socket,sys,json,errno\ns=socket.socket(socket.AF_INET6);s.settimeout(5)\n"
            "try:\n s.connect((sys.argv[1],80));print(json.dumps('connected'))\n"
            "except OSError as e:\n print(json.dumps(errno.errorcode.get(e.errno)))")
    assert node.run(code, V6_EMPTY) == "ECONNREFUSED"
