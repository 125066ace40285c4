#!/usr/bin/env python3
"""`nodeagent-cni`: a chained CNI plugin (spec 1.0 and 1.1) that has the node agent enroll a pod's sandbox in
the mesh before any of its containers starts, as istio-cni's plugin does for ztunnel.

The container runtime runs it after the cluster's network plugin, at sandbox creation, with the sandbox's
network namespace (CNI_NETNS) and the result of the plugins before it (`prevResult`, which carries the
pod's addresses). On ADD it asks the agent, over the agent's unix socket, to enroll the sandbox and waits
for the answer within `timeoutSeconds`: the agent assigns the pod to the node tunnel, which opens its
listeners in the namespace, then installs the capture; only then does ADD succeed, so the pod's very first
connection is captured. A pod that is not enrolled is answered at once. When the agent cannot be reached or
does not answer in time, `onAgentUnreachable` decides: "fail" (the default: the sandbox is not created and
the kubelet retries, so no enrolled pod ever runs uncaptured) or "allow" (the pod starts; the agent captures
it later, and the plugin says so on stderr). Either way the plugin passes `prevResult` through unchanged.

DEL tells the agent (best effort) and always succeeds, as the spec asks; CHECK asks the agent whether an
enrolled pod is captured; STATUS succeeds when the agent answers; VERSION lists the versions spoken; GC has
nothing of its own to collect.

This file runs on the node's own Python (the runtime executes it from the CNI bin directory, outside any
container), so it uses the standard library only and imports nothing of nodeagent.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
PLUGIN_TYPE = "nodeagent-cni"
DEFAULT_SOCKET = "/run/nodeagent/cni.sock"
DEFAULT_TIMEOUT = 30.0
FAIL, ALLOW = "fail", "allow"

# The spec's well-known error codes (CNI spec, "Error"), and the plugin's own above 99.
INCOMPATIBLE_VERSION, UNSUPPORTED_FIELD, UNKNOWN_CONTAINER, INVALID_ENV, IO_FAILURE = 1, 2, 3, 4, 5
DECODE_FAILURE, INVALID_CONFIG, TRY_AGAIN_LATER = 6, 7, 11
NOT_AVAILABLE = 50  # STATUS: the plugin cannot serve ADDs now
AGENT_REFUSED = 100  # the agent answered that the pod could not be enrolled


class CniError(Exception):
    """An error result: printed as the spec's error object on stdout, the plugin exits non-zero."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def result(self, version: str) -> dict[str, Any]:
        """The spec's error object."""
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class Config:
    """The plugin's part of the network configuration (the runtime adds name, cniVersion and prevResult)."""

    cni_version: str
    name: str
    agent_socket: str = DEFAULT_SOCKET
    timeout: float = DEFAULT_TIMEOUT
    on_agent_unreachable: str = FAIL
    prev_result: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Invocation:
    """One call: the command and the container's facts from the environment (CNI_*)."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)  # CNI_ARGS, K8S_POD_NAMESPACE and friends

    @property
    def pod(self) -> tuple[str, str, str]:
        """(namespace, name, uid) of the pod, from the kubelet's CNI_ARGS."""
        return (self.args.get("K8S_POD_NAMESPACE", ""), self.args.get("K8S_POD_NAME", ""),
                self.args.get("K8S_POD_UID", ""))


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return ()


def parse_config(text: str) -> Config:
    """The network configuration on stdin; CniError naming the field when it is not usable."""
    try:
        raw = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise CniError(DECODE_FAILURE, "network configuration is not JSON", str(exc)) from exc
    if not isinstance(raw, dict):
        raise CniError(DECODE_FAILURE, "network configuration is not a JSON object")
    version = raw.get("cniVersion", "")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    socket_path = raw.get("agentSocket", DEFAULT_SOCKET)
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        raise CniError(INVALID_CONFIG, "agentSocket must be an absolute path", repr(socket_path))
    timeout = raw.get("timeoutSeconds", DEFAULT_TIMEOUT)
    # a tuple, not `int | float`: the node's Python may be older than 3.10
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
        raise CniError(INVALID_CONFIG, "timeoutSeconds must be a number in (0, 600]", repr(timeout))
    policy = raw.get("onAgentUnreachable", FAIL)
    if policy not in (FAIL, ALLOW):
        raise CniError(INVALID_CONFIG, f"onAgentUnreachable must be {FAIL!r} or {ALLOW!r}", repr(policy))
    prev = raw.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "prevResult must be an object")
    name = raw.get("name", "")
    return Config(version, name if isinstance(name, str) else "", socket_path, float(timeout), policy, prev, raw)


