"""The `nft` binary (or libnftables in this process), the one place the nftables datapath touches the kernel.

`Nft.run` loads one transaction (`nft -f -`: all of it, or nothing). Listing is what kube-proxy's knftables does
(`nft --json list chains|sets FAMILY`, filtered to our table), plus `nft list table` for `chains --diff` and
the tests. Every call can run in another network namespace (`netns`, via `kernel.netns.command_in`).

`LibNftables` runs the same text through libnftables (`nft_run_cmd_from_buffer`) in this process, without a
fork and exec per sync; it can only reach this process's namespace. bench/nftables_sync.py measures both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
from dataclasses import dataclass

from nodeagent.errors import NodeAgentError
from nodeagent.kernel.netns import command_in


class NftError(NodeAgentError):
    """An nft command failed; the message carries nft's error output."""


def _not_found(stderr: str) -> bool:
    return "No such file or directory" in stderr


@dataclass(frozen=True)
class Nft:
    """The nft binary, optionally inside the network namespace `netns`."""

    netns: str | None = None
    binary: str = "nft"

    def _run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = command_in(self.netns, [self.binary, *args])
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NftError(f"{' '.join(argv)}: {exc}") from exc

    def run(self, transaction: str) -> None:
        """Load `transaction` (nft -f input) atomically; NftError with nft's message when it is refused."""
        result = self._run(["-f", "-"], transaction)
        if result.returncode != 0:
            raise NftError(f"nft -f failed: {result.stderr.strip()[:4000]}")

    def list_names(self, kind: str, family: str, table: str) -> set[str]:
        """The names of the chains or sets (`kind`) of `table`; empty when the table does not exist."""
        result = self._run(["--json", "list", f"{kind}s", family])
        if result.returncode != 0:
            if _not_found(result.stderr):
                return set()
            raise NftError(f"nft list {kind}s {family}: {result.stderr.strip()}")
        found = set()
        for item in json.loads(result.stdout or "{}").get("nftables", []):
            body = item.get(kind)
            if body is not None and body.get("table") == table and body.get("family") == family:
                found.add(body["name"])
        return found

    def chain_exists(self, family: str, table: str, chain: str) -> bool:
        """Whether the chain exists (`nft list chain`: nft fetches that chain only, cheap at any table size)."""
        result = self._run(["list", "chain", family, table, chain])
        if result.returncode != 0 and not _not_found(result.stderr):
            raise NftError(f"nft list chain {family} {table} {chain}: {result.stderr.strip()}")
        return result.returncode == 0

    def list_table(self, family: str, table: str) -> str | None:
        """`nft list table FAMILY TABLE`; None when there is no such table."""
        result = self._run(["list", "table", family, table])
        if result.returncode != 0:
            if _not_found(result.stderr):
                return None
            raise NftError(f"nft list table {family} {table}: {result.stderr.strip()}")
        return result.stdout

    def delete_table(self, family: str, table: str) -> bool:
        """Delete the table; False when there was none."""
        result = self._run(["delete", "table", family, table])
        if result.returncode != 0:
            if _not_found(result.stderr):
                return False
            raise NftError(f"nft delete table {family} {table}: {result.stderr.strip()}")
        return True

    def probe(self, transaction: str) -> str | None:
        """Check `transaction` without loading it (`nft --check`); None when the kernel accepts it, else why not."""
        result = self._run(["--check", "-f", "-"], transaction)
        return None if result.returncode == 0 else (result.stderr.strip() or f"exit {result.returncode}")


class LibNftables:
    """libnftables in this process (this process's network namespace only): `run` as `Nft.run`."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise NftError(f"libnftables unavailable: {exc}") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, transaction: str) -> None:
        """Load `transaction` atomically; NftError with libnftables' message when it is refused."""
        if self._lib.nft_run_cmd_from_buffer(self._ctx, transaction.encode()) != 0:
            error = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            raise NftError(f"libnftables: {error.strip()[:4000]}")
