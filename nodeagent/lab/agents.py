"""Running `nodeagent run` on every node of a lab, as the DaemonSet runs it on every node of a cluster.

Each agent runs in its node's network namespace and cgroup under the lab's supervising shim, reads the
lab's API server (see `source_args`), and is recorded with the pods' processes, so `lab down` stops it.
With the mesh, the lab's CA (`nodeagent ca`) runs once for the whole lab in the fabric namespace, on an
address of the node network, as the CA Deployment runs apart from the nodes in a cluster, and
authenticates tunnels as it does in a cluster: a TokenReview, by the lab's API server, of the tunnel's
projected ServiceAccount token. As the tunnel DaemonSet's pods are in a cluster, each node's tunnel is a
Pod object in the API (`nodeagent/ztunnel-<node>`, ServiceAccount `nodeagent-ztunnel`, hostNetwork, so
the lab starts no process and no namespace for it and the mesh ignores it), and, as the kubelet does for
its projected token volume, `lab agents` asks the API server for a token bound to that pod (TokenRequest,
audience `nodeagent-ca`, 3600 s) and writes it to the tunnel's `--ca-token-file`. The token is written
once: a lab's tunnels get certificates for an hour after `lab agents` (the kubelet would rotate it at 80%
of its life; `request_tunnel_tokens` asks again, as a rotation would).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import psutil

from nodeagent.lab import cgroups, processes
from nodeagent.lab import lab as labs
from nodeagent.lab.errors import LabBuildError, LabError
from nodeagent.lab.plan import BRIDGE
from nodeagent.lab.state import Process, locked

AGENT_OWNER = "agent/"
TUNNEL_OWNER = "ztunnel/"
CA_OWNER = "ca"  # `lab status` shows it as ca/nodeagent-ca
CA_PORT = 15012
CA_MONITORING_PORT = 15014
TUNNEL_NAMESPACE = "nodeagent"  # daemonset/base/ztunnel.yaml's namespace and ServiceAccount
TUNNEL_SERVICE_ACCOUNT = "nodeagent-ztunnel"
CA_AUDIENCE = "nodeagent-ca"
TOKEN_SECONDS = 3600  # the projected token's expirationSeconds (daemonset/base/ztunnel.yaml's)


def cluster_cidr(lab: labs.Lab) -> str:
    """The smallest IPv4 network holding every node's pod CIDR (the lab's --cluster-cidr); in a dual-stack lab,
    a comma and the smallest IPv6 network holding their IPv6 pod CIDRs (kube-proxy's --cluster-cidr takes one
    per family)."""
    found = [_covering([node.node.pod_cidr for node in lab.plan.nodes])]
    cidrs6 = [node.node.pod_cidr6 for node in lab.plan.nodes if node.node.pod_cidr6 is not None]
    if cidrs6:
        found.append(_covering(cidrs6))
    return ",".join(found)


def _covering(cidrs: Sequence[IPv4Network] | Sequence[IPv6Network]) -> str:
    net = cidrs[0]
    while not all(c.subnet_of(net) for c in cidrs):  # type: ignore[arg-type]  # one family per call
        net = net.supernet()
    return str(net)


SOURCE_ENV = "NODEAGENT_LAB_AGENT_SOURCE"


def source_args(lab: labs.Lab) -> list[str]:
    """Where agents and tunnels read the cluster: the lab's API server, as on a cluster (its kubeconfig is
    reachable from every node; it serves the resolved manifests and follows their changes). The manifests
    themselves with $NODEAGENT_LAB_AGENT_SOURCE=manifests, or for a lab made before it had an API server."""
    kubeconfig = labs.api_server_dir(lab.record) / "kubeconfig"
    if os.environ.get(SOURCE_ENV) != "manifests" and kubeconfig.exists():
        return ["--kubeconfig", str(kubeconfig)]
    return ["--manifests", str(lab.record.manifests_path.parent)]


def agent_argv(lab: labs.Lab, node: str, mode: str, extra: Sequence[str] = ()) -> list[str]:
    """The command line of the agent on `node`."""
    address = lab.plan.node(node).node.address
    return ["nodeagent", "--log-json", "--log-level", "info", "run", "--mode", mode,
            "--bpf-scope", f"{lab.record.name}-{node}",
            *source_args(lab), "--node", node,
            "--cluster-cidr", cluster_cidr(lab), "--healthz-bind-address", f"{address}:10256",
            "--metrics-bind-address", f"{address}:10249", *extra]


def ca_dir(lab: labs.Lab) -> Path:
    """The lab's mesh CA files (one root for the whole lab, as one cluster has one); only the lab's CA
    process reads the key, the tunnels read root-cert.pem."""
    return lab.record.directory / "ca"


def token_dir(lab: labs.Lab) -> Path:
    """The tunnels' projected ServiceAccount tokens, as the kubelet writes them: <dir>/<node>."""
    return lab.record.directory / "tunnel-tokens"


