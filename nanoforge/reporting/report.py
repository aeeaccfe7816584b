"""One human report of the whole run: Markdown beside its PNGs and one self-contained HTML file (entry point: stages/report.py).

Notable:
- Reads only upstream *outputs* (manifest, tokenizer/train/eval metrics, steps.csv,
  val.csv, core.csv, samples.json, the model's config.json) and, for the comparison,
  MLflow. Never another stage's params: the resolved training config comes from
  the model and the train metrics, so the report says what ran, not what is asked now.
- Works with whatever exists: a missing or unreadable output turns its section into
  a "Not run" note naming the file and the command that makes it, never a crash.
- Opens on a summary (val BPB with its token budget, CORE, tok/s, MFU, cost, time);
  every BPB figure names its budget (the training loop's train.eval_tokens estimate
  differs from the evaluate stage's evaluate.val_tokens figure, the official one).
- Each stage's metrics.json (the compared numbers) and details.json (the rest) are
  read as one view of that stage.
- Writes reports/summary.json beside the report: the headline numbers, a DVC metrics
  file, so Dagster shows them even when the report is up to date.
- The run header pins the run: git commit and dirty flag, the DVC hashes of data/ and of
  every upstream output, one line that reproduces it, the hardware, and a cost
  estimate from the GPU price table in params.yaml.
- Written atomically (a temporary directory swapped in), logged to MLflow as a
  `report` run that also records the headline numbers and the train run it
  describes, so later reports can compare against this one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from nanoforge.reporting import plots
from nanoforge.common import (
    EVAL_DIR, MANIFEST_FILE, MODEL_DIR, REPORTS_DIR, TOKENIZER_DIR, TRAIN_DIR, atomic_dir, get_logger, write_json,
    write_text,
)
from nanoforge.config import ReportConfig, flatten
from nanoforge.formats import budget, human
from nanoforge.reporting.doc import (
    NA, SAMPLE_MARK, Doc, count, duration, finite, nbytes, si, sig, signed, to_html, to_markdown, usd,
)
from nanoforge.reporting.history import HEADLINE, History, load_history, train_run_params
from nanoforge.tracking import _reachable, git_info, link_for_run, tracking_uri

log = get_logger("report")

REPORT_MD = REPORTS_DIR / "report.md"
REPORT_HTML = REPORTS_DIR / "report.html"
SUMMARY_FILE = REPORTS_DIR / "summary.json"  # DVC metrics: the headline numbers, for `dvc metrics show` and Dagster
FIGURES = "figures"  # the PNGs, in their own folder: DVC tracks it apart from summary.json
# where each BPB figure's tokens come from (what its budget is called in params.yaml)
TRAIN_BPB_BUDGET, EVAL_BPB_BUDGET = "train.eval_tokens", "evaluate.val_tokens"

# every input, the stage that writes it (for "run `dvc repro <stage>`"), and how to read it
INPUTS = {
    "manifest": (MANIFEST_FILE, "download", "json"),
    "tokenizer": (TOKENIZER_DIR / "metrics.json", "tokenizer", "json"),
    "tokenizer_details": (TOKENIZER_DIR / "details.json", "tokenizer", "json"),
    "model": (MODEL_DIR / "config.json", "train", "json"),
    "train": (TRAIN_DIR / "metrics.json", "train", "json"),
    "train_details": (TRAIN_DIR / "details.json", "train", "json"),
    "steps": (TRAIN_DIR / "steps.csv", "train", "csv"),
    "val": (TRAIN_DIR / "val.csv", "train", "csv"),
    "eval": (EVAL_DIR / "metrics.json", "evaluate", "json"),
    "eval_details": (EVAL_DIR / "details.json", "evaluate", "json"),
    "core": (EVAL_DIR / "core.csv", "evaluate", "csv"),
    "samples": (EVAL_DIR / "samples.json", "evaluate", "json"),
}


# ---------------------------------------------------------------------------
# inputs: each one present, or a reason it is not

@dataclass
class Inputs:
    values: dict[str, Any] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def missing(self, *names: str) -> str | None:
        """A 'Not run' sentence for the first missing input among `names`, or None."""
        for name in names:
            if name in self.problems:
                return self.problems[name]
        return None


def read_csv(path: Path) -> dict[str, list]:
    """Columns of a CSV as lists; numbers become floats, empty cells None, text stays text."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    columns: dict[str, list] = {name: [] for name in rows[0]}
    for row in rows:
        for name in columns:
            raw = (row.get(name) or "").strip()
            if raw == "":
                columns[name].append(None)
                continue
            try:
                columns[name].append(float(raw))
            except ValueError:
                columns[name].append(raw)
    return columns


