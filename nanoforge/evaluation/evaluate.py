"""Evaluate the trained model: val/train bits per byte, DCLM CORE, samples (entry point: stages/evaluate.py).

Under torchrun, BPB rows and CORE items are split over the ranks and summed back.

Notable:
- Every input is checked before the model is loaded: params, the model files and
  their vocabulary against the tokenizer's, the shard manifest, and the whole eval
  bundle (every line of every task parsed and validated).
- BPB: the first `val_tokens` tokens of the pinned val shard and of the train
  shards, the same tokens every run (evaluation/bpb.py). CORE: evaluation/core.py, with
  sequences cropped to the model's context and rows packed into batches of
  `device_batch_size` contexts.
- Writes artifacts/eval/{metrics.json, details.json, core.csv, samples.json} atomically
  on rank 0. metrics.json holds only what people compare across runs (val/train BPB
  with their token budgets, CORE), so `dvc metrics show` stays readable; per-task
  results are in core.csv, and notes, skipped tasks, timings, device and run ids in
  details.json (plain outputs). Logs metrics, the task table and samples to MLflow;
  reports headline numbers and a markdown task table to Dagster when run under Pipes.
"""

from __future__ import annotations

import csv
import io
import json
import time

from nanoforge.tokenizer.bpe import TokenizerError, load_tokenizer
from nanoforge.common import EVAL_BUNDLE_DIR, EVAL_DIR, FINEWEB_DIR, MODEL_DIR, TOKENIZER_DIR, read_json, write_json, write_text
from nanoforge.config import DEFAULT_DATASET
from nanoforge.evaluation.core import load_bundle
from nanoforge.data.shards import check_dataset, read_manifest, train_shard_paths, val_shard_path
from nanoforge.gpus import check_processes_fit_gpus
from nanoforge.training.checkpoint import CONFIG, WEIGHTS, check_weights

CSV_COLUMNS = ["task", "accuracy", "centered", "items", "random_baseline", "seconds", "correct", "shots"]
OUTPUT_FILES = ("metrics.json", "details.json", "core.csv", "samples.json")
METRICS = ("val_bpb", "val_bpb_tokens", "train_bpb", "train_bpb_tokens", "core")  # metrics.json; the rest: details.json


