"""The real pipeline through Dagster, end to end, on generated data: download (from a local
mirror folder) -> tokenizer -> train (torchrun) -> evaluate -> report -> register.

Real stages, real DVC repo, real MLflow SQLite store and registry, real Dagster
instance; tiny settings so it takes about a minute on two cores.
"""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import dagster as dg
import pytest
import yaml

from pipelines import dvc_graph
from nanoforge.presets import dump_yaml  # quotes sweep.budgets' '3e12', which yaml.safe_dump leaves plain
from pipelines.definitions import build_definitions
from tests.conftest import REPO, make_project, module_env, run, tool
from tests.datagen import make_eval_bundle, make_fineweb

pytestmark = pytest.mark.slow

TINY = {
    "tokenizer.vocab_size": 512, "tokenizer.max_chars": 200_000, "tokenizer.eval_chars": 20_000,
    "train.depth": 1, "train.max_seq_len": 64, "train.device_batch_size": 4, "train.total_batch_size": 256,
    "train.num_iterations": 10, "train.eval_every": 5, "train.eval_tokens": 1024, "train.sample_every": 0,
    "train.save_every": 0,
    "evaluate.val_tokens": 1024, "evaluate.core_max_per_task": 4, "evaluate.num_unconditioned_samples": 1,
    "evaluate.sample_max_tokens": 4,
    "pipeline.min_bytes_per_token": 1.0,  # a 512-token vocabulary on generated text
}
STAGES = ["tokenizer", "train", "evaluate", "report", "register"]


