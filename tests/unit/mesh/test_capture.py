"""Reading the capture back and naming its state; payloads checked against a model of iptables-restore.

`Tables` below executes restore input the way the kernel's restore does for the commands we emit
(`:chain` creates or flushes, `-D` of an absent rule and `-X` of a referenced chain fail the whole
table), so the properties hold for what the kernel would do: from any mix of old, duplicated,
hand-written and foreign rules, one payload reaches exactly the desired set, a second one changes
nothing, and cleanup leaves only the foreign rules.
"""

from __future__ import annotations

import dataclasses
import json
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.mesh.capture import (
    ACTION,
    Action,
    CaptureStatus,
    LiveRouting,
    assess,
    parse_ip_routes,
    parse_ip_rules,
)
from nodeagent.mesh.iptables.render import CaptureOptions, node_probe_snat, pod_capture
from nodeagent.mesh.iptables.rules import LiveRules, RuleSet, cleanup_payload, parse_save, restore_payload

BUILTIN = {"mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
           "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}
ROUTED = LiveRouting(rules=1, route=True)


class RestoreError(Exception):
    pass


class Tables:
    """A model of the tables restore edits: {table: {chain: [spec, ...]}} (chain order: creation order)."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, list[str]]] = {t: {c: [] for c in cs} for t, cs in BUILTIN.items()}

    def restore(self, text: str) -> None:
        """Apply `text` as `iptables-restore --noflush`; a failing table is left as it was."""
        table, work = "", {}
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
                work = {c: list(r) for c, r in self.tables[table].items()}
            elif line == "COMMIT":
                self.tables[table] = work
            elif line.startswith(":"):
                work[line[1:].split()[0]] = []
            else:
                op, chain, *rest = line.split(" ", 2)
                if chain not in work:
                    raise RestoreError(f"{line}: no chain {chain}")
                if op == "-A":
                    work[chain].append(rest[0])
                elif op == "-I":
                    position, spec = rest[0].split(" ", 1)
                    work[chain].insert(int(position) - 1, spec)
                elif op == "-D":
                    if rest[0] not in work[chain]:
                        raise RestoreError(f"{line}: no such rule")
                    work[chain].remove(rest[0])
                elif op == "-X":
                    if work[chain] or any(chain in shlex.split(s) for rs in work.values() for s in rs):
                        raise RestoreError(f"{line}: chain not empty or referenced")
                    del work[chain]

    def save(self) -> dict[str, str]:
        out = {}
        for table, chains in self.tables.items():
            lines = [f"*{table}", *(f":{c} {'ACCEPT' if c in BUILTIN[table] else '-'} [0:0]" for c in chains)]
            lines += [f"-A {c} {spec}" for c, rules in chains.items() for spec in rules]
            out[table] = "\n".join([*lines, "COMMIT"]) + "\n"
        return out

    def live(self, desired: RuleSet) -> LiveRules:
        return parse_save(self.save(), desired.owned())

    def foreign(self, desired: RuleSet) -> dict[str, dict[str, list[str]]]:
        ours = {c for _, c in desired.chains}
        return {t: {c: [s for s in r if not set(shlex.split(s)) & ours] for c, r in cs.items() if c not in ours}
                for t, cs in self.tables.items()}


def state(tables: Tables, desired: RuleSet, routing: LiveRouting | None = ROUTED) -> CaptureStatus:
    return assess(desired, tables.live(desired), routing, netns="/run/netns/x", backend="nft").status


DEFAULT = pod_capture()


def installed(desired: RuleSet = DEFAULT) -> Tables:
    tables = Tables()
    tables.restore(restore_payload(desired))
    return tables


def test_fresh_namespace_is_absent_and_the_payload_installs_it() -> None:
    tables = Tables()
    assert state(tables, DEFAULT, LiveRouting()) is CaptureStatus.ABSENT
    tables.restore(restore_payload(DEFAULT, tables.live(DEFAULT)))
    assert state(tables, DEFAULT) is CaptureStatus.INSTALLED


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda t: t.tables["nat"]["NODEAGENT_OUTPUT"].pop(2), CaptureStatus.DRIFTED),  # a rule deleted by hand
    (lambda t: t.tables["nat"]["NODEAGENT_OUTPUT"].append("-j RETURN"), CaptureStatus.DRIFTED),  # one added
    (lambda t: t.tables["nat"]["NODEAGENT_OUTPUT"].reverse(), CaptureStatus.DRIFTED),  # reordered
    (lambda t: t.tables["mangle"]["OUTPUT"].clear(), CaptureStatus.DRIFTED),  # a jump gone
    (lambda t: t.tables["nat"]["OUTPUT"].append(t.tables["nat"]["OUTPUT"][0]), CaptureStatus.DRIFTED),  # twice
    (lambda t: t.tables["nat"].pop("NODEAGENT_PRERT") and t.tables["nat"]["PREROUTING"].clear(),
     CaptureStatus.DRIFTED),  # a chain gone with its jump
])
def test_hand_edits_are_drift(edit: object, expected: CaptureStatus) -> None:
    tables = installed()
    edit(tables)  # type: ignore[operator]
    assert state(tables, DEFAULT) is expected
    tables.restore(restore_payload(DEFAULT, tables.live(DEFAULT)))
    assert state(tables, DEFAULT) is CaptureStatus.INSTALLED


def test_missing_or_duplicated_policy_route_is_drift_and_named() -> None:
    tables = installed()
    result = assess(DEFAULT, tables.live(DEFAULT), LiveRouting(rules=0, route=True), netns="n", backend="nft")
    assert result.status is CaptureStatus.DRIFTED
    assert result.missing == ("ip rule fwmark 0x111/0xfff lookup 100 pref 32764",)
    result = assess(DEFAULT, tables.live(DEFAULT), LiveRouting(rules=2, route=False), netns="n", backend="nft")
    assert result.missing == ("ip route local 0.0.0.0/0 dev lo table 100",)
    assert result.unexpected == ("ip rule fwmark 0x111/0xfff lookup 100 pref 32764 (x2)",)
    only_routing = assess(DEFAULT, LiveRules(), ROUTED, netns="n", backend="nft")
    assert only_routing.status is CaptureStatus.DRIFTED  # ours, half there: never called absent


def test_rules_of_a_previous_run_with_other_content_are_stale() -> None:
    previous = pod_capture(CaptureOptions(exclude_outbound_ports=(5432,)))
    tables = installed(previous)
    result = assess(DEFAULT, tables.live(DEFAULT), ROUTED, netns="n", backend="nft")
    assert result.status is CaptureStatus.STALE
    assert result.live_fingerprints == (previous.fingerprint,)
    assert "nat: -A NODEAGENT_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN" in result.unexpected
    tables.restore(restore_payload(DEFAULT, tables.live(DEFAULT)))
    assert state(tables, DEFAULT) is CaptureStatus.INSTALLED
    assert "--dport 5432" not in json.dumps(tables.tables)


def test_rules_in_the_other_backend_are_stale_and_named_with_it() -> None:
    tables = installed()
    result = assess(DEFAULT, tables.live(DEFAULT), ROUTED, netns="n", backend="nft",
                    other=installed().live(DEFAULT), other_backend="legacy")
    assert result.status is CaptureStatus.STALE
    assert any(line.startswith("legacy nat: -A NODEAGENT_OUTPUT") for line in result.unexpected)


def test_every_state_has_exactly_one_action() -> None:
    assert set(ACTION) == set(CaptureStatus)
    assert ACTION[CaptureStatus.INSTALLED] is Action.NOTHING
    assert ACTION[CaptureStatus.NETNS_MISSING] is Action.RELEASE
    assert {ACTION[s] for s in (CaptureStatus.DRIFTED, CaptureStatus.STALE)} == {Action.REPAIR}


def test_repr_names_the_state() -> None:
    result = assess(DEFAULT, LiveRules(), LiveRouting(), netns="/run/netns/p", backend="nft")
    assert repr(result).startswith("<CaptureState [absent, /run/netns/p, nft,")


def test_parse_save_ignores_foreign_chains_but_sees_their_jumps_into_ours() -> None:
    live = parse_save({"nat": "*nat\n:OUTPUT ACCEPT [0:0]\n:FOREIGN - [0:0]\n:NODEAGENT_OUTPUT - [0:0]\n"
                              "-A OUTPUT -m comment --comment \"it's odd\" -j FOREIGN\n"
                              "-A FOREIGN -g NODEAGENT_OUTPUT\n-A NODEAGENT_OUTPUT -j RETURN\nCOMMIT\n"},
                      DEFAULT.owned())
    assert live.chains == {("nat", "NODEAGENT_OUTPUT")}
    assert live.rules == {("nat", "NODEAGENT_OUTPUT"): ("-j RETURN",)}
    assert live.jumps == (("nat", "FOREIGN", "-g NODEAGENT_OUTPUT"),)


def test_ip_json_output_is_read_for_our_rule_and_route_only() -> None:
    route = DEFAULT.routing
    assert route is not None
    rules = json.dumps([{"priority": 0, "src": "all", "table": "local"},
                        {"priority": 32764, "src": "all", "fwmark": "0x111", "fwmask": "0xfff", "table": "100"},
                        {"priority": 32764, "src": "all", "fwmark": "0x111", "table": "100"},  # no mask: not ours
                        {"priority": 32765, "src": "all", "fwmark": "0x111", "fwmask": "0xfff", "table": "100"}])
    assert parse_ip_rules(rules, route) == 1
    assert parse_ip_rules("", route) == 0
    assert parse_ip_routes('[{"type":"local","dst":"default","dev":"lo","scope":"host","flags":[]}]')
    assert not parse_ip_routes('[{"type":"unicast","dst":"default","dev":"lo"}]')


# Live states reachable from outside: an earlier run with any options, hand edits, foreign rules.
_OPTIONS = st.builds(
    CaptureOptions,
    exclude_outbound_ports=st.lists(st.integers(1, 65535), max_size=3, unique=True).map(tuple),
    exclude_inbound_ports=st.lists(st.integers(1, 65535), max_size=3, unique=True).map(tuple),
    exclude_outbound_cidrs=st.lists(st.sampled_from(["10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12"]),
                                    max_size=2, unique=True).map(tuple))
_EDITS = st.lists(st.tuples(st.sampled_from(["drop", "dup-jump", "hand-jump", "foreign", "extra"]),
                            st.sampled_from(["nat", "mangle"]), st.integers(0, 20)), max_size=6)


def _mess(tables: Tables, edits: list[tuple[str, str, int]]) -> None:
    for kind, table, n in edits:
        chains = tables.tables[table]
        ours = [c for c in chains if c.startswith("NODEAGENT_")]
        if kind == "drop" and ours and chains[ours[n % len(ours)]]:
            chains[ours[n % len(ours)]].pop(n % len(chains[ours[n % len(ours)]]))
        elif kind == "dup-jump" and chains["OUTPUT"]:
            chains["OUTPUT"].append(chains["OUTPUT"][n % len(chains["OUTPUT"])])
        elif kind == "hand-jump" and ours:
            chains["OUTPUT"].insert(0, f"-j {ours[n % len(ours)]}")
        elif kind == "foreign":
            chains.setdefault("FOREIGN", []).append(f"-p tcp -m tcp --dport {n + 1} -j RETURN")
            chains["OUTPUT"].insert(n % (len(chains["OUTPUT"]) + 1), "-j FOREIGN")
        elif kind == "extra" and ours:
            chains[ours[n % len(ours)]].append(f"-p tcp -m tcp --dport {n + 1} -j ACCEPT")


@settings(max_examples=150, deadline=None)
@given(previous=st.one_of(st.none(), st.just("same"), _OPTIONS), edits=_EDITS, options=_OPTIONS)
def test_one_payload_reaches_exactly_the_desired_rules_from_any_live_state(
        previous: CaptureOptions | str | None, edits: list[tuple[str, str, int]], options: CaptureOptions) -> None:
    """previous: nothing, this very rule set (then hand-edited), or another run's."""
    desired = pod_capture(options)
    if previous == "same":
        previous = options
    tables = installed(pod_capture(previous)) if isinstance(previous, CaptureOptions) else Tables()
    _mess(tables, edits)
    foreign = tables.foreign(desired)
    tables.restore(restore_payload(desired, tables.live(desired)))
    assert state(tables, desired) is CaptureStatus.INSTALLED
    assert tables.foreign(desired) == foreign
    before = tables.save()
    tables.restore(restore_payload(desired, tables.live(desired)))  # idempotent
    assert tables.save() == before
    tables.restore(cleanup_payload(tables.live(desired)))
    assert tables.live(desired).empty
    assert tables.foreign(desired) == foreign
    assert state(tables, desired, LiveRouting()) is CaptureStatus.ABSENT


@settings(max_examples=50, deadline=None)
@given(before=st.lists(st.integers(2, 254), max_size=5), after=st.lists(st.integers(2, 254), max_size=5))
def test_probe_snat_follows_the_pod_list(before: list[int], after: list[int]) -> None:
    old = node_probe_snat(f"10.244.1.{i}" for i in before)
    new = node_probe_snat(f"10.244.1.{i}" for i in after)
    tables = installed(old)
    status = assess(new, tables.live(new), None, netns="n", backend="nft").status
    assert status is (CaptureStatus.INSTALLED if set(before) == set(after) else CaptureStatus.STALE)
    tables.restore(restore_payload(new, tables.live(new)))
    assert assess(new, tables.live(new), None, netns="n", backend="nft").status is CaptureStatus.INSTALLED
    assert len(tables.tables["nat"]["POSTROUTING"]) == 1


def test_obsolete_chain_of_ours_is_removed_by_the_next_payload() -> None:
    wider = dataclasses.replace(DEFAULT, chains=(*DEFAULT.chains, ("nat", "NODEAGENT_OLD")))
    tables = installed(wider)
    tables.tables["nat"]["NODEAGENT_OLD"].append("-j RETURN")
    live = parse_save(tables.save(), wider.owned())
    tables.restore(restore_payload(DEFAULT, live))
    assert "NODEAGENT_OLD" not in tables.tables["nat"]
    assert state(tables, DEFAULT) is CaptureStatus.INSTALLED