def token_file(lab: labs.Lab, node: str) -> Path:
    """The token the tunnel of `node` presents to the lab's CA (`--ca-token-file`): bound to its tunnel pod."""
    return token_dir(lab) / node


def tunnel_pod_name(node: str) -> str:
    """The name of the tunnel Pod object of `node` (namespace TUNNEL_NAMESPACE)."""
    return f"ztunnel-{node}"


def api_kubeconfig(lab: labs.Lab) -> Path:
    """The lab API server's kubeconfig (LabError for a lab made before it had an API server)."""
    path = labs.api_server_dir(lab.record) / "kubeconfig"
    if not path.exists():
        raise LabError(f"lab {lab.record.name!r} has no API server kubeconfig, and the mesh's CA needs one (a lab "
                       "made by an older version? `lab down` and `lab up` again)")
    return path


# One request to the lab's API server from inside a namespace of the lab (the only place its address
# exists), with the kubeconfig's CA and token: argv kubeconfig, method, path; the JSON body on stdin.
# Prints {"code": status, "body": parsed answer}.
_API_REQUEST = """
import base64, json, ssl, sys, urllib.error, urllib.request
config = json.load(open(sys.argv[1]))
cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
context = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
data = sys.stdin.read().encode() or None
request = urllib.request.Request(cluster["server"] + sys.argv[3], data=data, method=sys.argv[2],
                                 headers={"Authorization": "Bearer " + user["token"],
                                          "Content-Type": "application/json", "Accept": "application/json"})
try:
    with urllib.request.urlopen(request, context=context, timeout=10) as answer:
        code, body = answer.status, answer.read()
except urllib.error.HTTPError as error:
    code, body = error.code, error.read()
print(json.dumps({"code": code, "body": json.loads(body or b"null")}))
"""


def api_request(lab: labs.Lab, netns: str, method: str, path: str,
                body: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
    """`method path` to the lab's API server from inside `netns`: (status, answer)."""
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _API_REQUEST, str(api_kubeconfig(lab)),
                             method, path], input=json.dumps(body) if body is not None else "", capture_output=True,
                            text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise LabBuildError(f"{method} {path} to the lab's API server from {netns} failed: {result.stderr.strip()}")
    answer = json.loads(result.stdout)
    return int(answer["code"]), answer["body"] or {}


def _api_ok(lab: labs.Lab, netns: str, method: str, path: str, body: dict[str, object] | None = None,
            accept: tuple[int, ...] = ()) -> tuple[int, dict[str, object]]:
    code, answer = api_request(lab, netns, method, path, body)
    if code >= 300 and code not in accept:
        raise LabBuildError(f"{method} {path}: the lab's API server answered {code}: {answer.get('message', answer)}")
    return code, answer


