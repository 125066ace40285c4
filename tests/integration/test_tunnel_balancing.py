"""Issue 8 in a lab, with real connections through both node tunnels: weighted canary split, blue/green
flip, retry on another endpoint and ejection of a dead one, circuit breaking, connect timeout against a
black hole, L4 authorization (DENY before ALLOW), STRICT and PERMISSIVE peer authentication, and the
Istio metrics of what was sent.

The agents capture the enrolled pods (the client and the servers); many connections are made by one
short Python loop inside the client pod so a statistical test costs seconds, not a process per
connection.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from nodeagent.lab import lab as labs
from tests.integration.conftest import wait_for
from tests.support.agent_labs import lab_with_agents
from tests.support.netns import netns_run
from tests.support.tunnel import metrics, sample

pytestmark = pytest.mark.root

EXTRA = """
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: plain}
spec:
  nodeName: node1
  containers:
  - {name: sleep, command: [nodeagent, workload, idle]}
---
apiVersion: v1
kind: Service
metadata:
  name: canary
  namespace: demo
  annotations: {nodeagent.io/endpoint-weights: '{"echo-0": 90, "echo-1": 10}'}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata:
  name: bluegreen
  namespace: demo
  annotations: {nodeagent.io/endpoint-weights: '{"echo-0": 100, "echo-1": 0}'}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata:
  name: flaky
  namespace: demo
  annotations: {nodeagent.io/outlier-consecutive-failures: "2", nodeagent.io/outlier-max-ejected-percent: "50"}
