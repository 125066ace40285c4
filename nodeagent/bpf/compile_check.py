"""Can bcc compile and load a program on this kernel? Run as `python -m nodeagent.bpf.compile_check`.

A separate process because bcc pulls in LLVM (slow, large) and a failing compile can print a lot.
"""

from __future__ import annotations

import sys
import time

PROBE_SOURCE = "int na_probe(struct bpf_sock_addr *ctx) { return 1; }"
BPF_CGROUP_INET4_CONNECT = 10


def main() -> int:
    """Print the compile+load time and exit 0, or the reason and exit 1."""
    try:
        from bcc import BPF
    except ImportError as exc:
        print(f"bcc is not importable: {exc}")
        return 1
    started = time.monotonic()
    try:
        program = BPF(text=PROBE_SOURCE)
        program.load_func("na_probe", BPF.CGROUP_SOCK_ADDR, attach_type=BPF_CGROUP_INET4_CONNECT)
    except Exception as exc:
        print(f"bcc failed: {exc}")
        return 1
    print(f"compiled and loaded in {time.monotonic() - started:.2f}s")
    program.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
