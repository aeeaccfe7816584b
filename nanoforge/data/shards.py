"""Pretraining shards on disk: the manifest, validation, and streaming reads.

Notable:
- The manifest (data/fineweb/MANIFEST.json) is the one truth about which shards
  are for training and which one is the pinned validation shard; downstream
  stages read it instead of guessing from file names.
- It also says which dataset (download.dataset) the shards are: a `dataset` key, written
  only for datasets other than fineweb-edu, so a fineweb-edu manifest stays byte for byte
  what it was before datasets were options (same data.dvc hash, DVC caches stay valid);
  no key means fineweb-edu. Stages refuse a manifest of another dataset than params.yaml's.
- Reads stream one parquet row group (1024 documents) at a time, so memory is
  bounded by the row group, not the shard or the data set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from nanoforge.common import FINEWEB_DIR, MANIFEST_FILE, read_json, sha256_file, shard_name, write_json
from nanoforge.config import DEFAULT_DATASET

MANIFEST_VERSION = 1


class ShardError(ValueError):
    """A shard that is missing, unreadable, or not in the nanochat format."""


def _count(path: Path) -> tuple[int, int, int]:
    """(rows, chars, row groups) of a shard, validating it on the way: a readable footer, a
    `text` column, rows > 0, every row group decodes. Characters are counted in Arrow, so
    checking a ~100 MB shard costs about as much as reading it."""
    import pyarrow.compute as pc

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise ShardError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise ShardError(f"{path}: has no 'text' column (columns: {', '.join(names) or 'none'})")
    rows = pf.metadata.num_rows
    if rows <= 0:
        raise ShardError(f"{path}: has no rows")
    chars = 0
    try:
        for i in range(pf.num_row_groups):
            column = pf.read_row_group(i, columns=["text"]).column("text")
            chars += pc.sum(pc.utf8_length(column)).as_py() or 0
    except Exception as exc:
        raise ShardError(f"{path}: row data unreadable ({type(exc).__name__}: {exc})") from None
    return rows, chars, pf.num_row_groups


def shard_stats(path: str | Path) -> dict:
    """Validate a shard and count it. Raises ShardError naming the problem."""
    rows, chars, groups = _count(Path(path))
    return {"rows": rows, "chars": chars, "row_groups": groups}


def shard_facts(path: str | Path) -> dict:
    """What the manifest records about one shard: bytes, sha256, rows, chars (validated as shard_stats)."""
    path = Path(path)
    rows, chars, _ = _count(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path), "rows": rows, "chars": chars}


def build_manifest(
    directory: str | Path,
    train: list[int],
    val: int,
    source: str,
    hashes: dict | None = None,
    known: dict[int, dict] | None = None,
    dataset: str = DEFAULT_DATASET,
) -> dict:
    """Describe the shards in `directory`: per shard index, split, bytes, sha256, rows, characters.

    `known` maps index -> shard_facts(...) measured earlier (e.g. right after the
    download verified the file); an entry is reused when the file size still
    matches, so a re-run does not re-read every shard.
    """
    directory = Path(directory)
    hashes = hashes or {}
    known = known or {}
    entries = []
    totals = {"train": {"shards": 0, "rows": 0, "chars": 0, "bytes": 0}, "val": {"shards": 0, "rows": 0, "chars": 0, "bytes": 0}}
    for index in [*train, val]:
        path = directory / shard_name(index)
        split = "val" if index == val else "train"
        facts = known.get(index)
        if facts is None or not path.exists() or facts["bytes"] != path.stat().st_size:
            stats = shard_stats(path)
            facts = {
                "bytes": path.stat().st_size,
                "sha256": hashes.get(index) or sha256_file(path),
                "rows": stats["rows"],
                "chars": stats["chars"],
            }
        entry = {
            "index": index,
            "file": path.name,
            "split": split,
            "bytes": facts["bytes"],
            "sha256": facts["sha256"],
            "rows": facts["rows"],
            "chars": facts["chars"],
        }
        entries.append(entry)
        for key in ("rows", "chars", "bytes"):
            totals[split][key] += entry[key]
        totals[split]["shards"] += 1
    return {
        "version": MANIFEST_VERSION,
        **({"dataset": dataset} if dataset != DEFAULT_DATASET else {}),  # see the module's note
        "source": source,
        "train_shards": list(train),
        "val_shard": val,
        "shards": entries,
        "totals": totals,
    }


def write_manifest(manifest: dict, path: str | Path = MANIFEST_FILE) -> None:
    write_json(path, manifest)


def read_manifest(path: str | Path = MANIFEST_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: no shard manifest; run the download stage first (python -m stages.download)")
    manifest = read_json(path)
    if manifest.get("version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    return manifest


def manifest_dataset(manifest: dict) -> str:
    return manifest.get("dataset", DEFAULT_DATASET)


def check_dataset(manifest: dict, dataset: str, path: str | Path = MANIFEST_FILE) -> None:
    """ShardError naming download.dataset when the manifest's shards are of another dataset."""
    have = manifest_dataset(manifest)
    if have != dataset:
        raise ShardError(
            f"{path} lists {have} shards but download.dataset is {dataset}; run the download "
            f"(python -m stages.download) for {dataset}, or set download.dataset: {have}"
        )


def expect_dataset(dataset: str, directory: str | Path = FINEWEB_DIR) -> None:
    """The stages' guard: `directory`'s manifest is of download.dataset (ShardError naming it otherwise)."""
    path = Path(directory) / "MANIFEST.json"
    check_dataset(read_manifest(path), dataset, path)


def train_shard_paths(manifest: dict | None = None, directory: str | Path = FINEWEB_DIR) -> list[Path]:
    manifest = manifest or read_manifest(Path(directory) / "MANIFEST.json")
    paths = [Path(directory) / shard_name(i) for i in manifest["train_shards"]]
    if not paths:
        raise ShardError(f"{directory}: the manifest lists no training shards")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ShardError(f"training shards listed in the manifest are missing: {', '.join(missing)}")
    return paths


def val_shard_path(manifest: dict | None = None, directory: str | Path = FINEWEB_DIR) -> Path:
    manifest = manifest or read_manifest(Path(directory) / "MANIFEST.json")
    path = Path(directory) / shard_name(manifest["val_shard"])
    if not path.exists():
        raise ShardError(f"validation shard {path} is missing")
    return path


def iter_row_groups(paths: list[Path], start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, int, list[str]]]:
    """Yield (shard position, row group, texts) from `start` on, one row group at a time."""
    first_shard, first_group = start
    for s in range(first_shard, len(paths)):
        pf = pq.ParquetFile(paths[s])
        for g in range(first_group if s == first_shard else 0, pf.num_row_groups):
            texts = pf.read_row_group(g, columns=["text"]).column("text").to_pylist()
            yield s, g, [t for t in texts if t]


def iter_documents(paths: list[Path], doc_cap: int | None = None) -> Iterator[str]:
    """Every document of `paths` in order, each cut to `doc_cap` characters."""
    for _, _, texts in iter_row_groups(paths):
        for text in texts:
            yield text[:doc_cap] if doc_cap else text