def load_inputs(root: Path = Path(".")) -> Inputs:
    found = Inputs()
    for name, (rel, stage, kind) in INPUTS.items():
        path = root / rel
        if not path.exists():
            found.problems[name] = f"Not run: `{rel}` is missing (it comes from `dvc repro {stage}`)."
            continue
        try:
            value = json.loads(path.read_text()) if kind == "json" else read_csv(path)
        except (OSError, ValueError, csv.Error) as exc:
            found.problems[name] = f"Not run: `{rel}` could not be read ({type(exc).__name__}: {exc})."
            continue
        if kind == "json" and not isinstance(value, dict):
            found.problems[name] = f"Not run: `{rel}` is not a JSON object."
            continue
        found.values[name] = value
    for stage in ("tokenizer", "train", "eval"):  # one view per stage: its details, with the compared numbers winning
        details = found.values.pop(f"{stage}_details", None)
        found.problems.pop(f"{stage}_details", None)  # outputs written before details.json existed
        if stage in found.values and details:
            found.values[stage] = {**details, **found.values[stage]}
    return found


# ---------------------------------------------------------------------------
# numbers that several sections share

def headline(inputs: Inputs) -> dict[str, float | None]:
    """This run's headline numbers. Val BPB is the evaluate stage's only (over evaluate.val_tokens):
    the training loop's estimate is over other tokens and is never compared with it."""
    train, ev = inputs.get("train", {}), inputs.get("eval", {})
    out: dict[str, float | None] = {key: finite(train.get(key)) for key, _, _ in HEADLINE}
    out["val_bpb"] = finite(ev.get("val_bpb"))
    out["val_bpb_tokens"] = finite(ev.get("val_bpb_tokens"))
    out["core"] = finite(ev.get("core"))
    return out


def train_bpb_tokens(inputs: Inputs) -> Any:
    """The training loop's BPB budget: its metrics when they say, else the train run's logged param."""
    train = inputs.get("train") or {}
    if train.get("val_bpb_tokens") is not None:
        return train["val_bpb_tokens"]
    return (inputs.get("train_params") or {}).get("eval_tokens")


def fmt_metric(key: str, value: Any) -> str:
    return human(key, value)


def fmt_delta(key: str, delta: float | None) -> str:
    if delta is None:
        return NA
    if delta == 0:
        return "0"
    if key == "train_seconds":
        return ("+" if delta >= 0 else "-") + duration(abs(delta))
    if key == "mfu":
        return signed(100 * delta) + " pp"
    if key in ("num_params", "tokens_trained", "tok_per_sec"):
        return ("+" if delta >= 0 else "-") + si(abs(delta))
    return signed(delta)


