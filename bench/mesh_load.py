"""New-connection load through two node tunnels with one endpoint failing: "1,000 connections/s
held for 60 s through two tunnels with one endpoint failing: zero failed client connections, p99 connect
latency".

The run builds its own lab (the default manifests plus a Service `demo/load` whose endpoints are all on
node2: --endpoints echo pods and one pod with no listener on the target port, the failing endpoint), starts
an agent and a tunnel per node (`start_agents(mesh=True)`) and removes the lab afterwards. The load runs
inside the client pod (its netns and cgroup): an open-loop schedule of new connections at --rate per second
for --seconds (connection k starts at k/rate whatever happened to the others; --workers processes share
the schedule), each sending a line and reading the JSON line the echo answers, then closing. Recorded per
connection: success or failure, connect latency (as the client sees it: with capture this is the connect to
the tunnel's local 15001 listener), time to first response byte (includes the tunnel's endpoint choice,
retries, HBONE stream setup and the far side's connect), and lateness versus the schedule.

Phases of one run, in order:
  reference  no capture: the agent's service datapath alone (DNAT to a random endpoint, the failing one
             included, so some of its connections are refused; nothing retries);
  mesh       the client pod's Service-range traffic captured into its tunnel (one REDIRECT to 15001, as
             tests/integration/test_tunnel_balancing.py): node1's tunnel retries the failing endpoint on
             another and ejects it, HBONE to node2's tunnel, which connects to the pod;
  step-down  (when the mesh phase is not sustained) --step-seconds mesh phases from 95% of what it achieved
             down by x0.8 until one is sustained, bisecting back up ("step-up"), then that rate held
             for --seconds ("confirm"; x0.8 once more if it does not hold);
  profile    (with py-spy) a --profile-seconds mesh phase at the sustained rate (else --rate) while py-spy
             samples both tunnels: busy share, self time by frame and file, inclusive time by file.
Sustained means: no failed connection, completions >= 98% of the schedule's rate, p99 time to first byte
<= --slo-ms, schedule lateness p99 <= 100 ms. Reported per phase: achieved rate, failures by kind,
p50/p99/max of connect, first byte and lateness, CPU (vCPU) of each tunnel, agent, the load generator and
the echo pods, the rest of the machine (other users, unattributed kernel work), the tunnels' peak RSS and
CPU ms per connection, and from node1's tunnel metrics the retries,
ejections, breaker refusals and connections by response flag. `uptime` load before and after (the machine
is shared). Every pod netns taking part gets tcp_tw_reuse=1 and ports 10000-65000: 60,000 connections a
minute to one address outrun 28,000 ephemeral ports in TIME_WAIT otherwise.

    sudo .venv/bin/python bench/mesh_load.py                 (full: 1,000/s for 60 s; 4-10 min)
    sudo .venv/bin/python bench/mesh_load.py --quick --json  (smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "load"
TARGET_PORT = 8080
CAPTURE = ["OUTPUT", "-p", "tcp", "-d", "10.96.0.0/12", "-m", "mark", "!", "--mark", "0x539", "-j", "REDIRECT",
           "--to-ports", "15001"]
FAIL = "!"  # outcome prefix of a failed connection (the rest names the error)

# ---------------------------------------------------------------------------------------------------------
# The load generator (runs inside the client pod: `mesh_load.py --generate HOST:PORT ...`). Kept free of
# the project's imports so it starts fast and costs the same in every phase.


class _Probe(asyncio.Protocol):
    """One connection of the load: sends a line once connected, is done at the end of the answer line."""

    def __init__(self, gen: _Generator, k: int, due: int, started: int) -> None:
        self.gen, self.k, self.due, self.started = gen, k, due, started
        self.connected = self.first = 0
        self.buffer = b""
        self.finished = False
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer = asyncio.get_running_loop().call_later(gen.timeout, self.expire)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport.write(b"ping\n")

    def data_received(self, data: bytes) -> None:
        if not self.first:
            self.first = time.monotonic_ns()
        self.buffer += data
        if b"\n" in self.buffer:
            try:
                pod = str(json.loads(self.buffer.split(b"\n", 1)[0])["pod"]).rsplit("/", 1)[-1]
            except (ValueError, KeyError, TypeError):
                pod = FAIL + "BadAnswer"
            self.finish(pod)
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish(FAIL + (type(exc).__name__ if exc else "ClosedBeforeAnswer"))

    def expire(self, outcome: str = FAIL + "Timeout") -> None:
        """The per-connection timeout: recorded as a failure, the connection (or its connect) abandoned."""
        if self.finished:
            return
        self.finish(outcome)
        if self.transport is not None:
            self.transport.abort()
        elif self.task is not None:
            self.task.cancel()

    def finish(self, outcome: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.timer.cancel()
        now = time.monotonic_ns()
        us = 1000

        def since(t: int) -> int:
            return (t - self.started) // us if t else -1

        self.gen.record(self, (self.k, (self.started - self.due) // us, since(self.connected), since(self.first),
                         (now - self.started) // us, outcome))


@dataclass
class _Generator:
    host: str
    port: int
    timeout: float
    records: list[tuple[int, int, int, int, int, str]] = field(default_factory=list)
    open: set[_Probe] = field(default_factory=set)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, probe: _Probe, record: tuple[int, int, int, int, int, str]) -> None:
        self.records.append(record)
        self.open.discard(probe)
        if not self.open:
            self.idle.set()

    def start(self, k: int, due: int) -> None:
        """Open connection k of the schedule (due at monotonic `due` ns); its outcome ends in `records`."""
        probe = _Probe(self, k, due, time.monotonic_ns())
        self.open.add(probe)
        self.idle.clear()
        probe.task = asyncio.get_running_loop().create_task(self._connect(probe))

    async def _connect(self, probe: _Probe) -> None:
        loop = asyncio.get_running_loop()
        sock = None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, (self.host, self.port))
            probe.connected = time.monotonic_ns()
            await loop.create_connection(lambda: probe, sock=sock)
        except OSError as exc:
            if sock is not None:
                sock.close()
            probe.finish(FAIL + type(exc).__name__)
        except asyncio.CancelledError:
            if sock is not None:
                sock.close()  # expired while connecting: already recorded


async def generate(host: str, port: int, rate: float, seconds: float, worker: int, workers: int, start: int,
                   timeout: float) -> dict[str, Any]:
    """Open connections k = worker, worker+workers, ... at monotonic `start` + k/rate (ns); wait for all."""
    gen = _Generator(host, port, timeout)
    step = 1e9 / rate
    total = int(rate * seconds)
    k = worker
    while k < total:
        now = time.monotonic_ns()
        while k < total and (due := start + int(k * step)) <= now:
            gen.start(k, due)
            k += workers
        if k < total:
            await asyncio.sleep((start + int(k * step) - time.monotonic_ns()) / 1e9)
    unfinished = 0
    if gen.open:
        try:
            await asyncio.wait_for(gen.idle.wait(), timeout + 5)
        except TimeoutError:  # timers late on a starved loop: whatever is still open failed
            unfinished = len(gen.open)
            for probe in list(gen.open):
                probe.expire(FAIL + "Unfinished")
    return {"worker": worker, "records": gen.records, "unfinished": unfinished}


def generate_main(args: argparse.Namespace) -> None:
    """`--generate`: say ready, read the common start time (monotonic ns) from stdin, run, print the records."""
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run  # type: ignore[assignment]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # an overloaded path holds thousands open
    host, _, port = args.generate.rpartition(":")
    print("ready", flush=True)
    start = int(sys.stdin.readline())
    report = run(generate(host, int(port), args.rate, args.seconds, args.worker, args.workers, start, args.timeout))
    # The event loop leaves the standard output non-blocking (libuv sets O_NONBLOCK on the descriptors it
    # touches): the report, larger than the pipe, was cut at 64 or 128 KiB and failed to parse.
    os.set_blocking(sys.stdout.fileno(), True)
    print(json.dumps(report), flush=True)


# ---------------------------------------------------------------------------------------------------------
# The run: lab, phases, measures.


def extra_manifests(endpoints: int) -> list[dict[str, Any]]:
    """Service demo/load on node2 only: `endpoints` echo pods and one pod with no listener (`load-dead`)."""
    def pod(name: str, command: list[str], ports: bool) -> dict[str, Any]:
        container: dict[str, Any] = {"name": "main", "command": command}
        if ports:
            container["ports"] = [{"containerPort": TARGET_PORT, "protocol": "TCP"}]
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "demo", "labels": {"app": SERVICE}},
                "spec": {"nodeName": "node2", "serviceAccountName": "echo", "containers": [container]}}

    return [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": SERVICE, "namespace": "demo"},
             "spec": {"selector": {"app": SERVICE},
                      "ports": [{"name": "tcp", "port": 80, "targetPort": TARGET_PORT, "protocol": "TCP"}]}},
            *(pod(f"load-{i}", ["nodeagent", "workload", "serve", "--port", str(TARGET_PORT)], True)
              for i in range(endpoints)),
            pod("load-dead", ["nodeagent", "workload", "idle"], False)]  # nothing listens on 8080 here


def netns_run(netns: str, *argv: str) -> str:
    """Run `argv` inside the lab namespace `netns` (never the root namespace)."""
    return subprocess.run(["ip", "netns", "exec", netns, *argv], check=True, capture_output=True, text=True,
                          timeout=60).stdout


def listen_drops(netns: str) -> int:
    """TcpExt ListenDrops of `netns` (SYNs and handshakes dropped at a full accept queue, overflows included):
    each costs the client a retransmitted SYN, 1 s then 3 s, which is what a connect tail of seconds is."""
    lines = [line.split() for line in netns_run(netns, "cat", "/proc/net/netstat").splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names and names[0] == "TcpExt:":
            return int(dict(zip(names[1:], values[1:], strict=True)).get("ListenDrops", 0))
    return 0


Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def tunnel_metrics(lab: Any, node: str) -> Metrics:
    """The tunnel's /metrics on `node`, read from inside the node: (sample, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    address = lab.plan.node(node).node.address
    text = netns_run(lab.plan.node(node).netns, sys.executable, "-c", "import sys,urllib.request;sys.stdout.write("
                     f"urllib.request.urlopen('http://{address}:15020/metrics',timeout=5).read().decode())")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_delta(before: Metrics, after: Metrics, name: str, by: str | None = None, **labels: str
                 ) -> float | dict[str, float]:
    """after - before of the samples `name` whose labels include `labels`; per value of label `by` if given."""
    sums: dict[str, float] = {}
    for values, sign in ((after, 1), (before, -1)):
        for (n, ls), v in values.items():
            d = dict(ls)
            if n == name and labels.items() <= d.items():
                key = d.get(by, "") if by else ""
                sums[key] = sums.get(key, 0.0) + sign * v
    if by is None:
        return sums.get("", 0.0)
    return {key: value for key, value in sorted(sums.items()) if value}


