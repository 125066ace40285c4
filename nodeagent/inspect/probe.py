"""`trace --probe`: send the real connection from the pod (in the lab: in its namespace and cgroup) and confirm the
prediction from where it ended and from counters that moved: the node's KUBE-SEP packet counters (iptables mode,
uncaptured) or the source tunnel's `istio_tcp_connections_opened_total` (captured). Thin I/O."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from nodeagent.inspect.trace import CONNECTED, DENIED, Trace


@dataclass(frozen=True)
class ProbeResult:
    """What the real connection did, and whether it confirms the prediction."""

    answered: bool
    answered_by: str  # the answering pod's name
    error: str
    counters: dict[str, int] = field(default_factory=dict)  # what moved, by name: the increase
    confirmed: bool = False
    reasons: tuple[str, ...] = ()


def sep_counters(node_netns: str) -> dict[str, int]:
    """Packets through each KUBE-SEP chain's DNAT in the node's nat tables, IPv4's and IPv6's (the chain names
    hash the endpoint address, so the families' never collide; no ip6tables chains: nothing of IPv6)."""
    from nodeagent.kernel.netfilter import detect_backend
    from nodeagent.kernel.netns import command_in

    backend = detect_backend(node_netns)
    text = ""
    for tool in ("iptables", "ip6tables"):
        argv = command_in(node_netns, [f"{tool}-{backend}-save", "-c", "-t", "nat"])
        text += subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("[") and " -A KUBE-SEP-" in line and "-j DNAT" in line:
            counters, rule = line.split("] ", 1)
            out[rule.split()[1]] = int(counters[1:].split(":")[0])
    return out


def tunnel_opened(node_netns: str, address: str) -> int:
    """The source tunnel's connections opened (reporter=source), read from its /metrics inside the node."""
    return tunnel_metric(node_netns, address, "istio_tcp_connections_opened_total", 'reporter="source"')


def tunnel_metric(node_netns: str, address: str, name: str, having: str = "") -> int:
    """The sum of a tunnel counter's samples (those whose labels contain `having`), read inside the node."""
    from nodeagent.kernel.netns import in_netns

    def fetch() -> str:
        with urllib.request.urlopen(f"http://{address}:15020/metrics", timeout=3) as answer:
            return str(answer.read().decode())

    text = in_netns(node_netns, fetch)
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith((f"{name}{{", f"{name} ")) and having in line))


DENIALS = "nodeagent_tunnel_policy_denials_total"


def _opened_or_none(node_netns: str, address: str) -> int | None:
    """`tunnel_opened`, or None when the tunnel's metrics do not answer (no tunnel runs: the mesh is off)."""
    try:
        return tunnel_opened(node_netns, address)
    except OSError:
        return None


def probe(trace: Trace, send: Callable[[], dict[str, str]], node_netns: str, node_address: str,
          mode: str, node_of: Callable[[str], tuple[str, str]] | None = None) -> ProbeResult:
    """Send one connection with `send` (raises on failure) and compare. `node_of` gives a node's (netns, address):
    a predicted denial is then confirmed by the destination tunnels' policy denials counter."""
    watch_sep = not trace.captured and mode == "iptables"
    before_sep = sep_counters(node_netns) if watch_sep else {}
    before_tunnel = _opened_or_none(node_netns, node_address) if trace.captured else 0
    denying = sorted({h.node for h in trace.hops if not h.allowed and h.node}) if node_of is not None else []
    before_denials = {n: tunnel_metric(*node_of(n), DENIALS) for n in denying} if node_of is not None else {}
    try:
        answer, error = send(), ""
    except Exception as exc:  # the lab's and the socket's errors alike: a failed probe is a result
        answer, error = {}, str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    counters: dict[str, int] = {}
    if watch_sep:
        after = sep_counters(node_netns)
        counters = {chain: after[chain] - before_sep.get(chain, 0) for chain in after
                    if after[chain] != before_sep.get(chain, 0)}
    unread = False
    if trace.captured:
        after_tunnel = _opened_or_none(node_netns, node_address)
        if before_tunnel is None or after_tunnel is None:
            unread = True
        else:
            counters["tunnel connections opened"] = after_tunnel - before_tunnel
    if node_of is not None:
        for node in denying:
            counters[f"policy denials on {node}"] = tunnel_metric(*node_of(node), DENIALS) - before_denials[node]
    by = str(answer.get("pod", ""))
    reasons: list[str] = []
    if trace.outcome == CONNECTED:
        names = {p.split("/", 1)[1] for p in trace.pods()}
        if not answer:
            reasons.append(f"predicted connected, but the connection failed: {error}")
        elif names and by.split("/")[-1] not in names:
            reasons.append(f"answered by {by}, not one of the predicted {sorted(names)}")
        hop = next((h for h in trace.hops if h.pod.split("/")[-1] == by.split("/")[-1]), None)
        if watch_sep and hop is not None and hop.via and counters.get(hop.via, 0) < 1:
            reasons.append(f"the counter of {hop.via} did not move")
    elif answer:
        reasons.append(f"predicted {trace.outcome}, but {by or 'something'} answered")
    if unread:
        reasons.append(f"the source tunnel's metrics (http://{node_address}:15020) did not answer: is the mesh on?")
    elif trace.outcome == CONNECTED and trace.captured and counters.get("tunnel connections opened", 0) < 1:
        reasons.append("the source tunnel counted no new connection")
    if trace.outcome == DENIED and denying and sum(counters.get(f"policy denials on {n}", 0) for n in denying) < 1:
        reasons.append(f"no policy denial counted by the tunnel on {', '.join(denying)}")
    return ProbeResult(bool(answer), by, error, counters, not reasons, tuple(reasons))


def lab_sender(lab_name: str, pod: str, target: str, udp: bool) -> Callable[[], dict[str, str]]:
    """Send one request from the lab pod `pod` (its namespace and cgroup, as its own processes run)."""
    def send() -> dict[str, str]:
        from nodeagent.lab import lab as labs
        from nodeagent.lab.demo import request_from

        return request_from(labs.load(lab_name), pod, target, udp=udp, timeout=3.0)

    return send


def to_text(result: ProbeResult) -> str:
    """The probe's result as a person reads it."""
    what = f"answered by {result.answered_by}" if result.answered else f"failed: {result.error}"
    moved = ", ".join(f"{k} +{v}" for k, v in sorted(result.counters.items())) or "none watched"
    verdict = "CONFIRMED" if result.confirmed else "NOT CONFIRMED: " + "; ".join(result.reasons)
    return f"probe: {what}; counters: {moved}\n{verdict}\n"


def as_json(result: ProbeResult) -> str:
    """The probe's result as JSON."""
    return json.dumps(result.__dict__)
