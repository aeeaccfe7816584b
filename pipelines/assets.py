"""Assets: one per dvc.yaml stage, plus the data they start from and the DVC remote they end in.

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
- Data: `fineweb_shards` (one partition per shard the params ask for; a backfill
  fetches the missing ones in one run) feeds `download`, which runs the whole
  download stage: the rest of the shards, the eval bundle, the manifest and the one
  `dvc add data` that versions it all in data.dvc.
- Every asset that runs DVC is in the `dvc` pool (limit 1 in .dagster/dagster.yaml):
  DVC holds a repo lock, so they never run at once.
"""

import hashlib
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import yaml
from pydantic import ValidationError

from pipelines import checks, dvc_graph
from pipelines.dvc_graph import Import, Stage
from pipelines.metadata import stage_metadata
from pipelines.resources import DvcResource, MlflowResource
from nanoforge.config import ConfigError, DownloadConfig, Params, PipelineConfig, _format_errors, parse_yaml
from nanoforge.tracking import PARENT_ENV, git_info

POOL = "dvc"
DOWNLOAD, SHARDS, REMOTE = "download", "fineweb_shards", "dvc_remote"
DATA_IMPORT = Import("data.dvc", "data")  # written by the download stage, not by dvc.yaml
DEFAULT_GROUP = "pipeline"
DEFAULT_OWNERS = ("team:nanoforge",)


@dataclass
class Project:
    """Everything the definitions are built from, read once at load time."""

    root: Path
    stages: list[Stage]
    imports: list[Import]
    graph: dict[str, list[str]]  # stage -> upstream stages / .dvc files
    pipeline: PipelineConfig
    download: DownloadConfig
    order: list[dg.AssetKey] = field(default_factory=list)  # every pipeline asset, upstream first

    @property
    def stage_keys(self) -> list[dg.AssetKey]:
        return [key_for(s.name) for s in self.stages]


def key_for(name: str) -> dg.AssetKey:
    return dg.AssetKey(re.sub(r"[^A-Za-z0-9_]", "_", name))


def asset_for_upstream(name: str, imports: list[Import]) -> dg.AssetKey:
    if name == DATA_IMPORT.dvc_file:
        return dg.AssetKey(DOWNLOAD)
    if any(i.dvc_file == name for i in imports):
        return key_for("dvc_" + Path(name).stem)
    return key_for(name)


def load_project(root: str | Path) -> Project:
    root = Path(root).resolve()
    stages = dvc_graph.load_stages(root)
    imports = [DATA_IMPORT] + [i for i in dvc_graph.load_imports(root) if i.dvc_file != DATA_IMPORT.dvc_file]
    graph = dvc_graph.upstream(stages, imports)
    raw = (parse_yaml((root / "params.yaml").read_text()) or {}) if (root / "params.yaml").exists() else {}
    # only the sections read here are validated: a typo in train's section is train's error, not the UI's
    subset = {k: raw[k] for k in ("pipeline", "download") if k in raw}
    try:
        sections = Params.model_validate(subset)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, str(root / "params.yaml"), subset)) from None
    project = Project(root, stages, imports, graph, sections.pipeline, sections.download)
    order = [dg.AssetKey(SHARDS), dg.AssetKey(DOWNLOAD)]
    order += [key_for(n) for n in dvc_graph.topological(graph)]
    project.order = order + [dg.AssetKey(REMOTE)]
    return project


# --- what every pipeline step does around its command

def run_assets(context: dg.AssetExecutionContext) -> set[dg.AssetKey]:
    selected = context.run.asset_selection
    if not selected:
        selected = context.job_def.asset_layer.executable_asset_keys
    return set(selected)


def is_last_step(context: dg.AssetExecutionContext, project: Project) -> bool:
    """Every other pipeline asset of this run has finished (so this step closes the MLflow parent run).

    Asked of the event log rather than of a fixed order: the executor picks the order
    among siblings (report and register both follow evaluate).
    """
    others = {k.to_user_string() for k in project.order if k in run_assets(context)} - {context.asset_key.to_user_string()}
    if not others:
        return True
    done = {e.step_key for e in context.instance.all_logs(context.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)}
    return others <= done


def _interrupted(exc: BaseException) -> bool:
    return isinstance(exc, (KeyboardInterrupt, dg.DagsterExecutionInterruptedError)) or (
        isinstance(exc, dg.Failure) and "cancelled" in (exc.description or ""))