@dataclass
class Rig:
    """The lab and what the phases measure: tunnel and agent processes (pid by node), pod cgroups."""

    lab: Any
    scratch: Path
    tunnels: dict[str, int] = field(default_factory=dict)
    agents: dict[str, int] = field(default_factory=dict)
    generators: list[subprocess.Popen[str]] = field(default_factory=list)
    idle_vcpu: dict[str, float] = field(default_factory=dict)  # each tunnel's CPU with no load

    def pod(self, name: str) -> Any:
        return self.lab.plan.pod(f"demo/{name}")

    def cgroup(self, name: str) -> Path:
        from nodeagent.lab import cgroups

        return cgroups.path_of(self.pod(name).cgroup)

    def load_pods(self) -> list[str]:
        return sorted(p.pod.name for p in self.lab.plan.pods if p.pod.name.startswith("load-"))

    def stop_generators(self) -> None:
        for child in self.generators:
            if child.poll() is None:
                child.kill()
            child.wait()
        self.generators.clear()


def find_processes(lab: Any) -> tuple[dict[str, int], dict[str, int]]:
    """(tunnel pid by node, agent pid by node): the commands the lab's supervising shims run."""
    import psutil

    from nodeagent.lab.agents import AGENT_OWNER, TUNNEL_OWNER

    found: dict[str, dict[str, int]] = {AGENT_OWNER: {}, TUNNEL_OWNER: {}}
    for process in lab.record.processes:
        for owner, pids in found.items():
            if process.owner.startswith(owner):
                children = psutil.Process(process.pid).children()
                if len(children) != 1:
                    raise RuntimeError(f"{process.owner}: the shim {process.pid} runs {len(children)} processes")
                pids[process.owner[len(owner):]] = children[0].pid
    for owner, pids in found.items():
        if sorted(pids) != ["node1", "node2"]:
            raise RuntimeError(f"the lab's {owner.rstrip('/')} processes are {pids}, not one per node")
    return found[TUNNEL_OWNER], found[AGENT_OWNER]