def tunnel_pod(lab: labs.Lab, node: str) -> dict[str, object]:
    """The tunnel Pod object of `node`, as its DaemonSet would make it and its kubelet report it running."""
    address = str(lab.plan.node(node).node.address)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": tunnel_pod_name(node), "namespace": TUNNEL_NAMESPACE,
                         "labels": {"app": "nodeagent-ztunnel"}},
            "spec": {"nodeName": node, "serviceAccountName": TUNNEL_SERVICE_ACCOUNT, "hostNetwork": True,
                     "containers": [{"name": "ztunnel", "command": tunnel_argv(lab, node)}]},
            "status": {"phase": "Running", "hostIP": address, "hostIPs": [{"ip": address}], "podIP": address,
                       "podIPs": [{"ip": address}]}}


def ensure_tunnel_pods(lab: labs.Lab) -> dict[str, str]:
    """Create the tunnel namespace and one tunnel Pod per node in the lab's API server (through the API,
    from the API server's namespace, as kubectl runs; existing ones are kept). Returns each node's pod uid."""
    control = labs.api_server_plan(lab.plan, lab.topology).netns
    _api_ok(lab, control, "POST", "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": TUNNEL_NAMESPACE}}, accept=(409,))
    uids = {}
    for node in lab.plan.nodes:
        name = node.node.name
        path = f"/api/v1/namespaces/{TUNNEL_NAMESPACE}/pods"
        code, pod = _api_ok(lab, control, "POST", path, tunnel_pod(lab, name), accept=(409,))
        if code == 409:  # made by an earlier `lab agents` that failed later on
            _, pod = _api_ok(lab, control, "GET", f"{path}/{tunnel_pod_name(name)}")
        uids[name] = str(pod["metadata"]["uid"])  # type: ignore[index]
    return uids


def request_tunnel_tokens(lab: labs.Lab, uids: Mapping[str, str] | None = None) -> dict[str, Path]:
    """As each node's kubelet does for a projected token volume: ask the API server (from the node) for a
    token of the tunnel's ServiceAccount bound to the node's tunnel pod (audience nodeagent-ca, 3600 s),
    and write it (mode 0600, replaced atomically) where the tunnel reads it per request. Called again, it
    rotates them. Returns each node's token file."""
    written = {}
    token_dir(lab).mkdir(mode=0o700, parents=True, exist_ok=True)
    for node in lab.plan.nodes:
        name = node.node.name
        ref: dict[str, object] = {"apiVersion": "v1", "kind": "Pod", "name": tunnel_pod_name(name)}
        if uids is not None:
            ref["uid"] = uids[name]
        _, answer = _api_ok(lab, node.netns, "POST", f"/api/v1/namespaces/{TUNNEL_NAMESPACE}/serviceaccounts/"
                            f"{TUNNEL_SERVICE_ACCOUNT}/token",
                            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                             "spec": {"audiences": [CA_AUDIENCE], "expirationSeconds": TOKEN_SECONDS,
                                      "boundObjectRef": ref}})
        path = token_file(lab, name)
        partial = path.with_name(f".{name}.new")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(str(answer["status"]["token"]))  # type: ignore[index]
        os.replace(partial, path)
        written[name] = path
    return written


def ca_address(lab: labs.Lab) -> ipaddress.IPv4Address:
    """Where the lab's CA listens: an address of the node network on the fabric bridge itself, so every node
    reaches it directly and it belongs to no node (as the CA runs apart from the nodes in a cluster). The
    node network's first host, which the lab never gives a node unless a manifest asks for it (then the
    highest host free of nodes and of the lab API server)."""
    taken = {node.node.address for node in lab.plan.nodes} | {lab.topology.api_server_address}
    network = lab.topology.node_cidr
    return next(a for a in (network[1], *reversed(list(network.hosts()))) if a not in taken)


def control_socket(lab: labs.Lab, node: str) -> Path:
    """The control stream between the agent and the tunnel of `node`."""
    return lab.record.directory / f"control.{node}.sock"


