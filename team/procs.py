"""Long-running processes of the team stack: started detached, found again by pid file, stopped by group.

Notable:
- Each service runs in its own session (process group), so `down` stops it and every
  child it made (MLflow's workers, Dagster's code servers) with one signal.
- Output goes to <state>/logs/<name>.log; a service that dies while starting is
  reported with the last lines of its log, not a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable


def pid_file(state: Path, name: str) -> Path:
    return state / "run" / f"{name}.pid"


def log_file(state: Path, name: str) -> Path:
    return state / "logs" / f"{name}.log"


def log_tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by us) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def running_pid(state: Path, name: str) -> int | None:
    path = pid_file(state, name)
    if not path.exists():
        return None
    pid = int(path.read_text().strip() or 0)
    return pid if pid > 0 and alive(pid) else None


def start(state: Path, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    """Start `cmd` detached, its output in its log; returns the pid (also in its pid file)."""
    log = log_file(state, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    pid_file(state, name).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    tmp = pid_file(state, name).with_suffix(".tmp")
    tmp.write_text(str(proc.pid))
    tmp.replace(pid_file(state, name))
    return proc.pid


def wait_ready(state: Path, name: str, ready: Callable[[], bool], timeout: float) -> None:
    """Poll `ready` until it holds; fail naming the service and its log when it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        pid = running_pid(state, name)
        if pid is None:
            raise RuntimeError(f"{name} exited while starting; last lines of {log_file(state, name)}:\n"
                               f"{log_tail(log_file(state, name))}")
        time.sleep(0.5)
    raise RuntimeError(f"{name} not ready after {timeout:.0f}s; last lines of {log_file(state, name)}:\n"
                       f"{log_tail(log_file(state, name))}")


def stop(state: Path, name: str, timeout: float = 30.0) -> bool:
    """SIGTERM the service's process group, SIGKILL after `timeout`; True if it was running."""
    pid = running_pid(state, name)
    pid_file(state, name).unlink(missing_ok=True)
    if pid is None:
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.2)
        if not alive(pid):
            break
    try:  # children that outlived the leader (a code server) go with the group
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True
