"""`nodeagent run` assembled: the datapath chosen (auto: eBPF, else iptables with the reason), the agent with
its source and its health and metrics servers, and with the mesh, the capture, the control stream to the node
tunnel and the loop that enrolls this node's pods. Runs until SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import structlog

from nodeagent.cluster.model import IPNetwork
from nodeagent.daemon.agent import Agent, AgentOptions
from nodeagent.daemon.errors import StartError
from nodeagent.daemon.mesh import MeshLoop, MeshOptions, mesh_capture, start_mesh
from nodeagent.daemon.sources import SourceOptions, source_factory
from nodeagent.errors import NodeAgentError
from nodeagent.kernel.bpf import loader
from nodeagent.kernel.netfilter import Iptables, detect_backend, supports_random_fully
from nodeagent.service.config import ProxySettings
from nodeagent.service.ebpf.proxier import EbpfProxier, external_interfaces
from nodeagent.service.iptables.proxier import IptablesProxier

log = structlog.get_logger("nodeagent.run")


class ModeRequest(StrEnum):
    """The datapath asked for with `--mode`."""

    AUTO = "auto"  # eBPF, or iptables (with the reason) where eBPF cannot load
    EBPF = "ebpf"
    IPTABLES = "iptables"


@dataclass(frozen=True)
class RunOptions:
    """The flags of `nodeagent run`, parsed."""

    node_name: str
    source: SourceOptions = field(default_factory=SourceOptions)
    mode: ModeRequest = ModeRequest.AUTO
    cgroup: Path | None = None  # where the eBPF programs attach (None: this process's own cgroup)
    bpf_scope: str = "host"
    iptables_backend: str = "auto"  # auto, nft or legacy
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    nodeport_addresses: tuple[IPNetwork, ...] = ()
    healthz: tuple[str, int | None] = ("0.0.0.0", 10256)  # port None: off
    metrics: tuple[str, int | None] = ("127.0.0.1", 10249)
    mesh: MeshOptions | None = None  # None: no mesh


@dataclass(frozen=True)
class ChosenDatapath:
    """The datapath the agent runs, and why (for /proxyMode and the logs)."""

    proxier: IptablesProxier | EbpfProxier
    mode: str  # "ebpf" or "iptables"
    reason: str
    backend: str  # the iptables backend (eBPF mode keeps iptables for what it does not translate)


def choose_datapath(options: RunOptions) -> ChosenDatapath:
    """eBPF when asked for or possible, else iptables. Raises StartError when eBPF was asked for explicitly
    and cannot load; with `auto` the failure is logged and becomes the reason."""
    backend = detect_backend() if options.iptables_backend == "auto" else options.iptables_backend
    iptables = IptablesProxier(Iptables(backend), sync_period=options.sync_period)
    if options.mode is ModeRequest.IPTABLES:
        return ChosenDatapath(iptables, "iptables", "asked for (--mode iptables)", backend)
    try:
        cgroup = options.cgroup or loader.own_cgroup()
        ebpf = EbpfProxier(options.bpf_scope, cgroup, external=iptables, sync_period=options.sync_period,
                           tc_interfaces=external_interfaces()).start()
    except (NodeAgentError, OSError) as exc:
        if options.mode is ModeRequest.EBPF:
            raise StartError(f"eBPF datapath unavailable: {exc}. `nodeagent doctor` says what this machine "
                             "lacks; `--mode auto` falls back to iptables") from exc
        log.warning("falling back to iptables", reason=str(exc))
        return ChosenDatapath(iptables, "iptables", f"eBPF unavailable, fell back to iptables: {exc}", backend)
    return ChosenDatapath(ebpf, "ebpf", ebpf.mode_detail, backend)


def clear_ebpf(scope: str, cgroup: Path | None) -> None:
    """Switching to iptables: programs of an earlier eBPF run must not keep translating beside the rules."""
    try:
        removed = loader.detach(cgroup or loader.own_cgroup()) + loader.remove_pins(scope)
    except (NodeAgentError, OSError) as exc:
        log.warning("could not clear the eBPF datapath", scope=scope, reason=str(exc))
        return
    if removed:
        log.info("eBPF datapath of an earlier run removed", scope=scope, removed=removed)


@dataclass
class RunningAgent:
    """The started agent and, with the mesh, its loop; `stop` ends both (the datapath stays programmed)."""

    agent: Agent
    mesh: MeshLoop | None = None

    def stop(self) -> None:
        """Stop the mesh loop and its control stream, then the agent."""
        if self.mesh is not None:
            self.mesh.stop()
            self.mesh.reconciler.control.stop()
        self.agent.stop()


def agent_options(options: RunOptions) -> AgentOptions:
    """The agent's options from the flags (and whether this kernel's iptables has --random-fully)."""
    return AgentOptions(node_name=options.node_name, min_sync_period=options.min_sync_period,
                        sync_period=options.sync_period,
                        proxy=ProxySettings(cluster_cidrs=options.cluster_cidrs, masquerade_all=options.masquerade_all,
                                            nodeport_addresses=options.nodeport_addresses,
                                            random_fully=supports_random_fully()),
                        healthz_host=options.healthz[0],
                        healthz_port=options.healthz[1], metrics_host=options.metrics[0],
                        metrics_port=options.metrics[1])


def start(options: RunOptions, datapath: ChosenDatapath) -> RunningAgent:
    """Start the agent on `datapath`, then the mesh (a mesh that cannot start stops the agent again)."""
    if datapath.mode == "iptables":
        clear_ebpf(options.bpf_scope, options.cgroup)
    agent = Agent(agent_options(options), source_factory(options.source, options.node_name), datapath.proxier)
    agent.health.mode, agent.health.mode_reason = datapath.mode, datapath.reason
    agent.start()
    if options.mesh is None:
        return RunningAgent(agent)
    try:
        capture = mesh_capture(datapath.mode == "ebpf", datapath.backend, options.bpf_scope, options.mesh)
        return RunningAgent(agent, start_mesh(agent, capture, options.mesh))
    except BaseException:
        agent.stop()
        raise


def run(options: RunOptions) -> int:
    """Run the agent until SIGTERM or SIGINT; the exit status. Raises StartError when it cannot start."""
    datapath = choose_datapath(options)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    running = start(options, datapath)
    try:
        stop.wait()
    finally:
        running.stop()
    return 0
