"""Owned iptables rule sets and how to write, read and remove them atomically. Pure.

A `RuleSet` is everything one job of ours puts into a network namespace: chains with our own names,
their rules, the jumps that hook them into the built-in chains, and (for the capture) a policy
route. Rules are kept exactly as `iptables-save` prints them (both backends print them alike), so the
live state reads back as text and compares with `==`.

The jumps live in chains other programs own, so a restore cannot flush them. Instead the payload is
rendered against what is live (`LiveRules`, read from `iptables-save`): every jump of ours that is
not the desired one (an old fingerprint, a duplicate) is deleted, and the desired one inserted only
when absent. One `iptables-restore --noflush` then moves the namespace from whatever it held to
exactly the desired set; applying it twice is the same as once. Each jump carries a comment with
the rule set's fingerprint, so rules left by a run with other content are told apart from rules
someone edited by hand (see `nodeagent.mesh.capture`).
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

# mangle before nat: applied in this order, marks exist before anything is captured;
# removed in the reverse order, capture stops first.
TABLE_ORDER = ("mangle", "nat")
_FINGERPRINT = re.compile(r'--comment "?nodeagent (?P<name>[a-z-]+) (?P<digest>[0-9a-f]{12})"?')


@dataclass(frozen=True, slots=True)
class Rule:
    """`-A chain spec` in `table`; `spec` as iptables-save prints it; `reason` says why it exists."""

    table: str
    chain: str
    spec: str
    reason: str = field(compare=False)

    @property
    def line(self) -> str:
        """The rule as restore input and iptables-save print it."""
        return f"-A {self.chain} {self.spec}"


@dataclass(frozen=True, slots=True)
class Hook:
    """A jump from the built-in chain `source` of `table` into our chain `target`."""

    table: str
    source: str
    target: str


@dataclass(frozen=True, slots=True)
class PolicyRoute:
    """`ip rule add fwmark MARK/MASK lookup TABLE pref PRIORITY` plus `ip route add local 0.0.0.0/0 dev lo
    table TABLE`: packets carrying the mark are delivered locally, whatever their destination. With `family`
    6, the same with `ip -6` and `local ::/0` (IPv6 rules and routes are a table of their own)."""

    mark: int
    mask: int
    table: int
    priority: int
    family: int = 4

    def ip(self) -> list[str]:
        """`ip`, or `ip -6`: the command these rules and routes are read and written with."""
        return ["ip"] if self.family == 4 else ["ip", "-6"]

    def rule_args(self) -> list[str]:
        """The selector of `ip rule add|del`."""
        return ["fwmark", f"{self.mark:#x}/{self.mask:#x}", "lookup", str(self.table), "pref", str(self.priority)]

    def route_args(self) -> list[str]:
        """The route of `ip route replace|del`."""
        return ["local", "0.0.0.0/0" if self.family == 4 else "::/0", "dev", "lo", "table", str(self.table)]

    def describe(self) -> tuple[str, str]:
        """The rule and the route as one line each (for state reports and `inspect`)."""
        ip = " ".join(self.ip())
        return f"{ip} rule " + " ".join(self.rule_args()), f"{ip} route " + " ".join(self.route_args())


@dataclass(frozen=True, slots=True)
class RuleSet:
    """One job's chains, rules, jumps and policy route; `name` (e.g. `capture`) appears in the jumps' comments."""

    name: str
    chains: tuple[tuple[str, str], ...]  # (table, chain), all owned by this set
    rules: tuple[Rule, ...]
    hooks: tuple[Hook, ...]
    routing: PolicyRoute | None = None
    family: int = 4  # 6: written with ip6tables

    @property
    def fingerprint(self) -> str:
        """12 hex digits naming the content: equal rule sets, equal fingerprints (across runs and hosts)."""
        text = "\n".join([*(f"{t}:{c}" for t, c in self.chains), *(f"{r.table}:{r.line}" for r in self.rules),
                          *(f"{h.table}:{h.source}>{h.target}" for h in self.hooks),
                          *(self.routing.describe() if self.routing else ())])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def jump_spec(self, hook: Hook) -> str:
        """The jump rule as iptables-save prints it (after `-A source `)."""
        return f'-m comment --comment "nodeagent {self.name} {self.fingerprint}" -j {hook.target}'

    def tables(self) -> list[str]:
        """The tables this set writes, in the order they are applied."""
        present = {t for t, _ in self.chains}
        return [t for t in TABLE_ORDER if t in present]

    def chain_rules(self, table: str, chain: str) -> tuple[str, ...]:
        """The desired rules of one chain, in order."""
        return tuple(r.spec for r in self.rules if r.table == table and r.chain == chain)

    def owned(self) -> frozenset[tuple[str, str]]:
        """Every (table, chain) this set owns: what reading and cleanup look for."""
        return frozenset(self.chains)


@dataclass(frozen=True, slots=True)
class LiveRules:
    """What of a rule set's chains one backend holds now: the chains, their rules in order, and every
    rule elsewhere that jumps into them (table, chain, spec), duplicates included."""

    chains: frozenset[tuple[str, str]] = frozenset()
    rules: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    jumps: tuple[tuple[str, str, str], ...] = ()

    @property
    def empty(self) -> bool:
        """No chain of ours and no jump into one."""
        return not self.chains and not self.jumps

    def fingerprints(self) -> set[str]:
        """The fingerprints the jumps carry (a jump without one, e.g. written by hand, carries none)."""
        return {found["digest"] for _, _, spec in self.jumps if (found := _FINGERPRINT.search(spec))}

    def lines(self) -> list[str]:
        """Everything of ours, one `table: rule` line each (for logs and drift reports)."""
        out = [f"{t}: -A {s} {spec}" for t, s, spec in self.jumps]
        for (table, chain) in sorted(self.chains):
            out += [f"{table}: -A {chain} {spec}" for spec in self.rules.get((table, chain), ())]
        return out


def parse_save(saves: Mapping[str, str], owned: Collection[tuple[str, str]]) -> LiveRules:
    """Read our chains out of `iptables-save -t TABLE` outputs ({table: text}); other chains are ignored
    except for their rules that jump into ours."""
    chains: set[tuple[str, str]] = set()
    rules: dict[tuple[str, str], list[str]] = {}
    jumps: list[tuple[str, str, str]] = []
    for table, text in saves.items():
        ours = {c for t, c in owned if t == table}
        for line in text.splitlines():
            if line.startswith(":") and (name := line[1:].split()[0]) in ours:
                chains.add((table, name))
            elif line.startswith("-A "):
                _, chain, *rest = line.split(" ", 2)
                spec = rest[0] if rest else ""
                if chain in ours:
                    rules.setdefault((table, chain), []).append(spec)
                elif _target(spec) in ours:
                    jumps.append((table, chain, spec))
    return LiveRules(frozenset(chains), {k: tuple(v) for k, v in rules.items()}, tuple(jumps))


def _target(spec: str) -> str | None:
    try:
        words = shlex.split(spec)
    except ValueError:  # an unbalanced quote in someone else's comment: not a jump of ours
        return None
    for flag in ("-j", "-g"):
        if flag in words and words.index(flag) + 1 < len(words):
            return words[words.index(flag) + 1]
    return None


def restore_payload(desired: RuleSet, live: LiveRules | None = None) -> str:
    """iptables-restore (`--noflush`) input that turns `live` (None: nothing of ours) into `desired`.

    Our chains are declared (created, or flushed when they exist) and refilled; jumps of ours that are
    not the desired one are deleted and the desired one is inserted first where it is missing; chains
    of ours that are no longer desired are flushed and deleted.
    """
    live = live or LiveRules()
    wanted = desired.owned()
    out: list[str] = []
    for table in _tables(desired.tables(), live):
        chains = [c for t, c in desired.chains if t == table]
        obsolete = sorted(c for t, c in live.chains if t == table and (t, c) not in wanted)
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in (*chains, *obsolete)]
        keep = {(h.source, desired.jump_spec(h)) for h in desired.hooks if h.table == table}
        kept: set[tuple[str, str]] = set()
        for t, source, spec in live.jumps:
            if t != table:
                continue
            if (source, spec) in keep and (source, spec) not in kept:
                kept.add((source, spec))  # the first copy stays; a duplicate goes
            else:
                out.append(f"-D {source} {spec}")
        out += [f"-X {c}" for c in obsolete]
        out += [f"-I {h.source} 1 {desired.jump_spec(h)}" for h in desired.hooks
                if h.table == table and (h.source, desired.jump_spec(h)) not in kept]
        out += [r.line for r in desired.rules if r.table == table]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def cleanup_payload(live: LiveRules) -> str:
    """iptables-restore (`--noflush`) input that removes exactly our chains and the jumps into them
    (empty when there is nothing of ours)."""
    out: list[str] = []
    for table in reversed(_tables([], live)):
        chains = sorted(c for t, c in live.chains if t == table)
        jumps = [f"-D {source} {spec}" for t, source, spec in live.jumps if t == table]
        if not chains and not jumps:
            continue
        out += [f"*{table}", *jumps, *(f":{c} - [0:0]" for c in chains), *(f"-X {c}" for c in chains), "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def _tables(first: Iterable[str], live: LiveRules) -> list[str]:
    present = set(first) | {t for t, _ in live.chains} | {t for t, _, _ in live.jumps}
    ordered = [t for t in TABLE_ORDER if t in present]
    return ordered + sorted(present - set(ordered))