def parse_invocation(environ: dict[str, str]) -> Invocation:
    """The command and container facts from the environment; CniError(INVALID_ENV) naming what is missing."""
    command = environ.get("CNI_COMMAND", "")
    if command not in ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"):
        raise CniError(INVALID_ENV, f"CNI_COMMAND {command!r} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC")
    args: dict[str, str] = {}
    for pair in filter(None, environ.get("CNI_ARGS", "").split(";")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise CniError(INVALID_ENV, f"CNI_ARGS entry {pair!r} is not KEY=VALUE")
        args[key] = value
    invocation = Invocation(command, environ.get("CNI_CONTAINERID", ""), environ.get("CNI_NETNS", ""),
                            environ.get("CNI_IFNAME", ""), args)
    needed = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"), "CHECK": ("CNI_CONTAINERID", "CNI_NETNS",
                                                                                "CNI_IFNAME"),
              "DEL": ("CNI_CONTAINERID", "CNI_IFNAME")}.get(command, ())
    missing = [name for name in needed if not environ.get(name)]
    if missing:
        raise CniError(INVALID_ENV, f"{command} needs {', '.join(missing)}")
    return invocation


def pod_ips(prev_result: dict[str, Any] | None) -> list[str]:
    """The addresses the plugins before this one gave the sandbox (prevResult.ips[].address, without the
    prefix length; 0.3.x results carry the same list)."""
    ips: list[str] = []
    for entry in (prev_result or {}).get("ips", []) or []:
        address = entry.get("address", "") if isinstance(entry, dict) else ""
        if isinstance(address, str) and address:
            ips.append(address.split("/", 1)[0])
    return ips


def passthrough(config: Config) -> dict[str, Any]:
    """ADD's result: the previous result unchanged, in the configuration's version (a chained plugin that
    adds no interface or address returns what it was given)."""
    if config.prev_result is None:
        raise CniError(INVALID_CONFIG, "prevResult is missing: nodeagent-cni must be chained after the network "
                                       "plugin in a conflist")
    return {**config.prev_result, "cniVersion": config.cni_version}


