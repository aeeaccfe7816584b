"""Run one DVC command the way an orchestrator needs it (plain Python, no Dagster import).

    python -m pipelines.dvc_exec [--result FILE] [--grace-s 120] [--lock-timeout-s 3600] -- repro --single-item train
    python -m pipelines.dvc_exec --exec -- python -m stages.download

Notable:
- DVC holds a repo lock and per-output locks. A conflict with another dvc process
  (another run, a user's `dvc repro`) waits and retries with backoff instead of
  failing, up to --lock-timeout-s.
- Cancelling: SIGINT or SIGTERM to this process sends one SIGTERM to the stage's
  command below dvc (looking through the shell dvc starts it with): torchrun, which
  forwards it once to its workers, or the stage's python. train saves a checkpoint
  and exits 143; DVC sees its command fail and exits itself, releasing its locks.
  dvc would ignore SIGINT while its command runs, and a SIGTERM to dvc alone orphans
  the command. Exactly one: a second SIGTERM may kill a worker mid-checkpoint.
  After --grace-s the whole process group is killed.
- dvc runs in a session of its own, so a terminal's Ctrl-C reaches it only through
  here, and this waits until every process of that group is gone before exiting:
  a cancelled step never leaves a half-written checkpoint behind it.
- Output streams through as bytes (progress bars with \\r pass unchanged) and is
  scanned for what DVC did: ran the command, skipped an up-to-date stage, or
  restored outputs from its run cache. --result FILE gets that as JSON, with the
  stage's error as its output states it when the command failed (error_from_output).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

LOCK_ERRORS = (b"Unable to acquire lock", b"is busy, it is being blocked by")
SKIPPED = (b"didn't change, skipping",)
RESTORED = (b"is cached - skipping run",)
RAN = (b"Running stage '",)
WRAPPERS = ("ChildFailedError", "CalledProcessError")  # say that something below failed, not what
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Interrupt))(?::\s*(.*))?$")


def dvc_binary() -> str:
    """`dvc` beside this interpreter (the project venv links it there), else on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    if beside.exists():
        return str(beside)
    found = shutil.which("dvc")
    if found is None:
        raise FileNotFoundError("dvc not found beside the Python interpreter or on PATH (run `make setup`)")
    return found


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for dvc and the stage commands it runs.

    The venv's bin goes first on PATH, so `python` and `torchrun` in dvc.yaml are the
    project's even when Dagster was started without activating the venv; Python
    output is unbuffered so logs stream live.
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra or {})
    return env


class _Cancel:
    def __init__(self):
        self.requested_at: float | None = None

    def __call__(self, signum, frame):
        if self.requested_at is None:
            self.requested_at = time.monotonic()


SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh"}


def _commands_below(pid: int) -> list:
    """The programs dvc runs, looking through shells: torchrun or python, not torchrun's workers."""
    import psutil

    found = []
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    for child in children:
        try:
            name = child.name()
        except psutil.Error:
            continue
        found += _commands_below(child.pid) if name in SHELLS else [child]
    return found


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _terminate_below(proc: subprocess.Popen) -> int:
    """One SIGTERM to each command dvc runs (not dvc, not their children). Returns how many."""
    sent = 0
    for child in _commands_below(proc.pid):
        try:
            child.send_signal(signal.SIGTERM)
            sent += 1
        except Exception:
            pass
    return sent


def run_once(cmd: list[str], env: dict[str, str], cwd: str | None, grace_s: float, cancel: _Cancel,
             out=None) -> tuple[int, bytes, bool]:
    """One dvc invocation. Returns (returncode, scanned output tail, cancelled)."""
    out = out or sys.stdout.buffer
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    os.set_blocking(proc.stdout.fileno(), False)
    seen = bytearray()  # the markers are short; keep the head and a tail of the output
    signalled_at: float | None = None
    killed = False
    while True:
        try:
            chunk = proc.stdout.read(65536)
        except (BlockingIOError, InterruptedError):
            chunk = None
        if chunk:
            out.write(chunk)
            out.flush()
            seen.extend(chunk)
            if len(seen) > 1 << 20:
                del seen[: len(seen) - (1 << 19)]
            continue
        if cancel.requested_at is not None and signalled_at is None:
            signalled_at = time.monotonic()
            n = _terminate_below(proc)
            sys.stderr.write(f"[dvc_exec] cancelled: sent SIGTERM to {n} process(es) under dvc "
                             f"(pid {proc.pid}); waiting up to {grace_s:.0f}s for them to stop\n")
            sys.stderr.flush()
            if n == 0:  # dvc itself is between commands: stop it
                proc.send_signal(signal.SIGTERM)
        if signalled_at is not None and not killed and time.monotonic() - signalled_at > grace_s:
            sys.stderr.write("[dvc_exec] grace period over: killing the process group\n")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            killed = True
        if chunk == b"" and proc.poll() is not None:  # EOF and dvc gone
            break
        time.sleep(0.05)
    proc.wait()
    # dvc may be gone while what it started is still saving: wait for the whole group
    while _group_alive(proc.pid):
        if signalled_at is not None and not killed and time.monotonic() - signalled_at > grace_s:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.1)
    return proc.returncode, bytes(seen), cancel.requested_at is not None


def what_dvc_did(output: bytes) -> str:
    if any(m in output for m in RAN):
        return "ran"
    if any(m in output for m in RESTORED):
        return "restored"
    if any(m in output for m in SKIPPED) or b"Data and pipelines are up to date" in output:
        return "skipped"
    return "unknown"


