"""The capture rules in the kernel: read, apply, remove, inside a network namespace given by its path.

Thin I/O around the pure halves (`render`, `rules`, `nodeagent.mesh.capture`). Commands run in the namespace through
`nodeagent.kernel.netns.command_in` (runtimes hand us paths such as /run/netns/cni-… or /proc/PID/ns/net).
iptables itself is `nodeagent.kernel.netfilter.Iptables`: its restore (with kube-proxy's lock-wait flags
and the failing lines in the error) and save. The backend is the node's, decided once by
`nodeagent.kernel.netfilter.detect_backend` as Istio's CNI agent does for every pod; the other backend is
only read, and only where its tables already exist.

Apply never leaves a namespace half-captured: the policy route (harmless alone: only packets with the
connection mark use it) goes first, then one restore with mangle before nat; if anything fails, all
of ours is removed again and `CaptureError` says what failed. A namespace that is gone (the pod was
deleted) is a state, `netns-missing`, never an exception.

A pod's capture covers both IP families where the kernel has IPv6 (as Istio's CNI writes the in-pod rules
with iptables and ip6tables): the IPv4 set is applied first, then the IPv6 one with ip6tables and `ip -6`;
if the IPv6 half fails, the IPv4 half is removed too, since a pod captured for one family only would
let the other family's connections past the tunnel and its policy. The state reported is both
families' (`nodeagent.mesh.capture.combine`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from nodeagent.errors import NodeAgentError
from nodeagent.kernel.netfilter import BACKENDS, Iptables, IptablesError
from nodeagent.kernel.netns import CommandError, CommandResult, command_in, run_in
from nodeagent.mesh.capture import (
    CaptureState,
    CaptureStatus,
    LiveRouting,
    assess,
    combine,
    missing_netns,
    parse_ip_routes,
    parse_ip_rules,
)
from nodeagent.mesh.iptables.render import DEFAULT_OPTIONS, CaptureOptions, node_probe_snat, pod_capture
from nodeagent.mesh.iptables.rules import LiveRules, PolicyRoute, RuleSet, cleanup_payload, parse_save, restore_payload

log = structlog.get_logger("nodeagent.mesh.iptables.apply")
_TIMEOUT = 30


class RedirectError(NodeAgentError):
    """Root of the capture's errors."""


class CaptureError(RedirectError):
    """The capture could not be applied or removed in a namespace; nothing of ours was left half-applied."""

    def __init__(self, pod: str, netns: str, reason: str) -> None:
        super().__init__(f"capture of pod {pod or '?'} in {netns}: {reason}")
        self.pod, self.netns, self.reason = pod, netns, reason


class _NetnsGone(Exception):
    """The namespace vanished while we worked in it."""


@dataclass(frozen=True)
class NetnsIptables(Iptables):
    """`Iptables` run inside the namespace bound at `path` (None: this process's own namespace)."""

    path: str | None = None

    def _argv(self, tool: str, *args: str) -> list[str]:
        return command_in(self.path, Iptables(self.backend, ipv6=self.ipv6)._argv(tool, *args))


def kernel_has_ipv6() -> bool:
    """Whether this kernel speaks IPv6 (booted with ipv6.disable=1 it does not, in no namespace): where it
    does, every pod's capture covers IPv6 too."""
    return socket.has_ipv6 and os.path.exists("/proc/net/if_inet6")


def netns_present(path: str | None) -> bool:
    """Whether `path` is a live network namespace (a leftover file where one was bound is not)."""
    if path is None:
        return True
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev  # both on nsfs
    except OSError:
        return False


def _run(path: str | None, argv: list[str], check: bool = True) -> CommandResult:
    result = run_in(path, argv, timeout=_TIMEOUT)
    if result.returncode != 0 and not netns_present(path):
        raise _NetnsGone(path)
    if check and result.returncode != 0:
        raise RedirectError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result


