"""The lab on a real kernel: namespaces, veths, routes, cgroups and pod processes, and their removal.

Everything here runs in namespaces and cgroups the test creates; the root network namespace is only
read (to prove it is left alone).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from pyroute2 import IPRoute

from nodeagent.lab import cgroups, netns
from nodeagent.lab import lab as labs
from nodeagent.lab.demo import request_from
from nodeagent.lab.errors import LabBuildError, LabError, LabExistsError, LabManifestError
from nodeagent.lab.state import LabRecord
from tests.integration.conftest import leftovers, unique_lab_name

pytestmark = pytest.mark.root

ONE_NODE = """
apiVersion: v1
kind: Node
metadata: {{name: solo}}
spec: {{podCIDR: 10.244.1.0/24}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, labels: {{app: web}}}}
spec:
  nodeName: solo
  containers:
  - name: web
    command: {command}
    ports: [{{containerPort: 8080}}]
status: {{podIP: {ip}}}
"""


def write_manifest(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cluster.yaml").write_text(text)
    return directory


def root_links() -> set[str]:
    with IPRoute() as ipr:
        return {str(link.get("ifname")) for link in ipr.get_links()}


def test_default_lab_carries_tcp_and_udp_across_nodes_and_leaves_nothing_behind() -> None:
    links_before = root_links()
    name = unique_lab_name()
    lab = labs.up(name)
    pids = [p.pid for p in lab.record.processes]
    try:
        assert root_links() == links_before, "the lab must not create links in the root namespace"
        client, far = lab.plan.pod("demo/client"), lab.plan.pod("demo/echo-1")
        assert client.pod.node != far.pod.node
        tcp = request_from(lab, "demo/client", f"{far.pod.ip}:8080")
        assert (tcp["pod"], tcp["node"], tcp["lab"]) == ("demo/echo-1", "node2", name)
        assert tcp["peer"].split(":")[0] == str(client.pod.ip), "pod-to-pod traffic keeps the client's address"
        udp = request_from(lab, "demo/client", f"{far.pod.ip}:8081", udp=True)
        assert (udp["pod"], udp["proto"]) == ("demo/echo-1", "udp")
        near = request_from(lab, "demo/client", f"{lab.plan.pod('demo/echo-0').pod.ip}:8080")
        assert near["pod"] == "demo/echo-0"
    finally:
        labs.down(name)
    assert leftovers(name, pids) == []
    assert root_links() == links_before


def test_pod_processes_run_in_their_pods_namespace_and_cgroup(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab()
    for shim in lab.record.processes:
        plan = lab.plan.pod(shim.owner)
        (pid,) = cgroups.pids(plan.cgroup)
        assert psutil.Process(pid).ppid() == shim.pid, "the supervising shim is the pod process's parent"
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{plan.netns}").st_ino
        cgroup_line = next(line for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                           if line.startswith("0::"))
        assert cgroup_line == f"0::/{plan.cgroup}"
        # The shim itself stays outside the lab: its exit can never keep a lab cgroup busy.
        assert f"/{lab.plan.cgroup_root}" not in Path(f"/proc/{shim.pid}/cgroup").read_text()


def test_nodes_have_no_default_route_and_nothing_outside_the_lab_is_routable(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab()
    for node in lab.plan.nodes:
        with IPRoute(netns=node.netns) as ipr:
            assert not [r for r in ipr.get_routes(family=2, table=254) if r.get("dst_len") == 0]
        # A FIB lookup only (no packet is sent): an address outside the lab has no route on any node.
        result = subprocess.run(["ip", "-n", node.netns, "route", "get", "192.0.2.1"], capture_output=True,
                                text=True, check=False)
        assert result.returncode != 0 and "unreachable" in result.stderr.lower()
    fabric_addresses = subprocess.run(["ip", "-n", lab.plan.fabric_netns, "-4", "addr", "show"],
                                      capture_output=True, text=True, check=True).stdout
    assert "inet " not in fabric_addresses.replace("inet 127.0.0.1", ""), "the fabric is L2 only"


def test_two_labs_side_by_side_do_not_see_each_other(make_lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = make_lab()
    second = make_lab(write_manifest(tmp_path, ONE_NODE.format(
        command='[nodeagent, workload, serve, --port, "8080"]', ip="10.244.1.50")))
    # The same node address exists in both labs, in different namespaces: each answers in its own lab.
    answer = request_from(first, "demo/client", f"{first.plan.pod('demo/echo-0').pod.ip}:8080")
    assert answer["lab"] == first.record.name
    with pytest.raises(LabError, match=re.escape("request from demo/client to 10.244.1.50:8080 failed")):
        request_from(first, "demo/client", "10.244.1.50:8080", timeout=1.0)
    assert request_from(second, "default/web", "10.244.1.50:8080")["lab"] == second.record.name
    assert not set(first.plan.all_netns()) & set(second.plan.all_netns())


def test_lab_up_twice_fails_clearly_and_changes_nothing(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab()
    before = netns.list_netns()
    with pytest.raises(LabExistsError, match=re.escape(f"lab down --lab {lab.record.name}")):
        labs.up(lab.record.name)
    assert netns.list_netns() == before
    assert request_from(lab, "demo/client", f"{lab.plan.pod('demo/echo-1').pod.ip}:8080")["pod"] == "demo/echo-1"


def test_invalid_manifest_fails_before_anything_is_created(tmp_path: Path) -> None:
    name = unique_lab_name()
    directory = write_manifest(tmp_path, ONE_NODE.format(command="[nodeagent, workload, idle]", ip="10.244.9.9"))
    with pytest.raises(LabManifestError, match=r"Pod default/web: status.podIP: 10.244.9.9 is not a free pod"):
        labs.up(name, directory)
    assert leftovers(name, []) == []


def test_a_failure_halfway_removes_everything_already_created(tmp_path: Path) -> None:
    name = unique_lab_name()
    directory = write_manifest(tmp_path, ONE_NODE.format(command="[/nonexistent/server]", ip="10.244.1.7"))
    with pytest.raises(LabBuildError, match="pod default/web container web: the process exited"):
        labs.up(name, directory)
    assert leftovers(name, []) == []


def test_lab_down_cleans_up_after_lab_up_was_killed_halfway(tmp_path: Path) -> None:
    name = unique_lab_name()
    # The server never binds its port, so `lab up` is still waiting when it is killed.
    directory = write_manifest(tmp_path, ONE_NODE.format(command="[nodeagent, workload, idle]", ip="10.244.1.7"))
    proc = subprocess.Popen([sys.executable, "-m", "nodeagent.cli", "lab", "up", str(directory), "--lab", name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not ((record := LabRecord.load(name)) and record.processes):
            assert proc.poll() is None and time.monotonic() < deadline, "lab up ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert netns.exists(f"{name}-pod-default.web")
        pids = [p.pid for p in record.processes]
        with pytest.raises(LabExistsError):
            labs.up(name, directory)
        removed = labs.down(name)
        assert f"netns {name}-pod-default.web" in removed
        assert leftovers(name, pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        if LabRecord.load(name) is not None:
            labs.down(name)


def test_exec_returns_the_commands_exit_code_and_status_notices_missing_objects(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab()
    name = lab.record.name
    assert labs.exec_in(name, ["sh", "-c", "exit 7"], pod="demo/client") == 7
    assert labs.exec_in(name, ["sh", "-c", "ip -4 addr show eth0 | grep -q 172.18.0.3"], node="node2") == 0
    record, rows = labs.status(name)
    assert record.phase == "up" and all(row.present for row in rows)
    netns.remove(lab.plan.pod("demo/client").netns)  # someone deletes a pod netns behind the lab's back
    _, rows = labs.status(name)
    assert [row.name for row in rows if not row.present] == [lab.plan.pod("demo/client").netns]


def test_the_agents_manifest_source_reads_the_lab_as_the_lab_built_it(make_lab) -> None:  # type: ignore[no-untyped-def]
    """The lab's resolved manifests are the agent's input: every object decodes, the endpoints are the pods."""
    from nodeagent.cluster.discovery.manifests import ManifestSource
    from nodeagent.cluster.events import Event
    from nodeagent.cluster.model import Kind, Protocol
    from nodeagent.state.tracker import ChangeTracker
    from nodeagent.state.translation import ServicePortName

    lab = make_lab()
    tracker = ChangeTracker("node1")
    events: list[Event] = []

    def sink(event: Event) -> None:
        events.append(event)
        tracker.apply(event)

    ManifestSource(lab.record.manifests_path.parent, sink).read()
    snapshot = tracker.snapshot()
    assert snapshot is not None and snapshot.synced(Kind)
    assert snapshot.rejections == {} and snapshot.unreadable == (), (snapshot.rejections, snapshot.unreadable)
    echo_ips = {str(lab.plan.pod(f"demo/echo-{i}").pod.ip) for i in (0, 1)}
    tcp = snapshot.endpoints_of(ServicePortName("demo", "echo", "http", Protocol.TCP))
    udp = snapshot.endpoints_of(ServicePortName("demo", "echo", "udp", Protocol.UDP))
    assert {str(e.ip) for e in tcp} == echo_ips and {e.port for e in tcp} == {8080}
    assert {str(e.ip) for e in udp} == echo_ips and {e.port for e in udp} == {8081}
    local = {str(e.ip) for e in tcp if e.is_local}
    assert local == {str(lab.plan.pod("demo/echo-0").pod.ip)}, "echo-0 runs on node1"
    node = snapshot.node
    assert node is not None and node.internal_ips == (lab.plan.node("node1").node.address,)
    from click.testing import CliRunner

    from nodeagent.cli import main

    shown = CliRunner().invoke(main, ["snapshot", "--lab", lab.record.name, "--node", "node2"])
    assert shown.exit_code == 0, shown.output
    echo_1 = lab.plan.pod("demo/echo-1").pod.ip
    assert f"-> {echo_1}:8080  ready, local, demo/echo-1" in shown.stdout, shown.stdout
