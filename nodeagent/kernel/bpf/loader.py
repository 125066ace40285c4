"""The one eBPF loader (`compile_and_pin`, `verify`: every program set of both jobs is compiled here with
bcc), and loading, pinning, adopting and attaching the socket load-balancing programs (bpf-src/sock_lb.c).

- Both families: connect4/sendmsg4/recvmsg4/getpeername4 and their IPv6 hooks (connect6, ...), each family
  with its own Service maps (na_services, ... and na_services6, ...).

- Everything lives under `/sys/fs/bpf/nodeagent/<scope>/v<LAYOUT_VERSION>/`: the maps (pinned by bcc
  as it creates them) and the eight programs (pinned here). A changed map layout bumps the version, so
  an old pinned map is never read with a new layout; the old directory is removed by `cleanup`.
- A restarted agent **adopts** what is pinned: no compile, no reload, the attached programs never stop
  translating. bcc is needed only the first time (or after a layout change).
- Attachments are made with `BPF_F_ALLOW_MULTI` through bpftool, explicitly and idempotently: a
  program of ours already attached stays; one from an older load is replaced; others' programs on the
  same cgroup are never touched. Attachments outlive the agent (bcc gives no bpf_link, and the agent
  should not take the datapath down with it anyway).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from nodeagent.errors import NodeAgentError
from nodeagent.kernel.bpf.syscall import MapHandle, obj_pin

log = structlog.get_logger("nodeagent.kernel.bpf.loader")

LAYOUT_VERSION = 4  # 4: nodeport_tc.c's IPv6 flow map na_ct6 (and its IPv6 Service maps shared)
# enum bpf_prog_type values (bcc's BPF.<NAME> constants, without importing bcc to name them)
PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_CGROUP_SOCK_ADDR = 18
NO_ATTACH_TYPE = -1  # a program loaded without an expected attach type (tc)
BPFFS = Path("/sys/fs/bpf")
ROOT = BPFFS / "nodeagent"
# program name -> (bpf_attach_type number, bpftool's argument for it)
PROGRAMS = {
    "na_connect4": (10, "connect4"),
    "na_sendmsg4": (14, "sendmsg4"),
    "na_recvmsg4": (19, "recvmsg4"),
    "na_getpeername4": (29, "getpeername4"),
    "na_connect6": (11, "connect6"),
    "na_sendmsg6": (15, "sendmsg6"),
    "na_recvmsg6": (20, "recvmsg6"),
    "na_getpeername6": (30, "getpeername6"),
}
# bpftool's argument -> the name its JSON output uses (libbpf's)
_JSON_NAMES = {"connect4": "cgroup_inet4_connect", "sendmsg4": "cgroup_udp4_sendmsg",
               "recvmsg4": "cgroup_udp4_recvmsg", "getpeername4": "cgroup_inet4_getpeername",
               "connect6": "cgroup_inet6_connect", "sendmsg6": "cgroup_udp6_sendmsg",
               "recvmsg6": "cgroup_udp6_recvmsg", "getpeername6": "cgroup_inet6_getpeername"}
# map name -> (key size, value size), matching the structs in sock_lb.c
MAPS = {
    "na_services": (8, 20),
    "na_slots": (8, 8),
    "na_backends": (4, 8),
    "na_reverse": (16, 8),
    "na_affinity": (16, 16),
    "na_services6": (20, 20),
    "na_slots6": (8, 8),
    "na_backends6": (4, 20),
    "na_reverse6": (32, 20),
    "na_affinity6": (32, 16),
}
# maps pinned but never touched from userspace (socket-local storage)
KERNEL_ONLY_MAPS = ("na_sk_reverse", "na_sk_reverse6")


class BpfError(NodeAgentError):
    """The eBPF datapath cannot be set up here; the message says what failed (compile, verifier, bpffs...)."""


def pin_dir(scope: str) -> Path:
    """Where `scope`'s maps and programs are pinned (versioned by map layout)."""
    return ROOT / scope / f"v{LAYOUT_VERSION}"


# The C programs, read from the source tree (scripts/setup.sh and the image install from it). Passed as an
# include directory too, so the programs share bpf-src/lib/*.h (compiled from text, bcc has no file path).
SOURCE_DIR = Path(__file__).resolve().parents[3] / "bpf-src"
CFLAGS = [f"-I{SOURCE_DIR}"]


