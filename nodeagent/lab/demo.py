"""The lab demo behind the README's first command: bring up the default lab and show traffic flowing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

from nodeagent.lab import lab as labs
from nodeagent.lab import processes
from nodeagent.lab.agents import start_agents
from nodeagent.lab.cgroups import path_of
from nodeagent.lab.errors import LabError


def describe(lab: labs.Lab) -> str:
    """Nodes, pods and Services of a lab as a short table."""
    lines = ["nodes:"]
    for node in lab.plan.nodes:
        lines.append(f"  {node.node.name:<10} {node.node.address!s:<14} podCIDR {node.node.pod_cidr}  "
                     f"netns {node.netns}")
        if node.node.address6 is not None:  # a dual-stack lab's IPv6 side, under the IPv4 line
            lines.append(f"  {'':<10} {node.node.address6!s:<14} podCIDR {node.node.pod_cidr6}")
    lines.append("pods:")
    for pod in lab.plan.pods:
        lines.append(f"  {pod.pod.key:<18} {pod.pod.ip!s:<14} on {pod.pod.node:<8} netns {pod.netns}")
        if pod.pod.ip6 is not None:
            lines.append(f"  {'':<18} {pod.pod.ip6!s}")
    services = [d for d in lab.topology.documents if d.get("kind") == "Service"]
    if services:
        lines.append("services:")
    for svc in services:
        ports = ", ".join(f"{p['port']}/{p['protocol']}" + (f" (nodePort {p['nodePort']})" if "nodePort" in p else "")
                          for p in svc["spec"].get("ports", []))
        ips = svc["spec"].get("clusterIPs") or [svc["spec"].get("clusterIP", "")]
        lines.append(f"  {svc['metadata']['namespace']}/{svc['metadata']['name']:<14} "
                     f"{ips[0]!s:<14} {ports}" + (f"  (and {', '.join(ips[1:])})" if len(ips) > 1 else ""))
    return "\n".join(lines)


def request_from(lab: labs.Lab, pod: str, target: str, *, udp: bool = False, timeout: float = 5.0) -> dict[str, str]:
    """Run the workload client in `pod` against `target` (ip:port) and return the server's answer."""
    plan = lab.plan.pod(pod)
    command = ["nodeagent", "workload", "request", target, "--timeout", str(timeout)] + (["--udp"] if udp else [])
    result = subprocess.run(processes.enter_argv(plan.netns, path_of(plan.cgroup), command),
                            env=processes.child_env({"POD_NAME": plan.pod.name}), capture_output=True,
                            text=True, timeout=timeout + 10, check=False)
    if result.returncode != 0:
        raise LabError(f"request from {pod} to {target} failed: {(result.stderr or result.stdout).strip()}")
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


# A DNS question from inside a pod to `server`:53 (UDP): the answer's addresses, or the error.
RESOLVE = """
import sys
import dns.message, dns.query, dns.rdatatype
answer = dns.query.udp(dns.message.make_query(sys.argv[1], "A"), sys.argv[2], port=53, timeout=3)
print(" ".join(rr.to_text() for rs in answer.answer for rr in rs if rs.rdtype == dns.rdatatype.A) or "no address")
"""


