"""The wire form of a transaction: each run of one chain's rules as a chain block, the same operations."""

from __future__ import annotations

import pytest

from nodeagent.service.nftables.ruleset import Table, TransactionError, wire_text

LINES = [
    "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }",
    "add chain ip kube-proxy mark-for-masquerade",
    "add chain ip kube-proxy endpoint-A",
    "flush chain ip kube-proxy endpoint-A",
    "add chain ip kube-proxy service-S",
    "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000",
    "add rule ip kube-proxy endpoint-A ip saddr 10.1.0.1 jump mark-for-masquerade",
    "add rule ip kube-proxy endpoint-A meta l4proto tcp dnat to 10.1.0.1:80",
    "add rule ip kube-proxy service-S numgen random mod 1 vmap { 0 : goto endpoint-A }",
    "add rule ip kube-proxy endpoint-A ip saddr 10.1.0.2 counter",
    "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }",
    "add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 80 : goto service-S }",
]


def test_rules_of_one_chain_in_a_row_become_one_block_and_order_is_kept() -> None:
    text = wire_text(LINES)
    assert "add rule" not in text
    assert text.splitlines() == [
        LINES[0], LINES[1], LINES[2], LINES[3], LINES[4],
        "add chain ip kube-proxy mark-for-masquerade {", "\tmark set mark or 0x4000", "}",
        "add chain ip kube-proxy endpoint-A {", "\tip saddr 10.1.0.1 jump mark-for-masquerade",
        "\tmeta l4proto tcp dnat to 10.1.0.1:80", "}",
        "add chain ip kube-proxy service-S {", "\tnumgen random mod 1 vmap { 0 : goto endpoint-A }", "}",
        # a later rule of endpoint-A is a block of its own: rules stay in transaction order
        "add chain ip kube-proxy endpoint-A {", "\tip saddr 10.1.0.2 counter", "}",
        LINES[10], LINES[11],
    ]


def test_the_wire_form_does_to_a_table_what_the_lines_do() -> None:
    by_lines, by_blocks = Table("ip", "kube-proxy", exists=False), Table("ip", "kube-proxy", exists=False)
    operations = by_lines.apply("".join(line + "\n" for line in LINES))
    assert by_blocks.apply(wire_text(LINES)) == operations == len(LINES)
    assert by_blocks.dump() == by_lines.dump()
    assert by_blocks.chains["endpoint-A"].rules == ("ip saddr 10.1.0.1 jump mark-for-masquerade",
                                                    "meta l4proto tcp dnat to 10.1.0.1:80",
                                                    "ip saddr 10.1.0.2 counter")


def test_a_block_left_open_is_refused_and_the_table_is_unchanged() -> None:
    table = Table("ip", "kube-proxy", exists=False)
    table.apply("add table ip kube-proxy\n")
    before = table.dump()
    with pytest.raises(TransactionError, match="unterminated chain block: endpoint-A"):
        table.apply("add chain ip kube-proxy endpoint-A {\n\tcounter\n")
    assert table.dump() == before
