"""Can bcc compile the datapath's programs and does this kernel's verifier accept them?

Run as `python -m nodeagent.kernel.bpf.compile_check`; `doctor` runs it in a separate process because bcc
pulls in LLVM (slow, large) and a failing compile can print a lot. It compiles bpf-src/sock_lb.c with
its maps unpinned (nothing is left on bpffs) and loads all four programs, so "ok" here means
`--mode auto` will choose eBPF, and a failure prints the reason auto mode would fall back with.
With `--mesh` it does the same for the eBPF mesh capture (bpf-src/mesh_capture.c, its five programs).
"""

from __future__ import annotations

import re
import sys
import time

from nodeagent.kernel.bpf.loader import CFLAGS, PROGRAMS, source


def unpinned(text: str) -> str:
    """The program source with every pinned map declared as an ordinary one."""
    text = re.sub(r'BPF_TABLE_PINNED7\((.*), "[^"]*", (\w+)\);', r"BPF_F_TABLE(\1, \2);", text)
    return re.sub(r'BPF_TABLE_PINNED\((.*), "[^"]*"\);', r"BPF_TABLE(\1);", text)


def check_mesh() -> int:
    """The mesh capture's programs: print the compile+load time and return 0, or the reason and 1."""
    from bcc import BPF

    from nodeagent.mesh.ebpf import programs as mesh
    from nodeagent.mesh.ebpf import state as mesh_state

    started = time.monotonic()
    names = ", ".join(p.name for p in mesh_state.PROGRAMS)
    try:
        program = BPF(text=unpinned(mesh.source()).encode(), cflags=CFLAGS)
        for p in mesh_state.PROGRAMS:
            if p.attach_type >= 0:
                program.load_func(p.name.encode(), p.prog_type, attach_type=p.attach_type)
            else:
                program.load_func(p.name.encode(), p.prog_type)
    except Exception as exc:
        sys.stdout.write(f"the mesh capture programs do not compile or load: {exc}\n")
        return 1
    seconds = time.monotonic() - started
    sys.stdout.write(f"mesh capture programs ({names}) compiled and verified in {seconds:.2f}s\n")
    program.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Print the compile+load time and exit 0, or the reason and exit 1."""
    try:
        from bcc import BPF
    except ImportError as exc:
        sys.stdout.write(f"bcc is not importable: {exc}\n")
        return 1
    if "--mesh" in (sys.argv[1:] if argv is None else argv):
        return check_mesh()
    started = time.monotonic()
    try:
        program = BPF(text=unpinned(source()), cflags=CFLAGS)
        for name, (attach_type, _) in PROGRAMS.items():
            program.load_func(name, BPF.CGROUP_SOCK_ADDR, attach_type=attach_type)
    except Exception as exc:
        sys.stdout.write(f"the datapath programs do not compile or load: {exc}\n")
        return 1
    seconds = time.monotonic() - started
    sys.stdout.write(f"datapath programs ({', '.join(PROGRAMS)}) compiled and verified in {seconds:.2f}s\n")
    program.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
