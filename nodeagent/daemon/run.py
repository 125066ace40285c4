"""`nodeagent run` assembled: the datapath chosen (auto: eBPF, else nftables where the kernel has it, else
iptables, with the reason), the agent with
its source and its health and metrics servers, and with the mesh, the capture, the control stream to the node
tunnel and the loop that enrolls this node's pods. Runs until SIGTERM or SIGINT."""

from __future__ import annotations

import os
import platform
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

import structlog

from nodeagent.daemon.agent import Agent, AgentOptions
from nodeagent.daemon.errors import StartError
from nodeagent.daemon.mesh import MeshLoop, MeshOptions, mesh_capture, start_mesh
from nodeagent.daemon.sources import SourceOptions, source_factory
from nodeagent.errors import NodeAgentError
from nodeagent.kernel import nfacct, sysctl
from nodeagent.kernel.bpf import loader
from nodeagent.kernel.netfilter import Iptables, detect_backend, supports_random_fully
from nodeagent.kernel.nftables import Nft
from nodeagent.service.config import NFACCT_COUNTERS, ProxySettings
from nodeagent.service.ebpf.proxier import EbpfProxier, external_interfaces
from nodeagent.service.iptables import cleanup as iptables_cleanup
from nodeagent.service.iptables.proxier import IptablesProxier
from nodeagent.service.nftables import cleanup as nftables_cleanup
from nodeagent.service.nftables import support as nftables_support
from nodeagent.service.nftables.proxier import NftablesProxier

log = structlog.get_logger("nodeagent.run")


class ModeRequest(StrEnum):
    """The datapath asked for with `--mode`."""

    AUTO = "auto"  # eBPF; where it cannot load, nftables where the kernel has it, else iptables (with the reasons)
    EBPF = "ebpf"
    IPTABLES = "iptables"
    NFTABLES = "nftables"


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
    # the proxy flags; `prepare_kernel` adds what it finds in the kernel at start
    proxy: ProxySettings = field(default_factory=ProxySettings)
    random_fully: bool | None = None  # None: kube-proxy's detection (iptables 1.6.2 or newer)
    # kube-proxy's conntrack.tcpBeLiberal: set net.netfilter.nf_conntrack_tcp_be_liberal=1 at start
    conntrack_tcp_be_liberal: bool = False
    healthz: tuple[str, int | None] = ("0.0.0.0", 10256)  # port None: off
    metrics: tuple[str, int | None] = ("127.0.0.1", 10249)
    mesh: MeshOptions | None = None  # None: no mesh


@dataclass(frozen=True)
class ChosenDatapath:
    """The datapath the agent runs, and why (for /proxyMode and the logs)."""

    proxier: IptablesProxier | EbpfProxier | NftablesProxier
    mode: str  # "ebpf", "nftables" or "iptables"
    reason: str
    backend: str  # the iptables backend (eBPF mode keeps iptables for what it does not translate)
    # the IPv6 proxier (ip6tables, same backend), run beside `proxier` once the node has IPv6 to serve, as
    # kube-proxy's metaproxier runs one proxier per family; in eBPF mode the eBPF proxier's IPv6 side, whose
    # ip6tables proxier serves the IPv6 traffic from outside that tc leaves to the stack
    ipv6: IptablesProxier | EbpfProxier | NftablesProxier | None = None


# How eBPF mode serves IPv6 traffic from outside: said in the mode reason (/proxyMode's metric, /healthz)
EBPF_IPV6_REASON = ("; IPv6 Services: cgroup connect6/sendmsg6/recvmsg6/getpeername6, from outside the node "
                    "the same path as IPv4's, ip6tables kept for what tc leaves to the stack (extension headers, "
                    "fragments)")


def nftables_unsupported() -> str | None:
    """Why this node cannot run the nftables mode (kernel version, nft, the expressions its rules use), or None."""
    return nftables_support.unsupported(Nft(), platform.release(),
                                        bool(os.environ.get(nftables_support.SKIP_KERNEL_CHECK)), ("ip", "ip6"))


def _nftables(options: RunOptions, reason: str, backend: str) -> ChosenDatapath:
    return ChosenDatapath(NftablesProxier(Nft(), sync_period=options.sync_period), "nftables", reason, backend,
                          NftablesProxier(Nft(), family=6, sync_period=options.sync_period))


def choose_datapath(options: RunOptions) -> ChosenDatapath:
    """The mode asked for; with `auto` eBPF, else nftables where the kernel has it, else iptables. Raises
    StartError when eBPF or nftables was asked for explicitly and cannot run; with `auto` each failure is logged
    and becomes part of the reason."""
    backend = detect_backend() if options.iptables_backend == "auto" else options.iptables_backend
    iptables = IptablesProxier(Iptables(backend), sync_period=options.sync_period)
    ipv6 = IptablesProxier(Iptables(backend, ipv6=True), sync_period=options.sync_period)
    if options.mode is ModeRequest.IPTABLES:
        return ChosenDatapath(iptables, "iptables", "asked for (--mode iptables)", backend, ipv6)
    if options.mode is ModeRequest.NFTABLES:
        if (refused := nftables_unsupported()) is not None:
            raise StartError(f"nftables datapath unavailable: {refused}. `--mode iptables` runs without it")
        return _nftables(options, "asked for (--mode nftables)", backend)
    try:
        cgroup = options.cgroup or loader.own_cgroup()
        ebpf = EbpfProxier(options.bpf_scope, cgroup, external=iptables, sync_period=options.sync_period,
                           tc_interfaces=external_interfaces()).start()
    except (NodeAgentError, OSError) as exc:
        if options.mode is ModeRequest.EBPF:
            raise StartError(f"eBPF datapath unavailable: {exc}. `nodeagent doctor` says what this machine "
                             "lacks; `--mode auto` falls back to nftables or iptables") from exc
        if (refused := nftables_unsupported()) is None:
            log.warning("falling back to nftables", reason=str(exc))
            return _nftables(options, f"eBPF unavailable, fell back to nftables: {exc}", backend)
        log.warning("falling back to iptables", reason=str(exc), nftables=refused)
        return ChosenDatapath(iptables, "iptables", f"eBPF unavailable, fell back to iptables: {exc} "
                              f"(nftables unavailable: {refused})", backend, ipv6)
    return ChosenDatapath(ebpf, "ebpf", ebpf.mode_detail + EBPF_IPV6_REASON, backend, ebpf.ipv6_side(ipv6))


