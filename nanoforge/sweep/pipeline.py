"""The sweep as pipeline stages: run one cell, collect the finished cells, write the fit.

Notable:
- The grid is checked whole (grid.build_grid) by every cell and by the fit before any
  work, so a bad budget or depth fails the first cell that starts, naming the cell.
- A cell is a real train run of params.yaml's train section at the cell's depth and
  budget: `nanoforge.launch stages.train --set depth=D --set target_flops=C --set
  num_iterations=null` (the target_flops horizon), with NANOFORGE_RUN_DIR sending its
  checkpoints, model and metrics to artifacts/sweep/<cell>/ (training/plan.py run_dirs):
  a killed cell resumes from its own checkpoint there, and never touches the main train
  stage's artifacts/checkpoints. Its train run is a child of the sweep's MLflow parent.
- cell.json (written last, atomically) is the cell's row for the fit: the grid's numbers,
  N under each params convention, the trained tokens and the final val BPB.
- The sweep's MLflow parent is found or created by a key of the recipe (train section +
  tokenizer vocabulary), so the cells of separate `dvc repro`/Dagster runs of one recipe
  share one parent, and the fit logs its numbers and plots on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from nanoforge.common import ARTIFACTS_DIR, TOKENIZER_DIR, read_json, write_json
from nanoforge.config import ConfigError, Params
from nanoforge.sweep.grid import PARAM_CONVENTIONS, Cell, GridError, build_grid, cell_name

SWEEP_DIR = ARTIFACTS_DIR / "sweep"
RUN_DIR_ENV = "NANOFORGE_RUN_DIR"  # training/plan.py reads it (kept in step with plan.RUN_DIR_ENV)
CELL_FILE = "cell.json"


# the model options whose params or FLOPs the grid's torch-free count (grid.py, the 2025 shape rule) lacks
SHAPE_OPTIONS = ("value_embeds", "window_pattern")


def grid_of(params: Params) -> list[Cell]:
    """Every cell of params.yaml's sweep, or a ConfigError naming the cell and the key."""
    sw, train = params.sweep, params.train
    from nanoforge.config import RECIPES

    base = RECIPES["2025"]
    changed = [f"train.{k}={train.option(k)!r}" for k in SHAPE_OPTIONS if train.option(k) != base[k]]
    if changed:  # refused, not ignored: the fit's N and each cell's steps would be the 2025 model's
        fix = ", ".join(f"train.{k}: {base[k]!r}" for k in SHAPE_OPTIONS)
        raise ConfigError(f"the sweep counts params and FLOPs per cell with the 2025 shape rule, which does not "
                          f"know {', '.join(changed)} (train.recipe: {train.recipe}); set {fix} for a sweep")
    try:
        return build_grid([float(b) for b in sw.budgets], sw.depths, vocab_size(params), train.max_seq_len,
                          train.total_batch_size, train.n_kv_head, min_steps=sw.min_steps)
    except GridError as exc:
        raise ConfigError(str(exc)) from None


