"""The eBPF capture's pure half (nodeagent/mesh/ebpf/state.py): the configuration bytes the programs read and
the named states of a pod's capture and of the tunnel's hook. No root, no bcc."""

from __future__ import annotations

import ast
import dataclasses
import ipaddress
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.kernel.bpf import cgroup as kernel_cgroup
from nodeagent.kernel.bpf.loader import BpfError
from nodeagent.mesh.capture import ACTION, Action, CaptureStatus
from nodeagent.mesh.ebpf import hooks as mesh_hooks
from nodeagent.mesh.ebpf import programs as mesh
from nodeagent.mesh.ebpf.state import (
    BY_NAME,
    CONFIG_SIZE,
    MAX_EXCLUDE,
    POD_PROGRAMS,
    Attached,
    PodDesired,
    PodLive,
    assess_pod,
    assess_tunnel,
    decode_stats,
    describe_config,
    encode_config,
)
from nodeagent.mesh.iptables.render import CaptureOptions, CaptureOptionsError

IDS = {name: 100 + n for n, name in enumerate(BY_NAME)}
POD_IP, COOKIE = "10.244.1.2", 4097
CONFIG = encode_config(POD_IP)
DESIRED = PodDesired(IDS, CONFIG, COOKIE)
TC_ID = IDS["nm_tc_inbound"]


def installed() -> tuple[Attached, ...]:
    return tuple(Attached(p.name, IDS[p.name], p.on) for p in POD_PROGRAMS)