def source() -> str:
    """The C source of the programs."""
    return (SOURCE_DIR / "sock_lb.c").read_text()


class ProgramLoad(Protocol):
    """What loading one program of a C source needs: its function name and how the kernel must load it."""

    @property
    def name(self) -> str: ...
    @property
    def prog_type(self) -> int: ...  # enum bpf_prog_type
    @property
    def attach_type(self) -> int: ...  # enum bpf_attach_type, NO_ATTACH_TYPE for none


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    """A `ProgramLoad` as plain data (the service programs' sets)."""

    name: str
    prog_type: int
    attach_type: int = NO_ATTACH_TYPE


SOCK_LB_PROGRAMS = tuple(ProgramSpec(name, PROG_TYPE_CGROUP_SOCK_ADDR, attach)
                         for name, (attach, _) in PROGRAMS.items())


def _compile(text: str, programs: Sequence[ProgramLoad], each: Callable[[ProgramLoad, int], None]) -> None:
    """Compile `text` with bcc (`cflags=CFLAGS`) and load each program, handing `each` its fd (valid
    until this returns: pin it to keep it); raises BpfError, after bcc has released what it loaded."""
    try:
        from bcc import BPF
    except ImportError as exc:
        raise BpfError(f"bcc is not importable: {exc}") from exc
    bpf = BPF(text=text.encode(), cflags=CFLAGS)
    try:
        for program in programs:
            name = program.name.encode()
            fn = (bpf.load_func(name, program.prog_type, attach_type=program.attach_type)
                  if program.attach_type != NO_ATTACH_TYPE else bpf.load_func(name, program.prog_type))
            each(program, fn.fd)
    finally:
        bpf.cleanup()


def verify(text: str, programs: Sequence[ProgramLoad]) -> float:
    """Compile `text` and load `programs` without pinning anything (the verifier's verdict); returns the
    seconds it took. Raises BpfError (bcc missing) or bcc's own exception (compile or verifier)."""
    started = time.monotonic()
    _compile(text, programs, lambda _program, _fd: None)
    return time.monotonic() - started


def compile_and_pin(text: str, directory: Path, programs: Sequence[ProgramLoad], *, what: str) -> None:
    """Compile `text` (PIN_DIR replaced by `directory`, where bcc pins its maps), load `programs` and pin
    each at `directory/<name>`. Either all are pinned or none is: a later start must never adopt a
    half-pinned set. Raises BpfError naming `what` on any failure."""
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pinned: list[Path] = []

    def pin(program: ProgramLoad, fd: int) -> None:
        path = directory / program.name
        path.unlink(missing_ok=True)
        obj_pin(fd, str(path))
        pinned.append(path)

    try:
        _compile(text.replace("PIN_DIR", str(directory)), programs, pin)
    except Exception as exc:
        for path in pinned:
            path.unlink(missing_ok=True)
        raise BpfError(f"compiling or loading {what} ({', '.join(p.name for p in programs)}) failed: {exc}") from exc
    log.info("ebpf programs compiled, loaded and pinned", programs=what, directory=str(directory),
             seconds=round(time.monotonic() - started, 2))


def ensure_pinned(text: str, directory: Path, programs: Sequence[ProgramLoad], *, what: str,
                  also: Sequence[str] = ()) -> bool:
    """Adopt `programs` if they (and the pins `also`, e.g. maps) are all pinned in `directory`, else
    `compile_and_pin` them; returns whether they were adopted (nothing compiled)."""
    if all((directory / name).exists() for name in (*(p.name for p in programs), *also)):
        return True
    compile_and_pin(text, directory, programs, what=what)
    return False


@dataclass
class ServicePrograms:
    """The pinned socket load-balancing programs and open Service maps of one scope."""

    scope: str
    directory: Path
    maps: dict[str, MapHandle]
    adopted: bool

    def close(self) -> None:
        for handle in self.maps.values():
            handle.close()


