"""Which pods the node's tunnel must serve, as the agent decides it (pure).

An assignment is an enrolled pod of this node whose network namespace was found. Versions of the
desired set are kept as a short log so a delta can be sent to a tunnel that has seen an earlier one;
a tunnel further behind (or new) gets the full state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from nodeagent.cluster.model import PodKey


@dataclass(frozen=True, slots=True)
class Assignment:
    """One pod for the tunnel to serve."""

    uid: str  # str(PodKey), namespace/name: the pod's id on the control stream (a protobuf string)
    ip: str
    namespace: str
    service_account: str
    netns: str
    transparent: bool = False

    @classmethod
    def of(cls, pod: PodKey, ip: str, service_account: str, netns: str, transparent: bool = False) -> Assignment:
        """The assignment of the pod `pod` (its uid is the key's `namespace/name`)."""
        return cls(str(pod), ip, pod.namespace, service_account, netns, transparent)

    @property
    def pod(self) -> PodKey:
        """The pod's key, parsed from its uid (PodKeyError if the sender wrote something else)."""
        return PodKey.parse(self.uid)


Assignments = Mapping[str, Assignment]


@dataclass(frozen=True, slots=True)
class Delta:
    """What changed from one desired set to the next."""

    add: tuple[Assignment, ...]  # new or changed
    remove: tuple[str, ...]  # uids

    @property
    def empty(self) -> bool:
        """Whether nothing changed."""
        return not self.add and not self.remove


def diff(old: Assignments, new: Assignments) -> Delta:
    """The delta taking `old` to `new`."""
    return Delta(tuple(a for uid, a in sorted(new.items()) if old.get(uid) != a),
                 tuple(sorted(uid for uid in old if uid not in new)))


@dataclass
class VersionLog:
    """Desired sets by version; `since(v)` is the delta from version v, or None when v is unknown."""

    keep: int = 64
    version: int = 0
    current: dict[str, Assignment] = field(default_factory=dict)
    _history: dict[int, Assignments] = field(default_factory=lambda: {0: {}})

    def publish(self, desired: Assignments) -> bool:
        """Record `desired` as a new version if it differs; returns whether it did."""
        if dict(desired) == self.current:
            return False
        self.version += 1
        self.current = dict(desired)
        self._history[self.version] = self.current
        for old in [v for v in self._history if v <= self.version - self.keep]:
            del self._history[old]
        return True

    def since(self, version: int) -> Delta | None:
        """The delta from `version` to the current one; None when `version` is not in the log."""
        old = self._history.get(version)
        return None if old is None else diff(old, self.current)
