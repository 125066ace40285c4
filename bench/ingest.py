"""Ingest benchmark (issues 4 and 18): N Services with one EndpointSlice each, served over HTTPS with a bearer
token by the lab's own Kubernetes API server (nodeagent.lab.apiserver, via `python -m tests.support.fakeapi --tls`).

Part 1, the agent's discovery and state half in this process (Kubernetes source -> change tracker -> snapshot):
- time to the first snapshot: from starting the source until every kind is listed and the first
  snapshot is built (HTTPS list pages, JSON, decoding, validation, translation); the reference, in the
  same run against the same server: a bare paged list of Services and EndpointSlices over HTTPS with
  `http.client` and `json.loads` (what any client pays before doing anything with the objects);
- change -> snapshot: EndpointSlices are replaced on the server (HTTP PUT) ON A SCHEDULE (open loop,
  --rate per second, independent of when earlier changes were seen: no coordinated omission) and the
  clock stops when the snapshot holding each change is built. The sync rate limiter is left out (the
  snapshot is taken as soon as the tracker says it is pending). Reported from the agent's receipt of
  the event (the source hands the decoded event to the tracker -> snapshot built; the goal's measure)
  and end to end (the change's scheduled send time -> snapshot; includes the API server and the watch);
- RSS of this process (the agent's half) after the first snapshot and at the end.

Part 2 (root; --agent, on by default as root), the WHOLE agent: `nodeagent run --mode iptables --kubeconfig K
--node node1` as its own process in a throw-away network namespace (`ip netns add`, removed at the end),
reading a second API server started inside that namespace on its loopback; its RSS is sampled with psutil
(and the kernel's high-water mark, VmHWM) from start, through the first full iptables sync, then for a
steady window with scheduled endpoint changes and at least one periodic full resync.

The API servers run in their own processes, so their memory and CPU are not counted.

    .venv/bin/python bench/ingest.py                 # 10,000 Services x 10 endpoints, 200 changes, the agent too
    .venv/bin/python bench/ingest.py --services 1000 --changes 50 --no-agent --json
    .venv/bin/python bench/ingest.py --out bench/results/ingest-10k.json
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import queue
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodeagent import heap  # noqa: E402
from nodeagent.cluster.discovery.kubernetes import CORE_KINDS, MESH_KINDS, ApiConnection, KubernetesSource  # noqa: E402
from nodeagent.cluster.events import Event, Upserted  # noqa: E402
from nodeagent.cluster.model import Kind  # noqa: E402
from nodeagent.observability.logs import configure_logging  # noqa: E402
from nodeagent.state.tracker import ChangeTracker  # noqa: E402
from tests.support.objects import scale_slice  # noqa: E402

GOALS = {"first_snapshot_s": 5.0, "change_p99_ms": 5.0, "rss_mb": 250.0}


@contextlib.contextmanager
def api_server(services: int, endpoints: int, netns: str | None = None) -> Iterator[dict[str, str]]:
    """The lab API server (HTTPS, token) in a child process, filled with the benchmark's cluster, on the
    loopback of `netns` (or of this namespace); yields its URL, token and kubeconfig path; killed on exit."""
    argv = [sys.executable, "-m", "tests.support.fakeapi", "--tls", "--services", str(services),
            "--endpoints", str(endpoints)]
    child = subprocess.Popen((["ip", "netns", "exec", netns] if netns else []) + argv, cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    printed: dict[str, str] = {}
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # printed once every object is loaded and the port listens
        if not line:
            raise RuntimeError(f"the API server exited with {child.wait()}")
        printed = json.loads(line)
        yield printed
    finally:
        child.kill()
        child.wait()
        if "kubeconfig" in printed:
            shutil.rmtree(Path(printed["kubeconfig"]).parent, ignore_errors=True)


def https_context(server: dict[str, str]) -> ssl.SSLContext:
    """An SSL context trusting the server's CA, from its kubeconfig."""
    cluster = json.loads(Path(server["kubeconfig"]).read_text())["clusters"][0]["cluster"]
    return ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())


def connect(server: dict[str, str]) -> http.client.HTTPSConnection:
    host, _, port = server["url"].removeprefix("https://").rpartition(":")
    return http.client.HTTPSConnection(host, int(port), timeout=60, context=https_context(server))


