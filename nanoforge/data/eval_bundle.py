"""The CORE eval bundle on disk: safe unpacking, copying, and a completeness check.

Notable:
- The layout is nanochat's: core.yaml (icl_tasks with dataset_uri), eval_meta_data.csv,
  eval_data/<category>/<task>.jsonl. The official zip wraps it in a top-level
  `eval_bundle/` folder; we find the bundle root by its core.yaml, so zips with
  or without that folder both work (macOS `__MACOSX/` litter is skipped).
- A zip is checked entry by entry before anything is written: absolute paths,
  `..` components (zip-slip), symlinks and special files are refused, naming the
  entry. Backslashes count as separators, so a Windows-made zip can't sneak `..\\`.
- Unpacking goes to a temporary folder that replaces data/eval_bundle only when
  complete and checked (every dataset_uri of core.yaml present), so a failed or
  killed unpack never leaves a half bundle under the final name.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import yaml

from nanoforge.common import EVAL_BUNDLE_DIR, atomic_dir

REQUIRED = ("core.yaml", "eval_meta_data.csv")
_SKIP = ("__MACOSX/",)


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


def unpack_bundle(archive: str | Path, dest: str | Path = EVAL_BUNDLE_DIR) -> dict:
    """Safely unpack the bundle zip at `archive` into `dest` (atomically). Returns check_bundle's dict."""
    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{archive}: not a readable zip file ({exc})") from None
    with zf:
        entries = [(info, _entry_parts(info, archive)) for info in zf.infolist()]  # all checked before any write
        entries = [(i, p) for i, p in entries if p and not any(i.filename.startswith(s) for s in _SKIP)]
        root = _bundle_root(entries, archive)
        chosen = [(i, p[len(root):]) for i, p in entries if p[: len(root)] == root and len(p) > len(root)]
        need = sum(i.file_size for i, _ in chosen)
        dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest.parent).free
        if need > free:
            raise BundleError(f"{archive}: unpacking needs {need / 1e6:.1f} MB, only {free / 1e6:.1f} MB free under {dest.parent}")
        with atomic_dir(dest) as tmp:
            for info, parts in chosen:
                target = tmp.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                    raise BundleError(f"{archive}: entry {info.filename!r} is corrupt ({exc})") from None
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
