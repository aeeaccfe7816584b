"""The Dagster code location over DVC, against small synthetic DVC projects and the real dvc.yaml.

Real DVC, real MLflow (SQLite), a real Dagster instance (temporary DAGSTER_HOME with
the repo's dagster.yaml); the synthetic stages are three quick Python scripts that
track to MLflow and report over Pipes like the real ones (tests/pipelines_synth.py).
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.data_version import StaleStatus

from nanoforge.presets import dump_yaml  # quotes sweep.budgets' '3e12', which yaml.safe_dump leaves plain
from pipelines import dvc_graph
from pipelines.project import load_project
from pipelines.definitions import build_definitions
from tests.conftest import REPO, module_env, run, tool
from tests.pipelines_synth import make_synthetic, write_pipeline

STAGE_KEYS = [dg.AssetKey(k) for k in ("prepare", "fit", "score")]


def dvc_edges(root: Path) -> set[tuple[str, str]]:
    """The DAG as DVC itself sees it (`dvc dag --dot`)."""
    dot = run([tool("dvc"), "dag", "--dot"], root).stdout
    return set(re.findall(r'"([^"]+)" -> "([^"]+)"', dot))


def dagster_edges(defs: dg.Definitions, names: set[str]) -> set[tuple[str, str]]:
    graph = defs.resolve_asset_graph()
    edges = set()
    for key in graph.get_all_asset_keys():
        for parent in graph.get(key).parent_keys:
            edges.add((parent.to_user_string(), key.to_user_string()))
    return {(a, b) for a, b in edges if a in names and b in names}


def materializations(result) -> dict[str, dg.AssetMaterialization]:
    return {e.asset_key.to_user_string(): e.event_specific_data.materialization
            for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"}


def values(m: dg.AssetMaterialization) -> dict:
    return {k: v.value for k, v in m.metadata.items()}


def mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("nanoforge")
    return client, (client.search_runs([exp.experiment_id], order_by=["start_time ASC"]) if exp else [])


def _without_uncached_metric_hashes(lock: dict, stages: list[dvc_graph.Stage]) -> dict:
    """dvc.lock minus the hashes of uncached metrics files (they hold run ids and timings)."""
    volatile = {o.path for s in stages for o in s.outs if o.kind == "metric" and not o.cache}
    for entry in lock["stages"].values():
        for out in entry.get("outs", []):
            if out["path"] in volatile:
                out.pop("md5", None)
                out.pop("size", None)
    return lock


# ---------------------------------------------------------------------------
# a synthetic project, materialized twice through Dagster, and its twin run by `dvc repro`

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    home, uri = base / "dagster", f"sqlite:///{base / 'mlflow.db'}"
    with module_env(base):
        root = make_synthetic(base / "project")  # prepare -> fit
        before = build_definitions(root)
        write_pipeline(root, extra=True)  # + score, reading fit's model: no Python change
        run("git add -A && git commit -qm score", root)
        twin = base / "twin"
        shutil.copytree(root, twin, symlinks=True)
        run([tool("dvc"), "repro"], twin, env={"NANOFORGE_TRACKING": "off"})
        defs = build_definitions(root)
        instance = dg.DagsterInstance.get()
        job = defs.resolve_job_def("pipeline")
        first = job.execute_in_process(instance=instance, asset_selection=STAGE_KEYS, raise_on_error=False)
        second = job.execute_in_process(instance=instance, asset_selection=STAGE_KEYS, raise_on_error=False)
        yield SimpleNamespace(root=root, twin=twin, before=before, defs=defs, instance=instance, first=first,
                              second=second, uri=uri, home=home)


def test_materializing_the_graph_runs_what_dvc_repro_runs(synth):
    assert synth.first.success and synth.second.success
    stages = dvc_graph.load_stages(synth.root)
    ours = yaml.safe_load((synth.root / "dvc.lock").read_text())
    theirs = yaml.safe_load((synth.twin / "dvc.lock").read_text())
    assert list(ours["stages"]) == ["prepare", "fit", "score"]
    assert _without_uncached_metric_hashes(ours, stages) == _without_uncached_metric_hashes(theirs, stages)
    # and DVC agrees nothing is left to do
    status = json.loads(run([tool("dvc"), "status", "--json"], synth.root).stdout)
    assert status == {}


def test_data_versions_are_the_dvc_output_hashes(synth):
    lock = dvc_graph.lock_outs(synth.root)
    for name in ("prepare", "fit", "score"):
        m = materializations(synth.first)[name]
        assert m.tags["dagster/data_version"] == dvc_graph.version_of(lock[name])
    assert materializations(synth.first)["score"].tags["dagster/data_version"] == lock["score"]["out/score/metrics.json"]
    # fit recorded the version of what it read
    fit = materializations(synth.first)["fit"]
    assert fit.tags["dagster/input_data_version/prepare"] == dvc_graph.version_of(lock["prepare"])


def test_metadata_from_the_stage_and_its_files(synth):
    fit = values(materializations(synth.first)["fit"])
    metrics = json.loads((synth.root / "out/fit/metrics.json").read_text())
    assert fit["dvc_status"].startswith("ran:") and fit["up_to_date"] is False
    # rounded for people (nanoforge/formats.py), full precision in the file
    assert fit["val_bpb"] == round(metrics["val_bpb"], 4) and fit["num_params"] == metrics["num_params"]
    assert fit["reported_by_stage"] == "fit"  # sent by the stage over Pipes
    assert "| alpha | 0.5 | 4 |" in fit["tasks_table"]
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", fit["loss_plot"]).group(1))
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    assert fit["mlflow_run_id"] == metrics["mlflow_run_id"]
    assert fit["mlflow_run_url"].endswith(f"/runs/{metrics['mlflow_run_id']}")
    head = run(["git", "rev-parse", "HEAD"], synth.root).stdout.strip()
    assert fit["git_commit"].startswith(head)
    assert "`out/fit/model.txt`" in fit["dvc_outs"]


def test_second_materialization_is_a_noop_that_still_describes_the_outputs(synth):
    first, second = materializations(synth.first), materializations(synth.second)
    assert set(second) == {"prepare", "fit", "score"}
    for name, m in second.items():
        meta = values(m)
        assert meta["up_to_date"] is True and meta["dvc_status"].startswith("up to date"), name
        assert m.tags["dagster/data_version"] == first[name].tags["dagster/data_version"]
        assert meta["mlflow_run_id"] == values(first[name])["mlflow_run_id"]  # the run that made the outputs
        assert meta["duration_s"] < values(first[name])["duration_s"]
    assert values(second["fit"])["val_bpb"] == values(first["fit"])["val_bpb"]
    assert "loss_plot" in values(second["fit"]) and "tasks_table" in values(second["fit"])


def test_one_mlflow_parent_per_pipeline_run_and_a_child_per_stage(synth):
    _, runs = mlflow_runs(synth.uri)
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("stage") != "pipeline"]
    assert [p.data.tags["dagster_run_id"] for p in parents] == [synth.first.run_id, synth.second.run_id]
    first = parents[0]
    assert first.info.status == "FINISHED" and parents[1].info.status == "FINISHED"
    head = run(["git", "rev-parse", "HEAD"], synth.root).stdout.strip()
    assert first.data.tags["git_commit"] == head
    assert len(first.data.tags["dvc.lock_sha256_end"]) == 16
    # the stages ran once, in the first pipeline run, as its children; the no-op run has none
    assert sorted(c.data.tags["stage"] for c in children) == ["fit", "prepare", "score"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {first.info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert first.data.tags["step.fit"].startswith("ran")
    assert parents[1].data.tags["step.fit"].startswith("up to date")


def test_unsynced_agrees_with_dvc_status(synth):
    def stale(defs) -> dict[str, StaleStatus]:
        from dagster._utils.test.data_versions import get_stale_status_resolver

        resolver = get_stale_status_resolver(synth.instance, list(defs.assets))
        return {k.to_user_string(): resolver.get_status(k) for k in STAGE_KEYS}

    assert set(stale(synth.defs).values()) == {StaleStatus.FRESH}
    params = synth.root / "params.yaml"
    original = params.read_text()
    try:
        tree = yaml.safe_load(original)
        tree["fit"]["steps"] = 31
        params.write_text(yaml.safe_dump(tree, sort_keys=False))
        status = json.loads(run([tool("dvc"), "status", "--json"], synth.root).stdout)
        dagster = stale(build_definitions(synth.root))
        assert set(status) == {"fit"}
        assert dagster["fit"] == StaleStatus.STALE and dagster["prepare"] == StaleStatus.FRESH
    finally:
        params.write_text(original)
    assert json.loads(run([tool("dvc"), "status", "--json"], synth.root).stdout) == {}


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


REASON = "prepare.n must be an integer, got 'not a number': set prepare.n in params.yaml"


def test_failed_run_alerts_and_fails_the_mlflow_parent(synth, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", synth.uri)  # the per-test isolation points elsewhere
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    params = synth.root / "params.yaml"
    original = params.read_text()
    try:
        tree = yaml.safe_load(original)
        tree["prepare"]["n"] = "not a number"  # the stage fails: str * str
        tree["pipeline"]["alert_webhook_url"] = f"http://127.0.0.1:{server.server_port}/hook"
        params.write_text(yaml.safe_dump(tree, sort_keys=False))
        defs = build_definitions(synth.root)
        result = defs.resolve_job_def("pipeline").execute_in_process(
            instance=synth.instance, asset_selection=STAGE_KEYS, raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert failure.step_key == "prepare"
        # the stage's own words (sent over Pipes) are the failure's message, then DVC's last words
        assert failure.event_specific_data.user_failure_data.description.startswith(REASON + "\n")
        assert REASON in failure.event_specific_data.error.message
        assert "dvc repro --single-item prepare" in failure.event_specific_data.error.message
        context = dg.build_run_status_sensor_context(
            sensor_name="alert_on_failure", dagster_instance=synth.instance, dagster_run=result.dagster_run,
            dagster_event=result.get_run_failure_event()).for_run_failure()
        defs.get_sensor_def("alert_on_failure")(context)
    finally:
        params.write_text(original)
        server.shutdown()
    alerts = [json.loads(line) for line in (synth.home / "alerts.jsonl").read_text().splitlines()]
    assert alerts[-1]["run_id"] == result.run_id and alerts[-1]["failed_steps"] == ["prepare"]
    assert alerts[-1]["message"] == REASON and "Steps failed" in alerts[-1]["run_message"]
    assert _Hook.received and _Hook.received[-1]["run_id"] == result.run_id
    assert _Hook.received[-1]["text"].endswith(f"failed at prepare: {REASON}")
    _, runs = mlflow_runs(synth.uri)
    parent = next(r for r in runs if r.data.tags.get("dagster_run_id") == result.run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["failed_asset"] == "prepare"
    assert parent.data.tags["error"] == REASON


def _tick(sensor, instance, cursor=None):
    """One evaluation of a sensor, as the daemon does it: (run requests, skip message, new cursor)."""
    data = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor))
    return data.run_requests, data.skip_message, data.cursor


def _edit(path: Path, change) -> None:
    tree = yaml.safe_load(path.read_text())
    change(tree)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def test_inputs_sensor_reacts_to_the_params_each_stage_reads(synth, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(synth.twin, root, symlinks=True)  # every stage up to date
    defs, instance = build_definitions(root), dg.DagsterInstance.get()
    sensor = defs.get_sensor_def("pipeline_inputs_changed")
    requests, skip, cursor = _tick(sensor, instance)
    assert requests == [] and "first look" in skip
    params = root / "params.yaml"
    params.write_text(params.read_text() + "\n# a comment\n")
    _edit(params, lambda t: t["pipeline"].update(nightly_cron="15 4 * * *"))  # no stage reads the cron
    requests, skip, cursor = _tick(sensor, instance, cursor)
    assert requests == [] and "no stage's params changed" in skip
    _edit(params, lambda t: t["fit"].update(steps=12))
    (request,), _, cursor = _tick(sensor, instance, cursor)
    assert request.asset_selection == [dg.AssetKey("fit"), dg.AssetKey("score")]  # fit and what is downstream
    assert "params of fit changed" in request.tags["nanoforge/trigger"]
    result = defs.resolve_job_def("pipeline").execute_in_process(
        instance=instance, asset_selection=request.asset_selection, tags=request.tags, raise_on_error=False)
    assert result.success
    ran = materializations(result)
    assert set(ran) == {"fit", "score"} and values(ran["fit"])["dvc_status"].startswith("ran")
    assert json.loads((root / "out/fit/metrics.json").read_text())["val_bpb"] == pytest.approx(3.0 / 12 + 1.0 / 50)
    assert _tick(sensor, instance, cursor)[0] == []  # that change is done
    _edit(params, lambda t: t["download"].update(num_train_shards=t["download"]["num_train_shards"] + 1))
    (request,), _, _ = _tick(sensor, instance, cursor)
    assert request.asset_selection == [dg.AssetKey("download")]  # no synthetic stage reads data/
    params.write_text("train: [unclosed\n")  # a save half-way through an edit: wait for a file that parses
    requests, skip, after = _tick(sensor, instance, cursor)
    assert requests == [] and "not valid YAML" in skip and after == cursor


def test_inputs_sensor_waits_while_a_run_is_in_progress(synth, tmp_path):
    """Issue #16: the download step writes data.dvc before its materialization is recorded;
    a tick in between must not queue a run."""
    from dagster._core.utils import make_new_run_id

    root = tmp_path / "p"
    shutil.copytree(synth.twin, root, symlinks=True)
    _edit(root / "dvc.yaml", lambda t: t["stages"]["prepare"]["deps"].append("data/fineweb"))  # prepare reads data/
    defs, instance = build_definitions(root), dg.DagsterInstance.get()
    sensor = defs.get_sensor_def("pipeline_inputs_changed")
    _, _, cursor = _tick(sensor, instance)
    running = instance.add_run(dg.DagsterRun(job_name="pipeline", run_id=make_new_run_id(),
                                             status=dg.DagsterRunStatus.STARTED))
    (root / "data.dvc").write_text("outs:\n- md5: 1234.dir\n  path: data\n")  # the download step's write...
    requests, skip, after = _tick(sensor, instance, cursor)
    assert requests == [] and running.run_id in skip and after == cursor  # ...decided once the run is over
    instance.report_runless_asset_event(dg.AssetMaterialization(  # the step's materialization, then the run ends
        asset_key="download", tags={"dagster/data_version": "1234.dir"}))
    instance.delete_run(running.run_id)
    requests, skip, cursor = _tick(sensor, instance, cursor)
    assert requests == [] and "own download" in skip
    # data.dvc changed by someone else (a `dvc pull`, a download by hand): the stages after download run
    (root / "data.dvc").write_text("outs:\n- md5: 5678.dir\n  path: data\n")
    (request,), _, _ = _tick(sensor, instance, cursor)
    assert request.asset_selection == [dg.AssetKey(k) for k in ("prepare", "fit", "score")]
    assert request.tags["nanoforge/trigger"] == "data.dvc changed"


@pytest.mark.cluster  # ~15 s of real dvc repro: make test-slurm, to keep make test under 10 minutes
def test_resume_tag_fresh_starts_the_stateful_stage_over(synth, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(synth.twin, root, symlinks=True)  # fit ran once: its persisted state says 1 run
    defs, instance = build_definitions(root), dg.DagsterInstance.get()
    job = defs.resolve_job_def("pipeline")

    def materialize(keys, tags=None):
        return job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(k) for k in keys],
                                      tags=tags or {}, raise_on_error=False)

    assert values(materializations(materialize(["fit"]))["fit"])["up_to_date"] is True
    fresh = materialize(["prepare", "fit"], {"nanoforge/resume": "fresh"})
    assert fresh.success
    ran = {k: values(m) for k, m in materializations(fresh).items()}
    assert ran["prepare"]["up_to_date"] is True  # no state to start over: DVC decides as always
    assert ran["fit"]["dvc_status"].startswith("ran: `dvc repro --force --single-item fit`")
    metrics = json.loads((root / "out/fit/metrics.json").read_text())
    assert metrics["resume"] == "fresh" and metrics["runs"] == 1  # NANOFORGE_RESUME=fresh reached the stage
    bad = materialize(["fit"], {"nanoforge/resume": "frsh"})
    failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
    assert "nanoforge/resume='frsh' is not one of auto, fresh" in failure.event_specific_data.error.message
    assert json.loads((root / "out/fit/metrics.json").read_text())["mlflow_run_id"] == metrics["mlflow_run_id"]


def test_progress_reaches_dagster_while_the_stage_runs(synth, tmp_path, monkeypatch):
    """The stage's per-step progress shows in the run (a log line, an observation) before the stage ends:
    the synthetic fit blocks after its first step until this test has seen that step in Dagster."""
    root = tmp_path / "p"
    shutil.copytree(synth.twin, root, symlinks=True)
    _edit(root / "params.yaml", lambda t: t["fit"].update(steps=7))
    go = tmp_path / "go"
    monkeypatch.setenv("SYNTH_WAIT_FOR", str(go))
    monkeypatch.setenv("NANOFORGE_PIPES_PROGRESS_S", "0")  # every step
    defs, instance = build_definitions(root), dg.DagsterInstance.get()
    seen: dict = {}

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not go.exists():
            for run_ in instance.get_runs(limit=1):
                observed = instance.all_logs(run_.run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION)
                if observed:
                    seen["metadata"] = observed[0].dagster_event.event_specific_data.asset_observation.metadata
                    seen["stage_done"] = (root / "out/fit/model.txt").exists()
                    go.write_text("go")
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = defs.resolve_job_def("pipeline").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("fit")], raise_on_error=False)
    watcher.join(5)
    assert result.success
    assert seen, "no progress reached Dagster while fit was blocked after its first step"
    assert seen["stage_done"] is False and seen["metadata"]["step"].value == 1
    observed = [e.event_specific_data.asset_observation for e in result.all_events
                if e.event_type_value == "ASSET_OBSERVATION"]
    assert [o.metadata["step"].value for o in observed] == list(range(1, 8))
    assert all(o.asset_key == dg.AssetKey("fit") for o in observed)
    lines = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message.startswith("step ")]
    assert lines[0] == "step 1/7 | loss 3.0200" and len(lines) == 7, lines  # the stage's own line, in the run log


def test_nightly_schedule_requests_the_retrain_job(synth):
    defs = build_definitions(synth.root)
    schedule = defs.get_schedule_def("nightly_retrain")
    params = yaml.safe_load((synth.root / "params.yaml").read_text())["pipeline"]
    assert schedule.cron_schedule == params["nightly_cron"] and schedule.execution_timezone == params["timezone"]
    assert schedule.job_name == "retrain"
    when = datetime.datetime(2030, 1, 2, 3, 0, tzinfo=datetime.timezone.utc)
    request = schedule(dg.build_schedule_context(instance=synth.instance, scheduled_execution_time=when))
    assert isinstance(request, dg.RunRequest) and request.tags["nanoforge/trigger"] == "nightly_retrain"
    assert request.run_key == "nightly:2030-01-02T03:00:00+00:00"
    retrain = defs.resolve_job_def("retrain").asset_layer.executable_asset_keys
    assert dg.AssetKey("dvc_remote") in retrain and set(STAGE_KEYS) | {dg.AssetKey("download")} <= retrain
    # a pipeline run still going: the tick skips instead of stacking runs
    from dagster._core.utils import make_new_run_id

    run_ = synth.instance.add_run(dg.DagsterRun(job_name="pipeline", run_id=make_new_run_id(),
                                                status=dg.DagsterRunStatus.STARTED))
    try:
        skipped = schedule(dg.build_schedule_context(instance=synth.instance, scheduled_execution_time=when))
        assert isinstance(skipped, dg.SkipReason) and run_.run_id in skipped.skip_message
    finally:
        synth.instance.delete_run(run_.run_id)


def test_push_to_remote_off_leaves_push_out_of_the_nightly_job(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root)
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    tree["pipeline"].update(push_to_remote=False, nightly_cron="30 1 * * 1-5", timezone="Europe/Paris")
    (root / "params.yaml").write_text(dump_yaml(tree))  # the repo's: sweep.budgets stay quoted
    defs = build_definitions(root)
    assert dg.AssetKey("dvc_remote") not in defs.resolve_job_def("retrain").asset_layer.executable_asset_keys
    schedule = defs.get_schedule_def("nightly_retrain")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("30 1 * * 1-5", "Europe/Paris")


# ---------------------------------------------------------------------------
# the graph: derived from dvc.yaml, equal to DVC's own DAG

def test_asset_graph_equals_dvc_dag_and_a_new_stage_needs_no_python(synth):
    assert dg.AssetKey("score") not in synth.before.resolve_asset_graph().get_all_asset_keys()
    defs = synth.defs  # the same code, after `score` was added to dvc.yaml
    names = {"prepare", "fit", "score"}
    assert dagster_edges(defs, names) == dvc_edges(synth.root) == {("prepare", "fit"), ("fit", "score")}
    graph = defs.resolve_asset_graph()
    score = graph.get(dg.AssetKey("score"))
    assert score.group_name == "pipeline" and "dvc" in score.kinds and "python" in score.kinds
    fit = graph.get(dg.AssetKey("fit"))
    assert fit.group_name == "model" and fit.owners == ["team:ml"] and fit.kinds == {"dvc", "python", "pytorch"}
    spec = defs.get_assets_def(dg.AssetKey("score")).specs_by_key[dg.AssetKey("score")]
    assert "python synth.py score" in spec.description and "out/fit/model.txt (from fit)" in spec.description
    assert dg.AssetKey("score") in defs.resolve_job_def("pipeline").asset_layer.executable_asset_keys
    # and it materialized like any other (in the fixture's runs)
    assert values(materializations(synth.first)["score"])["core"] == 0.25


def test_real_dvc_yaml_graph_equals_dvc_dag(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root)
    run(["git", "init", "-q"], root)
    run([tool("dvc"), "init", "-q"], root)
    (root / "data.dvc").write_text("outs:\n- md5: 1234.dir\n  path: data\n")
    defs = build_definitions(root)
    stages = [s.name for s in dvc_graph.load_stages(root)]
    assert {"tokenizer", "train", "evaluate", "report", "register"} <= set(stages)
    names = set(stages) | {"download"}
    expected = {(a.replace("data.dvc", "download"), b) for a, b in dvc_edges(root)}
    assert dagster_edges(defs, names) == expected
    assert ("download", "tokenizer") in expected and ("train", "evaluate") in expected
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == names | {"fineweb_shards", "dvc_remote"}
    # checks sit on the assets they guard; blocking where bad data must not flow on
    checks = {(k.asset_key.to_user_string(), k.name): spec.blocking
              for k, spec in ((s.key, s) for a in defs.assets for s in getattr(a, "check_specs", []))}
    assert checks[("download", "shards_valid")] and checks[("evaluate", "val_bpb_finite")]
    assert not checks[("evaluate", "val_bpb_vs_champion")] and ("tokenizer", "compression") in checks
    assert {k.to_user_string() for k in defs.resolve_job_def("eval_and_report").asset_layer.executable_asset_keys} == {
        "evaluate", "report", "register"}
    # the run tag nanoforge/resume=fresh forces train alone (its checkpoints are no DVC output)
    from pipelines.defs.step import resumable

    assert [s.name for s in dvc_graph.load_stages(root) if resumable(s)] == ["train"]
    # every DVC-running asset is in the dvc pool (limit 1)
    for key in ("download", "tokenizer", "train", "evaluate", "report", "register", "dvc_remote"):
        assert defs.get_assets_def(dg.AssetKey(key)).op.pool == "dvc", key


def test_shard_partitions_fetch_just_those_shards(tmp_path, monkeypatch):
    from tests.conftest import make_project
    from tests.datagen import make_fineweb

    make_fineweb(tmp_path / "mirror", train=(0, 1), val=1822, docs_per_shard=50, manifest=False)
    monkeypatch.setenv("NANOFORGE_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")
    root = make_project(tmp_path / "p")
    defs = build_definitions(root)
    shards = defs.get_assets_def(dg.AssetKey("fineweb_shards"))
    assert shards.partitions_def.get_partition_keys() == ["0", "1", "1822"]  # from params.yaml's download section
    instance = dg.DagsterInstance.get()
    # a backfill of two partitions is one run, one download command
    result = dg.materialize([shards], instance=instance, resources=defs.resources, tags={
        "dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "1"})
    assert result.success
    assert sorted(p.name for p in (root / "data/fineweb").glob("*.parquet")) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert instance.get_materialized_partitions(dg.AssetKey("fineweb_shards")) == {"0", "1"}
    meta = {k: v.value for k, v in result.asset_materializations_for_node("fineweb_shards")[0].metadata.items()}
    assert meta["shards"] == 2 and meta["rows"] == 100
    assert not (root / "data.dvc").exists()  # versioning is the download asset's job, once


def test_string_selections_resolve():
    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()

    def pick(text):
        return {k.to_user_string() for k in dg.AssetSelection.from_string(text).resolve(graph)}

    assert pick('key:"train"+') == {"train", "evaluate", "report", "register", "dvc_remote"}
    assert pick("group:data") == {"fineweb_shards", "download"}
    assert pick('1+key:"tokenizer"') == {"download", "tokenizer"}  # one level up
    assert pick('+key:"tokenizer"') == {"fineweb_shards", "download", "tokenizer"}  # every ancestor
    assert {"tokenizer", "train", "evaluate", "report", "register", "download"} <= pick("kind:dvc")
    assert len(pick("*")) == len(graph.get_all_asset_keys())


def test_bad_pipeline_params_fail_at_load_naming_the_key(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root)
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    tree["pipeline"]["nightly_cron"] = "every night"
    (root / "params.yaml").write_text(dump_yaml(tree))  # the repo's: sweep.budgets stay quoted
    with pytest.raises(ValueError, match=r"pipeline.nightly_cron='every night' is not a 5-field cron"):
        load_project(root)


# ---------------------------------------------------------------------------
# the CLI and the UI

def test_definitions_validate():
    proc = run([tool("dagster"), "definitions", "validate", "-m", "pipelines.definitions"], REPO, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Validation successful" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------
# cancelling: the interrupt a run gets from the UI reaches torchrun's workers through dvc

SLOW = '''"""A torchrun worker that checkpoints on SIGTERM and resumes from it, like stages.train."""
import os, signal, sys, time
ckpt = "out/slow/ckpt.txt"
os.makedirs("out/slow", exist_ok=True)
if os.path.exists(ckpt):  # resume: the rest of the work is quick
    open("out/slow/done.txt", "w").write("resumed from step " + open(ckpt).read())
    print("resumed", flush=True)
    sys.exit(0)
step = 0
def stop(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # like train: a second SIGTERM is not polite
    time.sleep(2)  # saving takes a while: a second SIGTERM now would kill us mid-save
    open(ckpt, "w").write(str(step))
    print(f"SIGTERM at step {step}: checkpoint saved", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(0.05)
    step += 1
    if step % 10 == 0:
        print(f"working step {step}", flush=True)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(synth, tmp_path_factory):
    """`dagster dev` on a free port, over a copy of the synthetic project plus a torchrun stage."""
    import requests

    base = tmp_path_factory.mktemp("ui")
    root = base / "p"
    shutil.copytree(synth.twin, root, symlinks=True)  # a git+DVC project whose stages are up to date
    (root / "slow.py").write_text(SLOW)
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    spec["stages"]["slow"] = {"cmd": "torchrun --standalone --nproc_per_node=1 slow.py", "deps": ["slow.py"],
                              "outs": ["out/slow/done.txt"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run("git add -A && git commit -qm slow", root)
    home = base / "dagster"
    home.mkdir()
    shutil.copy(REPO / ".dagster/dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "NANOFORGE_TRACKING": "off", "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    port = _free_port()
    log_path = base / "dagster-dev.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([tool("dagster"), "dev", "-h", "127.0.0.1", "-p", str(port)], cwd=root, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/graphql"

    def gql(query: str, variables: dict | None = None) -> dict:
        answer = requests.post(url, json={"query": query, "variables": variables or {}}, timeout=30).json()
        assert "errors" not in answer, answer
        return answer["data"]

    try:
        deadline, repos = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                repos = gql("{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }")
                if repos["repositoriesOrError"].get("nodes"):
                    break
            except (requests.RequestException, ValueError, AssertionError):
                pass
            time.sleep(1)
        assert repos and repos["repositoriesOrError"]["nodes"], log_path.read_text()[-3000:]
        node = repos["repositoriesOrError"]["nodes"][0]
        yield SimpleNamespace(root=root, gql=gql, port=port, log=log_path, home=home,
                              selector={"repositoryLocationName": node["location"]["name"], "repositoryName": node["name"]})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # dagster dev stops with its process group, not its pid
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_dagster_dev_answers_graphql_with_every_asset(ui):
    nodes = ui.gql("{ assetNodes { assetKey { path } } }")["assetNodes"]
    expected = {k.to_user_string() for k in build_definitions(ui.root).resolve_asset_graph().get_all_asset_keys()}
    assert {"/".join(n["assetKey"]["path"]) for n in nodes} == expected
    assert {"prepare", "fit", "score", "slow", "download", "fineweb_shards", "dvc_remote"} <= expected
    assert re.search(rf"127\.0\.0\.1:{ui.port}", ui.log.read_text())  # bound to localhost only


LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
STATUS = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
TERMINATE = """mutation($id: String!) { terminateRun(runId: $id) { __typename ... on TerminateRunFailure { message } } }"""


def _wait_status(ui, run_id: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ui.gql(STATUS, {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(0.5)
    return status


def test_cancelling_from_the_ui_stops_torchrun_cleanly_and_a_rerun_resumes(ui):
    import psutil

    params = {"selector": {**ui.selector, "jobName": "pipeline", "assetSelection": [{"path": ["slow"]}]}}
    launched = ui.gql(LAUNCH, {"p": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and "working step 20" not in ui.log.read_text():
        time.sleep(0.5)  # the worker's lines stream into the run's logs while it runs
    assert "working step 20" in ui.log.read_text(), ui.log.read_text()[-4000:]
    assert ui.gql(TERMINATE, {"id": run_id})["terminateRun"]["__typename"] == "TerminateRunSuccess"
    assert _wait_status(ui, run_id) == "CANCELED"
    log = ui.log.read_text()
    assert "sent SIGTERM" in log and "checkpoint saved" in log, log[-4000:]
    assert (ui.root / "out/slow/ckpt.txt").exists() and not (ui.root / "out/slow/done.txt").exists()
    # the worker's output is in the run's captured step logs: what the UI's stdout/stderr tabs show
    captured = "".join(p.read_text(errors="replace") for p in (ui.home / "storage" / run_id).rglob("*.out"))
    assert "Running stage 'slow':" in captured and "working step 20" in captured and "checkpoint saved" in captured
    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if "slow.py" in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
    lock = yaml.safe_load((ui.root / "dvc.lock").read_text())
    assert "slow" not in lock["stages"]  # DVC did not record the interrupted stage as done
    # DVC released its locks, and a re-run resumes from the checkpoint
    again = ui.gql(LAUNCH, {"p": params})["launchRun"]["run"]["runId"]
    assert _wait_status(ui, again) == "SUCCESS"
    done = (ui.root / "out/slow/done.txt").read_text()
    assert done.startswith("resumed from step ") and int(done.split()[-1]) >= 20


def test_a_bare_dvc_repro_groups_its_stages_under_one_parent_run(synth, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(synth.twin, root, symlinks=True)
    tree = yaml.safe_load((root / "params.yaml").read_text())
    tree["fit"]["steps"] = 12  # fit and score re-run
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    run([tool("dvc"), "repro"], root)  # no Dagster, no NANOFORGE_PARENT_RUN_ID
    _, runs = mlflow_runs(os.environ["MLFLOW_TRACKING_URI"])
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.run_name == "dvc repro"
    parent = parents[0]
    assert parent.data.tags["nanoforge.group"].startswith("dvc:") and parent.info.status == "FINISHED"
    assert parent.data.tags["git_commit"] == run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    children = [r for r in runs if r.data.tags.get("stage") != "pipeline"]
    assert sorted(c.data.tags["stage"] for c in children) == ["fit", "score"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}


@pytest.mark.cluster  # ~11 s, two real dvc processes racing: make test-slurm, to keep make test under 10 minutes
def test_a_dvc_lock_conflict_waits_and_retries_instead_of_failing(synth, tmp_path, monkeypatch):
    import fcntl

    from pipelines.dvc_exec import run_dvc

    root = tmp_path / "p"
    shutil.copytree(synth.twin, root, symlinks=True)
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")
    (root / ".dvc/tmp").mkdir(exist_ok=True)

    def hold_repo_lock(seconds: float):  # what another `dvc` process holds (dvc itself waits 3 s for it)
        with open(root / ".dvc/tmp/lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            held.set()
            time.sleep(seconds)
            fcntl.flock(fh, fcntl.LOCK_UN)

    held = threading.Event()
    threading.Thread(target=hold_repo_lock, args=(5.0,), daemon=True).start()
    held.wait(5)
    result = run_dvc(["repro", "--single-item", "prepare"], cwd=str(root), out=open(os.devnull, "wb"))
    assert result["status"] == "skipped" and result["attempts"] >= 2 and result["lock_wait_s"] > 0, result
    # an output another dvc process is writing (its rwlock entry): wait for it too
    rwlock = root / ".dvc/tmp/rwlock"
    rwlock.write_text(json.dumps({"write": {str(root / "out/prepare/data.txt"): {"pid": os.getpid(), "cmd": "dvc repro (another)"}}}))
    threading.Timer(2.0, lambda: rwlock.write_text("{}")).start()
    result = run_dvc(["repro", "-f", "--single-item", "prepare"], cwd=str(root), out=open(os.devnull, "wb"))
    assert result["status"] == "ran" and result["attempts"] >= 2, result
    # and a lock that never frees gives up with a clear status instead of hanging forever
    rwlock.write_text(json.dumps({"write": {str(root / "out/prepare/data.txt"): {"pid": os.getpid(), "cmd": "stuck"}}}))
    result = run_dvc(["repro", "-f", "--single-item", "prepare"], cwd=str(root), lock_timeout_s=2,
                     out=open(os.devnull, "wb"))
    assert result["status"] == "lock_timeout" and "is busy" in result["output_tail"], result


def test_demo_frees_the_pool_slot_of_a_run_whose_process_died(tmp_path):
    from dagster._core.utils import make_new_run_id

    from pipelines.demo import free_dead_claims

    shutil.copy(REPO / ".dagster/dagster.yaml", Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml")
    instance = dg.DagsterInstance.get()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = instance.add_run(dg.DagsterRun(job_name="pipeline", run_id=make_new_run_id(), status=dg.DagsterRunStatus.STARTED,
                                          tags={"nanoforge/pid": str(gone.pid), "nanoforge/host": socket.gethostname()}))
    alive = instance.add_run(dg.DagsterRun(job_name="pipeline", run_id=make_new_run_id(), status=dg.DagsterRunStatus.STARTED,
                                           tags={"nanoforge/pid": str(os.getpid()), "nanoforge/host": socket.gethostname()}))
    storage = instance.event_log_storage
    storage.initialize_concurrency_limit_to_default("dvc")
    assert storage.get_concurrency_info("dvc").slot_count == 1  # dagster.yaml's default_limit
    assert storage.claim_concurrency_slot("dvc", dead.run_id, "train").is_claimed
    assert not storage.claim_concurrency_slot("dvc", alive.run_id, "train").is_claimed  # blocked behind the dead run
    assert free_dead_claims(instance) == [dead.run_id]
    assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
    assert storage.claim_concurrency_slot("dvc", alive.run_id, "train").is_claimed
    assert free_dead_claims(instance) == []  # a live process keeps its slot


def test_dvc_remote_asset_pushes_the_cached_outputs(synth, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", synth.uri)
    job = synth.defs.resolve_job_def("retrain")
    pushed = []
    for _ in range(2):
        result = job.execute_in_process(instance=synth.instance, asset_selection=[dg.AssetKey("dvc_remote")],
                                        raise_on_error=False)
        assert result.success
        pushed.append(values(materializations(result)["dvc_remote"]))
    remote = synth.root.parent / "project-remote"
    assert pushed[0]["files_pushed"] >= 2 and pushed[0]["remote"] == str(remote)
    assert pushed[1]["files_pushed"] == 0 and pushed[1]["dvc_status"].startswith("everything was already")
    # what dvc.lock says is cached is now on the remote: `dvc status --cloud` has nothing to push
    assert "are in sync" in run([tool("dvc"), "status", "--cloud"], synth.root).stdout


def test_retrain_refuses_an_unusable_s3_remote_before_any_stage_work(synth, tmp_path):
    # issue #16: the push comes last; a bucket that can't be reached must stop the run at its first step
    root = tmp_path / "p"
    shutil.copytree(synth.twin, root, symlinks=True)
    with socket.socket() as s:  # a port nothing listens on: an S3 endpoint that is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / ".dvc/config.local").write_text(
        "[core]\n    remote = team\n['remote \"team\"']\n    url = s3://nightly/dvc\n"
        f"    endpointurl = http://127.0.0.1:{port}\n    access_key_id = k\n    secret_access_key = s\n")
    lock = (root / "dvc.lock").read_text()
    defs, instance = build_definitions(root), dg.DagsterInstance.get()
    result = defs.resolve_job_def("retrain").execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("prepare"), dg.AssetKey("fit"), dg.AssetKey("dvc_remote")],
        tags={"nanoforge/resume": "fresh"}, raise_on_error=False)  # fresh: fit would run if the check let it
    assert not result.success and materializations(result) == {}
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "prepare"
    message = failure.event_specific_data.error.message
    assert "DVC remote 'team' (s3://nightly/dvc)" in message and "endpointurl" in message
    assert "before any stage work" in message
    assert (root / "dvc.lock").read_text() == lock
    # the same project with its local remote back: no check, no refusal
    (root / ".dvc/config.local").unlink()
    from pipelines.remote_check import s3_problem
    assert s3_problem(root) is None


def test_a_stage_stopped_by_sigterm_is_stopped_not_failed():
    # issue 15.12: a run stopped cleanly by SIGTERM (exit 143, checkpoint saved) showed as FAILED in MLflow
    from pipelines.defs.resources import failure
    from pipelines.defs.session import Outcome
    from pipelines.defs.step import interrupted

    tail = ("stopped: stopped by signal at step 4/12; checkpoint saved, run the same command to resume\n"
            "ERROR: failed to reproduce 'train': failed to run: python -m nanoforge.torchrun --standalone "
            "--nproc_per_node=1 -m stages.train, exited with 143")
    stopped = failure({"status": "failed", "returncode": 255, "command": "dvc repro train", "output_tail": tail},
                      Outcome(returncode=255))
    assert stopped.metadata["status"].value == "stopped" and interrupted(stopped)  # the parent run ends KILLED
    assert "run it again to resume" in stopped.description
    crashed = failure({"status": "failed", "returncode": 255, "command": "dvc repro train",
                       "output_tail": tail.replace("exited with 143", "exited with 1")}, Outcome(returncode=255))
    assert crashed.metadata["status"].value == "failed" and not interrupted(crashed)


# ---------------------------------------------------------------------------
# the scaling-law sweep (sweep/dvc.yaml): a partition per cell, the fit with its checks

def test_sweep_is_a_grid_of_partitions_and_the_fit_checks_it(tmp_path):
    from nanoforge.config import SweepConfig
    from pipelines.defs.sweep import fit_checks, stage_target
    from tests.conftest import make_project

    root = make_project(tmp_path / "p")
    assert "sweep" not in {k.to_user_string() for k in build_definitions(root).resolve_asset_graph().get_all_asset_keys()}
    shutil.copytree(REPO / "sweep", root / "sweep")
    defs = build_definitions(root)
    cfg = SweepConfig()  # params.yaml's sweep section is the defaults
    sweep = defs.get_assets_def(dg.AssetKey("sweep"))
    part = sweep.partitions_def
    assert isinstance(part, dg.MultiPartitionsDefinition)
    assert {d.name: d.partitions_def.get_partition_keys() for d in part.partitions_defs} == {
        "budget": list(cfg.budgets), "depth": [str(d) for d in cfg.depths]}
    assert len(part.get_partition_keys()) == len(cfg.budgets) * len(cfg.depths)
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("scaling_laws")).parent_keys == {dg.AssetKey("sweep")}
    assert graph.get(dg.AssetKey("sweep")).parent_keys == {dg.AssetKey("tokenizer")}
    assert stage_target("1e13", "4") == "sweep/dvc.yaml:sweep@1e13-4"  # the name `dvc stage list` gives it
    fit = defs.get_assets_def(dg.AssetKey("scaling_laws"))
    assert {k.name for k in fit.check_keys} == {"cells_finished", "fits_finite", "a_plus_b_near_1"}
    for job in ("pipeline", "retrain"):  # the grid is run on purpose, never by make demo or the nightly job
        assert dg.AssetKey("sweep") not in defs.resolve_job_def(job).asset_layer.executable_asset_keys

    # the checks read the fit and the cells' rows
    cfg = SweepConfig(budgets=["1e13", "3e13"], depths=[1, 2, 3])
    out = root / "artifacts/scaling_laws"
    out.mkdir(parents=True)
    (out / "scaling_laws.json").write_text(json.dumps({"a": 0.52, "b": 0.47, "ratio": 20.0, "sum_deviation": -0.01,
                                                       "sum_check": "a + b = 0.99"}))
    for name in ("c1e13-d1", "c1e13-d2", "c1e13-d3", "c3e13-d1", "c3e13-d2"):
        (root / "artifacts/sweep" / name).mkdir(parents=True)
        (root / "artifacts/sweep" / name / "cell.json").write_text("{}")
    results = {r.check_name: r for r in fit_checks(root, cfg)}
    assert not results["cells_finished"].passed and results["cells_finished"].metadata["missing"].value == "c3e13-d3"
    assert results["fits_finite"].passed and results["a_plus_b_near_1"].passed
    (out / "scaling_laws.json").write_text(json.dumps({"a": 0.7, "b": float("nan"), "ratio": 3.0, "sum_deviation": 0.4}))
    results = {r.check_name: r for r in fit_checks(root, cfg)}
    assert not results["fits_finite"].passed and not results["a_plus_b_near_1"].passed
