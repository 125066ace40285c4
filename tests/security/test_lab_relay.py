"""A hostile peer against the lab's tunnels, in both capture modes: the open-relay reproduction and its
neighbours, each refused, counted, and the tunnel still serving everyone else afterwards.

The attacker holds a *valid* workload certificate (minted from the lab's CA for demo/client, as a
compromised client pod would have) and speaks HBONE to echo-1's tunnel listener (echo-1's IP, 15008)
from inside the client pod's namespace. It asks for targets that are not echo-1: another pod, the
node's agent, the tunnel's own ports, a Service VIP. Before the fix the tunnel dialled them from inside
echo-1's namespace and answered 200.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from nodeagent.ca.identity import CertificateAuthority, SpiffeId, make_csr
from nodeagent.kernel.netns import client_socket
from nodeagent.lab import lab as labs
from nodeagent.lab.agents import TUNNEL_OWNER, ca_dir, spawn_owned, tunnel_argv
from nodeagent.lab.state import locked
from nodeagent.tunnel.hbone.client import ConnectRefused, HbonePool, HboneStream
from nodeagent.tunnel.hbone.limits import SOCKET_MARK
from nodeagent.tunnel.identity.certs import WorkloadCertificate
from tests.integration.conftest import wait_for
from tests.support.agent_labs import OUTSIDER, api_fault, lab_with_agents, owner_process
from tests.support.netns import netns_run
from tests.support.tunnel import metrics, sample

pytestmark = pytest.mark.root

CLIENT = SpiffeId("cluster.local", "demo", "client")
ECHO = SpiffeId("cluster.local", "demo", "echo")
DENY_CLIENT = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "deny-client", "namespace": "demo"},
               "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
                        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]}}


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    if request.param == "ebpf":
        pytest.importorskip("bcc")
    with lab_with_agents(tmp_path_factory.mktemp(f"relay-{request.param}"), OUTSIDER, request.param,
                         mesh=True) as lab:
        yield lab


class Attacker:
    """An HBONE client in the client pod's namespace with a valid certificate (for demo/client unless told)."""

    def __init__(self, lab: labs.Lab, identity: SpiffeId = CLIENT) -> None:
        ca = CertificateAuthority.load_or_create(ca_dir(lab))  # the lab's own root: a genuine certificate
        self.certificate = WorkloadCertificate(identity, lambda identity, key: ca.issue(make_csr(identity, key))[1])
        netns = f"/run/netns/{lab.plan.pod('demo/client').netns}"
        # The tunnel's mark keeps the client pod's own capture from taking the connection to the tunnel.
        self.pool = HbonePool(lambda: self.certificate.contexts()[1],
                              make_socket=lambda: client_socket(netns, SOCKET_MARK))

    async def connect(self, via: str, authority: str) -> HboneStream:
        return await self.pool.connect((via, 15008), authority, ECHO, timeout=5.0)

    async def status(self, via: str, authority: str) -> int:
        """The status the tunnel answers a CONNECT with (200 when it connected)."""
        try:
            stream = await self.connect(via, authority)
        except ConnectRefused as exc:
            return exc.status
        stream.close()
        return 200