def test_config_layout_matches_struct_nm_config() -> None:
    options = CaptureOptions(exclude_outbound_ports=(53, 8443), exclude_inbound_ports=(9090,),
                             exclude_outbound_cidrs=("10.96.0.0/12", "fd00:96::/108"))
    value = encode_config(POD_IP, options)
    assert len(value) == CONFIG_SIZE == 408
    assert value[0:4] == socket.inet_aton(POD_IP)
    assert value[4:8] == socket.inet_aton("169.254.7.127")
    assert struct.unpack("=I", value[8:12]) == (0x539,)  # compared with sk->mark: host order
    assert value[12:18] == struct.pack(">HHH", 15001, 15006, 15008)  # compared with ports: network order
    assert value[18:22] == bytes([2, 1, 1, 1])  # counts: outbound ports, inbound ports, IPv4 and IPv6 ranges
    assert value[22:24] == struct.pack(">H", 15053)  # the DNS proxy, network order
    assert struct.unpack(">8H", value[24:40]) == (53, 8443, 0, 0, 0, 0, 0, 0)
    assert struct.unpack(">8H", value[40:56]) == (9090, 0, 0, 0, 0, 0, 0, 0)
    assert value[56:64] == socket.inet_aton("10.96.0.0") + socket.inet_aton("255.240.0.0")
    assert value[64:120] == bytes(56)
    # IPv6: no pod address (not captured), the IPv6 probe address
    assert value[120:136] == bytes(16)
    assert value[136:152] == socket.inet_pton(socket.AF_INET6, "fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
    assert value[152:184] == (socket.inet_pton(socket.AF_INET6, "fd00:96::")
                              + socket.inet_pton(socket.AF_INET6, "ffff:ffff:ffff:ffff:ffff:ffff:fff0:0"))
    assert value[184:408] == bytes(224)
    with_v6 = encode_config(POD_IP, options, "fd00:10:244:1::5")
    assert with_v6[:120] == value[:120] and with_v6[120:136] == socket.inet_pton(socket.AF_INET6, "fd00:10:244:1::5")
    assert with_v6[136:] == value[136:]
    assert "fd00:10:244:1::5" in describe_config(with_v6)
    assert "fd00:96::/108" in describe_config(with_v6) and "DNS -> 15053" in describe_config(with_v6)


def test_a_pod_that_opts_out_of_dns_capture_has_dns_port_zero() -> None:
    value = encode_config(POD_IP, CaptureOptions(dns_port=None))
    assert value[22:24] == bytes(2)
    assert value[:22] == CONFIG[:22] and value[24:] == CONFIG[24:]
    assert "DNS not captured" in describe_config(value)


def test_the_iptables_only_options_do_not_change_the_config() -> None:
    assert encode_config(POD_IP, CaptureOptions(connection_mark=0x222, route_table=7, rule_priority=100)) == CONFIG


ports = st.lists(st.integers(1, 65535), max_size=MAX_EXCLUDE).map(tuple)
cidrs = st.lists(st.builds(lambda a, p: str(ipaddress.IPv4Network((a, p), strict=False)),
                           st.integers(0, 2**32 - 1), st.integers(0, 32)), max_size=MAX_EXCLUDE).map(tuple)
cidrs6 = st.lists(st.builds(lambda a, p: str(ipaddress.IPv6Network((a, p), strict=False)),
                            st.integers(0, 2**128 - 1), st.integers(0, 128)), max_size=MAX_EXCLUDE).map(tuple)


@given(ports, ports, cidrs, cidrs6, st.integers(1, 0xFFF), st.ip_addresses(v=4).map(str))
def test_describe_reads_back_what_was_encoded(out: tuple[int, ...], inbound: tuple[int, ...],
                                              nets: tuple[str, ...], nets6: tuple[str, ...], mark: int, pod: str
                                              ) -> None:
    options = CaptureOptions(mark=mark, connection_mark=0x111 if mark != 0x111 else 0x112,
                             exclude_outbound_ports=out, exclude_inbound_ports=inbound,
                             exclude_outbound_cidrs=nets + nets6)
    text = describe_config(encode_config(pod, options))
    assert text.startswith(f"pod {pod}: ")
    assert f"mark {mark:#x}" in text
    assert f"exclude outbound ports {list(out)}, inbound ports {list(inbound)}" in text
    assert f"outbound cidrs {[str(ipaddress.IPv4Network(n)) for n in nets] + list(nets6)}" in text


@pytest.mark.parametrize("field", ["exclude_outbound_ports", "exclude_inbound_ports", "exclude_outbound_cidrs"])
def test_more_exclusions_than_the_program_holds_are_refused_by_name(field: str) -> None:
    values: Any = (tuple(f"10.{i}.0.0/16" for i in range(MAX_EXCLUDE + 1)) if field.endswith("cidrs")
                                  else tuple(range(1, MAX_EXCLUDE + 2)))
    options = dataclasses.replace(CaptureOptions(), **{field: values})
    with pytest.raises(CaptureOptionsError, match=f"capture option {field}=.*at most {MAX_EXCLUDE}"):
        encode_config(POD_IP, options)


def test_each_family_holds_its_own_excluded_ranges() -> None:
    v4 = tuple(f"10.{i}.0.0/16" for i in range(MAX_EXCLUDE))
    v6 = tuple(f"fd00:{i}::/64" for i in range(MAX_EXCLUDE))
    assert len(encode_config(POD_IP, CaptureOptions(exclude_outbound_cidrs=v4 + v6))) == CONFIG_SIZE
    with pytest.raises(CaptureOptionsError, match=f"exclude_outbound_cidrs=.*at most {MAX_EXCLUDE} IPv6 ranges"):
        encode_config(POD_IP, CaptureOptions(exclude_outbound_cidrs=v4 + v6 + ("fd00:ff::/64",)))


def test_a_bad_pod_address_is_refused_by_name() -> None:
    with pytest.raises(CaptureOptionsError, match=r"pod_ip='10\.244\.1'"):
        encode_config("10.244.1")


def test_stats_decode() -> None:
    assert decode_stats(struct.pack("=6Q", 1, 2, 3, 4, 5, 6)) == {
        "outbound": 1, "outbound_skipped": 2, "inbound": 3, "inbound_dropped": 4, "answered": 5, "dns": 6}


CASES = {
    "nothing of ours": (PodLive((), None, None), CaptureStatus.ABSENT, None, ()),
    "everything": (PodLive(installed(), CONFIG, COOKIE), CaptureStatus.INSTALLED, (), ()),
    "connect4 detached": (PodLive(tuple(a for a in installed() if a.name != "nm_connect4"), CONFIG, COOKIE),
                          CaptureStatus.DRIFTED, (f"connect4 nm_connect4 (id {IDS['nm_connect4']})",), ()),
    "tc filter twice": (PodLive((*installed(), Attached("nm_tc_inbound", TC_ID, "tc")), CONFIG, COOKIE),
                        CaptureStatus.DRIFTED, (), (f"tc-ingress nm_tc_inbound (id {TC_ID}) x2 on interface",)),
    "an older load": (PodLive((*installed(), Attached("nm_connect4", 7, "cgroup /x")), CONFIG, COOKIE),
                      CaptureStatus.STALE, (), ("connect4 nm_connect4 (id 7, not the pinned program) on cgroup /x",)),
    "only an older load": (PodLive((Attached("nm_sockops", 7, "cgroup /x"),), None, None), CaptureStatus.STALE,
                           None, None),
    "config only": (PodLive((), CONFIG, COOKIE), CaptureStatus.DRIFTED, None, ()),
    "address of another namespace": (PodLive(installed(), CONFIG, 5), CaptureStatus.DRIFTED,
                                     (f"pod address -> netns cookie {COOKIE}",),
                                     ("pod address -> netns cookie 5 (another namespace)",)),
}


@pytest.mark.parametrize("case", CASES)
def test_pod_states(case: str) -> None:
    live, status, missing, unexpected = CASES[case]
    state = assess_pod(DESIRED, live, netns="/run/netns/x")
    assert state.status is status
    assert state.backend == "ebpf" and state.netns == "/run/netns/x"
    if missing is not None:
        assert state.missing == missing
    if unexpected is not None:
        assert state.unexpected == unexpected
    assert isinstance(ACTION[state.status], Action)


def test_another_config_is_drift_and_names_both() -> None:
    other = encode_config(POD_IP, CaptureOptions(outbound_port=15999))
    state = assess_pod(DESIRED, PodLive(installed(), other, COOKIE), netns="n")
    assert state.status is CaptureStatus.DRIFTED
    assert state.missing == (f"config {describe_config(CONFIG)}",)
    assert state.unexpected == (f"config {describe_config(other)}",)


attached = st.lists(st.builds(Attached, st.sampled_from([p.name for p in POD_PROGRAMS]),
                              st.sampled_from([0, *IDS.values()]), st.just("somewhere")), max_size=6).map(tuple)


@given(attached, st.sampled_from([None, CONFIG, encode_config("10.0.0.1")]), st.sampled_from([None, COOKIE, 9]))
def test_installed_exactly_when_each_program_once_and_the_config_match(
        found: tuple[Attached, ...], config: bytes | None, cookie: int | None) -> None:
    state = assess_pod(DESIRED, PodLive(found, config, cookie), netns="n")
    exact = sorted((a.name, a.prog_id) for a in found) == sorted((p.name, IDS[p.name]) for p in POD_PROGRAMS)
    assert (state.status is CaptureStatus.INSTALLED) == (exact and config == CONFIG and cookie == COOKIE)
    assert (state.status is CaptureStatus.ABSENT) == (not found and config is None and cookie is None)
    if state.status is CaptureStatus.STALE:
        assert any(a.prog_id != IDS[a.name] for a in found)


def test_tunnel_hook_states() -> None:
    hook = Attached("nm_getsockopt", IDS["nm_getsockopt"], "cgroup /t")
    assert assess_tunnel(IDS, (), cgroup="/t").status is CaptureStatus.ABSENT
    assert assess_tunnel(IDS, (hook,), cgroup="/t").status is CaptureStatus.INSTALLED
    old = assess_tunnel(IDS, (Attached("nm_getsockopt", 1, "cgroup /t"),), cgroup="/t")
    assert old.status is CaptureStatus.STALE
    assert old.missing == (f"getsockopt nm_getsockopt (id {IDS['nm_getsockopt']})",)


def test_the_state_module_stays_pure() -> None:
    tree = ast.parse(Path(mesh.__file__).with_name("state.py").read_text())  # ebpf.state is not on the
    # import-linter purity list: that contract forbids nodeagent.kernel.bpf, its own package
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"subprocess", "bcc", "pyroute2", "os", "nodeagent.kernel.bpf.loader",
                           "nodeagent.kernel.bpf.syscall", "nodeagent.mesh.iptables.apply"}, imported


def test_the_root_cgroup_is_refused_before_anything_is_attached(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []

    def bpftool(*args: str) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, "", "")

    def attached(cgroup: Path) -> list[dict[str, object]]:
        calls.append(("show", str(cgroup)))
        return []

    monkeypatch.setattr(kernel_cgroup, "cgroup2_root", lambda: tmp_path)
    monkeypatch.setattr(kernel_cgroup, "bpftool", bpftool)
    monkeypatch.setattr(kernel_cgroup, "attached", attached)
    programs = mesh.MeshPrograms("s", tmp_path, {}, dict(IDS), adopted=True)
    with pytest.raises(BpfError, match="root cgroup"):
        mesh.attach_tunnel(programs, tmp_path)
    with pytest.raises(BpfError, match="root cgroup"):
        mesh_hooks.attach_cgroup(tmp_path, IDS, tmp_path / ".." / tmp_path.name, ("nm_connect4",))
    assert calls == []
    (tmp_path / "pod").mkdir()
    mesh_hooks.attach_cgroup(tmp_path, IDS, tmp_path / "pod", ("nm_connect4",))
    assert calls[-1][:3] == ("cgroup", "attach", str(tmp_path / "pod")), "a cgroup below the root is fine"
