"""A tunnel's end of the agent's control stream, for tests: updates received are queued, acknowledgements are
sent when the test says (or for everything, with `serve_everything`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc

from nodeagent.control.api import control_pb2, control_pb2_grpc


class Tunnel:
    """A tunnel's end of the stream on its own thread: updates received go to `updates`; `ack` sends one."""

    def __init__(self, socket_path: str) -> None:
        self.updates: queue.Queue[control_pb2.TunnelUpdate] = queue.Queue()
        self._acks: queue.Queue[control_pb2.TunnelAck | None] = queue.Queue()
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _ack_stream(self) -> Iterator[control_pb2.TunnelAck]:
        while (ack := self._acks.get()) is not None:
            yield ack

    def _run(self) -> None:
        try:
            stub = control_pb2_grpc.TunnelControlStub(self._channel)  # type: ignore[no-untyped-call]
            for update in stub.Connect(self._ack_stream()):
                self.updates.put(update)
        except grpc.RpcError:
            pass

    def next(self) -> control_pb2.TunnelUpdate:
        return self.updates.get(timeout=5)

    def quiet(self) -> bool:
        try:
            self.updates.get(timeout=0.5)
        except queue.Empty:
            return True
        return False

    def ack(self, update: control_pb2.TunnelAck | control_pb2.TunnelUpdate, served: list[str], pod_uid: str = ""
            ) -> None:
        self._acks.put(control_pb2.TunnelAck(
            version=update.version, agent_run=update.agent_run,
            pods=[control_pb2.PodStatus(uid=uid, served=True) for uid in served], pod_uid=pod_uid))

    def close(self) -> None:
        self._acks.put(None)
        self._channel.close()
        self._thread.join(timeout=5)

    def serve_everything(self) -> None:
        """Acknowledge every pod of every update as served, from now on (a tunnel that serves all it gets)."""
        def run() -> None:
            served: set[str] = set()
            while True:
                try:
                    update = self.updates.get(timeout=0.5)
                except queue.Empty:
                    if not self._thread.is_alive():
                        return
                    continue
                if update.full_state:
                    served = set()
                served |= {a.uid for a in update.add}
                served -= set(update.remove)
                self.ack(update, sorted(served))

        threading.Thread(target=run, daemon=True).start()
