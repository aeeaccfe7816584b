"""What people read: one format per quantity in every human view, and metrics files that hold only compared numbers.

The report, the Dagster metadata, the demo table and the train stage's Pipes report all
format through nanoforge/formats.py; machine files keep full precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanoforge import pipes
from nanoforge.formats import budget, for_dagster, human, rounded
from tests.conftest import REPO

MFU, BPB = 0.006943, 2.335675222876832  # as the issue saw them: "0.5%", "0.6943%", 0.006943; 2.335675222876832


def test_one_format_per_quantity():
    assert human("mfu", MFU) == "0.69%" and human("mfu", 0.3123) == "31.23%" and human("mfu", None) == "n/a"
    assert human("val_bpb", BPB) == "2.3357" and human("min_val_bpb", 1.0) == "1.0000" and human("core", 0.07) == "0.0700"
    assert human("final_loss", 3.79712) == "3.7971" and human("tok_per_sec", 8123.456) == "8,123"
    assert human("train_seconds", 3725) == "1h 02m 05s" and human("cost_usd", 0.0517) == "$0.0517"
    assert human("num_params", 7_340_032) == "7.340 M" and human("val_bpb_tokens", 65536) == "65,536"
    assert human("decision", "kept") == "kept" and human("mfu_percent", 0.69) == "0.69%"
    assert budget(65536, "evaluate.val_tokens") == "65,536 tokens, evaluate.val_tokens"
    assert budget(None, "train.eval_tokens") == "train.eval_tokens"


def test_dagster_numbers_are_rounded_like_the_text_and_mfu_states_its_unit():
    assert for_dagster("val_bpb", BPB) == ("val_bpb", 2.3357)
    assert for_dagster("mfu", MFU) == ("mfu_percent", 0.69)
    assert for_dagster("tok_per_sec", 8123.456) == ("tok_per_sec", 8123)
    assert for_dagster("num_params", 7_340_032) == ("num_params", 7_340_032)
    assert for_dagster("val_bytes_per_token", 4.123456) == ("val_bytes_per_token", 4.123)
    assert for_dagster("roundtrip_ok", True) == ("roundtrip_ok", True) and for_dagster("x", "text") == ("x", "text")
    assert rounded("eval_seconds", 95.04321) == 95.0


def test_report_and_demo_use_the_same_formatter():
    from nanoforge.reporting.report import fmt_metric
    from pipelines.demo import numbers

    assert fmt_metric("mfu", MFU) == human("mfu", MFU) == "0.69%"
    line = numbers("train", {"val_bpb": 2.3357, "val_bpb_tokens": 32768, "tok_per_sec": 8123, "mfu_percent": 0.69})
    assert line == "val_bpb 2.3357 (32,768 tokens), tok_per_sec 8,123, mfu 0.69%"
    assert numbers("evaluate", {"val_bpb": 2.3711, "val_bpb_tokens": 65536, "core": 0.0737}) == \
        "val_bpb 2.3711 (65,536 tokens), core 0.0737"


def test_an_up_to_date_register_does_not_claim_it_promoted():
    # a second demo: register is up to date, nothing was registered; the old "promoted" must not show
    from pipelines.demo import numbers

    assert "promoted" not in numbers("register", {"up_to_date": True, "dvc_status": "up to date"})
    assert numbers("register", {"up_to_date": True}) == "no new model version (the model and its scores are unchanged)"
    assert numbers("register", {"up_to_date": False, "decision": "promoted", "model_version": 2}) == \
        "decision promoted, model_version 2"


# ---------------------------------------------------------------------------
# Dagster metadata read from the files

def test_metrics_metadata_is_rounded_for_people(tmp_path):
    import dagster as dg

    from pipelines.defs.metadata import humanize, metrics_metadata

    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"val_bpb": BPB, "mfu": MFU, "tok_per_sec": 8123.456, "num_params": 7_340_032}))
    meta = {k: v.value for k, v in metrics_metadata(path).items()}
    assert meta == {"val_bpb": 2.3357, "mfu_percent": 0.69, "tok_per_sec": 8123, "num_params": 7_340_032}
    assert json.loads(path.read_text())["val_bpb"] == BPB  # the file keeps full precision
    # what a stage reports over Pipes gets the same treatment
    reported = {"val_bpb": dg.MetadataValue.float(BPB), "mfu": dg.MetadataValue.float(MFU),
                "device": dg.MetadataValue.text("cpu float32")}
    assert humanize(reported) == {"val_bpb": 2.3357, "mfu_percent": 0.69, "device": reported["device"]}


def test_an_up_to_date_report_still_has_its_page_and_headline_numbers(tmp_path):
    # the second demo: the report stage is skipped, so nothing comes over Pipes; the files must say it all
    from pipelines.defs.metadata import stage_metadata
    from pipelines.dvc_graph import Out, Stage

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/report.html").write_text("<!DOCTYPE html>")
    (tmp_path / "reports/summary.json").write_text(json.dumps({"val_bpb": BPB, "core": 0.0737, "tok_per_sec": 8123.4,
                                                               "mfu": MFU, "cost_usd": 0.0517}))
    stage = Stage("report", "python -m stages.report", (), (), (
        Out("reports/report.md"), Out("reports/report.html"), Out("reports/figures"),
        Out("reports/summary.json", kind="metric", cache=False)))
    meta = {k: v.value for k, v in stage_metadata(stage, tmp_path).items()}
    assert meta["report_html"] == str((tmp_path / "reports/report.html").resolve())
    assert meta["val_bpb"] == 2.3357 and meta["core"] == 0.0737 and meta["mfu_percent"] == 0.69
    assert meta["cost_usd"] == 0.0517 and meta["tok_per_sec"] == 8123


def test_dvc_yaml_declares_the_report_summary_as_metrics_and_details_as_plain_outs():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

    def declared(stage, kind):
        return {next(iter(e)) if isinstance(e, dict) else e for e in stages[stage].get(kind) or []}

    assert declared("report", "metrics") == {"reports/summary.json"}
    assert "reports" not in declared("report", "outs")  # a folder output would overlap summary.json
    assert "artifacts/train/details.json" in declared("train", "outs")
    assert "artifacts/eval/details.json" in declared("evaluate", "outs")
    assert declared("register", "metrics") == set() and "artifacts/registry/decision.json" in declared("register", "outs")


# ---------------------------------------------------------------------------
# the train stage's files and its Pipes report

def _result(tmp_path: Path):
    from nanoforge.model.gpt import GPTConfig, build_model
    from nanoforge.training.loop import TrainResult

    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=16))
    summary = {"num_params": 12_345, "num_embedding_params": 1024, "num_flops_per_token": 7.4e4, "tokens_trained": 4096,
               "steps": 4, "num_iterations": 4, "horizon_source": "num_iterations", "world_size": 1,
               "grad_accum_steps": 1, "total_batch_size": 1024, "depth": 1, "final_loss": 3.797123456,
               "val_bpb": BPB, "min_val_bpb": 2.3, "val_bpb_tokens": 32_768, "tok_per_sec": 8123.456, "mfu": MFU,
               "train_seconds": 12.3456, "step_seconds": 11.0, "peak_memory_mb": 321.0, "device": "cpu",
               "dtype": "float32", "compile": False, "resumed_from": None, "init_from": None,
               "mlflow_run_id": "abc123"}
    rows = [{"step": s, "loss": 4.0 - s / 10, "loss_ema": 4.0 - s / 11, "tok_per_sec": 8000.0 + s} for s in range(1, 5)]
    return TrainResult(summary, {"steps": rows, "val": [], "samples": []}, model)


def test_train_metrics_hold_only_compared_numbers(tmp_path):
    from nanoforge.training.outputs import write_outputs

    write_outputs(_result(tmp_path), tmp_path / "model", tmp_path / "train")
    metrics = json.loads((tmp_path / "train/metrics.json").read_text())
    details = json.loads((tmp_path / "train/details.json").read_text())
    assert set(metrics) == {"val_bpb", "min_val_bpb", "val_bpb_tokens", "final_loss", "tok_per_sec", "mfu",
                            "num_params", "tokens_trained"}
    assert all(isinstance(v, (int, float)) for v in metrics.values()) and metrics["val_bpb"] == BPB
    for key in ("train_seconds", "peak_memory_mb", "device", "mlflow_run_id", "steps", "horizon_source"):
        assert key in details and key not in metrics, key


def test_train_pipes_report_is_rounded(tmp_path, monkeypatch):
    from nanoforge.training.outputs import report

    sent = []
    monkeypatch.setattr(pipes, "report", lambda metadata: sent.append(metadata) or True)
    report(_result(tmp_path))
    (meta,) = sent
    assert meta["val_bpb"] == 2.3357 and meta["val_bpb_tokens"] == 32_768 and meta["mfu_percent"] == 0.69
    assert "mfu" not in meta and meta["final_loss"] == 3.7971 and meta["tok_per_sec"] == 8123
    assert "| loss (EMA) | tok/s |" in meta["loss_curve"]["raw_value"]


# ---------------------------------------------------------------------------
# the download summary's megabytes

def test_download_counts_the_bytes_it_fetched(tmp_path):
    # small shards arrive in one chunk; the progress meter took that first report for a resume point
    # and the stage printed "fetched 3 shards (0.0 MB ...)" right after three "0.2 MB" lines
    import nanoforge.data.download as download
    from nanoforge.config import load_params
    from tests.datagen import make_fineweb

    make_fineweb(tmp_path / "mirror", train=[0, 1], docs_per_shard=40, manifest=False)
    cfg = load_params(REPO / "params.yaml").download
    sources = download.Sources(shards=str(tmp_path / "mirror"), bundle=str(tmp_path / "none.zip"),
                               shards_from="test", bundle_from="test")
    report = download.download_shards([0, 1, 1822], cfg, sources, directory=tmp_path / "out")
    size = sum(p.stat().st_size for p in (tmp_path / "mirror").iterdir())
    assert sorted(report.downloaded) == [0, 1, 1822] and report.transferred == size > 0


def test_an_up_to_date_evaluate_still_shows_the_core_task_table(tmp_path):
    # per-task results left metrics.json for details.json; Dagster keeps their table, not the timings and ids
    from pipelines.defs.metadata import stage_metadata
    from pipelines.dvc_graph import Out, Stage

    (tmp_path / "artifacts/eval").mkdir(parents=True)
    (tmp_path / "artifacts/eval/metrics.json").write_text(json.dumps({"val_bpb": BPB, "val_bpb_tokens": 65536,
                                                                      "core": 0.0737}))
    (tmp_path / "artifacts/eval/details.json").write_text(json.dumps({
        "tasks": {"arc_easy": {"accuracy": 0.25, "centered": 0.0, "items": 9}}, "eval_seconds": 95.0,
        "mlflow_run_id": "abc", "notes": {}}))
    stage = Stage("evaluate", "python -m stages.evaluate", (), (), (
        Out("artifacts/eval/metrics.json", kind="metric", cache=False), Out("artifacts/eval/details.json", cache=False)))
    meta = {k: v.value for k, v in stage_metadata(stage, tmp_path).items()}
    assert "| arc_easy | 0.25 | 0 | 9 |" in meta["tasks_table"]
    assert meta["val_bpb"] == 2.3357 and meta["val_bpb_tokens"] == 65536
    assert "eval_seconds" not in meta and "mlflow_run_id" not in meta
