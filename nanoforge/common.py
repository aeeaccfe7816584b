"""What every stage shares: where things live, logging, atomic writes, ranks.

Notable:
- Paths are relative to the repo root, which is the working directory of every
  stage (DVC runs commands there). Data flows one way: data/ -> artifacts/ -> reports/.
- Outputs are written to a temporary name beside the target and renamed, so a
  kill mid-write never leaves a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

# data/: raw inputs, versioned by data.dvc
DATA_DIR = Path("data")
FINEWEB_DIR = DATA_DIR / "fineweb"
MANIFEST_FILE = FINEWEB_DIR / "MANIFEST.json"
EVAL_BUNDLE_DIR = DATA_DIR / "eval_bundle"
# artifacts/: stage outputs, versioned by dvc.yaml/dvc.lock
ARTIFACTS_DIR = Path("artifacts")
TOKENIZER_DIR = ARTIFACTS_DIR / "tokenizer"
CHECKPOINT_DIR = ARTIFACTS_DIR / "checkpoints"
MODEL_DIR = ARTIFACTS_DIR / "model"
TRAIN_DIR = ARTIFACTS_DIR / "train"
EVAL_DIR = ARTIFACTS_DIR / "eval"
# reports/: for people
REPORTS_DIR = Path("reports")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def get_logger(stage: str) -> logging.Logger:
    """One logger per stage, to stderr, with rank in the prefix under torchrun."""
    logger = logging.getLogger(f"nanoforge.{stage}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        rank = f" r{get_rank()}" if get_world_size() > 1 else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s [{stage}{rank}] %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("NANOFORGE_LOG_LEVEL", "INFO"))
        logger.propagate = False
    return logger


# --- ranks (torchrun sets these; a plain `python -m` run is rank 0 of 1)

def get_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return get_rank() == 0


# --- atomic writes

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes it private (0600); the output is not
            tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); the output is not
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