def bare_list(server: dict[str, str], page_size: int = 500) -> tuple[float, int]:
    """The reference: page through Services and EndpointSlices over HTTPS and json.loads every page, nothing
    else; returns seconds and objects."""
    started, count = time.perf_counter(), 0
    connection = connect(server)
    try:
        for path in ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"):
            token = ""
            while True:
                query = f"?limit={page_size}" + (f"&continue={token}" if token else "")
                connection.request("GET", path + query, headers={"Authorization": f"Bearer {server['token']}",
                                                                 "Accept": "application/json"})
                response = connection.getresponse()
                page = json.loads(response.read())
                if response.status != 200:
                    raise RuntimeError(f"list {path}: HTTP {response.status}")
                count += len(page["items"])
                token = page["metadata"].get("continue", "")
                if not token:
                    break
    finally:
        connection.close()
    return time.perf_counter() - started, count


class Probe:
    """Notified by the tracker whenever it goes from settled to pending; remembers when."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.at = 0.0

    def __call__(self) -> None:
        self.at = time.perf_counter()
        self.event.set()


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        time.sleep(0.001)


def send_put(connection: http.client.HTTPConnection, token: str, obj: dict[str, Any]) -> None:
    """Send the PUT without waiting for its answer (the answer is not what is measured)."""
    meta = obj["metadata"]
    path = f"/apis/discovery.k8s.io/v1/namespaces/{meta['namespace']}/endpointslices/{meta['name']}"
    connection.request("PUT", path, body=json.dumps(obj).encode(),
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})


def read_answer(connection: http.client.HTTPConnection) -> None:
    response = connection.getresponse()
    response.read()
    if response.status >= 300:
        raise RuntimeError(f"PUT: HTTP {response.status}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def changed_slice(i: int, services: int, endpoints: int) -> dict[str, Any]:
    """The i-th change: one endpoint of one Service gets a new address (spread over the Services)."""
    changed = scale_slice((i * 7919) % services, endpoints)
    changed["endpoints"][0]["addresses"] = [f"10.99.{i >> 8 & 255}.{i & 255}"]
    return changed


def send_on_schedule(server: dict[str, str], services: int, endpoints: int, changes: int, rate: float,
                     scheduled: dict[str, float], errors: list[BaseException], start: int = 0,
                     connections: int = 8) -> None:
    """PUT `changes` changed slices at `rate` per second from a fixed schedule (open loop: each change's
    clock starts at its scheduled time, whenever it is actually sent). The sends are spread over
    `connections` keep-alive connections, so one slow answer does not hold back the next change (the lab
    API server's answers take ~40 ms each: it writes headers and body in two segments, Nagle meets the
    client's delayed ACK)."""
    jobs: queue.Queue[tuple[float, dict[str, Any]] | None] = queue.Queue()

    def worker() -> None:
        try:
            connection = connect(server)
            while (job := jobs.get()) is not None:
                at, obj = job
                delay = at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                send_put(connection, server["token"], obj)
                read_answer(connection)
            connection.close()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    t0 = time.perf_counter() + 0.2
    for i in range(changes):
        at = t0 + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        obj = changed_slice(start + i, services, endpoints)
        scheduled[obj["metadata"]["name"]] = at
        jobs.put((at, obj))
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join(60)


def run(services: int, endpoints: int, changes: int, rate: float) -> dict[str, Any]:
    process = psutil.Process()
    with api_server(services, endpoints) as server:
        reference_s, listed = bare_list(server)
        assert listed == 2 * services, listed
        rss_before = process.memory_info().rss
        probe = Probe()
        tracker = ChangeTracker("node1", on_change=probe)
        received: dict[str, float] = {}

        def sink(event: Event) -> None:  # the source hands the tracker a decoded event: its receipt
            if isinstance(event, Upserted) and event.ref is not None and event.kind is Kind.ENDPOINT_SLICE:
                received.setdefault(event.ref.name, time.perf_counter())
            tracker.apply(event)

        kinds = CORE_KINDS + MESH_KINDS
        started, cpu_started = time.perf_counter(), process.cpu_times()
        api = ApiConnection.from_config(server["kubeconfig"])
        source = KubernetesSource(api, sink, "node1", kinds=kinds).start()
        try:
            wait_for(lambda: tracker.synced(kinds), 120, "complete list")
            first = tracker.snapshot()
            first_snapshot_s = time.perf_counter() - started
            cpu = process.cpu_times()
            first_snapshot_cpu_s = (cpu.user + cpu.system) - (cpu_started.user + cpu_started.system)
            assert first is not None and len(first.service_ports) == services, "not every Service arrived"
            heap.settle()  # what the agent's run loop does once the initial state is in
            rss_first = process.memory_info().rss
            received.clear()

            scheduled: dict[str, float] = {}
            errors: list[BaseException] = []
            sender = threading.Thread(target=send_on_schedule, daemon=True,
                                      args=(server, services, endpoints, changes, rate, scheduled, errors))
            expected = {changed_slice(i, services, endpoints)["metadata"]["name"] for i in range(changes)}
            end_to_end, after_receipt, build = [], [], []
            seen: set[str] = set()
            sender.start()
            deadline = time.monotonic() + changes / rate + 60
            while seen != expected:
                if errors:
                    raise RuntimeError(f"sending changes failed: {errors[0]!r}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(expected - seen)} changes never reached a snapshot")
                if not probe.event.wait(0.5):
                    continue
                probe.event.clear()
                building = time.perf_counter()
                snapshot = tracker.snapshot()
                done = time.perf_counter()
                if snapshot is None:
                    continue
                build.append(done - building)
                for port in snapshot.changed_ports:
                    slice_name = f"{port.name}-abcde"
                    if slice_name in expected and slice_name not in seen and slice_name in received:
                        seen.add(slice_name)
                        after_receipt.append(done - received[slice_name])
                        end_to_end.append(done - scheduled.get(slice_name, received[slice_name]))
            sender.join(30)
            rss_end = process.memory_info().rss
        finally:
            source.stop()
            api.close()
    ms = 1000.0
    return {
        "services": services, "endpoints_per_slice": endpoints, "changes": changes, "change_rate_per_s": rate,
        "transport": "https+token, lab API server (nodeagent.lab.apiserver) in its own process",
        "first_snapshot_s": round(first_snapshot_s, 3),
        "first_snapshot_agent_cpu_s": round(first_snapshot_cpu_s, 3),
        "reference_bare_list_s": round(reference_s, 3),
        "first_snapshot_vs_bare_list": round(first_snapshot_s / reference_s, 2),
        "change_end_to_end_ms": {"p50": round(percentile(end_to_end, .5) * ms, 3),
                                 "p99": round(percentile(end_to_end, .99) * ms, 3),
                                 "max": round(max(end_to_end) * ms, 3)},
        "change_after_receipt_ms": {"p50": round(percentile(after_receipt, .5) * ms, 3),
                                    "p99": round(percentile(after_receipt, .99) * ms, 3),
                                    "max": round(max(after_receipt) * ms, 3)},
        "snapshot_build_ms": {"p50": round(percentile(build, .5) * ms, 3), "p99": round(percentile(build, .99) * ms, 3),
                              "mean": round(statistics.fmean(build) * ms, 3), "n": len(build)},
        "rss_mb": {"before": round(rss_before / 2**20, 1), "first_snapshot": round(rss_first / 2**20, 1),
                   "end": round(rss_end / 2**20, 1)},
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
    }


# --- part 2: the whole agent process -------------------------------------------------------------------

METRICS_SCRIPT = ("import sys,urllib.request;sys.stdout.write(urllib.request.urlopen("
                  "'http://127.0.0.1:10249/metrics',timeout=5).read().decode())")


def agent_metrics(netns: str) -> dict[str, float]:
    """The agent's metrics (kubeproxy_* and nodeagent_*, summed over their labels), read inside its namespace."""
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", METRICS_SCRIPT],
                            capture_output=True, text=True, timeout=30, check=False)
    values: dict[str, float] = {}
    for line in result.stdout.splitlines():
        if line.startswith(("nodeagent_", "kubeproxy_")):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


