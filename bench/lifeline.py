"""Runs a command that dies with the process that started it: the launcher of `server_processes.ServerProcess`.

    python -I lifeline.py FD COMMAND [ARG...]

`ServerProcess` starts this as the leader of a new session, so of a process group of its own,
with FD the read end of a pipe whose write end only the starting process holds. This forks a
watchdog, then becomes COMMAND (exec: same pid, still the group's leader), so that COMMAND and
whatever it starts (vLLM's engine and worker processes) are one group. When the starting process
dies, however it dies (SIGKILL included), the kernel closes the pipe's write end and the watchdog
reads end of file: it sends the group SIGTERM, gives COMMAND a few seconds, then SIGKILLs the
group, itself included.

The watchdog is a member of the group until then, so the group's id (COMMAND's pid) is never
free for another process to take while `ServerProcess` may still signal it; it ignores the SIGTERM
of an ordinary stop, which ends with SIGKILL to the group.

Standard library only, and run by its path rather than imported: it runs before every server
starts, so it must start fast (no comi_hf, torch or transformers).
"""

from __future__ import annotations

import os
import signal
import sys
import time

# How long COMMAND has to exit after SIGTERM once its starter is gone (vLLM frees its shared memory).
GRACE_SECONDS = 5.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: only its reaping by its new parent (init, in its own time) is missing.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc: wait for the reaping
        return True


def watch(lifeline: int, leader: int) -> None:
    # Off the command's streams: a caller reading its output to the end would otherwise wait for
    # this process too.
    devnull = os.open(os.devnull, os.O_RDWR)
    for stream in (0, 1, 2):
        os.dup2(devnull, stream)
    os.close(devnull)
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    while os.read(lifeline, 1):  # nothing is ever written: this returns at end of file
        pass
    os.killpg(leader, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline and _alive(leader):
        time.sleep(0.1)
    os.killpg(leader, signal.SIGKILL)


def main() -> None:
    lifeline, command = int(sys.argv[1]), sys.argv[2:]
    leader = os.getpid()
    first = os.fork()
    if first == 0:
        # Forked twice, so that the watchdog is no child of the command, which would never reap it.
        if os.fork() == 0:
            try:
                watch(lifeline, leader)
            finally:
                os._exit(0)
        os._exit(0)
    os.waitpid(first, 0)
    os.close(lifeline)
    # Python ignores SIGPIPE and SIGXFSZ and an exec keeps ignored signals ignored: the command
    # gets the defaults, as subprocess's restore_signals gives them.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
