"""The deployment artifacts (daemonset/, vagrant/) hold together without a cluster.

No cluster can start here, so these check everything short of one: the kustomizations render; every
manifest validates against the Kubernetes schemas of each supported version (kubernetes-validate,
strict: unknown fields fail); the ClusterRole grants exactly the API calls the code makes (derived by
driving the Kubernetes source against a recording fake, plus a scan for any other way to call the API);
the CA's ClusterRole grants exactly its TokenReviews and pod watch; only the CA Deployment mounts the CA
key, the tunnels authenticate with a projected token; the CRDs match the kinds the source watches; the
containers' flags exist in the CLI; the privileges are the justified ones; the shipped configurations
load; the shell scripts pass shellcheck; the Vagrantfile parses and runs under a stub Vagrant; the smoke
test's own manifests are valid.

Tools: kubectl (kustomize), shellcheck, ruby and the kubernetes-validate package, all installed by
scripts/setup.sh. A missing one fails the test in CI (CI=true) and skips it elsewhere, with the reason.
"""

from __future__ import annotations

import ast
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml

from nodeagent.cli import main
from nodeagent.cluster.discovery.kubernetes import CORE_KINDS, MESH_KINDS, KubernetesSource
from nodeagent.cluster.discovery.wire import RESOURCES
from nodeagent.cluster.model import MESH_GROUP
from nodeagent.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "daemonset"
VAGRANT = ROOT / "vagrant"
KUSTOMIZATIONS = {
    "base": DAEMONSET / "base",
    "replace-kube-proxy": DAEMONSET / "overlays" / "replace-kube-proxy",
    "cleanup": DAEMONSET / "cleanup",
    "vagrant": VAGRANT / "manifests",
}
# Kubernetes minor versions the manifests must be valid for (appArmorProfile needs 1.30).
SUPPORTED_VERSIONS = ("1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0")
AGENT_CAPABILITIES = {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"}
TUNNEL_CAPABILITIES = {"NET_ADMIN", "SYS_ADMIN"}
SHELL_SCRIPTS = sorted([*DAEMONSET.glob("*.sh"), *VAGRANT.glob("*.sh"), *(VAGRANT / "provision").glob("*.sh")])


def need(tool: str) -> str:
    """The tool's path; a missing tool fails in CI and skips elsewhere, saying how to get it."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is missing (scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run every test, but {message}")
        pytest.skip(message)
    return path


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:
        message = "the kubernetes-validate package is missing (scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run every test, but {message}")
        pytest.skip(message)
    return kv


@cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run([shutil.which("kubectl") or "kubectl", "kustomize", str(KUSTOMIZATIONS[name])],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {KUSTOMIZATIONS[name]}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def rendered(name: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize` renders for one kustomization (rendered once per run)."""
    need("kubectl")
    return _render(name)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


WORKLOADS = ("DaemonSet", "Deployment")


def workloads(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """The DaemonSets and Deployments: every object that runs containers."""
    return [d for d in docs if d["kind"] in WORKLOADS]


def containers(daemonset: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = daemonset["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(docs: tuple[dict[str, Any], ...], daemonset: str, name: str) -> dict[str, Any]:
    [ds] = [d for d in workloads(docs) if d["metadata"]["name"] == daemonset]
    [found] = [c for c in containers(ds) if c["name"] == name]
    return found


# --- kustomize and the Kubernetes schemas -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomization_renders(name: str) -> None:
    kinds = {d["kind"] for d in rendered(name)}
    expected = {"DaemonSet"} if name == "cleanup" else {
        "Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
        "ConfigMap", "DaemonSet", "Deployment", "Service"}
    assert expected <= kinds


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    kv = kubernetes_validate()
    problems = []
    for name in sorted(KUSTOMIZATIONS):
        for doc in rendered(name):
            where = f"{name}: {doc['kind']} {doc['metadata']['name']}"
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                problems.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
            except (kv.SchemaNotFoundError, kv.InvalidSchemaError, kv.utils.VersionNotSupportedError) as exc:
                problems.append(f"{where}: {exc.message}")
    assert not problems, f"Kubernetes {version}:\n" + "\n".join(problems)


def test_the_validation_is_strict_enough_to_fail() -> None:
    kv = kubernetes_validate()
    [agent] = find(rendered("base"), "DaemonSet", "nodeagent")
    typo = yaml.safe_load(yaml.safe_dump(agent))
    typo["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kv.ValidationError, match="hostNetwrk"):
        kv.validate(typo, SUPPORTED_VERSIONS[0], strict=True)
    wrong_type = yaml.safe_load(yaml.safe_dump(agent))
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "10256"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong_type, SUPPORTED_VERSIONS[0], strict=True)


# --- RBAC: exactly what the code calls ----------------------------------------------------------------


class _Response:
    """A urllib3 response as the reflector uses it: a list body, or a watch stream that waits to be shut."""

    def __init__(self, body: bytes | None) -> None:
        self.status = 200
        self.data = body or b""
        self._closed = threading.Event()

    def stream(self, amt: Any = None, decode_content: bool = True) -> Iterator[bytes]:
        self._closed.wait(30)
        yield from ()

    def shutdown(self) -> None:
        self._closed.set()

    def release_conn(self) -> None:
        self._closed.set()


class _RecordingApi:
    """Stands in for ApiConnection: records every request, answers lists empty and watches with nothing."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def get(self, path: str, query: list[tuple[str, str]], timeout: float) -> _Response:
        with self._lock:
            self.requests.append((path, dict(query)))
        watching = dict(query).get("watch") in ("1", "true")
        return _Response(None if watching else b'{"kind":"List","metadata":{"resourceVersion":"7"},"items":[]}')


def _rbac_of(path: str, query: dict[str, str]) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) of a GET, as the API server's authorizer sees it."""
    parts = urlsplit(path).path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    if len(rest) == 1:
        return group, rest[0], "watch" if query.get("watch") in ("1", "true") else "list"
    return group, rest[0], "get"


def derived_permissions() -> set[tuple[str, str, str]]:
    """Drive the Kubernetes source (every kind, as the agent and the tunnel run it) and map its requests."""
    api = _RecordingApi()
    for all_pods in (False, True):
        source = KubernetesSource(api, lambda event: None, "node-1", all_pods=all_pods)  # type: ignore[arg-type]
        source.start()
        try:
            deadline = time.monotonic() + 20
            while not all(r.watches >= 1 for r in source.reflectors.values()) and time.monotonic() < deadline:
                time.sleep(0.01)  # polling the reflectors' own counters, with a deadline
            assert all(r.watches >= 1 for r in source.reflectors.values()), "a reflector never watched"
        finally:
            source.stop()
    return {_rbac_of(path, query) for path, query in api.requests}


def cluster_role_permissions(docs: tuple[dict[str, Any], ...]) -> set[tuple[str, str, str]]:
    [role] = find(docs, "ClusterRole", "nodeagent")
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_the_cluster_role_grants_exactly_what_the_kubernetes_source_calls() -> None:
    derived = derived_permissions()
    assert ("discovery.k8s.io", "endpointslices", "watch") in derived  # the derivation itself works
    granted = cluster_role_permissions(rendered("base"))
    assert granted == derived, (f"granted but never called: {sorted(granted - derived)}; "
                                f"called but not granted: {sorted(derived - granted)} "
                                "(daemonset/base/rbac.yaml)")


def test_the_source_watches_every_kind_it_can_decode() -> None:
    # The RBAC derivation drives the source's default kinds; a kind left out there would be a kind
    # some caller could still watch without RBAC for it.
    assert set(CORE_KINDS + MESH_KINDS) == set(RESOURCES)


def _kubernetes_calls(tree: ast.Module) -> tuple[set[str], set[str]]:
    """HTTP methods passed to the client's param_serialize, and every attribute used of its modules."""
    methods, used = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "param_serialize":
            first = node.args[0] if node.args else None
            methods.add(first.value if isinstance(first, ast.Constant) else "<not a literal>")
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in ("k8s_client", "k8s_config")):
            used.add(f"{node.value.id}.{node.attr}")
    return methods, used


def test_no_other_way_to_call_the_api() -> None:
    # The derivation above sees the source's GETs. Any other call (a POST for Events, a typed API class,
    # another module importing the client) must come with a derivation here and a rule in rbac.yaml.
    importers = []
    for path in sorted((ROOT / "nodeagent").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "kubernetes" or n.startswith("kubernetes.") for n in names):
                importers.append(path.relative_to(ROOT).as_posix())
    assert sorted(set(importers)) == [
        "nodeagent/cluster/discovery/kubernetes.py", "nodeagent/cluster/discovery/tokenreview.py"]
    tree = ast.parse((ROOT / "nodeagent/cluster/discovery/kubernetes.py").read_text())
    methods, used = _kubernetes_calls(tree)
    assert methods == {"GET"}, f"API calls with {methods - {'GET'}}: derive their RBAC in this test"
    assert used <= {"k8s_client.ApiClient", "k8s_client.Configuration", "k8s_config.load_incluster_config",
                    "k8s_config.load_kube_config"}, f"new client entry points {used}: derive their RBAC here"
    # the CA's calls: derived in test_the_ca_cluster_role_grants_exactly_its_token_reviews_and_pod_watch
    methods, used = _kubernetes_calls(ast.parse((ROOT / "nodeagent/cluster/discovery/tokenreview.py").read_text()))
    assert not methods and used <= {"k8s_client.AuthenticationV1Api", "k8s_client.V1TokenReview",
                                    "k8s_client.V1TokenReviewSpec", "k8s_client.ApiException"}, used


def test_the_scan_would_see_a_new_call() -> None:
    methods, used = _kubernetes_calls(ast.parse(
        "api.param_serialize('POST', '/api/v1/namespaces/x/events')\nk8s_client.CoreV1Api()"))
    assert methods == {"POST"} and used == {"k8s_client.CoreV1Api"}


def test_every_service_account_is_bound_and_used() -> None:
    docs = rendered("base")
    bound = {(b["roleRef"]["name"], s["namespace"], s["name"]) for b in find(docs, "ClusterRoleBinding")
             for s in b["subjects"]}
    assert bound == {("nodeagent", "nodeagent", "nodeagent"), ("nodeagent", "nodeagent", "nodeagent-ztunnel"),
                     ("nodeagent-ca", "nodeagent", "nodeagent-ca")}, "the CA's role is the CA's alone"
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in find(docs, "ServiceAccount")}
    used = {(d["metadata"]["namespace"], d["spec"]["template"]["spec"]["serviceAccountName"])
            for d in workloads(docs)}
    assert {(ns, name) for _, ns, name in bound} == accounts == used


class _RecordingCalls:
    """Wraps the official client's ApiClient.call_api: records (method, path, query) and sends it on."""

    def __init__(self, call_api: Any) -> None:
        self.call_api, self.calls = call_api, []

    def __call__(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        parts = urlsplit(url)
        self.calls.append((method, parts.path, dict(parse_qsl(parts.query))))
        return self.call_api(method, url, *args, **kwargs)


def ca_derived_permissions(tmp_path: Path) -> set[tuple[str, str, str]]:
    """Drive the CA's API calls (a TokenReview and the tunnel pod's lookup, against the fake API server,
    and the pod watch) and map them to RBAC."""
    from nodeagent.ca.auth import TokenReviewAuthenticator
    from nodeagent.cluster.discovery.tokenreview import ReviewConnection
    from nodeagent.cluster.model import Kind
    from tests.support.fakeapi import FakeApiServer

    fake = FakeApiServer()
    fake.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "nodeagent", "name": "zt", "uid": "u"},
                 "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}})
    fake.start()
    try:
        connection = ReviewConnection.connect(str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        recorder = _RecordingCalls(connection._api.call_api)
        connection._api.call_api = recorder  # type: ignore[method-assign]
        token = fake.issue_token("nodeagent", "nodeagent-ztunnel", "zt", "u", "n1")
        assert TokenReviewAuthenticator(connection).authenticate(token).node == "n1"
        connection.close()
    finally:
        fake.stop()
    permissions = set()
    for method, path, query in recorder.calls:
        group, resource, verb = _rbac_of(path, query)
        permissions.add((group, resource, "create" if method == "POST" else verb))
    api = _RecordingApi()
    source = KubernetesSource(api, lambda event: None, "", kinds=(Kind.POD,), all_pods=True)  # type: ignore[arg-type]
    source.start()
    try:
        deadline = time.monotonic() + 20
        while not all(r.watches >= 1 for r in source.reflectors.values()) and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the reflectors' own counters, with a deadline
    finally:
        source.stop()
    return permissions | {_rbac_of(path, query) for path, query in api.requests}


def test_the_ca_cluster_role_grants_exactly_its_token_reviews_and_pod_watch(tmp_path: Path) -> None:
    derived = ca_derived_permissions(tmp_path)
    assert ("authentication.k8s.io", "tokenreviews", "create") in derived  # the derivation itself works
    [role] = find(rendered("base"), "ClusterRole", "nodeagent-ca")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == derived, (f"granted but never called: {sorted(granted - derived)}; "
                                f"called but not granted: {sorted(derived - granted)} (daemonset/base/ca.yaml)")


def test_the_crds_define_the_kinds_the_source_watches() -> None:
    crds = {d["spec"]["names"]["kind"]: d for d in find(rendered("base"), "CustomResourceDefinition")}
    assert set(crds) == {str(kind) for kind in MESH_KINDS}
    for kind in MESH_KINDS:
        crd, resource = crds[str(kind)], RESOURCES[kind]
        group, version = resource.api_version.split("/")
        assert (crd["spec"]["group"], crd["spec"]["names"]["plural"], crd["spec"]["scope"]) == (
            MESH_GROUP, resource.plural, "Namespaced") and group == MESH_GROUP
        assert crd["metadata"]["name"] == f"{resource.plural}.{MESH_GROUP}"
        assert [(v["name"], v["served"], v["storage"]) for v in crd["spec"]["versions"]] == [(version, True, True)]


# --- the containers -----------------------------------------------------------------------------------


def _flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_flag_a_container_passes_exists(name: str) -> None:
    for ds in workloads(rendered(name)):
        for c in containers(ds):
            args = c.get("args", [])
            if c.get("command") or not args:
                continue
            command: Any = main
            while args and hasattr(command, "commands") and args[0] in command.commands:
                command, args = command.commands[args[0]], args[1:]
            assert command is not main, f"{c['name']}: `nodeagent {' '.join(c['args'])}` is no command"
            known = {opt for p in command.params for opt in p.opts}
            assert _flags(args) <= known, f"{c['name']}: unknown flags {_flags(args) - known}"


def test_the_agent_runs_with_the_justified_privileges_and_mounts() -> None:
    docs = rendered("replace-kube-proxy")
    [ds] = find(docs, "DaemonSet", "nodeagent")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"]
    agent = container(docs, "nodeagent", "agent")
    security = agent["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": sorted(AGENT_CAPABILITIES, key=[
        "NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"].index)}
    assert security["privileged"] is False
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    host = {path: volumes[m["name"]].get("hostPath", {}).get("path") for path, m in mounts.items()}
    assert host["/sys/fs/bpf"] == "/sys/fs/bpf" and mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert host["/run/xtables.lock"] == "/run/xtables.lock"
    assert host["/run/netns"] == "/run/netns"
    for path in ("/lib/modules", "/usr/src"):
        assert host[path] == path and mounts[path]["readOnly"] is True
    # the configuration's cgroup is the host's cgroup v2 root as mounted
    [config_map] = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("nodeagent-config")]
    config = parse_config(config_map["data"]["config.yaml"])
    assert host[config.bpf_cgroup_path] == "/sys/fs/cgroup"
    assert "--config=/etc/nodeagent/config.yaml" in agent["args"]
    assert mounts["/etc/nodeagent/config.yaml"]["subPath"] == "config.yaml"
    # probes: kube-proxy's health port
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert agent[probe]["httpGet"]["port"] == 10256
    # bpffs is prepared by an init container that shares its mounts with the host
    [init] = spec["initContainers"]
    [bpffs] = [m for m in init["volumeMounts"] if m["mountPath"] == "/sys/fs/bpf"]
    assert bpffs["mountPropagation"] == "Bidirectional" and init["securityContext"]["privileged"] is True


def test_the_tunnel_runs_apart_with_fewer_privileges() -> None:
    docs = rendered("replace-kube-proxy")
    tunnel = container(docs, "nodeagent-ztunnel", "ztunnel")
    assert tunnel["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]}
    assert tunnel["livenessProbe"]["tcpSocket"] == {"port": 15021}
    [ds] = find(docs, "DaemonSet", "nodeagent-ztunnel")
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    # never the CA key, no Secret at all: the root certificate from its ConfigMap
    assert not [v for v in volumes.values() if "secret" in v]
    [root] = [v["configMap"] for v in volumes.values() if "configMap" in v]
    assert root == {"name": "nodeagent-ca-root-cert", "items": [{"key": "root-cert.pem", "path": "root-cert.pem"}]}
    assert not any(v.get("hostPath", {}).get("path") in ("/sys/fs/bpf", "/sys/fs/cgroup") for v in volumes.values())


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_the_tunnel_rolls_new_first_and_drains_within_its_grace_period(name: str) -> None:
    """The new tunnel starts beside the old one (maxSurge, nothing unavailable), nothing keeps it off the node
    (no host ports), its readiness is asked of itself (over its own socket, not the shared port), and the old
    one's drain and its workers' stop end before the kubelet's SIGKILL."""
    docs = rendered(name)
    if not find(docs, "DaemonSet", "nodeagent-ztunnel"):
        return
    [ds] = find(docs, "DaemonSet", "nodeagent-ztunnel")
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    tunnel = container(docs, "nodeagent-ztunnel", "ztunnel")
    assert not tunnel.get("ports"), "host ports would keep the surge pod off the node"
    command = main.commands["ztunnel"]
    socket_path = _flag(tunnel["args"][1:], "--readiness-socket", command)
    assert tunnel["readinessProbe"]["exec"]["command"][-2:] == ["--unix-socket", socket_path]
    mounts = {m["mountPath"] for m in tunnel["volumeMounts"]}
    assert str(Path(socket_path).parent) in mounts, "the socket's directory is writable (read-only root)"
    # the probe's script is the image's health check, which takes that form
    assert tunnel["readinessProbe"]["exec"]["command"][1] == "/usr/local/bin/nodeagent-healthcheck"
    [drain] = [e for e in tunnel["env"] if e["name"] == "NODEAGENT_ZTUNNEL_DRAIN_DEADLINE"]
    [option] = [p for p in command.params if "--drain-deadline" in p.opts]
    assert option.envvar == drain["name"]
    from nodeagent.daemon.workers import STOP_TIMEOUT
    grace = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert float(drain["value"]) + STOP_TIMEOUT < grace


def test_the_health_check_asks_a_unix_socket(tmp_path: Path) -> None:
    """The tunnel's exec probe: 0 on 200, 1 on 503 or nothing listening (a real HTTP server on a unix socket)."""
    import asyncio
    import importlib.util
    import threading

    spec = importlib.util.spec_from_file_location("healthcheck", DAEMONSET / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    from nodeagent.tunnel.admin import json_route, serve_http_unix

    answer = {"status": 200}
    path = str(tmp_path / "ready.sock")
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def serve() -> None:
        await serve_http_unix(path, {"/healthz/ready": json_route(lambda: (answer["status"], {}))})
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    thread.start()
    try:
        assert started.wait(5)
        assert healthcheck.main(["--unix-socket", path]) == 0
        answer["status"] = 503
        assert healthcheck.main(["--unix-socket", path]) == 1
        assert healthcheck.main(["--unix-socket", str(tmp_path / "nobody.sock")]) == 1
        assert healthcheck.main(["--bogus"]) == 2
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_the_tunnel_runs_one_worker_per_cpu_of_its_limit(name: str) -> None:
    docs = rendered(name)
    if not find(docs, "DaemonSet", "nodeagent-ztunnel"):
        return
    tunnel = container(docs, "nodeagent-ztunnel", "ztunnel")
    [workers] = [e for e in tunnel["env"] if e["name"] == "NODEAGENT_ZTUNNEL_WORKERS"]
    [option] = [p for p in main.commands["ztunnel"].params if "--workers" in p.opts]
    assert option.envvar == workers["name"], "the env is the one --workers reads"
    # The kubelet writes the limit in whole CPUs, rounded up (divisor 1): what --workers takes.
    assert workers["valueFrom"] == {"resourceFieldRef": {"containerName": "ztunnel", "resource": "limits.cpu",
                                                         "divisor": "1"}}
    limit = str(tunnel["resources"]["limits"]["cpu"])
    cores = math.ceil(int(limit[:-1]) / 1000) if limit.endswith("m") else math.ceil(float(limit))
    assert option.type.convert(str(cores), option, None) == cores


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_container_is_least_privilege_and_bounded(name: str) -> None:
    for ds in workloads(rendered(name)):
        for c in containers(ds):
            where = f"{ds['metadata']['name']}/{c['name']}"
            security = c["securityContext"]
            assert set(c["resources"]) == {"requests", "limits"}, where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where
            if security.get("privileged"):
                assert c["name"] == "prepare-bpffs", f"{where}: only the bpffs init container is privileged"
                continue
            assert security["capabilities"]["drop"] == ["ALL"], where
            added = set(security["capabilities"].get("add", []))
            assert added <= AGENT_CAPABILITIES, where
            # the API server refuses allowPrivilegeEscalation: false together with SYS_ADMIN
            if "SYS_ADMIN" in added:
                assert security.get("allowPrivilegeEscalation") is not False, where


def test_the_replace_kube_proxy_overlay_points_both_at_the_api_server() -> None:
    docs = rendered("vagrant")
    [env] = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("nodeagent-apiserver")]
    assert env["data"] == {"KUBERNETES_SERVICE_HOST": "192.168.56.10", "KUBERNETES_SERVICE_PORT": "6443"}
    for ds, name in (("nodeagent", "agent"), ("nodeagent-ztunnel", "ztunnel"), ("nodeagent-ca", "ca")):
        assert container(docs, ds, name)["envFrom"] == [{"configMapRef": {"name": env["metadata"]["name"]}}]
        assert container(docs, ds, name)["image"] == "localhost/nodeagent:dev"


@pytest.mark.parametrize("path", [DAEMONSET / "base" / "nodeagent.yaml",
                                  DAEMONSET / "overlays" / "replace-kube-proxy" / "nodeagent.yaml"],
                         ids=["base", "replace-kube-proxy"])
def test_the_shipped_configurations_load(path: Path) -> None:
    config = parse_config(path.read_text(), str(path))
    assert config.bpf_cgroup_path == "/host/sys/fs/cgroup" and config.mode == "auto"


# --- scripts, image, Vagrant --------------------------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=[p.relative_to(ROOT).as_posix() for p in SHELL_SCRIPTS])
def test_shell_scripts_pass_shellcheck(script: Path) -> None:
    result = subprocess.run([need("shellcheck"), "--external-sources", str(script)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_init_container_scripts_pass_shellcheck(tmp_path: Path) -> None:
    shellcheck = need("shellcheck")
    scripts = [(f"{ds['metadata']['name']}/{c['name']}", c["args"][0]) for name in sorted(KUSTOMIZATIONS)
               for ds in find(rendered(name), "DaemonSet") for c in containers(ds)
               if c.get("command") == ["/bin/sh", "-c"]]
    assert len({where for where, _ in scripts}) == 1  # prepare-bpffs
    for where, text in scripts:
        path = tmp_path / "script.sh"
        path.write_text(text)
        result = subprocess.run([shellcheck, "--shell=sh", str(path)], capture_output=True, text=True, timeout=60,
                                check=False)
        assert result.returncode == 0, f"{where}:\n{result.stdout}"


def test_shellcheck_fails_a_bad_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\nrm -rf $1/*\n")
    assert subprocess.run([need("shellcheck"), str(bad)], capture_output=True, timeout=60, check=False).returncode != 0


def test_the_vagrantfile_parses() -> None:
    result = subprocess.run([need("ruby"), "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr


# A stand-in for Vagrant: records every configuration call, so the Vagrantfile's own Ruby runs for real.
_STUB = r"""
require "json"
$calls = []
class Recorder
  def initialize(path) = @path = path
  def method_missing(name, *args, **kw, &block)
    $calls << { "at" => @path, "call" => name.to_s, "args" => args.map(&:to_s), "kw" => kw.transform_keys(&:to_s) }
    block&.call(Recorder.new("#{@path}/#{name}(#{args.first})"))
    Recorder.new("#{@path}.#{name}")
  end
  def respond_to_missing?(*) = true
end
module Vagrant
  def self.configure(_version) = yield(Recorder.new("config"))
end
load ARGV[0]
puts JSON.generate($calls)
"""


def test_the_vagrantfile_defines_the_cluster(tmp_path: Path) -> None:
    from cryptography import x509

    stub = tmp_path / "stub.rb"
    stub.write_text(_STUB)
    state = tmp_path / "state"
    result = subprocess.run([need("ruby"), str(stub), str(VAGRANT / "Vagrantfile")], capture_output=True, text=True,
                            timeout=60, check=False, env={**os.environ, "NODEAGENT_STATE": str(state)},
                            cwd=VAGRANT)
    assert result.returncode == 0, result.stderr
    calls = yaml.safe_load(result.stdout)
    machines = [c["args"][0] for c in calls if c["call"] == "define"]
    assert machines == ["cp", "worker1", "worker2"]
    provisioned = [c["kw"]["path"] for c in calls if c["call"] == "provision"]
    assert provisioned == ["provision/common.sh", "provision/control-plane.sh"] + [
        "provision/common.sh", "provision/worker.sh"] * 2
    assert all((VAGRANT / p).is_file() for p in provisioned)
    # the cluster CA the workers pin, and kubeadm's token format
    ca = x509.load_pem_x509_certificate((state / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert (state / "ca.key").stat().st_mode & 0o077 == 0
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}\n", (state / "token").read_text())


def test_the_image_recipe() -> None:
    text = (DAEMONSET / "Containerfile").read_text()
    assert text.startswith("#") and re.search(r"^FROM \S*debian:bookworm", text, re.M)
    for package in ("python3-bpfcc", "iptables", "iproute2", "conntrack", "bpftool"):
        assert re.search(rf"\b{package}\b", text), package
    assert re.search(r"^USER 10001$", text, re.M) and re.search(r"^HEALTHCHECK ", text, re.M)
    assert re.search(r'^ENTRYPOINT \["nodeagent"\]$', text, re.M)
    # every COPY source is staged by build-image.sh
    build = (DAEMONSET / "build-image.sh").read_text()
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        assert f"/{source}" in build or f'"$ROOT/daemonset/{source}"' in build, source
    compile((DAEMONSET / "healthcheck.py").read_text(), "healthcheck.py", "exec")


def _smoke_manifests() -> list[dict[str, Any]]:
    text = (VAGRANT / "smoke-test.sh").read_text()
    values = {"NS": "nodeagent-smoke", "PLAIN": "nodeagent-smoke-plain", "IMAGE": "localhost/nodeagent:dev"}
    docs = []
    for block in re.findall(r"<<YAML\n(.*?)\nYAML\n", text, re.S):
        block = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], block)
        docs += [d for d in yaml.safe_load_all(block) if d]
    return docs


def test_the_smoke_tests_manifests_are_valid() -> None:
    import jsonschema

    from nodeagent.cluster.decode import decode

    kv = kubernetes_validate()
    docs = _smoke_manifests()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "Pod", "AuthorizationPolicy", "PeerAuthentication"}
    crds = {d["spec"]["names"]["kind"]: d for d in find(rendered("base"), "CustomResourceDefinition")}
    for doc in docs:
        if doc["kind"] in crds:
            schema = crds[doc["kind"]]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            jsonschema.validate(doc, schema)
            result = decode(doc)
            assert result.obj is not None and not result.rejections, result.rejections
        else:
            for version in (SUPPORTED_VERSIONS[0], SUPPORTED_VERSIONS[-1]):
                kv.validate(doc, version, strict=True)


# --- the mesh CA: off the nodes ---------------------------------------------------------------------------


def _mounted_secrets(workload: dict[str, Any]) -> set[str]:
    """Names of the Secrets a workload's pods mount (directly or projected)."""
    names = set()
    for volume in workload["spec"]["template"]["spec"].get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_only_the_ca_deployment_mounts_the_ca_key(name: str) -> None:
    holders = [w["metadata"]["name"] for w in workloads(rendered(name)) if "nodeagent-ca" in _mounted_secrets(w)]
    assert holders == ([] if name == "cleanup" else ["nodeagent-ca"])
    for workload in workloads(rendered(name)):
        if workload["metadata"]["name"] != "nodeagent-ca":
            assert workload["kind"] == "DaemonSet" and not _mounted_secrets(workload), workload["metadata"]["name"]
            for c in containers(workload):
                assert not any(a.startswith("--ca-dir") for a in c.get("args", [])), c["name"]


def test_the_agent_mounts_no_ca_key_and_serves_no_ca() -> None:
    docs = rendered("replace-kube-proxy")
    agent = container(docs, "nodeagent", "agent")
    assert not any(a.startswith(("--ca-", "ca")) for a in agent["args"])
    assert not [m for m in agent["volumeMounts"] if m["mountPath"].startswith("/etc/nodeagent/ca")]
    assert not any(p["containerPort"] == 15012 for p in agent["ports"])


def test_the_ca_deployment_holds_the_key_unprivileged_behind_a_service() -> None:
    docs = rendered("replace-kube-proxy")
    [deployment] = find(docs, "Deployment", "nodeagent-ca")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "nodeagent-ca" and not spec.get("hostNetwork")
    assert spec["securityContext"]["runAsNonRoot"] is True
    ca = container(docs, "nodeagent-ca", "ca")
    assert ca["args"][0] == "ca" and "--ca-dir=/etc/nodeagent/ca" in ca["args"]
    assert not any(a.startswith("--token-file-dir") for a in ca["args"]), "the lab's authenticator, never here"
    security = ca["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]} and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    [mount] = [m for m in ca["volumeMounts"] if m["mountPath"] == "/etc/nodeagent/ca"]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "nodeagent-ca" and mount["readOnly"] is True
    assert ca["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15014}
    [service] = find(docs, "Service", "nodeagent-ca")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["port"] for p in service["spec"]["ports"]} == {15012, 15014}


def _flag(args: list[str], flag: str, command: Any) -> str:
    """A flag's value in `args`, else the command's default."""
    for arg in args:
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    [param] = [p for p in command.params if flag in p.opts]
    return str(param.default)


def test_the_tunnel_authenticates_with_a_projected_token_for_the_cas_audience() -> None:
    docs = rendered("replace-kube-proxy")
    tunnel = container(docs, "nodeagent-ztunnel", "ztunnel")
    [ds] = find(docs, "DaemonSet", "nodeagent-ztunnel")
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in tunnel["volumeMounts"]}
    [(name, token)] = [(n, s["serviceAccountToken"]) for n, v in volumes.items()
                       for s in v.get("projected", {}).get("sources", []) if "serviceAccountToken" in s]
    assert token["expirationSeconds"] == 3600
    token_file = _flag(tunnel["args"][1:], "--ca-token-file", main.commands["ztunnel"])
    assert token_file == f"{mounts[name]}/{token['path']}"
    ca = container(docs, "nodeagent-ca", "ca")
    assert token["audience"] == _flag(ca["args"][1:], "--audience", main.commands["ca"]) == "nodeagent-ca"
    account = _flag(ca["args"][1:], "--tunnel-service-account", main.commands["ca"])
    assert account == f"{ds['metadata']['namespace']}/{ds['spec']['template']['spec']['serviceAccountName']}"
    [service] = find(docs, "Service", "nodeagent-ca")
    address = _flag(tunnel["args"][1:], "--ca-address", main.commands["ztunnel"])
    assert address == f"nodeagent-ca.{service['metadata']['namespace']}.svc:15012"
    assert ds["spec"]["template"]["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet", "the Service name resolves"
    # the name the tunnel checks is in the CA's own certificate
    dns_names = [a.split("=", 1)[1] for a in ca["args"] if a.startswith("--dns-name=")] or list(
        next(p for p in main.commands["ca"].params if "--dns-name" in p.opts).default)
    assert "nodeagent-ca" in dns_names


def test_the_cni_plugin_is_installed_where_the_agent_listens_and_removed_by_the_cleanup() -> None:
    """The plugin talks to the socket the agent serves; the installer writes the directories it mounts; the
    plugin stays chained fail-closed; the cleanup DaemonSet takes it out."""
    docs = rendered("replace-kube-proxy")
    agent = container(docs, "nodeagent", "agent")
    installer = container(docs, "nodeagent", "cni-install")
    install = main.commands["cni"].commands["install"]  # type: ignore[attr-defined]  # a click group
    args = installer["args"][2:]
    assert installer["args"][:2] == ["cni", "install"] and "--watch" in args
    assert _flag(agent["args"][1:], "--cni-socket", main.commands["run"]) == _flag(args, "--agent-socket", install)
    assert _flag(args, "--on-agent-unreachable", install) == "fail"
    mounts = {m["mountPath"]: m for m in installer["volumeMounts"]}
    [ds] = find(docs, "DaemonSet", "nodeagent")
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    for flag, host in (("--cni-conf-dir", "/etc/cni/net.d"), ("--cni-bin-dir", "/opt/cni/bin")):
        mount = mounts[_flag(args, flag, install)]
        assert volumes[mount["name"]]["hostPath"]["path"] == host and not mount.get("readOnly")
    assert mounts["/host/usr/bin"]["readOnly"] is True
    [cleanup] = find(rendered("cleanup"), "DaemonSet", "nodeagent-cleanup")
    first = cleanup["spec"]["template"]["spec"]["initContainers"][0]
    assert first["args"] == ["cni", "uninstall"], "the plugin leaves the chain before anything else is removed"


def test_the_ebpf_capture_finds_kubelets_pod_cgroups_and_the_tunnels_own() -> None:
    """The agent looks for pods' cgroups under the host's cgroup v2 root as it mounts it, and the tunnel
    reports its pod UID (the downward API's), by which the agent finds its cgroup for the hook."""
    docs = rendered("replace-kube-proxy")
    agent = container(docs, "nodeagent", "agent")
    root = _flag(agent["args"][1:], "--kubelet-cgroup-root", main.commands["run"])
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    [ds] = find(docs, "DaemonSet", "nodeagent")
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[root]["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    tunnel = container(docs, "nodeagent-ztunnel", "ztunnel")
    [uid] = [e for e in tunnel["env"] if e["name"] == "POD_UID"]
    assert uid["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
