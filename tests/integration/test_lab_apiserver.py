"""The lab API server against the real clients: `kubectl` 1.32 and the official Python client.

The fidelity tests run one server in process on loopback over HTTPS (a module-scoped fixture; each test
works in its own namespace) and check what the clients print and receive, never how the server is built.
The last test brings up a lab (root, throw-away namespaces) and runs `nodeagent lab kubectl` inside it.
"""

from __future__ import annotations

import json
import queue
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from nodeagent.lab.apiserver import LabApiServer
from tests.support import objects as k8s

KUBECTL = shutil.which("kubectl")


@dataclass
class Api:
    """The server, a kubeconfig for it, and the Python client configured from that kubeconfig."""

    server: LabApiServer
    kubeconfig: Path
    cache: Path
    core: Any
    custom: Any

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None, timeout: float = 20,
                cache: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl with the kubeconfig; `check` asserts it succeeded."""
        assert KUBECTL, "kubectl is not installed (Debian package kubectl; see scripts/setup.sh)"
        result = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(cache or self.cache),
                                 *args],
                                input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result

    def raw(self, path: str, method: str = "GET", token: str | None = None, body: Any = None) -> tuple[int, bytes]:
        """One HTTPS request trusting the server's CA; (status, body) also for error statuses."""
        context = ssl.create_default_context(cadata=(self.server.ca_pem or b"").decode())
        request = urllib.request.Request(self.server.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token or self.server.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    server = LabApiServer(token="lab-token").start()
    server.create_many([k8s.node("node1", "172.18.0.2", "10.244.1.0/24"), k8s.node("node2", "172.18.0.3",
                                                                                  "10.244.2.0/24")])
    directory = tmp_path_factory.mktemp("apiserver")
    kubeconfig = server.write_kubeconfig(directory / "kubeconfig")
    api_client = k8s_config.new_client_from_config(str(kubeconfig))
    try:
        yield Api(server, kubeconfig, directory / "kubectl-cache", k8s_client.CoreV1Api(api_client),
                  k8s_client.CustomObjectsApi(api_client))
    finally:
        api_client.close()
        server.stop()


def namespace(api: Api, name: str) -> str:
    api.server.create(k8s.namespace(name))
    return name


class Lines:
    """The stdout lines of a long-running kubectl, read on a thread, waited for with a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, count: int, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {self.seen} within {timeout} s"
            try:
                self.seen.append(self.lines.get(timeout=remaining))
            except queue.Empty:
                continue
        return self.seen


def test_kubectl_discovers_every_kind_the_agent_reads_and_the_server_version(api: Api, tmp_path: Path) -> None:
    # kubectl 1.32 asks for aggregated discovery first; the server answers it (no fallback needed).
    trace = api.kubectl("get", "ns", "-v=8", cache=tmp_path / "fresh-cache").stderr
    assert "Content-Type: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList" in trace
    names = api.kubectl("api-resources", "-o", "name").stdout.split()
    assert {"services", "pods", "nodes", "namespaces", "endpointslices.discovery.k8s.io",
            "authorizationpolicies.security.nodeagent.io", "peerauthentications.security.nodeagent.io",
            "tokenreviews.authentication.k8s.io"} <= set(names)
    version = json.loads(api.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["minor"] == "32"
    assert api.kubectl("auth", "can-i", "delete", "pods", "-A").stdout.strip() == "yes", "the token is the admin"


def test_kubectl_get_prints_the_servers_tables(api: Api) -> None:
    ns = namespace(api, "tables")
    api.server.create(k8s.service("web", namespace=ns, cluster_ip="10.96.0.44"))
    api.server.create(k8s.pod("web-0", "10.244.1.9", namespace=ns))
    services = api.kubectl("get", "svc", "-A").stdout.splitlines()
    assert services[0].split() == ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    assert [line.split()[:6] for line in services[1:] if line.startswith(ns)] == [
        [ns, "web", "ClusterIP", "10.96.0.44", "<none>", "80/TCP"]]
    pods = api.kubectl("get", "pods", "-n", ns, "-o", "wide").stdout.splitlines()
    assert pods[0].split()[:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert pods[1].split()[:3] == ["web-0", "1/1", "Running"] and pods[1].split()[5:7] == ["10.244.1.9", "node1"]
    nodes = api.kubectl("get", "nodes", "-o", "name").stdout.split()
    assert nodes == ["node/node1", "node/node2"]


POD = """
apiVersion: v1
kind: Pod
metadata: {name: %(name)s, namespace: writes, labels: {app: web}}
spec:
  nodeName: node1
  containers: [{name: c, image: none}]
"""


def test_kubectl_create_label_annotate_patch_replace_delete(api: Api) -> None:
    ns = namespace(api, "writes")
    assert api.kubectl("create", "-f", "-", stdin=POD % {"name": "p1"}).stdout.strip() == "pod/p1 created"
    created = json.loads(api.kubectl("get", "pod", "p1", "-n", ns, "-o", "json").stdout)
    assert created["metadata"]["uid"] and created["metadata"]["creationTimestamp"]
    assert created["metadata"]["generation"] == 1
    api.kubectl("label", "pod", "p1", "-n", ns, "tier=front")
    api.kubectl("annotate", "pod", "p1", "-n", ns, "owner=lab")
    api.kubectl("patch", "pod", "p1", "-n", ns, "--type", "merge", "-p", '{"metadata":{"labels":{"track":"blue"}}}')
    api.kubectl("patch", "pod", "p1", "-n", ns, "-p", '{"spec":{"nodeName":"node2"}}')  # strategic merge
    api.kubectl("label", "pod", "p1", "-n", ns, "app-")
    pod = api.server.get("Pod", ns, "p1")
    assert pod["metadata"]["labels"] == {"tier": "front", "track": "blue"}
    assert pod["metadata"]["annotations"] == {"owner": "lab"}
    assert pod["spec"]["nodeName"] == "node2" and pod["metadata"]["generation"] == 2, "spec change bumps generation"
    assert int(pod["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    assert pod["metadata"]["uid"] == created["metadata"]["uid"]

    stale = api.kubectl("get", "pod", "p1", "-n", ns, "-o", "json").stdout
    api.kubectl("label", "pod", "p1", "-n", ns, "moved=on")
    conflict = api.kubectl("replace", "-f", "-", stdin=stale, check=False)
    assert conflict.returncode == 1 and "Error from server (Conflict)" in conflict.stderr
    fresh = json.loads(api.kubectl("get", "pod", "p1", "-n", ns, "-o", "json").stdout)
    fresh["metadata"]["labels"]["replaced"] = "yes"
    assert api.kubectl("replace", "-f", "-", stdin=json.dumps(fresh)).stdout.strip() == "pod/p1 replaced"

    again = api.kubectl("create", "-f", "-", stdin=POD % {"name": "p1"}, check=False)
    assert 'Error from server (AlreadyExists): error when creating "STDIN": pods "p1" already exists' in again.stderr
    nameless = api.kubectl("create", "-f", "-", stdin=POD.replace("name: %(name)s, ", ""), check=False)
    assert "is invalid: metadata.name: Required value: name or generateName is required" in nameless.stderr
    assert api.kubectl("delete", "pod", "p1", "-n", ns).stdout.strip() == 'pod "p1" deleted'
    missing = api.kubectl("get", "pod", "p1", "-n", ns, check=False)
    assert missing.returncode == 1 and 'Error from server (NotFound): pods "p1" not found' in missing.stderr


def test_kubectl_generators_post_protobuf_and_the_server_decodes_it(api: Api) -> None:
    assert api.kubectl("create", "namespace", "generated").stdout.strip() == "namespace/generated created"
    api.kubectl("create", "configmap", "settings", "-n", "generated", "--from-literal=mode=fast")
    api.kubectl("create", "service", "nodeport", "front", "-n", "generated", "--tcp=80:http", "--node-port=30081")
    assert api.server.get("ConfigMap", "generated", "settings")["data"] == {"mode": "fast"}
    front = api.server.get("Service", "generated", "front")
    assert front["spec"]["type"] == "NodePort" and front["spec"]["selector"] == {"app": "front"}
    assert front["spec"]["ports"] == [{"name": "80-http", "protocol": "TCP", "port": 80, "targetPort": "http",
                                       "nodePort": 30081}]


def test_kubectl_writes_the_policy_crds_with_merge_patches(api: Api) -> None:
    ns = namespace(api, "policies")
    policy = {"apiVersion": "security.nodeagent.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "allow-web", "namespace": ns}, "spec": {"action": "ALLOW"}}
    api.kubectl("create", "-f", "-", stdin=json.dumps(policy))
    trace = api.kubectl("label", "authorizationpolicies", "allow-web", "-n", ns, "team=a", "-v=8").stderr
    assert "Content-Type: application/merge-patch+json" in trace
    api.kubectl("patch", "ap", "allow-web", "-n", ns, "--type", "merge", "-p", '{"spec":{"action":"DENY"}}')
    stored = api.custom.get_namespaced_custom_object("security.nodeagent.io", "v1", ns, "authorizationpolicies",
                                                     "allow-web")
    assert stored["metadata"]["labels"] == {"team": "a"} and stored["spec"] == {"action": "DENY"}
    assert stored["metadata"]["generation"] == 2
    assert api.kubectl("get", "ap", "-n", ns, "-o", "name").stdout.split() == [
        "authorizationpolicy.security.nodeagent.io/allow-web"]


def test_set_based_selectors_json_patches_and_bad_requests(api: Api) -> None:
    ns = namespace(api, "selectors")
    for name, labels in (("a", {"app": "web"}), ("b", {"app": "db", "tier": "x"}), ("c", {"app": "cache"})):
        api.server.create(k8s.pod(name, "10.244.1.50", namespace=ns, **labels))

    def names(**query: str) -> list[str]:
        return [p.metadata.name for p in api.core.list_namespaced_pod(ns, **query).items]

    assert names(label_selector="app in (web, db)") == ["a", "b"]
    assert names(label_selector="app notin (web),!tier") == ["c"]
    assert names(label_selector="app!=web,tier") == ["b"]
    assert names(field_selector="metadata.name!=a,metadata.namespace=selectors") == ["b", "c"]
    api.core.patch_namespaced_pod("a", ns, [{"op": "add", "path": "/metadata/labels/extra", "value": "1"},
                                            {"op": "test", "path": "/metadata/labels/app", "value": "web"}])
    assert api.server.get("Pod", ns, "a")["metadata"]["labels"] == {"app": "web", "extra": "1"}
    with pytest.raises(k8s_client.ApiException) as failed:
        api.core.patch_namespaced_pod("a", ns, [{"op": "test", "path": "/metadata/labels/app", "value": "db"}])
    assert failed.value.status == 422 and json.loads(failed.value.body)["reason"] == "Invalid"
    code, body = api.raw(f"/api/v1/namespaces/{ns}/pods?labelSelector=app%20in%20(", "GET")
    assert code == 400 and json.loads(body)["reason"] == "BadRequest"
    code, body = api.raw(f"/api/v1/namespaces/{ns}/pods", "POST", body={
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "Not_A_Name"}})
    assert code == 422 and json.loads(body)["details"]["causes"][0]["field"] == "metadata.name"


def test_the_agents_source_sees_what_kubectl_changes(api: Api) -> None:
    """The agent's own reader (KubernetesSource into a ChangeTracker) follows kubectl's writes, including the
    Service leaving kube-proxy's `!service.kubernetes.io/service-proxy-name` selection and coming back."""
    from nodeagent.cluster.discovery.kubernetes import ApiConnection, KubernetesSource
    from nodeagent.cluster.model import Kind
    from nodeagent.state.tracker import ChangeTracker, Snapshot

    ns = namespace(api, "agent")
    api.server.create(k8s.service("web", namespace=ns, cluster_ip="10.96.0.70"))
    api.server.create(k8s.endpoint_slice("web-a", "web", [k8s.endpoint("10.244.1.70")], namespace=ns))
    tracker = ChangeTracker("node1")
    changed = threading.Condition()

    def sink(event: Any) -> None:
        tracker.apply(event)
        with changed:
            changed.notify_all()

    def endpoints(snapshot: Snapshot) -> list[str]:
        return sorted(str(e) for port, found in snapshot.endpoints.items() if str(port).startswith(f"{ns}/")
                      for e in found)

    latest: list[Snapshot] = []

    def wait_until(want: list[str], what: str) -> None:
        deadline = time.monotonic() + 10
        with changed:
            while True:
                snapshot = tracker.snapshot() or (latest[-1] if latest else None)
                if snapshot is not None:
                    latest.append(snapshot)
                    if endpoints(snapshot) == want:
                        return
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{what}: {endpoints(snapshot) if snapshot else None}"
                changed.wait(min(remaining, 0.1))

    connection = ApiConnection.from_config(str(api.kubeconfig))
    source = KubernetesSource(connection, sink, "node1", kinds=(Kind.SERVICE, Kind.ENDPOINT_SLICE)).start()
    try:
        wait_until(["10.244.1.70:8080"], "the first list")
        api.kubectl("label", "svc", "web", "-n", ns, "service.kubernetes.io/service-proxy-name=other")
        wait_until([], "the Service handed to another proxy")
        api.kubectl("label", "svc", "web", "-n", ns, "service.kubernetes.io/service-proxy-name-")
        wait_until(["10.244.1.70:8080"], "the Service back")
        api.kubectl("patch", "endpointslice", "web-a", "-n", ns, "--type", "merge", "-p",
                    '{"endpoints":[{"addresses":["10.244.1.71"],"conditions":{"ready":true},"nodeName":"node1"}]}')
        wait_until(["10.244.1.71:8080"], "the endpoint kubectl wrote")
        api.kubectl("delete", "endpointslice", "web-a", "-n", ns)
        wait_until([], "the slice kubectl deleted")
    finally:
        source.stop()
        connection.close()


def test_status_changes_only_through_the_status_subresource(api: Api) -> None:
    ns = namespace(api, "status")
    api.server.create(k8s.pod("p", "10.244.1.40", namespace=ns))
    before = api.server.get("Pod", ns, "p")
    api.core.patch_namespaced_pod("p", ns, {"status": {"podIP": "10.244.1.99"}, "metadata": {"labels": {"x": "1"}}})
    after = api.server.get("Pod", ns, "p")
    assert after["status"] == before["status"] and after["metadata"]["labels"] == {"x": "1"}
    api.core.patch_namespaced_pod_status("p", ns, {"status": {"podIP": "10.244.1.41"},
                                                   "metadata": {"labels": {"ignored": "yes"}}})
    moved = api.server.get("Pod", ns, "p")
    assert moved["status"]["podIP"] == "10.244.1.41" and moved["metadata"]["labels"] == {"x": "1"}
    assert moved["metadata"]["generation"] == after["metadata"]["generation"], "status is not a spec change"
    assert int(moved["metadata"]["resourceVersion"]) > int(after["metadata"]["resourceVersion"])


def test_kubectl_get_watch_sees_label_selector_transitions(api: Api) -> None:
    ns = namespace(api, "watching")
    api.server.create(k8s.pod("early", "10.244.1.20", namespace=ns, app="web"))
    assert KUBECTL
    watches_before = api.server.open_watches("pods")
    process = subprocess.Popen([KUBECTL, "--kubeconfig", str(api.kubeconfig), "--cache-dir", str(api.cache),
                                "get", "pods", "-n", ns, "-l", "app=web", "--watch", "--output-watch-events",
                                "-o", 'jsonpath={.type} {.object.metadata.name}{"\\n"}'],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = Lines(process)
        assert lines.wait_for(1) == ["ADDED early"]
        deadline = time.monotonic() + 10
        while api.server.open_watches("pods") <= watches_before:
            assert time.monotonic() < deadline, "kubectl never opened its watch"
            time.sleep(0.02)  # polling a condition with a deadline
        api.server.create(k8s.pod("late", "10.244.1.21", namespace=ns, app="web"))
        api.kubectl("label", "pod", "late", "-n", ns, "app=db", "--overwrite")  # stops matching: DELETED
        api.kubectl("label", "pod", "late", "-n", ns, "app=web", "--overwrite")  # matches again: ADDED
        api.server.create(k8s.pod("other", "10.244.1.22", namespace=ns, app="db"))  # never matches
        api.kubectl("delete", "pod", "early", "-n", ns)
        assert lines.wait_for(5) == ["ADDED early", "ADDED late", "DELETED late", "ADDED late", "DELETED early"]
    finally:
        process.kill()
        process.wait()


def test_python_client_watch_follows_field_and_label_selectors(api: Api) -> None:
    ns = namespace(api, "pywatch")
    api.server.create(k8s.pod("a", "10.244.1.30", namespace=ns, app="web"))
    listed = api.core.list_namespaced_pod(ns, field_selector="spec.nodeName=node1")
    events: list[tuple[str, str, str]] = []
    # Changes made before the watch opens: a watch from the list's version replays them from history.
    api.server.create(k8s.pod("b", "10.244.1.31", namespace=ns, app="web"))
    api.server.create(k8s.pod("far", "10.244.2.31", node="node2", namespace=ns, app="web"))
    moved = api.server.get("Pod", ns, "b")
    moved["spec"]["nodeName"] = "node2"  # leaves node1's selection: DELETED, with its last matching state
    api.server.create(moved)
    api.core.delete_namespaced_pod("a", ns)
    watcher = k8s_watch.Watch()
    for event in watcher.stream(api.core.list_namespaced_pod, ns, field_selector="spec.nodeName=node1",
                                label_selector="app=web", resource_version=listed.metadata.resource_version,
                                allow_watch_bookmarks=True, timeout_seconds=5):
        events.append((event["type"], event["object"].metadata.name, event["object"].spec.node_name))
        if len(events) == 3:
            watcher.stop()
    assert events == [("ADDED", "b", "node1"), ("DELETED", "b", "node1"), ("DELETED", "a", "node1")]


def test_paged_lists_are_one_snapshot_under_concurrent_writes_and_expire_after_compaction(api: Api) -> None:
    ns = namespace(api, "paging")
    api.server.create_many([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm-{i:03}",
                                                                                   "namespace": ns}}
                            for i in range(120)])
    first = api.core.list_namespaced_config_map(ns, limit=25)
    names = [item.metadata.name for item in first.items]
    token = first.metadata._continue
    # Between pages: deletions of objects on later pages, additions before and after, updates.
    for i in range(0, 120, 7):
        api.server.delete("ConfigMap", ns, f"cm-{i:03}")
    for extra in ("cm-000a", "cm-999", "aaa"):
        api.server.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": extra, "namespace": ns}})
    while token:
        page = api.core.list_namespaced_config_map(ns, limit=25, _continue=token)
        assert page.metadata.resource_version == first.metadata.resource_version
        names.extend(item.metadata.name for item in page.items)
        token = page.metadata._continue
    assert names == [f"cm-{i:03}" for i in range(120)], "exactly the first page's snapshot, in order, once each"
    now = [i.metadata.name for i in api.core.list_namespaced_config_map(ns).items]
    assert "cm-007" not in now and "cm-999" in now

    second = api.core.list_namespaced_config_map(ns, limit=10)
    api.server.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "after", "namespace": ns}})
    api.server.compact()  # the history now starts after the list's version
    with pytest.raises(k8s_client.ApiException) as gone:
        api.core.list_namespaced_config_map(ns, limit=10, _continue=second.metadata._continue)
    status = json.loads(gone.value.body)
    assert (gone.value.status, status["kind"], status["reason"], status["code"]) == (410, "Status", "Expired", 410)