def error_from_output(output: str) -> str | None:
    """The stage's error as its output states it: its first `error: ...` line (with the indented
    lines that continue it), else the last Python exception, else DVC's last `ERROR:` line.

    For a stage that could not say it over Pipes (a crash, an old stage). Exceptions
    that only wrap another (torchrun's ChildFailedError) are skipped.
    """
    raw = output.replace("\r", "\n").splitlines()
    lines = [line.strip() for line in raw]
    # the first: the cause; a launcher's summary after it (nanoforge.torchrun's "1 worker(s) failed,
    # ... its error is printed above") is a line of its own. Rank 0 prints the whole message, others a line.
    for prefix in ("error: ", "error (rank"):
        for i in range(len(lines)):
            if lines[i].startswith(prefix) and ": " in lines[i]:
                message = [lines[i].split(": ", 1)[1].strip()]
                # a message of several lines goes on indented ("params.yaml: invalid config" + one per key)
                message += [line.strip() for line in itertools.takewhile(
                    lambda line: line[:1] in (" ", "\t") and line.strip(), raw[i + 1:])]
                return "\n".join(m for m in message if m) or None
    for line in reversed(lines):
        m = _EXCEPTION_LINE.match(line)
        if m and m.group(1) not in WRAPPERS:
            return line
    for line in reversed(lines):  # DVC's own complaint (a missing dep, a bad dvc.yaml)
        if line.startswith("ERROR: "):
            return line[len("ERROR: "):].strip() or None
    return None


def run_dvc(args: list[str], cwd: str | None = None, env: dict[str, str] | None = None, grace_s: float = 120.0,
            lock_timeout_s: float = 3600.0, out=None, exec_cmd: bool = False) -> dict:
    """Run `dvc <args>` (or, with exec_cmd, the command `args` itself, e.g. the download stage,
    which calls `dvc add`) with lock retries and clean cancellation; returns what happened."""
    cancel = _Cancel()
    previous = {s: signal.signal(s, cancel) for s in (signal.SIGINT, signal.SIGTERM)}
    cmd = list(args) if exec_cmd else [dvc_binary(), *args]
    start = time.monotonic()
    attempts, lock_wait, delay = 0, 0.0, 1.0
    try:
        while True:
            attempts += 1
            rc, output, cancelled = run_once(cmd, stage_env(env), cwd, grace_s, cancel, out)
            locked = rc != 0 and any(m in output for m in LOCK_ERRORS)
            if cancelled or not locked or time.monotonic() - start + delay > lock_timeout_s:
                break
            sys.stderr.write(f"[dvc_exec] DVC lock held by another process; retrying in {delay:.0f}s\n")
            sys.stderr.flush()
            time.sleep(delay)
            lock_wait += delay
            delay = min(delay * 2, 30.0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if cancelled:
        status = "cancelled"
    elif rc != 0:
        status = "lock_timeout" if locked else "failed"
    else:
        status = "ran" if exec_cmd else what_dvc_did(output)
    tail = output[-3000:].decode("utf-8", "replace")
    # the stage's error line may sit above a long torchrun traceback: look at all of the output kept
    stage_error = error_from_output(output.decode("utf-8", "replace")) if rc != 0 else None
    return {"status": status, "returncode": rc, "stage_error": stage_error, "attempts": attempts, "lock_wait_s": round(lock_wait, 3),
            "seconds": round(time.monotonic() - start, 3), "command": " ".join(args if exec_cmd else ["dvc", *args]),
            "output_tail": tail}


def report_skip(result: dict) -> None:
    """Under Dagster Pipes, say what DVC did when the stage itself never ran (so never reported)."""
    if "DAGSTER_PIPES_CONTEXT" not in os.environ or result["status"] not in ("skipped", "restored"):
        return
    try:
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            pipes.report_asset_materialization(metadata={"dvc_status": result["status"]})
    except Exception as exc:  # the asset attaches its metadata anyway
        sys.stderr.write(f"[dvc_exec] could not report to Dagster Pipes: {exc}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.dvc_exec", description=__doc__.split("\n")[0])
    parser.add_argument("--result", help="write what happened here as JSON")
    parser.add_argument("--grace-s", type=float, default=120.0, help="after a cancel, wait this long before SIGKILL")
    parser.add_argument("--lock-timeout-s", type=float, default=3600.0, help="give up waiting for DVC's lock after this")
    parser.add_argument("--exec", dest="exec_cmd", action="store_true",
                        help="run the command after -- as is (not as dvc arguments)")
    parser.add_argument("dvc_args", nargs=argparse.REMAINDER, help="-- then the dvc arguments")
    args = parser.parse_args(argv)
    dvc_args = args.dvc_args[1:] if args.dvc_args[:1] == ["--"] else args.dvc_args
    if not dvc_args:
        parser.error("give the dvc command after --, e.g. -- repro --single-item train")
    result = run_dvc(dvc_args, grace_s=args.grace_s, lock_timeout_s=args.lock_timeout_s, exec_cmd=args.exec_cmd)
    report_skip(result)
    if args.result:
        tmp = Path(args.result).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, args.result)
    rc = result["returncode"]
    rc = 128 - rc if rc < 0 else rc  # killed by a signal: the shell's convention
    if result["status"] == "cancelled":
        return rc or 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