def check_inputs(cfg, log, dataset: str = DEFAULT_DATASET) -> dict:
    """Everything the stage reads, validated; raises with a message naming the problem and the fix."""
    check_processes_fit_gpus("evaluate", cfg.nproc_per_node, cfg.device)
    manifest = read_manifest(FINEWEB_DIR / "MANIFEST.json")
    # params switched download.dataset but data/ was not downloaded again: the val BPB would be another dataset's
    check_dataset(manifest, dataset, FINEWEB_DIR / "MANIFEST.json")
    for name in (WEIGHTS, CONFIG):
        if not (MODEL_DIR / name).exists():
            raise FileNotFoundError(f"{MODEL_DIR / name}: missing; train a model first (dvc repro train)")
    # a truncated or damaged model file is one line before any work, not a SafetensorError traceback later
    check_weights(MODEL_DIR / WEIGHTS, "train it again (dvc repro -f train) or restore it (dvc checkout artifacts/model)")
    try:
        model_meta = read_json(MODEL_DIR / CONFIG)
        model_vocab = model_meta["model"]["vocab_size"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FileNotFoundError(f"{MODEL_DIR / CONFIG}: unreadable or without model.vocab_size ({exc})") from None
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    if tokenizer.vocab_size != model_vocab:
        raise TokenizerError(
            f"the model in {MODEL_DIR} has a vocabulary of {model_vocab} but the tokenizer in {TOKENIZER_DIR} has "
            f"{tokenizer.vocab_size}: they come from different runs (dvc repro re-trains the model)"
        )
    val_path = val_shard_path(manifest, FINEWEB_DIR)
    train_paths = train_shard_paths(manifest, FINEWEB_DIR)
    tasks, skipped = load_bundle(EVAL_BUNDLE_DIR, cfg.core_tasks, skip_bad=cfg.skip_bad_tasks, log=log)
    return {"tokenizer": tokenizer, "val_path": val_path, "train_paths": train_paths, "tasks": tasks,
            "skipped": skipped, "model_meta": model_meta}


def task_table(results) -> list[dict]:
    return [{"task": r.label, "accuracy": round(r.accuracy, 6), "centered": round(r.centered, 6), "items": r.items,
             "random_baseline": r.random_baseline, "seconds": round(r.seconds, 3), "correct": r.correct,
             "shots": r.shots} for r in results]


def markdown_table(rows: list[dict], core: float) -> str:
    lines = ["| task | accuracy | centered | items | seconds |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['accuracy']:.4f} | {r['centered']:+.4f} | {r['items']} | {r['seconds']:.1f} |" for r in rows]
    lines.append(f"| **CORE** | | **{core:.4f}** | | |")
    return "\n".join(lines)


def run_evaluation(cfg, inputs: dict, runtime, log) -> dict:
    """BPB, CORE and samples; every rank takes part, the dict is complete on every rank."""
    from nanoforge.evaluation.bpb import evaluate_bpb, rank_batches, shard_rows
    from nanoforge.training.checkpoint import load_model
    from nanoforge.evaluation.core import evaluate_core
    from nanoforge.model.sampling import generate, model_context

    t_start = time.perf_counter()
    if runtime.is_main and runtime.threads is not None:  # torch's threads, set by init_runtime (nanoforge/cpus.py)
        log.info("%s", runtime.threads.describe())
    tokenizer = inputs["tokenizer"]
    model, meta = load_model(MODEL_DIR, runtime.device)
    model.eval()
    seq_len = model_context(model)
    out: dict = {}
    t0 = time.perf_counter()
    for split, paths in (("val", [inputs["val_path"]]), ("train", inputs["train_paths"])):
        rows = shard_rows(paths, tokenizer, seq_len, cfg.val_tokens)
        if rows.size(0) < max(1, cfg.val_tokens // seq_len):
            log.warning("%s BPB: the shards hold only %d tokens, fewer than val_tokens=%d",
                        split, rows.size(0) * seq_len, cfg.val_tokens)
        out[f"{split}_bpb"] = evaluate_bpb(model, rank_batches(rows, cfg.device_batch_size, runtime),
                                           tokenizer.token_bytes, runtime)
        out[f"{split}_bpb_tokens"] = rows.size(0) * seq_len
        log.info("%s bpb %.4f over %d tokens", split, out[f"{split}_bpb"], rows.size(0) * seq_len)
    out["bpb_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    core, results = evaluate_core(model, tokenizer, inputs["tasks"], runtime, max_len=seq_len,
                                  batch_tokens=cfg.device_batch_size * seq_len,
                                  max_per_task=cfg.core_max_per_task, log=log)
    out["core"], out["results"] = core, results
    out["core_seconds"] = time.perf_counter() - t0
    log.info("CORE %.4f over %d tasks (%.1fs)", core, len(results), out["core_seconds"])

    out["samples"] = None
    if runtime.is_main:  # no collectives in generation: rank 0 alone
        t0 = time.perf_counter()
        completions = generate(model, tokenizer, cfg.sample_prompts, cfg.sample_max_tokens, 0.0, runtime=runtime)
        free = generate(model, tokenizer, [""] * cfg.num_unconditioned_samples, cfg.sample_max_tokens,
                        cfg.temperature, seed=cfg.seed, runtime=runtime)
        out["samples"] = {
            "conditional": [{"prompt": p, "completion": c} for p, c in zip(cfg.sample_prompts, completions)],
            "unconditioned": free,
        }
        out["sample_seconds"] = time.perf_counter() - t0
    out["model_train"] = meta.get("train", {}) if isinstance(meta, dict) else {}
    out["eval_seconds"] = time.perf_counter() - t_start  # model load to last sample, no tracking overhead
    return out


def write_outputs(out: dict, inputs: dict, runtime, run_id: str | None) -> dict:
    """The four files; returns metrics.json and details.json merged (what MLflow and Dagster are sent)."""
    from nanoforge.runtime import probe_details  # torch: loaded by now, not when the stage validates

    rows = task_table(out["results"])
    metrics = {
        "val_bpb": out["val_bpb"],
        "val_bpb_tokens": out["val_bpb_tokens"],  # evaluate.val_tokens, as far as the shard held them
        "train_bpb": out["train_bpb"],
        "train_bpb_tokens": out["train_bpb_tokens"],
        "core": out["core"],
    }
    details = {
        "tasks": {r["task"]: {k: r[k] for k in ("accuracy", "centered", "items", "seconds", "correct", "random_baseline",
                                               "shots")} for r in rows},
        "core_num_tasks": len(rows),
        "skipped_tasks": inputs["skipped"],
        "notes": {r.label: r.notes for r in out["results"] if r.notes},
        "eval_seconds": out["eval_seconds"],
        "bpb_seconds": out["bpb_seconds"],
        "core_seconds": out["core_seconds"],
        "sample_seconds": out["sample_seconds"],
        "device": str(runtime.device),
        "dtype": str(runtime.dtype).replace("torch.", ""),
        "dtype_probe": probe_details(getattr(runtime, "dtype_probe", None)),  # what dtype auto measured, if it did
        "world_size": runtime.world_size,
        "model_step": out["model_train"].get("step"),
        "mlflow_run_id": run_id,
    }
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(EVAL_DIR / "core.csv", buf.getvalue())
    write_json(EVAL_DIR / "samples.json", out["samples"])
    write_json(EVAL_DIR / "details.json", details)
    write_json(EVAL_DIR / "metrics.json", metrics)  # last: its presence means the rest is complete
    return {**metrics, **details}


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """The headline numbers and each task's accuracy, flat, as the evaluate run logs them."""
    flat = {k: metrics[k] for k in METRICS if metrics.get(k) is not None}  # each BPB beside its token budget
    flat["eval_seconds"] = metrics["eval_seconds"]
    for label, task in metrics["tasks"].items():
        flat[f"core.{label}.accuracy"] = task["accuracy"]
        flat[f"core.{label}.centered"] = task["centered"]
    return flat
