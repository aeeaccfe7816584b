"""The evaluate stage end to end: a real tiny GPT saved by stages.checkpoint, real shards,
tokenizer and bundle; `python -m stages.evaluate` and `torchrun` with 2 gloo processes;
bad inputs refused before any work.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run, tool
from tests.datagen import make_documents, make_eval_bundle, make_fineweb

SEQ = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _make_inputs(root: Path) -> Path:
    """data/ and artifacts/{tokenizer,model} as the upstream stages would leave them."""
    from nanoforge.tokenizer.bpe import train_bpe
    from nanoforge.training.checkpoint import save_model
    from nanoforge.model.gpt import GPTConfig, build_model

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    make_fineweb(root / "data/fineweb", docs_per_shard=120, row_group_size=32)
    make_eval_bundle(root / "data/eval_bundle", items_per_task=9)
    tok = train_bpe(make_documents(200, seed=0), vocab_size=300)
    tok.save(root / "artifacts/tokenizer")
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=SEQ, vocab_size=tok.vocab_size, n_layer=2, n_head=1, n_kv_head=1, n_embd=32))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # an opinionated untrained model, so scores are not all ties
    save_model(model, {"step": 7, "mlflow_run_id": "train-run-123"}, root / "artifacts/model")
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return _make_inputs(tmp_path_factory.mktemp("evaluate") / "project")


def _copy(inputs: Path, dest: Path) -> Path:
    shutil.copytree(inputs, dest)
    return dest


SETS = ["--set", "dtype=float32", "--set", "val_tokens=1024", "--set", "sample_max_tokens=6",
        "--set", "num_unconditioned_samples=2", "--set", "device=cpu"]


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory):
    """One plain `python -m stages.evaluate` run, with its own MLflow store."""
    project = _copy(inputs, tmp_path_factory.mktemp("single") / "p")
    uri = f"sqlite:///{project.parent / 'mlflow.db'}"
    proc = run([tool("python"), "-m", "stages.evaluate", *SETS], project, env={"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    return project, proc, uri


def test_stage_end_to_end(single):
    from mlflow.tracking import MlflowClient

    project, proc, uri = single
    # metrics.json: only the numbers people compare (dvc metrics show stays narrow); the rest in details.json
    metrics = json.loads((project / "artifacts/eval/metrics.json").read_text())
    assert set(metrics) == {"val_bpb", "val_bpb_tokens", "train_bpb", "train_bpb_tokens", "core"}
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    details = json.loads((project / "artifacts/eval/details.json").read_text())
    for key in ("tasks", "notes", "skipped_tasks", "eval_seconds", "core_num_tasks", "device", "mlflow_run_id"):
        assert key in details, key
    metrics.update(details)
    assert set(metrics["tasks"]) == {"toy_mc", "toy_schema", "toy_lm"}
    for task in metrics["tasks"].values():
        assert set(task) >= {"accuracy", "centered", "items", "seconds"} and task["items"] == 9
    with open(project / "artifacts/eval/core.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == ["toy_mc", "toy_schema", "toy_lm"]
    assert metrics["core"] == pytest.approx(sum(float(r["centered"]) for r in rows) / 3, abs=1e-5)
    assert float(rows[0]["random_baseline"]) == 25.0

    # BPB is over the first val_tokens of the val shard: recompute it here from the same files
    from nanoforge.evaluation.bpb import evaluate_bpb, rank_batches, shard_rows
    from nanoforge.tokenizer.bpe import load_tokenizer
    from nanoforge.training.checkpoint import load_model
    from nanoforge.runtime import Runtime

    cpu = Runtime(torch.device("cpu"), torch.float32)
    tok = load_tokenizer(project / "artifacts/tokenizer")
    model, _ = load_model(project / "artifacts/model")
    rows_val = shard_rows([project / "data/fineweb/shard_01822.parquet"], tok, SEQ, 1024)
    assert metrics["val_bpb"] == pytest.approx(evaluate_bpb(model, rank_batches(rows_val, 8, cpu), tok.token_bytes, cpu), rel=1e-6)
    assert metrics["val_bpb_tokens"] == 1024 and metrics["train_bpb_tokens"] == 1024  # each BPB beside its budget
    assert metrics["val_bpb"] != metrics["train_bpb"]

    samples = json.loads((project / "artifacts/eval/samples.json").read_text())
    assert [s["prompt"] for s in samples["conditional"]][0] == "The capital of France is"
    assert len(samples["conditional"]) == 5 and len(samples["unconditioned"]) == 2

    client = MlflowClient(tracking_uri=uri)
    run_ = client.get_run(metrics["mlflow_run_id"])
    assert run_.data.metrics["core"] == pytest.approx(metrics["core"])
    assert run_.data.metrics["val_bpb"] == pytest.approx(metrics["val_bpb"])
    assert run_.data.metrics["val_bpb_tokens"] == 1024
    assert "core.toy_mc.centered" in run_.data.metrics
    assert run_.data.tags["model.train_run_id"] == "train-run-123"
    assert {a.path for a in client.list_artifacts(run_.info.run_id, "eval")} == {
        "eval/metrics.json", "eval/details.json", "eval/core.csv", "eval/samples.json"}
    assert "CORE" in proc.stderr


def _eval_outputs(project: Path) -> dict:
    """metrics.json and details.json as one dict."""
    return {**json.loads((project / "artifacts/eval/details.json").read_text()),
            **json.loads((project / "artifacts/eval/metrics.json").read_text())}


def test_torchrun_two_processes_match_one(inputs, single, tmp_path):
    one = single[0]
    two = _copy(inputs, tmp_path / "two")
    # tracking off: test_stage_end_to_end checks MLflow; this one checks the ranks agree
    run([tool("torchrun"), "--standalone", "--nproc_per_node=2", "-m", "stages.evaluate", *SETS], two,
        env={"OMP_NUM_THREADS": "1", "NANOFORGE_TRACKING": "off"})
    a, b = _eval_outputs(one), _eval_outputs(two)
    assert b["world_size"] == 2
    # items split i % 2 (9 per task: unequal shares), per-item results all-reduced: the same counts exactly
    assert {k: v["correct"] for k, v in a["tasks"].items()} == {k: v["correct"] for k, v in b["tasks"].items()}
    assert sum(v["correct"] for v in a["tasks"].values()) > 0
    assert a["core"] == b["core"]
    assert a["val_bpb"] == pytest.approx(b["val_bpb"], rel=1e-6)
    assert a["train_bpb"] == pytest.approx(b["train_bpb"], rel=1e-6)
    assert json.loads((one / "artifacts/eval/samples.json").read_text())["conditional"] == \
        json.loads((two / "artifacts/eval/samples.json").read_text())["conditional"]


# ---------------------------------------------------------------------------
# bad inputs: exit 2 with the reason, nothing written, no MLflow run

def _main_in(project: Path, monkeypatch, *args: str) -> int:
    from stages.evaluate import main

    monkeypatch.chdir(project)
    return main(list(args))


def _no_outputs(project: Path) -> bool:
    return not (project / "artifacts/eval").exists()


def test_missing_model(inputs, tmp_path, monkeypatch, capsys):
    project = _copy(inputs, tmp_path / "p")
    (project / "artifacts/model/model.safetensors").unlink()
    assert _main_in(project, monkeypatch) == 2
    assert "model.safetensors: missing; train a model first" in capsys.readouterr().err
    assert _no_outputs(project)


def test_damaged_model_is_one_line_before_any_work(inputs, tmp_path, monkeypatch, capsys):
    # issue 18.9: a truncated artifacts/model surfaced as a SafetensorError traceback
    project = _copy(inputs, tmp_path / "p")
    weights = project / "artifacts/model/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert _main_in(project, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "dvc checkout artifacts/model" in err and "Traceback" not in err
    assert _no_outputs(project)


def test_malformed_bundle_line_fails_before_the_model_loads(inputs, tmp_path, monkeypatch, capsys):
    project = _copy(inputs, tmp_path / "p")
    path = project / "data/eval_bundle/eval_data/toy/toy_lm.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[4] = '{"context": "unterminated\n'
    path.write_text("".join(lines))
    import nanoforge.training.checkpoint

    monkeypatch.setattr(nanoforge.training.checkpoint, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    assert _main_in(project, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "toy_lm.jsonl:5: malformed JSON" in err and "skip_bad_tasks" in err
    assert _no_outputs(project)


def test_bad_task_skipped_when_asked(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")
    project = _copy(inputs, tmp_path / "p")
    (project / "data/eval_bundle/eval_data/toy/toy_schema.jsonl").unlink()
    assert _main_in(project, monkeypatch, *SETS, "--set", "skip_bad_tasks=true") == 0
    metrics = json.loads((project / "artifacts/eval/details.json").read_text())
    assert set(metrics["tasks"]) == {"toy_mc", "toy_lm"} and "toy_schema" in metrics["skipped_tasks"]
    assert metrics["core_num_tasks"] == 2


def test_tokenizer_from_another_run(inputs, tmp_path, monkeypatch, capsys):
    from nanoforge.tokenizer.bpe import train_bpe

    project = _copy(inputs, tmp_path / "p")
    train_bpe(make_documents(50, seed=1), vocab_size=290).save(project / "artifacts/tokenizer")
    assert _main_in(project, monkeypatch) == 2
    assert "vocabulary of 300 but the tokenizer" in capsys.readouterr().err


def test_bad_params_and_unknown_task(inputs, tmp_path, monkeypatch, capsys):
    project = _copy(inputs, tmp_path / "p")
    assert _main_in(project, monkeypatch, "--set", "core_max_per_task=0") == 2
    assert "core_max_per_task" in capsys.readouterr().err
    assert _main_in(project, monkeypatch, "--set", "core_tasks=[hellaswag]") == 2
    assert "no task named 'hellaswag'" in capsys.readouterr().err
    assert _no_outputs(project)


def test_missing_manifest(inputs, tmp_path, monkeypatch, capsys):
    project = _copy(inputs, tmp_path / "p")
    (project / "data/fineweb/MANIFEST.json").unlink()
    assert _main_in(project, monkeypatch) == 2
    assert "no shard manifest" in capsys.readouterr().err


def test_markdown_task_table_for_dagster():
    from nanoforge.evaluation.evaluate import markdown_table

    rows = [{"task": "arc_easy", "accuracy": 0.5, "centered": 1 / 3, "items": 10, "seconds": 1.25},
            {"task": "copa", "accuracy": 0.5, "centered": 0.0, "items": 4, "seconds": 0.5}]
    table = markdown_table(rows, 1 / 6)
    assert "| arc_easy | 0.5000 | +0.3333 | 10 | 1.2 |" in table and "| copa |" in table
    assert table.splitlines()[-1] == "| **CORE** | | **0.1667** | | |"


@pytest.mark.slow
@pytest.mark.cluster  # ~40 s of real dvc repro on a copy: make test-slurm, to keep make test under 10 minutes
def test_changing_only_evaluate_params_does_not_retrain(tiny_pipeline, tmp_path):
    """DVC tracks exactly the params each stage reads: an evaluate knob re-runs evaluate and
    what follows it, never the tokenizer or training."""
    import yaml

    from tests.conftest import copy_project

    project, env = tiny_pipeline
    copy = copy_project(project, tmp_path / "copy")
    env = {**env, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}  # this test's own store
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["evaluate"]["core_max_per_task"] = 3
    from nanoforge.presets import dump_yaml  # keeps sweep.budgets' '3e12' quoted, as params.yaml has it

    (copy / "params.yaml").write_text(dump_yaml(params))
    model = (copy / "artifacts/model/model.safetensors").read_bytes()
    train_metrics = (copy / "artifacts/train/metrics.json").read_text()
    before = json.loads((copy / "artifacts/eval/details.json").read_text())

    status = run([tool("dvc"), "status", "--json"], copy, env=env).stdout
    assert set(json.loads(status)) == {"evaluate"}, status  # report/register follow through their deps
    out = run([tool("dvc"), "repro"], copy, env=env, timeout=300).stdout
    assert "Stage 'tokenizer' didn't change, skipping" in out, out
    assert "Stage 'train' didn't change, skipping" in out, out
    assert "Running stage 'evaluate'" in out, out
    assert (copy / "artifacts/model/model.safetensors").read_bytes() == model
    assert (copy / "artifacts/train/metrics.json").read_text() == train_metrics
    after = json.loads((copy / "artifacts/eval/details.json").read_text())
    assert {t["items"] for t in after["tasks"].values()} == {3} != {t["items"] for t in before["tasks"].values()}
