"""The agent's end of the control stream: a gRPC server on a unix socket that streams the pods the
tunnel must serve and collects its acknowledgements (which pods are served, at which version).

One tunnel per node, but two side by side during a rollout (the new one listens in every pod before the
old one drains): as istio-cni's ztunnel server does, the newest stream gets the full state, then deltas,
while older streams stay open and get only the removals (a pod deleted during the rollout is released by
the old tunnel too). When the newest stream ends, the next newest takes over with a full state. A pod may
be captured (`served`) while any connected tunnel acknowledges serving it, so the hand-over never uncaptures
a pod. The tunnel keeps serving what it has while the agent is away, so an agent restart never drops a
pod's traffic.

A full state replaces everything the tunnel serves, so none is sent before the agent has published
once (its first complete mesh pass, made only once Pods and Namespaces are listed): a tunnel that
connects to an agent that has just started waits, keeping what it serves, instead of receiving an
empty set and dropping every pod.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from nodeagent.control.api import control_pb2, control_pb2_grpc
from nodeagent.control.assignments import Assignment, Assignments, Delta, VersionLog, diff

log = structlog.get_logger("nodeagent.control")


@dataclass(frozen=True, slots=True)
class PodStatus:
    """What the tunnel last said about one pod."""

    served: bool
    reason: str
    version: int  # the update version the tunnel had applied when it said so


def _json_keys(value: object) -> object:
    """`value` with every mapping key written as its `str()`: JSON keys are strings, and the agent's maps are
    keyed by typed keys (a `PodKey` becomes `namespace/name`). Values are left to `json.dumps(default=str)`."""
    if isinstance(value, Mapping):
        return {k if k is None or isinstance(k, str | int | float) else str(k): _json_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_keys(v) for v in value]
    return value


def _proto(assignment: Assignment) -> control_pb2.PodAssignment:
    return control_pb2.PodAssignment(uid=assignment.uid, ip=assignment.ip, namespace=assignment.namespace,
                                     service_account=assignment.service_account, netns=assignment.netns,
                                     transparent=assignment.transparent)


class ControlServer(control_pb2_grpc.TunnelControlServicer):
    """Publishes desired assignments to the connected tunnel; tracks what it acknowledged."""

    def __init__(self, node: str, on_ack: Callable[[], None] | None = None) -> None:
        self.node, self.on_ack = node, on_ack
        self.run = uuid.uuid4().hex[:12]
        self._changed = threading.Condition()
        self._log = VersionLog()
        self._since: dict[str, int] = {}  # uid -> the version its current assignment appeared in
        self._stream = 0  # the id given to the last stream that connected
        self._streams: list[int] = []  # the open streams, oldest first: the last one is the newest tunnel's
        self._stopped = False
        self.published = False  # the agent published its first complete desired set; no update before it
        self._acks: dict[int, dict[str, PodStatus]] = {}  # stream -> what its tunnel last acknowledged
        self._pod_uids: dict[int, str] = {}  # stream -> its tunnel's pod UID (as it says)
        self.acked_version = 0  # the newest tunnel's
        self._server: grpc.Server | None = None
        # The agent's view for `nodeagent inspect` (pod uid or "" -> JSON-able data); set by whoever runs us.
        self.inspect_status: Callable[[str], dict[str, Any]] | None = None

    # -- the agent's side -------------------------------------------------------------------------
    def publish(self, desired: Assignments) -> int:
        """Make `desired` the set to serve; returns its version."""
        with self._changed:
            before = dict(self._log.current)
            if self._log.publish(desired) or not self.published:
                for assignment in diff(before, self._log.current).add:
                    self._since[assignment.uid] = self._log.version
                for uid in [uid for uid in self._since if uid not in self._log.current]:
                    del self._since[uid]
                self.published = True
                self._changed.notify_all()
            return self._log.version

    def served(self, assignment: Assignment) -> bool:
        """Whether the tunnel acknowledged serving exactly this assignment (at or after the version that
        introduced it)."""
        with self._changed:
            if self._log.current.get(assignment.uid) != assignment:
                return False
            since = self._since.get(assignment.uid, 0)
            return any((status := acks.get(assignment.uid)) is not None and status.served and status.version >= since
                       for acks in self._acks.values())

    @property
    def connected(self) -> bool:
        """Whether some tunnel holds a stream now."""
        return bool(self._streams)

    def tunnel_pod_uids(self) -> list[str]:
        """The pod UIDs the connected tunnels gave, newest last (empty ones left out)."""
        with self._changed:
            return [uid for stream in self._streams if (uid := self._pod_uids.get(stream, ""))]

    @property
    def statuses(self) -> dict[str, PodStatus]:
        """What the newest tunnel last acknowledged (uid -> status)."""
        return self._acks.get(self._streams[-1], {}) if self._streams else {}

    def start(self, socket_path: str) -> ControlServer:
        """Serve on the unix socket `socket_path` (replaced if it exists), mode 0600 from its first moment.

        The socket is bound inside a fresh 0700 directory beside its final path, made 0600, and only then
        renamed into place (a rename keeps the bound socket): there is no moment at which another user
        could connect, as there would be between a bind at the final path and a chmod after it. (A umask
        around the bind would do it too, but the umask is per process and grpc binds on its own threads.)"""
        import os
        import tempfile

        target = Path(socket_path)
        private = Path(tempfile.mkdtemp(prefix=".control-", dir=target.parent))  # mkdtemp makes it 0700
        staged = private / "control.sock"
        try:
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            control_pb2_grpc.add_TunnelControlServicer_to_server(self, server)
            server.add_insecure_port(f"unix:{staged}")
            server.start()
            os.chmod(staged, 0o600)  # node-local and root only: the tunnel runs as root beside us
            os.replace(staged, target)
        finally:
            staged.unlink(missing_ok=True)
            private.rmdir()
        self._server = server
        log.info("control stream listening", socket=socket_path, node=self.node)
        return self

    def stop(self) -> None:
        """Stop serving; the tunnel keeps what it serves and reconnects later."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.stop(grace=1).wait()

    def Inspect(self, request: control_pb2.InspectRequest,
                context: grpc.ServicerContext) -> control_pb2.InspectReply:
        """The agent's state for `nodeagent inspect`, plus what the tunnel last acknowledged."""
        with self._changed:
            acks = {uid: {"served": s.served, "reason": s.reason, "version": s.version}
                    for uid, s in self.statuses.items()}
            control = {"node": self.node, "agent_run": self.run, "version": self._log.version,
                       "acked_version": self.acked_version, "tunnel_connected": self.connected, "acks": acks}
        extra = self.inspect_status(request.pod) if self.inspect_status is not None else {}
        return control_pb2.InspectReply(json=json.dumps(_json_keys({"control": control, **extra}), default=str))

    # -- the tunnel's stream ----------------------------------------------------------------------
    def Connect(self, request_iterator: Iterator[control_pb2.TunnelAck],
                context: grpc.ServicerContext) -> Iterator[control_pb2.TunnelUpdate]:
        with self._changed:
            self._stream += 1
            stream = self._stream
            self._streams.append(stream)
            self._acks[stream] = {}
            self._changed.notify_all()
        threading.Thread(target=self._read_acks, args=(request_iterator, stream), daemon=True,
                         name="control-acks").start()
        sent: int | None = None
        update: control_pb2.TunnelUpdate | None
        newest = True  # this stream was the newest when it last got an update
        try:
            while context.is_active():
                with self._changed:
                    while not self._stopped and context.is_active() and (not self.published or (
                            sent == self._log.version and newest == (self._streams[-1] == stream))):
                        self._changed.wait(1.0)
                    if self._stopped:
                        return
                    if self._streams[-1] == stream:
                        # The newest tunnel: everything on its first update and when it takes over from a
                        # newer one that left (it got only removals meanwhile), else what changed.
                        update = self._update(sent if newest else None)
                        newest = True
                    else:
                        newest = False
                        update = self._removals(sent)
                    sent = self._log.version
                if update is not None:
                    yield update
        finally:
            with self._changed:
                self._streams.remove(stream)
                self._acks.pop(stream, None)
                self._pod_uids.pop(stream, None)
                self._changed.notify_all()

    def _removals(self, sent: int | None) -> control_pb2.TunnelUpdate | None:
        """An older tunnel's update: only the pods removed since `sent` (None: nothing to send)."""
        delta: Delta | None = None if sent is None else self._log.since(sent)
        if delta is None or not delta.remove:
            return None
        return control_pb2.TunnelUpdate(version=self._log.version, agent_run=self.run, remove=list(delta.remove))

    def _update(self, sent: int | None) -> control_pb2.TunnelUpdate:
        delta: Delta | None = None if sent is None else self._log.since(sent)
        if delta is None:  # first update on this stream, or the tunnel is too far behind: everything
            return control_pb2.TunnelUpdate(version=self._log.version, agent_run=self.run, full_state=True,
                                            add=[_proto(a) for _, a in sorted(self._log.current.items())])
        return control_pb2.TunnelUpdate(version=self._log.version, agent_run=self.run,
                                        add=[_proto(a) for a in delta.add], remove=list(delta.remove))

    def _read_acks(self, acks: Iterator[control_pb2.TunnelAck], stream: int) -> None:
        try:
            for ack in acks:
                with self._changed:
                    if stream not in self._acks:
                        return
                    if ack.agent_run == self.run:
                        if self._streams and self._streams[-1] == stream:
                            self.acked_version = ack.version
                        self._acks[stream] = {p.uid: PodStatus(p.served, p.reason, ack.version) for p in ack.pods}
                        self._pod_uids[stream] = ack.pod_uid
                    self._changed.notify_all()
                if self.on_ack is not None:
                    self.on_ack()
        except grpc.RpcError:
            pass  # the stream ended; Connect notices
