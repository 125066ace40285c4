"""The tunnel process's DNS wiring (no root, no sockets): the table follows the snapshot's Services, the
proxy serves exactly the pods the tunnel serves, and --no-dns makes none."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any, cast

from nodeagent.ca.identity import SpiffeId
from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Listed, Upserted
from nodeagent.cluster.model import Kind
from nodeagent.daemon.tunnel import TunnelOptions, TunnelProcess
from nodeagent.state.tracker import ChangeTracker, Snapshot
from nodeagent.tunnel.dns.records import Outcome, resolve
from nodeagent.tunnel.state.workloads import Workload
from tests.support import objects as k8s


def _listed(kind: Kind, raws: list[dict[str, Any]]) -> Listed:
    return Listed(kind, tuple((object_ref(r), decode(r)) for r in raws), "1")


def _snap(tracker: ChangeTracker) -> Snapshot:
    snapshot = tracker.snapshot()
    assert snapshot is not None
    return snapshot


def _process(**options: Any) -> TunnelProcess:
    return TunnelProcess(TunnelOptions("node1", dns_upstreams=(("192.0.2.53", 53),), **options), cast(Any, None),
                         cast(Any, None))


def test_table_follows_services_and_waits_for_its_kinds() -> None:
    tunnel = _process()
    tracker = ChangeTracker("node1")
    tracker.apply(_listed(Kind.NAMESPACE, [k8s.namespace("shop")]))
    tracker.apply(_listed(Kind.POD, []))
    tunnel._follow(_snap(tracker))
    assert tunnel.dns_table is None  # Services and EndpointSlices not listed yet: everything is forwarded
    tracker.apply(_listed(Kind.SERVICE, [k8s.service("web")]))
    tracker.apply(_listed(Kind.ENDPOINT_SLICE, []))
    tunnel._follow(_snap(tracker))
    assert resolve(tunnel.dns_table, "web.shop.svc.cluster.local", 4).outcome is Outcome.ANSWER
    raw = k8s.service("api", cluster_ip="10.96.0.11")
    tracker.apply(Upserted(Kind.SERVICE, object_ref(raw), decode(raw)))
    tunnel._follow(_snap(tracker))
    assert resolve(tunnel.dns_table, "api.shop.svc.cluster.local", 4).outcome is Outcome.ANSWER
    # a change DNS does not read keeps the table (and so the proxy's kept answers)
    held = tunnel.dns_table
    raw = k8s.pod("web-1", "10.244.1.7")
    tracker.apply(Upserted(Kind.POD, object_ref(raw), decode(raw)))
    tunnel._follow(_snap(tracker))
    assert tunnel.dns_table is held


@dataclass
class _Served:
    workload: Workload


@dataclass
class _Backend:
    pods: dict[str, _Served]


class _Proxy:
    def __init__(self, fail: bool = False) -> None:
        self.pods: dict[str, Any] = {}
        self.fail = fail

    async def add_pod(self, ip: str, name: str, netns: str) -> None:
        if self.fail:
            raise OSError("netns gone")
        self.pods[ip] = type("P", (), {"netns": type("N", (), {"path": netns})()})()

    def remove_pod(self, ip: str) -> None:
        del self.pods[ip]


def _workload(ip: str, netns: str) -> Workload:
    return Workload(ip, SpiffeId("cluster.local", "shop", "default"), "node1", netns=netns, name=f"shop/{ip}")


def test_dns_listeners_follow_the_served_pods() -> None:
    tunnel = _process()
    proxy = _Proxy()
    tunnel.dns = cast(Any, proxy)
    backend = _Backend({"10.244.1.2": _Served(_workload("10.244.1.2", "/run/netns/a")),
                        "10.244.1.3": _Served(_workload("10.244.1.3", "/run/netns/b"))})
    asyncio.run(tunnel._reconcile_dns(cast(Any, backend)))
    assert set(proxy.pods) == {"10.244.1.2", "10.244.1.3"}
    del backend.pods["10.244.1.3"]
    backend.pods["10.244.1.2"] = _Served(replace(backend.pods["10.244.1.2"].workload, netns="/run/netns/c"))
    asyncio.run(tunnel._reconcile_dns(cast(Any, backend)))
    assert set(proxy.pods) == {"10.244.1.2"} and proxy.pods["10.244.1.2"].netns.path == "/run/netns/c"
    # a namespace given by name is the same one as its path under /run/netns: not re-added on every pass
    backend.pods["10.244.1.2"] = _Served(replace(backend.pods["10.244.1.2"].workload, netns="c"))
    held = proxy.pods["10.244.1.2"]
    asyncio.run(tunnel._reconcile_dns(cast(Any, backend)))
    assert proxy.pods["10.244.1.2"] is held


def test_a_failed_dns_listener_does_not_stop_the_pass() -> None:
    tunnel = _process()
    tunnel.dns = cast(Any, _Proxy(fail=True))
    asyncio.run(tunnel._reconcile_dns(cast(Any, _Backend({"10.244.1.2": _Served(_workload("10.244.1.2", "/x"))}))))
    assert tunnel.dns.pods == {}  # type: ignore[union-attr]


def test_no_dns_makes_no_proxy() -> None:
    assert _process(dns=False).dns is None
    made = _process()
    assert made.dns is not None and made.dns.options.upstreams == (("192.0.2.53", 53),)
