"""Exec a command inside a lab pod (or node): its cgroup first, then its network namespace.

Run as `python -m nodeagent.lab.enter --netns NAME --cgroup PATH -- CMD...`. A separate exec shim
rather than a preexec_fn, because preexec_fn is unsafe once threads exist (pyroute2 starts some),
and because the same shim serves `lab up` (daemons) and `lab exec` (interactive commands).
Python 3.11 has no os.setns, so setns(2) is called through libc.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

CLONE_NEWNET = 0x40000000


def setns(path: str) -> None:
    """Move the calling thread into the network namespace bound at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    """Join the cgroup and the namespace, then exec the command (never returns on success)."""
    parser = argparse.ArgumentParser(prog="nodeagent.lab.enter")
    parser.add_argument("--netns", required=True)
    parser.add_argument("--cgroup", required=True, help="absolute path of a cgroup v2 directory")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    with open(os.path.join(args.cgroup, "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    setns(os.path.join("/run/netns", args.netns))
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"cannot run {command[0]!r} in {args.netns}: {exc.strerror}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main()
