"""The tunnel across two lab nodes: pod A -> tunnel(node1) -> HBONE mTLS -> tunnel(node2) -> pod B.

Both node tunnels run in this test's event loop; their listeners live in the pods' namespaces. The
client pod's capture is one REDIRECT rule in its own namespace (the mesh's real capture is tested in
test_redirect_lab.py and test_mesh_lab.py). A raw capture on the fabric bridge proves no plaintext
crosses between the nodes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from nodeagent.ca.identity import CertificateAuthority, SpiffeId, make_csr
from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from nodeagent.tunnel.admin import start_admin
from nodeagent.tunnel.proxy.node import NodeTunnel
from nodeagent.tunnel.state.authz import Authorizer
from nodeagent.tunnel.state.workloads import Workload
from tests.integration.conftest import unique_lab_name
from tests.support.tunnel import Capture

pytestmark = pytest.mark.root
MARKER = "nodeagent-plaintext-marker-7f3a"


@pytest.fixture
def lab() -> Iterator[labs.Lab]:
    name = unique_lab_name()
    lab = labs.up(name)
    try:
        yield lab
    finally:
        labs.down(name)


def workloads(lab: labs.Lab) -> dict[str, Workload]:
    accounts = {f"{d['metadata']['namespace']}/{d['metadata']['name']}": d["spec"].get("serviceAccountName", "default")
                for d in lab.topology.documents if d["kind"] == "Pod"}
    out = {}
    for plan in lab.plan.pods:
        key = plan.pod.key
        out[key] = Workload(str(plan.pod.ip), SpiffeId("cluster.local", plan.pod.namespace, accounts[key]),
                            plan.pod.node, f"/run/netns/{plan.netns}")
    return out




async def http_get(server: asyncio.Server, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return int(head.split()[1]), body


async def ready_of(server: asyncio.Server) -> tuple[int, bool]:
    status, body = await http_get(server, "/healthz/ready")
    return status, bool(json.loads(body)["ready"])


async def test_pod_to_pod_across_nodes_through_both_tunnels_over_hbone(lab: labs.Lab) -> None:
    ca = CertificateAuthority.generate()

    def fetch(identity: SpiffeId, key: object) -> list[str]:
        return ca.issue(make_csr(identity, key))[1]  # type: ignore[arg-type]

    pods = workloads(lab)
    by_ip = {w.ip: w for w in pods.values()}
    # No policy: every peer of the trust domain is allowed (an authorizer must be given: without one the
    # tunnel fails closed, as before policies are synced).
    tunnels = {node: NodeTunnel(node, "cluster.local", fetch, by_ip.get, authorizer=lambda: Authorizer([], []))
               for node in ("node1", "node2")}
    client, server = pods["demo/client"], pods["demo/echo-1"]
    for workload in pods.values():
        await tunnels[workload.node].add_pod(workload)
    client_ns = lab.plan.pod("demo/client").netns
    subprocess.run(["ip", "netns", "exec", client_ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
                    "-d", server.ip, "--dport", "8080", "-m", "mark", "!", "--mark", "0x539",
                    "-j", "REDIRECT", "--to-ports", "15001"], check=True)
    capture = Capture(lab)
    try:
        plan = lab.plan.pod("demo/client")
        argv = processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup),
                                    ["nodeagent", "workload", "request", f"{server.ip}:8080", "--message", MARKER])
        answers = []
        for _ in range(3):
            proc = await asyncio.create_subprocess_exec(*argv, env=processes.child_env({}),
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()
            answers.append(json.loads(out))
        dumps, readiness = {}, []
        for node, tunnel in tunnels.items():
            def assigned(node: str = node) -> set[str]:
                return {w.ip for w in pods.values() if w.node == node}

            admin_server, ready_server = await start_admin(tunnel, assigned, admin=("127.0.0.1", 0),
                                                           readiness=("127.0.0.1", 0))
            dumps[node] = json.loads((await http_get(admin_server, "/config_dump"))[1])
            if node == "node1":
                readiness.append(await ready_of(ready_server))
                await tunnel.remove_pod(pods["demo/echo-0"].ip)
                readiness.append(await ready_of(ready_server))
            admin_server.close()
            ready_server.close()
    finally:
        time.sleep(0.2)  # frames in flight reach the capture (a workload pause, not a readiness wait)
        wire = capture.finish()
        for tunnel in tunnels.values():
            await tunnel.close()
    assert {a["pod"] for a in answers} == {"demo/echo-1"}
    assert dumps["node1"]["pods"][0]["certificate"]["serial"], dumps
    assert any(p["pools"] and p["pools"][0]["identity"] == str(server.identity) for p in dumps["node1"]["pods"])
    assert readiness == [(200, True), (503, False)], readiness
    assert {a["echo"] for a in answers} == {MARKER}, "bytes arrive intact"
    assert MARKER.encode() not in wire, "no plaintext between the nodes"
    assert (15008).to_bytes(2, "big") in wire, "the nodes talked HBONE (port 15008)"
    del client