def mesh_agent_args(lab: labs.Lab, node: str, capture: bool = True) -> list[str]:
    """The agent flags that (with `capture`) enroll the node's pods: assign them to the tunnel and capture
    their traffic (on the pods' cgroups where the datapath is eBPF: the lab's pod cgroups sit under the
    node's, where agent and tunnel run, in the kubelet's layout, so the agent finds them by pod UID as on a
    real node). The agent holds no CA: the lab's CA is its own process."""
    if not capture:
        return []
    node_cgroup = str(cgroups.path_of(lab.plan.node(node).cgroup))
    return ["--mesh", "--control-socket", str(control_socket(lab, node)), "--netns-dir", "/run/netns",
            "--netns-prefix", f"{lab.record.name}-pod-", "--kubelet-cgroup-root", node_cgroup,
            "--tunnel-cgroup", node_cgroup]


def tunnel_argv(lab: labs.Lab, node: str, capture: bool = True, workers: int = 1) -> list[str]:
    """The command line of the tunnel on `node`: its pods' namespaces are the lab's `<lab>-pod-…`. A lab's
    tunnel runs `workers` processes (`--workers`), one unless asked: the product's default (one per CPU)
    would make every lab on a shared machine a different program from one machine to the next."""
    address = lab.plan.node(node).node.address
    return ["nodeagent", "--log-json", "--log-level", "info", "ztunnel", "--node", node, "--workers", str(workers),
            *source_args(lab),
            "--ca-address", f"{ca_address(lab)}:{CA_PORT}", "--ca-token-file", str(token_file(lab, node)),
            "--ca-root-file", str(ca_dir(lab) / "root-cert.pem"),
            "--netns-dir", "/run/netns", "--netns-prefix", f"{lab.record.name}-pod-",
            "--readiness-address", f"{address}:15021", "--metrics-address", f"{address}:15020",
            *(["--control-socket", str(control_socket(lab, node))] if capture else [])]


def start_agents(name: str, mode: str = "iptables", *, extra: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 timeout: float = 60.0, mesh: bool = False, capture: bool = True, tunnel_workers: int = 1
                 ) -> labs.Lab:
    """Start one agent per node of lab `name` and wait until each has programmed its node once; with
    `mesh`, also one tunnel per node (as the tunnel DaemonSet runs beside the agent's) and wait until it is
    ready and, with `capture`, until the agents have captured every enrolled pod. Without `capture` the
    tunnels serve the enrolled pods on their own and nothing is captured (for tests of the capture
    itself). Each tunnel runs `tunnel_workers` worker processes (1: a single process, no coordinator)."""
    lab = labs.load(name)
    with locked(name):
        if any(p.owner.startswith(AGENT_OWNER) for p in lab.record.processes):
            raise LabError(f"lab {name!r} already runs agents; `nodeagent lab down` and up again to restart them")
        if mesh:
            start_ca(lab, env, timeout)
        started = []
        for node in lab.plan.nodes:
            node_name = node.node.name
            argv = agent_argv(lab, node_name, mode, [*extra, *(mesh_agent_args(lab, node_name, capture)
                                                                 if mesh else [])])
            started.append((node, *spawn_owned(lab, node_name, AGENT_OWNER, "nodeagent", argv, env)))
        tunnels = [(node, *spawn_owned(lab, node.node.name, TUNNEL_OWNER, "ztunnel",
                                  tunnel_argv(lab, node.node.name, capture, tunnel_workers), env))
                   for node in lab.plan.nodes] if mesh else []
    for node, pid, logfile in started:
        _wait_first_sync(node.netns, node.node.address, pid, logfile, timeout)
    for node, pid, logfile in tunnels:
        _wait_ready(node.netns, f"http://{node.node.address}:15021/healthz/ready", pid, logfile, timeout,
                    lambda answer: bool(json.loads(answer).get("ready")), "become ready")
    if mesh and capture:
        _wait_captured(lab, timeout)
    return lab