def vocab_size(params: Params) -> int:
    """The trained tokenizer's vocabulary (a small corpus may give fewer merges than asked), else the config's:
    the cells' params and steps are counted as the train stage will count them."""
    meta = TOKENIZER_DIR / "tokenizer.json"
    try:
        return int(read_json(meta)["vocab_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return params.tokenizer.vocab_size


def find_cell(cells: list[Cell], budget: float, depth: int) -> Cell:
    name = cell_name(budget, depth)
    for cell in cells:
        if cell.name == name:
            return cell
    raise ConfigError(f"cell {name}: not in the grid of sweep.budgets x sweep.depths ({len(cells)} cells); "
                      "dvc.yaml and params.yaml disagree")


def cell_dir(cell: Cell | str) -> Path:
    return SWEEP_DIR / (cell if isinstance(cell, str) else cell.name)


def recipe_key(params: Params) -> str:
    """What makes two cells comparable: the train recipe (less what a cell sets) and the vocabulary."""
    recipe = params.train.model_dump(mode="json")
    for key in ("depth", "num_iterations", "target_flops", "target_param_data_ratio"):
        recipe.pop(key, None)
    recipe["vocab_size"] = params.tokenizer.vocab_size
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def open_parent(params: Params) -> str | None:
    """The sweep's MLflow parent run (None when tracking is off or away)."""
    from nanoforge.tracking import open_pipeline_run

    key = recipe_key(params)
    return open_pipeline_run(f"sweep:{key}", run_name=f"sweep {key}",
                             tags={"nanoforge.kind": "sweep", "sweep.recipe": key})


def train_command(cell: Cell, params_file: str) -> list[str]:
    return [sys.executable, "-m", "nanoforge.launch", "--params", params_file, "stages.train",
            "--params", params_file, "--set", f"depth={cell.depth}", "--set", f"target_flops={cell.budget!r}",
            "--set", "num_iterations=null"]


def run_cell(cell: Cell, params: Params, params_file: str, parent: str | None) -> int:
    """Train the cell to its budget (resuming its own checkpoint); the train stage's exit code."""
    env = {**os.environ, RUN_DIR_ENV: str(cell_dir(cell))}
    if parent:
        env["NANOFORGE_PARENT_RUN_ID"] = parent
    print(f"[sweep] cell {cell.name}: depth {cell.depth}, {cell.num_params:,} params, {cell.num_iterations} steps "
          f"to {cell.budget:.3g} FLOPs -> {cell_dir(cell)}", flush=True)
    return subprocess.call(train_command(cell, params_file), env=env)


def write_row(cell: Cell, params: Params) -> dict:
    """cell.json from the grid and the cell's train metrics; the fit's input row."""
    train = read_json(cell_dir(cell) / "train" / "metrics.json")
    details = read_json(cell_dir(cell) / "train" / "details.json") if (cell_dir(cell) / "train" / "details.json").exists() else {}
    row = {**cell.to_dict(), "flops": cell.flops,
           **{f"params_{c}": cell.params(c) for c in PARAM_CONVENTIONS},
           "val_bpb": train.get("val_bpb"), "tokens_trained": train.get("tokens_trained", train.get("tokens")),
           "train_seconds": train.get("train_seconds", details.get("train_seconds")),
           "mlflow_run_id": details.get("mlflow_run_id"), "recipe": recipe_key(params)}
    if row["val_bpb"] is None:
        raise ConfigError(f"cell {cell.name}: the train run wrote no val BPB ({cell_dir(cell)}/train/metrics.json); "
                          "train.eval_every must be > 0 for a sweep")
    write_json(cell_dir(cell) / CELL_FILE, row)
    return row


def tag_child(row: dict) -> None:
    """Name the cell's train run after the cell, so the parent's children read as the grid."""
    if not row.get("mlflow_run_id") or os.environ.get("NANOFORGE_TRACKING", "on") == "off":
        return
    try:
        from mlflow.tracking import MlflowClient

        from nanoforge.tracking import tracking_uri

        client = MlflowClient(tracking_uri=tracking_uri())
        client.set_tag(row["mlflow_run_id"], "mlflow.runName", f"cell {row['name']}")
        for key in ("name", "budget", "depth", "num_iterations"):
            client.set_tag(row["mlflow_run_id"], f"sweep.{key}", str(row[key]))
    except Exception as exc:  # tracking never fails a cell
        print(f"[sweep] warning: could not tag the MLflow run of {row['name']}: {exc}", file=sys.stderr)


def finished_rows(cells: list[Cell]) -> tuple[list[dict], list[str]]:
    """(rows of the finished cells, names of the missing ones)."""
    rows, missing = [], []
    for cell in cells:
        path = cell_dir(cell) / CELL_FILE
        (rows.append(read_json(path)) if path.exists() else missing.append(cell.name))
    return rows, missing
