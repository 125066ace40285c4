"""Can bcc compile the eBPF mesh capture (bpf-src/mesh_capture.c) and does this kernel's verifier accept its
programs? Run as `python -m nodeagent.mesh.ebpf.compile_check` (a separate process: bcc pulls in LLVM);
nothing is pinned. The service datapath's check is `python -m nodeagent.kernel.bpf.compile_check`.
"""

from __future__ import annotations

import sys

from nodeagent.kernel.bpf.compile_check import check
from nodeagent.mesh.ebpf.programs import source
from nodeagent.mesh.ebpf.state import PROGRAMS


def main() -> int:
    """Print the compile+load time and exit 0, or the reason and exit 1."""
    return check("mesh capture programs", source(), PROGRAMS)


if __name__ == "__main__":
    sys.exit(main())
