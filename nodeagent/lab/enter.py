"""Exec a command inside a lab pod (or node): its cgroup first, then its network namespace.

Run as `python -m nodeagent.lab.enter [--supervise] --netns NAME --cgroup PATH -- CMD...`. A separate
exec shim rather than a preexec_fn, because preexec_fn is unsafe once threads exist (pyroute2 starts
some), and because the same shim serves `lab up` (daemons) and `lab exec` (interactive commands).

With --supervise (pod daemons) the shim stays, like a container runtime's shim, as the parent of the
command: it forks, the child enters the cgroup and namespace and execs, and the shim waits for it
outside the lab's cgroups, forwarding SIGTERM/SIGINT/SIGHUP. Without that, a pod process whose
`lab up` has exited is an orphan reaped by init whenever init gets to it, and until then its zombie
keeps the pod cgroup busy so `lab down` cannot remove it (seen on this VM: more than 10 s).
Python 3.11 has no os.setns: setns(2) is `nodeagent.kernel.netns.setns` (libc), the tunnel's own way in.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from nodeagent.kernel.netns import enter

_FORWARDED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def main(argv: list[str] | None = None) -> None:
    """Join the cgroup and the namespace, then exec the command (never returns on success)."""
    parser = argparse.ArgumentParser(prog="nodeagent.lab.enter")
    parser.add_argument("--supervise", action="store_true", help="stay as the command's parent and reap it")
    parser.add_argument("--netns", required=True)
    parser.add_argument("--cgroup", required=True, help="absolute path of a cgroup v2 directory")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    if args.supervise:
        # Block termination signals across the fork: one that arrives meanwhile stays pending until the
        # shim can forward it, and the child is inside its cgroup before it can be signalled.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        child = os.fork()
        if child:
            sys.exit(_supervise(child))
    _enter_and_exec(args.netns, args.cgroup, command)


def _enter_and_exec(netns: str, cgroup: str, command: list[str]) -> None:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    enter(netns)  # the process is single-threaded here: the whole process is in the namespace
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)  # the mask would survive exec
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"cannot run {command[0]!r} in {netns}: {exc.strerror}\n")
        os._exit(127)


def _supervise(child: int) -> int:
    """Forward termination signals to `child`, reap it, and return its exit code (128+N for signal N)."""
    for sig in _FORWARDED:
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code

if __name__ == "__main__":
    main()
