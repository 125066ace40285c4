"""The capture's kernel layer against the real binaries, in a network namespace made for each test.

- What the kernel holds after apply reads back, as iptables-save prints it, exactly as rendered
  (both backends), beside rules of others that stay untouched; the policy route is in place.
- Drift (a rule or the route deleted by hand), stale rules (another run's content, or the other
  backend) are named and repaired by one apply; removal leaves the tables and rules as before.
- A vanished namespace is `netns-missing`, never an exception; a refused restore leaves nothing.
- The mangle rules and policy route deliver the app's replies back to a transparent socket that
  connected from a foreign source with the tunnel's mark (what keeps client addresses).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.kernel.netns import command_in, in_netns
from nodeagent.mesh.capture import CaptureStatus
from nodeagent.mesh.iptables import apply as kernel
from nodeagent.mesh.iptables.apply import (
    CaptureError,
    apply_capture,
    apply_probe_snat,
    live_state,
    probe_snat_state,
    remove_capture,
    remove_probe_snat,
    rule_counters,
)
from nodeagent.mesh.iptables.render import TUNNEL_MARK, CaptureOptions, node_probe_snat, pod_capture
from tests.integration.conftest import unique_lab_name

pytestmark = pytest.mark.root
BACKENDS = ["nft", "legacy"]
IP_TRANSPARENT = 19
FOREIGN_RULE = ["-t", "nat", "-A", "OUTPUT", "-p", "udp", "-m", "udp", "--dport", "53", "-j", "ACCEPT"]


@pytest.fixture
def netns() -> Iterator[str]:
    """A throw-away namespace's path (with lo up, as a pod's)."""
    name = unique_lab_name() + "-rdx"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ns(path: str, *argv: str) -> str:
    return subprocess.run(command_in(path, argv), check=True, capture_output=True, text=True).stdout


def ours(path: str, backend: str) -> list[str]:
    """Every line of ours in the nat and mangle tables, as iptables-save prints them."""
    text = ns(path, f"iptables-{backend}-save", "-t", "mangle") + ns(path, f"iptables-{backend}-save", "-t", "nat")
    return [line for line in text.splitlines() if "NODEAGENT" in line]


def rule_lines(path: str, backend: str) -> list[str]:
    text = ns(path, f"iptables-{backend}-save", "-t", "mangle") + ns(path, f"iptables-{backend}-save", "-t", "nat")
    return [line for line in text.splitlines() if line.startswith(("-A", "*", ":"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_applied_rules_read_back_exactly_as_rendered_beside_others(netns: str, backend: str) -> None:
    ns(netns, f"iptables-{backend}", *FOREIGN_RULE)
    state = apply_capture(netns, backend=backend, pod="demo/client")
    assert state.status is CaptureStatus.INSTALLED, state.missing + state.unexpected
    desired = pod_capture()
    expected = []
    for table in ("mangle", "nat"):
        expected += [f":{c} - [0:0]" for t, c in sorted(desired.chains, key=lambda x: x[1]) if t == table]
        expected += [f"-A {h.source} {desired.jump_spec(h)}" for h in desired.hooks if h.table == table]
        for chain in ("NODEAGENT_OUTPUT", "NODEAGENT_PRERT"):  # iptables-save prints chains by name
            expected += [r.line for r in desired.rules if r.table == table and r.chain == chain]
    assert ours(netns, backend) == expected
    assert "-A OUTPUT -p udp -m udp --dport 53 -j ACCEPT" in ns(netns, f"iptables-{backend}-save", "-t", "nat")
    assert "32764:\tfrom all fwmark 0x111/0xfff lookup 100" in ns(netns, "ip", "rule")
    assert ns(netns, "ip", "route", "show", "table", "100").strip() == "local default dev lo scope host"
    again = apply_capture(netns, backend=backend)
    assert again.status is CaptureStatus.INSTALLED
    forced = apply_capture(netns, backend=backend, force=True)
    assert forced.status is CaptureStatus.INSTALLED
    assert ours(netns, backend) == expected, "reapplying changes nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_deleted_rule_and_route_are_drift_and_repaired(netns: str, backend: str) -> None:
    apply_capture(netns, backend=backend)
    ns(netns, f"iptables-{backend}", "-t", "nat", "-D", "NODEAGENT_OUTPUT", "!", "-d", "127.0.0.1/32", "-o", "lo",
       "-j", "ACCEPT")
    ns(netns, "ip", "rule", "del", "pref", "32764")
    state = live_state(netns, backend=backend)
    assert state.status is CaptureStatus.DRIFTED
    assert state.missing == ("nat: -A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
                             "ip rule fwmark 0x111/0xfff lookup 100 pref 32764")
    assert apply_capture(netns, backend=backend).status is CaptureStatus.INSTALLED
    assert "! -d 127.0.0.1/32 -o lo -j ACCEPT" in "\n".join(ours(netns, backend))


def test_a_hand_added_duplicate_jump_is_drift_and_repaired(netns: str) -> None:
    apply_capture(netns, backend="nft")
    jump = next(line for line in ours(netns, "nft") if line.startswith("-A OUTPUT") and "NODEAGENT_OUTPUT" in line)
    ns(netns, "sh", "-c", f"printf '*nat\\n{jump}\\nCOMMIT\\n' | iptables-nft-restore --noflush")
    state = live_state(netns, backend="nft")
    assert state.status is CaptureStatus.DRIFTED
    assert state.unexpected == (f"nat: {jump} (x2)",)
    apply_capture(netns, backend="nft")
    assert ns(netns, "iptables-nft-save", "-t", "nat").splitlines().count(jump) == 1


def test_rules_of_a_previous_run_with_other_content_are_stale_and_replaced(netns: str) -> None:
    apply_capture(netns, CaptureOptions(exclude_outbound_ports=(5432,)), backend="nft")
    state = live_state(netns, backend="nft")
    assert state.status is CaptureStatus.STALE
    assert state.live_fingerprints == (pod_capture(CaptureOptions(exclude_outbound_ports=(5432,))).fingerprint,)
    assert apply_capture(netns, backend="nft").status is CaptureStatus.INSTALLED
    assert not any("5432" in line for line in ours(netns, "nft"))
    assert sum(1 for line in ours(netns, "nft") if line.startswith("-A OUTPUT")) == 2  # mangle and nat, once each


def test_rules_left_in_the_other_backend_are_stale_and_moved(netns: str) -> None:
    apply_capture(netns, backend="legacy")
    state = live_state(netns, backend="nft")
    assert state.status is CaptureStatus.STALE
    assert any(line.startswith("legacy nat: ") for line in state.unexpected)
    assert apply_capture(netns, backend="nft").status is CaptureStatus.INSTALLED
    assert ours(netns, "legacy") == []
    assert live_state(netns, backend="nft").status is CaptureStatus.INSTALLED


@pytest.mark.parametrize("backend", BACKENDS)
def test_removal_leaves_the_tables_and_routing_as_before(netns: str, backend: str) -> None:
    ns(netns, f"iptables-{backend}", *FOREIGN_RULE)
    tables, rules = rule_lines(netns, backend), ns(netns, "ip", "rule")
    apply_capture(netns, backend=backend)
    state = remove_capture(netns, backend=backend, pod="demo/client")
    assert state.status is CaptureStatus.ABSENT
    assert rule_lines(netns, backend) == tables
    assert ns(netns, "ip", "rule") == rules
    assert remove_capture(netns, backend=backend).status is CaptureStatus.ABSENT  # nothing left to remove


def test_a_vanished_namespace_is_netns_missing_without_exceptions(netns: str, tmp_path: Path) -> None:
    apply_capture(netns, backend="nft")
    subprocess.run(["ip", "netns", "del", Path(netns).name], check=True)
    for state in (live_state(netns, backend="nft"), apply_capture(netns, backend="nft"),
                  remove_capture(netns, backend="nft"), probe_snat_state(netns, [], backend="nft")):
        assert state.status is CaptureStatus.NETNS_MISSING
        assert state.netns == netns
    leftover = tmp_path / "cni-leftover"  # a bind-mount point whose namespace was unmounted
    leftover.touch()
    assert live_state(str(leftover), backend="nft").status is CaptureStatus.NETNS_MISSING


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_restore_leaves_nothing_half_applied(netns: str, backend: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = kernel.restore_payload

    def broken(desired, live=None):  # type: ignore[no-untyped-def]
        # nat is written after mangle: mangle commits, then the kernel refuses nat's last rule
        text: str = real(desired, live)
        return text.replace("-j REDIRECT --to-ports 15001", "-j NO-SUCH-TARGET")

    monkeypatch.setattr(kernel, "restore_payload", broken)
    with pytest.raises(CaptureError) as caught:
        apply_capture(netns, backend=backend, pod="demo/client")
    assert "pod demo/client" in str(caught.value) and netns in str(caught.value)
    monkeypatch.undo()
    assert live_state(netns, backend=backend).status is CaptureStatus.ABSENT
    assert ours(netns, backend) == []


def test_probe_snat_follows_the_pods_and_is_removed(netns: str) -> None:
    state = apply_probe_snat(netns, ["10.244.1.3", "10.244.1.2"], backend="nft")
    assert state.status is CaptureStatus.INSTALLED
    assert ours(netns, "nft")[-2:] == [
        "-A NODEAGENT_POSTRT -d 10.244.1.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127",
        "-A NODEAGENT_POSTRT -d 10.244.1.3/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127"]
    assert probe_snat_state(netns, ["10.244.1.2"], backend="nft").status is CaptureStatus.STALE
    apply_probe_snat(netns, ["10.244.1.2"], backend="nft")
    assert [line for line in ours(netns, "nft") if "SNAT" in line] == [
        "-A NODEAGENT_POSTRT -d 10.244.1.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127"]
    assert remove_probe_snat(netns, backend="nft").status is CaptureStatus.ABSENT
    assert ours(netns, "nft") == []
    assert node_probe_snat([]).fingerprint  # an empty set is a valid, installable state


def _pod_with_app(path: str) -> socket.socket:
    """Give the namespace a pod's shape (10.1.0.2 on eth-like veth, default route) and an app on :8080."""
    ns(path, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    ns(path, "ip", "link", "set", "eth0", "up")
    ns(path, "ip", "link", "set", "peer0", "up")
    ns(path, "ip", "addr", "add", "10.1.0.2/32", "dev", "eth0")
    ns(path, "ip", "route", "add", "default", "dev", "eth0")

    def listen() -> socket.socket:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("10.1.0.2", 8080))
        server.listen()
        server.settimeout(3)
        return server

    return in_netns(path, listen)


