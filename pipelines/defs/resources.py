"""Resources: DVC through Dagster Pipes, and the MLflow parent run of a Dagster run.

Notable:
- Every command runs as `python -m pipelines.dvc_exec ... -- <dvc args>` inside a
  Pipes session (session.py): logs stream live to the step's stdout/stderr, the
  stage reports metadata, progress and its error over Pipes, DVC lock conflicts
  wait and retry, and a cancel from the UI (SIGINT) becomes SIGTERM for torchrun
  and its workers. A failure's message is the stage's own error.
- MLflow links point at the tracking server when MLFLOW_TRACKING_URI is http(s),
  else at `make mlflow` (http://127.0.0.1:$MLFLOW_PORT, default 5000).
- One MLflow parent run per Dagster run, found or created by the Dagster run id,
  so every step (in any process) joins the same one; stages join it through
  NANOFORGE_PARENT_RUN_ID. The last pipeline step of the run closes it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from nanoforge import pipes, tracking
from pipelines.defs.session import Outcome, run_command
from pipelines.dvc_exec import error_from_output

# Pipes' message reader calls a "preview" API of its own on every run; not ours to fix
warnings.filterwarnings("ignore", message=".*expected_writer_count", category=dg.PreviewWarning)


class DvcResource(dg.ConfigurableResource):
    """Runs DVC for the assets, in the project root."""

    root: str
    grace_s: float = 120.0  # after a cancel: time for train to checkpoint before SIGKILL
    lock_timeout_s: float = 3600.0  # how long to wait for another DVC process's lock

    def run(self, context: dg.AssetExecutionContext, args: list[str], env: dict[str, str] | None = None,
            exec_cmd: bool = False) -> tuple[dict, dict[str, dg.MetadataValue]]:
        """Run `dvc <args>` (or the command `args` with exec_cmd) through Pipes.

        Returns what happened (dvc_exec's result: status ran|skipped|restored, seconds,
        attempts, output tail) and the metadata the stage reported over Pipes.
        Raises dg.Failure when it fails: the stage's own error message first (what it
        sent over Pipes, else its `error: ...` line), then DVC's last words; the
        message is also the Failure's `stage_error` metadata (the alert uses it).
        """
        try:
            pipes.progress_interval()  # checked here, before any work, not at the first training step
        except ValueError as exc:
            raise dg.Failure(description=str(exc)) from None
        with tempfile.TemporaryDirectory(prefix="nanoforge-dvc-") as tmp:
            result_file = Path(tmp) / "result.json"
            command = [
                sys.executable, "-m", "pipelines.dvc_exec", "--result", str(result_file),
                "--grace-s", str(self.grace_s), "--lock-timeout-s", str(self.lock_timeout_s),
                *(["--exec"] if exec_cmd else []), "--", *args,
            ]
            outcome = run_command(context, command, self.root, {
                "PYTHONPATH": self.root + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})},
                termination_timeout_s=self.grace_s + 30)
            result = json.loads(result_file.read_text()) if result_file.exists() else {
                "status": "failed", "returncode": outcome.returncode, "command": " ".join(args), "output_tail": "",
                "seconds": None}
        if outcome.returncode != 0 or result["status"] not in ("ran", "skipped", "restored", "unknown"):
            raise failure(result, outcome)
        reported = dict(outcome.metadata)
        reported.pop("dvc_status", None)  # dvc_exec's own note; the asset says it better
        return result, reported


# DVC's words when a stage command exits 143 (128 + SIGTERM: the train stage's "stopped, checkpoint saved")
STOPPED = re.compile(r"exited with 143\b")


def failure(result: dict, outcome: Outcome) -> dg.Failure:
    """The step's failure: the stage's message as its first line, then the command and DVC's last words."""
    tail = "\n".join(result.get("output_tail", "").strip().splitlines()[-25:])
    status = result["status"]
    if status == "failed" and STOPPED.search(result.get("output_tail", "")):
        status = "stopped"  # SIGTERM from outside Dagster (preemption, scancel): a checkpoint was saved
    what = {"lock_timeout": "gave up waiting for DVC's lock", "cancelled": "was cancelled",
            "stopped": "was stopped by a signal (exit 143); its checkpoint is saved: run it again to resume"}.get(
        status, f"failed (exit code {result.get('returncode')})")
    reason = outcome.error or result.get("stage_error") or error_from_output(result.get("output_tail", ""))
    if status in ("lock_timeout", "cancelled", "stopped"):
        reason = None  # the command's state says it; a stage line would mislead
    head = f"{reason}\n\n" if reason else ""
    metadata = {"command": result["command"], "status": status}
    if reason:
        metadata["stage_error"] = reason
    return dg.Failure(description=f"{head}`{result['command']}` {what}.\n\nLast output:\n```\n{tail}\n```",
                      metadata=metadata)


