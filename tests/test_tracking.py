"""MLflow tracking against a real SQLite store: params, batched metrics, tags, failures, rank 0 only."""

import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from nanoforge import tracking
from nanoforge.tracking import stage_run


def client():
    return MlflowClient(tracking.tracking_uri())


def only_run(stage):
    exp = client().get_experiment_by_name(tracking.EXPERIMENT)
    runs = client().search_runs([exp.experiment_id], f"tags.stage = '{stage}'")
    assert len(runs) == 1
    return runs[0]


def test_run_logs_params_metrics_tags_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.txt").write_text("hello")
    with stage_run("tokenizer", {"vocab_size": 512, "nested": {"a": 1}}) as run:
        for step in range(30):
            run.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.5}, step=step)
        run.log_artifact(tmp_path / "out.txt")
        run_id = run.run_id
    r = only_run("tokenizer")
    assert r.info.run_id == run_id and r.info.status == "FINISHED"
    assert r.data.params == {"vocab_size": "512", "nested.a": "1"}
    history = client().get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(30))
    assert history[-1].value == pytest.approx(1 / 30)
    assert r.data.tags["stage"] == "tokenizer" and r.data.tags["host"]
    assert "git_commit" in r.data.tags
    artifacts = [a.path for a in client().list_artifacts(run_id)]
    assert artifacts == ["out.txt"]
    # artifacts live beside the SQLite file
    db_dir = os.path.dirname(tracking.tracking_uri()[len("sqlite:///"):])
    assert r.info.artifact_uri.startswith(f"file://{db_dir}/mlartifacts/")


def test_metrics_are_batched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    with stage_run("train", {}) as run:
        real = run._client.log_batch
        run._client.log_batch = lambda *a, **k: (calls.append(len(k.get("metrics", ()))), real(*a, **k))[1]
        for step in range(200):
            run.log_metrics({"loss": 1.0, "tok_per_sec": 2.0, "mfu": 0.1}, step=step)
    # 600 metrics in at most a couple of calls, not 600
    assert sum(calls) == 600 and len(calls) <= 3


def test_failure_marks_run_failed_with_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("train", {}):
            raise RuntimeError("boom")
    r = only_run("train")
    assert r.info.status == "FAILED"
    assert r.data.tags["error"] == "RuntimeError: boom"


def test_parent_run_and_lineage_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  tokenizer:\n    cmd: x\n    deps:\n    - data/fineweb\n    - artifacts/a.txt\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  up:\n    cmd: y\n    outs:\n    - path: artifacts/a.txt\n      md5: fff\n")
    parent = client().create_run(tracking._experiment_id(client())).info.run_id
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    with stage_run("tokenizer", {}):
        pass
    tags = only_run("tokenizer").data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags["dvc.data_dvc_md5"] == "abc123.dir"
    assert tags["input.data/fineweb"] == "data@abc123.dir"
    assert tags["input.artifacts/a.txt"] == "fff"
    assert len(tags["dvc.lock_sha256"]) == 16


def test_only_rank0_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    with stage_run("train", {"a": 1}) as run:
        assert not run.enabled
        run.log_metrics({"loss": 1.0}, step=0)
    assert client().get_experiment_by_name(tracking.EXPERIMENT) is None


def test_unreachable_server_keeps_the_run_offline_and_replay_sends_it(tmp_path, monkeypatch, caplog):
    # MLflow down at start: the stage goes on, its params/metrics/tags land in a local file named
    # in one warning, and `python -m nanoforge.tracking replay` sends them once the server is back
    monkeypatch.chdir(tmp_path)
    store = os.environ["MLFLOW_TRACKING_URI"]  # the real SQLite store that stands in for the server "back"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    (tmp_path / "out.txt").write_text("hello")
    with stage_run("train", {"a": 1}) as run:
        assert not run.enabled and run.offline_file is not None
        for step in range(700):  # more than one flush's worth
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        run.set_tags({"note": "x"})
        run.log_artifact(tmp_path / "out.txt")
    [kept] = (tmp_path / tracking.OFFLINE_DIR).glob("*.jsonl")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1, warned
    assert str(kept) in warned[0] and "MLFLOW_TRACKING_URI=http://127.0.0.1:9" in warned[0]
    assert tracking.REPLAY_CMD in warned[0]
    # still down: replay says so and keeps the file
    assert tracking.main(["replay"]) == 1 and kept.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert tracking.main(["replay"]) == 0
    assert not kept.exists() and (tmp_path / tracking.OFFLINE_DIR / "sent" / kept.name).exists()
    r = only_run("train")
    assert r.info.status == "FINISHED" and r.data.params == {"a": "1"} and r.data.tags["note"] == "x"
    assert [m.step for m in client().get_metric_history(r.info.run_id, "loss")] == list(range(700))
    assert [a.path for a in client().list_artifacts(r.info.run_id)] == ["out.txt"]
    assert tracking.main(["replay"]) == 0 and len(client().search_runs(
        [r.info.experiment_id], "tags.stage = 'train'")) == 1  # nothing left to send twice


def test_tracking_error_mid_run_keeps_the_rest_offline(tmp_path, monkeypatch, caplog):
    # a call that fails mid-run: the stage goes on, nothing from that call on is lost, and replay
    # continues the same MLflow run
    monkeypatch.chdir(tmp_path)
    with stage_run("train", {}) as run:
        run.log_metrics({"loss": 1.0}, step=0)
        run.flush()
        real = run._client.log_batch

        def broken(*a, **k):
            raise ConnectionError("server went away")
        run._client.log_batch = broken
        run.log_metrics({"loss": 2.0}, step=1)
        run.flush()
        assert not run.enabled and run.offline_file is not None
        run.log_metrics({"loss": 3.0}, step=2)
        run_id = run.run_id
    assert "server went away" in caplog.text and str(run.offline_file) in caplog.text
    assert client().get_run(run_id).info.status == "RUNNING"  # its end is in the file too
    del real
    assert tracking.main(["replay"]) == 0
    assert [(m.step, m.value) for m in client().get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert only_run("train").info.status == "FINISHED"


def test_experiment_opens_on_training_runs_and_run_urls_are_links(tmp_path, monkeypatch):
    # MLflow 3 opens an experiment without `mlflow.experimentKind` on its GenAI overview ("No data
    # available") and calls train runs "Evaluations"; a store made before the tag gets it on next use
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_PORT", "5123")
    old = client().create_experiment(tracking.EXPERIMENT)  # as an older version of the stages made it
    with stage_run("train", {}) as run:
        pass
    exp = client().get_experiment(old)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # a clickable URL into `make mlflow` (MLFLOW_PORT), not a shell command
    assert run.url == f"http://127.0.0.1:5123/#/experiments/{old}/runs/{run.run_id}"
    assert tracking.link_for_run(run.run_id) == run.url
    assert tracking.link_for_run("0123456789abcdef") is None  # no such run: no made-up link


def test_run_stopped_on_purpose_is_killed_not_failed(tmp_path, monkeypatch):
    # the train stage's Preempted (SIGTERM: checkpoint saved, exit 143) is a KeyboardInterrupt
    from nanoforge.training.loop import Preempted

    monkeypatch.chdir(tmp_path)
    with pytest.raises(Preempted):
        with stage_run("train", {}):
            raise Preempted("stopped by signal at step 3/10; checkpoint saved")
    assert only_run("train").info.status == "KILLED"

