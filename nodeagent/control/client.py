"""The tunnel's end of the control stream (`nodeagent/control/api/control.proto`): receive the pods to serve from
the node's agent, apply each update, acknowledge it with every assigned pod's status.

The stream is resumed after any break with backoff; while the agent is away the tunnel keeps serving
what it has (a restarting agent must not black-hole captured traffic). Every (re)connect starts with the
full state, so nothing is lost between runs of either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from nodeagent.control.api import control_pb2, control_pb2_grpc
from nodeagent.control.assignments import Assignment

log = structlog.get_logger("nodeagent.tunnel.control")

# (version, agent run, full state, added or changed, removed uids) -> applied
Apply = Callable[[int, str, bool, list[Assignment], list[str]], Awaitable[None]]
Statuses = Callable[[], list[tuple[str, bool, str]]]


def assignment_of(message: control_pb2.PodAssignment) -> Assignment:
    """The pure form of a received assignment."""
    return Assignment(message.uid, message.ip, message.namespace, message.service_account, message.netns,
                      message.transparent)


class ControlClient:
    """Keeps one stream to the agent open and relays updates and acknowledgements."""

    def __init__(self, socket_path: str, node: str, apply: Apply, statuses: Statuses, pod_uid: str | None = None
                 ) -> None:
        self.socket_path, self.node, self._apply, self._statuses = socket_path, node, apply, statuses
        # The tunnel pod's UID, from the downward API (the DaemonSet sets POD_UID): the agent finds this
        # tunnel's cgroup by it for the eBPF capture's hook. "" when not in a pod (the lab).
        self.pod_uid = os.environ.get("POD_UID", "") if pod_uid is None else pod_uid
        self.version, self.agent_run = 0, ""
        self.connected = False
        self._acks: asyncio.Queue[control_pb2.TunnelAck | None] | None = None

    def ack(self) -> control_pb2.TunnelAck:
        """The acknowledgement of the current state."""
        return control_pb2.TunnelAck(node=self.node, agent_run=self.agent_run, version=self.version,
                                     pods=[control_pb2.PodStatus(uid=uid, served=served, reason=reason)
                                           for uid, served, reason in self._statuses()], pod_uid=self.pod_uid)

    def notify(self) -> None:
        """Send a fresh acknowledgement (a pod's status changed) if the stream is up."""
        if self._acks is not None:
            self._acks.put_nowait(self.ack())

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until `stop` is set."""
        backoff = 0.1
        while not stop.is_set():
            try:
                await self._stream(stop)
                backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                if self.connected or backoff >= 1.0:
                    log.info("control stream down, retrying", socket=self.socket_path, code=exc.code().name,
                             retry_in=round(backoff, 1))
            finally:
                self.connected, self._acks = False, None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 5.0)

    async def _stream(self, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[control_pb2.TunnelAck | None] = asyncio.Queue()

        async def acks() -> AsyncIterator[control_pb2.TunnelAck]:
            while (ack := await queue.get()) is not None:
                yield ack

        async with grpc.aio.insecure_channel(f"unix:{self.socket_path}") as channel:
            call = control_pb2_grpc.TunnelControlStub(channel).Connect(acks())
            self._acks = queue
            queue.put_nowait(self.ack())
            stopping: asyncio.Task[Any] = asyncio.ensure_future(stop.wait())
            try:
                async for update in _until(call, stopping):
                    if not self.connected:
                        log.info("control stream up", socket=self.socket_path, agent_run=update.agent_run)
                    self.connected = True
                    await self._apply(update.version, update.agent_run, update.full_state,
                                      [assignment_of(a) for a in update.add], list(update.remove))
                    self.version, self.agent_run = update.version, update.agent_run
                    queue.put_nowait(self.ack())
            finally:
                stopping.cancel()
                queue.put_nowait(None)
                call.cancel()


async def _until(call: AsyncIterator[control_pb2.TunnelUpdate], stopping: asyncio.Task[Any]
                 ) -> AsyncIterator[control_pb2.TunnelUpdate]:
    """The updates of `call` until it ends or `stopping` completes."""
    iterator = call.__aiter__()
    while True:
        nxt: asyncio.Task[Any] = asyncio.ensure_future(iterator.__anext__())
        done, _ = await asyncio.wait({nxt, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if nxt not in done:
            nxt.cancel()
            return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return
