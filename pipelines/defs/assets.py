"""Assets: one per dvc.yaml stage (the data they start from is in data.py, the remote in remote.py).

Notable:
- Built from dvc.yaml at load time: adding a stage there adds an asset here, with
  its upstream assets found from paths (deps vs outs), its description from the
  stage, and group/kinds/owners from the stage's `meta: {dagster: ...}` when given.
- Materializing runs `dvc repro --single-item <stage>` through Pipes (resources.py).
  Up to date means DVC skips the command in well under a second; the asset still
  attaches the metadata of the outputs on disk and says it was up to date.
- Data version = the DVC hash of the asset's outputs (dvc.lock / data.dvc); code
  version = the command, params values and code the stage reads. So Dagster calls
  an asset unsynced exactly when `dvc status` calls its stage changed.
"""

import re
from pathlib import Path

import dagster as dg

from pipelines import dvc_graph
from pipelines.defs import checks
from pipelines.defs.metadata import humanize, stage_metadata
from pipelines.defs.resources import DvcResource, MlflowResource
from pipelines.defs.step import (
    DEFAULT_GROUP, DEFAULT_OWNERS, POOL, Step, check_input, common_metadata, mlflow_run_id, stage_command,
)
from pipelines.dvc_graph import Stage
from pipelines.project import DATA_IMPORT, Project, asset_name, upstream_asset


def _kinds(stage: Stage, dag: dict) -> set[str]:
    kinds = ["dvc"]
    if "torchrun" in stage.cmd:
        kinds.append("pytorch")
    elif "python" in stage.cmd:
        kinds.append("python")
    kinds += [k for k in dag.get("kinds", []) if k not in kinds]
    return set(kinds[:3])  # the UI shows up to three


def _describe(stage: Stage, produced_by: dict[str, str]) -> str:
    lines = [stage.desc or f"DVC stage `{stage.name}`.", "", f"`dvc repro --single-item {stage.name}` runs:",
             "", f"    {stage.cmd}", ""]
    code = [d for d in stage.deps if d not in produced_by]
    data = [f"{d} (from {produced_by[d]})" for d in stage.deps if d in produced_by]
    if data:
        lines.append("- **Reads:** " + ", ".join(data))
    if code:
        lines.append("- **Code:** " + ", ".join(code))
    if stage.params:
        lines.append("- **Params:** " + ", ".join(k if f == "params.yaml" else f"{f}:{k}" for f, k in stage.params))
    lines.append("- **Writes:** " + ", ".join(o.path + ("" if o.cache else " (not cached)") for o in stage.outs))
    return "\n".join(lines)


def _line_of(root: Path, stage: str) -> int:
    for i, line in enumerate((root / "dvc.yaml").read_text().splitlines(), start=1):
        if re.match(rf"^\s{{2}}{re.escape(stage)}\s*:", line):
            return i
    return 1


def _outs_table(hashes: dict[str, str]) -> dg.MetadataValue:
    rows = "\n".join(f"| `{p}` | `{h}` |" for p, h in sorted(hashes.items()))
    return dg.MetadataValue.md("| output | DVC hash |\n|---|---|\n" + rows)


def _produced_by(project: Project, stage: Stage) -> dict[str, str]:
    """dep path -> the asset that writes it."""
    found = {}
    for dep in stage.deps:
        for up in project.graph[stage.name]:
            owner = project.stage(up)
            paths = owner.out_paths if owner else [i.path for i in project.imports if i.dvc_file == up]
            if any(dvc_graph.overlaps(dep, p) for p in paths):
                found[dep] = upstream_asset(up, project.imports)
    return found


def stage_asset(project: Project, stage: Stage) -> dg.AssetsDefinition:
    key = dg.AssetKey(asset_name(stage.name))
    dag = (stage.meta or {}).get("dagster") or {}
    produced = [o for s in project.stages for o in s.out_paths] + [i.path for i in project.imports]
    static = {
        "dvc_stage": dg.MetadataValue.text(stage.name),
        "dvc_cmd": dg.MetadataValue.text(stage.cmd),
        "dvc_outs": dg.MetadataValue.text(", ".join(stage.out_paths)),
        "defined_at": dg.MetadataValue.text(f"dvc.yaml:{_line_of(project.root, stage.name)}"),
    }

    @dg.asset(
        key=key,
        deps=[dg.AssetKey(upstream_asset(up, project.imports)) for up in project.graph[stage.name]],
        group_name=dag.get("group", DEFAULT_GROUP),
        kinds=_kinds(stage, dag),
        owners=list(dag.get("owners", DEFAULT_OWNERS)),
        description=_describe(stage, _produced_by(project, stage)),
        code_version=dvc_graph.code_version(stage, project.root, produced),
        pool=POOL,
        check_specs=checks.specs_for(stage.name, key),
        metadata=static,
    )
    def _stage(context: dg.AssetExecutionContext, dvc: DvcResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        step = Step(context, project, mlflow)
        args, extra = stage_command(context, stage)  # a bad resume tag fails here, before any work
        try:
            result, reported = dvc.run(context, args, {**step.env(), **extra})
        except BaseException as exc:
            step.failed(exc)
            raise
        hashes = dvc_graph.lock_outs(project.root).get(stage.name, {})
        metadata = common_metadata(project, result)
        metadata.update(stage_metadata(stage, project.root))
        metadata.update(humanize(reported))  # the stage's own report wins over the files; rounded for people
        metadata.update(mlflow.run_link(mlflow_run_id(metadata)))
        if hashes:
            metadata["dvc_outs"] = _outs_table(hashes)
        version = dvc_graph.version_of(hashes)
        results = checks.evaluate(stage.name, key, check_input(project, mlflow))
        step.done(results, stage.name, result)
        return dg.MaterializeResult(metadata=metadata, check_results=results,
                                    data_version=dg.DataVersion(version) if version else None)

    return _stage


def other_imports(project: Project) -> list[dg.AssetSpec]:
    """Other `.dvc` files: shown as external assets so edges to them exist."""
    return [dg.AssetSpec(upstream_asset(i.dvc_file, project.imports), group_name="data", kinds={"dvc"},
                         description=f"{i.path}, tracked by {i.dvc_file} (`dvc add`); not produced by this pipeline.")
            for i in project.imports if i != DATA_IMPORT]


def defs(project: Project) -> dg.Definitions:
    return dg.Definitions(assets=[*other_imports(project), *(stage_asset(project, s) for s in project.stages)])
