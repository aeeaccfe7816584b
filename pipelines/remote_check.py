"""Is the default DVC remote usable? Asked before a run that ends in `dvc push` does any work.

Notable:
- Only an S3 remote (`s3://bucket/...`) is checked: one HEAD of the bucket with the
  remote's own endpointurl, keys and region (.dvc/config, then .dvc/config.local),
  falling back to boto3's usual chain (AWS_ACCESS_KEY_ID, ...) as DVC does.
- A local or other remote, or no boto3 (team mode's extra), is not checked here:
  `dvc push` says what is wrong with it itself.
- The answer is one line naming the setting to fix, as `team status` words it.
"""

from __future__ import annotations

import configparser
from pathlib import Path
from urllib.parse import urlparse


def default_remote(root: Path) -> tuple[str, dict[str, str]] | None:
    """(name, options) of the default DVC remote, config.local over config; None when there is none."""
    parser = configparser.ConfigParser()
    parser.read([root / ".dvc/config", root / ".dvc/config.local"])
    name = parser.get("core", "remote", fallback=None)
    if not name:
        return None
    options: dict[str, str] = {}
    for section in (f'remote "{name}"', f"'remote \"{name}\"'"):  # DVC writes the quoted form
        if parser.has_section(section):
            options.update(parser[section])
    return name, options


def s3_problem(root: Path) -> str | None:
    """None when the default remote is not S3 or its bucket answers; else one line naming the setting."""
    remote = default_remote(root)
    if remote is None:
        return None
    name, opts = remote
    url = opts.get("url", "")
    if not url.startswith("s3://"):
        return None
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return None
    bucket = urlparse(url).netloc
    endpoint = opts.get("endpointurl") or None
    where = f"DVC remote {name!r} ({url})"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=opts.get("access_key_id"),
                              aws_secret_access_key=opts.get("secret_access_key"), region_name=opts.get("region"),
                              config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))
        client.head_bucket(Bucket=bucket)
        return None
    except Exception as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return (f"{where}: S3 bucket {bucket!r} does not exist (the remote's url in .dvc/config(.local); "
                    f"team mode: NANOFORGE_S3_BUCKET / NANOFORGE_DVC_REMOTE_URL)")
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            return (f"{where}: S3 refused the credentials for bucket {bucket!r} (the remote's access_key_id / "
                    f"secret_access_key in .dvc/config.local, else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return (f"{where}: no S3 credentials (the remote's access_key_id / secret_access_key in "
                    f".dvc/config.local, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        return (f"{where}: S3 at {endpoint or 'AWS'} does not answer (the remote's endpointurl): "
                f"{' '.join(str(exc).split())[:200]}")
