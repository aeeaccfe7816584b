"""Sensors: start the pipeline when its inputs change; raise an alert when a run fails.

Notable:
- `pipeline_inputs_changed` watches the params each asset reads (the values of its
  dvc.yaml `params:`; `download:` for download) and data.dvc; its cursor is their
  hashes. The first look only remembers them. A change runs the assets whose params
  changed and everything downstream (an edit to train: runs train, evaluate, report,
  register); an edit no stage reads (`pipeline.nightly_cron`) runs nothing. A
  data.dvc change runs the stages after download, unless the pipeline's own
  download wrote it (its hash equals the `download` asset's latest data version).
- While any run is queued or in progress it decides nothing and keeps its cursor:
  the download step writes data.dvc before its materialization is recorded, and a
  tick in between once queued a spurious run (issue #16).
- `alert_on_failure` says why in the stage's own words (each failed step's
  `stage_error`, see resources.py), writes the alert to the run's log, appends it to
  $DAGSTER_HOME/alerts.jsonl, POSTs it as JSON to pipeline.alert_webhook_url when set
  (Slack-style: a `text` field), and marks the run's MLflow parent run FAILED.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import dagster as dg

from pipelines import dvc_graph
from pipelines.defs.schedules import active_runs
from pipelines.project import DOWNLOAD, Project, asset_name, data_dvc_md5, upstream_asset

CURSOR_VERSION = 2  # cursors of earlier versions (whole-file hashes) count as a first look


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_digests(project: Project) -> dict:
    """What the sensor compares tick to tick: per asset, a hash of the params values it reads; data.dvc's hash.

    Raises DvcGraphError when a params file is not valid YAML (a save half-way through an edit).
    """
    params = {asset_name(s.name): _digest(dvc_graph.param_values(s, project.root)) for s in project.stages}
    path = project.root / "params.yaml"
    tree = (dvc_graph._load_yaml(path) or {}) if path.exists() else {}
    params[DOWNLOAD] = _digest(tree.get("download") if isinstance(tree, dict) else None)  # stages.download reads it
    return {"version": CURSOR_VERSION, "params": params, "data": data_dvc_md5(project.root)}


def downstream(project: Project, starts: list[str]) -> list[str]:
    """`starts` and every pipeline asset after them, upstream first (what a change there makes stale)."""
    readers: dict[str, list[str]] = {}  # asset -> the stage assets that read its outputs
    for stage, ups in project.graph.items():
        for up in ups:
            readers.setdefault(upstream_asset(up, project.imports), []).append(asset_name(stage))
    found, todo = set(), list(starts)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo += readers.get(name, [])
    return [name for name in project.order if name in found and name in {DOWNLOAD, *project.stage_assets}]


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
        description="Runs the assets whose params changed (the values each stage reads) and what is downstream, "
                    "or the stages after download when data.dvc changed outside the pipeline. Waits while a run "
                    "is in progress.",
    )
    def pipeline_inputs_changed(context: dg.SensorEvaluationContext):
        try:
            now = input_digests(project)
        except dvc_graph.DvcGraphError as exc:  # cursor kept: the edit is looked at again once it parses
            return dg.SkipReason(f"cannot read the params: {exc}")
        before = json.loads(context.cursor) if context.cursor else None
        if not isinstance(before, dict) or before.get("version") != CURSOR_VERSION:
            context.update_cursor(json.dumps(now))
            return dg.SkipReason("first look: remembering the params each stage reads and data.dvc's hash")
        changed = [a for a in project.order if a in now["params"] and now["params"][a] != before["params"].get(a)]
        data_changed = now["data"] != before.get("data")
        if not changed and not data_changed:
            context.update_cursor(json.dumps(now))  # e.g. an edit to `pipeline:` (cron) that no stage reads
            return dg.SkipReason("no stage's params changed, and data.dvc is unchanged")
        # a run writes data.dvc (download) before Dagster records it: decide once it is over (issue #16)
        busy = active_runs(context.instance, jobs=None)
        if busy:
            return dg.SkipReason(f"run {busy[0]} is in progress: looking again when it is over")
        context.update_cursor(json.dumps(now))
        starts, why = list(changed), [f"params of {', '.join(changed)} changed"] if changed else []
        # data.dvc written by the pipeline's own download asset was used by that run already
        ours = now["data"] == latest_data_version(context.instance, dg.AssetKey(DOWNLOAD))
        readers = [a for a in downstream(project, [DOWNLOAD]) if a != DOWNLOAD]
        if data_changed and now["data"] is not None and not ours and readers:
            starts += readers
            why.append("data.dvc changed")
        if not starts:
            return dg.SkipReason("data.dvc is gone: nothing to run" if now["data"] is None
                                 else "data.dvc changed by the pipeline's own download asset" if ours
                                 else "data.dvc changed, but no stage reads data/")
        selection = downstream(project, starts)
        return dg.RunRequest(asset_selection=[dg.AssetKey(n) for n in selection],
                             tags={"nanoforge/trigger": "; ".join(why), "nanoforge/changed": ",".join(changed)})

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
        failures = context.get_step_failure_events()
        failed_steps = sorted({e.step_key for e in failures if e.step_key})
        # the stages' own messages ("cannot resume ...", a config error), not "Steps failed: [...]"
        reasons = [(e.step_key, r) for e in failures if (r := step_failure_reason(e))]
        message = (reasons[0][1] if len(reasons) == 1 else "; ".join(f"{k}: {r}" for k, r in reasons)) or (
            context.failure_event.message or "").strip()
        alert = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_id": run.run_id,
            "job": run.job_name,
            "failed_steps": failed_steps,
            "message": message,
            "run_message": (context.failure_event.message or "").strip(),
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


def step_failure_reason(event: dg.DagsterEvent) -> str | None:
    """Why a step failed: the stage's message (the Failure's `stage_error`), else the error's first line."""
    data = event.event_specific_data
    user = getattr(data, "user_failure_data", None)
    stage_error = (user.metadata or {}).get("stage_error") if user else None
    if stage_error is not None:
        return str(getattr(stage_error, "value", stage_error))
    error = getattr(data, "error", None)
    text = (user.description if user and user.description else getattr(error, "message", "")) or ""
    return text.strip().splitlines()[0] if text.strip() else None


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
