"""The tunnel as tests read it: its config dump, its metrics, and frames on the lab's fabric."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from nodeagent.kernel.netns import in_netns
from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from tests.support.netns import netns_run


def admin_dump(lab: labs.Lab, node: str) -> dict[str, Any]:
    """The tunnel's /config_dump, read from inside its node (the admin port is localhost only)."""
    out = netns_run(lab.plan.node(node).netns, "python3", "-c",
                    "import urllib.request;print(urllib.request.urlopen("
                    "'http://127.0.0.1:15000/config_dump',timeout=5).read().decode())")
    result: dict[str, Any] = json.loads(out)
    return result


def metrics(lab: labs.Lab, node: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The tunnel's /metrics on `node`, parsed by the Prometheus text parser: (sample, labels) -> value."""
    address = lab.plan.node(node).node.address
    text = netns_run(lab.plan.node(node).netns, "python3", "-c", "import sys,urllib.request;sys.stdout.write("
                     f"urllib.request.urlopen('http://{address}:15020/metrics',timeout=5).read().decode())")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in values.items() if n == name and labels.items() <= dict(ls).items())


# DNS questions from inside a pod: over unconnected UDP (sendto, as musl and dnspython send; dnspython refuses an
# answer from another address than the one asked), connected UDP (glibc connects a socket per nameserver;
# getpeername must show the resolver), a dual-stack socket to the v4-mapped resolver (IPv4 resolvers), TCP,
# and with a mark a UDP socket carrying it. Prints each answer's rcode and addresses, or the error's type.
ASK_DNS = r"""
import json, socket, sys
import dns.message, dns.query, dns.rcode
name, rdtype, resolver, mark, timeout = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
ways = sys.argv[6].split(",")
query = dns.message.make_query(name, rdtype)
family = socket.AF_INET6 if ":" in resolver else socket.AF_INET

def show(message):
    return [dns.rcode.to_text(message.rcode()), sorted(rr.to_text() for rs in message.answer for rr in rs)]

def connected():
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.connect((resolver, 53))
    peer = s.getpeername()
    s.send(query.to_wire())
    return show(dns.message.from_wire(s.recv(4096))) + [f"{peer[0]}:{peer[1]}"]

def marked():
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    s.settimeout(timeout)
    s.sendto(query.to_wire(), (resolver, 53))
    return show(dns.message.from_wire(s.recv(4096)))

answers = {}
for how, ask in (("udp", lambda: show(dns.query.udp(query, resolver, port=53, timeout=timeout))),
                 ("udp-connected", connected),
                 ("udp-mapped", lambda: show(dns.query.udp(query, "::ffff:" + resolver, port=53, timeout=timeout))),
                 ("tcp", lambda: show(dns.query.tcp(query, resolver, port=53, timeout=timeout))),
                 ("udp-marked", marked)):
    if (how == "udp-marked" and not mark) or (how == "udp-mapped" and family == socket.AF_INET6) or (
            how not in ways and ways != ["all"]):
        continue
    try:
        answers[how] = ask()
    except Exception as exc:
        answers[how] = type(exc).__name__
print(json.dumps(answers))
"""


def ask_dns(lab: labs.Lab, pod: str, name: str, resolver: str, *, rdtype: str = "A", mark: int = 0,
            timeout: float = 3.0, ways: str = "all") -> dict[str, Any]:
    """`ASK_DNS` run by a process inside `pod` (its namespace and its cgroup, as a runtime places it), each way
    of `ways` (comma-separated, or "all"): {"udp" | "udp-connected" | "udp-mapped" | "tcp" | "udp-marked":
    [rcode, sorted answers(, peer)] or the error's type}."""
    plan = lab.plan.pod(pod)
    argv = processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup),
                                [sys.executable, "-c", ASK_DNS, name, rdtype, resolver, str(mark), str(timeout), ways])
    result = subprocess.run(argv, env=processes.child_env({}), capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    answers: dict[str, Any] = json.loads(result.stdout)
    return answers


# A resolver outside the cluster: answers every A question with one address, over UDP and TCP, and prints one line
# per question it was asked ("<name> <udp|tcp>"), so a test sees what reached it.
RESPONDER = r"""
import socket, sys, threading
import dns.message, dns.rrset
host, address = sys.argv[1], sys.argv[2]

def reply(data):
    query = dns.message.from_wire(data)
    answer = dns.message.make_response(query)
    question = query.question[0]
    answer.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", address))
    return question.name.to_text(), answer.to_wire()

udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((host, 53))
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((host, 53))
tcp.listen(16)

def serve_udp():
    while True:
        data, peer = udp.recvfrom(4096)
        name, wire = reply(data)
        print(name, "udp", flush=True)
        udp.sendto(wire, peer)

threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
while True:
    conn, _ = tcp.accept()
    with conn:
        size = int.from_bytes(conn.recv(2), "big")
        data = b""
        while len(data) < size:
            data += conn.recv(size - len(data))
        name, wire = reply(data)
        print(name, "tcp", flush=True)
        conn.sendall(len(wire).to_bytes(2, "big") + wire)
"""


@contextlib.contextmanager
def dns_responder(netns: str, host: str, address: str) -> Iterator[list[str]]:
    """`RESPONDER` on host:53 in the namespace `netns` (a name under /run/netns) for the block; yields the lines
    it printed so far (filled when the block ends: "<name> <udp|tcp>" per question)."""
    process = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", RESPONDER, host, address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    asked: list[str] = []
    try:
        assert process.stdout is not None
        ready = process.stdout.readline().strip()
        assert ready == "ready", process.stderr.read() if process.stderr else ready
        yield asked
    finally:
        process.kill()
        out, _ = process.communicate(timeout=10)
        asked.extend(line for line in out.splitlines() if line)


class Capture:
    """Every frame on the fabric bridge while it runs (AF_PACKET socket made inside the fabric namespace)."""

    def __init__(self, lab: labs.Lab) -> None:
        self.sock = in_netns(f"/run/netns/{lab.plan.fabric_netns}",
                             lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003)))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.frames.append(self.sock.recv(65535))
            except TimeoutError:
                continue

    def finish(self) -> bytes:
        self.stop.set()
        self.thread.join()
        self.sock.close()
        return b"".join(self.frames)