def test_watch_from_a_compacted_version_is_410_and_conflicts_are_409(api: Api) -> None:
    ns = namespace(api, "gone")
    api.server.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": ns},
                       "data": {"k": "1"}})
    old = api.core.read_namespaced_config_map("c", ns)
    api.core.patch_namespaced_config_map("c", ns, {"data": {"k": "2"}})
    with pytest.raises(k8s_client.ApiException) as conflict:
        api.core.replace_namespaced_config_map("c", ns, old)
    status = json.loads(conflict.value.body)
    assert (conflict.value.status, status["reason"], status["details"]) == (409, "Conflict", {"name": "c",
                                                                                            "kind": "configmaps"})
    api.server.compact()
    with pytest.raises(k8s_client.ApiException) as expired:
        for _ in k8s_watch.Watch().stream(api.core.list_namespaced_config_map, ns, timeout_seconds=5,
                                          resource_version=old.metadata.resource_version):
            pass
    assert expired.value.status == 410
    missing = api.raw(f"/api/v1/namespaces/{ns}/configmaps/nope")
    assert missing[0] == 404 and json.loads(missing[1])["details"] == {"name": "nope", "kind": "configmaps"}


def test_initial_events_end_with_the_annotated_bookmark_only_when_asked(api: Api) -> None:
    ns = namespace(api, "initial")
    api.server.create(k8s.service("one", namespace=ns, cluster_ip="10.96.0.61"))
    code, body = api.raw(f"/api/v1/namespaces/{ns}/services?watch=1&sendInitialEvents=true&allowWatchBookmarks=true"
                         "&resourceVersionMatch=NotOlderThan&timeoutSeconds=1")
    events = [json.loads(line) for line in body.splitlines()]
    assert code == 200 and [(e["type"], e["object"]["metadata"].get("name")) for e in events] == [
        ("ADDED", "one"), ("BOOKMARK", None)]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    version = events[1]["object"]["metadata"]["resourceVersion"]
    code, body = api.raw(f"/api/v1/namespaces/{ns}/services?watch=1&resourceVersion={version}"
                         "&allowWatchBookmarks=true&timeoutSeconds=1")
    assert code == 200 and body == b"", "nothing new, and no initial-events bookmark when not asked"


