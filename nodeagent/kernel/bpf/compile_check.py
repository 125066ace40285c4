"""Can bcc compile the datapath's programs and does this kernel's verifier accept them?

Run as `python -m nodeagent.kernel.bpf.compile_check`; `doctor` runs it in a separate process because bcc
pulls in LLVM (slow, large) and a failing compile can print a lot. It compiles bpf-src/sock_lb.c with
its maps unpinned (nothing is left on bpffs) and loads all eight programs (four per family), so "ok" here means
`--mode auto` will choose eBPF, and a failure prints the reason auto mode would fall back with.
`check` does the same for any program set: the mesh capture's is `python -m nodeagent.mesh.ebpf.compile_check`
(the kernel layer does not know the mesh's programs).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from nodeagent.kernel.bpf.loader import SOCK_LB_PROGRAMS, BpfError, ProgramLoad, source, verify


def unpinned(text: str) -> str:
    """The program source with every pinned map declared as an ordinary one."""
    text = re.sub(r'BPF_TABLE_PINNED7\((.*), "[^"]*", (\w+)\);', r"BPF_F_TABLE(\1, \2);", text)
    return re.sub(r'BPF_TABLE_PINNED\((.*), "[^"]*"\);', r"BPF_TABLE(\1);", text)


def check(label: str, text: str, programs: Sequence[ProgramLoad]) -> int:
    """Compile `text` with its maps unpinned and load `programs`: print the time and return 0, or the
    reason and 1 (`label` names the set in both)."""
    try:
        seconds = verify(unpinned(text), programs)
    except BpfError as exc:  # bcc itself is missing
        sys.stdout.write(f"{exc}\n")
        return 1
    except Exception as exc:  # bcc's compile or the verifier: the reason is all the caller needs
        sys.stdout.write(f"the {label} do not compile or load: {exc}\n")
        return 1
    sys.stdout.write(f"{label} ({', '.join(p.name for p in programs)}) compiled and verified in {seconds:.2f}s\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Check the socket load-balancing programs: print the compile+load time and exit 0, or the reason and 1."""
    if "--mesh" in (sys.argv[1:] if argv is None else argv):  # the option this module had before
        sys.stdout.write("the mesh capture's check is: python -m nodeagent.mesh.ebpf.compile_check\n")
        return 2
    return check("datapath programs", source(), SOCK_LB_PROGRAMS)


if __name__ == "__main__":
    sys.exit(main())
