"""The agent's end of nodeagent-cni: HTTP over a unix socket (as istio-cni's plugin talks to its node agent on
`pluginevent.sock`), on which the plugin announces a pod sandbox at creation and waits until the pod is
enrolled and captured, or known not to be enrolled.

`POST /v1/cni/add` takes the sandbox (pod namespace and name, its network namespace, the addresses the network
plugin gave it) and answers 200 once the pod is captured (`{"enrolled": true}`) or is not enrolled
(`{"enrolled": false}`), 503 with the pod's state when neither happens within the wait (the plugin then fails
the sandbox or lets it through, as its configuration says), 400 naming the field of a malformed request.
`POST /v1/cni/del` forgets the sandbox; `POST /v1/cni/check` answers whether an enrolled pod is captured;
`GET /v1/cni/status` whether the agent can serve ADDs (its mesh pass has Pods and Namespaces listed).

The announcement is what makes the capture early: the reconciler takes the sandbox's namespace and addresses
from it instead of waiting for the kubelet to publish the pod's IP and then scanning namespaces for it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socketserver
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import structlog

from nodeagent.cluster.enrollment import NO_IP_YET
from nodeagent.cluster.model import PodKey
from nodeagent.mesh.reconciler import MESH_INPUT_KINDS, MeshPodState, MeshReconciler, Sandbox
from nodeagent.state.tracker import Snapshot

log = structlog.get_logger("nodeagent.daemon.cni")
MAX_BODY = 64 << 10
ADD_WAIT = 25.0  # under the plugin's default timeout (30 s), so the plugin hears the reason rather than a timeout
POLL = 0.05


class BadRequest(ValueError):
    """A request the agent cannot act on; the message names the field."""


def sandbox_of(body: object) -> tuple[PodKey, Sandbox]:
    """The pod and its sandbox from a request body; BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("body: not a JSON object")
    namespace, name = body.get("podNamespace"), body.get("podName")
    if not isinstance(namespace, str) or not namespace:
        raise BadRequest("podNamespace: required")
    if not isinstance(name, str) or not name:
        raise BadRequest("podName: required")
    netns = body.get("netns", "")
    if not isinstance(netns, str) or (netns and not netns.startswith("/")):
        raise BadRequest(f"netns: {netns!r} is not an absolute path")
    raw_ips = body.get("ips", [])
    if not isinstance(raw_ips, list):
        raise BadRequest("ips: not a list")
    try:
        ips = tuple(str(ipaddress.ip_address(ip)) for ip in raw_ips)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"ips: {exc}") from exc
    container, uid = body.get("containerId", ""), body.get("podUid", "")
    return PodKey(namespace, name), Sandbox(ips, netns, container if isinstance(container, str) else "",
                                            uid if isinstance(uid, str) else "")


@dataclass(frozen=True)
class Verdict:
    """The answer to one ADD or CHECK: an HTTP status and its JSON body."""

    status: int
    body: dict[str, Any]


def decide(pod: PodKey, reconciler: MeshReconciler, snapshot: Snapshot | None) -> Verdict | None:
    """The answer for `pod` now, or None while it is still undecided (pure over the reconciler's state)."""
    if snapshot is None or not snapshot.synced(MESH_INPUT_KINDS) or reconciler.decided_generation < 0:
        return None
    sandbox = reconciler.sandboxes.get(pod)
    if sandbox is not None and reconciler.pass_started < sandbox.at:
        return None  # the last pass did not know the sandbox yet
    decision = reconciler.decisions.get(str(pod))
    if decision is None or decision.reason == NO_IP_YET:
        return None  # the agent has not seen the pod (its watch is behind the kubelet), or it has no address
    if not decision.enrolled:
        return Verdict(200, {"enrolled": False, "reason": decision.reason})
    status = reconciler.states.get(pod)
    if status is not None and status.state is MeshPodState.CAPTURED:
        return Verdict(200, {"enrolled": True, "captured": True})
    return None


