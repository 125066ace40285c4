"""What a namespace's capture looks like compared with what it should be, and what to do about it. Pure.

The kernel layer reads the live rules (iptables-save of both backends, `ip rule`, `ip route`) and
hands them here; `assess` names the state and the lines that differ; `ACTION` says what a reconciler
does in each state.

States and their invariants:
- absent:        nothing of ours in the namespace (no chain, no jump, no policy route of ours).
- installed:     exactly the desired rules, each desired jump once, the policy route once, nothing else.
- drifted:       ours is there but differs from what we wrote (a rule deleted or added by hand, a
                 jump missing or duplicated, the route gone); the fingerprint, where visible, is ours.
- stale:         a previous run wrote other content (the jumps carry another fingerprint), or our
                 chains sit in the other iptables backend.
- netns-missing: the namespace is gone (the pod was deleted); there is nothing to repair.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from nodeagent.mesh.iptables.rules import LiveRules, PolicyRoute, RuleSet


class CaptureStatus(StrEnum):
    """The named states of a namespace's capture (see the module docstring for their invariants)."""

    ABSENT = "absent"
    INSTALLED = "installed"
    DRIFTED = "drifted"
    STALE = "stale"
    NETNS_MISSING = "netns-missing"


class Action(StrEnum):
    """What a reconciler does about a state when it wants the capture in place."""

    APPLY = "apply"  # install from nothing
    NOTHING = "nothing"
    REPAIR = "repair"  # reapply atomically over what is there
    RELEASE = "release"  # forget the pod: its namespace, and our rules with it, are gone


# Every state has exactly one action; a reconciler never leaves a state it can act on untouched.
ACTION: Mapping[CaptureStatus, Action] = {
    CaptureStatus.ABSENT: Action.APPLY,
    CaptureStatus.INSTALLED: Action.NOTHING,
    CaptureStatus.DRIFTED: Action.REPAIR,
    CaptureStatus.STALE: Action.REPAIR,
    CaptureStatus.NETNS_MISSING: Action.RELEASE,
}


@dataclass(frozen=True, slots=True)
class LiveRouting:
    """How many of our policy rules, and whether our local route, the namespace holds."""

    rules: int = 0
    route: bool = False


@dataclass(frozen=True, slots=True)
class CaptureState:
    """A namespace's capture as read from the kernel, against the desired rule set."""

    status: CaptureStatus
    netns: str
    backend: str
    fingerprint: str = ""  # of the desired rule set
    live_fingerprints: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  # desired, not in the kernel
    unexpected: tuple[str, ...] = ()  # ours in the kernel, not desired

    def __repr__(self) -> str:
        return (f"<CaptureState [{self.status}, {self.netns}, {self.backend}, missing={len(self.missing)}, "
                f"unexpected={len(self.unexpected)}]>")

    @property
    def action(self) -> Action:
        """What a reconciler does about this state (`ACTION`)."""
        return ACTION[self.status]


