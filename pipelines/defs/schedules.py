"""The nightly retrain: cron and timezone from params.yaml's `pipeline:` section.

Notable:
- Skips (with a reason in the UI) while a pipeline run is still queued or running,
  instead of stacking runs behind it; a `make demo` run whose process died does not
  count (it would otherwise look "running" forever).
"""

from __future__ import annotations

import socket

import dagster as dg

from pipelines.project import Project

ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
          dg.DagsterRunStatus.CANCELING]
PIPELINE_JOBS = ("pipeline", "retrain", "eval_and_report")


def _alive(run: dg.DagsterRun) -> bool:
    """A `make demo` run (tagged with its pid) is alive while its process is; others are trusted."""
    import psutil

    pid, host = run.tags.get("nanoforge/pid"), run.tags.get("nanoforge/host")
    return not (pid and host == socket.gethostname() and not psutil.pid_exists(int(pid)))


def active_runs(instance: dg.DagsterInstance, jobs: tuple[str, ...] | None = PIPELINE_JOBS) -> list[str]:
    """Ids of the runs queued or in progress (of `jobs`; None: any job, UI materializations too)."""
    runs = instance.get_run_records(dg.RunsFilter(statuses=ACTIVE), limit=20)
    return [r.dagster_run.run_id for r in runs
            if (jobs is None or r.dagster_run.job_name in jobs) and _alive(r.dagster_run)]


def active_pipeline_runs(instance: dg.DagsterInstance) -> list[str]:
    return active_runs(instance, PIPELINE_JOBS)


def build_schedule(project: Project) -> dg.ScheduleDefinition:
    cfg = project.pipeline

    @dg.schedule(
        name="nightly_retrain",
        job_name="retrain",
        cron_schedule=cfg.nightly_cron,
        execution_timezone=cfg.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Retrain at `{cfg.nightly_cron}` ({cfg.timezone}): new shards, changed stages, register, "
                    + ("push." if cfg.push_to_remote else "no push."),
    )
    def nightly_retrain(context: dg.ScheduleEvaluationContext):
        busy = active_pipeline_runs(context.instance)
        if busy:
            return dg.SkipReason(f"pipeline run {busy[0]} is still in progress")
        when = context.scheduled_execution_time
        return dg.RunRequest(
            run_key=f"nightly:{when.isoformat() if when else 'now'}",
            tags={"nanoforge/trigger": "nightly_retrain"},
        )

    return nightly_retrain


def defs(project: Project) -> dg.Definitions:
    return dg.Definitions(schedules=[build_schedule(project)])