spec:
  selector: {app: flaky}
  ports: [{name: http, port: 80, targetPort: 9090, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: flaky-live, namespace: demo, labels: {app: flaky}}
spec:
  nodeName: node2
  serviceAccountName: echo
  containers:
  - {name: echo, command: [nodeagent, workload, serve, --port, "9090"], ports: [{containerPort: 9090}]}
---
apiVersion: v1
kind: Pod
metadata: {name: flaky-dead, namespace: demo, labels: {app: flaky}}
spec:
  nodeName: node1
  serviceAccountName: echo
  containers:
  - {name: idle, command: [nodeagent, workload, idle]}  # nothing listens on 9090 here
---
apiVersion: v1
kind: Service
metadata:
  name: limited
  namespace: demo
  annotations: {nodeagent.io/max-connections: "2"}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata:
  name: hole
  namespace: demo
  annotations: {nodeagent.io/connect-timeout: "1s", nodeagent.io/connect-attempts: "1"}
spec:
  selector: {app: hole}
  ports: [{name: http, port: 80, targetPort: 7070, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: hole, namespace: demo, labels: {app: hole}}
spec:
  nodeName: node2
  serviceAccountName: echo
  containers:
  - {name: echo, command: [nodeagent, workload, serve, --port, "7070"], ports: [{containerPort: 7070}]}
---
apiVersion: v1
kind: Service
metadata:
  name: sleepy
  namespace: demo
  annotations: {nodeagent.io/idle-timeout: "1s"}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: guarded, namespace: demo, labels: {app: guarded}}
spec:
  nodeName: node2
  serviceAccountName: guarded
  containers:
  - {name: echo, command: [nodeagent, workload, serve, --port, "8080"], ports: [{containerPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: demo}
spec:
  selector: {app: guarded}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  selector: {matchLabels: {app: guarded}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-9999, namespace: demo}
spec:
  selector: {matchLabels: {app: guarded}}
  action: DENY
  rules: [{to: [{operation: {ports: ["8080"]}}], from: [{source: {namespaces: [demo]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: guarded-mtls, namespace: demo}
spec:
  selector: {matchLabels: {app: guarded}}
  mtls: {mode: STRICT}
"""

# Many connections from one process in the client pod: each sends a line, reads the JSON answer.
LOOP = r"""
import json, socket, sys, time
target, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
host, port = target.rsplit(":", 1)
out = []
for _ in range(count):
    started = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"hello\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        out.append({"pod": json.loads(data)["pod"] if data else None, "seconds": time.monotonic() - started})
    except OSError as exc:
        out.append({"pod": None, "error": type(exc).__name__, "seconds": time.monotonic() - started})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    with lab_with_agents(tmp_path_factory.mktemp("balancing"), EXTRA, "iptables", mesh=True) as lab:
        yield lab


def connections(lab: labs.Lab, target: str, count: int, timeout: float = 5.0, pod: str = "demo/client"
                ) -> list[dict[str, Any]]:
    """`count` sequential connections from `pod` to `target` (its answers, in order)."""
    result: list[dict[str, Any]] = json.loads(netns_run(lab.plan.pod(pod).netns, "python3", "-c", LOOP,
                                                        target, str(count), str(timeout)))
    return result


def vip(lab: labs.Lab, name: str) -> str:
    return f"{lab.cluster_ip(name)}:80"


def edit_manifests(lab: labs.Lab, change: Callable[[dict[str, Any]], None]) -> None:
    path = lab.record.manifests_path
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for document in documents:
        change(document)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump_all(documents))
    temporary.rename(path)







def test_weighted_canary_split_is_within_statistical_bounds(lab: labs.Lab) -> None:
    answers = connections(lab, vip(lab, "canary"), 200)
    pods = Counter(a["pod"] for a in answers)
    assert set(pods) == {"demo/echo-0", "demo/echo-1"}, pods
    # 200 draws at p=0.1: mean 20, sd 4.2; [6, 38] is beyond 3.3 sd either way (p < 0.001 to fail by chance).
    assert 6 <= pods["demo/echo-1"] <= 38, pods


def test_blue_green_flip_moves_every_new_connection(lab: labs.Lab) -> None:
    assert {a["pod"] for a in connections(lab, vip(lab, "bluegreen"), 20)} == {"demo/echo-0"}

    def flip(document: dict[str, Any]) -> None:
        if document["kind"] == "Service" and document["metadata"]["name"] == "bluegreen":
            document["metadata"]["annotations"]["nodeagent.io/endpoint-weights"] = '{"echo-0": 0, "echo-1": 100}'

    edit_manifests(lab, flip)
    wait_for(lambda: connections(lab, vip(lab, "bluegreen"), 1)[0]["pod"] == "demo/echo-1", "the flip applies")
    assert {a["pod"] for a in connections(lab, vip(lab, "bluegreen"), 20)} == {"demo/echo-1"}


def test_dead_endpoint_is_retried_on_another_then_ejected(lab: labs.Lab) -> None:
    before = metrics(lab, "node1")
    answers = connections(lab, vip(lab, "flaky"), 30)
    after = metrics(lab, "node1")
    assert all(a["pod"] == "demo/flaky-live" for a in answers), answers
    retries = sample(after, "nodeagent_tunnel_connect_retries_total", destination_service="demo/flaky") - sample(
        before, "nodeagent_tunnel_connect_retries_total", destination_service="demo/flaky")
    ejections = sample(after, "nodeagent_tunnel_outlier_ejections_total", destination_service="demo/flaky")
    assert ejections >= 1, "two consecutive failures eject the dead endpoint"
    # Each connection that drew the dead endpoint was retried; once it is ejected, nothing draws it, so
    # far fewer than the ~15 retries that 30 coin flips would give without ejection.
    assert 2 <= retries <= 8, retries


def test_circuit_breaker_refuses_past_the_limit_and_recovers(lab: labs.Lab) -> None:
    client = lab.plan.pod("demo/client")
    holder = subprocess.Popen(["ip", "netns", "exec", client.netns, "python3", "-c",
                               "import socket,sys\nss=[socket.create_connection((sys.argv[1],80)) for _ in range(2)]\n"
                               "[s.sendall(b'x\\n') or s.recv(100) for s in ss]\nprint('held',flush=True)\n"
                               "sys.stdin.read()", lab.cluster_ip("limited")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        refused = connections(lab, vip(lab, "limited"), 3)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert all(a["pod"] is None for a in refused), refused
    assert all(a["seconds"] < 1.0 for a in refused), "refused at once, not after a timeout"
    overflow = sample(metrics(lab, "node1"), "nodeagent_tunnel_circuit_breaker_rejections_total",
                      destination_service="demo/limited")
    assert overflow >= 3
    wait_for(lambda: connections(lab, vip(lab, "limited"), 1)[0]["pod"] is not None, "the breaker recovers")


def test_connect_timeout_is_honoured_against_a_black_hole(lab: labs.Lab) -> None:
    hole = lab.plan.pod("demo/hole")
    rule = ["INPUT", "-p", "tcp", "--dport", "7070", "-j", "DROP"]
    netns_run(hole.netns, "iptables", "-A", *rule)
    try:
        answers = connections(lab, vip(lab, "hole"), 2, timeout=8.0)
    finally:
        netns_run(hole.netns, "iptables", "-D", *rule)
    for answer in answers:
        assert answer["pod"] is None, answer
        assert 0.8 <= answer["seconds"] <= 3.0, f"closed at the 1 s connect timeout: {answer}"
    assert sample(metrics(lab, "node1"), "istio_tcp_connections_closed_total", destination_service="demo/hole",
                  response_flags="UT") >= 2


def test_deny_beats_allow_and_strict_refuses_plaintext_until_permissive(lab: labs.Lab) -> None:
    # DENY (namespace demo to port 8080) and ALLOW (principal client) both match the client: denied.
    assert [a["pod"] for a in connections(lab, vip(lab, "guarded"), 2)] == [None, None]
    denials = sample(metrics(lab, "node2"), "nodeagent_tunnel_policy_denials_total", policy="demo/deny-9999")
    assert denials >= 2

    def without_deny(document: dict[str, Any]) -> None:
        if document["kind"] == "AuthorizationPolicy" and document["metadata"]["name"] == "deny-9999":
            document["spec"]["rules"][0]["to"][0]["operation"]["ports"] = ["9999"]

    edit_manifests(lab, without_deny)
    wait_for(lambda: connections(lab, vip(lab, "guarded"), 1)[0]["pod"] == "demo/guarded", "ALLOW alone admits")

    # Plaintext from a pod outside the mesh (captured on the server's side into 15006): STRICT refuses,
    # PERMISSIVE accepts.
    target = f"{lab.plan.pod('demo/guarded').pod.ip}:8080"
    assert connections(lab, target, 1, pod="plain/outsider")[0]["pod"] is None

    def permissive(document: dict[str, Any]) -> None:
        if document["kind"] == "PeerAuthentication":
            document["spec"]["mtls"]["mode"] = "PERMISSIVE"
        if document["kind"] == "AuthorizationPolicy" and document["metadata"]["name"] == "allow-client":
            document["spec"]["rules"].append({"to": [{"operation": {"ports": ["8080"]}}]})

    # A plaintext source has no principal and so no namespace (as in Istio, both come from the mTLS
    # identity); PERMISSIVE still applies policy, so a rule without a source must admit it.
    edit_manifests(lab, permissive)
    wait_for(lambda: connections(lab, target, 1, pod="plain/outsider")[0]["pod"] == "demo/guarded",
             "PERMISSIVE accepts plaintext")


def test_metrics_count_the_connections_and_bytes_sent(lab: labs.Lab) -> None:
    labels = {"reporter": "source", "destination_service": "demo/canary", "response_flags": "-"}
    server_side = {"reporter": "destination", "destination_workload": "echo",
                   "source_principal": "spiffe://cluster.local/ns/demo/sa/client"}

    def served(name: str) -> float:
        return sum(sample(metrics(lab, node), name, **server_side) for node in ("node1", "node2"))

    served_before = served("istio_tcp_received_bytes_total")
    before = metrics(lab, "node1")
    answers = connections(lab, vip(lab, "canary"), 10)
    assert all(a["pod"] for a in answers)

    def delta(name: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    after = before
    wait_for(lambda: sample(metrics(lab, "node1"), "istio_tcp_connections_closed_total", **labels)
             - sample(before, "istio_tcp_connections_closed_total", **labels) >= 10, "closes are counted")
    after = metrics(lab, "node1")
    assert delta("istio_tcp_connections_opened_total") == 10
    assert delta("istio_tcp_connections_closed_total") == 10
    # As Istio counts them: received = the request's bytes (client to server), sent = the response's.
    assert delta("istio_tcp_received_bytes_total") == 10 * len(b"hello\n")
    assert delta("istio_tcp_sent_bytes_total") > 10 * 20, "the JSON answers came back"
    opened = [dict(ls) for (n, ls), v in after.items() if n == "istio_tcp_connections_opened_total"
              and dict(ls).get("destination_service") == "demo/canary"]
    assert {o["source_workload"] for o in opened} == {"client"}
    assert {o["source_principal"] for o in opened} == {"spiffe://cluster.local/ns/demo/sa/client"}
    assert {o["destination_workload"] for o in opened} == {"echo"}
    assert {o["connection_security_policy"] for o in opened} == {"mutual_tls"}
    # The server tunnels report the same requests (reporter=destination), with the client's identity.
    wait_for(lambda: served("istio_tcp_received_bytes_total") - served_before >= 10 * len(b"hello\n"),
             "the destination side counts the request bytes")
    assert served("istio_tcp_received_bytes_total") - served_before == 10 * len(b"hello\n")


IDLE = r"""
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], 80), timeout=10)
s.settimeout(10)
reader = s.makefile("rb")
s.sendall(b"one\n")
first = json.loads(reader.readline())["echo"]
time.sleep(0.5)
s.sendall(b"two\n")  # activity inside the timeout keeps the connection
second = json.loads(reader.readline())["echo"]
started = time.monotonic()
closed = reader.readline() == b""  # then idle: the tunnel closes it
print(json.dumps({"first": first, "second": second, "closed": closed, "after": time.monotonic() - started}))
"""


def test_idle_connections_are_closed_after_the_services_idle_timeout(lab: labs.Lab) -> None:
    result = json.loads(netns_run(lab.plan.pod("demo/client").netns, "python3", "-c", IDLE, lab.cluster_ip("sleepy")))
    assert (result["first"], result["second"], result["closed"]) == ("one", "two", True), result
    assert 0.9 <= result["after"] <= 3.0, f"closed about 1 s after the last byte: {result}"