def _legacy_tables_exist(path: str | None, ipv6: bool = False) -> bool:
    # Asking iptables-legacy about a table instantiates it; /proc/net (read from inside) does not.
    result = _run(path, ["cat", "/proc/net/ip6_tables_names" if ipv6 else "/proc/net/ip_tables_names"],
                  check=False)
    return result.returncode == 0 and bool(result.stdout.strip())


def _ipv6(desired: RuleSet) -> bool:
    return desired.family == 6


def _read(path: str | None, backend: str, desired: RuleSet) -> LiveRules:
    ipt = NetnsIptables(backend, path=path, ipv6=_ipv6(desired))
    try:
        return parse_save({table: ipt.save(table) for table in desired.tables()}, desired.owned())
    except IptablesError:
        if not netns_present(path):
            raise _NetnsGone(path) from None
        raise


def _read_other(path: str | None, backend: str, desired: RuleSet) -> tuple[str, LiveRules | None]:
    other = next(b for b in BACKENDS if b != backend)
    if other == "legacy" and not _legacy_tables_exist(path, _ipv6(desired)):
        return other, None
    try:
        return other, _read(path, other, desired)
    except (IptablesError, FileNotFoundError):
        return other, None  # that backend is not installed here: nothing of ours can be in it


def _read_routing(path: str | None, route: PolicyRoute) -> LiveRouting:
    rules = parse_ip_rules(_run(path, [*route.ip(), "-json", "rule", "show"]).stdout, route)
    shown = _run(path, [*route.ip(), "-json", "route", "show", "table", str(route.table)], check=False)
    # An empty table does not exist for the kernel: "FIB table does not exist", exit status 2.
    return LiveRouting(rules, shown.returncode == 0 and parse_ip_routes(shown.stdout))


def _label(netns: str | None) -> str:
    return netns or "(own namespace)"


@dataclass(frozen=True)
class _Live:
    """One read of everything of ours in a namespace."""

    rules: LiveRules
    other_backend: str
    other: LiveRules | None  # None: that backend is absent, or holds nothing of ours
    routing: LiveRouting | None


def _read_all(netns: str | None, desired: RuleSet, backend: str) -> _Live:
    other_backend, other = _read_other(netns, backend, desired)
    if other is not None and other.empty:
        other = None
    return _Live(_read(netns, backend, desired), other_backend, other,
                 _read_routing(netns, desired.routing) if desired.routing else None)


def _assess(netns: str | None, desired: RuleSet, backend: str, live: _Live) -> CaptureState:
    return assess(desired, live.rules, live.routing, netns=_label(netns), backend=backend, other=live.other,
                  other_backend=live.other_backend)


def _state(netns: str | None, desired: RuleSet, backend: str) -> CaptureState:
    return _assess(netns, desired, backend, _read_all(netns, desired, backend))


def _families(ipv6: bool | None) -> tuple[int, ...]:
    return (4, 6) if (kernel_has_ipv6() if ipv6 is None else ipv6) else (4,)


def live_state(netns: str, options: CaptureOptions = DEFAULT_OPTIONS, *, backend: str,
               ipv6: bool | None = None) -> CaptureState:
    """Read the capture in the pod namespace at `netns` and name its state against `options` (both
    families where the kernel has IPv6, or as `ipv6` says)."""
    states = []
    for family in _families(ipv6):
        desired = pod_capture(options, family)
        if not netns_present(netns):
            return missing_netns(netns, backend, desired)
        try:
            states.append(_state(netns, desired, backend))
        except _NetnsGone:
            return missing_netns(netns, backend, desired)
    return combine(*states) if len(states) == 2 else states[0]


def apply_capture(netns: str, options: CaptureOptions = DEFAULT_OPTIONS, *, backend: str, pod: str = "",
                  force: bool = False, ipv6: bool | None = None) -> CaptureState:
    """Make the pod namespace at `netns` hold exactly the capture for `options`; returns the state after.

    Installed already: nothing is written (unless `force`). Absent, drifted or stale: one atomic restore
    over what is there, after removing our rules from the other backend. Gone: `netns-missing`.
    Both families where the kernel has IPv6 (or as `ipv6` says), IPv4 first.
    Raises CaptureError when the kernel refuses, after removing every rule and route of ours (of both).
    """
    first = _ensure(netns, pod_capture(options, 4), backend=backend, who=pod, force=force)
    if 6 not in _families(ipv6) or first.status is CaptureStatus.NETNS_MISSING:
        return first
    try:
        second = _ensure(netns, pod_capture(options, 6), backend=backend, who=pod, force=force)
    except CaptureError:
        _undo(netns, pod_capture(options, 4), backend, pod)
        raise
    if second.status is CaptureStatus.NETNS_MISSING:
        return second
    return combine(first, second)


