"""Sensors: start the pipeline when its inputs change; raise an alert when a run fails.

Notable:
- `pipeline_inputs_changed` watches params.yaml and data.dvc; its cursor is their
  hashes. The first look only remembers them. A params change runs the whole
  pipeline (download params may have changed); a data.dvc change runs the stages
  after download, unless the pipeline's own download wrote it (its hash equals the
  `download` asset's latest data version).
- `alert_on_failure` writes the alert to the run's log, appends it to
  $DAGSTER_HOME/alerts.jsonl, POSTs it as JSON to pipeline.alert_webhook_url when set
  (Slack-style: a `text` field), and marks the run's MLflow parent run FAILED.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import dagster as dg

from pipelines.project import DOWNLOAD, Project, data_dvc_md5

WATCHED = ("params.yaml", "data.dvc")


def file_digests(root: Path) -> dict[str, str | None]:
    out = {}
    for name in WATCHED:
        path = root / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None
    return out


def latest_data_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    return (event.asset_materialization.tags or {}).get("dagster/data_version")


def build_inputs_sensor(project: Project) -> dg.SensorDefinition:
    @dg.sensor(
        name="pipeline_inputs_changed",
        job_name="pipeline",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Runs the pipeline when params.yaml or data.dvc changes (cursor: their hashes).",
    )
    def pipeline_inputs_changed(context: dg.SensorEvaluationContext):
        now = file_digests(project.root)
        before = json.loads(context.cursor) if context.cursor else None
        context.update_cursor(json.dumps(now))
        if before is None:
            return dg.SkipReason("first look: remembering the hashes of params.yaml and data.dvc")
        changed = [name for name in WATCHED if now[name] != before.get(name)]
        if not changed:
            return dg.SkipReason("params.yaml and data.dvc unchanged")
        if "params.yaml" in changed:
            return dg.RunRequest(tags={"nanoforge/trigger": "params.yaml changed",
                                       "nanoforge/params_sha256": now["params.yaml"] or ""})
        md5 = data_dvc_md5(project.root)
        if md5 is not None and md5 == latest_data_version(context.instance, dg.AssetKey(DOWNLOAD)):
            return dg.SkipReason("data.dvc changed by the pipeline's own download asset")
        return dg.RunRequest(asset_selection=[dg.AssetKey(n) for n in project.stage_assets],
                             tags={"nanoforge/trigger": "data.dvc changed", "nanoforge/data_dvc_md5": md5 or ""})

    return pipeline_inputs_changed


def post_webhook(url: str, payload: dict, timeout: float = 10.0) -> str:
    import requests

    try:
        response = requests.post(url, json=payload, timeout=timeout)
        return f"HTTP {response.status_code}"
    except requests.RequestException as exc:
        return f"failed: {type(exc).__name__}: {exc}"


def build_failure_sensor(project: Project) -> dg.SensorDefinition:
    @dg.run_failure_sensor(
        name="alert_on_failure",
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="On a failed run: an alert in the log, in $DAGSTER_HOME/alerts.jsonl and, when "
                    "pipeline.alert_webhook_url is set, POSTed there; the run's MLflow parent run is marked FAILED.",
    )
    def alert_on_failure(context: dg.RunFailureSensorContext):
        run = context.dagster_run
        failed_steps = sorted({e.step_key for e in context.get_step_failure_events() if e.step_key})
        message = (context.failure_event.message or "").strip()
        alert = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_id": run.run_id,
            "job": run.job_name,
            "failed_steps": failed_steps,
            "message": message,
            "trigger": run.tags.get("nanoforge/trigger") or run.tags.get("dagster/schedule_name") or "manual",
        }
        alert["text"] = (f"nanoforge: run {run.run_id[:8]} of `{run.job_name}` failed"
                         + (f" at {', '.join(failed_steps)}" if failed_steps else "") + f": {message[:300]}")
        context.log.error(alert["text"])
        log_file = Path(context.instance.root_directory) / "alerts.jsonl"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        url = project.pipeline.alert_webhook_url
        if url:
            alert["webhook"] = post_webhook(url, alert)
            context.log.info(f"alert POSTed to the webhook: {alert['webhook']}")
        with open(log_file, "a") as fh:
            fh.write(json.dumps(alert) + "\n")
        _fail_parent(run.run_id, alert["text"])

    return alert_on_failure


def _fail_parent(dagster_run_id: str, text: str) -> None:
    """The MLflow parent of a run that died without closing it (a crash, a killed worker)."""
    try:
        from mlflow.tracking import MlflowClient

        from nanoforge import tracking

        client = MlflowClient(tracking_uri=tracking.tracking_uri())
        exp = client.get_experiment_by_name(tracking.EXPERIMENT)
        if exp is None:
            return
        for parent in client.search_runs([exp.experiment_id], f"tags.`{tracking.GROUP_TAG}` = 'dagster:{dagster_run_id}'"):
            if parent.info.status == "RUNNING":
                tracking.end_pipeline_run(parent.info.run_id, "FAILED", {"error": text[:1000]})
    except Exception:
        pass


def defs(project: Project) -> dg.Definitions:
    return dg.Definitions(sensors=[build_inputs_sensor(project), build_failure_sensor(project)])