def cost(train: dict, machine: dict, cfg: ReportConfig) -> dict[str, Any]:
    """Hourly price of the hardware that trained, and the total for the training time."""
    device = str(train.get("device") or "").lower()
    world = int(finite(train.get("world_size")) or 1)
    on_gpu = device.startswith("cuda") if device else bool(machine.get("gpus"))
    out: dict[str, Any] = {"hourly": None, "total": None, "basis": ""}
    if on_gpu:
        name = train.get("gpu_name") or train.get("device_name") or (machine["gpus"][0]["name"] if machine.get("gpus") else None)
        count_gpus = world if device else len(machine["gpus"])
        if name is None:
            out["basis"] = f"{count_gpus} GPU(s) of unknown model (trained elsewhere; no `gpu_name` in the train metrics)"
            return out
        matches = sorted((k for k in cfg.gpu_hourly_usd if k.lower() in str(name).lower()), key=len, reverse=True)
        if not matches:
            out["basis"] = (f"no price for `{name}` in `report.gpu_hourly_usd` "
                            f"(known: {', '.join(cfg.gpu_hourly_usd)}); add it to params.yaml")
            return out
        price = cfg.gpu_hourly_usd[matches[0]]
        out["hourly"] = price * count_gpus
        out["basis"] = f"{count_gpus} × {matches[0]} at {usd(price)}/GPU-hour"
    else:
        out["hourly"] = cfg.cpu_hourly_usd
        out["basis"] = f"one CPU machine at {usd(cfg.cpu_hourly_usd)}/hour, `report.cpu_hourly_usd`"
    seconds = finite(train.get("train_seconds"))
    if seconds is not None and out["hourly"] is not None:
        out["total"] = out["hourly"] * seconds / 3600
    return out


# ---------------------------------------------------------------------------
# sections

def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.exists() else None
    except (OSError, yaml.YAMLError):
        return None


def dvc_hashes(root: Path = Path(".")) -> tuple[list[list[str]], str | None]:
    """Rows (file, output, hash) for data.dvc and every upstream output in dvc.lock; and dvc.lock's sha256."""
    rows = []
    for out in (_load_yaml(root / "data.dvc") or {}).get("outs", []) or []:
        digest = out.get("md5") or out.get("hash")
        rows.append(["data.dvc", f"`{out.get('path')}`", f"`{digest}`" if digest else NA])
    lock_path = root / "dvc.lock"
    lock = _load_yaml(lock_path) or {}
    for stage, entry in (lock.get("stages") or {}).items():
        if stage == "report":  # its own entry describes the previous report, not this one
            continue
        for out in entry.get("outs", []) or []:
            digest = out.get("md5") or out.get("hash")
            rows.append([f"dvc.lock: {stage}", f"`{out.get('path')}`", f"`{digest}`" if digest else NA])
    lock_sha = hashlib.sha256(lock_path.read_bytes()).hexdigest()[:16] if lock_path.exists() else None
    return rows, lock_sha


def git_state(root: Path = Path(".")) -> tuple[str, str]:
    """(commit, "true" | "false" | "unknown"), by the same rule as every stage's MLflow tags."""
    info = git_info(root)
    return info["git_commit"], info["git_dirty"]


def section_summary(doc: Doc, inputs: Inputs, spend: dict) -> dict[str, Any]:
    """The first thing a reader sees: the numbers people compare, each with what it is measured over."""
    numbers = headline(inputs)
    numbers.update({"cost_usd": spend["total"], "hourly_usd": spend["hourly"]})
    train, ev = inputs.get("train") or {}, inputs.get("eval") or {}
    doc.heading("Summary")
    bpb = (f"{human('val_bpb', numbers['val_bpb'])} ({budget(numbers['val_bpb_tokens'], EVAL_BPB_BUDGET)})"
           if numbers["val_bpb"] is not None else f"{NA} (evaluate not run)")
    doc.kv([
        ("Val BPB", bpb),
        ("CORE", human("core", numbers["core"]) + (f" over {count(ev['core_num_tasks'])} tasks"
                                                    if ev.get("core_num_tasks") else "")),
        ("Throughput", f"{human('tok_per_sec', numbers['tok_per_sec'])} tok/s"),
        ("MFU", human("mfu", numbers["mfu"])),
        ("Training cost", usd(spend["total"]) if spend["total"] is not None else NA),
        ("Time", f"{duration(train.get('train_seconds'))} training, {duration(ev.get('eval_seconds'))} evaluation"),
        ("Model", f"{si(numbers['num_params'])} params, {si(numbers['tokens_trained'])} tokens trained"),
    ])
    return numbers