def enrolled_pods(lab: labs.Lab) -> list[str]:
    """The pods (namespace/name) of the lab that are enrolled in the mesh, as the agents decide it."""
    from nodeagent.state.once import snapshot_of_manifests
    from nodeagent.tunnel.state.workloads import workload_table

    snapshot = snapshot_of_manifests(lab.record.manifests_path.parent, lab.plan.nodes[0].node.name)
    return sorted(w.name for node in lab.plan.nodes
                  for w in workload_table(snapshot, node.node.name).local.values())


def captured(lab: labs.Lab, pod: str) -> bool:
    """Whether `pod` holds a complete capture, iptables in its namespace or eBPF on its cgroup."""
    from nodeagent.mesh.capture import CaptureStatus
    from nodeagent.mesh.iptables.apply import live_state
    from nodeagent.mesh.iptables.render import CaptureOptions

    netns = f"/run/netns/{lab.plan.pod(pod).netns}"
    if any(live_state(netns, backend=b).status is CaptureStatus.INSTALLED for b in ("nft", "legacy")):
        return True
    from nodeagent.kernel.bpf.loader import BpfError
    from nodeagent.mesh.ebpf import programs as bpf_mesh
    from nodeagent.mesh.ebpf.capture import EbpfCapture
    from nodeagent.mesh.ebpf.kubelet import KubeletCgroups

    planned = lab.plan.pod(pod).pod
    node = lab.plan.node(planned.node)
    try:
        with bpf_mesh.load(f"{lab.record.name}-{node.node.name}", compile_if_missing=False) as programs:
            locate = KubeletCgroups(cgroups.path_of(node.cgroup), lambda _n, _p: (planned.uid, planned.qos_class))
            capture = EbpfCapture(programs, locate, "nft")
            return capture.state(netns, CaptureOptions()).status is CaptureStatus.INSTALLED
    except (BpfError, OSError):
        return False  # nothing pinned (yet): not captured with eBPF


def _wait_captured(lab: labs.Lab, timeout: float) -> None:
    """Wait until every enrolled pod's capture is installed (the agent does so once its tunnel serves it)."""
    deadline = time.monotonic() + timeout
    pending = set(enrolled_pods(lab))
    while pending:
        for pod in list(pending):
            if captured(lab, pod):
                pending.discard(pod)
        if pending and time.monotonic() > deadline:
            raise LabBuildError(f"no capture installed within {timeout:.0f} s in {', '.join(sorted(pending))}; "
                                f"see the agents' logs in {lab.record.directory / 'logs'}")
        if pending:
            time.sleep(0.1)  # polling a condition with a deadline


def ca_argv(lab: labs.Lab) -> list[str]:
    """The command line of the lab's CA: the lab's API server for the pods and for TokenReviews of the
    tunnels' tokens (the default authenticator, as in a cluster; reachable from the fabric namespace,
    where the server's address is on the same bridge)."""
    address = ca_address(lab)
    return ["nodeagent", "--log-json", "--log-level", "info", "ca", "--ca-dir", str(ca_dir(lab)),
            "--address", f"{address}:{CA_PORT}", "--monitoring-address", f"{address}:{CA_MONITORING_PORT}",
            "--kubeconfig", str(api_kubeconfig(lab)), "--audience", CA_AUDIENCE,
            "--tunnel-service-account", f"{TUNNEL_NAMESPACE}/{TUNNEL_SERVICE_ACCOUNT}"]


