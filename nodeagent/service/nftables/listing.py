"""`nft list table` output read back into a `Table`, and the one spelling both sides are compared in. Pure.

nft prints what the kernel holds in its own words: `meta mark set meta mark | 0x00004000` for kube-proxy's
`mark set mark or 0x4000`, `priority dstnat - 10` for `-110`, a one-element anonymous set without its braces,
`timeout 3h` for `10800s`. `parse_listing` reads the listing into kube-proxy's layout (chains, sets, maps,
elements) and `canonical` rewrites a rule or spec into one spelling, so `chains --diff` and the tests compare
what is loaded with what was rendered element by element. The dynamic content of affinity sets (the clients
the kernel remembered) is not state the proxier writes, and is left out.
"""

from __future__ import annotations

import re

from nodeagent.service.nftables import names as n
from nodeagent.service.nftables.ruleset import Chain, Container, Element, Table, TransactionError, parse_element

PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_HEX = re.compile(r"\b0x[0-9a-fA-F]+\b")
_ONE_ELEMENT = re.compile(r"\b(saddr|daddr) (!= )?\{ ([^,{}]+) \}")
_ANON_SET = re.compile(r"\b(saddr|daddr) (!= )?\{ ([^{}]+) \}")


def seconds(text: str) -> int:
    """nft's `3h` / `1d2h3m4s` -> seconds."""
    total = 0
    for amount, unit in re.findall(r"(\d+)([dhms])", text):
        total += int(amount) * _UNITS[unit]
    return total


def canonical(text: str) -> str:
    """A rule (or element value) in one spelling, whichever of kube-proxy's or nft's it came in."""
    text = text.replace("meta mark", "mark").replace(" | ", " or ").replace(" ^ ", " xor ").replace(" & ", " and ")
    text = _HEX.sub(lambda m: hex(int(m.group(0), 16)), text)
    text = text.replace("== 0x0 ", "== 0 ")
    text = text.replace(" , ", ", ")
    text = _ONE_ELEMENT.sub(lambda m: f"{m[1]} {m[2] or ''}{m[3].strip()}", text)
    return _ANON_SET.sub(lambda m: f"{m[1]} {m[2] or ''}{{ {', '.join(sorted(m[3].split(', ')))} }}", text)


def canonical_dump(table: Table) -> list[str]:
    """`table.dump()` in the canonical spelling, affinity sets' elements left out."""
    copy = table.copy()
    for chain in copy.chains.values():
        chain.rules = tuple(canonical(rule) for rule in chain.rules)
    for name, container in copy.containers.items():
        if n.is_affinity_set(name):
            container.elements.clear()
        container.elements = {key: Element(canonical(e.value), e.comment) for key, e in container.elements.items()}
    return list(copy.dump_lines())


def _split_elements(body: str) -> list[str]:
    items, depth, quoted, start = [], 0, False, 0
    for i, char in enumerate(body):
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "{[":
            depth += 1
        elif not quoted and char in "}]":
            depth -= 1
        elif not quoted and depth == 0 and char == ",":
            items.append(body[start:i].strip())
            start = i + 1
    items.append(body[start:].strip())
    return [item for item in items if item]


def _base_spec(line: str) -> str:
    match = re.match(r"type (\w+) hook (\w+) priority ([^;]+);", line)
    if match is None:
        raise TransactionError(f"unreadable base chain: {line}")
    words = match[3].split()
    priority = PRIORITIES.get(words[0]) if not re.fullmatch(r"-?\d+", words[0]) else int(words[0])
    if priority is None:
        raise TransactionError(f"unknown priority: {line}")
    if len(words) == 3:
        priority += int(words[2]) * (1 if words[1] == "+" else -1)
    return f"{{ type {match[1]} hook {match[2]} priority {priority} ; }}"


def parse_listing(text: str) -> Table:
    """`nft list table FAMILY NAME` -> Table (specs and rules in nft's spelling except what `canonical` and
    the specs' layout need)."""
    lines = [line.strip() for line in text.splitlines()]
    header = re.match(r"table (\w+) (\S+) \{", lines[0] if lines else "")
    if header is None:
        raise TransactionError("not an nft table listing")
    table = Table(header[1], header[2])
    i = 1
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("comment "):
            table.comment = line[len('comment "'):-1]
        elif line.startswith("chain "):
            chain = Chain(line.split()[1])
            comment = ""
            while i < len(lines) and lines[i] != "}":
                body = lines[i]
                i += 1
                if body.startswith("type "):
                    chain.spec = _base_spec(body)
                elif body.startswith('comment "') and not chain.rules:
                    comment = body[len("comment "):]
                elif body:
                    chain.rules += (body,)
            i += 1
            if comment and not chain.spec:
                chain.spec = f"{{ comment {comment} ; }}"
            table.chains[chain.name] = chain
        elif line.startswith(("set ", "map ")):
            kind, name = line.split()[:2]
            spec: dict[str, str] = {}
            elements = ""
            while i < len(lines) and lines[i] != "}":
                body = lines[i]
                i += 1
                if body.startswith("elements = {"):
                    elements = body[len("elements = {"):]
                    while not elements.rstrip().endswith("}") and i < len(lines):
                        elements += " " + lines[i]
                        i += 1
                    elements = elements.rstrip()[:-1]
                elif body:
                    word, _, value = body.partition(" ")
                    spec[word] = value
            i += 1
            container = Container(kind, name, _container_spec(spec))
            for item in _split_elements(elements):
                key, element = parse_element("{ " + re.sub(r" (timeout|expires) \S+", "", item) + " }")
                container.elements[key] = element
            table.containers[name] = container
    return table


def _container_spec(spec: dict[str, str]) -> str:
    parts = [f"type {spec['type']}"]
    if "flags" in spec:
        parts.append(f"flags {spec['flags']}")
    if "timeout" in spec:
        parts.append(f"timeout {seconds(spec['timeout'])}s")
    if "comment" in spec:
        parts.append(f"comment {spec['comment']}")
    return "{ " + " ; ".join(parts) + " ; }"