def assess(desired: RuleSet, live: LiveRules, routing: LiveRouting | None, *, netns: str, backend: str,
           other: LiveRules | None = None, other_backend: str = "") -> CaptureState:
    """Compare what one backend (and the policy routing) holds with `desired`.

    `other` is what of ours the other backend holds: after a backend switch a previous run's rules
    would otherwise keep capturing beside ours.
    """
    missing: list[str] = []
    unexpected: list[str] = []
    for table, chain in desired.chains:
        want, have = desired.chain_rules(table, chain), live.rules.get((table, chain), ())
        if (table, chain) not in live.chains:
            missing.append(f"{table}: chain {chain}")
        missing += [f"{table}: -A {chain} {s}" for s in _minus(want, have)]
        unexpected += [f"{table}: -A {chain} {s}" for s in _minus(have, want)]
        if not _minus(want, have) and not _minus(have, want) and want != have:
            unexpected.append(f"{table}: chain {chain} holds the rules in another order")
    for table, chain in sorted(live.chains - desired.owned()):
        unexpected.append(f"{table}: chain {chain}")
    jumps = Counter((t, s, spec) for t, s, spec in live.jumps)
    wanted = {(h.table, h.source, desired.jump_spec(h)) for h in desired.hooks}
    for table, source, spec in sorted(wanted):
        if jumps[(table, source, spec)] == 0:
            missing.append(f"{table}: -A {source} {spec}")
        elif jumps[(table, source, spec)] > 1:
            unexpected.append(f"{table}: -A {source} {spec} (x{jumps[(table, source, spec)]})")
    unexpected += [f"{t}: -A {s} {spec}" for (t, s, spec) in sorted(jumps) if (t, s, spec) not in wanted]
    if desired.routing is not None:
        rule_line, route_line = desired.routing.describe()
        routing = routing or LiveRouting()
        if routing.rules == 0:
            missing.append(rule_line)
        elif routing.rules > 1:
            unexpected.append(f"{rule_line} (x{routing.rules})")
        if not routing.route:
            missing.append(route_line)
    other_lines = [f"{other_backend} {line}" for line in other.lines()] if other is not None else []
    unexpected += other_lines
    fingerprints = tuple(sorted(live.fingerprints()))
    ours_routing = routing is not None and (routing.rules > 0 or routing.route)
    if live.empty and not ours_routing and not other_lines:
        status = CaptureStatus.ABSENT
    elif not missing and not unexpected:
        status = CaptureStatus.INSTALLED
    elif other_lines or (fingerprints and desired.fingerprint not in fingerprints):
        status = CaptureStatus.STALE
    else:
        status = CaptureStatus.DRIFTED
    return CaptureState(status, netns, backend, desired.fingerprint, fingerprints, tuple(missing), tuple(unexpected))


def _minus(a: tuple[str, ...], b: tuple[str, ...]) -> list[str]:
    """Multiset difference in a's order."""
    left = Counter(b)
    out = []
    for item in a:
        if left[item]:
            left[item] -= 1
        else:
            out.append(item)
    return out


# When the families disagree, the state that needs the most work names the whole: a namespace captured for
# IPv4 only is not installed (its IPv6 traffic would pass uncaptured, around policy).
_SEVERITY = (CaptureStatus.NETNS_MISSING, CaptureStatus.STALE, CaptureStatus.DRIFTED, CaptureStatus.ABSENT,
             CaptureStatus.INSTALLED)


def combine(ipv4: CaptureState, ipv6: CaptureState) -> CaptureState:
    """One state for a namespace captured in both families: installed or absent only when both are, and
    the IPv6 lines marked `ip6tables` (the fingerprints reported, desired and live, are the IPv4 set's: the
    IPv6 set is rendered from the same options, so they change together)."""
    if ipv4.status is ipv6.status:
        status = ipv4.status
    else:
        status = next(s for s in _SEVERITY if s in (ipv4.status, ipv6.status))
        if status is CaptureStatus.ABSENT:  # one family installed, the other absent: half a capture
            status = CaptureStatus.DRIFTED
    return CaptureState(status, ipv4.netns, ipv4.backend, ipv4.fingerprint, ipv4.live_fingerprints,
                        (*ipv4.missing, *(f"ip6tables {line}" for line in ipv6.missing)),
                        (*ipv4.unexpected, *(f"ip6tables {line}" for line in ipv6.unexpected)))


def missing_netns(netns: str, backend: str, desired: RuleSet) -> CaptureState:
    """The state of a namespace that no longer exists."""
    return CaptureState(CaptureStatus.NETNS_MISSING, netns, backend, desired.fingerprint)


def parse_ip_rules(text: str, route: PolicyRoute) -> int:
    """How many rules of `ip -json rule show` are ours (same priority, fwmark/mask and table)."""
    entries = json.loads(text) if text.strip() else []
    return sum(1 for e in entries
               if e.get("priority") == route.priority and str(e.get("table")) == str(route.table)
               and _int(e.get("fwmark")) == route.mark and _int(e.get("fwmask", "0xffffffff")) == route.mask)


def parse_ip_routes(text: str) -> bool:
    """Whether `ip [-6] -json route show table T` holds the local default route via lo."""
    entries = json.loads(text) if text.strip() else []
    return any(e.get("type") == "local" and e.get("dst") in ("default", "0.0.0.0/0", "::/0") and e.get("dev") == "lo"
               for e in entries)


def _int(value: object) -> int | None:
    try:
        return int(str(value), 0)
    except ValueError:
        return None