def _transparent_connect(path: str, source: str, timeout: float) -> socket.socket:
    """What the tunnel must do: IP_TRANSPARENT, the tunnel's mark, bound to the client's address."""
    def make() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, TUNNEL_MARK)
        sock.bind((source, 0))
        sock.settimeout(timeout)
        return sock

    sock = in_netns(path, make)
    try:
        sock.connect(("10.1.0.2", 8080))
    except BaseException:
        sock.close()
        raise
    return sock


def test_replies_reach_a_transparent_socket_that_connected_from_the_client_address(netns: str) -> None:
    server = _pod_with_app(netns)
    try:
        apply_capture(netns, backend="nft")
        with _transparent_connect(netns, "10.244.9.9", timeout=3) as client:
            accepted, peer = server.accept()
            with accepted:
                assert peer[0] == "10.244.9.9", "the app sees the original client address"
                accepted.sendall(b"hello")
                assert client.recv(5) == b"hello"
        counters = rule_counters(netns, backend="nft", table="nat")
        assert counters["-A NODEAGENT_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT"] == 1
        assert all(n == 0 for rule, n in counters.items() if "REDIRECT" in rule), "the tunnel's socket is not captured"
        remove_capture(netns, backend="nft")
        # Without the policy route the app's SYN-ACK leaves by the default route: no connection.
        with pytest.raises(TimeoutError):
            _transparent_connect(netns, "10.244.9.9", timeout=1).close()
    finally:
        server.close()
