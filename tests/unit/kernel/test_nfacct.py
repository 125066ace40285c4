"""nfacct over netlink: the requests kube-proxy's nfacct client sends, and how replies are read."""

from __future__ import annotations

import errno
import struct

import pytest

from nodeagent.kernel import nfacct


def _reply(seq: int, kind: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 0, seq, 0) + payload + b"\0" * (-len(payload) % 4)


def _error(seq: int, code: int) -> bytes:
    return _reply(seq, nfacct.NLMSG_ERROR, struct.pack("=i", -code) + b"\0" * 16)


def _counter(seq: int, name: str, packets: int, count: int) -> bytes:
    body = (struct.pack("=BBH", 0, 0, 0) + nfacct._attr(nfacct.ATTR_NAME, name.encode() + b"\0")
            + nfacct._attr(nfacct.ATTR_PKTS, struct.pack(">Q", packets))
            + nfacct._attr(nfacct.ATTR_BYTES, struct.pack(">Q", count)))
    return _reply(seq, (nfacct.NFNL_SUBSYS_ACCT << 8) | nfacct.MSG_NEW, body)


class FakeSocket:
    """Answers each request from a table: name -> (counter or None) ; records what was sent."""

    def __init__(self, counters: dict[str, tuple[int, int]], probe_error: int = 0) -> None:
        self.counters = counters
        self.probe_error = probe_error
        self.sent: list[bytes] = []
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        _, kind, flags, seq, _ = struct.unpack_from("=IHHII", data)
        name = data[24:].split(b"\0")[0].decode()
        command = kind & 0xFF
        if name == nfacct.PROBE_NAME and self.probe_error:
            self.pending.append(_error(seq, self.probe_error))
        elif command == nfacct.MSG_GET:
            if name in self.counters:
                self.pending.append(_counter(seq, name, *self.counters[name]) + _error(seq, 0))
            else:
                self.pending.append(_error(seq, errno.ENOENT))
        else:
            assert flags & nfacct.NLM_F_CREATE
            self.counters[name] = (0, 0)
            self.pending.append(_error(seq, 0))
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.pending.pop(0)

    def bind(self, address: object) -> None:
        pass

    def close(self) -> None:
        pass


def client_with(monkeypatch: pytest.MonkeyPatch, fake: FakeSocket) -> nfacct.Nfacct:
    monkeypatch.setattr(nfacct.socket, "socket", lambda *args: fake)
    return nfacct.Nfacct()


def test_requests_are_kube_proxys_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSocket({})
    client = client_with(monkeypatch, fake)
    probe = fake.sent[0]
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", probe)
    assert (kind, flags) == ((7 << 8) | 1, nfacct.NLM_F_REQUEST | nfacct.NLM_F_ACK)
    assert probe[16:20] == b"\0\0\0\0"  # nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 0
    assert probe[20:24] == struct.pack("=HH", 4 + len("IMayExist") + 1, nfacct.ATTR_NAME)
    assert length == len(probe) and length % 4 == 0
    client.ensure("ct_state_invalid_dropped_pkts")
    _, kind, flags, _, _ = struct.unpack_from("=IHHII", fake.sent[-1])
    assert (kind, flags) == (7 << 8, nfacct.NLM_F_REQUEST | nfacct.NLM_F_ACK | nfacct.NLM_F_CREATE)
    sent = len(fake.sent)
    client.ensure("ct_state_invalid_dropped_pkts")
    assert len(fake.sent) == sent + 1, "an existing counter is only read"


def test_get_reads_packets_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_with(monkeypatch, FakeSocket({"localhost_nps_accepted_pkts": (7, 420)}))
    assert client.get("localhost_nps_accepted_pkts") == nfacct.Counter("localhost_nps_accepted_pkts", 7, 420)
    assert client.get("other") is None


def test_a_kernel_without_nfacct_is_unsupported_and_ensures_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nfacct.socket, "socket", lambda *args: FakeSocket({}, probe_error=errno.EOPNOTSUPP))
    with pytest.raises(nfacct.NfacctUnsupported, match="not available"):
        nfacct.Nfacct()
    assert nfacct.ensure_counters(["ct_state_invalid_dropped_pkts"]) == frozenset()


def test_ensure_counters_creates_each_and_names_too_long_fail_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSocket({"ct_state_invalid_dropped_pkts": (1, 2)})
    monkeypatch.setattr(nfacct.socket, "socket", lambda *args: fake)
    names = ["ct_state_invalid_dropped_pkts", "localhost_nps_accepted_pkts", "x" * 32]
    assert nfacct.ensure_counters(names) == frozenset(names[:2])
    assert set(fake.counters) == set(names[:2])
    assert nfacct.existing_counters(names[:2]) == frozenset(names[:2])