def materializations(result) -> dict[str, dict]:
    return {e.asset_key.to_user_string(): {k: v.value for k, v in e.event_specific_data.materialization.metadata.items()}
            | {"_tags": e.event_specific_data.materialization.tags}
            for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION" and e.asset_key}


def checks(result) -> dict[tuple[str, str], bool]:
    return {(e.event_specific_data.asset_key.to_user_string(), e.event_specific_data.check_name):
            e.event_specific_data.passed
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    home, uri = base / "dagster", f"sqlite:///{base / 'mlflow.db'}"
    with module_env(base) as mp:
        mirror = base / "mirror"  # what a user's NANOFORGE_MIRROR folder holds
        make_fineweb(mirror, train=(0, 1), val=1822, docs_per_shard=300, manifest=False)
        make_eval_bundle(mirror / "eval_bundle", items_per_task=8)
        mp.setenv("NANOFORGE_MIRROR", str(mirror))
        mp.setenv("NANOFORGE_PIPES_PROGRESS_S", "0")  # every training step reaches Dagster
        project = make_project(base / "project", TINY)
        defs = build_definitions(project)
        instance = dg.DagsterInstance.get()
        job = defs.resolve_job_def("pipeline")
        first = job.execute_in_process(instance=instance, raise_on_error=False)
        second = job.execute_in_process(instance=instance, raise_on_error=False)
        yield SimpleNamespace(project=project, defs=defs, instance=instance, first=first, second=second, uri=uri,
                              base=base, home=home)


def test_the_whole_pipeline_runs_through_dagster_as_dvc_repro_would(e2e):
    failures = [e.event_specific_data.error.to_string()[:3000] for e in e2e.first.all_events
                if e.event_type_value == "STEP_FAILURE"]
    assert e2e.first.success, failures
    root = e2e.project
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)  # every stage of dvc.yaml
    assert (root / "data.dvc").exists() and (root / "reports/report.html").exists()
    # DVC agrees the pipeline is done: nothing changed, and `dvc repro` has nothing left to run
    assert json.loads(run([tool("dvc"), "status", "--json"], root).stdout) == {}
    before = (root / "dvc.lock").read_bytes()
    repro = run([tool("dvc"), "repro"], root)
    assert "Running stage" not in repro.stdout and (root / "dvc.lock").read_bytes() == before
    # each stage read exactly what its upstream wrote (the lock's dep hashes are the upstream out hashes)
    outs = {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}
    for name, stage in lock["stages"].items():
        for dep in stage.get("deps", []):
            if dep["path"] in outs:
                assert dep["md5"] == outs[dep["path"]], (name, dep["path"])
    # every asset check passed, blocking or not
    assert checks(e2e.first) and all(checks(e2e.first).values()), checks(e2e.first)


def test_materializations_carry_the_numbers_people_look_at(e2e):
    m = materializations(e2e.first)
    train = json.loads((e2e.project / "artifacts/train/metrics.json").read_text())
    ev = json.loads((e2e.project / "artifacts/eval/metrics.json").read_text())
    tasks = json.loads((e2e.project / "artifacts/eval/details.json").read_text())["tasks"]  # not a compared number
    t, e = m["train"], m["evaluate"]
    # rounded for people (nanoforge/formats.py); MFU as a percentage, its unit in the name
    assert t["val_bpb"] == round(train["val_bpb"], 4) and t["num_params"] == train["num_params"]
    assert t["tokens_trained"] == train["tokens_trained"] and "tok_per_sec" in t and "mfu_percent" in t
    assert t["loss_plot"].startswith("![loss vs step](data:image/png;base64,")
    assert e["val_bpb"] == pytest.approx(ev["val_bpb"], abs=5e-5) and e["core"] == pytest.approx(ev["core"], abs=5e-5)
    assert all(f"| {task} |" in e["tasks_table"] for task in tasks)  # the CORE task table
    for name in ["download", *STAGES]:
        assert m[name]["mlflow_run_url"].endswith("/runs/" + m[name]["mlflow_run_id"]), name
        assert m[name]["git_commit"] and m[name]["duration_s"] > 0, name
    # data versions are DVC's hashes
    lock = dvc_graph.lock_outs(e2e.project)
    for name in STAGES:
        assert m[name]["_tags"]["dagster/data_version"] == dvc_graph.version_of(lock[name]), name
    data_md5 = yaml.safe_load((e2e.project / "data.dvc").read_text())["outs"][0]["md5"]
    assert m["download"]["_tags"]["dagster/data_version"] == data_md5
    # the shards the download fetched show as materialized partitions
    assert e2e.instance.get_materialized_partitions(dg.AssetKey("fineweb_shards")) == {"0", "1", "1822"}


def test_a_second_run_is_a_fast_noop_with_the_same_metadata(e2e):
    assert e2e.second.success
    first, second = materializations(e2e.first), materializations(e2e.second)
    for name in STAGES:
        assert second[name]["up_to_date"] is True, name
        assert second[name]["_tags"]["dagster/data_version"] == first[name]["_tags"]["dagster/data_version"]
        assert second[name]["duration_s"] < first[name]["duration_s"]
    assert second["download"]["dvc_status"].startswith("unchanged")
    assert second["train"]["val_bpb"] == first["train"]["val_bpb"]
    # (abs: the evaluate stage's own Pipes report is not rounded yet, the files' metadata is)
    assert second["evaluate"]["core"] == pytest.approx(first["evaluate"]["core"], abs=5e-5)
    assert "tasks_table" in second["evaluate"]  # from details.json when the stage is up to date
    assert second["report"]["report_html"] == first["report"]["report_html"]  # the page, even when up to date
    assert second["report"]["val_bpb"] == pytest.approx(first["report"]["val_bpb"], abs=5e-5)  # reports/summary.json


def test_mlflow_groups_the_pipeline_run(e2e):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(e2e.uri)
    exp = client.get_experiment_by_name("nanoforge")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.data.tags["dagster_run_id"]: r for r in runs if r.data.tags.get("stage") == "pipeline"}
    parent = parents[e2e.first.run_id]
    assert parent.info.status == "FINISHED" and e2e.second.run_id in parents
    head = run(["git", "rev-parse", "HEAD"], e2e.project).stdout.strip()
    assert parent.data.tags["git_commit"] == head
    lock_sha = __import__("hashlib").sha256((e2e.project / "dvc.lock").read_bytes()).hexdigest()[:16]
    assert parent.data.tags["dvc.lock_sha256_end"] == lock_sha
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.tags["stage"] for c in children) == sorted(["download", *STAGES])
    assert all(c.info.status == "FINISHED" for c in children)
    # the no-op run re-ran no stage: its only child is download's check that data/ is complete
    again = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[e2e.second.run_id].info.run_id]
    assert [r.data.tags["stage"] for r in again] == ["download"]
    assert again[0].data.metrics["downloaded_shards"] == 0
    assert parents[e2e.second.run_id].data.tags["step.train"].startswith("up to date")


def test_the_model_is_registered_as_champion_and_generates_text(e2e):
    import mlflow
    from mlflow.tracking import MlflowClient

    decision = json.loads((e2e.project / "artifacts/registry/decision.json").read_text())
    assert decision["decision"] == "promoted" and decision["version"] == 1
    client = MlflowClient(e2e.uri)
    champion = client.get_model_version_by_alias("nanoforge-base", "champion")
    ev = json.loads((e2e.project / "artifacts/eval/metrics.json").read_text())
    assert int(champion.version) == 1 and float(champion.tags["val_bpb"]) == pytest.approx(ev["val_bpb"])
    mlflow.set_tracking_uri(e2e.uri)
    model = mlflow.pyfunc.load_model("models:/nanoforge-base@champion")
    out = model.predict(["The cat sees", "In Paris"], params={"max_tokens": 4})
    assert len(out) == 2 and all(isinstance(text, str) for text in out)