@dataclass
class Step:
    """The MLflow parent run around one asset's command; closes it on failure or at the run's end."""

    context: dg.AssetExecutionContext
    project: Project
    mlflow: MlflowResource
    parent: str | None = None

    def env(self) -> dict[str, str]:
        self.parent = self.mlflow.open_parent(self.context)
        return {**self.mlflow.env(), **({PARENT_ENV: self.parent} if self.parent else {})}

    def failed(self, exc: BaseException) -> None:
        self.mlflow.close_parent(self.parent, "KILLED" if _interrupted(exc) else "FAILED",
                                 {"failed_asset": self.context.asset_key.to_user_string()})

    def done(self, check_results: list[dg.AssetCheckResult], asset: str, result: dict | None = None) -> None:
        if result is not None:
            status = result["status"]
            self.mlflow.note_step(self.parent, asset, ("ran" if status == "ran" else "up to date" if status in (
                "skipped", "restored") else status) + f" ({float(result.get('seconds') or 0):.1f}s)")
        blocked = checks.blocking_failures(asset, check_results)
        if blocked:
            self.mlflow.close_parent(self.parent, "FAILED", {"failed_check": ",".join(blocked)})
        elif is_last_step(self.context, self.project):
            self.mlflow.close_parent(self.parent, "FINISHED")


def _check_input(project: Project, mlflow: MlflowResource) -> checks.CheckInput:
    def champion():
        from nanoforge.registry import champion_scores

        return champion_scores(project.pipeline.registered_model, mlflow.uri)

    return checks.CheckInput(project.root, project.pipeline, champion)


def _common_metadata(project: Project, result: dict) -> dict[str, dg.MetadataValue]:
    status = result["status"]
    text = {
        "ran": f"ran: `{result['command']}`",
        "skipped": "up to date: DVC skipped the command; the metadata below describes the outputs on disk",
        "restored": "restored from DVC's run cache (same inputs ran before); not re-run",
    }.get(status, status)
    git = git_info(project.root)
    return {
        "dvc_status": dg.MetadataValue.text(text),
        "up_to_date": dg.MetadataValue.bool(status in ("skipped", "restored")),
        "duration_s": dg.MetadataValue.float(float(result.get("seconds") or 0.0)),
        "git_commit": dg.MetadataValue.text(git["git_commit"] + (" (dirty)" if git["git_dirty"] == "true" else "")),
    }


def _outs_table(hashes: dict[str, str]) -> dg.MetadataValue:
    rows = "\n".join(f"| `{p}` | `{h}` |" for p, h in sorted(hashes.items()))
    return dg.MetadataValue.md("| output | DVC hash |\n|---|---|\n" + rows)


def _mlflow_run_id(metadata: dict[str, dg.MetadataValue]) -> str | None:
    value = metadata.get("mlflow_run_id")
    return getattr(value, "value", value) if value is not None else None


# --- one asset per dvc.yaml stage

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


