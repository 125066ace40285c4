"""The daemons' own error: a composition root that cannot start as configured."""

from __future__ import annotations

from nodeagent.errors import NodeAgentError


class StartError(NodeAgentError):
    """A daemon cannot start as configured (a datapath that cannot load, a socket that cannot be bound,
    credentials that cannot be read); the message names the part and says what to change."""
