"""The inbound target check shared by 15008 and 15006 (pure): only the served pod, never the tunnel's ports."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.tunnel.proxy.admission import TUNNEL_PORTS, Refusal, check_target

POD = "10.244.1.3"


@pytest.mark.parametrize(("host", "port", "refusal"), [
    ("10.244.1.3", 8080, None),
    ("10.244.1.4", 8080, Refusal.NOT_THIS_POD),  # another pod: the open-relay reproduction
    ("172.18.0.3", 10256, Refusal.NOT_THIS_POD),  # the node's agent health port
    ("10.96.0.10", 80, Refusal.NOT_THIS_POD),  # a Service VIP is never an inbound target
    ("127.0.0.1", 8080, Refusal.NOT_THIS_POD),  # the pod's loopback
    ("::ffff:10.244.1.3", 8080, Refusal.NOT_THIS_POD),  # v4-mapped is another address family's socket
    ("echo.demo.svc", 8080, Refusal.NOT_THIS_POD),  # a name is not an address
    ("10.244.1.3", 15008, Refusal.TUNNEL_PORT),
    ("10.244.1.3", 15006, Refusal.TUNNEL_PORT),
    ("10.244.1.3", 15001, Refusal.TUNNEL_PORT),
    ("10.244.1.3", 15000, Refusal.TUNNEL_PORT),
    ("10.244.1.3", 15020, Refusal.TUNNEL_PORT),
    ("10.244.1.3", 15021, Refusal.TUNNEL_PORT),
])
def test_targets(host: str, port: int, refusal: Refusal | None) -> None:
    outcome = check_target(POD, host, port)
    assert (outcome.refusal if outcome else None) is refusal
    if outcome is not None:
        assert f"{host}:{port}" in outcome.reason


def test_statuses_are_ztunnels() -> None:
    assert Refusal.NOT_THIS_POD.status == 400
    assert Refusal.TUNNEL_PORT.status == 503
    assert Refusal.POLICIES_NOT_SYNCED.status == 503


def test_ipv6_pods_compare_as_addresses() -> None:
    assert check_target("fd00::a", "fd00:0:0::a", 80) is None
    assert check_target("fd00::a", "fd00::b", 80) is not None


@given(st.ip_addresses(v=4), st.integers(1, 65535))
def test_only_the_pods_own_address_on_a_non_tunnel_port_passes(address: object, port: int) -> None:
    outcome = check_target(POD, str(address), port)
    assert (outcome is None) == (str(address) == POD and port not in TUNNEL_PORTS)