@contextlib.contextmanager
def lab_up(scratch: Path, endpoints: int, mode: str, keep_logs: Path | None = None) -> Iterator[Rig]:
    """The lab with agents and tunnels; always removed afterwards (generators first: they are in a pod cgroup)."""
    import yaml

    from nodeagent.lab import lab as labs
    from nodeagent.lab.agents import start_agents
    from nodeagent.lab.errors import LabError
    from nodeagent.lab.manifests import load_default

    directory = scratch / "manifests"
    directory.mkdir()
    documents = [dict(d.body) for d in load_default()] + extra_manifests(endpoints)
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all(documents))
    name = "ml" + secrets.token_hex(4)
    labs.up(name, directory)
    rig: Rig | None = None
    try:
        # The capture under test is the one REDIRECT of CAPTURE, added for the mesh phase only; where the
        # agents can enroll pods themselves (capture=True), that is turned off so the reference phase and
        # the server pods stay uncaptured.
        options: dict[str, Any] = {"capture": False} if "capture" in inspect.signature(start_agents).parameters else {}
        lab = start_agents(name, mode, mesh=True, **options)
        rig = Rig(lab, scratch)
        rig.tunnels, rig.agents = find_processes(lab)
        for pod in ["client", *rig.load_pods()]:
            netns = rig.pod(pod).netns
            netns_run(netns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")
            netns_run(netns, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65000")
        yield rig
    finally:
        if rig is not None:
            rig.stop_generators()
        if keep_logs is not None:  # the agents' and tunnels' logs (access log lines) outlive the lab
            with contextlib.suppress(OSError, LabError):
                shutil.copytree(labs.load(name).record.directory / "logs", keep_logs / name, dirs_exist_ok=True)
        labs.down(name)


def wait_answering(rig: Rig, target: str, timeout: float = 30.0) -> None:
    """Poll until one connection from the client pod to `target` gets an answer (datapath programmed)."""
    probe = ("import socket,sys\nh,p=sys.argv[1].rsplit(':',1)\ns=socket.create_connection((h,int(p)),timeout=3)\n"
             "s.sendall(b'probe\\n')\nprint(s.recv(4096).decode())")
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(["ip", "netns", "exec", rig.pod("client").netns, sys.executable, "-c", probe, target],
                                capture_output=True, text=True, timeout=30, check=False)
        if result.returncode == 0 and '"pod"' in result.stdout:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target} does not answer from the client pod: {result.stderr[-500:]}")
        time.sleep(0.2)  # polling a condition with a deadline


class Sampler:
    """CPU over a window (tunnels, agents, pod cgroups, the machine) and the tunnels' peak RSS."""

    def __init__(self, rig: Rig) -> None:
        import psutil

        self.rig = rig
        self.procs = {f"tunnel_{n}": psutil.Process(p) for n, p in rig.tunnels.items()}
        self.procs.update({f"agent_{n}": psutil.Process(p) for n, p in rig.agents.items()})
        self.groups = {"load_generator": [rig.cgroup("client")],
                       "echo_pods": [rig.cgroup(p) for p in rig.load_pods()]}
        self.peak_rss = {n: 0.0 for n in rig.tunnels}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample_rss, daemon=True)
        self.began = 0.0
        self.cpu0: dict[str, float] = {}
        self.machine0: Any = None

    def _cpu(self) -> dict[str, float]:
        values = {name: float(sum(p.cpu_times()[:2])) for name, p in self.procs.items()}
        for name, paths in self.groups.items():
            values[name] = sum(_cgroup_usage(path) for path in paths)
        return values

    def _sample_rss(self) -> None:
        while True:
            for node in self.rig.tunnels:
                self.peak_rss[node] = max(self.peak_rss[node], self.procs[f"tunnel_{node}"].memory_info().rss / 2**20)
            if self.stop.wait(0.5):  # the sampling period, not a readiness wait
                return

    def __enter__(self) -> Sampler:
        import psutil

        self.began, self.cpu0, self.machine0 = time.monotonic(), self._cpu(), psutil.cpu_times()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import psutil

        self.stop.set()
        self.thread.join()
        wall = time.monotonic() - self.began
        cpu1, machine1 = self._cpu(), psutil.cpu_times()
        self.vcpu = {name: round((cpu1[name] - self.cpu0[name]) / wall, 3) for name in cpu1}
        busy = [sum(t) - t.idle - t.iowait for t in (self.machine0, machine1)]
        total = sum(machine1) - sum(self.machine0)
        self.vcpu["machine_busy"] = round((busy[1] - busy[0]) / total * (os.cpu_count() or 1), 3)
        # other users of the machine, and kernel work (softirq) not charged to the processes above
        self.vcpu["rest"] = round(self.vcpu["machine_busy"] - sum(v for k, v in self.vcpu.items()
                                                                   if k != "machine_busy"), 3)
        self.rss_mb = {node: round(value, 1) for node, value in self.peak_rss.items()}


