"""One nftables table as data, in kube-proxy's text: its chains, sets, maps and their elements. Pure.

The text is what knftables writes and kube-proxy's tests compare (`add chain ip kube-proxy NAME`, `add rule ip
kube-proxy CHAIN RULE`, `add element ip kube-proxy MAP { KEY comment "C" : VALUE }`), which is also `nft -f`
input. What is sent to nft groups each run of rules for one chain into a chain block (`wire_text`), which nft
evaluates without fetching the table's chains first (see the function). `Table.dump` prints a table in the
order of kube-proxy's `sortNFTablesTransaction` (pkg/proxy/nftables/helpers_test.go): table, chains, rules,
sets, maps, elements; names sorted, each chain's rules in their order. `Table.apply` runs a transaction of
those commands (or their wire form) on the data, as knftables' Fake does; the proxier's tests use it as the
kernel.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise

from nodeagent.errors import NodeAgentError

# kube-proxy's objectOrder (helpers_test.go): higher sorts earlier
OBJECT_ORDER = {"table": 10, "chain": 9, "rule": 8, "set": 7, "map": 6, "element": 5}


class TransactionError(NodeAgentError):
    """A transaction the table rejects (as nft would: a missing object, a malformed command)."""


@dataclass(slots=True)
class Chain:
    """A chain: `spec` is its `{ ... }` (a base chain's type, hook and priority, or a comment), else ""."""

    name: str
    spec: str = ""
    rules: tuple[str, ...] = ()


@dataclass(slots=True)
class Element:
    """A set or map element: the value is "" in a set."""

    value: str = ""
    comment: str | None = None


@dataclass(slots=True)
class Container:
    """A set or a map (`kind`), its `{ type ... }` spec and elements by key text."""

    kind: str
    name: str
    spec: str
    elements: dict[str, Element] = field(default_factory=dict)


def element_text(key: str, element: Element) -> str:
    """`KEY comment "C" : VALUE` as between an element's braces."""
    text = key if element.comment is None else f'{key} comment "{element.comment}"'
    return f"{text} : {element.value}" if element.value else text


@dataclass
class Table:
    """One table (`family` ip or ip6) as kube-proxy's tests see it."""

    family: str
    name: str
    comment: str | None = None
    chains: dict[str, Chain] = field(default_factory=dict)
    containers: dict[str, Container] = field(default_factory=dict)
    exists: bool = True

    @property
    def prefix(self) -> str:
        return f"{self.family} {self.name}"

    def dump(self) -> str:
        """The table as `add` commands, in kube-proxy's test order (empty when the table does not exist)."""
        return "".join(line + "\n" for line in self.dump_lines())

    def dump_lines(self) -> Iterator[str]:
        """`dump`, line by line."""
        if not self.exists:
            return
        p = self.prefix
        yield f'add table {p} {{ comment "{self.comment}" ; }}' if self.comment else f"add table {p}"
        names = sorted(self.chains)
        for name in names:
            spec = self.chains[name].spec
            yield f"add chain {p} {name} {spec}" if spec else f"add chain {p} {name}"
        for name in names:
            for rule in self.chains[name].rules:
                yield f"add rule {p} {name} {rule}"
        for kind in ("set", "map"):
            for name in sorted(n for n, c in self.containers.items() if c.kind == kind):
                yield f"add {kind} {p} {name} {self.containers[name].spec}"
        for name in sorted(self.containers):
            lines = [f"add element {p} {name} {{ {element_text(key, element)} }}"
                     for key, element in self.containers[name].elements.items()]
            yield from sorted(lines)

    def apply(self, transaction: str) -> int:
        """Run `transaction` (our commands, one a line, or `wire_text`'s chain blocks) on the table, all or
        nothing; returns the number of operations (a rule in a chain block is one, as an `add rule` line).
        Raises TransactionError where nft would refuse it (the table is then unchanged)."""
        work = self.copy()
        count = 0
        block: str | None = None  # the `add chain ... {` line of the block being read
        for line in transaction.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if block is not None:
                if line == "}":
                    block = None
                    continue
                work._apply(f"add rule {work.prefix} {block} {line}")
                count += 1
                continue
            if line.startswith("add chain ") and line.endswith(" {"):
                work._apply(line[:-2])  # nft adds the chain when it is missing; not an operation of ours
                block = line[:-2].rsplit(" ", 1)[1]
                continue
            work._apply(line)
            count += 1
        if block is not None:
            raise TransactionError(f"unterminated chain block: {block}")
        self.comment, self.chains, self.containers = work.comment, work.chains, work.containers
        self.exists = work.exists
        return count

    def copy_shallow(self) -> Table:
        """A copy whose chain and container maps are its own, sharing the chains and elements maps' values
        (which are never changed in place outside `apply`, so sharing them is safe) but not the elements maps."""
        return Table(self.family, self.name, self.comment, dict(self.chains),
                     {n: Container(c.kind, c.name, c.spec, dict(c.elements)) for n, c in self.containers.items()},
                     self.exists)

    def copy(self) -> Table:
        """A copy whose chains, containers and element maps are its own."""
        return Table(self.family, self.name, self.comment,
                     {n: Chain(c.name, c.spec, c.rules) for n, c in self.chains.items()},
                     {n: Container(c.kind, c.name, c.spec, dict(c.elements)) for n, c in self.containers.items()},
                     self.exists)

    def _apply(self, line: str) -> None:
        verb, _, rest = line.partition(" ")
        kind, _, rest = rest.partition(" ")
        head = f"{self.prefix}"
        if not rest.startswith(head) or (len(rest) > len(head) and rest[len(head)] != " "):
            raise TransactionError(f"not a command on table {head}: {line}")
        rest = rest[len(head):].strip()
        if kind == "table":
            if verb == "add":
                self.exists = True
                match = re.search(r'comment "([^"]*)"', rest)
                self.comment = match.group(1) if match else self.comment
            elif verb == "delete":
                self._need_table(line)
                self.chains, self.containers, self.exists, self.comment = {}, {}, False, None
            elif verb == "flush":
                for chain in self.chains.values():
                    chain.rules = ()
            return
        self._need_table(line)
        name, _, body = rest.partition(" ")
        if kind == "chain":
            self._chain(verb, name, body, line)
        elif kind == "rule" and verb == "add":
            self._need_chain(name, line).rules += (body,)
        elif kind in ("set", "map"):
            self._container(verb, kind, name, body, line)
        elif kind == "element":
            self._element(verb, name, body, line)
        else:
            raise TransactionError(f"unknown command: {line}")

    def _need_table(self, line: str) -> None:
        if not self.exists:
            raise TransactionError(f"no such table: {line}")

    def _need_chain(self, name: str, line: str) -> Chain:
        chain = self.chains.get(name)
        if chain is None:
            raise TransactionError(f"no such chain: {line}")
        return chain

    def _chain(self, verb: str, name: str, body: str, line: str) -> None:
        if verb == "add":
            chain = self.chains.setdefault(name, Chain(name, body))
            if body and chain.spec and body != chain.spec:
                raise TransactionError(f"chain exists with another spec: {line}")
            chain.spec = chain.spec or body
        elif verb == "flush":
            self._need_chain(name, line).rules = ()
        elif verb == "delete":
            self._need_chain(name, line)
            if any(_references(rule, name) for chain in self.chains.values() for rule in chain.rules) or any(
                    _references(e.value, name) for c in self.containers.values() for e in c.elements.values()):
                raise TransactionError(f"chain is in use: {line}")
            del self.chains[name]
        else:
            raise TransactionError(f"unknown command: {line}")

    def _container(self, verb: str, kind: str, name: str, body: str, line: str) -> None:
        if verb == "add":
            self.containers.setdefault(name, Container(kind, name, body))
            return
        found = self.containers.get(name)
        if found is None or found.kind != kind:
            raise TransactionError(f"no such {kind}: {line}")
        if verb == "flush":
            found.elements.clear()
        elif verb == "delete":
            del self.containers[name]
        else:
            raise TransactionError(f"unknown command: {line}")

    def _element(self, verb: str, name: str, body: str, line: str) -> None:
        found = self.containers.get(name)
        if found is None:
            raise TransactionError(f"no such set or map: {line}")
        key, element = parse_element(body)
        if verb == "add":
            if key in found.elements and found.elements[key].value != element.value:
                raise TransactionError(f"element exists with another value: {line}")
            found.elements.setdefault(key, element)
        elif verb == "delete":
            if key not in found.elements:
                raise TransactionError(f"no such element: {line}")
            del found.elements[key]
        else:
            raise TransactionError(f"unknown command: {line}")


_ELEMENT = re.compile(r'^\{ (?P<key>.*?)(?: comment "(?P<comment>[^"]*)")?(?: : (?P<value>.*))? \}$')


def parse_element(body: str) -> tuple[str, Element]:
    """`{ KEY comment "C" : VALUE }` -> (KEY, Element)."""
    match = _ELEMENT.match(body.strip())
    if match is None:
        raise TransactionError(f"malformed element: {body}")
    return match["key"], Element(match["value"] or "", match["comment"])


def wire_text(lines: Iterable[str]) -> str:
    """The transaction as sent to nft: `lines` with each run of `add rule FAMILY TABLE CHAIN RULE` lines for one
    chain written as one chain block (`add chain FAMILY TABLE CHAIN {`, the rules a line each, `}`); the same
    operations, in the same order.

    Why: nft 1.0 fetches every chain of the table from the kernel before it evaluates an `add rule` command
    (the cache flags of `evaluate_cache_add` in nftables' src/cache.c), but only the table for an `add chain`
    command, with or without rules in its block. At 10,000 Services that fetch is ~100,000 chains on every
    partial sync, and it was most of an endpoint change's time."""
    out: list[str] = []
    current: tuple[str, str, str] | None = None  # (family, table, chain) of the open block
    for line in lines:
        if line.startswith("add rule "):
            _, _, family, table, chain, rule = line.split(" ", 5)
            if current != (family, table, chain):
                if current is not None:
                    out.append("}\n")
                current = (family, table, chain)
                out.append(f"add chain {family} {table} {chain} {{\n")
            out.append(f"\t{rule}\n")
            continue
        if current is not None:
            out.append("}\n")
            current = None
        out.append(line + "\n")
    if current is not None:
        out.append("}\n")
    return "".join(out)


def _references(text: str, chain: str) -> bool:
    return f"goto {chain}" in text.split(" , ") or any(
        word in (f"goto {chain}", f"jump {chain}") for word in _verdicts(text))


def _verdicts(text: str) -> Iterable[str]:
    words = text.replace(",", " ").replace("}", " ").split()
    return (f"{a} {b}" for a, b in pairwise(words) if a in ("goto", "jump"))


def sort_transaction(text: str) -> list[str]:
    """kube-proxy's `sortNFTablesTransaction`: drop blank and comment lines, order by object type, then name;
    a chain's rules keep their order, other lines with the same type and name sort by their text."""
    lines = [line for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]

    def key(indexed: tuple[int, str]) -> tuple[int, str, str, int]:
        index, line = indexed
        words = line.split(" ")
        if len(words) < 5:
            return (0, "", "", index)
        return (-OBJECT_ORDER.get(words[1], 0), words[4], "" if words[1] == "rule" else line, index)

    return [line for _, line in sorted(enumerate(lines), key=key)]