def test_faults_refusals_with_retry_after_and_the_admin_surface(api: Api) -> None:
    namespace(api, "faults")
    api.kubectl("get", "ns", "faults")  # discovery cached: the refusals below meet the namespace request
    api.server.refuse(2, 429, retry_after=1, plural="namespaces")
    started = time.monotonic()
    result = api.kubectl("get", "ns", "faults", "-o", "name")  # client-go honours Retry-After and retries
    assert result.stdout.strip() == "namespace/faults" and time.monotonic() - started >= 1.0
    assert api.raw("/admin/refuse", "POST", body={"count": 1, "code": 503})[0] == 401, "the API token is not admin"
    assert api.raw("/admin/refuse", "POST", token=api.server.admin_token, body={"count": 1, "code": 503})[0] == 200
    code, body = api.raw("/api/v1/namespaces/faults")
    assert code == 503 and json.loads(body)["reason"] == "ServiceUnavailable"
    state = json.loads(api.raw("/admin/state", token=api.server.admin_token)[1])
    assert state["resourceVersion"] == api.server.resource_version
    api.server.delay(0.3, count=1)
    started = time.monotonic()
    assert api.raw("/api/v1/namespaces/faults")[0] == 200 and time.monotonic() - started >= 0.3
    api.server.delay(1.0, count=1, plural="namespaces")  # one kind late: adversarial delivery orders
    started = time.monotonic()
    assert api.raw("/api/v1/services")[0] == 200
    services_took = time.monotonic() - started
    assert api.raw("/api/v1/namespaces")[0] == 200
    namespaces_took = time.monotonic() - started - services_took
    assert namespaces_took >= 1.0 and services_took < namespaces_took - 0.5, "only the delayed kind is held"
    # A restart over the admin surface: down, then back on the same port with every object kept.
    assert api.raw("/admin/restart", "POST", token=api.server.admin_token, body={"downSeconds": 0.2})[0] == 202
    deadline = time.monotonic() + 10
    while (answer := api.kubectl("get", "ns", "faults", "-o", "name", check=False)).returncode != 0:
        assert time.monotonic() < deadline, answer.stderr
    assert answer.stdout.strip() == "namespace/faults"


