"""Rules as iptables itself prints them: `iptables-save` and `iptables -L -n` layouts. Pure.

Users compare what a node runs with what it should run by diffing these against the kernel's own
listings, so the printers follow iptables 1.8's output byte for byte for every match and target
kube-proxy uses (checked against the real binaries in tests/integration/test_iptables_formats.py):
addresses gain /32 in save and lose it in -L, `-p` moves to the front, the MARK target prints as
`--set-xmark`, `recent` gains its defaults, a statistic probability is shown as the kernel stores it.
ip6tables prints the same rules with its family's defaults: `::/0`, a 128-bit `recent` mask, and REJECT's
`icmp6-port-unreachable` (kube-proxy writes a bare `-j REJECT` for both families).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nodeagent.service.iptables import names as n
from nodeagent.service.iptables.jumps import CANARY_TABLES, JUMPS, KUBELET_JUMPS
from nodeagent.service.iptables.render import Rendered

BUILTIN = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
           "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")}
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
_HEADER = {"-s", "-d", "-p"}
_SAVE_SAFE = set("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass
class Match:
    """One `-m module` with its options as (option, values, negated), in given order."""

    module: str
    options: list[tuple[str, list[str], bool]] = field(default_factory=list)

    def get(self, option: str) -> tuple[list[str], bool] | None:
        for name, values, negated in self.options:
            if name == option:
                return values, negated
        return None


@dataclass
class Rule:
    """A parsed `-A` rule."""

    chain: str
    source: str | None = None
    source_negated: bool = False
    destination: str | None = None
    destination_negated: bool = False
    protocol: str | None = None
    matches: list[Match] = field(default_factory=list)
    target: str | None = None
    target_options: list[tuple[str, list[str]]] = field(default_factory=list)


def parse_rule(line: str) -> Rule:
    """Parse one `-A CHAIN ...` line of restore input (quotes as iptables-restore reads them)."""
    tokens = shlex.split(line)
    if len(tokens) < 2 or tokens[0] != "-A":
        raise ValueError(f"not an -A rule: {line!r}")
    rule = Rule(tokens[1])
    i, negate, in_target = 2, False, False
    while i < len(tokens):
        token = tokens[i]
        if token == "!":
            negate = True
            i += 1
            continue
        if token in _HEADER:
            value = tokens[i + 1]
            if token == "-s":
                rule.source, rule.source_negated = value, negate
            elif token == "-d":
                rule.destination, rule.destination_negated = value, negate
            else:
                rule.protocol = value
            i, negate = i + 2, False
            continue
        if token == "-m":
            rule.matches.append(Match(tokens[i + 1]))
            i += 2
            continue
        if token == "-j":
            rule.target, in_target = tokens[i + 1], True
            i += 2
            continue
        if token.startswith("--"):
            values = []
            j = i + 1
            while j < len(tokens) and not tokens[j].startswith("-") and tokens[j] != "!":
                values.append(tokens[j])
                j += 1
            if in_target:
                rule.target_options.append((token, values))
            else:
                owner = _owner(rule.matches, token)
                owner.options.append((token, values, negate))
            i, negate = j, False
            continue
        raise ValueError(f"unexpected {token!r} in {line!r}")
    return rule


_PORT_OPTIONS = {"--dport", "--sport"}


def _owner(matches: list[Match], option: str) -> Match:
    """The match an option belongs to: port options go to the protocol match wherever they appear."""
    if option in _PORT_OPTIONS:
        for match in reversed(matches):
            if match.module in PROTOCOL_NUMBERS:
                return match
    if not matches:
        raise ValueError(f"option {option} before any -m")
    return matches[-1]


def _hex(value: str) -> str:
    return f"0x{int(value, 0):x}"


def _probability_as_stored(text: str) -> float:
    # xt_statistic keeps the probability as a 31-bit fraction (libxt_statistic: lround(0x80000000 * p)).
    return float(round(0x80000000 * float(text))) / 0x80000000


def save_string(value: str) -> str:
    """libxtables' `xtables_save_string`: bare if only [A-Za-z0-9_-], else double-quoted and escaped."""
    if value and all(c in _SAVE_SAFE for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    return f'"{escaped}"'


def _with_mask(address: str) -> str:
    return address if "/" in address else f"{address}/{128 if ':' in address else 32}"


def _without_host_mask(address: str) -> str:
    return address.removesuffix("/32").removesuffix("/128")


_ANY = {4: "0.0.0.0/0", 6: "::/0"}
_HOST_MASK = {4: "255.255.255.255", 6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}
_REJECT_WITH = {4: "icmp-port-unreachable", 6: "icmp6-port-unreachable"}


def save_line(rule: Rule, family: int = 4) -> str:
    """The rule as `iptables-save` (`ip6tables-save` for family 6) prints it."""
    out = [f"-A {rule.chain}"]
    if rule.source is not None:
        out.append(f"{'! ' if rule.source_negated else ''}-s {_with_mask(rule.source)}")
    if rule.destination is not None:
        out.append(f"{'! ' if rule.destination_negated else ''}-d {_with_mask(rule.destination)}")
    if rule.protocol is not None:
        out.append(f"-p {rule.protocol}")
    for match in rule.matches:
        out.append(f"-m {match.module}" + "".join(f" {o}" for o in _save_match(match, family)))
    if rule.target is not None:
        out.append(f"-j {rule.target}" + "".join(f" {o}" for o in _save_target(rule, family)))
    return " ".join(out)


def _neg(negated: bool) -> str:
    return "! " if negated else ""


def _save_match(match: Match, family: int) -> list[str]:
    m = match.module
    if m == "comment":
        values, _ = match.get("--comment") or ([""], False)
        return [f"--comment {save_string(values[0])}"]
    if m in PROTOCOL_NUMBERS:
        return [f"{_neg(neg)}{opt} {values[0]}" for opt, values, neg in match.options]
    if m == "addrtype":
        found = [(o, v, neg) for o, v, neg in match.options]
        order = {"--src-type": 0, "--dst-type": 1}
        return [f"{_neg(neg)}{o} {v[0]}" for o, v, neg in sorted(found, key=lambda x: order.get(x[0], 2))]
    if m == "mark":
        values, neg = match.get("--mark") or ([""], False)
        value = "/".join(_hex(part) for part in values[0].split("/"))
        return [f"{_neg(neg)}--mark {value}"]
    if m == "conntrack":
        return [f"{_neg(neg)}{o} {','.join(v)}" for o, v, neg in match.options]
    if m == "statistic":
        mode = (match.get("--mode") or (["random"], False))[0][0]
        prob = (match.get("--probability") or (["1"], False))[0][0]
        return [f"--mode {mode}", f"--probability {_probability_as_stored(prob):.11f}"]
    if m == "nfacct":  # libxt_nfacct prints "--nfacct-name " and then the name with its own leading space
        return [f"--nfacct-name  {(match.get('--nfacct-name') or ([''], False))[0][0]}"]
    if m == "recent":
        name = (match.get("--name") or (["DEFAULT"], False))[0][0]
        out = []
        for action in ("--set", "--rcheck", "--update", "--remove"):
            if match.get(action) is not None:
                out.append(action)
        if (seconds := match.get("--seconds")) is not None:
            out.append(f"--seconds {seconds[0][0]}")
        if match.get("--reap") is not None:
            out.append("--reap")
        return [*out, f"--name {name}", f"--mask {_HOST_MASK[family]}", "--rsource"]
    return [f"{_neg(neg)}{o}" + "".join(f" {v}" for v in values) for o, values, neg in match.options]


def _save_target(rule: Rule, family: int) -> list[str]:
    opts = dict((o, v) for o, v in rule.target_options)
    if rule.target == "MARK":
        if "--or-mark" in opts:
            value = _hex(opts["--or-mark"][0])
            return [f"--set-xmark {value}/{value}"]
        if "--xor-mark" in opts:
            return [f"--set-xmark {_hex(opts['--xor-mark'][0])}/0x0"]
    if rule.target == "REJECT" and "--reject-with" not in opts:
        return [f"--reject-with {_REJECT_WITH[family]}"]
    return [o + "".join(f" {v}" for v in values) for o, values in rule.target_options]


def list_line(rule: Rule, family: int = 4) -> str:
    """The rule as `iptables -L -n` (iptables 1.8.9, numeric protocols; `ip6tables` for family 6) prints it."""
    target = rule.target or ""
    proto = str(PROTOCOL_NUMBERS.get(rule.protocol or "", 0))
    source = _without_host_mask(rule.source) if rule.source else _ANY[family]
    destination = _without_host_mask(rule.destination) if rule.destination else _ANY[family]
    line = (f"{target:<9} {' '}{proto:<5}-- {'!' if rule.source_negated else ' '}{source:<19} "
            f"{'!' if rule.destination_negated else ' '}{destination:<19} ")
    for match in rule.matches:
        line += _list_match(match, family)
    line += _list_target(rule, family)
    return line


def _list_match(match: Match, family: int) -> str:
    m = match.module
    if m == "comment":
        return f" /* {(match.get('--comment') or ([''], False))[0][0]} */"
    if m in PROTOCOL_NUMBERS:
        parts = []
        for opt, values, neg in match.options:
            key = "dpt" if opt == "--dport" else "spt"
            parts.append(f"{key}:{'!' if neg else ''}{values[0]}")
        return f" {m} " + " ".join(parts) if parts else f" {m}"
    if m == "addrtype":
        order = {"--src-type": 0, "--dst-type": 1}
        parts = [f"{'!' if neg else ''}{o[2:]} {v[0]}"
                 for o, v, neg in sorted(match.options, key=lambda x: order.get(x[0], 2))]
        return " ADDRTYPE match " + " ".join(parts)
    if m == "mark":
        values, neg = match.get("--mark") or ([""], False)
        value = "/".join(_hex(part) for part in values[0].split("/"))
        return f" mark match {'! ' if neg else ''}{value}"
    if m == "conntrack":
        return "".join(f" {'! ' if neg else ''}ctstate {','.join(v)}" for o, v, neg in match.options)
    if m == "nfacct":
        return f" nfacct-name  {(match.get('--nfacct-name') or ([''], False))[0][0]}"
    if m == "statistic":
        prob = (match.get("--probability") or (["1"], False))[0][0]
        return f" statistic mode random probability {_probability_as_stored(prob):.11f}"
    if m == "recent":
        name = (match.get("--name") or (["DEFAULT"], False))[0][0]
        out = " recent:"
        for action, label in (("--set", "SET"), ("--rcheck", "CHECK"), ("--update", "UPDATE"), ("--remove", "REMOVE")):
            if match.get(action) is not None:
                out += f" {label}"
        if (seconds := match.get("--seconds")) is not None:
            out += f" seconds: {seconds[0][0]}"
        if match.get("--reap") is not None:
            out += " reap"
        return out + f" name: {name} side: source mask: {_HOST_MASK[family]}"
    return f" {m}"


def _list_target(rule: Rule, family: int) -> str:
    opts = dict((o, v) for o, v in rule.target_options)
    if rule.target == "MARK":
        if "--or-mark" in opts:
            return f" MARK or {_hex(opts['--or-mark'][0])}"
        if "--xor-mark" in opts:
            return f" MARK xor {_hex(opts['--xor-mark'][0])}"
    if rule.target == "DNAT":
        return f" to:{opts['--to-destination'][0]}"
    if rule.target == "REJECT":
        return f" reject-with {opts.get('--reject-with', [_REJECT_WITH[family]])[0]}"
    if rule.target == "MASQUERADE":
        return " random-fully" if "--random-fully" in opts else ""
    return ""


@dataclass
class TableView:
    """One table as the node should hold it: built-in chains with our jumps, our chains, their rules."""

    name: str
    chains: list[str]
    rules: list[Rule]
    family: int = 4  # 6: as ip6tables prints it


def node_tables(rendered: Rendered, *, localhost_nodeports: bool = True) -> list[TableView]:
    """filter, nat (and mangle) as they look on the node after a full sync from scratch.

    Jump rules are each inserted at the top of their built-in chain, so the chain lists them in
    reverse order of insertion, exactly as on a kube-proxy node.
    """
    del localhost_nodeports  # the kubelet firewall chain is created either way, as kube-proxy does
    views = []
    for table, source in (("filter", rendered.filter), ("nat", rendered.nat), ("mangle", None)):
        jumps = [j for j in (*JUMPS, *KUBELET_JUMPS) if j.table == table]
        rules: list[Rule] = []
        for builtin in BUILTIN[table]:
            for jump in reversed([j for j in jumps if j.source == builtin]):
                rules.append(parse_rule(shlex.join(["-A", builtin, *jump.rule])))
        ours = set(source.chains) if source is not None else set()
        ours |= {j.target for j in jumps}
        if table in CANARY_TABLES:
            ours.add(n.KUBE_PROXY_CANARY)
        if source is not None:
            ours -= {line.split()[1] for line in source.rules if line.startswith("-X ")}
            rules.extend(parse_rule(line) for line in source.rules if line.startswith("-A "))
        views.append(TableView(table, [*BUILTIN[table], *sorted(ours)], rules, rendered.family))
    return views


def _by_chain(view: TableView) -> dict[str, list[Rule]]:
    grouped: dict[str, list[Rule]] = {c: [] for c in view.chains}
    for rule in view.rules:
        grouped.setdefault(rule.chain, []).append(rule)
    return grouped


def format_save(views: Iterable[TableView]) -> str:
    """The tables in `iptables-save` layout (without its comment lines)."""
    out = []
    for view in views:
        grouped = _by_chain(view)
        out.append(f"*{view.name}")
        out.extend(f":{c} ACCEPT [0:0]" if c in BUILTIN[view.name] else f":{c} - [0:0]" for c in view.chains)
        out.extend(save_line(r, view.family) for c in view.chains for r in grouped[c])
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def format_list(view: TableView) -> str:
    """One table in `iptables -t TABLE -L -n` layout."""
    grouped = _by_chain(view)
    references = {c: sum(1 for r in view.rules if r.target == c) for c in view.chains}
    blocks = []
    for chain in view.chains:
        head = (f"Chain {chain} (policy ACCEPT)" if chain in BUILTIN[view.name]
                else f"Chain {chain} ({references[chain]} references)")
        lines = [head, "target     prot opt source               destination         "]
        lines.extend(list_line(r, view.family) for r in grouped[chain])
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def ours_only(save_text: str) -> list[str]:
    """The lines of an iptables-save dump that belong to kube-proxy's chains (for diffs against the kernel)."""
    def ours(line: str) -> bool:
        if line.startswith(("*", "COMMIT")):
            return True
        if line.startswith(":"):
            return line[1:].startswith("KUBE-")
        return line.startswith("-A ") and ("KUBE-" in line.split()[1] or " -j KUBE-" in line)

    return [line for line in save_text.splitlines() if ours(line)]


def table_order(views: Sequence[TableView], text: str) -> list[TableView]:
    """`views` reordered as the tables appear in an iptables-save `text` (nft and legacy differ)."""
    order = [line[1:] for line in text.splitlines() if line.startswith("*")]
    return sorted(views, key=lambda v: order.index(v.name) if v.name in order else len(order))