def resolve_from(lab: labs.Lab, pod: str, name: str, server: str, timeout: float = 10.0) -> str:
    """Ask `server`:53 for `name` from inside `pod` (captured: the tunnel's DNS proxy answers)."""
    plan = lab.plan.pod(pod)
    result = subprocess.run(processes.enter_argv(plan.netns, path_of(plan.cgroup),
                                                 [sys.executable, "-c", RESOLVE, name, server]),
                            env=processes.child_env({}), capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise LabError(f"DNS question from {pod} for {name} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout.strip()


def run_demo(name: str, keep: bool, say: Callable[[str], None], *, dual_stack: bool = False) -> None:
    """Bring the default lab up, show it, send requests across and within nodes, then tear it down. With
    `dual_stack`, the dual-stack default lab, and its dual-stack Service reached over each family."""
    say(f"bringing up the {'dual-stack ' if dual_stack else ''}default lab {name!r} (2 nodes, "
        f"{4 if dual_stack else 3} pods, network namespaces + cgroups)...")
    lab = labs.up(name, dual_stack=dual_stack)
    try:
        say(describe(lab))
        client = lab.plan.pod("demo/client")
        for server in (p for p in lab.plan.pods if p.pod.labels.get("app") == "echo" and p.pod.namespace == "demo"):
            where = "other node" if server.pod.node != client.pod.node else "same node"
            for udp, port in ((False, 8080), (True, 8081)):
                answer = request_from(lab, "demo/client", f"{server.pod.ip}:{port}", udp=udp)
                say(f"{client.pod.key} ({client.pod.node}) -> {server.pod.ip}:{port}/{'UDP' if udp else 'TCP'} "
                    f"[{where}]: answered by {answer['pod']} on {answer['node']}, which saw peer {answer['peer']}")
        say("starting `nodeagent run --mode iptables --mesh` and `nodeagent ztunnel` on every node (kube-proxy's "
            "rules; the mesh for the enrolled namespace `demo`)...")
        start_agents(name, mesh=True)
        vip = lab.cluster_ip("echo")
        replies = [request_from(lab, "demo/client", f"{vip}:80") for _ in range(8)]
        pods = [r["pod"] for r in replies]
        peers = sorted({r["peer"].rsplit(":", 1)[0] for r in replies})
        say(f"{client.pod.key} -> ClusterIP {vip}:80 x8: answered by " + ", ".join(
            f"{pod} {pods.count(pod)}x" for pod in sorted(set(pods))) + f", which saw peer {', '.join(peers)}"
            " (TCP: captured, HBONE/mTLS between the tunnels)")
        # An enrolled pod's DNS (UDP 53) is captured into its tunnel's DNS proxy, which answers Service names
        # from the tunnel's own tables: no cluster DNS runs in the lab, and the Service's port 53 is not asked.
        name_ = "echo.demo.svc.cluster.local"
        say(f"{client.pod.key} asks {vip}:53 for {name_}: {resolve_from(lab, 'demo/client', name_, vip)} "
            "(UDP 53 captured: answered by the tunnel's DNS proxy from its Service table)")
        counted = tunnel_connections(lab, client.pod.node, "demo/echo")
        say(f"the tunnel on {client.pod.node} counted {counted:.0f} mTLS connections to demo/echo "
            f"(istio_tcp_connections_opened_total on http://{lab.plan.node(client.pod.node).node.address}:15020/metrics)")
        live_change(lab, name, client.pod.key, vip, say)
        far = next(node for node in lab.plan.nodes if node.node.name != client.pod.node)
        answers = [request_from(lab, "demo/client", f"{far.node.address}:30080")["pod"] for _ in range(8)]
        say(f"{client.pod.key} -> NodePort {far.node.address}:30080 ({far.node.name}) x8: answered by "
            + ", ".join(f"{pod} {answers.count(pod)}x" for pod in sorted(set(answers))))
        if lab.topology.dual_stack:
            both_families(lab, client.pod.node, say)
        say(f"the rules on {client.pod.node}: `nodeagent chains --lab {name} --format list --table nat`")
    finally:
        if keep:
            say(f"lab {name!r} left up: `nodeagent lab exec --lab {name} demo/client -- nodeagent workload request "
                f"IP:8080`, then `nodeagent lab down --lab {name}`")
        else:
            labs.down(name)
            say(f"lab {name!r} removed (use --keep to leave it up)")


def dual_stack_service(lab: labs.Lab, namespace: str = "plain") -> tuple[str, list[str]]:
    """The first Service of `namespace` with a cluster IP of each family: its name and spec.clusterIPs."""
    for doc in lab.topology.documents:
        meta, spec = doc.get("metadata", {}), doc.get("spec", {})
        if doc.get("kind") == "Service" and meta.get("namespace") == namespace \
                and len(spec.get("clusterIPs") or []) == 2:
            return str(meta["name"]), [str(ip) for ip in spec["clusterIPs"]]
    raise LabError(f"lab {lab.record.name!r} has no dual-stack Service in namespace {namespace}")


def request_from_node(lab: labs.Lab, node: str, target: str, *, timeout: float = 5.0) -> dict[str, str]:
    """Run the workload client on `node` itself (its host network, outside any pod) and return the answer."""
    plan = lab.plan.node(node)
    command = ["nodeagent", "workload", "request", target, "--timeout", str(timeout)]
    result = subprocess.run(processes.enter_argv(plan.netns, path_of(plan.cgroup), command),
                            env=processes.child_env({}), capture_output=True, text=True, timeout=timeout + 10,
                            check=False)
    if result.returncode != 0:
        raise LabError(f"request from node {node} to {target} failed: {(result.stderr or result.stdout).strip()}")
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


def both_families(lab: labs.Lab, node: str, say: Callable[[str], None], count: int = 8) -> None:
    """The dual-stack default lab's Service (plain/echo-dual, its pod on node2) reached from `node` over each of
    its cluster IPs (the IPv4 proxier's rules, then the IPv6 one's); each answer says which pod answered and the
    client address of that family it saw. From the node's host network to a namespace outside the mesh: the
    answers show the agents' datapath of each family alone."""
    name, ips = dual_stack_service(lab)
    for ip in ips:
        target = f"[{ip}]:80" if ":" in ip else f"{ip}:80"
        replies = [request_from_node(lab, node, target) for _ in range(count)]
        pods = [r["pod"] for r in replies]
        peers = sorted({r["peer"].rsplit(":", 1)[0] for r in replies})
        say(f"{node} (host network) -> dual-stack Service plain/{name} IPv{6 if ':' in ip else 4} {target} x{count}: "
            f"answered by {counts(pods)}, which saw peer {', '.join(peers)}")


WEIGHTS = '{"echo-0": 100, "echo-1": 0}'
CANARY_ANNOTATION = f"nodeagent.io/endpoint-weights={WEIGHTS}"


def requests_from(lab: labs.Lab, pod: str, target: str, count: int, *, timeout: float = 5.0) -> list[str]:
    """Send `count` TCP requests from `pod` to `target` (ip:port), each on a new connection, from one process;
    return the answering pod of each."""
    plan = lab.plan.pod(pod)
    host, _, port = target.rpartition(":")
    script = ("import asyncio,json,sys;from nodeagent.lab.workload import request_tcp\n"
              "async def main():\n"
              f" return [(await request_tcp({host!r}, {int(port)}, 'hello', {timeout}))['pod']\n"
              f"         for _ in range({count})]\n"
              "print(json.dumps(asyncio.run(main())))")
    result = subprocess.run(processes.enter_argv(plan.netns, path_of(plan.cgroup), [sys.executable, "-c", script]),
                            env=processes.child_env({"POD_NAME": plan.pod.name}), capture_output=True, text=True,
                            timeout=count * (timeout + 1) + 10, check=False)
    if result.returncode != 0:
        raise LabError(f"requests from {pod} to {target} failed: {(result.stderr or result.stdout).strip()[-500:]}")
    answers: list[str] = json.loads(result.stdout)
    return answers


def counts(pods: list[str]) -> str:
    return ", ".join(f"{pod} {pods.count(pod)}x" for pod in sorted(set(pods)))


def live_change(lab: labs.Lab, name: str, client: str, vip: str, say: Callable[[str], None], *,
                deadline_s: float = 30.0) -> None:
    """Show the cluster through the lab API with kubectl, move the echo Service's traffic with one `kubectl
    annotate` (a canary weight the client's tunnel honours), and show requests before and after."""
    listed = labs.kubectl(name, ["get", "svc,pods", "-A", "-o", "wide"], capture=True, timeout=60)
    if listed.returncode != 0:
        raise LabError(f"kubectl get svc,pods -A failed: {listed.stderr.strip()}")
    say(f"`nodeagent lab kubectl --lab {name} -- get svc,pods -A -o wide` (the real kubectl against the lab's "
        "API server, which the agents and tunnels read):\n" + "\n".join(("  " + line).rstrip() for line in
                                                                    listed.stdout.rstrip().splitlines()))
    before = requests_from(lab, client, f"{vip}:80", 10)
    say(f"before: {client} -> ClusterIP {vip}:80 x10: answered by {counts(before)}")
    argv = ["annotate", "svc", "echo", "-n", "demo", CANARY_ANNOTATION, "--overwrite"]
    say(f"live change: `nodeagent lab kubectl --lab {name} -- annotate svc echo -n demo "
        f"nodeagent.io/endpoint-weights='{WEIGHTS}' --overwrite`")
    changed = labs.kubectl(name, argv, capture=True, timeout=60)
    if changed.returncode != 0:
        raise LabError(f"kubectl annotate failed: {changed.stderr.strip()}")
    say("  " + changed.stdout.strip())
    started = time.monotonic()
    # Taken effect when a whole batch of new connections lands on echo-0 (1 in 2**8 by chance before it).
    while set(batch := requests_from(lab, client, f"{vip}:80", 8)) != {"demo/echo-0"}:
        if time.monotonic() - started > deadline_s:
            raise LabError(f"the weight change did not reach the tunnel within {deadline_s:.0f} s: "
                           f"still answered by {counts(batch)}")
    took = time.monotonic() - started
    after = requests_from(lab, client, f"{vip}:80", 10)
    say(f"after: {client} -> ClusterIP {vip}:80 x10: answered by {counts(after)} "
        f"(the kubectl change took effect within {took:.1f} s: echo-1 weighs 0 in the tunnel now)")
    if set(after) != {"demo/echo-0"}:
        raise LabError(f"after the weight change echo-1 still answered: {counts(after)}")


def tunnel_connections(lab: labs.Lab, node: str, service: str) -> float:
    """How many connections the tunnel on `node` opened to `service` over mTLS (its Istio metric)."""
    from prometheus_client.parser import text_string_to_metric_families

    plan = lab.plan.node(node)
    text = subprocess.run(["ip", "netns", "exec", plan.netns, "python3", "-c",
                           "import sys,urllib.request;sys.stdout.write(urllib.request.urlopen(sys.argv[1],timeout=5)"
                           ".read().decode())", f"http://{plan.node.address}:15020/metrics"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "istio_tcp_connections_opened_total"
               and sample.labels.get("destination_service") == service
               and sample.labels.get("connection_security_policy") == "mutual_tls")
