"""Label and field selectors as the API server parses them (apimachinery's labels and fields packages).

Label selectors: `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, comma-joined (AND).
Field selectors: `path=v`, `path==v`, `path!=v` on dotted paths (`spec.nodeName`, `metadata.name`,
`metadata.namespace`, `status.phase`...). A selector that does not parse raises ValueError, which the
server answers with 400 BadRequest, as the real one does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Predicate = Callable[[Mapping[str, Any]], bool]
_SET_TERM = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_./-]*[A-Za-z0-9])?$")


def _split_terms(selector: str) -> list[str]:
    """Split on the commas that are not inside `( )` (set-based terms carry commas of their own)."""
    terms: list[str] = []
    current: list[str] = []
    depth = 0
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(char)
    terms.append("".join(current))
    return [t.strip() for t in terms if t.strip()]


def _key(text: str, selector: str) -> str:
    key = text.strip()
    if not _KEY.match(key):
        raise ValueError(f"unable to parse requirement: invalid label key {key!r} in {selector!r}")
    return key


def _label_term(term: str, selector: str) -> Callable[[Mapping[str, str]], bool]:
    if (match := _SET_TERM.match(term)) is not None:
        key, operator = match.group(1), match.group(2)
        values = {v.strip() for v in match.group(3).split(",") if v.strip()}
        if operator == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if term.startswith("!"):
        absent = _key(term[1:], selector)
        return lambda labels: absent not in labels
    for operator in ("!=", "==", "="):
        if operator in term:
            raw_key, value = term.split(operator, 1)
            key, value = _key(raw_key, selector), value.strip()
            if operator == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    present = _key(term, selector)
    return lambda labels: present in labels


def label_selector(selector: str) -> Predicate:
    """A predicate on an object's metadata.labels; the empty selector matches everything."""
    terms = [_label_term(t, selector) for t in _split_terms(selector)]

    def matches(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(term(labels) for term in terms)

    return matches


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string value at a dotted path ('' when absent, as the server's field sets have it)."""
    current: Any = obj
    for part in path.split("."):
        current = current.get(part) if isinstance(current, Mapping) else None
    return "" if current is None else str(current)


def field_selector(selector: str) -> Predicate:
    """A predicate on dotted field paths; the empty selector matches everything."""
    terms: list[tuple[str, bool, str]] = []
    for term in _split_terms(selector):
        for operator in ("!=", "==", "="):
            if operator in term:
                path, value = term.split(operator, 1)
                terms.append((path.strip(), operator != "!=", value.strip()))
                break
        else:
            raise ValueError(f"invalid selector: {selector!r}; can't understand {term!r}")

    def matches(obj: Mapping[str, Any]) -> bool:
        return all((field_value(obj, path) == value) == equal for path, equal, value in terms)

    return matches


@dataclass(frozen=True)
class Selection:
    """What one list or watch asks for: a namespace (or all), a label and a field selector."""

    namespace: str | None = None
    labels: str = ""
    fields: str = ""

    def predicate(self) -> Predicate:
        """One predicate for the three (ValueError if a selector does not parse)."""
        by_label, by_field = label_selector(self.labels), field_selector(self.fields)
        namespace = self.namespace

        def matches(obj: Mapping[str, Any]) -> bool:
            if namespace is not None and (obj.get("metadata") or {}).get("namespace") != namespace:
                return False
            return by_label(obj) and by_field(obj)

        return matches
