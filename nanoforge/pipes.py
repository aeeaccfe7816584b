"""Report a stage's results, progress and errors to an orchestrator, when one is listening.

Stages never import Dagster. Under a Dagster Pipes subprocess (the asset runs
`dvc repro -s <stage>`, DVC runs the stage, the environment passes through) the
stage talks to Dagster through the small `dagster-pipes` package. Without Pipes,
and on ranks other than 0, every call here does nothing (error() still prints), so
every stage stays runnable by hand, by DVC or by torchrun.

Notable:
- One Pipes connection per process, opened on first use and closed at exit: Pipes
  refuses messages after `closed`, and a training run sends many (progress, then
  the final report).
- report(): the asset's materialization metadata (once per process).
- progress(): the per-step line and its numbers, as they happen, at most one every
  NANOFORGE_PIPES_PROGRESS_S seconds (default 10; the first step of a process and
  the last step always go). Dagster shows the line in the run's log and the numbers
  as observations of the asset (pipelines/defs/resources.py).
- error(): the stage's own one-line error (also printed to stderr as `error: ...`),
  which Dagster makes the step failure's message instead of torchrun's traceback.
- Inside a Slurm job (launch.launcher: slurm) the job id and nodes go to Dagster as soon
  as the connection opens (a log line and an observation) and in report()'s metadata,
  so the run's page says which job to look at (squeue, sacct, its .out log).
- Messages are custom Pipes messages `{"nanoforge": kind, ...}` (KINDS), read by
  pipelines/defs/resources.py; a Pipes failure is a warning, never the stage's failure.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import time
from typing import Any

from nanoforge.common import get_logger, is_rank0

PIPES_ENV = "DAGSTER_PIPES_CONTEXT"  # dagster_pipes 1.13 has no is_dagster_pipes_process()
PROGRESS_ENV = "NANOFORGE_PIPES_PROGRESS_S"
DEFAULT_PROGRESS_S = 10.0
KINDS = ("progress", "error")

_state: dict[str, Any] = {"context": None, "failed": False, "last_progress": None}


def under_pipes() -> bool:
    return PIPES_ENV in os.environ and is_rank0()


def _context():
    """This process's Pipes connection (opened once), or None outside Pipes or after a failure."""
    if not under_pipes() or _state["failed"]:
        return None
    if _state["context"] is None:
        try:
            from dagster_pipes import open_dagster_pipes

            _state["context"] = open_dagster_pipes()
            atexit.register(close)
            job = slurm_job()
            if job:
                _state["context"].report_custom_message(
                    {"nanoforge": "progress", "numbers": job,
                     "line": f"slurm: running as job {job['slurm_job_id']} on {job['slurm_nodes']}"})
        except Exception as exc:  # the orchestrator is a viewer; the stage's outputs are what matter
            _warn(exc)
            return None
    return _state["context"]


def close() -> None:
    """Close the connection (at exit; idempotent). The next message would open a new one."""
    context, _state["context"] = _state["context"], None
    if context is not None:
        try:
            context.close()
        except Exception as exc:
            _warn(exc)


def _warn(exc: Exception) -> None:
    _state["failed"] = True  # one warning, not one per step
    get_logger("pipes").warning("could not report to Dagster Pipes: %s: %s", type(exc).__name__, exc)


def _send(method: str, *args, **kwargs) -> bool:
    context = _context()
    if context is None:
        return False
    try:
        getattr(context, method)(*args, **kwargs)
        return True
    except Exception as exc:
        _warn(exc)
        return False


def _plain(value: Any) -> Any:
    # Pipes metadata must be JSON: numpy/torch scalars and paths become plain values
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict) and set(value) >= {"raw_value", "type"}:
        return value  # already a typed Pipes metadata value, e.g. {"raw_value": md, "type": "md"}
    return str(value)


def slurm_job() -> dict[str, str]:
    """The Slurm job this process runs in (srun/sbatch set these), or {} outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    return {"slurm_job_id": job, "slurm_nodes": os.environ.get("SLURM_JOB_NODELIST", "?")}


def report(metadata: dict[str, Any]) -> bool:
    """Send `metadata` as the asset's materialization metadata (plus the Slurm job, if any). True if sent."""
    metadata = {**slurm_job(), **metadata}
    return _send("report_asset_materialization", metadata={k: _plain(v) for k, v in metadata.items()})


def progress_interval() -> float:
    """NANOFORGE_PIPES_PROGRESS_S; raises ValueError naming it when it is not a number >= 0.

    The Dagster side checks it before it starts a stage; here a bad value is a warning
    and the default, since training has started by the time the first step reports.
    """
    raw = os.environ.get(PROGRESS_ENV, "").strip() or str(DEFAULT_PROGRESS_S)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{PROGRESS_ENV}={raw!r} is not a number of seconds >= 0 (how often training "
                         f"reports its progress to Dagster); unset it for the default {DEFAULT_PROGRESS_S}")
    return value


def progress(line: str, numbers: dict[str, Any], last: bool = False) -> bool:
    """The per-step log line and its numbers (step, loss, tok/s, eta_s...), throttled. True if sent."""
    if not under_pipes():
        return False
    try:
        interval = progress_interval()
    except ValueError as exc:
        if _state["last_progress"] is None:
            get_logger("pipes").warning("%s", exc)
        interval = DEFAULT_PROGRESS_S
    now, before = time.monotonic(), _state["last_progress"]
    if not last and before is not None and now - before < interval:
        return False
    _state["last_progress"] = now
    return _send("report_custom_message", {"nanoforge": "progress", "line": line,
                                           "numbers": {k: _plain(v) for k, v in numbers.items()}})


def error(message: Any) -> bool:
    """Print the stage's error (`error: ...` on stderr) and send it as the failure's message. True if sent."""
    text = str(message)
    print(f"error: {text}", file=sys.stderr, flush=True)
    return _send("report_custom_message", {"nanoforge": "error", "message": text})


def markdown(text: str) -> dict[str, str]:
    return {"raw_value": text, "type": "md"}