def mlflow_ui_url(env: dict[str, str] | None = None) -> str:
    """Where people open MLflow: the tracking server itself, or `make mlflow` (127.0.0.1:$MLFLOW_PORT, default 5000)."""
    env = os.environ if env is None else env
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    raw = env.get("MLFLOW_PORT", "").strip() or "5000"
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"MLFLOW_PORT={raw!r} is not a port number (1-65535): set it to the port `make mlflow` "
                         "serves on (Dagster's MLflow links use it), or unset it for 5000")
    return f"http://127.0.0.1:{int(raw)}"


class MlflowResource(dg.ConfigurableResource):
    """The MLflow store stages log to, and the parent run of each Dagster run."""

    root: str
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db
    ui_url: str | None = None  # where links point; default: mlflow_ui_url() when the link is made

    _parents: dict = PrivateAttr(default_factory=dict)

    @property
    def uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(self.root).resolve() / 'mlflow.db'}"

    def env(self) -> dict[str, str]:
        # every process of the run (this one, dvc, the stages) must agree on the store
        os.environ["MLFLOW_TRACKING_URI"] = self.uri
        return {"MLFLOW_TRACKING_URI": self.uri}

    def open_parent(self, context: dg.AssetExecutionContext) -> str | None:
        self.env()
        run_id = context.run_id
        if run_id not in self._parents:
            job = context.job_name
            self._parents[run_id] = tracking.open_pipeline_run(
                group=f"dagster:{run_id}",
                run_name=f"{job if not job.startswith('__') else 'materialize'} {run_id[:8]}",
                tags={"dagster_run_id": run_id, "dagster_job": job, "trigger": context.run.tags.get(
                    "dagster/schedule_name") or context.run.tags.get("dagster/sensor_name") or "manual"},
                root=self.root,
            )
        return self._parents[run_id]

    def note_step(self, parent: str | None, asset: str, what: str) -> None:
        """One tag per step on the parent run: what DVC did with that stage (ran 12.3s / up to date)."""
        if not parent:
            return
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=self.uri).set_tag(parent, f"step.{asset}", what)
        except Exception:
            pass

    def close_parent(self, parent: str | None, status: str, tags: dict[str, Any] | None = None) -> None:
        tracking.end_pipeline_run(parent, status, tags, root=self.root)

    def run_link(self, run_id: str | None) -> dict[str, dg.MetadataValue]:
        """The MLflow run id and a URL to it (a server's own, or `mlflow ui`'s for a SQLite store)."""
        if not run_id:
            return {}
        out = {"mlflow_run_id": dg.MetadataValue.text(run_id)}
        try:
            from mlflow.tracking import MlflowClient

            exp = MlflowClient(tracking_uri=self.uri).get_run(run_id).info.experiment_id
        except Exception:
            return out
        base = self.ui_url or mlflow_ui_url({**os.environ, "MLFLOW_TRACKING_URI": self.uri})
        out["mlflow_run_url"] = dg.MetadataValue.url(f"{base.rstrip('/')}/#/experiments/{exp}/runs/{run_id}")
        return out


def defs(project) -> dg.Definitions:
    mlflow_ui_url()  # a bad MLFLOW_PORT is an error at load, naming it, not a broken link later
    return dg.Definitions(resources={
        "dvc": DvcResource(root=str(project.root)),
        "mlflow": MlflowResource(root=str(project.root)),
    })
