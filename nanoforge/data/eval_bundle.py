"""The CORE eval bundle on disk: safe unpacking, copying, and a completeness check.

Notable:
- The layout is nanochat's: core.yaml (icl_tasks with dataset_uri), eval_meta_data.csv,
  eval_data/<category>/<task>.jsonl. The official zip wraps it in a top-level
  `eval_bundle/` folder; we find the bundle root by its core.yaml, so zips with
  or without that folder both work (macOS `__MACOSX/` litter is skipped).
- A zip is checked entry by entry before anything is written: absolute paths,
  `..` components (zip-slip), symlinks and special files are refused, naming the
  entry. Backslashes count as separators, so a Windows-made zip can't sneak `..\\`.
- Zip bombs are refused: at most MAX_UNPACKED_BYTES unpacked in all (8 GB) and at most
  MAX_RATIO (200:1) unpacked per compressed byte, per entry and for the whole archive.
  The real bundle (~162 MB zipped, JSONL text that deflates ~5:1) is far below both;
  deflate bombs run at ~1000:1. The declared sizes are checked before anything is
  written, and bytes are counted again as they are written, against the compressed
  bytes the entry can really occupy in the file (headers can lie). NANOFORGE_BUNDLE_MAX_BYTES
  and NANOFORGE_BUNDLE_MAX_RATIO raise them for a trusted archive.
- Unpacking goes to a temporary folder that replaces data/eval_bundle only when
  complete and checked (every dataset_uri of core.yaml present), so a failed or
  killed unpack (a refused bomb included) never leaves a half bundle under the final name.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from nanoforge.common import EVAL_BUNDLE_DIR, atomic_dir

REQUIRED = ("core.yaml", "eval_meta_data.csv")
_SKIP = ("__MACOSX/",)
MAX_UNPACKED_BYTES = 8_000_000_000  # in all; the real bundle is ~162 MB zipped
MAX_RATIO = 200.0  # unpacked bytes per compressed byte; text deflates ~5:1, a deflate bomb ~1000:1
RATIO_FLOOR = 1 << 20  # entries smaller than this may compress better (a tiny repetitive file is no bomb)
MAX_BYTES_ENV = "NANOFORGE_BUNDLE_MAX_BYTES"
MAX_RATIO_ENV = "NANOFORGE_BUNDLE_MAX_RATIO"
_CHUNK = 1 << 20


class BundleError(ValueError):
    """An eval bundle that is unsafe, incomplete, or not a CORE bundle."""


def check_bundle(directory: str | Path = EVAL_BUNDLE_DIR) -> dict:
    """Raise BundleError unless `directory` holds a complete bundle; return {tasks, files, bytes}."""
    directory = Path(directory)
    missing = [name for name in (*REQUIRED, "eval_data") if not (directory / name).exists()]
    if missing:
        raise BundleError(f"{directory}: not a CORE eval bundle, missing {', '.join(missing)}")
    try:
        spec = yaml.safe_load((directory / "core.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BundleError(f"{directory / 'core.yaml'}: unreadable ({exc})") from None
    tasks = spec.get("icl_tasks") if isinstance(spec, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise BundleError(f"{directory / 'core.yaml'}: has no icl_tasks list")
    absent = []
    for task in tasks:
        uri = task.get("dataset_uri") if isinstance(task, dict) else None
        if not uri or not (directory / "eval_data" / uri).is_file():
            absent.append(f"{task.get('label', '?') if isinstance(task, dict) else task}: eval_data/{uri}")
    if absent:
        raise BundleError(f"{directory}: core.yaml lists task data that is missing: {'; '.join(absent)}")
    files = [p for p in directory.rglob("*") if p.is_file()]
    return {"tasks": len(tasks), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def bundle_ok(directory: str | Path = EVAL_BUNDLE_DIR) -> bool:
    try:
        check_bundle(directory)
        return True
    except BundleError:
        return False


def _entry_parts(info: zipfile.ZipInfo, archive: Path) -> tuple[str, ...]:
    """The entry's path components, or BundleError if extracting it could escape or link."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"{archive}: refusing entry {info.filename!r}: absolute path")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise BundleError(f"{archive}: refusing entry {info.filename!r}: '..' would write outside the bundle (zip-slip)")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BundleError(f"{archive}: refusing entry {info.filename!r}: symbolic link")
    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and stat.S_IFMT(mode):
        raise BundleError(f"{archive}: refusing entry {info.filename!r}: not a regular file or folder")
    return parts


def _bundle_root(entries: list[tuple[zipfile.ZipInfo, tuple[str, ...]]], archive: Path) -> tuple[str, ...]:
    roots = [parts[:-1] for info, parts in entries if parts and parts[-1] == "core.yaml" and not info.is_dir()]
    if not roots:
        raise BundleError(f"{archive}: no core.yaml inside; is this the CORE eval bundle (eval_bundle.zip)?")
    return min(roots, key=len)


@dataclass(frozen=True)
class Limits:
    """What a bundle zip may unpack to; `raise_with` names the settings that raise them."""

    max_bytes: int = MAX_UNPACKED_BYTES
    max_ratio: float = MAX_RATIO
    raise_with: str = f"{MAX_BYTES_ENV} / {MAX_RATIO_ENV}"

    def hint(self) -> str:
        return f"if you trust this archive, raise {self.raise_with}"