def load(scope: str) -> ServicePrograms:
    """Adopt the pinned datapath of `scope`, or compile, load and pin it; raises BpfError on failure."""
    if not BPFFS.is_dir() or not any(line.split()[1] == str(BPFFS) and line.split()[2] == "bpf"
                                     for line in Path("/proc/mounts").read_text().splitlines()):
        raise BpfError(f"no bpffs mounted at {BPFFS} (mount -t bpf bpf {BPFFS})")
    directory = pin_dir(scope)
    adopted = ensure_pinned(source(), directory, SOCK_LB_PROGRAMS, what="the socket programs",
                            also=(*MAPS, *KERNEL_ONLY_MAPS))
    maps = {name: MapHandle.pinned(str(directory / name), *sizes) for name, sizes in MAPS.items()}
    log.info("ebpf datapath ready", scope=scope, adopted=adopted, pins=str(directory))
    return ServicePrograms(scope, directory, maps, adopted)


def _bpftool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bpftool", *args], capture_output=True, text=True, timeout=30, check=False)


def program_id(path: Path) -> int:
    """The kernel id of the program pinned at `path`."""
    result = _bpftool("-j", "prog", "show", "pinned", str(path))
    if result.returncode != 0:
        raise BpfError(f"bpftool prog show pinned {path}: {result.stderr.strip()}")
    return int(json.loads(result.stdout)["id"])


def attached(cgroup: Path) -> list[dict[str, object]]:
    """Programs attached directly to `cgroup` (bpftool's records: id, attach_type, name)."""
    result = _bpftool("-j", "cgroup", "show", str(cgroup))
    if result.returncode != 0:
        raise BpfError(f"bpftool cgroup show {cgroup}: {result.stderr.strip()}")
    records: list[dict[str, object]] = json.loads(result.stdout.strip() or "[]")
    return records


def attach(datapath: ServicePrograms, cgroup: Path) -> list[str]:
    """Attach every program of `datapath` to `cgroup`; returns what changed (empty if all were attached)."""
    changed = []
    present = attached(cgroup)
    for name, (_, kind) in PROGRAMS.items():
        wanted = program_id(datapath.directory / name)
        ours = [r for r in present if r.get("attach_type") in (kind, _JSON_NAMES[kind])
                and name.startswith(str(r.get("name", "")) or "?")]
        if any(r.get("id") == wanted for r in ours):
            continue
        result = _bpftool("cgroup", "attach", str(cgroup), kind, "pinned", str(datapath.directory / name), "multi")
        if result.returncode != 0:
            raise BpfError(f"attaching {name} to {cgroup} failed: {result.stderr.strip()}")
        for stale in ours:  # an older load of ours: replaced, after the new one is in place
            _bpftool("cgroup", "detach", str(cgroup), kind, "id", str(stale["id"]))
        changed.append(f"{kind} -> {cgroup}")
    if changed:
        log.info("ebpf programs attached", cgroup=str(cgroup), changed=changed)
    return changed


def detach(cgroup: Path) -> list[str]:
    """Detach every program of ours (by name) from `cgroup`; returns what was detached."""
    if not cgroup.is_dir():
        return []
    removed = []
    for record in attached(cgroup):
        name = str(record.get("name", ""))
        if name.startswith("na_") and any(n.startswith(name) for n in PROGRAMS):
            result = _bpftool("cgroup", "detach", str(cgroup), str(record["attach_type"]), "id", str(record["id"]))
            if result.returncode == 0:
                removed.append(f"{record['attach_type']} {name} <- {cgroup}")
    return removed


def remove_pins(scope: str) -> list[str]:
    """Remove every pin of `scope` (all layout versions); programs and maps go once nothing holds them."""
    directory = ROOT / scope
    if not directory.exists():
        return []
    removed = [str(p) for p in sorted(directory.rglob("*")) if p.is_file() or not p.is_dir()]
    shutil.rmtree(directory)
    if ROOT.exists() and not any(ROOT.iterdir()):
        ROOT.rmdir()
    return removed or [str(directory)]


def cgroup2_root() -> Path:
    """Where the unified (v2) hierarchy is mounted."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise BpfError("no cgroup v2 hierarchy is mounted")


def own_cgroup() -> Path:
    """This process's cgroup v2 directory; refuses the root (attach there only when asked explicitly)."""
    relative = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
                     if line.startswith("0::")), None)
    if not relative or relative == "/":
        raise BpfError("this process runs in the root cgroup; pass --cgroup to attach there deliberately")
    return cgroup2_root() / relative.lstrip("/")