def _cgroup_usage(path: Path) -> float:
    for line in (path / "cpu.stat").read_text().splitlines():
        if line.startswith("usage_usec "):
            return int(line.split()[1]) / 1e6
    return 0.0


def run_load(rig: Rig, rate: float, seconds: float, workers: int, timeout: float) -> list[list[Any]]:
    """The records of one open-loop run from the client pod to the Service (all workers merged)."""
    from nodeagent.lab import processes

    target = f"{rig.lab.cluster_ip(SERVICE)}:80"
    for worker in range(workers):
        argv = processes.enter_argv(rig.pod("client").netns, rig.cgroup("client"), [
            sys.executable, str(Path(__file__).resolve()), "--generate", target, "--rate", str(rate), "--seconds",
            str(seconds), "--worker", str(worker), "--workers", str(workers), "--timeout", str(timeout)])
        rig.generators.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                               env=processes.child_env({})))
    try:
        for child in rig.generators:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("a load generator did not start")
        start = time.monotonic_ns() + 200_000_000
        for child in rig.generators:
            assert child.stdin is not None
            child.stdin.write(f"{start}\n")
            child.stdin.flush()
        records: list[list[Any]] = []
        for child in rig.generators:
            out, _ = child.communicate(timeout=seconds + timeout + 60)
            if child.returncode != 0:
                raise RuntimeError(f"a load generator exited with {child.returncode}")
            records.extend(json.loads(out.splitlines()[-1])["records"])
        return records
    finally:
        rig.stop_generators()


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p99/max in ms of `values` given in µs (empty: {})."""
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 2)

    return {"p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1] / 1000, 2)}


def summarize(records: list[list[Any]], rate: float, seconds: float, slo_ms: float) -> dict[str, Any]:
    """Achieved rate, failures, latency percentiles, per-second failures and p99 first byte of one run."""
    ok = [r for r in records if not r[5].startswith(FAIL)]
    failed = [r for r in records if r[5].startswith(FAIL)]
    span = max((r[0] / rate + (r[1] + r[4]) / 1e6 for r in records), default=seconds)
    achieved = round(len(ok) / max(span, seconds), 1)
    buckets: dict[int, list[float]] = {}
    for r in ok:
        buckets.setdefault(int(r[0] / rate), []).append(r[3])
    per_second_p99 = [percentiles(buckets.get(s, [])).get("p99", 0.0) for s in range(int(seconds))]
    failures_at = Counter(int(r[0] / rate) for r in failed)
    summary: dict[str, Any] = {
        "rate": rate, "seconds": seconds, "scheduled": int(rate * seconds), "completed": len(records),
        "ok": len(ok), "achieved_rate": achieved, "completed_rate": round(len(records) / max(span, seconds), 1),
        "failures": len(failed),
        "failures_by_kind": dict(Counter(r[5][1:] for r in failed)),
        "failures_by_second": {str(s): n for s, n in sorted(failures_at.items())},
        "connect_ms": percentiles([r[2] for r in ok]), "first_byte_ms": percentiles([r[3] for r in ok]),
        "total_ms": percentiles([r[4] for r in ok]), "lateness_ms": percentiles([r[1] for r in records]),
        "first_byte_p99_ms_by_second": per_second_p99, "answered_by": dict(sorted(Counter(r[5] for r in ok).items())),
    }
    summary["sustained"] = bool(
        len(records) == summary["scheduled"] and not failed and achieved >= 0.98 * rate
        and summary["first_byte_ms"].get("p99", 1e9) <= slo_ms and summary["lateness_ms"].get("p99", 1e9) <= 100)
    return summary


def idle_vcpu(rig: Rig, seconds: float = 3.0) -> dict[str, float]:
    """Each tunnel's vCPU over `seconds` with no load (its reconcile and renewal passes)."""
    import psutil

    procs = {node: psutil.Process(pid) for node, pid in rig.tunnels.items()}
    cpu0, t0 = {n: sum(p.cpu_times()[:2]) for n, p in procs.items()}, time.monotonic()
    time.sleep(seconds)  # the measured window
    return {n: round((sum(p.cpu_times()[:2]) - cpu0[n]) / (time.monotonic() - t0), 4) for n, p in procs.items()}


