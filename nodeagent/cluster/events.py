"""What a source tells the change tracker: the vocabulary between `nodeagent.cluster.discovery` and
`nodeagent.state.tracker`.

Sources decode as they read (so a malformed object is rejected where it is read, with its name) and
hand the tracker decoded results; the tracker never sees raw JSON. A relist or a re-read manifest
directory is one `Listed` event, so the tracker can tell what disappeared while nobody was watching.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nodeagent.cluster.decode import Decoded
from nodeagent.cluster.model import Kind, ObjectRef


@dataclass(frozen=True, slots=True)
class Upserted:
    """An object was added or modified. `ref` is None when the object has no usable name."""

    kind: Kind
    ref: ObjectRef | None
    decoded: Decoded
    resource_version: str = ""


@dataclass(frozen=True, slots=True)
class Deleted:
    """An object is gone."""

    ref: ObjectRef
    resource_version: str = ""


@dataclass(frozen=True, slots=True)
class Listed:
    """The complete current set of one kind (a list, a relist, a manifest directory read)."""

    kind: Kind
    items: tuple[tuple[ObjectRef | None, Decoded], ...]
    resource_version: str = ""


@dataclass(frozen=True, slots=True)
class Progressed:
    """The source has seen everything of `kind` up to `resource_version` (a watch bookmark)."""

    kind: Kind
    resource_version: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Input that could not be turned into an object (not JSON or YAML, no name, unknown kind)."""

    kind: Kind | None
    source: str
    reason: str


Event = Upserted | Deleted | Listed | Progressed | Unreadable
Sink = Callable[[Event], None]
