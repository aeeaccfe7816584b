"""The pretraining shards and the CORE eval bundle into data/, versioned by DVC (entry point: stages/download.py).

Notable:
- Datasets. download.dataset picks fineweb-edu or climbmix (nanoforge.config.DATASETS: Hub repo,
  shard count, pinned val shard). Both go to data/fineweb/ (the folder every stage reads); the
  manifest records which one it holds, and since both name their files shard_XXXXX.parquet, a
  download for the other dataset refuses to mix them into that folder.
- Sources. Shard i is {base_url}/shard_{i:05d}.parquet (base_url null: the dataset's own) (HF_ENDPOINT, if set, replaces
  https://huggingface.co), or source_dir/shard_{i:05d}.parquet when source_dir is set.
  NANOFORGE_MIRROR=<URL or folder> replaces both sources for a run: shards at
  $MIRROR/shard_XXXXX.parquet, the bundle at $MIRROR/eval_bundle.zip (a folder mirror
  may hold eval_bundle/ unpacked instead). Precedence: --set > NANOFORGE_MIRROR >
  params.yaml. The sources in effect are printed and logged to MLflow.
- The validation shard is pinned (val_shard); the manifest, not file names, tells
  downstream stages which shards are train and which is val.
- Before any byte moves: a HEAD per missing file, so a 404 or a disk too small
  fails at once instead of after hours. Then parallel downloads (fetch.py: retries,
  Range resume, verify-then-rename) with a progress bar on a terminal and a log
  line every PROGRESS_EVERY_S otherwise.
- Re-runs fetch only what is missing or invalid. A shard counts as present when it
  matches its manifest entry (size and sha256), or, with no entry, validates as a
  shard (footer, `text` column, rows > 0, every row group decodes).
- Shards on disk that the config no longer asks for are kept (a later config may
  want them again) but are not in the manifest; delete them by hand to drop them
  from data.dvc. Leftover .part/.tmp files are removed before `dvc add`.
- The manifest is rewritten only when its content changes (its `source` aside), so
  re-running against another mirror with identical bytes leaves data/ and data.dvc as
  they were.
- After success, `dvc add data` writes data.dvc (so it changes exactly when data/
  does). Outside a DVC repo, or without dvc, that is a warning, not a failure. When
  `dvc add` fails (even with exit 0, as on a full cache), data.dvc is put back as it was,
  so it never names objects the cache does not hold.
- `--only-shards` downloads just those shards: no bundle, no manifest, no dvc add.
  A full run afterwards, or `finalize(cfg)` from Python, does those; that is how
  the orchestrator runs one partition per shard and versions once at the end.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from nanoforge.common import DATA_DIR, EVAL_BUNDLE_DIR, FINEWEB_DIR, MANIFEST_FILE, get_logger, sha256_file, shard_name
from nanoforge.config import DATASETS, DEFAULT_DATASET, ConfigError, DownloadConfig
from nanoforge.data.eval_bundle import (
    BundleError, Limits, bundle_limits, bundle_ok, check_bundle, copy_bundle, unpack_bundle,
)
from nanoforge.data.fetch import (
    DiskFullError, FetchError, fetch, free_bytes, is_locked, is_url, locked, part_path, probe, show_progress,
)
from nanoforge.data.shards import (
    ShardError, build_manifest, manifest_dataset, read_manifest, shard_facts, write_manifest,
)

HF = "https://huggingface.co"
MIRROR_ENV = "NANOFORGE_MIRROR"
HF_ENDPOINT_ENV = "HF_ENDPOINT"
BUNDLE_ZIP = "eval_bundle.zip"
PROBE_WORKERS = 16

log = get_logger("download")


class DownloadError(RuntimeError):
    """The download cannot complete; the message says what and how to fix it."""


# ---------------------------------------------------------------------------
# where the bytes come from

@dataclass(frozen=True)
class Sources:
    shards: str  # a base URL or a local folder
    bundle: str  # a URL, a local .zip, or a local bundle folder
    shards_from: str  # which setting chose it, for people reading the log
    bundle_from: str

    def shard(self, index: int) -> str:
        if is_url(self.shards):
            return f"{self.shards.rstrip('/')}/{shard_name(index)}"
        return str(Path(self.shards) / shard_name(index))

    def describe(self) -> str:
        return f"shards from {self.shards}  ({self.shards_from})\n  eval bundle from {self.bundle}  ({self.bundle_from})"


def _hf(url: str, env: Mapping[str, str]) -> tuple[str, bool]:
    endpoint = env.get(HF_ENDPOINT_ENV, "").strip().rstrip("/")
    if endpoint and (url == HF or url.startswith(HF + "/")):
        return endpoint + url[len(HF):], True
    return url, False


def _local(path: str) -> str:
    return str(Path(path).expanduser())


def resolve_sources(cfg: DownloadConfig, overridden: set[str] | frozenset = frozenset(), env: Mapping[str, str] | None = None) -> Sources:
    """The sources in effect. `overridden`: download keys given with --set (they beat the mirror)."""
    env = os.environ if env is None else env
    mirror = env.get(MIRROR_ENV, "").strip()
    mirror = mirror.rstrip("/") if is_url(mirror) else (_local(mirror) if mirror else "")

    def origin(key: str) -> str:
        return f"--set {key}" if key in overridden else f"params.yaml download.{key}"

    if mirror and not overridden & {"base_url", "source_dir"}:
        shards, shards_from = mirror, MIRROR_ENV
    elif cfg.source_dir:
        shards, shards_from = _local(cfg.source_dir), origin("source_dir")
    else:
        shards, replaced = _hf(cfg.shards_url, env)
        shards_from = origin("base_url") + (f" with {HF_ENDPOINT_ENV}" if replaced else "")

    if mirror and "eval_bundle_url" not in overridden:
        if is_url(mirror):
            bundle = f"{mirror}/{BUNDLE_ZIP}"
        else:  # a folder mirror: the zip if it has one, else an unpacked eval_bundle/
            zipped, unpacked = Path(mirror) / BUNDLE_ZIP, Path(mirror) / "eval_bundle"
            bundle = str(unpacked if unpacked.is_dir() and not zipped.exists() else zipped)
        bundle_from = MIRROR_ENV
    else:
        bundle = cfg.eval_bundle_url
        bundle, replaced = _hf(bundle, env) if is_url(bundle) else (_local(bundle), False)
        bundle_from = origin("eval_bundle_url") + (f" with {HF_ENDPOINT_ENV}" if replaced else "")
    return Sources(shards, bundle, shards_from, bundle_from)


def check_sources(sources: Sources, indices: list[int], bundle: bool = True) -> None:
    """Local sources exist and hold what is asked for. Raises DownloadError/BundleError before any work."""
    if not is_url(sources.shards):
        folder = Path(sources.shards)
        if not folder.is_dir():
            raise DownloadError(f"shard source folder {folder} does not exist ({sources.shards_from})")
        parquet = sorted(p.name for p in folder.glob("*.parquet"))
        if not parquet:
            raise DownloadError(
                f"shard source folder {folder} holds no parquet files ({sources.shards_from}); "
                "it should contain shard_00000.parquet, shard_00001.parquet, ..."
            )
        missing = [shard_name(i) for i in indices if not (folder / shard_name(i)).is_file()]
        if missing:
            have = ", ".join(parquet[:6]) + (" ..." if len(parquet) > 6 else "")
            raise DownloadError(
                f"shard source folder {folder} lacks {', '.join(missing)} (it has {have}); "
                "fewer download.num_train_shards, another download.val_shard, or a fuller folder"
            )
    if bundle and not is_url(sources.bundle):
        path = Path(sources.bundle)
        if path.is_dir():
            check_bundle(path)
        elif not path.is_file():
            raise DownloadError(f"eval bundle source {path} does not exist ({sources.bundle_from})")
        elif not zipfile.is_zipfile(path):
            raise DownloadError(f"eval bundle source {path} is not a zip file ({sources.bundle_from})")


def configured_indices(cfg: DownloadConfig) -> list[int]:
    return [*range(cfg.num_train_shards), cfg.val_index]


def check_folder_dataset(cfg: DownloadConfig, directory: str | Path = FINEWEB_DIR) -> None:
    """Refuse (DownloadError) when `directory` holds another dataset's shards: both datasets name their
    files shard_XXXXX.parquet, so fetching into it would keep the old files as if they were the new ones."""
    path = Path(directory) / MANIFEST_FILE.name
    if not path.exists():
        return
    with contextlib.suppress(ShardError, ValueError):  # an unreadable manifest is handled as before
        have = manifest_dataset(read_manifest(path))
        if have != cfg.dataset:
            raise DownloadError(
                f"{directory} holds {have} shards ({path}) but download.dataset is {cfg.dataset}; both name "
                f"their files shard_XXXXX.parquet, so they cannot share the folder: move or delete {directory} "
                f"(data.dvc and the DVC cache keep the old one) and download again, or set download.dataset: {have}"
            )


def parse_indices(text: str, last: int = DATASETS[DEFAULT_DATASET].last) -> list[int]:
    """'0,3,1822' or '0-7,1822' -> sorted unique indices within 0..last; ConfigError names a bad one."""
    out: set[int] = set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        lo, sep, hi = item.partition("-")
        try:
            first, hi_index = (int(lo), int(hi)) if sep else (int(item), int(item))
        except ValueError:
            raise ConfigError(f"--only-shards: {item!r} is not a shard index or a range like 0-7") from None
        if first > hi_index:
            raise ConfigError(f"--only-shards: empty range {item!r}")
        if first < 0 or hi_index > last:
            raise ConfigError(f"--only-shards: {item!r} is outside the dataset's shards 0..{last}")
        out.update(range(first, hi_index + 1))
    if not out:
        raise ConfigError("--only-shards: no shard indices given")
    return sorted(out)


# ---------------------------------------------------------------------------
# shards

@dataclass
class ShardReport:
    entries: dict[int, dict] = field(default_factory=dict)  # index -> shard_facts (bytes, sha256, rows, chars)
    downloaded: list[int] = field(default_factory=list)
    present: list[int] = field(default_factory=list)
    transferred: int = 0  # bytes moved in this run
    attempts: int = 0
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.transferred / 1e6 / self.seconds if self.seconds > 0 else 0.0


def _manifest_entries(directory: Path) -> dict[int, dict]:
    path = directory / MANIFEST_FILE.name
    try:
        return {e["index"]: e for e in read_manifest(path)["shards"]} if path.exists() else {}
    except (ShardError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s); checking shards without it", path, exc)
        return {}


def existing_shard(path: Path, entry: dict | None) -> dict | None:
    """shard_facts of a valid shard already at `path` (trusting a matching manifest entry), else None."""
    if not path.exists():
        return None
    if entry and entry.get("sha256"):
        if path.stat().st_size == entry.get("bytes") and sha256_file(path) == entry["sha256"]:
            return {k: entry[k] for k in ("bytes", "sha256", "rows", "chars")}
        log.warning("%s differs from its manifest entry (size or sha256); fetching it again", path)
        return None
    try:
        return shard_facts(path)
    except ShardError as exc:
        log.warning("%s is not a valid shard (%s); fetching it again", path, exc)
        return None


def download_shards(
    indices: list[int],
    cfg: DownloadConfig,
    sources: Sources | None = None,
    directory: str | Path = FINEWEB_DIR,
    stop: threading.Event | None = None,
) -> ShardReport:
    """Make `directory` hold valid shards `indices`, downloading only what is missing or invalid.

    Raises DownloadError naming every shard that could not be fetched. Shards that did
    arrive stay (verified) on disk, so a re-run continues where this one stopped.
    """
    sources = sources or resolve_sources(cfg)
    directory = Path(directory)
    check_folder_dataset(cfg, directory)
    directory.mkdir(parents=True, exist_ok=True)
    stop = stop or threading.Event()
    start = time.monotonic()
    report = ShardReport()
    known = _manifest_entries(directory)
    todo, invalid = [], set()
    for index in sorted(set(indices)):
        path = directory / shard_name(index)
        facts = existing_shard(path, known.get(index))
        if facts is not None:
            report.entries[index] = facts
            report.present.append(index)
        else:
            todo.append(index)
            if path.exists():
                invalid.add(index)
    log.info("%d of %d shards present and valid; %d to fetch from %s", len(report.present), len(set(indices)),
             len(todo), sources.shards)
    if not todo:
        report.seconds = time.monotonic() - start
        return report

    sizes = _preflight(todo, sources, cfg, directory)
    with show_progress("shards", len(todo), {shard_name(i): sizes.get(i) for i in todo}) as progress:
        results, errors = _fetch_parallel(todo, invalid, cfg, sources, directory, stop, progress)
        if progress.bar is None and progress.transferred:
            log.info("%s", progress.line())
        # bytes each fetch received: the progress meter misses a file that arrives in one chunk (it takes
        # a file's first report for where a resumed file starts), which reported 0.0 MB after 0.6 MB
        report.transferred = sum(r.transferred for _, r in results.values() if r is not None)

    for index, (facts, result) in sorted(results.items()):
        report.entries[index] = facts
        if result is not None:
            report.downloaded.append(index)
            report.attempts += result.attempts
    report.seconds = time.monotonic() - start
    if errors:
        not_started = [i for i in todo if i not in results and i not in errors]
        lines = [f"  {shard_name(i)}: {errors[i]}" for i in sorted(errors)]
        if not_started:
            lines.append(f"  not started after the first failure: {len(not_started)} shard(s)")
        raise DownloadError(
            f"{len(errors)} of {len(todo)} shard downloads failed ({len(results)} fetched and verified, kept):\n"
            + "\n".join(lines)
        )
    return report


def _fetch_parallel(todo: list[int], invalid: set[int], cfg: DownloadConfig, sources: Sources, directory: Path,
                    stop: threading.Event, progress) -> tuple[dict[int, tuple], dict[int, BaseException]]:
    """Fetch `todo` on cfg.workers threads; (index -> (facts, FetchResult | None), index -> error). Fails fast."""
    results: dict[int, tuple] = {}
    errors: dict[int, BaseException] = {}

    def one(index: int):
        path = directory / shard_name(index)
        with locked(path):
            if index in invalid:
                path.unlink(missing_ok=True)
            elif path.exists():  # another process fetched it while we waited for the lock
                facts = existing_shard(path, None)
                if facts is not None:
                    progress.finished(path.name)
                    return facts, None
                path.unlink(missing_ok=True)
            result = fetch(sources.shard(index), path, verify=shard_facts, timeout=cfg.timeout_s,
                           max_retries=cfg.max_retries, progress=progress.update, stop=stop)
        progress.finished(path.name)
        resumed = f", resumed at {result.resumed_from / 1e6:.1f} MB" if result.resumed_from else ""
        retried = f", {result.attempts - 1} retries" if result.attempts > 1 else ""
        log.info("%s: %.1f MB in %.1fs%s%s, %d rows, verified", path.name, result.bytes / 1e6, result.seconds,
                 resumed, retried, result.verified["rows"])
        return result.verified, result

    pool = cf.ThreadPoolExecutor(max_workers=min(cfg.workers, len(todo)), thread_name_prefix="download")
    futures = {pool.submit(one, i): i for i in todo}
    try:
        for future in cf.as_completed(futures):
            index = futures[future]
            if future.cancelled():
                continue
            try:
                results[index] = future.result()
            except (FetchError, ShardError, OSError) as exc:
                errors[index] = exc
                if isinstance(exc, DiskFullError):  # the others would fail too: stop them now
                    stop.set()
                for f in futures:  # fail fast: start nothing new; running downloads finish and stay
                    f.cancel()
    except BaseException:  # Ctrl-C: stop the workers; their .part files stay for the next run
        stop.set()
        for f in futures:
            f.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results, errors


def _preflight(todo: list[int], sources: Sources, cfg: DownloadConfig, directory: Path) -> dict[int, int | None]:
    """Sizes of the shards to fetch (HEAD / stat); fails on 404s and on a disk that is too small."""
    if is_url(sources.shards):
        with cf.ThreadPoolExecutor(min(PROBE_WORKERS, len(todo))) as pool:
            futures = {i: pool.submit(probe, sources.shard(i), cfg.timeout_s) for i in todo}
        sizes, missing = {}, []
        for i, fut in futures.items():
            try:
                sizes[i] = fut.result()
            except FetchError as exc:
                missing.append(str(exc))
        if missing:
            raise DownloadError(f"{len(missing)} of {len(todo)} shards are not available:\n  " + "\n  ".join(missing))
    else:
        sizes = {i: (Path(sources.shards) / shard_name(i)).stat().st_size for i in todo}
    need = sum((s or 0) - _part_size(directory / shard_name(i)) for i, s in sizes.items())
    free = free_bytes(directory)
    if need > free:
        raise DownloadError(
            f"disk full: the {len(todo)} shards to fetch need {need / 1e9:.2f} GB, only {free / 1e9:.2f} GB free "
            f"under {directory.resolve()}; free space or ask for fewer shards (download.num_train_shards)"
        )
    return sizes


def _part_size(path: Path) -> int:
    part = part_path(path)
    return part.stat().st_size if part.exists() else 0


# ---------------------------------------------------------------------------
# the eval bundle

def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"not a readable zip file ({exc})") from None
    if bad is not None:
        raise BundleError(f"zip entry {bad!r} fails its CRC check")


def unpack_limits(cfg: DownloadConfig) -> Limits:
    """The zip-bomb limits for the bundle: download.bundle_max_unpacked_bytes / bundle_max_ratio when the
    config has them, NANOFORGE_BUNDLE_MAX_BYTES / _RATIO over those. BundleError names a bad value."""
    if {"bundle_max_unpacked_bytes", "bundle_max_ratio"} <= set(type(cfg).model_fields):
        return bundle_limits(cfg.bundle_max_unpacked_bytes, cfg.bundle_max_ratio,
                             "download.bundle_max_unpacked_bytes / download.bundle_max_ratio "
                             "(NANOFORGE_BUNDLE_MAX_BYTES / NANOFORGE_BUNDLE_MAX_RATIO override them)")
    return bundle_limits()


def ensure_bundle(cfg: DownloadConfig, sources: Sources | None = None, directory: str | Path = EVAL_BUNDLE_DIR,
                  stop: threading.Event | None = None) -> dict:
    """Make `directory` hold a complete eval bundle. Returns {status, tasks, files, bytes}."""
    sources = sources or resolve_sources(cfg)
    directory = Path(directory)
    limits = unpack_limits(cfg)
    if bundle_ok(directory):
        info = check_bundle(directory)
        log.info("eval bundle present (%d tasks) in %s; delete it to fetch it again", info["tasks"], directory)
        return {"status": "present", **info}
    if directory.exists():
        log.warning("%s is incomplete; fetching the eval bundle again", directory)
    src = sources.bundle
    if is_url(src):
        archive = directory.parent / f".{BUNDLE_ZIP}"
        with locked(archive):
            size = probe(src, cfg.timeout_s) if not part_path(archive).exists() else None
            with show_progress("eval bundle", 1, {archive.name: size}) as progress:
                result = fetch(src, archive, verify=_check_zip, timeout=cfg.timeout_s, max_retries=cfg.max_retries,
                               progress=progress.update, stop=stop)
            log.info("eval bundle: %.1f MB in %.1fs", result.bytes / 1e6, result.seconds)
            try:
                info = unpack_bundle(archive, directory, limits)
            finally:
                archive.unlink(missing_ok=True)
        status = "downloaded"
    elif Path(src).is_dir():
        info, status = copy_bundle(src, directory), "copied"
    else:
        info, status = unpack_bundle(src, directory, limits), "unpacked"
    log.info("eval bundle %s: %d tasks, %d files in %s", status, info["tasks"], info["files"], directory)
    return {"status": status, **info}


# ---------------------------------------------------------------------------
# manifest + dvc add

def _same_manifest(a: dict, b: dict) -> bool:
    strip = lambda m: {k: v for k, v in m.items() if k != "source"}  # noqa: E731
    return strip(a) == strip(b)


def write_shard_manifest(cfg: DownloadConfig, sources: Sources, entries: dict[int, dict] | None = None,
                         directory: str | Path = FINEWEB_DIR) -> tuple[dict, bool]:
    """Write MANIFEST.json for the configured shards (which must be present). Returns (manifest, rewritten)."""
    directory = Path(directory)
    check_folder_dataset(cfg, directory)
    wanted = configured_indices(cfg)
    entries = dict(entries or {})
    known = _manifest_entries(directory)
    for index in wanted:  # shards nobody checked in this process (e.g. fetched by partition runs)
        if index not in entries:
            facts = existing_shard(directory / shard_name(index), known.get(index))
            if facts is None:
                raise DownloadError(
                    f"{directory / shard_name(index)} is missing or invalid; run `python -m stages.download` to fetch it"
                )
            entries[index] = facts
    manifest = build_manifest(directory, wanted[:-1], cfg.val_index, source=sources.shards, known=entries,
                              dataset=cfg.dataset)
    path = directory / MANIFEST_FILE.name
    old = None
    if path.exists():
        with contextlib.suppress(ShardError, ValueError):
            old = read_manifest(path)
    if old is not None and _same_manifest(old, manifest):
        return old, False
    write_manifest(manifest, path)
    return manifest, True


def clean_leftovers(data_dir: str | Path = DATA_DIR) -> list[Path]:
    """Remove partial downloads and temp files nobody is writing, so `dvc add` sees only real data."""
    removed = []
    data_dir = Path(data_dir)
    if not data_dir.exists():
        return removed
    for path in sorted(data_dir.rglob("*")):
        name = path.name
        if name.endswith((".part", ".lock")):
            if is_locked(path.with_name(name.rsplit(".", 1)[0])):
                continue  # another process is fetching this file right now
        elif not (name.startswith(".") and (name.endswith((".tmp", ".old")) or name == f".{BUNDLE_ZIP}")):
            continue
        if not path.exists():
            continue  # inside a folder removed above
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _dvc_root(start: Path) -> Path | None:
    for folder in [start, *start.parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def find_dvc() -> str | None:
    found = shutil.which("dvc")
    if found:
        return found
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else None


def _dvc_add_problem(exe: str, proc: subprocess.CompletedProcess, dvc_file: Path, env: dict) -> str:
    """Why a `dvc add` did not leave the data in the cache ('' if it did).

    dvc 3 exits 0 after "ERROR: failed to transfer ... No space left on device" and still
    writes the .dvc file, so the exit code is not enough: `dvc status` must not say
    "not in cache" either.
    """
    errors = [line for line in (proc.stderr + proc.stdout).splitlines() if line.startswith("ERROR")]
    if proc.returncode != 0 or errors:
        said = errors[0] if errors else ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
        return f"exit {proc.returncode}: {said.strip()[:500]}"
    status = subprocess.run([exe, "status", "--json", str(dvc_file)], capture_output=True, text=True, env=env)
    if status.returncode != 0 or "not in cache" in status.stdout:
        return f"`dvc status {dvc_file}` after it: {(status.stdout or status.stderr).strip()[:500]}"
    return ""


def _restore(dvc_file: Path, before: bytes | None) -> None:
    """data.dvc as it was before `dvc add` (absent if it was absent), replaced atomically."""
    if before is None:
        dvc_file.unlink(missing_ok=True)
        return
    tmp = dvc_file.with_name(f".{dvc_file.name}.restore.tmp")
    tmp.write_bytes(before)
    os.replace(tmp, dvc_file)


def dvc_add(target: str | Path = DATA_DIR) -> dict:
    """`dvc add <target>` -> {status: added|skipped, changed, md5, reason}. Warns (no error) outside a DVC repo."""
    target = Path(target)
    if _dvc_root(Path.cwd().resolve()) is None:
        reason = f"{Path.cwd()} is not inside a DVC repo (no .dvc/ folder); run `dvc init` to version data/"
        log.warning("not versioning %s: %s", target, reason)
        return {"status": "skipped", "reason": reason, "changed": False, "md5": None}
    exe = find_dvc()
    if exe is None:
        reason = "dvc is not installed (not on PATH, not beside this Python); run `make setup`"
        log.warning("not versioning %s: %s", target, reason)
        return {"status": "skipped", "reason": reason, "changed": False, "md5": None}
    dvc_file = target.with_name(target.name + ".dvc")
    before = dvc_file.read_bytes() if dvc_file.exists() else None
    start = time.monotonic()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    problem = "interrupted"
    try:
        proc = subprocess.run([exe, "add", str(target)], capture_output=True, text=True, env=env)
        problem = _dvc_add_problem(exe, proc, dvc_file, env)
    finally:
        if problem:  # never leave a data.dvc that names objects the cache does not hold
            _restore(dvc_file, before)
    if problem:
        restored = f"{dvc_file} was put back as it was" if before is not None else f"no {dvc_file} was written"
        raise DownloadError(
            f"`dvc add {target}` failed ({problem}); {restored}. The data itself is complete: fix that "
            f"(a full or read-only DVC cache: `dvc cache dir` shows where it is), then run `dvc add {target}`"
        )
    after = dvc_file.read_bytes() if dvc_file.exists() else None
    md5 = None
    with contextlib.suppress(Exception):
        import yaml

        md5 = yaml.safe_load(after)["outs"][0]["md5"]
    changed = before != after
    log.info("dvc add %s: %s (%s, %.1fs)", target, dvc_file, "changed" if changed else "unchanged", time.monotonic() - start)
    return {"status": "added", "changed": changed, "md5": md5, "reason": ""}


def finalize(cfg: DownloadConfig, sources: Sources | None = None, entries: dict[int, dict] | None = None,
             run_dvc: bool = True, stop: threading.Event | None = None) -> dict:
    """Everything after the shard downloads: the eval bundle, the manifest, cleanup, `dvc add data`.

    The orchestrator calls this once after its per-shard partitions (download_shards).
    Returns {manifest, manifest_rewritten, bundle, dvc, extra_shards}.
    """
    sources = sources or resolve_sources(cfg)
    bundle = ensure_bundle(cfg, sources, stop=stop)
    manifest, rewritten = write_shard_manifest(cfg, sources, entries)
    log.info("manifest %s (%s): %d train + 1 val shards, %s rows, %s characters, %.1f MB", MANIFEST_FILE,
             "written" if rewritten else "unchanged", len(manifest["train_shards"]),
             f"{_total(manifest, 'rows'):,}", f"{_total(manifest, 'chars'):,}", _total(manifest, "bytes") / 1e6)
    wanted = {shard_name(i) for i in configured_indices(cfg)}
    extra = sorted(p.name for p in FINEWEB_DIR.glob("shard_*.parquet") if p.name not in wanted)
    if extra:
        log.info("also in %s, not in this config (kept, not in the manifest; delete to drop them from data.dvc): %s",
                 FINEWEB_DIR, ", ".join(extra[:10]) + (" ..." if len(extra) > 10 else ""))
    for path in clean_leftovers(DATA_DIR):
        log.info("removed leftover %s", path)
    dvc = dvc_add(DATA_DIR) if run_dvc else {"status": "skipped", "reason": "--no-dvc-add", "changed": False, "md5": None}
    return {"manifest": manifest, "manifest_rewritten": rewritten, "bundle": bundle, "dvc": dvc, "extra_shards": extra}


def _total(manifest: dict, key: str) -> int:
    return sum(split[key] for split in manifest["totals"].values())


# ---------------------------------------------------------------------------
# the stage

def run_download(cfg: DownloadConfig, sources: Sources, only: list[int] | None = None, run_dvc: bool = True) -> dict:
    """The whole stage without CLI or tracking; returns the numbers it reports."""
    start = time.monotonic()
    stop = threading.Event()
    try:
        if only is not None:
            shards = download_shards(only, cfg, sources, stop=stop)
            facts = shards.entries.values()
            return {
                "shards": len(shards.entries), "rows": sum(f["rows"] for f in facts),
                "chars": sum(f["chars"] for f in facts), "bytes": sum(f["bytes"] for f in facts),
                **_speed(shards), "seconds": time.monotonic() - start, "final": None,
            }
        if is_url(sources.bundle) and not bundle_ok(EVAL_BUNDLE_DIR):
            try:  # fail before hours of shard downloads if the bundle URL is wrong
                probe(sources.bundle, cfg.timeout_s)
            except FetchError as exc:
                raise DownloadError(f"eval bundle: {exc}") from None
        shards = download_shards(configured_indices(cfg), cfg, sources, stop=stop)
        final = finalize(cfg, sources, shards.entries, run_dvc=run_dvc, stop=stop)
    except KeyboardInterrupt:
        stop.set()
        raise
    manifest = final["manifest"]
    return {
        "shards": len(manifest["shards"]), "train_shards": len(manifest["train_shards"]),
        "rows": _total(manifest, "rows"), "chars": _total(manifest, "chars"), "bytes": _total(manifest, "bytes"),
        **_speed(shards), "seconds": time.monotonic() - start,
        "bundle_tasks": final["bundle"]["tasks"], "bundle_bytes": final["bundle"]["bytes"], "final": final,
    }


def _speed(shards: ShardReport) -> dict:
    return {"downloaded_shards": len(shards.downloaded), "present_shards": len(shards.present),
            "downloaded_bytes": shards.transferred, "attempts": shards.attempts,
            "download_seconds": shards.seconds, "mb_per_s": shards.mb_per_s}
