"""The latest training checkpoints to and from S3, so a run can continue on another machine.

Notable:
- artifacts/checkpoints/ is no DVC output (dvc.yaml: DVC would hash it on every run), so
  `dvc push` leaves it out; this is the explicit push of it, to NANOFORGE_CHECKPOINTS_URL.
- The remote copy is a mirror of the local folder with a MANIFEST.json (path -> md5)
  written last: a pull reads the manifest first, so it never mixes two pushes, checks every
  file's md5, and renames the complete folder into place.
- A pull refuses to replace a local artifacts/checkpoints/ (it may hold newer steps).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from team.services import s3_client
from team.settings import Team

FOLDER = "artifacts/checkpoints"
MANIFEST = "MANIFEST.json"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _where(team: Team) -> tuple[str, str]:
    url = urlsplit(team["NANOFORGE_CHECKPOINTS_URL"])
    return url.netloc, url.path.strip("/")


def push(team: Team, root: Path) -> str:
    local = root / FOLDER
    # .lock: train's flock of the folder, meaningful on this machine only
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != ".lock") if local.is_dir() else []
    if not files:
        raise RuntimeError(f"no checkpoints to push: {local} is empty or missing (train writes them)")
    bucket, prefix = _where(team)
    client = s3_client(team)
    manifest = {str(p.relative_to(local)): _md5(p) for p in files}
    for rel in manifest:
        client.upload_file(str(local / rel), bucket, f"{prefix}/{rel}")
    client.put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=json.dumps(manifest, indent=1).encode())
    stale = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
             for o in page.get("Contents", []) if o["Key"][len(prefix) + 1:] not in {*manifest, MANIFEST}]
    for key in stale:  # files of an older push that this one no longer has
        client.delete_object(Bucket=bucket, Key=key)
    return f"pushed {len(manifest)} checkpoint files to {team['NANOFORGE_CHECKPOINTS_URL']}"


def pull(team: Team, root: Path) -> str:
    local = root / FOLDER
    if local.exists() and any(local.iterdir()):
        raise RuntimeError(f"{local} already holds checkpoints; move it away to pull the team's "
                           f"({team['NANOFORGE_CHECKPOINTS_URL']})")
    bucket, prefix = _where(team)
    client = s3_client(team)
    try:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read())
    except client.exceptions.NoSuchKey:
        raise RuntimeError(f"no checkpoints at {team['NANOFORGE_CHECKPOINTS_URL']} (NANOFORGE_CHECKPOINTS_URL): "
                           f"push them first with `python -m team checkpoints-push`") from None
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoints-", dir=local.parent))
    try:
        for rel, md5 in manifest.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, f"{prefix}/{rel}", str(tmp / rel))
            if _md5(tmp / rel) != md5:
                raise RuntimeError(f"{prefix}/{rel} changed while pulling (md5 differs from the manifest): pull again")
        if local.exists():
            local.rmdir()
        tmp.replace(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"pulled {len(manifest)} checkpoint files into {local}"
