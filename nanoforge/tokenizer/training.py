"""Train a byte-level BPE on the training shards with rustbpe, then evaluate it (entry point: stages/tokenizer.py).

Notable:
- Trains on the manifest's training shards only, never the pinned validation
  shard. Row groups stream from parquet one at a time, documents are cut to
  `doc_cap` characters, and reading stops at `max_chars`: memory is bounded by
  rustbpe's buffer and its table of distinct chunks, not by the data size.
- Every check that can fail runs before training: the manifest, the shards'
  footers, text to train on, the vocab size. Less text than `max_chars` is a
  warning (it trains on what exists), as is a vocab the text cannot fill.
- Nothing is written until training and evaluation succeed: the three files are
  made in a temporary directory, then moved into artifacts/tokenizer, the
  ranks first and the meta that pins their sha256 next. tokenizer.tiktoken and
  tokenizer.json are byte-identical for the same input (no times in them);
  timings go to metrics.json, a DVC metric that is not cached.
- The evaluation loads the tokenizer back from those files, so it also proves
  they load: bytes per token on a held-out slice of the validation shard and on
  fixed texts (nanoforge/tokenizer/texts.py), side by side with tiktoken's gpt2 and
  cl100k_base when tiktoken has them cached. Offline they are skipped with a
  note; set NANOFORGE_OFFLINE=1 to skip even the bounded download attempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from nanoforge.tokenizer.bpe import (
    META_FILE, RANKS_FILE, SPECIAL_TOKENS, Tokenizer, check_vocab_size,
    load_tokenizer, train_bpe,
)
from nanoforge.common import FINEWEB_DIR, TOKENIZER_DIR, get_logger, write_json
from nanoforge.config import TokenizerConfig
from nanoforge.data.shards import ShardError, iter_row_groups, read_manifest, train_shard_paths, val_shard_path
from nanoforge.tokenizer.texts import TEXTS

log = get_logger("tokenizer")

METRICS_FILE = "metrics.json"
DETAILS_FILE = "details.json"
# metrics.json: only the numbers people compare across runs (`dvc metrics show`, `dvc exp show`);
# the rest (shard names, notes, warnings, hashes, timings, run id) goes to details.json
METRICS = ("vocab_size", "num_merges", "train_chars", "train_docs", "chars_per_sec", "val_bytes_per_token",
           "roundtrip_ok", "compression")
BASELINE_TIMEOUT_S = 20.0  # a download attempt for a baseline encoding, when it is not cached
PROGRESS_EVERY_S = 10.0

# The files tiktoken downloads for each baseline (tiktoken_ext/openai_public.py). If tiktoken ever
# moves them, the cache check just says "not cached" and the bounded download attempt still works.
BASELINE_URLS = {
    "gpt2": [
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    ],
    "cl100k_base": ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"],
}


# --- inputs, all checked before any work

@dataclass
class Inputs:
    train_paths: list[Path]
    val_path: Path
    train_shards: list[dict]  # manifest entries: file, sha256, chars
    available_chars: int | None  # manifest's count of training characters (before doc_cap)
    warnings: list[str] = field(default_factory=list)


def _check_shard(path: Path) -> None:
    # the footer only: a full read of a 250M-character shard is the training's job
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise ShardError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise ShardError(f"{path}: has no 'text' column (columns: {', '.join(pf.schema_arrow.names) or 'none'})")
    if pf.metadata.num_rows <= 0:
        raise ShardError(f"{path}: has no rows")


def check_inputs(cfg: TokenizerConfig, fineweb_dir: Path = FINEWEB_DIR) -> Inputs:
    """Everything that can be wrong with the inputs, found before training starts."""
    check_vocab_size(cfg.vocab_size)
    manifest = read_manifest(Path(fineweb_dir) / "MANIFEST.json")
    train_paths = train_shard_paths(manifest, fineweb_dir)
    val_path = val_shard_path(manifest, fineweb_dir)
    for path in [*train_paths, val_path]:
        _check_shard(path)
    entries = {e["index"]: e for e in manifest.get("shards", [])}
    train_shards = [
        {"file": p.name, "sha256": entries.get(i, {}).get("sha256"), "chars": entries.get(i, {}).get("chars")}
        for i, p in zip(manifest["train_shards"], train_paths)
    ]
    counts = [s["chars"] for s in train_shards]
    available = sum(counts) if all(isinstance(c, int) for c in counts) else None
    inputs = Inputs(train_paths, val_path, train_shards, available)
    if available == 0:
        raise ShardError(
            f"the training shards ({', '.join(p.name for p in train_paths)}) hold no text (0 characters in the "
            "manifest); re-run the download stage"
        )
    if available is not None and available < cfg.max_chars:
        inputs.warnings.append(
            f"tokenizer.max_chars={cfg.max_chars:,} but the {len(train_paths)} training shard(s) hold only "
            f"{available:,} characters: training on all of them (download more shards with "
            "download.num_train_shards, or lower tokenizer.max_chars to silence this)"
        )
    return inputs


# --- training

@dataclass
class ReadStats:
    chars: int = 0
    docs: int = 0
    row_groups: int = 0
    exhausted: bool = False  # the shards ran out before max_chars
    read_seconds: float = 0.0  # inside parquet reads only, not rustbpe's work between them


def training_texts(
    paths: list[Path], max_chars: int, doc_cap: int, stats: ReadStats, on_row_group=None
) -> Iterator[str]:
    """Documents of `paths`, each cut to `doc_cap`, until `max_chars` characters have been yielded.

    The document that crosses `max_chars` is kept whole (up to doc_cap), as nanochat does.
    Work per document is kept to slicing (a no-op for short strings) so this
    generator costs little next to rustbpe's own splitting and counting.
    """
    groups = iter_row_groups(paths)
    while True:
        t0 = time.perf_counter()
        item = next(groups, None)  # parquet read + decode of one row group: the cost this stage adds
        stats.read_seconds += time.perf_counter() - t0
        if item is None:
            stats.exhausted = True
            return
        capped = [t[:doc_cap] for t in item[2]]
        group_chars = sum(map(len, capped))
        if stats.chars + group_chars >= max_chars:
            for text in capped:
                stats.chars += len(text)
                stats.docs += 1
                yield text
                if stats.chars >= max_chars:
                    break
            stats.row_groups += 1
            return
        stats.chars += group_chars
        stats.docs += len(capped)
        stats.row_groups += 1
        yield from capped
        if on_row_group is not None:
            on_row_group(stats)


class _EveryTenPercent(logging.Filter):
    # rustbpe logs each percent of its merge loop; a tenth of that is plenty for a person
    def filter(self, record: logging.LogRecord) -> bool:
        match = re.match(r"Progress: (\d+)%", record.getMessage())
        return match is None or int(match.group(1)) % 10 == 0


def show_rustbpe_progress() -> None:
    """Route rustbpe's own log lines (it logs through Python's `logging`, as 'rustbpe') to stderr.

    Reading is our progress to report; the merge loop that follows can take minutes
    on 2e9 characters, and only rustbpe knows how far along it is.
    """
    logger = logging.getLogger("rustbpe")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [tokenizer] rustbpe: %(message)s", "%H:%M:%S"))
        handler.addFilter(_EveryTenPercent())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def train_tokenizer(cfg: TokenizerConfig, paths: list[Path], run=None) -> tuple[Tokenizer, ReadStats, float]:
    """Train on `paths` per `cfg`; returns the tokenizer, what was read, and the seconds it took."""
    stats = ReadStats()
    t0 = time.perf_counter()
    last = [t0]

    def progress(s: ReadStats) -> None:
        if run is not None:
            run.log_metrics({"train_chars_read": s.chars}, step=s.row_groups)
        now = time.perf_counter()
        if now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            log.info("read %s chars (%.0f%% of max_chars) at %.2fM chars/s",
                     f"{s.chars:,}", 100 * s.chars / cfg.max_chars, s.chars / (now - t0) / 1e6)

    texts = training_texts(paths, cfg.max_chars, cfg.doc_cap, stats, progress)
    tokenizer = train_bpe(texts, cfg.vocab_size)
    return tokenizer, stats, time.perf_counter() - t0


# --- evaluation

def val_texts(path: Path, eval_chars: int) -> list[str]:
    """The first `eval_chars` characters of the validation shard, as whole documents (the last one cut)."""
    out, n = [], 0
    for _, _, texts in iter_row_groups([path]):
        for text in texts:
            text = text[: eval_chars - n]
            out.append(text)
            n += len(text)
            if n >= eval_chars:
                return out
    return out


def tiktoken_cache_dir() -> Path:
    # the same lookup as tiktoken.load.read_file_cached
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def load_baseline(name: str, timeout_s: float = BASELINE_TIMEOUT_S):
    """(tiktoken Encoding, None) when available, else (None, a note saying why it is skipped)."""
    import tiktoken

    cache = tiktoken_cache_dir()
    cached = all((cache / hashlib.sha1(url.encode()).hexdigest()).exists() for url in BASELINE_URLS[name])
    if not cached and os.environ.get("NANOFORGE_OFFLINE", "") not in ("", "0"):
        return None, f"not in tiktoken's cache ({cache}) and NANOFORGE_OFFLINE is set"
    # a cached load is instant; a download is bounded so an offline machine never waits on it
    result: dict = {}

    def load() -> None:
        try:
            result["enc"] = tiktoken.get_encoding(name)
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if "enc" in result:
        return result["enc"], None
    why = result.get("error", f"no answer within {timeout_s:.0f}s")
    return None, f"not in tiktoken's cache ({cache}) and the download failed ({why}); skipped"


def bytes_per_token(n_bytes: int, n_tokens: int) -> float | None:
    return round(n_bytes / n_tokens, 4) if n_tokens else None


def evaluate(tokenizer: Tokenizer, texts_by_kind: dict[str, list[str]], baselines: dict) -> dict:
    """Compression per kind for ours and each baseline, and an exact round trip over every text."""
    compression: dict[str, dict] = {}
    failures = 0
    for kind, texts in texts_by_kind.items():
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        ours = tokenizer.encode(texts, num_threads=4)
        failures += sum(tokenizer.decode(ids) != t for ids, t in zip(ours, texts))
        row = {"ours": bytes_per_token(n_bytes, sum(map(len, ours)))}
        for name, enc in baselines.items():
            row[name] = bytes_per_token(n_bytes, sum(map(len, enc.encode_ordinary_batch(texts)))) if enc else None
        compression[kind] = row
    return {"compression": compression, "roundtrip_failures": failures, "roundtrip_ok": failures == 0}


def compression_table(compression: dict, names: list[str]) -> str:
    """Markdown: bytes per token for each kind (higher is better compression)."""
    lines = ["| text | ours | " + " | ".join(names) + " |", "|---|" + "---:|" * (len(names) + 1)]
    for kind, row in compression.items():
        cells = ["—" if row.get(n) is None else f"{row[n]:.3f}" for n in ["ours", *names]]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the stage

@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A temporary directory beside `target`; on success its files move into `target` one by one.

    Not a swap of the whole directory: DVC keeps a .gitignore in it. The ranks file
    moves first, the meta that pins its sha256 next, details.json, metrics.json last, so an
    interrupted move leaves a pair the loader refuses, never a wrong tokenizer.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        target.mkdir(exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        for name in (RANKS_FILE, META_FILE, DETAILS_FILE, METRICS_FILE):
            (tmp / name).chmod(0o666 & ~umask)  # temp files are created private; the tokenizer is not
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _shortfalls(cfg: TokenizerConfig, inputs: Inputs, tokenizer: Tokenizer, stats: ReadStats) -> list[str]:
    """The warnings of a finished training: less text than asked for, a vocabulary the text could not fill."""
    warnings = list(inputs.warnings)
    if stats.exhausted and not inputs.warnings:
        # the manifest's count said there was enough, but doc_cap (or a stale manifest) left less
        warnings.append(
            f"the training shards ran out after {stats.chars:,} characters (documents cut to "
            f"tokenizer.doc_cap={cfg.doc_cap:,}), short of tokenizer.max_chars={cfg.max_chars:,}"
        )
        log.warning(warnings[-1])
    if tokenizer.vocab_size < cfg.vocab_size:
        warnings.append(
            f"the text ran out of pairs to merge: the vocabulary has {tokenizer.vocab_size:,} tokens, "
            f"not the {cfg.vocab_size:,} asked for (tokenizer.vocab_size); train on more text for more"
        )
        log.warning(warnings[-1])
    return warnings


def _evaluate_saved(cfg: TokenizerConfig, inputs: Inputs, directory: Path) -> tuple[Tokenizer, dict]:
    """Load the tokenizer back from `directory` and measure it; (tokenizer, evaluation facts)."""
    t0 = time.perf_counter()
    loaded = load_tokenizer(directory)  # evaluate what was written, so a file that does not load fails here
    texts = {"val": val_texts(inputs.val_path, cfg.eval_chars), **{k: [v] for k, v in TEXTS.items()}}
    eval_chars = sum(map(len, texts["val"]))
    if eval_chars < cfg.eval_chars:
        log.info("the validation shard holds %s characters; evaluating on all of them", f"{eval_chars:,}")
    baselines, notes = {}, {}
    for name in BASELINE_URLS:
        baselines[name], notes[name] = load_baseline(name)
        if notes[name]:
            log.info("baseline %s: %s", name, notes[name])
    result = evaluate(loaded, texts, baselines)
    if not result["roundtrip_ok"]:
        log.error("%d texts did not survive encode -> decode exactly", result["roundtrip_failures"])
    return loaded, {**result, "eval_chars": eval_chars, "eval_docs": len(texts["val"]), "notes": notes,
                    "eval_seconds": time.perf_counter() - t0}


def run_stage(cfg: TokenizerConfig, inputs: Inputs, run) -> tuple[dict, str]:
    """Train, save, evaluate, log to `run`; returns metrics.json's content and the markdown compression table."""
    log.info("training a %s-token BPE on %s (up to %s chars, documents cut to %s)",
             f"{cfg.vocab_size:,}", ", ".join(p.name for p in inputs.train_paths),
             f"{cfg.max_chars:,}", f"{cfg.doc_cap:,}")
    tokenizer, stats, train_seconds = train_tokenizer(cfg, inputs.train_paths, run)
    if stats.chars == 0:  # only a manifest that disagrees with its shards gets here
        raise ShardError("the training shards yielded no text to train on; re-run the download stage")
    warnings = _shortfalls(cfg, inputs, tokenizer, stats)
    log.info("trained %s tokens on %s chars / %s docs in %.1fs (%.2fM chars/s, %.1fs of it reading)",
             f"{tokenizer.vocab_size:,}", f"{stats.chars:,}", f"{stats.docs:,}", train_seconds,
             stats.chars / train_seconds / 1e6, stats.read_seconds)
    train_info = {
        "vocab_size_requested": cfg.vocab_size,
        "max_chars": cfg.max_chars,
        "doc_cap": cfg.doc_cap,
        "train_chars": stats.chars,
        "train_docs": stats.docs,
        "data_exhausted": stats.exhausted,
        "train_shards": [{"file": s["file"], "sha256": s["sha256"]} for s in inputs.train_shards],
        "trainer": f"rustbpe {_version('rustbpe')}",
    }

    with staging_dir(TOKENIZER_DIR) as tmp:
        tokenizer.save(tmp, train_info)
        loaded, ev = _evaluate_saved(cfg, inputs, tmp)
        table = compression_table(ev["compression"], list(BASELINE_URLS))
        log.info("bytes per token (higher is better):\n%s", table)
        metrics = {
            "vocab_size": loaded.vocab_size,
            "vocab_size_requested": cfg.vocab_size,
            "num_merges": len(loaded.mergeable_ranks) - 256,
            "num_special_tokens": len(SPECIAL_TOKENS),
            "train_chars": stats.chars,
            "train_docs": stats.docs,
            "train_shards": [s["file"] for s in inputs.train_shards],
            "data_exhausted": stats.exhausted,
            "train_seconds": round(train_seconds, 3),
            "read_seconds": round(stats.read_seconds, 3),
            "chars_per_sec": round(stats.chars / train_seconds),
            "eval_chars": ev["eval_chars"],
            "eval_docs": ev["eval_docs"],
            "eval_seconds": round(ev["eval_seconds"], 3),
            "val_bytes_per_token": ev["compression"]["val"]["ours"],
            "roundtrip_ok": ev["roundtrip_ok"],
            "roundtrip_failures": ev["roundtrip_failures"],
            "compression": ev["compression"],
            "baselines": {name: ev["notes"][name] or "ok" for name in BASELINE_URLS},
            "ranks_sha256": loaded.meta["ranks_sha256"],
            "warnings": warnings,
            "mlflow_run_id": run.run_id,
        }
        write_json(tmp / DETAILS_FILE, {k: v for k, v in metrics.items() if k not in METRICS})
        write_json(tmp / METRICS_FILE, {k: metrics[k] for k in METRICS})

    run.log_metrics({
        "vocab_size": metrics["vocab_size"],
        "train_chars": stats.chars,
        "train_docs": stats.docs,
        "train_seconds": train_seconds,
        "chars_per_sec": metrics["chars_per_sec"],
        "eval_seconds": ev["eval_seconds"],
        "val_bytes_per_token": metrics["val_bytes_per_token"],
        "roundtrip_ok": float(ev["roundtrip_ok"]),
        **{f"bpt.{kind}.{name}": v for kind, row in ev["compression"].items() for name, v in row.items()},
    })
    run.set_tags({"tokenizer.ranks_sha256": metrics["ranks_sha256"], "tokenizer.warnings": len(warnings)})
    run.log_artifact(TOKENIZER_DIR, "tokenizer")
    return metrics, table
