"""What every asset's step does around its DVC command: the MLflow parent run, the common metadata.

Notable:
- One MLflow parent run per Dagster run; the step that finishes last closes it
  (asked of the event log, since the executor picks the order among siblings), a
  failed or cancelled step closes it FAILED or KILLED.
- The run tag `nanoforge/resume: fresh` (Launchpad or the materialize dialog: "Add
  tags") starts training over: stage_command forces the stage and sets
  NANOFORGE_RESUME=fresh for it.
- Every asset that runs DVC is in the `dvc` pool (limit 1 in .dagster/dagster.yaml):
  DVC holds a repo lock, so they never run at once.
- A run that ends in `dvc push` (the retrain job's dvc_remote) checks its S3 remote at
  every step, before the step's work: a missing bucket or refused credentials stop it
  at its first step, naming the setting, not after hours of training.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from nanoforge.tracking import PARENT_ENV, git_info
from pipelines.defs import checks
from pipelines.defs.resources import MlflowResource
from pipelines.dvc_graph import Stage
from pipelines.project import REMOTE, Project
from pipelines.remote_check import s3_problem

POOL = "dvc"
DEFAULT_GROUP = "pipeline"
DEFAULT_OWNERS = ("team:nanoforge",)
RESUME_TAG = "nanoforge/resume"  # a run tag: `fresh` starts training over
RESUME_ENV = "NANOFORGE_RESUME"  # what stages.train reads (nanoforge/training/plan.py's RESUME_ENV)
RESUME_MODES = ("auto", "fresh")


def resume_mode(context: dg.AssetExecutionContext) -> str:
    """The run's `nanoforge/resume` tag: auto (the default: resume when the params match) or fresh."""
    raw = context.run.tags.get(RESUME_TAG)
    value = (raw or "auto").strip().lower()
    if value not in RESUME_MODES:
        raise dg.Failure(description=f"run tag {RESUME_TAG}={raw!r} is not one of {', '.join(RESUME_MODES)} "
                                     "(fresh: start training over, old checkpoints archived); fix or remove the tag")
    return value


def resumable(stage: Stage) -> bool:
    """A stage that resumes from state it keeps between runs: `meta: {dagster: {resumable: true}}`
    in dvc.yaml, or by default the one that runs stages.train (its checkpoints are no DVC output)."""
    flag = ((stage.meta or {}).get("dagster") or {}).get("resumable")
    return bool(flag) if flag is not None else "stages.train" in stage.cmd.split()


def stage_command(context: dg.AssetExecutionContext, stage: Stage) -> tuple[list[str], dict[str, str]]:
    """The dvc arguments and extra environment for a stage's step.

    With the run tag `nanoforge/resume: fresh`, a resumable stage (train) runs even
    when DVC calls it up to date (`--force`) with NANOFORGE_RESUME=fresh, so it starts
    over; other stages are unaffected.
    """
    if resume_mode(context) == "fresh" and resumable(stage):
        return ["repro", "--force", "--single-item", stage.name], {RESUME_ENV: "fresh"}
    return ["repro", "--single-item", stage.name], {}


def run_assets(context: dg.AssetExecutionContext) -> set[dg.AssetKey]:
    selected = context.run.asset_selection
    if not selected:
        selected = context.job_def.asset_layer.executable_asset_keys
    return set(selected)


def is_last_step(context: dg.AssetExecutionContext, project: Project) -> bool:
    """Every other pipeline asset of this run has finished (so this step closes the MLflow parent run)."""
    selected = {k.to_user_string() for k in run_assets(context)}
    others = {name for name in project.order if name in selected} - {context.asset_key.to_user_string()}
    if not others:
        return True
    done = {e.step_key for e in context.instance.all_logs(context.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)}
    return others <= done


def interrupted(exc: BaseException) -> bool:
    """A cancel from the UI, or a stage that stopped cleanly on a signal (a checkpoint saved)."""
    if isinstance(exc, (KeyboardInterrupt, dg.DagsterExecutionInterruptedError)):
        return True
    status = (getattr(exc, "metadata", None) or {}).get("status")
    return isinstance(exc, dg.Failure) and getattr(status, "value", status) in ("cancelled", "stopped")


@dataclass
class Step:
    """The MLflow parent run around one asset's command; closes it on failure or at the run's end."""

    context: dg.AssetExecutionContext
    project: Project
    mlflow: MlflowResource
    parent: str | None = None

    def env(self) -> dict[str, str]:
        if dg.AssetKey(REMOTE) in run_assets(self.context):
            problem = s3_problem(self.project.root)
            if problem:
                raise dg.Failure(description=f"{problem}; this run ends in `dvc push` to it, so it stops "
                                             "before any stage work")
        self.parent = self.mlflow.open_parent(self.context)
        return {**self.mlflow.env(), **({PARENT_ENV: self.parent} if self.parent else {})}

    def failed(self, exc: BaseException) -> None:
        tags = {"failed_asset": self.context.asset_key.to_user_string()}
        reason = (getattr(exc, "metadata", None) or {}).get("stage_error")
        if reason is not None:
            tags["error"] = str(getattr(reason, "value", reason))[:1000]
        self.mlflow.close_parent(self.parent, "KILLED" if interrupted(exc) else "FAILED", tags)

    def done(self, check_results: list[dg.AssetCheckResult], asset: str, result: dict | None = None) -> None:
        if result is not None:
            status = result["status"]
            self.mlflow.note_step(self.parent, asset, ("ran" if status == "ran" else "up to date" if status in (
                "skipped", "restored") else status) + f" ({float(result.get('seconds') or 0):.1f}s)")
        blocked = checks.blocking_failures(asset, check_results)
        if blocked:
            self.mlflow.close_parent(self.parent, "FAILED", {"failed_check": ",".join(blocked)})
        elif is_last_step(self.context, self.project):
            self.mlflow.close_parent(self.parent, "FINISHED")


def check_input(project: Project, mlflow: MlflowResource) -> checks.CheckInput:
    def champion():
        from nanoforge.registry import champion_scores

        return champion_scores(project.pipeline.registered_model, mlflow.uri)

    return checks.CheckInput(project.root, project.pipeline, champion)


def common_metadata(project: Project, result: dict) -> dict[str, dg.MetadataValue]:
    status = result["status"]
    text = {
        "ran": f"ran: `{result['command']}`",
        "skipped": "up to date: DVC skipped the command; the metadata below describes the outputs on disk",
        "restored": "restored from DVC's run cache (same inputs ran before); not re-run",
    }.get(status, status)
    git = git_info(project.root)
    return {
        "dvc_status": dg.MetadataValue.text(text),
        "up_to_date": dg.MetadataValue.bool(status in ("skipped", "restored")),
        "duration_s": dg.MetadataValue.float(float(result.get("seconds") or 0.0)),
        "git_commit": dg.MetadataValue.text(git["git_commit"] + (" (dirty)" if git["git_dirty"] == "true" else "")),
    }


def mlflow_run_id(metadata: dict[str, dg.MetadataValue]) -> str | None:
    value = metadata.get("mlflow_run_id")
    return getattr(value, "value", value) if value is not None else None