def test_the_manifests_file_is_applied_on_change_and_prunes_only_its_own_objects(tmp_path: Path) -> None:
    from nodeagent.lab.apiserver.process import load_manifests
    from nodeagent.lab.apiserver.sync import ManifestSync

    server = LabApiServer(tls=False)
    path = tmp_path / "cluster.yaml"
    path.write_text(json.dumps(k8s.service("a", cluster_ip="10.96.0.20")) + "\n---\n"
                    + json.dumps(k8s.service("b", cluster_ip="10.96.0.21")))
    sync = ManifestSync(server, path)
    sync.adopt(load_manifests(server, path))
    first = server.get("Service", "shop", "a")
    server.create(k8s.service("through-api", cluster_ip="10.96.0.22"))
    version = server.resource_version
    path.write_text(path.read_text() + "\n")  # same objects: nothing changes, no event
    assert sync.poll() is False or server.resource_version == version
    edited = k8s.service("a", cluster_ip="10.96.0.20")
    edited["metadata"]["labels"] = {"edited": "yes"}
    path.write_text(json.dumps(edited))  # a edited, b gone
    assert sync.poll()
    assert {name for _, name in server._objects["services"]} == {"a", "through-api"}
    now = server.get("Service", "shop", "a")
    assert now["metadata"]["labels"] == {"edited": "yes"} and now["metadata"]["uid"] == first["metadata"]["uid"]
    assert int(now["metadata"]["resourceVersion"]) > version


