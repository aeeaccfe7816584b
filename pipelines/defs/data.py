"""Data assets: the FineWeb-Edu shards (partitioned) and `download`, the versioned data/ folder.

Notable:
- `fineweb_shards` has one partition per shard the params ask for; a backfill
  fetches the missing ones in one run (`--only-shards ... --no-dvc-add`).
- `download` runs the whole download stage: the rest of the shards, the eval bundle,
  the manifest and the one `dvc add data` that versions it all in data.dvc. Its
  data version is data.dvc's hash; shards it fetched show as materialized partitions.
"""

import hashlib
import json
import sys
import warnings
from pathlib import Path

import dagster as dg
import yaml

from nanoforge.config import DownloadConfig
from pipelines.defs import checks
from pipelines.defs.resources import DvcResource, MlflowResource
from pipelines.defs.step import DEFAULT_OWNERS, POOL, Step, check_input, common_metadata, mlflow_run_id
from pipelines.project import DOWNLOAD, SHARDS, Project, data_dvc_md5

# backfill_policy is "beta" in Dagster 1.13; it is what makes a backfill one download run
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)


def shard_partitions(cfg: DownloadConfig) -> dg.StaticPartitionsDefinition:
    indices = list(range(cfg.num_train_shards)) + [cfg.val_index]
    return dg.StaticPartitionsDefinition([str(i) for i in indices])


def _manifest(root: Path) -> dict:
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
        before = data_dvc_md5(project.root)
        try:
            result, reported = dvc.run(context, [python, "-m", "stages.download"], step.env(), exec_cmd=True)
        except BaseException as exc:
            step.failed(exc)
            raise
        after = data_dvc_md5(project.root)
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
        metadata = common_metadata(project, result)
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
        metadata.update(mlflow.run_link(mlflow_run_id(metadata)))
        if after:
            metadata["data_dvc_md5"] = dg.MetadataValue.text(after)
        results = checks.evaluate(DOWNLOAD, dg.AssetKey(DOWNLOAD), check_input(project, mlflow))
        step.done(results, DOWNLOAD, result)
        return dg.MaterializeResult(metadata=metadata, check_results=results,
                                    data_version=dg.DataVersion(after) if after else None)

    return [fineweb_shards, download]


def defs(project: Project) -> dg.Definitions:
    return dg.Definitions(assets=data_assets(project))
