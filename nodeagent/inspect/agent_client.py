"""Asking a running agent for its view over the control socket (the `Inspect` RPC of control.proto)."""

from __future__ import annotations

import json
from typing import Any

import grpc

from nodeagent.control.api import control_pb2
from nodeagent.errors import NodeAgentError

INSPECT_METHOD = "/nodeagent.control.v1.TunnelControl/Inspect"


class AgentUnreachable(NodeAgentError):
    """No agent answers on the control socket (not running, or not started with --mesh)."""


def query_agent(socket_path: str, pod: str = "", timeout: float = 5.0) -> dict[str, Any]:
    """The agent's state as its Inspect RPC reports it; AgentUnreachable when nobody answers."""
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            call = channel.unary_unary(INSPECT_METHOD,
                                       request_serializer=control_pb2.InspectRequest.SerializeToString,
                                       response_deserializer=control_pb2.InspectReply.FromString)
            reply = call(control_pb2.InspectRequest(pod=pod), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        raise AgentUnreachable(f"no agent answers on {socket_path}"
                               f" ({code.name if code is not None else exc})") from exc
    document: dict[str, Any] = json.loads(reply.json)
    return document
