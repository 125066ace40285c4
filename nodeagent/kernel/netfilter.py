"""The iptables binaries, the one place the iptables datapath touches the kernel.

Every call can run in another network namespace (`netns`, a name or a path, via `kernel.netns.command_in`),
so the agent of a lab node and the tests can program a node's tables from outside it. All calls take the xtables lock
with kube-proxy's wait flags (`-w 5 -W 100000`), so a concurrent iptables user makes us wait, not fail.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from nodeagent.errors import NodeAgentError
from nodeagent.kernel.netns import command_in

log = structlog.get_logger("nodeagent.kernel.netfilter")

WAIT = ("-w", "5", "-W", "100000")
BACKENDS = ("nft", "legacy")
HINT_CHAIN = "KUBE-IPTABLES-HINT"  # kubelet's marker of the backend it uses
# "line 38 failed" (the kernel refused a rule) or "Error occurred at line: 3" (the line does not parse)
_FAILED_LINE = re.compile(r"line (\d+) failed|Error occurred at line: (\d+)")


class IptablesError(NodeAgentError):
    """An iptables command failed; the message carries its stderr (and, for a restore, the lines at fault)."""


@dataclass(frozen=True)
class Iptables:
    """One backend of iptables (`nft` or `legacy`), optionally inside the network namespace `netns`; `ipv6`: its
    ip6tables binaries (kube-proxy's IPv6 proxier runs ip6tables of the same backend, with the same commands)."""

    backend: str
    netns: str | None = None
    ipv6: bool = False

    @property
    def family(self) -> int:
        """The IP family these tables filter (4 or 6)."""
        return 6 if self.ipv6 else 4

    def _argv(self, tool: str, *args: str) -> list[str]:
        name = "ip6tables" if self.ipv6 else "iptables"
        binary = f"{name}-{self.backend}" if tool == "iptables" else f"{name}-{self.backend}-{tool}"
        return command_in(self.netns, [binary, *args])

    def _run(self, argv: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise IptablesError(f"{' '.join(argv[-6:])}: {result.stderr.strip() or result.returncode}")
        return result

    def restore(self, text: str) -> None:
        """Load `text` atomically, leaving chains it does not mention alone (`--noflush`)."""
        returncode, stderr = _feed(self._argv("restore", *WAIT, "--noflush", "--counters"), text)
        if returncode == 0:
            return
        detail = stderr.strip()
        if (found := _FAILED_LINE.search(detail)) is not None:
            detail += "\n" + offending_lines(text, int(found.group(1) or found.group(2)))
        raise IptablesError(f"{'ip6tables' if self.ipv6 else 'iptables'}-{self.backend}-restore failed: {detail}")

    def save(self, table: str) -> str:
        """`iptables-save -t table`."""
        return self._run(self._argv("save", "-t", table)).stdout

    def chain_names(self, table: str) -> set[str]:
        """The chain names of `iptables-save -t table`, read line by line (at 10,000 Services the nat dump
        is ~30 MB; only its chain declarations are kept)."""
        argv = self._argv("save", "-t", table)
        with tempfile.TemporaryFile() as err, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err) as proc:
            assert proc.stdout is not None
            found = {line[1:].split()[0].decode() for line in proc.stdout if line.startswith(b":")}
            returncode = proc.wait(timeout=300)
            if returncode != 0:
                err.seek(0)
                detail = err.read().decode(errors="replace").strip()
                raise IptablesError(f"{' '.join(argv[-6:])}: {detail or returncode}")
        return found

    def chain_exists(self, table: str, chain: str) -> bool:
        return self._run(self._argv("iptables", *WAIT, "-t", table, "-S", chain), check=False).returncode == 0

    def ensure_chain(self, table: str, chain: str) -> None:
        if not self.chain_exists(table, chain):
            self._run(self._argv("iptables", *WAIT, "-t", table, "-N", chain))

    def ensure_rule_first(self, table: str, chain: str, rule: Sequence[str]) -> bool:
        """Insert `rule` at the top of `chain` unless it is there (anywhere); returns whether it was added."""
        if self._run(self._argv("iptables", *WAIT, "-t", table, "-C", chain, *rule), check=False).returncode == 0:
            return False
        self._run(self._argv("iptables", *WAIT, "-t", table, "-I", chain, "1", *rule))
        return True

    def delete_rule(self, table: str, chain: str, rule: Sequence[str]) -> bool:
        """Delete `rule` from `chain` if present; returns whether it was there."""
        if self._run(self._argv("iptables", *WAIT, "-t", table, "-C", chain, *rule), check=False).returncode != 0:
            return False
        self._run(self._argv("iptables", *WAIT, "-t", table, "-D", chain, *rule))
        return True

    def list_table(self, table: str) -> str:
        """`iptables -t table -L -n`, for comparing with `nodeagent chains --format list`."""
        return self._run(self._argv("iptables", *WAIT, "-t", table, "-L", "-n")).stdout


def supports_random_fully() -> bool:
    """kube-proxy's `HasRandomFully`: iptables 1.6.2 or newer (MASQUERADE --random-fully)."""
    try:
        out = subprocess.run(["iptables", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    found = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    return found is not None and tuple(int(x) for x in found.groups()) >= (1, 6, 2)


_CHUNK = 1 << 20


def _feed(argv: list[str], text: str) -> tuple[int, str]:
    """Run `argv` with `text` on its stdin, encoded a megabyte at a time (a restore at 10,000 Services is
    ~30 MB: `subprocess.run(input=...)` would hold a second, encoded copy of all of it); its exit code and stderr.

    Its stderr is read to the end before waiting: the end of stderr is the exit, so the wait is immediate
    (`wait(timeout)` polls with sleeps of up to 50 ms: ~40 ms more per restore, measured)."""
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stderr is not None
        try:
            for start in range(0, len(text), _CHUNK):
                proc.stdin.write(text[start:start + _CHUNK].encode())
            proc.stdin.close()
        except BrokenPipeError:  # it stopped reading (a parse error): its exit code and stderr tell why
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()  # (what was left in the buffer cannot be written; closed all the same)
        stderr = proc.stderr.read()
        return proc.wait(timeout=300), stderr.decode(errors="replace")


def offending_lines(text: str, line: int, context: int = 3) -> str:
    """Lines `line`±`context` of restore input, numbered, as kube-proxy logs them on a failed restore."""
    lines = text.splitlines()
    low, high = max(0, line - 1 - context), min(len(lines), line + context)
    return "\n".join(f"{'>' if i + 1 == line else ' '} {i + 1:6} {lines[i]}" for i in range(low, high))


def chains_in(save_output: str) -> set[str]:
    """The chain names of an iptables-save table dump."""
    return {line[1:].split()[0] for line in save_output.splitlines() if line.startswith(":")}


def rule_count(save_output: str) -> int:
    return sum(1 for line in save_output.splitlines() if line.startswith("-A "))


def legacy_tables_exist(netns: str | None = None, *, ipv6: bool = False) -> bool:
    """Whether any legacy (x_tables) table of the family is instantiated in the namespace; reading does not
    create one."""
    names = "/proc/net/ip6_tables_names" if ipv6 else "/proc/net/ip_tables_names"
    argv = command_in(netns, ["cat", names])  # /proc/net: the reader's namespace
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    return result.returncode == 0 and bool(result.stdout.strip())


def detect_backend(netns: str | None = None) -> str:
    """The backend the node already uses, decided as kubernetes-sigs/iptables-wrappers does.

    kubelet's `KUBE-IPTABLES-HINT` chain (mangle) names it; otherwise the backend holding more rules
    wins; on a tie (a fresh node), nft, the default of current distributions.
    """
    counts = {}
    for backend in BACKENDS:
        ipt = Iptables(backend, netns)
        try:
            if backend == "legacy" and not legacy_tables_exist(netns):
                counts[backend] = 0  # asking iptables-legacy would instantiate its tables in this netns
                continue
            if ipt.chain_exists("mangle", HINT_CHAIN):
                return backend
            counts[backend] = sum(rule_count(ipt.save(table)) for table in ("mangle", "nat", "filter"))
        except (IptablesError, FileNotFoundError) as exc:
            log.info("iptables backend unavailable", backend=backend, reason=str(exc))
    if not counts:
        raise IptablesError("neither iptables-nft nor iptables-legacy works on this node")
    chosen = max(counts, key=lambda b: (counts[b], b == "nft"))
    log.info("iptables backend detected", backend=chosen, rules=counts)
    return chosen
