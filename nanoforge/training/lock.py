"""One train run at a time per output folder: an OS lock (flock) held by rank 0 for the whole run.

The lock file (`.lock` inside the checkpoint folder) records who holds it: pid, host,
command and start time, so a second run refuses before any work and says whom to wait
for. The kernel drops the lock when the holder exits, however it exits (SIGKILL too):
a stale file never blocks anyone.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class OutputsLocked(RuntimeError):
    """Another train run holds the lock on these output folders."""


class RunLock:
    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise OutputsLocked(
                f"{self.path.parent} is in use by another train run: pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}, command: {holder.get('command', '?')}. "
                "Wait for it to finish (or stop it: SIGTERM checkpoints it), then run again; "
                "a one-off run with other math params (--set depth=...) gets its own folder under artifacts/oneoff/"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _command_line() -> str:
    """The command as typed (`python -m stages.train --set ...`): under `-m`, sys.argv[0] is the file's path."""
    try:
        parts = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        return " ".join(p.decode(errors="replace") for p in parts)
    except OSError:  # not Linux
        return " ".join([sys.executable, *sys.argv])


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}