class AgentUnreachable(Exception):
    """The agent's socket did not answer (absent, refused, or too slow)."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the agent's unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def ask_agent(socket_path: str, path: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a request to the agent; AgentUnreachable when it does not answer."""
    connection = UnixHTTPConnection(socket_path, timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request("POST" if payload is not None else "GET", path, body=payload,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        raise AgentUnreachable(f"{socket_path}: {exc}") from exc
    finally:
        connection.close()
    try:
        answer = json.loads(text) if text else {}
    except json.JSONDecodeError:
        answer = {"reason": text[:200]}
    return response.status, answer if isinstance(answer, dict) else {"reason": str(answer)[:200]}


def sandbox(config: Config, invocation: Invocation) -> dict[str, Any]:
    """What the agent is told of the sandbox."""
    namespace, name, uid = invocation.pod
    return {"containerId": invocation.container_id, "netns": invocation.netns, "ifname": invocation.ifname,
            "podNamespace": namespace, "podName": name, "podUid": uid, "ips": pod_ips(config.prev_result)}


def add(config: Config, invocation: Invocation, warn: TextIO) -> dict[str, Any]:
    """ADD: enroll the sandbox through the agent (or let it through, as configured), then pass through."""
    result = passthrough(config)
    namespace, name, _ = invocation.pod
    if not namespace or not name:
        return result  # not a Kubernetes pod (no K8S_POD_* args): nothing for the mesh to do
    try:
        status, answer = ask_agent(config.agent_socket, "/v1/cni/add", sandbox(config, invocation), config.timeout)
    except AgentUnreachable as exc:
        if config.on_agent_unreachable == ALLOW:
            warn.write(f"nodeagent-cni: pod {namespace}/{name} started before the agent enrolled it "
                       f"(onAgentUnreachable: allow): {exc}\n")
            return result
        raise CniError(TRY_AGAIN_LATER, f"pod {namespace}/{name}: the node agent did not answer; refusing to start "
                                        "an uncaptured pod (onAgentUnreachable: fail)", str(exc)) from exc
    if status == 200:
        return result
    reason = str(answer.get("reason", f"status {status}"))
    if status in (503, 504) and config.on_agent_unreachable == ALLOW:
        warn.write(f"nodeagent-cni: pod {namespace}/{name} started before it was captured "
                   f"(onAgentUnreachable: allow): {reason}\n")
        return result
    raise CniError(TRY_AGAIN_LATER if status in (503, 504) else AGENT_REFUSED,
                   f"pod {namespace}/{name}: not enrolled in the mesh: {reason}")


def delete(config: Config, invocation: Invocation) -> None:
    """DEL: tell the agent; never fails (the spec: DEL must succeed when its resources are already gone)."""
    namespace, name, _ = invocation.pod
    if not namespace or not name:
        return
    # Unreachable is fine: the agent releases pods that leave the API server on its own.
    with contextlib.suppress(AgentUnreachable):
        ask_agent(config.agent_socket, "/v1/cni/del", sandbox(config, invocation), min(config.timeout, 5.0))


def check(config: Config, invocation: Invocation) -> None:
    """CHECK: an enrolled pod is captured (an error otherwise); nothing to check for other pods."""
    if config.prev_result is None:
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult")
    namespace, name, _ = invocation.pod
    if not namespace or not name:
        return
    try:
        status, answer = ask_agent(config.agent_socket, "/v1/cni/check", sandbox(config, invocation),
                                   min(config.timeout, 10.0))
    except AgentUnreachable as exc:
        raise CniError(TRY_AGAIN_LATER, "the node agent did not answer", str(exc)) from exc
    if status != 200:
        raise CniError(AGENT_REFUSED, f"pod {namespace}/{name}: {answer.get('reason', f'status {status}')}")


def status_check(config: Config) -> None:
    """STATUS: ready when the agent answers its status endpoint."""
    try:
        status, answer = ask_agent(config.agent_socket, "/v1/cni/status", None, min(config.timeout, 5.0))
    except AgentUnreachable as exc:
        raise CniError(NOT_AVAILABLE, "the node agent is not reachable", str(exc)) from exc
    if status != 200:
        raise CniError(NOT_AVAILABLE, f"the node agent is not ready: {answer.get('reason', status)}")


def run(stdin: str, environ: dict[str, str], warn: TextIO) -> tuple[int, dict[str, Any] | None]:
    """One invocation: (exit status, JSON to print or None)."""
    version = "1.1.0"
    try:
        invocation = parse_invocation(environ)
        if invocation.command == "VERSION":
            return 0, {"cniVersion": "1.1.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
        config = parse_config(stdin)
        version = config.cni_version
        if invocation.command in ("STATUS", "GC") and _version_tuple(version) < (1, 1, 0):
            raise CniError(INCOMPATIBLE_VERSION, f"{invocation.command} needs cniVersion 1.1.0 or later")
        if invocation.command == "ADD":
            return 0, add(config, invocation, warn)
        if invocation.command == "DEL":
            delete(config, invocation)
        elif invocation.command == "CHECK":
            check(config, invocation)
        elif invocation.command == "STATUS":
            status_check(config)
        return 0, None  # DEL, CHECK, STATUS, GC: success prints nothing
    except CniError as exc:
        return 1, exc.result(version)


def main() -> int:
    """The executable's entry point."""
    code, out = run(sys.stdin.read(), dict(os.environ), sys.stderr)
    if out is not None:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