def _run_link(label: str, value: str) -> str:
    """A clickable MLflow link for a run id or URL; the bare id in code when MLflow can't say where."""
    url = value if "://" in value else link_for_run(value)
    return f"[{label} run {value.rsplit('/', 1)[-1][:8]}]({url})" if url else f"`{value}`"


def section_header(doc: Doc, inputs: Inputs, machine: dict, cfg: ReportConfig, run_urls: dict[str, str],
                   spend: dict) -> dict:
    commit, dirty = git_state()
    rows, lock_sha = dvc_hashes()
    doc.heading("Run")
    pairs = [
        ("Generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("Git commit", f"`{commit}`" + {"true": " (dirty: uncommitted changes)", "false": " (clean)"}.get(dirty, "")),
        ("dvc.lock", f"sha256 `{lock_sha}…`" if lock_sha else "none yet (stages run outside `dvc repro`)"),
    ]
    for label, url in run_urls.items():
        pairs.append((f"MLflow {label} run", _run_link(label, url)))
    doc.kv(pairs)
    doc.text("Reproduce this run:")
    doc.pre(f"git checkout {commit} && dvc checkout && dvc repro" if commit != "unknown"
            else "# not a git checkout: commit the project, then: dvc repro")
    if dirty == "true":
        doc.note("The working tree had uncommitted changes: the line above reproduces the last commit, "
                 "not exactly this run. Commit, then `dvc repro`.")
    if rows:
        doc.text("DVC hashes of the data and the outputs this report describes:")
        doc.table(["file", "output", "hash (md5)"], rows, align="lll")
    doc.heading("Hardware and software", 3)
    gpus = machine.get("gpus") or []
    gpu_text = ", ".join(f"{g['name']} ({nbytes(g['memory_bytes'])})" for g in gpus) if gpus else "none"
    cores = machine.get("cpu_cores_logical")
    physical = machine.get("cpu_cores_physical")
    train = inputs.get("train", {})
    doc.kv([
        ("Host", machine.get("hostname") or NA),
        ("CPU", f"{machine.get('cpu') or 'unknown'}, {cores or '?'} cores" + (f" ({physical} physical)" if physical and physical != cores else "")),
        ("Memory", nbytes(machine.get("memory_bytes"))),
        ("GPUs", f"{len(gpus)} × " + gpu_text if gpus else "none"),
        ("CUDA", machine.get("cuda") or "none"),
        ("OS", machine.get("os") or NA),
        ("Python", machine.get("python") or NA),
        ("torch", machine.get("torch") or NA),
        ("Training ran on", f"{train.get('device', NA)}, {train.get('dtype', NA)}, world size {train.get('world_size', NA)}"
         if train else "not run"),
    ])
    doc.heading("Cost", 3)
    doc.kv([
        ("Hourly estimate", f"{usd(spend['hourly'])} ({spend['basis']})" if spend["hourly"] is not None else f"unknown: {spend['basis']}"),
        ("Training time", duration(train.get("train_seconds")) if train else "not run"),
        ("Training cost", usd(spend["total"]) if spend["total"] is not None else NA),
    ])
    return {"git_commit": commit, "git_dirty": dirty, "cost_usd": spend["total"], "hourly_usd": spend["hourly"]}


def section_data(doc: Doc, inputs: Inputs) -> None:
    doc.heading("Data")
    if inputs.missing("manifest"):
        doc.note(inputs.missing("manifest"))
        return
    manifest = inputs.get("manifest")
    shards = manifest.get("shards") or []
    rows = []
    for split in ("train", "val"):
        mine = [s for s in shards if s.get("split") == split]
        if not mine:
            continue
        indices = sorted(int(s["index"]) for s in mine if "index" in s)
        rows.append([
            split, count(len(mine)), _index_ranges(indices),
            count(sum(s.get("rows") or 0 for s in mine)),
            count(sum(s.get("chars") or 0 for s in mine)),
            nbytes(sum(s.get("bytes") or 0 for s in mine)),
        ])
    doc.text(f"FineWeb-Edu shards from `{manifest.get('source', 'unknown source')}` (manifest `{MANIFEST_FILE}`).")
    doc.table(["split", "shards", "indices", "documents", "characters", "bytes"], rows, align="lrlrrr")


def _index_ranges(indices: list[int]) -> str:
    if not indices:
        return NA
    parts, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def section_tokenizer(doc: Doc, inputs: Inputs) -> None:
    doc.heading("Tokenizer")
    if inputs.missing("tokenizer"):
        doc.note(inputs.missing("tokenizer"))
        return
    tok = inputs.get("tokenizer")
    roundtrip = tok.get("roundtrip_ok")
    doc.kv([
        ("Vocabulary", count(tok.get("vocab_size"))),
        ("Trained on", f"{count(tok.get('train_chars'))} characters, {count(tok.get('train_docs'))} documents"),
        ("Training time", duration(tok.get("train_seconds"))),
        ("Validation bytes/token", sig(tok.get("val_bytes_per_token"))),
        ("Round trip", {True: "ok", False: "**FAILED**"}.get(roundtrip, NA)),
    ])
    compression = tok.get("compression") or {}
    if not compression:
        doc.note("No compression table in the tokenizer metrics.")
        return
    rows = []
    for kind, by in compression.items():
        by = by or {}
        ours, gpt2, gpt4 = finite(by.get("ours")), finite(by.get("gpt2")), finite(by.get("cl100k_base"))
        rel = lambda other: signed(100 * (ours / other - 1)) + "%" if ours is not None and other else NA
        rows.append([kind, sig(ours), sig(gpt2), rel(gpt2), sig(gpt4), rel(gpt4)])
    doc.text("Compression in bytes per token (higher is better); relative columns: ours against the reference.")
    doc.table(["text", "ours", "GPT-2", "ours vs GPT-2", "GPT-4 (cl100k)", "ours vs GPT-4"], rows)
    if all(r[2] == NA and r[4] == NA for r in rows):
        doc.note("GPT-2 and GPT-4 encodings were not available (offline, not cached): only ours is shown.")


def section_training(doc: Doc, inputs: Inputs, out_dir: Path, figures: list[str]) -> None:
    doc.heading("Training")
    if inputs.missing("train"):
        doc.note(inputs.missing("train"))
        return
    train = inputs.get("train")
    params, tokens = finite(train.get("num_params")), finite(train.get("tokens_trained"))
    doc.kv([
        ("Parameters", f"{count(params)} ({si(params)})"),
        ("FLOPs per token", si(train.get("num_flops_per_token"), "FLOP")),
        ("Tokens trained", f"{count(tokens)} ({si(tokens)})"),
        ("Tokens : params", f"{sig(tokens / params)} : 1" if params and tokens is not None else NA),
        ("Training FLOPs", si(tokens * finite(train.get("num_flops_per_token")), "FLOP")
         if tokens is not None and finite(train.get("num_flops_per_token")) is not None else NA),
        ("Steps", count(train.get("steps")) + (f" of {count(train['num_iterations'])} ({train['horizon_source']})"
                                               if train.get("num_iterations") and train.get("horizon_source") else "")),
        ("Batch", f"{count(train['total_batch_size'])} tokens/step, {count(train.get('grad_accum_steps'))} accumulation step(s)"
         if train.get("total_batch_size") else NA),
        ("World size", count(train.get("world_size"))),
        ("Device / dtype", f"{train.get('device', NA)} / {train.get('dtype', NA)}"
         + (f", torch.compile {'on' if train['compile'] else 'off'}" if isinstance(train.get("compile"), bool) else "")),
        ("Final training loss (EMA)", human("final_loss", train.get("final_loss"))),
        ("Val BPB in the loop (final / min)",
         f"{human('val_bpb', train.get('val_bpb'))} / {human('val_bpb', train.get('min_val_bpb'))} "
         f"({budget(train_bpb_tokens(inputs), TRAIN_BPB_BUDGET)}; the evaluation below is the official figure)"),
        ("MFU", human("mfu", train.get("mfu"))),
        ("Throughput", f"{human('tok_per_sec', train.get('tok_per_sec'))} tok/s"),
        ("Training time", duration(train.get("train_seconds"))),
        ("Peak memory", nbytes(finite(train.get("peak_memory_mb")) * 2**20) if finite(train.get("peak_memory_mb")) is not None else NA),
    ])
    _training_config(doc, inputs)
    steps = inputs.get("steps")
    if steps:
        x = steps.get("step", [])
        if plots.training_loss(x, steps.get("loss", []), steps.get("loss_ema", []), out_dir / _fig("loss.png")):
            doc.image(_fig("loss.png"), "Training loss, raw and EMA")
            figures.append("loss.png")
        if plots.schedule_and_throughput(x, steps.get("lr_mult", []), steps.get("tok_per_sec", []),
                                         out_dir / _fig("schedule.png")):
            doc.image(_fig("schedule.png"), "Learning-rate multiplier and throughput")
            figures.append("schedule.png")
    else:
        doc.note(inputs.missing("steps") or "`steps.csv` is empty: no per-step curves.")
    val = inputs.get("val")
    if val and plots.val_bpb(val.get("step", []), val.get("flops", []), val.get("val_bpb", []), out_dir / _fig("val_bpb.png")):
        doc.image(_fig("val_bpb.png"), "Validation bits per byte in the training loop "
                  f"({budget(train_bpb_tokens(inputs), TRAIN_BPB_BUDGET)}) against step and against training FLOPs")
        figures.append("val_bpb.png")
    elif not val:
        doc.note(inputs.missing("val") or "`val.csv` is empty: no validation curve (train.eval_every = 0?).")


def _fig(name: str) -> str:
    return f"{FIGURES}/{name}"


def _scalar_rows(tree: dict) -> list[tuple[str, str]]:
    rows = []
    for key, value in flatten(tree).items():
        if isinstance(value, (list, tuple)):
            text = ", ".join(str(v) for v in value)
        else:  # config values as written, not rounded: 0.02 stays 0.02
            text = "null" if value is None else str(value)
        rows.append((f"`{key}`", text))
    return rows


def _training_config(doc: Doc, inputs: Inputs) -> None:
    model = inputs.get("model") or {}
    train = inputs.get("train") or {}
    arch = model.get("model") if isinstance(model.get("model"), dict) else None
    # the resolved train section as the train stage recorded it (never today's params.yaml):
    # in its outputs when it writes it there, else the params of its MLflow run
    resolved = next((c for c in (train.get("config"), model.get("train_config"), model.get("config")) if isinstance(c, dict)), None)
    source = "from the train outputs"
    if resolved is None and inputs.get("train_params"):
        resolved = dict(sorted(inputs.get("train_params").items()))
        source = f"the params of MLflow train run `{train.get('mlflow_run_id')}`"
    summary = model.get("train") if isinstance(model.get("train"), dict) else None
    if arch:
        doc.heading("Model", 3)
        doc.kv(_scalar_rows(arch))
    if resolved:
        doc.heading("Resolved training config", 3)
        doc.text(f"As the train stage ran it ({source}).")
        rows = _scalar_rows(resolved)
        half = (len(rows) + 1) // 2  # two key/value pairs per row: a long config stays one screen tall
        left, right = rows[:half], rows[half:] + [("", "")] * (2 * half - len(rows))
        doc.table(["key", "value", "key", "value"], [[*a, *b] for a, b in zip(left, right)], align="llll")
    elif summary:
        doc.heading("Training summary (from the model)", 3)
        doc.kv(_scalar_rows(summary))
    if not (arch or resolved or summary):
        doc.note(inputs.missing("model") or f"`{MODEL_DIR / 'config.json'}` holds no model config.")


def section_evaluation(doc: Doc, inputs: Inputs, out_dir: Path, figures: list[str]) -> None:
    doc.heading("Evaluation")
    if inputs.missing("eval"):
        doc.note(inputs.missing("eval"))
        return
    ev = inputs.get("eval")
    doc.kv([
        ("CORE", human("core", ev.get("core"))),
        ("Val BPB", f"{human('val_bpb', ev.get('val_bpb'))} ({budget(ev.get('val_bpb_tokens'), EVAL_BPB_BUDGET)})"),
        ("Train BPB", f"{human('train_bpb', ev.get('train_bpb'))} "
                      f"({budget(ev.get('train_bpb_tokens'), EVAL_BPB_BUDGET + ', from the train shards')})"),
        ("Evaluation time", duration(ev.get("eval_seconds"))),
    ])
    tasks = _tasks(inputs)
    if tasks:
        doc.heading("CORE tasks", 3)
        rows = [[f"`{t['task']}`", sig(t.get("accuracy")), sig(t.get("centered")),
                 sig(t.get("random_baseline")) + ("%" if finite(t.get("random_baseline")) is not None else ""),
                 count(t.get("items")), duration(t.get("seconds"))] for t in tasks]
        doc.table(["task", "accuracy", "centered", "random baseline", "items", "time"], rows)
        if plots.core_tasks([t["task"] for t in tasks], [finite(t.get("centered")) for t in tasks], finite(ev.get("core")),
                            out_dir / _fig("core.png")):
            doc.image(_fig("core.png"), "CORE: centered accuracy per task")
            figures.append("core.png")
    else:
        doc.note("No per-task CORE results (" + (inputs.missing("core") or "core.csv is empty") + ")")
    doc.heading("Samples", 3)
    if inputs.missing("samples"):
        doc.note(inputs.missing("samples"))
        return
    samples = inputs.get("samples")
    conditional = samples.get("conditional") or []
    free = samples.get("unconditioned") or []
    if conditional:
        doc.text(f"Greedy continuations (the prompt, then {SAMPLE_MARK} where the model takes over):")
        for s in conditional:
            doc.sample(str(s.get("prompt", "")), str(s.get("completion", "")))
    if free:
        doc.text("Unconditioned samples (from BOS alone):")
        for text in free:
            doc.sample("", str(text))
    if not conditional and not free:
        doc.note("`samples.json` holds no samples.")


def _tasks(inputs: Inputs) -> list[dict]:
    core = inputs.get("core")
    if core and core.get("task"):
        names = list(core)
        return [{name: core[name][i] for name in names} for i in range(len(core["task"]))]
    tasks = (inputs.get("eval") or {}).get("tasks") or {}
    return [{"task": label, **(v or {})} for label, v in tasks.items()]


def section_comparison(doc: Doc, inputs: Inputs, history: History | None, why_not: str | None,
                       out_dir: Path, figures: list[str]) -> None:
    doc.heading("Comparison with earlier runs")
    if history is None:
        doc.note(why_not or "Not run: MLflow was not read.")
        return
    for note in history.notes:
        doc.note(note)
    this = headline(inputs)
    # a champion that is this very run compares with itself (every delta 0): leave it out
    champion = history.champion if history.champion and not history.champion_is_current else None
    others = ([champion] if champion else []) + history.previous
    if not others:
        doc.note("First run, nothing to compare: no earlier finished train runs in MLflow"
                 + (" (the champion is this run)." if history.champion_is_current else "."))
        return
    keys = [(k, label, better) for k, label, better in HEADLINE]
    headers = ["run"] + [label + {"lower": " ↓", "higher": " ↑"}.get(better or "", "") for _, label, better in keys]
    rows = [["**this run**"] + [fmt_metric(k, this.get(k)) for k, _, _ in keys]]
    for past in others:
        row = [past.label]
        for key, _, _ in keys:
            theirs, ours = finite(past.metrics.get(key)), this.get(key)
            if theirs is None:
                row.append(NA)
                continue
            delta = fmt_delta(key, ours - theirs) if ours is not None else NA
            row.append(f"{fmt_metric(key, theirs)} (Δ {delta})")
        rows.append(row)
    doc.text(f"Δ = this run minus that run. ↓: lower is better, ↑: higher is better. Val BPB is the evaluate "
             f"stage's ({EVAL_BPB_BUDGET}); n/a where a run was not evaluated.")
    doc.table(headers, rows)
    steps = inputs.get("steps") or {}
    curves = [("this run", steps.get("step", []), steps.get("loss", []))]
    curves += [(p.label, p.loss_steps, p.loss) for p in others]
    if plots.loss_overlay(curves, out_dir / _fig("compare_loss.png")):
        doc.image(_fig("compare_loss.png"), "Training loss of this run and earlier runs (same EMA smoothing for all)")
        figures.append("compare_loss.png")


# ---------------------------------------------------------------------------
# the stage

def build(inputs: Inputs, cfg: ReportConfig, out_dir: Path, machine: dict, history: History | None,
          history_note: str | None, run_urls: dict[str, str]) -> tuple[Doc, dict, list[str]]:
    """Write the PNGs into out_dir and return the document, header facts and figure names."""
    doc = Doc("nanoforge run report")
    figures: list[str] = []
    (out_dir / FIGURES).mkdir(exist_ok=True)
    spend = cost(inputs.get("train", {}), machine, cfg)
    numbers = section_summary(doc, inputs, spend)
    facts = section_header(doc, inputs, machine, cfg, run_urls, spend)
    facts["summary"] = numbers
    for name, section in (
        ("Data", lambda: section_data(doc, inputs)),
        ("Tokenizer", lambda: section_tokenizer(doc, inputs)),
        ("Training", lambda: section_training(doc, inputs, out_dir, figures)),
        ("Evaluation", lambda: section_evaluation(doc, inputs, out_dir, figures)),
        ("Comparison", lambda: section_comparison(doc, inputs, history, history_note, out_dir, figures)),
    ):
        try:
            section()
        except Exception as exc:  # an output that parses but has an unexpected shape: say so, keep the rest
            log.warning("%s section failed: %s: %s", name, type(exc).__name__, exc)
            doc.note(f"This section could not be rendered from the outputs on disk ({type(exc).__name__}: {exc}).")
    return doc, facts, figures


def write_report(doc: Doc, out_dir: Path) -> None:
    write_text(out_dir / "report.md", to_markdown(doc))
    write_text(out_dir / "report.html", to_html(doc, out_dir))


def _readable(directory: Path) -> None:
    # temporary files and dirs are created private (0600/0700); a report is for sharing
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_dir():
            _readable(path)
        else:
            path.chmod(0o666 & ~umask)


def read_history(cfg: ReportConfig, train_run_id: str | None, inputs: Inputs) -> tuple[History | None, str | None]:
    """Earlier runs and the champion from MLflow, or (None, why not); adds the train run's params to `inputs`."""
    if not _reachable(tracking_uri()):
        return None, f"Not run: MLflow at `{tracking_uri()}` is unreachable."
    history = load_history(train_run_id, cfg.compare_runs, cfg.champion)
    inputs.values["train_params"] = train_run_params(train_run_id)
    return history, None


def write_reports(inputs: Inputs, cfg: ReportConfig, machine: dict, history: History | None,
                  history_note: str | None, run_urls: dict[str, str]) -> tuple[dict, list[str]]:
    """reports/ as a whole (Markdown, HTML, PNGs), swapped in atomically; (header facts, figure names)."""
    with atomic_dir(REPORTS_DIR) as out_dir:
        doc, facts, figures = build(inputs, cfg, out_dir, machine, history, history_note, run_urls)
        write_report(doc, out_dir)
        write_json(out_dir / SUMMARY_FILE.name, {k: v for k, v in facts["summary"].items() if v is not None})
        _readable(out_dir)
    return facts, figures


def summary_markdown(numbers: dict) -> str:
    keys = [(k, label) for k, label, _ in HEADLINE] + [("cost_usd", "training cost")]
    lines = ["| metric | value |", "|---|---:|"]
    for key, label in keys:
        text = fmt_metric(key, numbers.get(key))
        if key == "val_bpb" and numbers.get(key) is not None:
            text += f" ({budget(numbers.get('val_bpb_tokens'), EVAL_BPB_BUDGET)})"
        lines.append(f"| {label} | {text} |")
    return "\n".join(lines)
