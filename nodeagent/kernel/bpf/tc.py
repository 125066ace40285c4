"""The tc side of the eBPF datapath (bpf-src/nodeport_tc.c): NodePort and external addresses for
traffic from outside the node, on the node's external interfaces.

Programs are pinned beside the socket programs (same scope and layout version) and share their
Service maps; they are attached with pyroute2 as clsact direct-action filters (priority 1, handle 1,
named `na_tc_*`), replaced in place when a newer load exists, and removed by `detach_tc`. Like the
cgroup attachments, filters outlive the agent.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodeagent.kernel.bpf.loader import CFLAGS, SOURCE_DIR, BpfError, Datapath
from nodeagent.kernel.bpf.syscall import obj_get, obj_pin

log = structlog.get_logger("nodeagent.kernel.bpf.tc")

TC_PROGRAMS = {"na_tc_ingress": "ffff:fff2", "na_tc_egress": "ffff:fff3"}  # name -> clsact parent
PRIORITY = 1


def tc_source() -> str:
    return (SOURCE_DIR / "nodeport_tc.c").read_text()


def load_tc(datapath: Datapath) -> bool:
    """Adopt or compile+pin the tc programs of `datapath` (its maps must exist); returns whether adopted."""
    directory = datapath.directory
    if all((directory / name).exists() for name in TC_PROGRAMS):
        return True
    try:
        from bcc import BPF
    except ImportError as exc:
        raise BpfError(f"bcc is not importable: {exc}") from exc
    started = time.monotonic()
    pinned: list[Path] = []
    try:
        program = BPF(text=tc_source().replace("PIN_DIR", str(directory)), cflags=CFLAGS)
        for name in TC_PROGRAMS:
            fn = program.load_func(name, BPF.SCHED_CLS)
            path = directory / name
            path.unlink(missing_ok=True)
            obj_pin(fn.fd, str(path))
            pinned.append(path)
        program.cleanup()
    except Exception as exc:
        for path in pinned:
            path.unlink(missing_ok=True)
        raise BpfError(f"compiling or loading the tc programs failed: {exc}") from exc
    log.info("tc programs compiled, loaded and pinned", seconds=round(time.monotonic() - started, 2))
    return False


def _our_filters(ipr: IPRoute, index: int, parent: str) -> list[object]:
    try:
        filters = ipr.get_filters(index=index, parent=int(parent.replace(":", ""), 16))
    except NetlinkError:
        return []
    found = []
    for item in filters:
        options = item.get_attr("TCA_OPTIONS")
        name = options.get_attr("TCA_BPF_NAME") if options is not None else None
        if name and str(name).startswith("na_tc_"):
            found.append(item)
    return found


def attach_tc(datapath: Datapath, interfaces: list[str]) -> list[str]:
    """Attach (or re-attach) both programs to each interface of this network namespace."""
    changed = []
    with IPRoute() as ipr:
        for ifname in interfaces:
            links = ipr.link_lookup(ifname=ifname)
            if not links:
                raise BpfError(f"no interface {ifname!r} to attach the tc programs to")
            index = links[0]
            try:
                ipr.tc("add", "clsact", index)
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST: already there
                    raise BpfError(f"adding clsact to {ifname}: {exc}") from exc
            for name, parent in TC_PROGRAMS.items():
                fd = obj_get(str(datapath.directory / name))
                try:
                    ipr.tc("replace-filter", "bpf", index, ":1", fd=fd, name=name, parent=parent, classid=1,
                           direct_action=True, prio=PRIORITY)
                except NetlinkError as exc:
                    raise BpfError(f"attaching {name} to {ifname}: {exc}") from exc
                finally:
                    os.close(fd)
                changed.append(f"{name} -> {ifname}")
    log.info("tc programs attached", interfaces=interfaces)
    return changed


def detach_tc(interfaces: list[str] | None = None, netns: str | None = None) -> list[str]:
    """Remove our filters (and clsact, when nothing else uses it) from each interface (all: None) of
    this network namespace, or of `netns`."""
    removed = []
    with (IPRoute(netns=netns) if netns else IPRoute()) as ipr:
        if interfaces is None:
            interfaces = [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
        for ifname in interfaces:
            links = ipr.link_lookup(ifname=ifname)
            if not links:
                continue
            index = links[0]
            for name, parent in TC_PROGRAMS.items():
                if _our_filters(ipr, index, parent):
                    try:
                        ipr.tc("del-filter", "bpf", index, ":1", parent=parent, prio=PRIORITY)
                        removed.append(f"{name} <- {ifname}")
                    except NetlinkError:
                        pass
            remaining = [f for p in TC_PROGRAMS.values() for f in ipr.get_filters(index=index,
                                                                                  parent=int(p.replace(":", ""), 16))]
            if not remaining:
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del", "clsact", index)
    return removed