def wait_quiet(rig: Rig, timeout: float = 90.0) -> float:
    """Poll until both tunnels are near idle (< 0.05 vCPU over 0.5 s): an overloaded run leaves a backlog
    that would otherwise be charged to the next phase."""
    import psutil

    procs = [psutil.Process(pid) for pid in rig.tunnels.values()]
    began = time.monotonic()
    deadline = began + timeout
    while True:
        cpu0, t0 = [sum(p.cpu_times()[:2]) for p in procs], time.monotonic()
        time.sleep(0.5)  # the measuring interval of the condition polled
        used = [sum(p.cpu_times()[:2]) - c for p, c in zip(procs, cpu0, strict=True)]
        if max(used) / (time.monotonic() - t0) < 0.05:
            return round(time.monotonic() - began, 1)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the tunnels are still busy {timeout:.0f} s after the last run (used {used} s)")


def phase(rig: Rig, name: str, rate: float, seconds: float, args: argparse.Namespace) -> dict[str, Any]:
    """One load run with its CPU, RSS and tunnel metric deltas."""
    quiet_after = wait_quiet(rig)
    before = tunnel_metrics(rig.lab, "node1")  # the client side: where retries and ejections happen
    accept_queues = {"client_pod": [rig.pod("client").netns], "echo_pods": [rig.pod(p).netns for p in rig.load_pods()]}
    drops = {k: sum(listen_drops(ns) for ns in spaces) for k, spaces in accept_queues.items()}
    with Sampler(rig) as sampler:
        records = run_load(rig, rate, seconds, args.workers, args.timeout)
    after = tunnel_metrics(rig.lab, "node1")
    drops = {k: sum(listen_drops(ns) for ns in spaces) - drops[k] for k, spaces in accept_queues.items()}
    service = f"demo/{SERVICE}"
    report = {"phase": name, "waited_for_quiet_s": quiet_after, **summarize(records, rate, seconds, args.slo_ms),
              "vcpu": sampler.vcpu, "tunnel_rss_mb": sampler.rss_mb, "listen_drops": drops}
    b1, a1 = before, after
    report["tunnel_cpu_ms_per_connection"] = {  # above idle, per answered connection
        node: round((sampler.vcpu[f"tunnel_{node}"] - rig.idle_vcpu.get(node, 0.0)) / report["achieved_rate"] * 1000, 3)
        if report["achieved_rate"] and name != "reference" else None for node in rig.tunnels}
    report["tunnel_metrics"] = {
        "retries": metric_delta(b1, a1, "nodeagent_tunnel_connect_retries_total", destination_service=service),
        "ejections": metric_delta(b1, a1, "nodeagent_tunnel_outlier_ejections_total", destination_service=service),
        "breaker_rejections": metric_delta(b1, a1, "nodeagent_tunnel_circuit_breaker_rejections_total",
                                           destination_service=service),
        "opened_node1": metric_delta(b1, a1, "istio_tcp_connections_opened_total", destination_service=service),
        "closed_node1_by_flags": metric_delta(b1, a1, "istio_tcp_connections_closed_total", "response_flags",
                                              destination_service=service),
    }
    print(f"  {name}: {rate:g}/s x {seconds:g} s -> {report['achieved_rate']}/s, {report['failures']} failed, "
          f"first byte p99 {report['first_byte_ms'].get('p99')} ms, sustained {report['sustained']}",
          file=sys.stderr, flush=True)
    return report