def clear_ebpf(scope: str, cgroup: Path | None) -> None:
    """Switching to iptables: programs of an earlier eBPF run must not keep translating beside the rules."""
    try:
        removed = loader.detach(cgroup or loader.own_cgroup()) + loader.remove_pins(scope)
    except (NodeAgentError, OSError) as exc:
        log.warning("could not clear the eBPF datapath", scope=scope, reason=str(exc))
        return
    if removed:
        log.info("eBPF datapath of an earlier run removed", scope=scope, removed=removed)


def clear_nftables() -> None:
    """Switching to iptables or eBPF: the nftables mode's tables of an earlier run must not keep translating."""
    try:
        removed = nftables_cleanup.cleanup(Nft())
    except (NodeAgentError, OSError) as exc:
        log.warning("could not clear the nftables datapath", reason=str(exc))
        return
    if removed:
        log.info("nftables datapath of an earlier run removed", removed=removed)


def clear_iptables(backend: str) -> None:
    """Switching to nftables: the iptables mode's chains of an earlier run (either family) must go, or they would
    translate Services beside the nftables table."""
    try:
        removed = iptables_cleanup.cleanup(Iptables(backend))
        ipv6 = Iptables(backend, ipv6=True)
        if iptables_cleanup.has_our_chains(ipv6):
            removed += iptables_cleanup.cleanup(ipv6)
    except (NodeAgentError, OSError) as exc:
        log.warning("could not clear the iptables datapath", backend=backend, reason=str(exc))
        return
    if removed:
        log.info("iptables datapath of an earlier run removed", backend=backend, removed=len(removed))


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


@dataclass(frozen=True)
class KernelAccess:
    """Where `prepare_kernel` reads and changes the kernel (tests give a directory and fakes)."""

    sysctl_root: Path = sysctl.ROOT
    random_fully: Callable[[], bool] = supports_random_fully
    ensure_nfacct: Callable[[Iterable[str]], frozenset[str]] = nfacct.ensure_counters


def prepare_kernel(options: RunOptions, kernel: KernelAccess | None = None) -> ProxySettings:
    """What kube-proxy does to the node before its first sync, in this process's network namespace, and the
    proxy settings with what it found: nf_conntrack_tcp_be_liberal set when asked, then read (set: no INVALID
    drop rule); route_localnet=1 when localhost NodePorts may be on; the nfacct counters created (those that
    exist are counted in); --random-fully detected unless given. StartError when a sysctl cannot be set."""
    kernel = kernel or KernelAccess()
    proxy = options.proxy
    try:
        if options.conntrack_tcp_be_liberal:
            sysctl.ensure(sysctl.TCP_BE_LIBERAL, 1, kernel.sysctl_root)
        if proxy.may_use_localhost_nodeports:
            log.info("Setting route_localnet=1 to allow node-ports on localhost; to change this either disable "
                     "iptables.localhostNodePorts (--iptables-localhost-nodeports) or set nodePortAddresses "
                     "(--nodeport-addresses) to filter loopback addresses")
            sysctl.ensure(sysctl.ROUTE_LOCALNET, 1, kernel.sysctl_root)
    except sysctl.SysctlError as exc:
        raise StartError(f"cannot set required sysctl for proxy: {exc}") from exc
    liberal = sysctl.enabled(sysctl.TCP_BE_LIBERAL, kernel.sysctl_root)
    if liberal:
        log.info("nf_conntrack_tcp_be_liberal set, not installing DROP rules for INVALID packets")
    random_fully = options.random_fully if options.random_fully is not None else kernel.random_fully()
    return replace(proxy, conntrack_tcp_liberal=liberal, random_fully=random_fully,
                   nfacct_counters=kernel.ensure_nfacct(NFACCT_COUNTERS))


def agent_options(options: RunOptions, proxy: ProxySettings) -> AgentOptions:
    """The agent's options from the flags and the proxy settings `prepare_kernel` completed."""
    return AgentOptions(node_name=options.node_name, min_sync_period=options.min_sync_period,
                        sync_period=options.sync_period, proxy=proxy, healthz_host=options.healthz[0],
                        healthz_port=options.healthz[1], metrics_host=options.metrics[0],
                        metrics_port=options.metrics[1])


def start(options: RunOptions, datapath: ChosenDatapath, proxy: ProxySettings) -> RunningAgent:
    """Start the agent on `datapath` with `proxy` (from `prepare_kernel`), then the mesh (a mesh that cannot
    start stops the agent again)."""
    if datapath.mode in ("iptables", "nftables"):
        clear_ebpf(options.bpf_scope, options.cgroup)
    if datapath.mode == "nftables":
        clear_iptables(datapath.backend)
    else:
        clear_nftables()
    agent = Agent(agent_options(options, proxy), source_factory(options.source, options.node_name), datapath.proxier,
                  ipv6_proxier=datapath.ipv6)
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
    proxy = prepare_kernel(options)
    datapath = choose_datapath(options)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    running = start(options, datapath, proxy)
    try:
        stop.wait()
    finally:
        running.stop()
    return 0
