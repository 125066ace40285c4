"""The tc side of the eBPF datapath (bpf-src/nodeport_tc.c): NodePort and external addresses for
traffic from outside the node, on the node's external interfaces.

Programs are pinned beside the socket programs (same scope and layout version) and share their
Service maps; they are attached with pyroute2 as clsact direct-action filters (priority 1, handle 1,
named `na_tc_*`), replaced in place when a newer load exists, and removed by `detach_tc`. Like the
cgroup attachments, filters outlive the agent.

`attach_pinned`, `pinned_filters` and `detach_pinned` do the same for any pinned program on an interface
inside another network namespace (the mesh capture's inbound program on a pod's interface); the netlink
socket is opened inside that namespace by `kernel.netns.in_netns`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodeagent.kernel.bpf.loader import (
    PROG_TYPE_SCHED_CLS,
    SOURCE_DIR,
    BpfError,
    ProgramSpec,
    ServicePrograms,
    ensure_pinned,
)
from nodeagent.kernel.bpf.syscall import obj_get
from nodeagent.kernel.netns import in_netns

log = structlog.get_logger("nodeagent.kernel.bpf.tc")

TC_PROGRAMS = {"na_tc_ingress": "ffff:fff2", "na_tc_egress": "ffff:fff3"}  # name -> clsact parent
PRIORITY = 1
INGRESS, EGRESS = "ffff:fff2", "ffff:fff3"  # clsact's parents
NETLINK_ROUTE = 0
EEXIST = 17


def tc_source() -> str:
    return (SOURCE_DIR / "nodeport_tc.c").read_text()


def load_tc(datapath: ServicePrograms) -> bool:
    """Adopt or compile+pin the tc programs of `datapath` (its maps must exist); returns whether adopted."""
    return ensure_pinned(tc_source(), datapath.directory,
                         tuple(ProgramSpec(name, PROG_TYPE_SCHED_CLS) for name in TC_PROGRAMS), what="the tc programs")


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


def attach_tc(datapath: ServicePrograms, interfaces: list[str]) -> list[str]:
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
    with _route(netns) as ipr:
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


def _parent(parent: str) -> int:
    return int(parent.replace(":", ""), 16)


def _route(netns: str | None) -> IPRoute:
    """An IPRoute whose netlink socket lives in `netns` (a name or a path; None: this namespace)."""
    if netns is None:
        return IPRoute()
    sock = in_netns(netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE))
    return IPRoute(fileno=sock.detach())  # pyroute2 owns (and closes) the descriptor from here


def _index(ipr: IPRoute, interface: str, netns: str | None) -> int:
    links = ipr.link_lookup(ifname=interface)
    if not links:
        raise BpfError(f"no interface {interface!r} in {netns or 'this namespace'}")
    return int(links[0])


@dataclass(frozen=True, slots=True)
class PinnedFilter:
    """A bpf filter of ours found on an interface: the program's name and kernel id, and where it sits."""

    name: str
    prog_id: int
    priority: int


TCA_BPF_ID = 11  # the attached program's id: pyroute2 0.9 leaves this attribute undecoded


def _bpf_id(options: Any) -> int | None:
    """The program id of a bpf filter's options (TCA_BPF_ID), read from the raw attribute when undecoded."""
    decoded = options.get_attr("TCA_BPF_ID")
    if decoded is not None:
        return int(decoded)
    for attr in options["attrs"]:
        raw = attr.value
        header = raw.get("header") if hasattr(raw, "get") else None
        if header and header.get("type") == TCA_BPF_ID and header.get("length") == 8:
            return int.from_bytes(bytes(raw.data[raw.offset + 4:raw.offset + 8]), sys.byteorder)
    return None


def _filters_named(ipr: IPRoute, index: int, parent: str, name: str) -> list[PinnedFilter]:
    """The bpf filters under `parent` whose program is `name` (our attach names it so; tc's own
    `object-pinned` attach names it `name:[*fsobj]`)."""
    try:
        filters = ipr.get_filters(index=index, parent=_parent(parent))
    except NetlinkError:
        return []
    found = []
    for item in filters:
        options = item.get_attr("TCA_OPTIONS")
        if options is None:
            continue
        shown = str(options.get_attr("TCA_BPF_NAME") or "")
        prog_id = _bpf_id(options)
        if prog_id is not None and (shown == name or shown.startswith(f"{name}:")):
            found.append(PinnedFilter(name, prog_id, int(item.get("info", 0)) >> 16))
    return found


def pinned_filters(netns: str | None, interface: str, name: str, parent: str = INGRESS) -> list[PinnedFilter]:
    """Our filters of program `name` on `interface` (inside `netns`), by name; empty if the interface has none."""
    with _route(netns) as ipr:
        links = ipr.link_lookup(ifname=interface)
        return _filters_named(ipr, int(links[0]), parent, name) if links else []


def attach_pinned(netns: str | None, interface: str, pin: Path, *, parent: str = INGRESS,
                  priority: int = PRIORITY) -> None:
    """Attach the program pinned at `pin` (named as its file) as a direct-action filter (handle 1,
    `priority`) under clsact's `parent` on `interface` inside `netns`, replacing what sits there."""
    with _route(netns) as ipr:
        index = _index(ipr, interface, netns)
        try:
            ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise BpfError(f"adding clsact to {interface} in {netns}: {exc}") from exc
        fd = obj_get(str(pin))
        try:
            ipr.tc("replace-filter", "bpf", index, ":1", fd=fd, name=pin.name, parent=parent, classid=1,
                   direct_action=True, prio=priority)
        except NetlinkError as exc:
            raise BpfError(f"attaching {pin.name} to {interface} in {netns}: {exc}") from exc
        finally:
            os.close(fd)


def detach_pinned(netns: str | None, interface: str, name: str, *, parent: str = INGRESS) -> bool:
    """Remove our filters of program `name` from `interface` inside `netns`, and clsact when no filter is
    left on it; returns whether there was one."""
    with _route(netns) as ipr:
        links = ipr.link_lookup(ifname=interface)
        if not links:
            return False
        index = int(links[0])
        ours = _filters_named(ipr, index, parent, name)
        for item in {f.priority for f in ours}:
            with contextlib.suppress(NetlinkError):  # gone meanwhile
                ipr.tc("del-filter", "bpf", index, ":1", parent=parent, prio=item)
        remaining = [f for p in (INGRESS, EGRESS) for f in ipr.get_filters(index=index, parent=_parent(p))]
        if not remaining:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", index)
        return bool(ours)