def profile(rig: Rig, rate: float, seconds: float, args: argparse.Namespace, py_spy: str) -> dict[str, Any]:
    """py-spy samples of both tunnels during a mesh run at `rate`: busy share and the top frames and files."""
    outputs = {node: rig.scratch / f"profile-{node}.txt" for node in rig.tunnels}
    spies = [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate",
                               "97", "--nonblocking", "--format", "raw", "--output", str(outputs[node])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for node, pid in rig.tunnels.items()]
    try:
        load = phase(rig, "profile", rate, seconds + 2, args)
    finally:
        for spy in spies:
            spy.wait(timeout=seconds + 60)
    result: dict[str, Any] = {"rate": rate, "seconds": seconds, "load": {k: load[k] for k in (
        "achieved_rate", "failures", "first_byte_ms")}}
    for node, path in outputs.items():
        result[node] = summarize_stacks(path.read_text() if path.exists() else "", seconds * 97)
    return result


def summarize_stacks(raw: str, possible: float, top: int = 12) -> dict[str, Any]:
    """From py-spy's collapsed stacks: busy share, and the share of samples by innermost frame and by file
    (self time) and by file anywhere on the stack (inclusive)."""
    by_frame: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        by_frame[_short(frames[-1], with_function=True)] += count
        by_file[_short(frames[-1])] += count
        for file in {_short(f) for f in frames}:
            inclusive[file] += count

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {k: round(v / samples, 3) for k, v in counter.most_common(top)} if samples else {}

    # The entry point and the event loop's frames are on (nearly) every stack of the main thread: not news.
    root = max(inclusive.values(), default=0)
    inclusive = Counter({k: v for k, v in inclusive.items() if v < 0.8 * root})

    return {"samples": samples, "busy_share": round(samples / possible, 3) if possible else 0.0,
            "self_by_frame": shares(by_frame), "self_by_file": shares(by_file), "inclusive_by_file": shares(inclusive)}