async def echo_round_trip(stream: HboneStream) -> dict[str, Any]:
    await stream.write(b"hello\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = await asyncio.wait_for(stream.read(), 5)
        assert chunk, "stream ended before the answer"
        data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def refusals(lab: labs.Lab, node: str, reason: str) -> float:
    return sample(metrics(lab, node), "nodeagent_tunnel_hbone_refusals_total", reason=reason)


async def test_connect_to_anything_but_the_served_pod_is_refused_and_the_pod_still_served(lab: labs.Lab) -> None:
    echo1 = str(lab.plan.pod("demo/echo-1").pod.ip)
    echo0 = str(lab.plan.pod("demo/echo-0").pod.ip)
    node2 = str(lab.plan.node("node2").node.address)
    before = {reason: refusals(lab, "node2", reason) for reason in ("target-not-served-pod", "target-tunnel-port")}
    attacker = Attacker(lab)
    try:
        foreign = {f"{echo0}:8080": 400,  # another pod: the open-relay reproduction
                   f"{node2}:10256": 400,  # the node's agent (reproduced: 200 before)
                   f"{lab.cluster_ip('echo')}:80": 400,  # a Service VIP is never an inbound target
                   "127.0.0.1:8080": 400,  # echo-1's loopback
                   f"{echo1}:15000": 503, f"{echo1}:15001": 503, f"{echo1}:15006": 503, f"{echo1}:15008": 503,
                   f"{echo1}:15020": 503, f"{echo1}:15021": 503}
        answers = {authority: await attacker.status(echo1, authority) for authority in foreign}
        assert answers == foreign
        # The connection and the tunnel go on: the same peer's legitimate CONNECT is carried.
        stream = await attacker.connect(echo1, f"{echo1}:8080")
        assert (await echo_round_trip(stream))["pod"] == "demo/echo-1"
        stream.close()
    finally:
        await attacker.pool.close()
    assert refusals(lab, "node2", "target-not-served-pod") - before["target-not-served-pod"] >= 4
    assert refusals(lab, "node2", "target-tunnel-port") - before["target-tunnel-port"] >= 6


async def test_a_certificate_of_an_identity_no_pod_holds_is_refused(lab: labs.Lab) -> None:
    """A deleted pod's certificate (valid until it expires, the CA no longer renews it): no pod runs as
    demo/ghost, so its CONNECT is refused with 401 and counted; demo/client's goes on."""
    echo1 = str(lab.plan.pod("demo/echo-1").pod.ip)
    before = refusals(lab, "node2", "source-identity-unknown")
    ghost, client = Attacker(lab, SpiffeId("cluster.local", "demo", "ghost")), Attacker(lab)
    try:
        assert await ghost.status(echo1, f"{echo1}:8080") == 401
        assert await client.status(echo1, f"{echo1}:8080") == 200
    finally:
        await ghost.pool.close()
        await client.pool.close()
    assert refusals(lab, "node2", "source-identity-unknown") > before


def test_plaintext_straight_to_15006_is_refused_and_counted(lab: labs.Lab) -> None:
    """A pod outside the mesh dialling echo-1's captured-inbound port itself: the tunnel finds no target
    it may serve (the original destination is its own port, or none at all) and connects nowhere."""
    echo1 = str(lab.plan.pod("demo/echo-1").pod.ip)
    probe = ("import socket,sys\n"
             "s=socket.create_connection((sys.argv[1],15006),timeout=3);s.settimeout(3)\n"
             "s.sendall(b'hello\\n')\n"
             "try: print(repr(s.recv(100)))\n"
             "except OSError as e: print(type(e).__name__)\n")
    before = sum(refusals(lab, "node2", r) for r in ("target-tunnel-port", "no-original-destination"))
    out = netns_run(lab.plan.pod("plain/outsider").netns, "python3", "-c", probe, echo1, check=False)
    assert "pod" not in out, f"plaintext to 15006 reached the app: {out}"
    wait_for(lambda: sum(refusals(lab, "node2", r) for r in ("target-tunnel-port", "no-original-destination"))
             > before, "the refusal counted")


def test_another_pod_cannot_borrow_a_pods_identity_through_its_outbound_listener(lab: labs.Lab) -> None:
    """15001 in echo-1's namespace sends connections out as echo-1; dialled from outside the pod it must
    refuse, not relay (the peer would otherwise speak HBONE with echo-1's certificate)."""
    echo1 = str(lab.plan.pod("demo/echo-1").pod.ip)
    # The iptables capture takes the connection into 15006 first (its original destination is then the
    # tunnel's own port); the eBPF capture leaves it to reach 15001, which sees a peer that is not its pod.
    reasons = ("outbound-not-from-pod", "target-tunnel-port")
    before = sum(refusals(lab, "node2", r) for r in reasons)
    probe = ("import socket,sys\n"
             "s=socket.create_connection((sys.argv[1],15001),timeout=3);s.settimeout(3)\n"
             "s.sendall(b'hello\\n')\n"
             "try: print(repr(s.recv(100)))\n"
             "except OSError as e: print(type(e).__name__)\n")
    out = netns_run(lab.plan.pod("plain/outsider").netns, "python3", "-c", probe, echo1, check=False)
    assert "pod" not in out, f"the outbound listener relayed a foreign connection: {out}"
    wait_for(lambda: sum(refusals(lab, "node2", r) for r in reasons) > before, "the refusal counted")


async def test_a_policy_tightened_mid_connection_closes_it_and_others_go_on(lab: labs.Lab) -> None:
    echo1 = str(lab.plan.pod("demo/echo-1").pod.ip)
    attacker = Attacker(lab)
    stream = await attacker.connect(echo1, f"{echo1}:8080")
    assert (await echo_round_trip(stream))["pod"] == "demo/echo-1"
    revoked_before = sample(metrics(lab, "node2"), "nodeagent_tunnel_policy_revocations_total")
    path = lab.record.manifests_path
    original = path.read_text()
    try:
        path.with_suffix(".tmp").write_text(original + "\n---\n" + json.dumps(DENY_CLIENT) + "\n")
        path.with_suffix(".tmp").rename(path)
        # The open stream is reset by the tunnel once its new policy denies it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        ended = False
        while loop.time() < deadline and not ended:
            try:
                chunk = await asyncio.wait_for(stream.read(), 1)
                ended = chunk == b""
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                ended = True
        assert ended, "the open connection outlived a policy that denies it"
        assert sample(metrics(lab, "node2"), "nodeagent_tunnel_policy_revocations_total") > revoked_before
        # New connections of that peer are denied (401); echo-1 still serves other peers.
        assert await attacker.status(echo1, f"{echo1}:8080") == 401
        answer = netns_run(lab.plan.pod("plain/outsider").netns, "python3", "-c",
                           "import socket,sys;s=socket.create_connection((sys.argv[1],8080),timeout=5);"
                           "s.sendall(b'hi\\n');print(s.makefile().readline())", echo1)
        assert json.loads(answer)["pod"] == "demo/echo-1"
    finally:
        await attacker.pool.close()
        path.with_suffix(".tmp").write_text(original)
        path.with_suffix(".tmp").rename(path)
    # The policy removed again: the peer is admitted again (the next test relies on it too).
    attacker = Attacker(lab)
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while await attacker.status(echo1, f"{echo1}:8080") != 200:
            assert asyncio.get_running_loop().time() < deadline, "the removed policy still denies"
            await asyncio.sleep(0.2)  # polling a condition with a deadline
    finally:
        await attacker.pool.close()


def test_tunnels_ready_and_no_pod_left_unserved(lab: labs.Lab) -> None:
    """After every hostile case above, both tunnels still report ready with nothing blocking."""
    for node in ("node1", "node2"):
        address = lab.plan.node(node).node.address
        body = subprocess.run(["ip", "netns", "exec", lab.plan.node(node).netns, "python3", "-c",
                               "import urllib.request,sys;print(urllib.request.urlopen(sys.argv[1],timeout=5)"
                               ".read().decode())", f"http://{address}:15021/healthz/ready"],
                              capture_output=True, text=True, check=True).stdout
        assert json.loads(body) == {"ready": True, "missing": [], "blockers": []}


def _readiness(lab: labs.Lab, node: str) -> dict[str, Any]:
    address = lab.plan.node(node).node.address
    body = subprocess.run(["ip", "netns", "exec", lab.plan.node(node).netns, "python3", "-c",
                           "import urllib.request,urllib.error,sys\n"
                           "try: print(urllib.request.urlopen(sys.argv[1],timeout=5).read().decode())\n"
                           "except urllib.error.HTTPError as e: print(e.read().decode())\n"
                           "except OSError: print('{}')", f"http://{address}:15021/healthz/ready"],
                          capture_output=True, text=True, check=True).stdout
    answer: dict[str, Any] = json.loads(body)
    return answer


async def test_a_tunnel_that_starts_before_policies_are_listed_refuses_inbound_until_they_are(
        lab: labs.Lab) -> None:
    """Fail closed: node2's tunnel restarts while the API server holds back AuthorizationPolicies. Its pods'
    listeners open, but every CONNECT gets 503 and readiness names the kind, until the list arrives."""
    echo1 = str(lab.plan.pod("demo/echo-1").pod.ip)
    api_fault(lab, "delay", {"seconds": 12, "count": 4, "plural": "authorizationpolicies"})
    try:
        tunnel = owner_process(lab, TUNNEL_OWNER + "node2")
        os.kill(tunnel.pid, signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(tunnel.pid) or tunnel.status() == psutil.STATUS_ZOMBIE, "tunnel gone")
        with locked(lab.record.name):
            spawn_owned(labs.load(lab.record.name), "node2", TUNNEL_OWNER, "ztunnel", tunnel_argv(lab, "node2"), None)
        # Serving the pods (listeners, certificates) but blocked on the policy kinds.
        wait_for(lambda: (lambda r: r.get("missing") == [] and bool(r.get("blockers")))(_readiness(lab, "node2")),
                 "echo-1 served, blocked on policies")
        readiness = _readiness(lab, "node2")
        assert readiness["ready"] is False
        assert any("AuthorizationPolicy" in b for b in readiness["blockers"]), readiness
        attacker = Attacker(lab)
        try:
            assert await attacker.status(echo1, f"{echo1}:8080") == 503, "inbound before policies are listed"
        finally:
            await attacker.pool.close()
        assert refusals(lab, "node2", "policies-not-synced") >= 1
    finally:
        api_fault(lab, "delay", {"seconds": 0})
    wait_for(lambda: _readiness(lab, "node2").get("ready") is True, "ready once policies are listed", timeout=30)
    attacker = Attacker(lab)
    try:
        assert await attacker.status(echo1, f"{echo1}:8080") == 200
    finally:
        await attacker.pool.close()
