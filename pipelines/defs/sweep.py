"""The scaling-law sweep (sweep/dvc.yaml) in Dagster: `sweep`, one partition per cell, and `scaling_laws`.

Notable:
- Present only where the project has sweep/dvc.yaml. The grid is params.yaml's `sweep:`
  (budgets x depths), a two-dimensional partitioning, so the UI shows the grid, which
  cells are done, and backfills the missing ones. A partition runs
  `dvc repro --single-item sweep/dvc.yaml:sweep@<budget>-<depth>`: DVC skips a finished
  cell, resumes a killed one from its checkpoint (artifacts/sweep/<cell>/checkpoints).
- `scaling_laws` runs the fit stage over every cell, with three checks: every cell
  finished, the fits finite, and a + b = 1 within sweep.sum_tolerance (a finding, not a
  blocker: the check's text says how far off it is and why it may be).
- Neither is in the `pipeline`/`retrain` jobs (they come from dvc.yaml): the sweep is
  hours on a GPU node, run on purpose.
"""

import json
import math
from pathlib import Path

import dagster as dg

from nanoforge.config import SweepConfig, parse_yaml
from nanoforge.sweep.grid import cell_name
from pipelines.defs.resources import DvcResource, MlflowResource
from pipelines.defs.step import DEFAULT_OWNERS, POOL, common_metadata
from pipelines.project import Project

SWEEP_FILE = "sweep/dvc.yaml"
GROUP = "sweep"
CHECKS = ("cells_finished", "fits_finite", "a_plus_b_near_1")


def sweep_config(root: Path) -> SweepConfig:
    raw = parse_yaml((root / "params.yaml").read_text()) or {} if (root / "params.yaml").exists() else {}
    return SweepConfig.model_validate(raw.get("sweep") or {})


def grid_partitions(cfg: SweepConfig) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition({
        "budget": dg.StaticPartitionsDefinition(list(cfg.budgets)),
        "depth": dg.StaticPartitionsDefinition([str(d) for d in cfg.depths]),
    })


def stage_target(budget: str, depth: str) -> str:
    """The DVC name of a cell's stage (DVC builds it from the matrix values' text)."""
    return f"{SWEEP_FILE}:sweep@{budget}-{depth}"


def fit_checks(root: Path, cfg: SweepConfig) -> list[dg.AssetCheckResult]:
    """The three checks, from artifacts/scaling_laws/scaling_laws.json and the cells' rows."""
    path = root / "artifacts/scaling_laws/scaling_laws.json"
    fit = json.loads(path.read_text()) if path.exists() else {}
    names = {cell_name(float(b), d) for b in cfg.budgets for d in cfg.depths}
    done = {n for n in names if (root / "artifacts/sweep" / n / "cell.json").exists()}
    numbers = {k: fit.get(k) for k in ("a", "b", "ratio")}
    finite = bool(fit) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers.values())
    dev = fit.get("sum_deviation")
    near = isinstance(dev, (int, float)) and math.isfinite(dev) and abs(dev) <= cfg.sum_tolerance
    return [
        dg.AssetCheckResult(check_name="cells_finished", passed=done == names, metadata={
            "finished": len(done), "cells": len(names), "missing": ", ".join(sorted(names - done)) or "none"}),
        dg.AssetCheckResult(check_name="fits_finite", passed=finite,
                            metadata={**{k: float(v) for k, v in numbers.items() if isinstance(v, (int, float))},
                                      "finding": fit.get("finding") or ("no fit yet" if not fit else "fitted")}),
        dg.AssetCheckResult(check_name="a_plus_b_near_1", passed=near, severity=dg.AssetCheckSeverity.WARN,
                            metadata={"finding": fit.get("sum_check", "no fit"),
                                      "tolerance": cfg.sum_tolerance}),
    ]


def sweep_assets(project: Project) -> list[dg.AssetsDefinition]:
    cfg = sweep_config(project.root)
    partitions = grid_partitions(cfg)
    tokenizer = [dg.AssetKey("tokenizer")] if project.stage("tokenizer") else []

    @dg.asset(
        key="sweep", partitions_def=partitions, deps=tokenizer, group_name=GROUP, kinds={"dvc", "pytorch"},
        owners=list(DEFAULT_OWNERS), pool=POOL,
        description="One cell of the scaling-law grid (sweep.budgets x sweep.depths): the train recipe at this "
                    "depth trained to exactly this budget. Runs `dvc repro --single-item "
                    "sweep/dvc.yaml:sweep@<budget>-<depth>`; outputs in artifacts/sweep/<cell>/.",
    )
    def sweep(context: dg.AssetExecutionContext, dvc: DvcResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        keys = context.partition_key.keys_by_dimension
        name = cell_name(float(keys["budget"]), int(keys["depth"]))
        result, _ = dvc.run(context, ["repro", "--single-item", stage_target(keys["budget"], keys["depth"])],
                            mlflow.env())
        metadata = common_metadata(project, result)
        row_path = project.root / "artifacts/sweep" / name / "cell.json"
        row = json.loads(row_path.read_text()) if row_path.exists() else {}
        for key in ("val_bpb", "num_params", "tokens_trained", "num_iterations", "train_seconds"):
            if isinstance(row.get(key), (int, float)):
                metadata[key] = dg.MetadataValue.float(float(row[key]))
        metadata["cell"] = dg.MetadataValue.text(name)
        return dg.MaterializeResult(metadata=metadata)

    @dg.asset(
        key="scaling_laws", deps=[sweep.key], group_name=GROUP, kinds={"dvc", "python"}, owners=list(DEFAULT_OWNERS),
        pool=POOL, check_specs=[dg.AssetCheckSpec(c, asset="scaling_laws", blocking=c != "a_plus_b_near_1")
                                for c in CHECKS],
        description="isoFLOP parabolas and N* ~ C^a, D* ~ C^b from every finished cell: "
                    "artifacts/scaling_laws/scaling_laws.json, reports/sweep/scaling_laws.html. Runs "
                    "`dvc repro --single-item sweep/dvc.yaml:scaling_laws`.",
    )
    def scaling_laws(context: dg.AssetExecutionContext, dvc: DvcResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        result, _ = dvc.run(context, ["repro", "--single-item", f"{SWEEP_FILE}:scaling_laws"], mlflow.env())
        metadata = common_metadata(project, result)
        path = project.root / "artifacts/scaling_laws/scaling_laws.json"
        fit = json.loads(path.read_text()) if path.exists() else {}
        for key in ("a", "a_stderr", "b", "b_stderr", "ratio", "sum_deviation"):
            if isinstance(fit.get(key), (int, float)) and math.isfinite(fit[key]):
                metadata[key] = dg.MetadataValue.float(float(fit[key]))
        page = project.root / "reports/sweep/scaling_laws.md"
        if page.exists():
            metadata["page"] = dg.MetadataValue.md(page.read_text())
        return dg.MaterializeResult(metadata=metadata, check_results=fit_checks(project.root, cfg))

    return [sweep, scaling_laws]


def defs(project: Project) -> dg.Definitions:
    if not (project.root / SWEEP_FILE).exists():
        return dg.Definitions()
    return dg.Definitions(assets=sweep_assets(project))