def test_champion_moves_only_when_val_bpb_improves(e2e, tmp_path, monkeypatch):
    """A worse candidate is registered but not promoted; a better one takes the alias."""
    from mlflow.tracking import MlflowClient

    from nanoforge import registry
    from stages import register

    work = tmp_path / "work"
    for rel in ("artifacts/model", "artifacts/tokenizer", "artifacts/train", "artifacts/eval"):
        shutil.copytree(e2e.project / rel, work / rel)
    shutil.copy(e2e.project / "params.yaml", work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", e2e.uri)
    metrics_file = work / "artifacts/eval/metrics.json"
    metrics = json.loads(metrics_file.read_text())
    champion_bpb = metrics["val_bpb"]
    client = MlflowClient(e2e.uri)
    for delta, expected, champion_version in ((+0.5, "kept", 1), (-0.1, "promoted", None)):
        metrics_file.write_text(json.dumps({**metrics, "val_bpb": champion_bpb + delta}))
        assert register.main([]) == 0
        decision = json.loads((work / "artifacts/registry/decision.json").read_text())
        assert decision["decision"] == expected, decision
        assert decision["champion_before"]["val_bpb"] == pytest.approx(champion_bpb)
        alias = int(client.get_model_version_by_alias("nanoforge-base", "champion").version)
        assert alias == (champion_version or decision["version"])
        run_ = client.get_run(decision["mlflow_run_id"])
        assert run_.data.tags["decision"] == expected
        assert run_.data.metrics["candidate_val_bpb"] == pytest.approx(champion_bpb + delta)
        assert run_.data.metrics["champion_val_bpb"] == pytest.approx(champion_bpb)
    # the decision rule itself, at its edges
    assert registry.decide({"val_bpb": math.nan}, None)[0] is False
    assert registry.decide({"val_bpb": 1.0}, None)[0] is True
    assert registry.decide({"val_bpb": 1.0, "core": 0.3}, {"version": 2, "val_bpb": 1.0, "core": 0.2})[0] is True
    assert registry.decide({"val_bpb": 1.0, "core": 0.1}, {"version": 2, "val_bpb": 1.0, "core": 0.2})[0] is False


def test_training_reports_every_step_to_dagster(e2e):
    """Each step's line and numbers come over Pipes (observations of `train`, lines in the run log).
    That they arrive while the stage runs is test_pipelines.py's progress test (a stage that waits)."""
    entries = [e for e in e2e.instance.all_logs(e2e.first.run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION)
               if e.dagster_event.asset_key == dg.AssetKey("train")]
    numbers = [{k: v.value for k, v in e.dagster_event.event_specific_data.asset_observation.metadata.items()}
               for e in entries]
    assert [n["step"] for n in numbers] == list(range(1, TINY["train.num_iterations"] + 1))
    assert all(n["loss"] > 0 and n["tok_per_sec"] > 0 and "eta" in n and n["num_iterations"] == 10 for n in numbers)
    lines = [e.user_message for e in e2e.instance.all_logs(e2e.first.run_id) if e.step_key == "train"
             and e.user_message.startswith("step 00001/00010 | loss_ema ")]
    assert lines and "| tok/s " in lines[0] and "| eta " in lines[0]  # the stage's own line, in the run log


def test_a_train_config_error_is_the_failure_message_and_the_alert(e2e):
    params = e2e.project / "params.yaml"
    original = params.read_text()
    try:
        tree = yaml.safe_load(original)
        tree["train"]["device_batch_size"] = 3  # 3 x 64 tokens does not divide total_batch_size 256
        params.write_text(dump_yaml(tree))  # keeps sweep.budgets quoted
        defs = build_definitions(e2e.project)
        result = defs.resolve_job_def("pipeline").execute_in_process(
            instance=e2e.instance, asset_selection=[dg.AssetKey("train")], raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        reason = failure.event_specific_data.user_failure_data.metadata["stage_error"].value
        # the stage's own words under torchrun (its whole message), not torchrun's ChildFailedError
        assert reason.startswith("params.yaml: invalid config\ntrain.total_batch_size=256 is not a multiple of "
                                 "train.device_batch_size (3)"), reason
        assert "ChildFailedError" not in reason and "Traceback" not in reason
        assert failure.event_specific_data.user_failure_data.description.startswith(reason + "\n\n")
        context = dg.build_run_status_sensor_context(
            sensor_name="alert_on_failure", dagster_instance=e2e.instance, dagster_run=result.dagster_run,
            dagster_event=result.get_run_failure_event()).for_run_failure()
        defs.get_sensor_def("alert_on_failure")(context)
    finally:
        params.write_text(original)
    alert = json.loads((e2e.home / "alerts.jsonl").read_text().splitlines()[-1])
    assert alert["failed_steps"] == ["train"] and alert["message"] == reason
    # (DVC removed train's outputs before running it, as `dvc repro` does: keep this test last in the file)
