"""The stage side of Dagster Pipes (nanoforge/pipes.py) against the real dagster-pipes protocol, and
the orchestrator-side helpers that read what stages say: their error line, the MLflow link.

A stage under Pipes writes JSON messages to the file Dagster names in DAGSTER_PIPES_MESSAGES;
here each test is that Dagster: it names a file, runs a real Python process, and reads the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dagster_pipes import encode_param

from pipelines.defs.resources import mlflow_ui_url
from pipelines.dvc_exec import error_from_output
from tests.conftest import REPO

CONTEXT = {"asset_keys": ["train"], "code_version_by_asset_key": None, "provenance_by_asset_key": None,
           "partition_key": None, "partition_key_range": None, "partition_time_window": None, "run_id": "r1",
           "job_name": "pipeline", "retry_number": 0, "extras": {}}


def run_under_pipes(tmp_path: Path, code: str, env: dict[str, str] | None = None, pipes: bool = True):
    """Run `code` in a fresh interpreter as a Pipes process; returns (messages, completed process)."""
    messages = tmp_path / "messages.jsonl"
    full_env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **(env or {})}
    if pipes:
        full_env["DAGSTER_PIPES_CONTEXT"] = encode_param({"data": CONTEXT})
        full_env["DAGSTER_PIPES_MESSAGES"] = encode_param({"path": str(messages)})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=60)
    sent = [json.loads(line) for line in messages.read_text().splitlines()] if messages.exists() else []
    return sent, proc


STAGE = """
    from nanoforge import pipes
    for i in range(1, 6):  # five steps in well under the interval: the first and the last go
        print(pipes.progress(f"step {i}/5 | loss 2.5", {"step": i, "loss": 2.5, "mfu": None, "bad": float("nan")},
                             last=i == 5))
    print(pipes.report({"val_bpb": 1.25}))
    print(pipes.error("train.depth=0 is below 1: set train.depth in params.yaml"))
"""


def test_one_connection_per_process_carries_progress_report_and_error(tmp_path):
    sent, proc = run_under_pipes(tmp_path, STAGE, {"NANOFORGE_PIPES_PROGRESS_S": "3600"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "False", "False", "True", "True", "True"]
    methods = [m["method"] for m in sent]
    # one `opened` and one `closed` (at exit): Pipes refuses messages after `closed`
    assert methods == ["opened", "report_custom_message", "report_custom_message", "report_asset_materialization",
                       "report_custom_message", "closed"]
    first, last, error = (m["params"]["payload"] for m in sent if m["method"] == "report_custom_message")
    assert first == {"nanoforge": "progress", "line": "step 1/5 | loss 2.5",
                     "numbers": {"step": 1, "loss": 2.5, "mfu": None, "bad": "nan"}}  # JSON has no NaN
    assert last["numbers"]["step"] == 5
    assert error == {"nanoforge": "error", "message": "train.depth=0 is below 1: set train.depth in params.yaml"}
    assert "error: train.depth=0 is below 1" in proc.stderr  # still printed, for DVC's output and people
    report = next(m for m in sent if m["method"] == "report_asset_materialization")
    assert report["params"]["metadata"]["val_bpb"]["raw_value"] == 1.25


def test_every_step_goes_when_the_interval_is_zero(tmp_path):
    sent, proc = run_under_pipes(tmp_path, STAGE, {"NANOFORGE_PIPES_PROGRESS_S": "0"})
    steps = [m["params"]["payload"]["numbers"]["step"] for m in sent
             if m["method"] == "report_custom_message" and m["params"]["payload"]["nanoforge"] == "progress"]
    assert steps == [1, 2, 3, 4, 5]


def test_a_bad_interval_is_a_warning_in_the_stage_and_an_error_naming_it_in_dagster(tmp_path, monkeypatch):
    from nanoforge import pipes

    sent, proc = run_under_pipes(tmp_path, STAGE, {"NANOFORGE_PIPES_PROGRESS_S": "often"})
    assert proc.returncode == 0 and "NANOFORGE_PIPES_PROGRESS_S='often' is not a number" in proc.stderr
    assert sum(1 for m in sent if m["method"] == "report_custom_message") == 3  # the default: first, last, error
    monkeypatch.setenv("NANOFORGE_PIPES_PROGRESS_S", "-1")
    with pytest.raises(ValueError, match=r"NANOFORGE_PIPES_PROGRESS_S='-1' is not a number of seconds >= 0"):
        pipes.progress_interval()  # what DvcResource.run checks before it starts a stage


def test_outside_pipes_and_on_other_ranks_nothing_is_sent(tmp_path):
    sent, proc = run_under_pipes(tmp_path, STAGE, pipes=False)
    assert sent == [] and proc.stdout.split() == ["False"] * 7 and "error: train.depth=0" in proc.stderr
    assert "not launched by a Dagster" not in proc.stderr  # no dagster-pipes warning either
    sent, proc = run_under_pipes(tmp_path, STAGE, {"RANK": "1"})
    assert sent == [] and proc.stdout.split() == ["False"] * 7


TORCHRUN_FAILURE = """\
Running stage 'train':
> torchrun --standalone --nproc_per_node=1 -m stages.train
[train] resolved config:
  depth: 4