class RssSampler(threading.Thread):
    """Samples a process's RSS every `interval` s (psutil) and reads the kernel's high-water mark."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(pid), interval
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        with contextlib.suppress(psutil.Error):
            while not self.stopped.wait(self.interval):
                self.samples.append((time.perf_counter(), self.process.memory_info().rss))

    def hwm(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def between(self, start: float, end: float) -> list[int]:
        return [rss for at, rss in self.samples if start <= at <= end]


def run_agent(services: int, endpoints: int, steady_s: float, rate: float, sync_period: float) -> dict[str, Any]:
    """The whole `nodeagent run --mode iptables` against the lab API server, in a throw-away namespace that
    holds both (the agent programs only that namespace's iptables; the server listens on its loopback)."""
    netns = f"bingest{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    agent: subprocess.Popen[bytes] | None = None
    log = Path(tempfile.mkstemp(prefix="bench-agent-", suffix=".log")[1])
    try:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        with api_server(services, endpoints, netns=netns) as server, log.open("wb") as out:
            started = time.perf_counter()
            # `ip netns exec` execs the command, so the child's pid is the agent's own
            agent = subprocess.Popen(["ip", "netns", "exec", netns, str(Path(sys.executable).parent / "nodeagent"),
                                      "run", "--mode", "iptables", "--kubeconfig", server["kubeconfig"], "--node",
                                      "node1", "--sync-period", str(sync_period),
                                      "--healthz-bind-address", "127.0.0.1:10256",
                                      "--metrics-bind-address", "127.0.0.1:10249"], stdout=out, stderr=out, cwd=ROOT)
            sampler = RssSampler(agent.pid)
            sampler.start()
            metrics: dict[str, float] = {}
            deadline = time.monotonic() + 900
            while not (metrics.get("nodeagent_service_ports", 0) >= services
                       and metrics.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", 0) > 0
                       and metrics.get("kubeproxy_sync_proxy_rules_iptables_total", 0) > services):
                if agent.poll() is not None:
                    raise RuntimeError(f"the agent exited with {agent.returncode}: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the agent did not program {services} Services: {metrics}")
                time.sleep(0.5)
                metrics = agent_metrics(netns)
            first_sync_s = time.perf_counter() - started
            at_first_sync = time.perf_counter()
            process = psutil.Process(agent.pid)
            rss_first_sync = process.memory_info().rss
            cpu = process.cpu_times()
            cpu_first_sync = cpu.user + cpu.system
            # steady: changes on schedule, sent from inside the namespace, across at least one full resync
            changes = max(1, int(steady_s * rate))
            sender = subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(Path(__file__).resolve()),
                                     "--send-changes", json.dumps(server), "--services", str(services),
                                     "--endpoints", str(endpoints), "--changes", str(changes), "--rate", str(rate)],
                                    capture_output=True, text=True, timeout=steady_s + 120, check=False, cwd=ROOT)
            if sender.returncode != 0:
                raise RuntimeError(f"sending changes failed: {sender.stderr[-2000:]}")
            remaining = at_first_sync + steady_s - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
            ended = time.perf_counter()
            metrics = agent_metrics(netns)
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited with {agent.returncode}: {log.read_text()[-2000:]}")
            cpu = process.cpu_times()
            rss_end = process.memory_info().rss
            hwm = sampler.hwm()
            sampler.stopped.set()
            sampler.join(5)
            steady = sampler.between(at_first_sync + 1, ended)
            everything = sampler.between(0, ended)
            mb = 2**20
            # one sample a second (seconds since the agent started, MB) to see where the memory comes
            timeline, next_at = [], started
            for at, rss in sampler.samples:
                if at >= next_at:
                    timeline.append([round(at - started, 1), round(rss / mb, 1)])
                    next_at = at + 1.0
            backend = next((json.loads(line).get("backend") for line in log.read_text().splitlines()
                            if "iptables backend detected" in line), None)
            return {
                "services": services, "endpoints_per_slice": endpoints, "mode": "iptables",
                "command": "ip netns exec NS nodeagent run --mode iptables --kubeconfig K --node node1",
                "sync_period_s": sync_period, "steady_window_s": steady_s, "steady_changes": changes,
                "steady_change_rate_per_s": rate,
                "first_full_sync_s": round(first_sync_s, 3),
                "agent_cpu_s": {"to_first_sync": round(cpu_first_sync, 2),
                                "steady_window": round(cpu.user + cpu.system - cpu_first_sync, 2)},
                "iptables_rules": int(metrics.get("kubeproxy_sync_proxy_rules_iptables_total", 0)),
                "sync_failures": int(metrics.get("nodeagent_sync_proxy_rules_failures_total", 0)),
                "rss_mb": {"first_sync": round(rss_first_sync / mb, 1),
                           "peak_sampled": round(max(everything) / mb, 1),
                           "peak_vmhwm": round(hwm / mb, 1),
                           "steady_median": round(statistics.median(steady) / mb, 1) if steady else None,
                           "steady_max": round(max(steady) / mb, 1) if steady else None,
                           "end": round(rss_end / mb, 1)},
                "rss_samples": len(everything), "iptables_backend": backend, "rss_timeline_s_mb": timeline,
            }
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        log.unlink(missing_ok=True)