def _short(frame: str, with_function: bool = False) -> str:
    """`function (path/to/site-packages/pkg/mod.py:12)` -> `pkg/mod.py` (or `function pkg/mod.py`)."""
    function, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{function} {path}" if with_function else path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the lab, run the phases (module doc), remove the lab; the report."""
    load_before = os.getloadavg()
    report: dict[str, Any] = {"cpus": os.cpu_count(), "mode": args.mode, "endpoints": args.endpoints,
                              "workers": args.workers, "slo_ms": args.slo_ms, "phases": []}
    report["commit"] = _git("rev-parse", "--short", "HEAD")
    report["uncommitted_nodeagent_files"] = len(_git("status", "--porcelain", "--", "nodeagent").splitlines())
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    with tempfile.TemporaryDirectory(prefix="mesh-load-") as scratch, lab_up(Path(scratch), args.endpoints,
                                                                               args.mode, args.keep_logs) as rig:
        target = f"{rig.lab.cluster_ip(SERVICE)}:80"
        client = rig.pod("client").netns
        report["idle_rss_mb"] = {n: round(_rss_mb(p), 1) for n, p in rig.tunnels.items()}
        report["idle_vcpu"] = rig.idle_vcpu = idle_vcpu(rig)
        wait_answering(rig, target)
        report["phases"].append(phase(rig, "reference", args.rate, args.seconds, args))
        netns_run(client, "iptables", "-t", "nat", "-A", *CAPTURE)
        wait_answering(rig, target)
        mesh = phase(rig, "mesh", args.rate, args.seconds, args)
        report["phases"].append(mesh)
        sustained_rate = args.rate if mesh["sustained"] else None
        if args.step_down and sustained_rate is None:
            sustained_rate = step_down(rig, report["phases"], mesh["achieved_rate"], args)
            if sustained_rate is not None and args.seconds > args.step_seconds:
                # The short steps' answer must hold for the full --seconds too (or x0.8 of it must).
                for candidate in (sustained_rate, float(round(sustained_rate * 0.8, -1))):
                    confirm = phase(rig, "confirm", candidate, args.seconds, args)
                    report["phases"].append(confirm)
                    if confirm["sustained"]:
                        sustained_rate = candidate
                        break
                else:
                    sustained_rate = None
        report["sustained_rate"] = sustained_rate
        if args.profile and py_spy:
            report["profile"] = profile(rig, sustained_rate or args.rate, args.profile_seconds, args, py_spy)
        elif args.profile:
            report["profile"] = {"skipped": "py-spy not found (pip install py-spy, for measurement only)"}
    report["loadavg"] = {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]}
    return report


def step_down(rig: Rig, phases: list[dict[str, Any]], achieved: float, args: argparse.Namespace) -> float | None:
    """The highest sustained rate found by --step-seconds mesh runs: from 95% of what the failed run achieved
    (at most 80% of its rate) down by x0.8, then bisecting back up towards the last failure."""
    failed_at = args.rate
    rate = round(min(args.rate * 0.8, max(achieved * 0.95, args.rate * 0.05)), -1) or 10.0
    while rate >= args.rate * 0.02:
        step = phase(rig, "step-down", rate, args.step_seconds, args)
        phases.append(step)
        if step["sustained"]:
            break
        failed_at, rate = rate, round(rate * 0.8, -1) or 10.0
    else:
        return None
    for _ in range(4):  # bisect between the sustained and the failed rate, to within 15%
        middle = float(round((rate + failed_at) / 2, -1))
        if failed_at - rate <= 0.15 * rate or not rate < middle < failed_at:
            break
        step = phase(rig, "step-up", middle, args.step_seconds, args)
        phases.append(step)
        rate, failed_at = (middle, failed_at) if step["sustained"] else (rate, middle)
    return rate


def _git(*argv: str) -> str:
    result = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
    return result.stdout.strip()


def _rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