def stage_asset(project: Project, stage: Stage) -> dg.AssetsDefinition:
    key = key_for(stage.name)
    dag = (stage.meta or {}).get("dagster") or {}
    produced = [o for s in project.stages for o in s.out_paths] + [i.path for i in project.imports]
    produced_by = {}
    for dep in stage.deps:
        for up in project.graph[stage.name]:
            owner = next((s for s in project.stages if s.name == up), None)
            paths = owner.out_paths if owner else [i.path for i in project.imports if i.dvc_file == up]
            if any(dvc_graph.overlaps(dep, p) for p in paths):
                produced_by[dep] = asset_for_upstream(up, project.imports).to_user_string()
    static = {
        "dvc_stage": dg.MetadataValue.text(stage.name),
        "dvc_cmd": dg.MetadataValue.text(stage.cmd),
        "dvc_outs": dg.MetadataValue.text(", ".join(stage.out_paths)),
        "defined_at": dg.MetadataValue.text(f"dvc.yaml:{_line_of(project.root, stage.name)}"),
    }

    @dg.asset(
        key=key,
        deps=[asset_for_upstream(up, project.imports) for up in project.graph[stage.name]],
        group_name=dag.get("group", DEFAULT_GROUP),
        kinds=_kinds(stage, dag),
        owners=list(dag.get("owners", DEFAULT_OWNERS)),
        description=_describe(stage, produced_by),
        code_version=dvc_graph.code_version(stage, project.root, produced),
        pool=POOL,
        check_specs=checks.specs_for(stage.name, key),
        metadata=static,
    )
    def _stage(context: dg.AssetExecutionContext, dvc: DvcResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        step = Step(context, project, mlflow)
        try:
            result, reported = dvc.run(context, ["repro", "--single-item", stage.name], step.env())
        except BaseException as exc:
            step.failed(exc)
            raise
        hashes = dvc_graph.lock_outs(project.root).get(stage.name, {})
        metadata = _common_metadata(project, result)
        metadata.update(stage_metadata(stage, project.root))
        metadata.update(reported)  # the stage's own report wins over what the files say
        metadata.update(mlflow.run_link(_mlflow_run_id(metadata)))
        if hashes:
            metadata["dvc_outs"] = _outs_table(hashes)
        version = dvc_graph.version_of(hashes)
        results = checks.evaluate(stage.name, key, _check_input(project, mlflow))
        step.done(results, stage.name, result)
        return dg.MaterializeResult(metadata=metadata, check_results=results,
                                    data_version=dg.DataVersion(version) if version else None)

    return _stage


# --- the data: shards (partitioned) and the versioned data/ folder

# backfill_policy is "beta" in Dagster 1.13; it is what makes a backfill one download run
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

def shard_partitions(cfg: DownloadConfig) -> dg.StaticPartitionsDefinition:
    indices = list(range(cfg.num_train_shards)) + [cfg.val_shard]
    return dg.StaticPartitionsDefinition([str(i) for i in indices])


def _data_dvc_md5(root: Path) -> str | None:
    return (dvc_graph.import_hashes(root).get(DATA_IMPORT.dvc_file) or {}).get(DATA_IMPORT.path)


def _manifest(root: Path) -> dict:
    import json

    try:
        return json.loads((root / "data/fineweb/MANIFEST.json").read_text())
    except (OSError, ValueError):
        return {}


def _download_code_version(project: Project) -> str:
    files = [project.root / f for f in ("stages/download.py", "nanoforge/data/download.py", "nanoforge/data/fetch.py",
                                        "nanoforge/data/shards.py", "nanoforge/data/eval_bundle.py")]
    blob = yaml.safe_dump(project.download.model_dump(mode="json"), sort_keys=True)
    blob += "".join(hashlib.md5(f.read_bytes()).hexdigest() for f in files if f.exists())
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_assets(project: Project) -> list[dg.AssetsDefinition]:
    partitions = shard_partitions(project.download)
    python = sys.executable

    @dg.asset(
        key=SHARDS,
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name="data",
        kinds={"python", "parquet"},
        owners=list(DEFAULT_OWNERS),
        description=(
            "FineWeb-Edu parquet shards in data/fineweb/, one partition per shard the `download` params ask for "
            "(training shards 0..num_train_shards-1 and the pinned val shard). A backfill of the missing "
            "partitions fetches them in one run (`python -m stages.download --only-shards ... --no-dvc-add`); "
            "the `download` asset then versions data/ once."
        ),
    )
    def fineweb_shards(context: dg.AssetExecutionContext, dvc: DvcResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        step = Step(context, project, mlflow)
        keys = list(context.partition_keys)
        try:
            result, reported = dvc.run(context, [python, "-m", "stages.download", "--only-shards", ",".join(keys),
                                                 "--no-dvc-add"], step.env(), exec_cmd=True)
        except BaseException as exc:
            step.failed(exc)
            raise
        import pyarrow.parquet as pq

        from nanoforge.common import FINEWEB_DIR, shard_name

        rows = size = 0
        for k in keys:
            path = project.root / FINEWEB_DIR / shard_name(int(k))
            rows += pq.ParquetFile(path).metadata.num_rows
            size += path.stat().st_size
        step.done([], SHARDS, result)
        return dg.MaterializeResult(metadata={
            "shards": dg.MetadataValue.int(len(keys)), "rows": dg.MetadataValue.int(rows),
            "bytes": dg.MetadataValue.int(size), "duration_s": dg.MetadataValue.float(result["seconds"]), **reported,
        })

    @dg.asset(
        key=DOWNLOAD,
        deps=[fineweb_shards],
        group_name="data",
        kinds={"python", "dvc"},
        owners=list(DEFAULT_OWNERS),
        description=(
            "data/: the FineWeb-Edu shards the params ask for, their MANIFEST.json and the CORE eval bundle, "
            "versioned by `dvc add data` (data.dvc). Runs `python -m stages.download`, which fetches only what "
            "is missing or invalid. Data version = data.dvc's hash."
        ),
        code_version=_download_code_version(project),
        pool=POOL,
        check_specs=checks.specs_for(DOWNLOAD, dg.AssetKey(DOWNLOAD)),
    )
    def download(context: dg.AssetExecutionContext, dvc: DvcResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        step = Step(context, project, mlflow)
        before = _data_dvc_md5(project.root)
        try:
            result, reported = dvc.run(context, [python, "-m", "stages.download"], step.env(), exec_cmd=True)
        except BaseException as exc:
            step.failed(exc)
            raise
        after = _data_dvc_md5(project.root)
        manifest = _manifest(project.root)
        # shards fetched here count as materialized partitions too, so the UI shows which exist
        have = context.instance.get_materialized_partitions(dg.AssetKey(SHARDS))
        valid = set(partitions.get_partition_keys())
        for entry in manifest.get("shards", []):
            key = str(entry["index"])
            if key in valid and key not in have:
                context.log_event(dg.AssetMaterialization(asset_key=SHARDS, partition=key, metadata={
                    "rows": entry.get("rows"), "bytes": entry.get("bytes"), "sha256": entry.get("sha256", ""),
                    "via": "download"}))
        metadata = _common_metadata(project, result)
        metadata["dvc_status"] = dg.MetadataValue.text(
            "new data version (data.dvc changed)" if before != after else "unchanged: data/ was already complete")
        metadata["up_to_date"] = dg.MetadataValue.bool(before == after and before is not None)
        totals = manifest.get("totals") or {}
        metadata.update({
            "shards": dg.MetadataValue.int(len(manifest.get("shards", []))),
            "train_shards": dg.MetadataValue.int(len(manifest.get("train_shards", []))),
            "rows": dg.MetadataValue.int(sum(t.get("rows", 0) for t in totals.values())),
            "chars": dg.MetadataValue.int(sum(t.get("chars", 0) for t in totals.values())),
            "bytes": dg.MetadataValue.int(sum(t.get("bytes", 0) for t in totals.values())),
        })
        metadata.update(reported)
        metadata.update(mlflow.run_link(_mlflow_run_id(metadata)))
        if after:
            metadata["data_dvc_md5"] = dg.MetadataValue.text(after)
        results = checks.evaluate(DOWNLOAD, dg.AssetKey(DOWNLOAD), _check_input(project, mlflow))
        step.done(results, DOWNLOAD, result)
        return dg.MaterializeResult(metadata=metadata, check_results=results,
                                    data_version=dg.DataVersion(after) if after else None)

    return [fineweb_shards, download]


def other_imports(project: Project) -> list[dg.AssetSpec]:
    """Other `.dvc` files: shown as external assets so edges to them exist."""
    return [dg.AssetSpec(asset_for_upstream(i.dvc_file, project.imports), group_name="data", kinds={"dvc"},
                         description=f"{i.path}, tracked by {i.dvc_file} (`dvc add`); not produced by this pipeline.")
            for i in project.imports if i != DATA_IMPORT]


# --- the end: the DVC remote

def _remote_url(root: Path) -> str | None:
    import configparser

    parser = configparser.ConfigParser()
    parser.read([root / ".dvc/config", root / ".dvc/config.local"])
    name = parser.get("core", "remote", fallback=None)
    if not name:
        return None
    return parser.get(f"'remote \"{name}\"'", "url", fallback=None) or parser.get(f'remote "{name}"', "url", fallback=None)


def remote_asset(project: Project) -> dg.AssetsDefinition:
    @dg.asset(
        key=REMOTE,
        deps=[dg.AssetKey(DOWNLOAD), *project.stage_keys],
        group_name="publish",
        kinds={"dvc"},
        owners=list(DEFAULT_OWNERS),
        description="`dvc push`: the DVC remote holds data/ and every cached stage output of this dvc.lock, so "
                    "`git checkout <commit> && dvc pull` brings this run back anywhere.",
        pool=POOL,
    )
    def dvc_remote(context: dg.AssetExecutionContext, dvc: DvcResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        step = Step(context, project, mlflow)
        try:
            result, _ = dvc.run(context, ["push"], step.env())
        except BaseException as exc:
            step.failed(exc)
            raise
        tail = result.get("output_tail", "")
        pushed = re.search(r"(\d+) files? pushed", tail)
        digest = hashlib.sha256(b"".join((project.root / f).read_bytes() for f in ("dvc.lock", "data.dvc")
                                          if (project.root / f).exists())).hexdigest()[:16]
        step.done([], REMOTE, result)
        return dg.MaterializeResult(data_version=dg.DataVersion(digest), metadata={
            "remote": dg.MetadataValue.text(_remote_url(project.root) or "(default remote)"),
            "files_pushed": dg.MetadataValue.int(int(pushed.group(1)) if pushed else 0),
            "dvc_status": dg.MetadataValue.text("everything was already on the remote" if not pushed else "pushed"),
            "duration_s": dg.MetadataValue.float(float(result.get("seconds") or 0.0)),
        })

    return dvc_remote


def build_assets(project: Project) -> list:
    return [*data_assets(project), *other_imports(project), *(stage_asset(project, s) for s in project.stages),
            remote_asset(project)]
