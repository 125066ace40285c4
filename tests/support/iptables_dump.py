"""kube-proxy's test helper `sortIPTablesRules` (pkg/proxy/iptables/proxier_test.go), for golden comparisons.

kube-proxy iterates Services in Go map order, so its tests compare rule sets after this sort:
tables by name; chains KUBE-NODEPORTS, KUBE-SERVICES, then other KUBE-* alphabetically; each chain's
rules in written order, except KUBE-NODEPORTS and KUBE-SERVICES, sorted stably by the Service name
in the comment (the "must be the last rule" rule of nat KUBE-SERVICES stays last).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field


@dataclass
class _Table:
    name: str
    chains: list[str] = field(default_factory=list)
    rules: dict[str, list[str]] = field(default_factory=dict)


def _comment(rule: str) -> str | None:
    tokens = shlex.split(rule)
    for i, token in enumerate(tokens[:-1]):
        if token == "--comment":
            return tokens[i + 1]
    return None


def _service_key(rule: str) -> str:
    comment = _comment(rule)
    if comment is None:
        return ""
    return re.split(r"[ :]", comment, maxsplit=1)[0]


def _chain_key(name: str) -> tuple[int, str]:
    if name == "KUBE-NODEPORTS":
        return (0, name)
    if name == "KUBE-SERVICES":
        return (1, name)
    return (2 if name.startswith("KUBE-") else 3, name)


def sort_rules(text: str) -> str:
    """Normalize iptables-restore input the way kube-proxy's tests do, so equal rule sets compare equal."""
    tables: list[_Table] = []
    for line in (raw.strip() for raw in text.strip().splitlines()):
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            tables.append(_Table(line[1:]))
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            tables[-1].chains.append(chain)
            tables[-1].rules.setdefault(chain, [])
        elif line.startswith("-A "):
            chain = line.split()[1]
            tables[-1].rules.setdefault(chain, []).append(line)
        elif line == "COMMIT":
            continue
        else:
            tables[-1].rules.setdefault("", []).append(line)
    out: list[str] = []
    for table in sorted(tables, key=lambda t: t.name):
        chains = sorted(set(table.chains), key=_chain_key)
        out.append(f"*{table.name}")
        out.extend(f":{c} - [0:0]" for c in chains)
        for chain in chains:
            rules = list(table.rules.get(chain, []))
            if chain in ("KUBE-NODEPORTS", "KUBE-SERVICES"):
                rules.sort(key=lambda r: ("must be the last rule" in (_comment(r) or ""), _service_key(r)))
            out.extend(rules)
        out.extend(table.rules.get("", []))
        out.append("COMMIT")
    return "\n".join(out) + "\n"