class CniServer:
    """Serves the plugin's requests on a unix socket, each on its own thread (a runtime creates sandboxes in
    parallel), against the mesh loop's reconciler."""

    def __init__(self, reconciler: MeshReconciler, snapshot: Callable[[], Snapshot | None],
                 wake: Callable[[], None], add_wait: float = ADD_WAIT) -> None:
        self.reconciler, self.snapshot, self.wake, self.add_wait = reconciler, snapshot, wake, add_wait
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    # -- what each path does (called by the handler; no HTTP here) --
    def add(self, body: object) -> Verdict:
        pod, sandbox = sandbox_of(body)
        self.reconciler.announce(pod, sandbox)
        self.wake()
        log.info("sandbox announced", pod=str(pod), netns=sandbox.netns, ips=list(sandbox.ips),
                 container=sandbox.container_id[:12])
        deadline = time.monotonic() + self.add_wait
        # Polled: the answer depends on the mesh thread's passes and the tunnel's acknowledgement.
        while (verdict := decide(pod, self.reconciler, self.snapshot())) is None:
            if time.monotonic() >= deadline:
                status = self.reconciler.states.get(pod)
                reason = status.text if status is not None else "the agent does not know the pod yet"
                log.warning("sandbox not captured in time", pod=str(pod), state=reason, seconds=self.add_wait)
                return Verdict(503, {"enrolled": True, "captured": False, "reason": reason})
            time.sleep(POLL)
        log.info("sandbox answered", pod=str(pod), **verdict.body)
        return verdict

    def delete(self, body: object) -> Verdict:
        pod, sandbox = sandbox_of(body)
        self.reconciler.forget(pod, sandbox.container_id)
        self.wake()
        return Verdict(200, {})

    def check(self, body: object) -> Verdict:
        pod, _ = sandbox_of(body)
        verdict = decide(pod, self.reconciler, self.snapshot())
        if verdict is not None:
            return verdict
        status = self.reconciler.states.get(pod)
        return Verdict(409, {"reason": status.text if status is not None else "not known to the agent"})

    def status(self) -> Verdict:
        snapshot = self.snapshot()
        if snapshot is None or not snapshot.synced(MESH_INPUT_KINDS):
            return Verdict(503, {"reason": "Pods and Namespaces not listed yet"})
        return Verdict(200, {"ready": True})

    # -- the socket --
    def start(self, socket_path: str) -> CniServer:
        """Serve on `socket_path` (replaced if it exists), 0600 from its first moment (bound in a private
        directory, then renamed into place, as the control socket is)."""
        target = Path(socket_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix=".cni-", dir=target.parent))
        staged = private / "cni.sock"
        try:
            server = socketserver.ThreadingUnixStreamServer(str(staged), _handler(self))
            server.daemon_threads = True
            os.chmod(staged, 0o600)
            os.replace(staged, target)
        finally:
            staged.unlink(missing_ok=True)
            private.rmdir()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="cni", daemon=True)
        self._thread.start()
        log.info("CNI socket listening", socket=socket_path)
        return self

    def stop(self) -> None:
        """Stop serving (requests in progress end with the process)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _handler(server: CniServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # every request is logged by CniServer with its pod

        def _answer(self, verdict: Verdict) -> None:
            data = json.dumps(verdict.body).encode()
            self.send_response(verdict.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/cni/status":
                self._answer(server.status())
            else:
                self._answer(Verdict(404, {"reason": f"no route {self.path}"}))

        def do_POST(self) -> None:
            routes = {"/v1/cni/add": server.add, "/v1/cni/del": server.delete, "/v1/cni/check": server.check}
            route = routes.get(self.path)
            if route is None:
                self._answer(Verdict(404, {"reason": f"no route {self.path}"}))
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self._answer(Verdict(400, {"reason": f"Content-Length: must be 0..{MAX_BODY}"}))
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                self._answer(route(body))
            except json.JSONDecodeError as exc:
                self._answer(Verdict(400, {"reason": f"body: not JSON: {exc}"}))
            except BadRequest as exc:
                log.warning("CNI request refused", path=self.path, reason=str(exc))
                self._answer(Verdict(400, {"reason": str(exc)}))

    return Handler