def remove_capture(netns: str, *, backend: str, pod: str = "", ipv6: bool | None = None) -> CaptureState:
    """Remove every chain, jump and policy route of ours from the pod namespace (both backends, both
    families); returns `absent`, or `netns-missing` when the namespace is gone."""
    states = [_remove(netns, pod_capture(DEFAULT_OPTIONS, family), backend=backend, who=pod)
              for family in _families(ipv6)]
    if any(s.status is CaptureStatus.NETNS_MISSING for s in states):
        return next(s for s in states if s.status is CaptureStatus.NETNS_MISSING)
    return combine(*states) if len(states) == 2 else states[0]


def _split(pod_ips: Iterable[str]) -> dict[int, list[str]]:
    """The pods' addresses by IP family (each family's probe SNAT is its own rule set)."""
    out: dict[int, list[str]] = {4: [], 6: []}
    for ip in pod_ips:
        out[6 if ":" in ip else 4].append(ip)
    return out


def probe_snat_state(netns: str | None, pod_ips: Iterable[str], *, backend: str,
                     probe_address: str | None = None, family: int = 4) -> CaptureState:
    """The node's probe SNAT of one family (in the node namespace at `netns`; None: our own) against the
    `pod_ips` of that family."""
    desired = node_probe_snat(_split(pod_ips)[family], probe_address, family)
    if not netns_present(netns):
        return missing_netns(_label(netns), backend, desired)
    try:
        return _state(netns, desired, backend)
    except _NetnsGone:
        return missing_netns(_label(netns), backend, desired)


def apply_probe_snat(netns: str | None, pod_ips: Iterable[str], *, backend: str,
                     probe_address: str | None = None, force: bool = False) -> CaptureState:
    """SNAT connections from the node's own processes to `pod_ips` (the node's enrolled pods' addresses, of
    either family) to the probe address of their family, in the node namespace at `netns` (None: the
    agent's own). The IPv6 set is written only while some pod has an IPv6 address (and removed after), so an
    IPv4-only node never gets ip6tables rules of ours."""
    split = _split(pod_ips)
    first = _ensure(netns, node_probe_snat(split[4], probe_address), backend=backend,
                    who="node", force=force)
    if first.status is CaptureStatus.NETNS_MISSING:
        return first
    if split[6]:
        return combine(first, _ensure(netns, node_probe_snat(split[6], None, 6), backend=backend, who="node",
                                      force=force))
    _remove(netns, node_probe_snat((), None, 6), backend=backend, who="node")
    return first


def remove_probe_snat(netns: str | None, *, backend: str) -> CaptureState:
    """Remove the node's probe SNAT chains and their jumps (both families)."""
    first = _remove(netns, node_probe_snat(()), backend=backend, who="node")
    if first.status is CaptureStatus.NETNS_MISSING:
        return first
    return combine(first, _remove(netns, node_probe_snat((), None, 6), backend=backend, who="node"))