def start_ca(lab: labs.Lab, env: Mapping[str, str] | None, timeout: float) -> int:
    """Start the lab's CA in the fabric namespace (no node's) and wait until it serves; call with the lab
    locked. Made here first: the root and the key only the CA process reads (once), the tunnel pods in the
    API and each tunnel's projected token. Returns the supervising shim's pid; `lab down` stops it with the
    lab's other processes."""
    from nodeagent.ca.identity import CertificateAuthority

    if any(p.owner == CA_OWNER for p in lab.record.processes):
        raise LabError(f"lab {lab.record.name!r} already runs its CA")
    CertificateAuthority.load_or_create(ca_dir(lab))
    request_tunnel_tokens(lab, ensure_tunnel_pods(lab))
    address, fabric = ca_address(lab), lab.plan.fabric_netns
    # The bridge gets an address on the node network, inside the lab's own fabric namespace (never the
    # root namespace); it goes with the namespace at `lab down`.
    subprocess.run(["ip", "-n", fabric, "addr", "replace", f"{address}/{lab.topology.node_cidr.prefixlen}",
                    "dev", BRIDGE], check=True, capture_output=True, text=True, timeout=10)
    relative = f"{lab.plan.cgroup_root}/ca"
    if relative not in lab.record.cgroups:
        lab.record.cgroups.append(relative)
        lab.record.save()
    cgroup = cgroups.create(relative)
    logfile = lab.record.directory / "logs" / "ca.log"
    pid = processes.spawn(fabric, cgroup, ca_argv(lab), {"NODEAGENT_LAB": lab.record.name, **(env or {})}, logfile)
    lab.record.processes.append(Process(owner=CA_OWNER, container="nodeagent-ca", pid=pid, log=str(logfile)))
    lab.record.save()
    _wait_ready(fabric, f"http://{address}:{CA_MONITORING_PORT}/ready", pid, logfile, timeout,
                lambda answer: bool(json.loads(answer).get("ready")), "become ready (the CA)")
    return pid


def spawn_owned(lab: labs.Lab, node: str, owner: str, container: str, argv: list[str],
                env: Mapping[str, str] | None) -> tuple[int, Path]:
    """Start `argv` in `node`'s namespace and cgroup, recorded as `owner` (so `lab down` stops it); call
    with the lab locked. Returns the supervising shim's pid and the log file."""
    plan = lab.plan.node(node)
    logfile = lab.record.directory / "logs" / f"{owner.rstrip('/')}.{node}.log"
    pid = processes.spawn(plan.netns, cgroups.path_of(plan.cgroup), argv,
                          {"NODE_NAME": node, "NODEAGENT_LAB": lab.record.name, **(env or {})}, logfile)
    lab.record.processes.append(Process(owner=owner + node, container=container, pid=pid, log=str(logfile)))
    lab.record.save()
    return pid, logfile


def _wait_first_sync(netns: str, address: ipaddress.IPv4Address, pid: int, logfile: Path, timeout: float) -> None:
    """Poll the agent's /healthz (from inside the node) until it reports a completed sync."""
    _wait_ready(netns, f"http://{address}:10256/healthz", pid, logfile, timeout,
                lambda answer: bool(json.loads(answer).get("status")), "complete a sync")  # a synced family


def _wait_ready(netns: str, url: str, pid: int, logfile: Path, timeout: float, ok: Callable[[str], bool],
                what: str) -> None:
    """Poll `url` from inside the node until `ok(body)`; an HTTP error status still carries a body."""
    deadline = time.monotonic() + timeout
    probe = ["ip", "netns", "exec", netns, "python3", "-c",
             "import sys,urllib.request,urllib.error\n"
             "try: print(urllib.request.urlopen(sys.argv[1],timeout=2).read().decode())\n"
             "except urllib.error.HTTPError as e: print(e.read().decode())", url]
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise LabBuildError(f"the process {pid} in {netns} exited; its log: {logfile}")
        result = subprocess.run(probe, capture_output=True, text=True, timeout=10, check=False)
        if result.returncode == 0 and result.stdout.strip() and ok(result.stdout):
            return
        time.sleep(0.1)  # polling a condition with a deadline
    raise LabBuildError(f"the process {pid} in {netns} did not {what} within {timeout:.0f} s; its log: {logfile}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