def test_endpoint_slices_and_cluster_ips_follow_writes_through_the_api(api: Api, tmp_path: Path) -> None:
    from ipaddress import IPv4Network

    from nodeagent.lab.apiserver.controllers import EndpointSliceController

    server = LabApiServer(token="lab-token", service_cidr=IPv4Network("10.96.0.0/12")).start()
    controller = EndpointSliceController(server.store).start()
    try:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        cluster = Api(server, kubeconfig, tmp_path / "cache", None, None)
        server.create(k8s.namespace("shop"))
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                   "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
        cluster.kubectl("create", "-f", "-", stdin=json.dumps(service))
        assert server.get("Service", "shop", "web")["spec"]["clusterIP"] == "10.96.0.10", "allocated as lab up does"
        server.create(k8s.pod("web-0", "10.244.1.5", app="web"))
        server.create(k8s.pod("web-1", "10.244.2.5", node="node2", app="web"))

        def endpoints() -> list[str]:
            with server._lock:
                return sorted(a for s in server._objects["endpointslices"].values()
                              for e in s.get("endpoints") or [] for a in e["addresses"])

        deadline = time.monotonic() + 10
        while endpoints() != ["10.244.1.5", "10.244.2.5"]:
            assert time.monotonic() < deadline, f"endpoints {endpoints()}"
            time.sleep(0.02)  # polling a condition with a deadline
        cluster.kubectl("delete", "pod", "web-0", "-n", "shop")
        while endpoints() != ["10.244.2.5"]:
            assert time.monotonic() < deadline, f"endpoints {endpoints()} after the delete"
            time.sleep(0.02)  # polling a condition with a deadline
        printed = cluster.kubectl("get", "endpointslices", "-n", "shop").stdout.splitlines()
        assert printed[1].split()[1:4] == ["IPv4", "8080", "10.244.2.5"]
    finally:
        controller.stop()
        server.stop()