def print_table(report: dict[str, Any]) -> None:
    """The report as a readable table."""
    print(f"loadavg before {report['loadavg']['before']}, after {report['loadavg']['after']} ({report['cpus']} CPUs);"
          f" agents in {report['mode']} mode; Service demo/{SERVICE}: {report['endpoints']} echo pods + 1 failing, "
          f"all on node2; tunnels idle: {report['idle_rss_mb']} MB, {report['idle_vcpu']} vCPU")
    print(f"{'phase':10} {'rate':>5} {'s':>3} {'answered':>8} {'fail':>5} {'connect p50/p99/max ms':>22} "
          f"{'first byte p50/p99/max ms':>25} {'late p99':>8} {'retry':>5} {'eject':>5} {'SYN drop cli/echo':>17}")
    for p in report["phases"]:
        c, f, m, d = p["connect_ms"], p["first_byte_ms"], p["tunnel_metrics"], p["listen_drops"]
        print(f"{p['phase']:10} {p['rate']:5g} {p['seconds']:3g} {p['achieved_rate']:8g} {p['failures']:5d} "
              f"{c.get('p50', 0):6.2f}/{c.get('p99', 0):6.1f}/{c.get('max', 0):8.1f} "
              f"{f.get('p50', 0):7.2f}/{f.get('p99', 0):7.1f}/{f.get('max', 0):8.1f} "
              f"{p['lateness_ms'].get('p99', 0):8.1f} {m['retries']:5g} {m['ejections']:5g} "
              f"{d['client_pod']:8d}/{d['echo_pods']:<8d}")
    print(f"{'phase':10} {'vCPU: tunnel n1':>15} {'n2':>6} {'agents':>6} {'loadgen':>7} {'echo':>6} {'rest':>5} "
          f"{'machine':>7}  {'CPU ms/conn n1/n2':>17}  {'peak RSS MB n1/n2':>17}  failures")
    for p in report["phases"]:
        v, per, rss = p["vcpu"], p["tunnel_cpu_ms_per_connection"], p["tunnel_rss_mb"]
        print(f"{p['phase']:10} {v['tunnel_node1']:15.3f} {v['tunnel_node2']:6.3f} "
              f"{v['agent_node1'] + v['agent_node2']:6.3f} {v['load_generator']:7.3f} {v['echo_pods']:6.3f} "
              f"{v['rest']:5.2f} {v['machine_busy']:7.2f}  {per['node1'] or 0:8.2f}/{per['node2'] or 0:<8.2f}  "
              f"{rss['node1']:8.1f}/{rss['node2']:<8.1f}  {p['failures_by_kind'] or '-'}")
    print(f"sustained through both tunnels: {report['sustained_rate']}/s (no failure, >= 98% of the rate, "
          f"first byte p99 <= {report['slo_ms']:g} ms, lateness p99 <= 100 ms)")
    prof = report.get("profile")
    if prof and "skipped" not in prof:
        for node in ("node1", "node2"):
            s = prof[node]
            print(f"py-spy {node} at {prof['rate']:g}/s: busy {s['busy_share']:.0%}; self by file: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in list(s["self_by_file"].items())[:8]))
            print("    self by frame: " + ", ".join(f"{k} {v:.0%}" for k, v in list(s["self_by_frame"].items())[:6]))
    elif prof:
        print(f"profile: {prof['skipped']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="new connections per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the reference and mesh runs")
    parser.add_argument("--endpoints", type=int, default=3, help="healthy echo pods behind the Service")
    parser.add_argument("--mode", default="iptables", choices=["iptables", "ebpf"], help="the agents' datapath")
    parser.add_argument("--workers", type=int, default=1, help="load generator processes sharing the schedule")
    parser.add_argument("--timeout", type=float, default=15.0, help="per-connection timeout (s)")
    parser.add_argument("--slo-ms", type=float, default=1000.0, help="p99 time to first byte a sustained rate keeps")
    parser.add_argument("--no-step-down", dest="step_down", action="store_false",
                        help="do not look for a sustained rate when the mesh phase is not sustained")
    parser.add_argument("--step-seconds", type=float, default=20.0, help="length of each step-down run")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the py-spy phase")
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the lab's logs here before removing it")
    parser.add_argument("--quick", action="store_true", help="3 s at 50/s, no step-down or profile")
    parser.add_argument("--json", action="store_true", help="the report as one JSON line")
    parser.add_argument("--generate", metavar="HOST:PORT", help=argparse.SUPPRESS)  # inside the client pod
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate_main(args)
        return
    if args.quick:
        args.rate, args.seconds, args.step_down, args.profile = 50.0, 3.0, False, False
    if args.rate <= 0 or args.seconds <= 0 or args.workers < 1 or args.endpoints < 1:
        parser.error("--rate, --seconds, --workers and --endpoints must be positive")
    if os.geteuid() != 0:
        parser.error("the benchmark builds a lab (network namespaces, cgroups): run it as root")
    sys.path.insert(0, str(ROOT))
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
