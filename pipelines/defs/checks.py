"""Asset checks: what must hold of a stage's outputs before anything downstream uses them.

Notable:
- Checks run inside the asset's own step, right after DVC (a check needs the stage's
  files, and a DVC no-op is cheap), so one step per stage; blocking ones stop the
  downstream assets of the run when they fail.
- Keyed by stage name: a stage missing from dvc.yaml simply has no checks, and a
  new stage needs none to become an asset.
- Thresholds come from params.yaml's `pipeline:` section.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import dagster as dg

from nanoforge.config import PipelineConfig

ERROR, WARN = dg.AssetCheckSeverity.ERROR, dg.AssetCheckSeverity.WARN


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    blocking: bool
    severity: dg.AssetCheckSeverity
    fn: Callable[["CheckInput"], tuple[bool, str, dict]]


@dataclass
class CheckInput:
    root: Path
    pipeline: PipelineConfig
    champion: Callable[[], dict | None]  # lazy: only the checks that need MLflow import it

    def json(self, rel: str) -> dict | None:
        path = self.root / rel
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- download

def shards_valid(inp: CheckInput) -> tuple[bool, str, dict]:
    """Every shard in the manifest exists, has its recorded size, a readable footer, a text column and rows."""
    import pyarrow.parquet as pq

    manifest_path = inp.root / "data/fineweb/MANIFEST.json"
    manifest = inp.json("data/fineweb/MANIFEST.json")
    if not manifest or not manifest.get("shards"):
        return False, f"{manifest_path.relative_to(inp.root)} is missing or lists no shards", {}
    problems, rows = [], 0
    for entry in manifest["shards"]:
        path = manifest_path.parent / entry["file"]
        if not path.exists():
            problems.append(f"{entry['file']}: missing")
            continue
        if entry.get("bytes") is not None and path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['file']}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
            continue
        try:  # the footer only: cheap even for 100 MB shards
            meta = pq.ParquetFile(path)
            n = meta.metadata.num_rows
            if "text" not in meta.schema_arrow.names:
                problems.append(f"{entry['file']}: no 'text' column")
            elif n <= 0:
                problems.append(f"{entry['file']}: no rows")
            rows += n
        except Exception as exc:
            problems.append(f"{entry['file']}: unreadable ({type(exc).__name__})")
    if not manifest.get("train_shards"):
        problems.append("no training shards")
    if manifest.get("val_shard") is None:
        problems.append("no validation shard")
    if not (inp.root / "data/eval_bundle/core.yaml").exists():
        problems.append("data/eval_bundle/core.yaml missing")
    meta = {"shards": len(manifest["shards"]), "rows": rows}
    if problems:
        return False, "; ".join(problems[:10]), meta
    return True, f"{len(manifest['shards'])} shards, {rows:,} rows, eval bundle present", meta


# --- tokenizer

def tokenizer_roundtrip(inp: CheckInput) -> tuple[bool, str, dict]:
    metrics = inp.json("artifacts/tokenizer/metrics.json") or {}
    ok = metrics.get("roundtrip_ok") is True
    return ok, "decode(encode(text)) == text on the eval texts" if ok else f"roundtrip_ok is {metrics.get('roundtrip_ok')!r}", {}


def tokenizer_compression(inp: CheckInput) -> tuple[bool, str, dict]:
    metrics = inp.json("artifacts/tokenizer/metrics.json") or {}
    bpt, floor = metrics.get("val_bytes_per_token"), inp.pipeline.min_bytes_per_token
    if not _finite(bpt):
        return False, f"val_bytes_per_token is {bpt!r}", {}
    meta = {"val_bytes_per_token": float(bpt), "min_bytes_per_token": floor}
    if bpt < floor:
        return False, f"{bpt:.3f} bytes/token on val < pipeline.min_bytes_per_token {floor}", meta
    return True, f"{bpt:.3f} bytes/token on val >= {floor}", meta


# --- train and evaluate

def _bpb_finite(rel: str) -> Callable[[CheckInput], tuple[bool, str, dict]]:
    def check(inp: CheckInput) -> tuple[bool, str, dict]:
        bpb = (inp.json(rel) or {}).get("val_bpb")
        if not _finite(bpb):
            return False, f"{rel}: val_bpb is {bpb!r}", {}
        return True, f"val BPB {bpb:.4f}", {"val_bpb": float(bpb)}
    return check


def bpb_vs_champion(inp: CheckInput) -> tuple[bool, str, dict]:
    bpb = (inp.json("artifacts/eval/metrics.json") or {}).get("val_bpb")
    if not _finite(bpb):
        return False, f"val_bpb is {bpb!r}", {}
    try:
        champ = inp.champion()
    except Exception as exc:  # the registry is a comparison, not a gate
        return True, f"champion unknown ({type(exc).__name__}: {exc})", {"val_bpb": float(bpb)}
    if not champ or not _finite(champ.get("val_bpb")):
        return True, f"no champion of {inp.pipeline.registered_model} yet", {"val_bpb": float(bpb)}
    from nanoforge.registry import model_md5

    current = model_md5(inp.root)
    if current and champ.get("model_md5") == current:  # registered from this very model: comparing it with itself says nothing
        return True, (f"the champion (v{champ['version']}) is this model (same DVC hash of artifacts/model): "
                      "nothing to compare"), {"val_bpb": float(bpb), "champion_version": champ["version"]}
    tol = inp.pipeline.bpb_tolerance
    meta = {"val_bpb": float(bpb), "champion_val_bpb": float(champ["val_bpb"]), "champion_version": champ["version"],
            "tolerance": tol}
    delta = bpb - champ["val_bpb"]
    if delta > tol:
        return False, f"val BPB {bpb:.4f} is {delta:.4f} worse than champion v{champ['version']} (tolerance {tol})", meta
    return True, f"val BPB {bpb:.4f} vs champion v{champ['version']} {champ['val_bpb']:.4f} (tolerance {tol})", meta


def core_present(inp: CheckInput) -> tuple[bool, str, dict]:
    metrics = inp.json("artifacts/eval/metrics.json") or {}
    # per-task results live in details.json (metrics.json keeps the compared numbers only)
    details = inp.json("artifacts/eval/details.json") or {}
    core, tasks = metrics.get("core"), details.get("tasks") or metrics.get("tasks") or {}
    if not _finite(core) or not tasks:
        return False, f"core is {core!r} over {len(tasks)} tasks", {}
    return True, f"CORE {core:.4f} over {len(tasks)} tasks", {"core": float(core), "tasks": len(tasks)}


CHECKS: dict[str, list[Check]] = {
    "download": [
        Check("shards_valid", "Every manifest shard exists with its size, a readable footer, a text column and rows; "
              "train and val shards and the eval bundle are present.", True, ERROR, shards_valid),
    ],
    "tokenizer": [
        Check("roundtrip", "The tokenizer decodes what it encodes, exactly (roundtrip_ok).", True, ERROR, tokenizer_roundtrip),
        Check("compression", "Bytes per token on the validation slice >= pipeline.min_bytes_per_token.", False, ERROR,
              tokenizer_compression),
    ],
    "train": [
        Check("val_bpb_finite", "The trained model's last val BPB is a finite number.", True, ERROR,
              _bpb_finite("artifacts/train/metrics.json")),
    ],
    "evaluate": [
        Check("val_bpb_finite", "Val BPB is a finite number.", True, ERROR, _bpb_finite("artifacts/eval/metrics.json")),
        Check("val_bpb_vs_champion", "Val BPB is not worse than the registered champion's by more than "
              "pipeline.bpb_tolerance.", False, WARN, bpb_vs_champion),
        Check("core_present", "CORE is a finite number over at least one task.", False, ERROR, core_present),
    ],
}


def specs_for(asset: str, key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(c.name, asset=key, description=c.description, blocking=c.blocking)
            for c in CHECKS.get(asset, [])]


def evaluate(asset: str, key: dg.AssetKey, inp: CheckInput) -> list[dg.AssetCheckResult]:
    results = []
    for check in CHECKS.get(asset, []):
        try:
            passed, text, meta = check.fn(inp)
        except Exception as exc:  # a broken check fails loudly, it does not pass
            passed, text, meta = False, f"check raised {type(exc).__name__}: {exc}", {}
        results.append(dg.AssetCheckResult(
            check_name=check.name, asset_key=key, passed=passed, severity=check.severity,
            description=text, metadata={"result": text, **meta},
        ))
    return results


def blocking_failures(asset: str, results: list[dg.AssetCheckResult]) -> list[str]:
    blocking = {c.name for c in CHECKS.get(asset, []) if c.blocking and c.severity == ERROR}
    return [r.check_name for r in results if not r.passed and r.check_name in blocking]