def send_changes_main(server_json: str, services: int, endpoints: int, changes: int, rate: float) -> None:
    """--send-changes: run inside the agent's namespace, PUT the changes on schedule, then exit."""
    errors: list[BaseException] = []
    send_on_schedule(json.loads(server_json), services, endpoints, changes, rate, {}, errors, start=100_000)
    if errors:
        raise errors[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="endpoint changes sent per second, on schedule")
    parser.add_argument("--agent", action=argparse.BooleanOptionalAction, default=os.geteuid() == 0,
                        help="also measure the whole agent process (root; default when root)")
    parser.add_argument("--steady", type=float, default=45.0, help="seconds of the agent's steady window")
    parser.add_argument("--agent-rate", type=float, default=5.0, help="changes per second in the steady window")
    parser.add_argument("--sync-period", type=float, default=30.0, help="the agent's full-resync period")
    parser.add_argument("--out", type=Path, help="also write the result as JSON to this file")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--send-changes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging(level="warning")  # results on stdout, problems on stderr
    if args.send_changes:
        send_changes_main(args.send_changes, args.services, args.endpoints, args.changes, args.rate)
        return
    load_before = os.getloadavg()
    result = run(args.services, args.endpoints, args.changes, args.rate)
    if args.agent:
        result["agent"] = run_agent(args.services, args.endpoints, args.steady, args.agent_rate, args.sync_period)
    result["loadavg"] = {"start": [round(x, 2) for x in load_before], "end": [round(x, 2) for x in os.getloadavg()]}
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                      text=True, check=False).stdout.strip()
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['services']} Services x {result['endpoints_per_slice']} endpoints over HTTPS, "
          f"{result['changes']} endpoint changes at {result['change_rate_per_s']:g}/s on schedule "
          f"(python {result['python']}, {result['cpus']} CPUs, load {result['loadavg']['start'][0]})")
    print(f"  first snapshot         {result['first_snapshot_s']:8.3f} s    (goal <= {GOALS['first_snapshot_s']} s; "
          f"agent CPU {result['first_snapshot_agent_cpu_s']:.3f} s; a bare HTTPS list of the same objects "
          f"{result['reference_bare_list_s']:.3f} s, ratio {result['first_snapshot_vs_bare_list']})")
    for key, label in (("change_after_receipt_ms", "change, after receipt"),
                       ("change_end_to_end_ms", "change, scheduled PUT")):
        print(f"  {label:22} p50 {result[key]['p50']:7.3f} ms  p99 {result[key]['p99']:7.3f} ms"
              + ("    (goal p99 <= 5 ms)" if key == "change_after_receipt_ms" else ""))
    print(f"  snapshot build         p50 {result['snapshot_build_ms']['p50']:7.3f} ms  "
          f"p99 {result['snapshot_build_ms']['p99']:7.3f} ms")
    rss = result["rss_mb"]
    print(f"  RSS (source half)      {rss['first_snapshot']:.1f} MB after first snapshot, {rss['end']:.1f} MB at end "
          f"({rss['before']:.1f} MB before ingest)")
    if "agent" in result:
        agent = result["agent"]
        rss = agent["rss_mb"]
        print(f"  whole agent (iptables) first full sync {agent['first_full_sync_s']:.1f} s, "
              f"{agent['iptables_rules']} rules; RSS peak {rss['peak_vmhwm']:.1f} MB (VmHWM), steady median "
              f"{rss['steady_median']} MB, max {rss['steady_max']} MB (goal <= {GOALS['rss_mb']} MB)")


if __name__ == "__main__":
    main()