def bundle_limits(max_bytes: int | None = None, max_ratio: float | None = None, raise_with: str | None = None) -> Limits:
    """The limits in effect: the environment beats the arguments (params), which beat the defaults."""
    values = []
    for given, env, default, kind in ((max_bytes, MAX_BYTES_ENV, MAX_UNPACKED_BYTES, int),
                                      (max_ratio, MAX_RATIO_ENV, MAX_RATIO, float)):
        if os.environ.get(env, "").strip():
            try:
                given = kind(float(os.environ[env]))
            except ValueError:
                raise BundleError(f"{env}={os.environ[env]!r} is not a number") from None
        value = default if given is None else given
        if not value > 0:
            raise BundleError(f"{env}={value!r}: the limit must be positive")
        values.append(value)
    return Limits(values[0], values[1], raise_with or Limits.raise_with)


def _size(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{int(n):,} bytes"


def _compressed_spans(zf: zipfile.ZipFile) -> dict[str, int]:
    """Bytes of the file each entry can really occupy: up to the next entry's header (or the central directory)."""
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    ends = [i.header_offset for i in infos[1:]] + [zf.start_dir]
    return {i.filename: max(1, end - i.header_offset) for i, end in zip(infos, ends)}


def _check_declared(archive: Path, chosen: list, limits: Limits) -> int:
    """Refuse a bomb by its headers, before anything is written; returns the declared unpacked total."""
    max_bytes, max_ratio = limits.max_bytes, limits.max_ratio
    need = 0
    for info, _ in chosen:  # as declared; _extract measures against what the file really holds
        need += info.file_size
        if need > max_bytes:
            raise BundleError(f"{archive}: refusing entry {info.filename!r}: with it the zip unpacks to "
                              f"{_size(need)}, over the limit of {_size(max_bytes)} ({limits.hint()})")
        packed = info.compress_size or 1
        if info.file_size > RATIO_FLOOR and info.file_size > max_ratio * packed:
            raise BundleError(f"{archive}: refusing entry {info.filename!r}: a zip bomb ({info.file_size / 1e6:,.1f} MB "
                              f"from {packed / 1e3:,.1f} KB, {info.file_size / packed:,.0f}:1, over the limit of "
                              f"{max_ratio:g}:1; {limits.hint()})")
    packed = archive.stat().st_size  # many small entries, each below RATIO_FLOOR
    if need > RATIO_FLOOR and need > max_ratio * packed:
        raise BundleError(f"{archive}: refusing a zip bomb: {packed / 1e6:,.2f} MB would unpack to {need / 1e6:,.1f} MB "
                          f"({need / packed:,.0f}:1, over the limit of {max_ratio:g}:1; {limits.hint()})")
    return need


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path, budget: int,
             packed: int, limits: Limits) -> int:
    """Write one entry, counting bytes as they come (headers can lie); returns the bytes written."""
    written = 0
    allowed = max(RATIO_FLOOR, limits.max_ratio * packed)
    try:
        with zf.open(info) as src, open(target, "wb") as out:
            while block := src.read(_CHUNK):
                written += len(block)
                if written > budget:
                    raise BundleError(f"{archive}: refusing entry {info.filename!r}: the archive unpacks to more than "
                                      f"the limit of {_size(limits.max_bytes)} ({limits.hint()})")
                if written > allowed:
                    raise BundleError(f"{archive}: refusing entry {info.filename!r}: a zip bomb (over "
                                      f"{written / 1e6:,.1f} MB from {packed / 1e3:,.1f} KB in the file, over the "
                                      f"limit of {limits.max_ratio:g}:1; {limits.hint()})")
                out.write(block)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise BundleError(f"{archive}: entry {info.filename!r} is corrupt ({exc})") from None
    return written


def unpack_bundle(archive: str | Path, dest: str | Path = EVAL_BUNDLE_DIR, limits: Limits | None = None) -> dict:
    """Safely unpack the bundle zip at `archive` into `dest` (atomically). Returns check_bundle's dict.

    `limits`: what it may unpack to (default: bundle_limits(), the environment or the defaults).
    """
    archive, dest = Path(archive), Path(dest)
    limits = limits or bundle_limits()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{archive}: not a readable zip file ({exc})") from None
    with zf:
        entries = [(info, _entry_parts(info, archive)) for info in zf.infolist()]  # all checked before any write
        entries = [(i, p) for i, p in entries if p and not any(i.filename.startswith(s) for s in _SKIP)]
        root = _bundle_root(entries, archive)
        chosen = [(i, p[len(root):]) for i, p in entries if p[: len(root)] == root and len(p) > len(root)]
        spans = _compressed_spans(zf)
        need = _check_declared(archive, chosen, limits)
        dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest.parent).free
        if need > free:
            raise BundleError(f"{archive}: unpacking needs {need / 1e6:.1f} MB, only {free / 1e6:.1f} MB free under {dest.parent}")
        with atomic_dir(dest) as tmp:
            total = 0
            for info, parts in chosen:
                target = tmp.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                packed = min(info.compress_size, spans[info.filename]) or 1  # a header can claim more
                total += _extract(zf, info, target, archive, limits.max_bytes - total, packed, limits)
            info = check_bundle(tmp)
            tmp.chmod(0o755)  # a temp dir is created private; the bundle is not
    return info


def copy_bundle(src: str | Path, dest: str | Path = EVAL_BUNDLE_DIR) -> dict:
    """Copy a bundle folder into `dest` (atomically), refusing symlinks. Returns check_bundle's dict."""
    src, dest = Path(src), Path(dest)
    check_bundle(src)
    links = [str(p) for p in src.rglob("*") if p.is_symlink()]
    if links:
        raise BundleError(f"{src}: refusing to copy a bundle with symbolic links: {', '.join(links[:5])}")
    with atomic_dir(dest) as tmp:
        # file by file, not copytree: a read-only source must not give us read-only folders
        for path in sorted(src.rglob("*")):
            target = tmp / path.relative_to(src)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        info = check_bundle(tmp)
        tmp.chmod(0o755)
    return info