def _ensure(netns: str | None, desired: RuleSet, *, backend: str, who: str, force: bool) -> CaptureState:
    where = _label(netns)
    if not netns_present(netns):
        log.info("capture skipped: namespace gone", pod=who, netns=where)
        return missing_netns(where, backend, desired)
    try:
        live = _read_all(netns, desired, backend)
        before = _assess(netns, desired, backend, live)
        if before.status is CaptureStatus.INSTALLED and not force:
            return before
        if live.other is not None:
            NetnsIptables(live.other_backend, path=netns, ipv6=_ipv6(desired)).restore(cleanup_payload(live.other))
        if desired.routing is not None and live.routing != LiveRouting(1, True):
            _ensure_routing(netns, desired.routing, live.routing or LiveRouting())
        NetnsIptables(backend, path=netns, ipv6=_ipv6(desired)).restore(restore_payload(desired, live.rules))
        after = _state(netns, desired, backend)
    except (_NetnsGone, IptablesError, RedirectError, OSError, CommandError) as exc:
        if not netns_present(netns):
            log.info("capture abandoned: namespace gone", pod=who, netns=where)
            return missing_netns(where, backend, desired)
        _undo(netns, desired, backend, who)
        raise CaptureError(who, where, str(exc)) from exc
    if after.status is not CaptureStatus.INSTALLED:
        _undo(netns, desired, backend, who)
        raise CaptureError(who, where, f"the rules read back {after.status}: missing {list(after.missing)}, "
                                       f"unexpected {list(after.unexpected)}")
    log.info("capture applied", pod=who, netns=where, backend=backend, ruleset=desired.name, was=str(before.status),
             fingerprint=desired.fingerprint)
    return after


def _undo(netns: str | None, desired: RuleSet, backend: str, who: str) -> None:
    try:
        _remove(netns, desired, backend=backend, who=who)
    except RedirectError as exc:  # the original failure is what the caller needs to see
        log.error("capture rollback failed", pod=who, netns=_label(netns), reason=str(exc))


def _remove(netns: str | None, desired: RuleSet, *, backend: str, who: str) -> CaptureState:
    where = _label(netns)
    if not netns_present(netns):
        return missing_netns(where, backend, desired)
    try:
        for name in (backend, next(b for b in BACKENDS if b != backend)):
            if name != backend and name == "legacy" and not _legacy_tables_exist(netns, _ipv6(desired)):
                continue
            try:
                live = _read(netns, name, desired)
            except (IptablesError, FileNotFoundError):
                if name == backend:
                    raise
                continue
            if not live.empty:
                NetnsIptables(name, path=netns, ipv6=_ipv6(desired)).restore(cleanup_payload(live))
        if desired.routing is not None:
            _remove_routing(netns, desired.routing)
        after = _state(netns, desired, backend)
    except (_NetnsGone, IptablesError, RedirectError, OSError, CommandError) as exc:
        if not netns_present(netns):
            return missing_netns(where, backend, desired)
        raise CaptureError(who, where, f"removal failed: {exc}") from exc
    if after.status is not CaptureStatus.ABSENT:
        raise CaptureError(who, where, f"removal read back {after.status}: {list(after.unexpected)}")
    log.info("capture removed", pod=who, netns=where, backend=backend, ruleset=desired.name)
    return after


def _ensure_routing(netns: str | None, route: PolicyRoute, live: LiveRouting) -> None:
    for _ in range(live.rules - 1):  # duplicates
        _run(netns, [*route.ip(), "rule", "del", *route.rule_args()])
    if live.rules == 0:
        _run(netns, [*route.ip(), "rule", "add", *route.rule_args()])
    _run(netns, [*route.ip(), "route", "replace", *route.route_args()])


def _remove_routing(netns: str | None, route: PolicyRoute) -> None:
    live = _read_routing(netns, route)
    for _ in range(live.rules):
        _run(netns, [*route.ip(), "rule", "del", *route.rule_args()])
    if live.route:
        _run(netns, [*route.ip(), "route", "del", *route.route_args()])


def rule_counters(netns: str | None, *, backend: str, table: str, ipv6: bool = False) -> dict[str, int]:
    """{`-A chain spec`: packets} for our chains' rules in `table` (what `inspect` shows, and what tests
    read to prove which rule a connection took); ip6tables' with `ipv6`."""
    text = _run(netns, Iptables(backend, ipv6=ipv6)._argv("save", "-c", "-t", table)).stdout
    counters: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("[") and " -A NODEAGENT_" in line:
            packets = int(line[1:line.index(":")])
            counters[line.split("] ", 1)[1]] = packets
    return counters