@pytest.mark.root
def test_lab_up_serves_its_api_inside_the_lab_and_lab_kubectl_reaches_it() -> None:
    from nodeagent.lab import lab as labs
    from tests.integration.conftest import leftovers, unique_lab_name

    name = unique_lab_name()
    lab = labs.up(name)
    try:
        cli = [str(Path(sys.executable).parent / "nodeagent")]
        path = subprocess.run([*cli, "lab", "kubeconfig", "--lab", name], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert json.loads(Path(path).read_text())["clusters"][0]["cluster"]["server"] == "https://172.18.0.254:6443"
        result = subprocess.run([*cli, "lab", "kubectl", "--lab", name, "--", "get", "svc", "-A", "-o", "name"],
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["service/echo", "service/echo-nodeport"]
        node = lab.plan.node("node1")  # the agents' side: a node reaches the server over the lab's addresses
        pods = subprocess.run(["ip", "netns", "exec", node.netns, KUBECTL or "kubectl", "--kubeconfig", path,
                               "--cache-dir", str(Path(path).parent / "node-cache"), "get", "pods", "-n", "demo",
                               "-o", "name"], capture_output=True, text=True, timeout=30, check=False)
        assert pods.stdout.split() == ["pod/client", "pod/echo-0", "pod/echo-1"], pods.stderr

        def endpoints() -> set[str]:
            rows = labs.kubectl(name, ["get", "endpointslices", "-n", "demo", "-o",
                                       "jsonpath={.items[*].endpoints[*].addresses[*]}"], capture=True).stdout
            return set(rows.split())

        far = str(lab.plan.pod("demo/echo-1").pod.ip)
        assert far in endpoints()
        assert labs.kubectl(name, ["delete", "pod", "echo-1", "-n", "demo"], capture=True).returncode == 0
        deadline = time.monotonic() + 10
        while far in endpoints():  # the lab's endpoint-slice controller withdraws it
            assert time.monotonic() < deadline, "the deleted pod's endpoint stayed"
            time.sleep(0.1)  # polling a condition with a deadline
        assert str(lab.plan.pod("demo/echo-0").pod.ip) in endpoints()
        nodes = labs.kubectl(name, ["get", "nodes"], capture=True).stdout.splitlines()
        assert [line.split()[:2] for line in nodes[1:]] == [["node1", "Ready"], ["node2", "Ready"]]
        assert labs.kubectl(name, ["delete", "namespace", "demo"], capture=True).returncode == 0
        left = labs.kubectl(name, ["get", "pods,svc,endpointslices", "-n", "demo", "-o", "name"], capture=True)
        assert left.stdout.split() == [], "the namespace's objects went with it"
    finally:
        labs.down(name)
    assert leftovers(name, []) == []


@pytest.mark.root
@pytest.mark.parametrize("mode", ["iptables", pytest.param("ebpf", marks=pytest.mark.bcc)])
def test_agents_on_the_lab_api_ride_out_a_410_storm_and_a_restart_then_follow_kubectl(mode: str) -> None:
    """Agents read the lab's API server: traffic to a Service keeps flowing through a 410 storm and while the
    server is down (the datapath stays programmed), and a kubectl change made after it returns takes effect."""
    from nodeagent.lab import lab as labs
    from nodeagent.lab.agents import start_agents
    from nodeagent.lab.demo import request_from
    from tests.integration.conftest import unique_lab_name
    from tests.support.agent_labs import api_fault

    name = unique_lab_name()
    labs.up(name)
    try:
        lab = start_agents(name, mode, mesh=False)
        vip = f"{lab.cluster_ip('echo')}:80"
        seen: set[str] = set()
        for _ in range(40):  # random spread: both backends answer within a few requests (2^-39 odds otherwise)
            seen.add(request_from(lab, "demo/client", vip)["pod"])
            if len(seen) == 2:
                break
        assert seen == {"demo/echo-0", "demo/echo-1"}
        api_fault(lab, "expire-watches", {})  # every watch ends with a 410: the agents relist
        api_fault(lab, "restart", {"downSeconds": 3})
        for _ in range(4):  # while the server is away, the programmed Service still answers
            assert request_from(lab, "demo/client", vip)["pod"] in ("demo/echo-0", "demo/echo-1")
        deadline = time.monotonic() + 20
        while labs.kubectl(name, ["delete", "pod", "echo-1", "-n", "demo"], capture=True).returncode != 0:
            assert time.monotonic() < deadline, "the API server did not come back"
            time.sleep(0.2)  # polling a condition with a deadline
        while {request_from(lab, "demo/client", vip)["pod"] for _ in range(4)} != {"demo/echo-0"}:
            assert time.monotonic() < deadline, "the agents did not follow the deleted pod's endpoint"
    finally:
        labs.down(name)