error: cannot resume artifacts/checkpoints/step_000100: train.depth changed (4 -> 6); NANOFORGE_RESUME=fresh starts over
E1203 12:00:00.000000 1234 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 2) local_rank: 0
error: 1 worker(s) failed, first rank 0 (exit 2); its error is printed above
Traceback (most recent call last):
  File "/venv/bin/torchrun", line 8, in <module>
    sys.exit(main())
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
stages.train FAILED
------------------------------------------------------------
ERROR: failed to reproduce 'train': failed to run: torchrun --standalone --nproc_per_node=1 -m stages.train, exited with 1
"""


def test_the_stage_error_is_found_below_torchrun_and_dvc():
    assert error_from_output(TORCHRUN_FAILURE) == (
        "cannot resume artifacts/checkpoints/step_000100: train.depth changed (4 -> 6); NANOFORGE_RESUME=fresh starts over")
    crash = "Traceback (most recent call last):\n  File \"synth.py\", line 3\nTypeError: can't multiply sequence by str\n" \
            + "\n".join(line for line in TORCHRUN_FAILURE.splitlines() if not line.startswith("error: "))
    assert "ChildFailedError" in crash
    assert error_from_output(crash) == "TypeError: can't multiply sequence by str"  # not ChildFailedError
    assert error_from_output("ERROR: failed to reproduce 'x': output 'out/x' does not exist\n") == (
        "failed to reproduce 'x': output 'out/x' does not exist")
    assert error_from_output("error (rank 1): shards missing\n") == "shards missing"
    several = "error: params.yaml: invalid config\n  train.depth=0 is below 1\n  train.seed='x' is not an integer\nE1203 x\n"
    assert error_from_output(several) == "params.yaml: invalid config\ntrain.depth=0 is below 1\ntrain.seed='x' is not an integer"
    assert error_from_output("all fine\n") is None


def test_mlflow_links_follow_the_tracking_server_or_mlflow_port():
    assert mlflow_ui_url({"MLFLOW_TRACKING_URI": "https://mlflow.example.org/", "MLFLOW_PORT": "6000"}) == \
        "https://mlflow.example.org"
    assert mlflow_ui_url({"MLFLOW_TRACKING_URI": "sqlite:///x/mlflow.db"}) == "http://127.0.0.1:5000"
    assert mlflow_ui_url({"MLFLOW_TRACKING_URI": "sqlite:///x/mlflow.db", "MLFLOW_PORT": "5001"}) == "http://127.0.0.1:5001"
    with pytest.raises(ValueError, match=r"MLFLOW_PORT='50o1' is not a port number \(1-65535\)"):
        mlflow_ui_url({"MLFLOW_PORT": "50o1"})


def test_dagster_links_use_mlflow_port(tmp_path, monkeypatch):
    """The run link on a materialization points at `make mlflow`'s port."""
    from mlflow.tracking import MlflowClient

    from pipelines.definitions import build_definitions  # (importing it loads the repo's definitions)
    from pipelines.defs.resources import MlflowResource

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("links")).info.run_id
    monkeypatch.setenv("MLFLOW_PORT", "5001")
    link = MlflowResource(root=str(tmp_path), tracking_uri=uri).run_link(run_id)["mlflow_run_url"].value
    assert link.startswith("http://127.0.0.1:5001/#/experiments/") and link.endswith(f"/runs/{run_id}")
    monkeypatch.setenv("MLFLOW_PORT", "x")
    with pytest.raises(ValueError, match="MLFLOW_PORT='x'"):  # at load, naming the setting
        build_definitions(REPO)
