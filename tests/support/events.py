"""Events as a source emits them, for tests that feed a change tracker."""

from __future__ import annotations

from typing import Any

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Listed
from nodeagent.cluster.model import Kind


def listed(kind: Kind, raws: list[Any], rv: str = "") -> Listed:
    return Listed(kind, tuple((object_ref(r), decode(r)) for r in raws), rv)
