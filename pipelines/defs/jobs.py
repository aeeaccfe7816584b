"""Jobs: the whole pipeline, the nightly retrain (the pipeline, then `dvc push`), eval-and-report only.

Notable:
- Selections are computed from the assets built from dvc.yaml, so a new stage joins
  the pipeline job with no change here. The partitioned `fineweb_shards` stays out
  of these jobs (a job runs one partitioning); `download` fetches whatever is missing.
- The in-process executor runs a job's steps one after another in one process: DVC
  serializes them anyway, and it saves a Python start-up per step.
- `dvc_remote` (the push) is in `retrain` only: the `pipeline` job (make demo, the
  inputs sensor) leaves the push for after the run is committed.
"""

from __future__ import annotations

import dagster as dg

from pipelines.project import DOWNLOAD, REMOTE, Project


def pipeline_selection(project: Project) -> dg.AssetSelection:
    return dg.AssetSelection.assets(DOWNLOAD, *project.stage_assets)


def build_jobs(project: Project) -> dict[str, dg.UnresolvedAssetJobDefinition]:
    jobs = {
        "pipeline": dg.define_asset_job(
            "pipeline", selection=pipeline_selection(project),
            description="The whole pipeline: download what the params ask for, then every dvc.yaml stage "
                        "(DVC skips what is up to date).",
            tags={"nanoforge/job": "pipeline"},
        ),
        "retrain": dg.define_asset_job(
            "retrain",
            selection=pipeline_selection(project) | (
                dg.AssetSelection.assets(dg.AssetKey(REMOTE)) if project.pipeline.push_to_remote else dg.AssetSelection.assets()),
            description="Nightly: download any new shards, re-run what changed, register (and maybe promote) the "
                        "model" + (", then `dvc push` to the remote (pipeline.push_to_remote)." if project.pipeline.push_to_remote
                                   else "; no push (pipeline.push_to_remote is false)."),
            tags={"nanoforge/job": "retrain"},
        ),
    }
    if "evaluate" in [s.name for s in project.stages]:
        jobs["eval_and_report"] = dg.define_asset_job(
            "eval_and_report",
            selection=dg.AssetSelection.assets(dg.AssetKey("evaluate")).downstream() - dg.AssetSelection.assets(dg.AssetKey(REMOTE)),
            description="Evaluate the current model and everything downstream of it (report, register); no training.",
            tags={"nanoforge/job": "eval_and_report"},
        )
    return jobs


def defs(project: Project) -> dg.Definitions:
    return dg.Definitions(jobs=list(build_jobs(project).values()), executor=dg.in_process_executor)
