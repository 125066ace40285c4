"""Just enough of bpf(2) through ctypes to probe the kernel without bcc: load a trivial cgroup
sock_addr program and attach/detach it. `doctor` uses it to tell "the kernel cannot" apart from
"bcc cannot compile", which need different fixes.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH = 5, 8, 9
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_CGROUP_INET4_CONNECT = 10

# r0 = 1 (allow the connect); exit
_ALLOW_PROGRAM = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32), ("_pad", ctypes.c_uint8 * 56),
    ]


class _AttachAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32), ("_pad", ctypes.c_uint8 * 112),
    ]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(0, f"bpf(2) syscall number unknown for {platform.machine()}")
    result = int(_libc().syscall(number, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def load_connect4_probe() -> int:
    """Load an allow-all cgroup connect4 program; returns its fd (close it when done)."""
    insns = ctypes.create_string_buffer(_ALLOW_PROGRAM, len(_ALLOW_PROGRAM))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_CGROUP_SOCK_ADDR, insn_cnt=2,
                         insns=ctypes.addressof(insns), license=ctypes.addressof(license_),
                         prog_name=b"na_probe", expected_attach_type=BPF_CGROUP_INET4_CONNECT)
    return _bpf(BPF_PROG_LOAD, attr)


def attach_detach_connect4(prog_fd: int, cgroup_dir: str) -> None:
    """Attach the program to `cgroup_dir` as connect4, then detach it again."""
    cg_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        attr = _AttachAttr(target_fd=cg_fd, attach_bpf_fd=prog_fd, attach_type=BPF_CGROUP_INET4_CONNECT)
        _bpf(BPF_PROG_ATTACH, attr)
        _bpf(BPF_PROG_DETACH, attr)
    finally:
        os.close(cg_fd)


# --- maps and pins, for the datapath's map sync (no bcc needed once programs are loaded) -------------

BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 1, 2, 3, 4
BPF_OBJ_PIN, BPF_OBJ_GET = 6, 7
BPF_MAP_LOOKUP_BATCH = 24
ENOTSUPP = 524  # the kernel's own "operation not supported" (a map type without batch operations)
BPF_ANY = 0


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad0", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("_pad", ctypes.c_uint8 * 96)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("_pad", ctypes.c_uint8 * 80)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32),
                ("_pad", ctypes.c_uint8 * 112)]


def obj_get(path: str) -> int:
    """An fd for the map or program pinned at `path` (close it when done)."""
    name = ctypes.create_string_buffer(path.encode())
    return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(name)))


def obj_pin(fd: int, path: str) -> None:
    """Pin the map or program `fd` at `path` on bpffs."""
    name = ctypes.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(name), bpf_fd=fd))


class MapHandle:
    """Element operations on one BPF map through its fd; keys and values are raw bytes."""

    def __init__(self, fd: int, key_size: int, value_size: int) -> None:
        self.fd, self.key_size, self.value_size = fd, key_size, value_size

    @classmethod
    def pinned(cls, path: str, key_size: int, value_size: int) -> MapHandle:
        return cls(obj_get(path), key_size, value_size)

    def close(self) -> None:
        os.close(self.fd)

    def update(self, key: bytes, value: bytes) -> None:
        k, v = ctypes.create_string_buffer(key, self.key_size), ctypes.create_string_buffer(value, self.value_size)
        _bpf(BPF_MAP_UPDATE_ELEM, _ElemAttr(map_fd=self.fd, key=ctypes.addressof(k), value=ctypes.addressof(v),
                                            flags=BPF_ANY))

    def delete(self, key: bytes) -> bool:
        """Delete `key`; False if it was not there."""
        k = ctypes.create_string_buffer(key, self.key_size)
        try:
            _bpf(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=self.fd, key=ctypes.addressof(k)))
        except FileNotFoundError:
            return False
        return True

    def lookup(self, key: bytes) -> bytes | None:
        k, v = ctypes.create_string_buffer(key, self.key_size), ctypes.create_string_buffer(self.value_size)
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=self.fd, key=ctypes.addressof(k), value=ctypes.addressof(v)))
        except FileNotFoundError:
            return None
        return v.raw

    def keys(self) -> list[bytes]:
        """Every key (a snapshot taken by walking GET_NEXT_KEY)."""
        found: list[bytes] = []
        current = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            k = ctypes.create_string_buffer(current, self.key_size) if current is not None else None
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, _ElemAttr(map_fd=self.fd, key=ctypes.addressof(k) if k is not None else 0,
                                                     value=ctypes.addressof(nxt)))
            except FileNotFoundError:
                return found
            current = nxt.raw
            found.append(current)

    def items(self) -> dict[bytes, bytes]:
        """Every entry: in batches of thousands per syscall where the kernel can (BPF_MAP_LOOKUP_BATCH, 5.6+, hash
        maps), else key by key. A full na_ct (200,000 entries) took 1.7 s key by key."""
        try:
            return self._items_batched()
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP):
                raise
        out = {}
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                out[key] = value
        return out

    def _items_batched(self, batch: int = 4096) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        token_size = max(self.key_size, 8)  # the position between calls: a bucket index for hash maps
        tokens = (ctypes.create_string_buffer(token_size), ctypes.create_string_buffer(token_size))
        first = True
        while True:
            keys = ctypes.create_string_buffer(self.key_size * batch)
            values = ctypes.create_string_buffer(self.value_size * batch)
            attr = _BatchAttr(in_batch=0 if first else ctypes.addressof(tokens[0]),
                              out_batch=ctypes.addressof(tokens[1]), keys=ctypes.addressof(keys),
                              values=ctypes.addressof(values), count=batch, map_fd=self.fd)
            done = False
            try:
                _bpf(BPF_MAP_LOOKUP_BATCH, attr)
            except FileNotFoundError:
                done = True  # the last entries came with the end of the map
            except OSError as exc:
                if exc.errno == errno.ENOSPC and attr.count == 0:  # one bucket holds more than a batch
                    batch *= 2
                    continue
                raise
            raw_keys, raw_values = keys.raw, values.raw
            for i in range(attr.count):
                out[raw_keys[i * self.key_size:(i + 1) * self.key_size]] = \
                    raw_values[i * self.value_size:(i + 1) * self.value_size]
            if done:
                return out
            ctypes.memmove(tokens[0], tokens[1], token_size)
            first = False
