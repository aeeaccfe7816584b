"""What the train stage leaves behind: artifacts/model/, artifacts/train/{metrics.json, details.json, steps.csv, val.csv}.

Every file is written atomically (a reader never sees half a file). metrics.json holds
only the numbers people compare across runs (val BPB and its token budget, loss,
tok/s, MFU, params, tokens), so `dvc metrics show` stays one screen wide; everything
else about the run (timings, shapes, device, run ids) is in details.json, a plain
output. The same results go to MLflow (artifacts, samples) and to Dagster (one Pipes
report, numbers rounded by nanoforge/formats.py, with a loss table).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from nanoforge import pipes
from nanoforge.common import MODEL_DIR, TRAIN_DIR, write_json, write_text
from nanoforge.formats import for_dagster, human
from nanoforge.training.checkpoint import save_model

STEP_COLUMNS = ["step", "loss", "loss_ema", "lr_mult", "grad_norm", "dt", "tok_per_sec", "mfu", "flops"]
VAL_COLUMNS = ["step", "flops", "val_bpb"]
MODEL_KEYS = ("steps", "tokens_trained", "num_params", "num_flops_per_token", "val_bpb", "final_loss", "depth",
              "mlflow_run_id")
HEADLINE = ("tok_per_sec", "mfu", "train_seconds", "peak_memory_mb", "final_loss", "val_bpb", "min_val_bpb",
            "val_bpb_tokens", "num_params", "tokens_trained")
# metrics.json: what `dvc metrics diff` compares. val_bpb here is the training loop's estimate over
# train.eval_tokens (val_bpb_tokens); the evaluate stage's figure is the official one
METRICS = ("val_bpb", "min_val_bpb", "val_bpb_tokens", "final_loss", "tok_per_sec", "mfu", "num_params",
           "tokens_trained")


def write_outputs(result, model_dir: Path = MODEL_DIR, train_dir: Path = TRAIN_DIR) -> None:
    summary, history = result.summary, result.history
    save_model(result.model, {k: summary[k] for k in MODEL_KEYS}, model_dir)
    write_text(train_dir / "steps.csv", to_csv(history["steps"], STEP_COLUMNS))
    write_text(train_dir / "val.csv", to_csv(history["val"], VAL_COLUMNS))
    metrics, details = split_summary(summary)
    write_json(train_dir / "details.json", details)
    write_json(train_dir / "metrics.json", metrics)  # last: its presence means the rest is complete


def split_summary(summary: dict) -> tuple[dict, dict]:
    """(metrics.json, details.json): the compared numbers, and the rest of the run's facts."""
    metrics = {k: summary[k] for k in METRICS if k in summary}
    return metrics, {k: v for k, v in summary.items() if k not in metrics}


def log_outputs(run, result, train_dir: Path = TRAIN_DIR) -> None:
    """The headline numbers, the three files and the samples, to the MLflow run."""
    summary = result.summary
    run.log_metrics({k: summary[k] for k in HEADLINE if isinstance(summary.get(k), (int, float))}, step=summary["steps"])
    for name in ("steps.csv", "val.csv", "metrics.json", "details.json"):
        run.log_artifact(train_dir / name, "train")
    run.log_dict(result.history.get("samples", []), "train/samples.json")


def report(result) -> None:
    """The Dagster materialization's metadata (a no-op outside Pipes)."""
    s = result.summary
    numbers = dict(for_dagster(k, s.get(k)) for k in ("num_params", "tokens_trained", "steps", "world_size", "tok_per_sec",
                                                      "mfu", "final_loss", "val_bpb", "val_bpb_tokens", "train_seconds"))
    pipes.report({
        **{k: v for k, v in numbers.items() if v is not None},
        "device": f"{s['device']} {s['dtype']}",
        "loss_curve": pipes.markdown(curve_markdown(result.history["steps"])),
        "mlflow_run_id": s["mlflow_run_id"],
    })


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    return buf.getvalue()


def curve_markdown(rows: list[dict], val: list[dict] | None = None, points: int = 10) -> str:
    if not rows:
        return "(no steps)"
    picks = sorted({rows[min(len(rows) - 1, round(i * (len(rows) - 1) / (points - 1)))]["step"] for i in range(points)})
    by_step = {r["step"]: r for r in rows}
    lines = ["| step | loss (EMA) | tok/s |", "|---:|---:|---:|"]
    for s in picks:
        r = by_step[s]
        lines.append(f"| {s} | {human('loss_ema', r['loss_ema'])} | {human('tok_per_sec', r['tok_per_sec'])} |")
    return "\n".join(lines)
