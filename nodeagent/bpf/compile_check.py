"""Can bcc compile the datapath's programs and does this kernel's verifier accept them?

Run as `python -m nodeagent.bpf.compile_check`; `doctor` runs it in a separate process because bcc
pulls in LLVM (slow, large) and a failing compile can print a lot. It compiles bpf-src/sock_lb.c with
its maps unpinned (nothing is left on bpffs) and loads all four programs, so "ok" here means
`--mode auto` will choose eBPF, and a failure prints the reason auto mode would fall back with.
"""

from __future__ import annotations

import re
import sys
import time

from nodeagent.bpf.loader import PROGRAMS, source


def unpinned(text: str) -> str:
    """The program source with every pinned map declared as an ordinary one."""
    text = re.sub(r'BPF_TABLE_PINNED7\((.*), "[^"]*", (\w+)\);', r"BPF_F_TABLE(\1, \2);", text)
    return re.sub(r'BPF_TABLE_PINNED\((.*), "[^"]*"\);', r"BPF_TABLE(\1);", text)


def main() -> int:
    """Print the compile+load time and exit 0, or the reason and exit 1."""
    try:
        from bcc import BPF
    except ImportError as exc:
        print(f"bcc is not importable: {exc}")
        return 1
    started = time.monotonic()
    try:
        program = BPF(text=unpinned(source()))
        for name, (attach_type, _) in PROGRAMS.items():
            program.load_func(name, BPF.CGROUP_SOCK_ADDR, attach_type=attach_type)
    except Exception as exc:
        print(f"the datapath programs do not compile or load: {exc}")
        return 1
    print(f"datapath programs ({', '.join(PROGRAMS)}) compiled and verified in {time.monotonic() - started:.2f}s")
    program.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
