"""Run a command as a child subreaper, so that what it leaves behind stays in the test's tree.

::

    python tests/subreaper.py COMMAND [ARG...]

    pytest --> subreaper --> slurmd --> (fork, fork, exit) --> slurmstepd --> job
                   ^                                              |
                   +------------- orphans come here --------------+

Daemons that double-fork (slurmd starts every job step that way) or whose
children outlive a login (sshd's sessions leave ``nohup``'ed workers behind) hand
those processes to PID 1, out of reach of the tests' leftover check and of
``kill_tree``. Under this wrapper (Linux ``PR_SET_CHILD_SUBREAPER``) they become
its children instead, and it reaps them as they exit.

* SIGTERM and SIGINT are passed on to the command.
* Once the command has exited, what it left behind gets SIGTERM, then SIGKILL
  after ``GRACE`` seconds; the wrapper exits with the command's status.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36
#: Seconds that orphans get between SIGTERM and SIGKILL once the command has exited.
GRACE = 5.0


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap_all(block: bool) -> None:
    """Collect exited children; with ``block``, until none is left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_orphans() -> None:
    """SIGTERM every remaining descendant, SIGKILL those still there after GRACE."""
    deadline = time.monotonic() + GRACE
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in psutil.Process().children(recursive=True):
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        if sig == signal.SIGKILL:
            break
        while psutil.Process().children() and time.monotonic() < deadline:
            reap_all(block=False)
            time.sleep(0.05)
    reap_all(block=True)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    become_subreaper()
    command = os.posix_spawnp(argv[0], argv, os.environ)

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(command, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        pid, status = os.wait()  # orphans are reaped here too
        if pid == command:
            break
    end_orphans()
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
