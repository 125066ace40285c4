"""Just enough of bpf(2) through ctypes to probe the kernel without bcc: load a trivial cgroup
sock_addr program and attach/detach it. `doctor` uses it to tell "the kernel cannot" apart from
"bcc cannot compile", which need different fixes.
"""

from __future__ import annotations

import ctypes
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


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(0, f"bpf(2) syscall number unknown for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.syscall(number, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
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
