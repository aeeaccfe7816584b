"""What the train stage leaves behind: artifacts/model/, artifacts/train/{metrics.json, steps.csv, val.csv}.

Every file is written atomically (a reader never sees half a file); metrics.json holds
numbers and labels only, so `dvc metrics diff` compares runs. The same results go to
MLflow (artifacts, samples) and to Dagster (one Pipes report with a loss table).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from nanoforge import pipes
from nanoforge.common import MODEL_DIR, TRAIN_DIR, write_json, write_text
from nanoforge.training.checkpoint import save_model

STEP_COLUMNS = ["step", "loss", "loss_ema", "lr_mult", "grad_norm", "dt", "tok_per_sec", "mfu", "flops"]
VAL_COLUMNS = ["step", "flops", "val_bpb"]
MODEL_KEYS = ("steps", "tokens_trained", "num_params", "num_flops_per_token", "val_bpb", "final_loss", "depth",
              "mlflow_run_id")
HEADLINE = ("tok_per_sec", "mfu", "train_seconds", "peak_memory_mb", "final_loss", "val_bpb", "min_val_bpb",
            "num_params", "tokens_trained")


def write_outputs(result, model_dir: Path = MODEL_DIR, train_dir: Path = TRAIN_DIR) -> None:
    summary, history = result.summary, result.history
    save_model(result.model, {k: summary[k] for k in MODEL_KEYS}, model_dir)
    write_text(train_dir / "steps.csv", to_csv(history["steps"], STEP_COLUMNS))
    write_text(train_dir / "val.csv", to_csv(history["val"], VAL_COLUMNS))
    write_json(train_dir / "metrics.json", summary)


def log_outputs(run, result, train_dir: Path = TRAIN_DIR) -> None:
    """The headline numbers, the three files and the samples, to the MLflow run."""
    summary = result.summary
    run.log_metrics({k: summary[k] for k in HEADLINE if isinstance(summary.get(k), (int, float))}, step=summary["steps"])
    for name in ("steps.csv", "val.csv", "metrics.json"):
        run.log_artifact(train_dir / name, "train")
    run.log_dict(result.history.get("samples", []), "train/samples.json")


def report(result) -> None:
    """The Dagster materialization's metadata (a no-op outside Pipes)."""
    s = result.summary
    pipes.report({
        **{k: s[k] for k in ("num_params", "tokens_trained", "steps", "world_size", "tok_per_sec", "mfu", "final_loss",
                             "val_bpb", "train_seconds")},
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
        lines.append(f"| {s} | {r['loss_ema']:.4f} | {r['tok_per_sec']:,.0f} |")
    return "\n".join(lines)
