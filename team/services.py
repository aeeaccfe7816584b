"""The S3 server, the MLflow tracking server and Dagster's webserver + daemon of the team stack.

Notable:
- S3 is moto's standalone server (`moto[server]`, as DVC's own test suite uses), from its
  own tool env .venv/tools/s3 (`make team-setup`): in-memory, so its objects last until
  `team down`. A managed S3 replaces it (drop `s3` from NANOFORGE_TEAM_SERVICES, empty
  NANOFORGE_S3_ENDPOINT_URL).
- MLflow: `mlflow server` with the Postgres store and artifacts proxied to S3
  (`--artifacts-destination`), so clients need only its URL, no S3 credentials.
- Dagster as in production: dagster-daemon and dagster-webserver as two processes on the
  repo's workspace.yaml, instance storage in Postgres (team/dagster.yaml); both refuse to
  start, with one line, when Postgres does not answer.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import requests

from team import postgres, procs
from team.settings import Team

REPO = Path(__file__).resolve().parents[1]
MOTO = REPO / ".venv/tools/s3/bin/moto_server"
DAGSTER_TEMPLATE = Path(__file__).with_name("dagster.yaml")


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=3).status_code < 500
    except requests.RequestException:
        return False


def _base_env(team: Team) -> dict[str, str]:
    env = {**os.environ, **team.client_env(), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# --- S3

def s3_client(team: Team, quick: bool = False):
    """A boto3 S3 client with team.env's endpoint and credentials (`quick`: fail in seconds, for status)."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}) if quick else None
    return boto3.client("s3", endpoint_url=team["NANOFORGE_S3_ENDPOINT_URL"] or None,
                        aws_access_key_id=team["AWS_ACCESS_KEY_ID"], aws_secret_access_key=team["AWS_SECRET_ACCESS_KEY"],
                        region_name=team["AWS_DEFAULT_REGION"], config=config)


def start_s3(team: Team) -> str:
    if procs.running_pid(team.state, "s3"):
        return f"already up at {team['NANOFORGE_S3_ENDPOINT_URL']}"
    moto = Path(os.environ.get("NANOFORGE_TEAM_MOTO_SERVER") or MOTO)
    if not moto.exists():
        raise RuntimeError(f"moto's S3 server is not installed at {moto}: run `make team-setup`")
    procs.start(team.state, "s3", [str(moto), "-H", team.host, "-p", str(team.port("s3"))], _base_env(team), team.root)
    procs.wait_ready(team.state, "s3", lambda: _http_ok(team["NANOFORGE_S3_ENDPOINT_URL"] + "/moto-api/"), 60)
    bucket = team["NANOFORGE_S3_BUCKET"]
    client = s3_client(team)
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    return f"up at {team['NANOFORGE_S3_ENDPOINT_URL']} (bucket {bucket}, in memory)"


def check_bucket(team: Team) -> str | None:
    """None when the bucket answers with these credentials; else one line naming the setting."""
    bucket = team["NANOFORGE_S3_BUCKET"]
    try:
        s3_client(team, quick=True).head_bucket(Bucket=bucket)
        return None
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            return f"S3 bucket {bucket!r} does not exist (NANOFORGE_S3_BUCKET)"
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"S3 refused the credentials for bucket {bucket!r} (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        return (f"S3 at {team['NANOFORGE_S3_ENDPOINT_URL'] or 'AWS'} does not answer (NANOFORGE_S3_ENDPOINT_URL): "
                f"{' '.join(str(exc).split())[:200]}")


# --- MLflow

def start_mlflow(team: Team) -> str:
    url = team["MLFLOW_TRACKING_URI"]
    if procs.running_pid(team.state, "mlflow"):
        return f"already up at {url}"
    if "postgres" in team.services or team.mlflow_backend.startswith("postgresql"):
        down = postgres.ping(team, "NANOFORGE_MLFLOW_BACKEND_URI")
        if down:
            raise RuntimeError(f"MLflow not started: {down}")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", team.mlflow_backend,
           "--artifacts-destination", team["NANOFORGE_MLFLOW_ARTIFACTS"], "--serve-artifacts",
           "--host", team.host, "--port", str(team.port("mlflow")), "--workers", "1"]
    procs.start(team.state, "mlflow", cmd, _base_env(team), team.root)
    procs.wait_ready(team.state, "mlflow", lambda: _http_ok(url + "/health"), 300)  # the first start migrates the store
    return f"up at {url} (store {team.mlflow_backend.split('@')[-1]}, artifacts {team['NANOFORGE_MLFLOW_ARTIFACTS']})"


# --- Dagster

def dagster_env(team: Team) -> dict[str, str]:
    env = _base_env(team)
    env["NANOFORGE_ROOT"] = str(team.root)
    return env


def start_dagster(team: Team) -> str:
    workspace = team.root / "workspace.yaml"
    if not workspace.exists():
        raise RuntimeError(f"no workspace.yaml in {team.root}: Dagster's webserver and daemon load the code from it")
    down = postgres.ping(team)
    if down:
        raise RuntimeError(f"Dagster not started: {down}")
    team.dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DAGSTER_TEMPLATE, team.dagster_home / "dagster.yaml")
    bin_ = Path(sys.executable).parent
    env, url = dagster_env(team), f"http://{team.host}:{team.port('dagster')}"
    if not procs.running_pid(team.state, "dagster-daemon"):
        procs.start(team.state, "dagster-daemon", [str(bin_ / "dagster-daemon"), "run", "-w", str(workspace)],
                    env, team.root)
    if not procs.running_pid(team.state, "dagster-webserver"):
        procs.start(team.state, "dagster-webserver", [str(bin_ / "dagster-webserver"), "-w", str(workspace),
                                                      "-h", team.host, "-p", str(team.port("dagster"))], env, team.root)
    procs.wait_ready(team.state, "dagster-webserver", lambda: _http_ok(url + "/server_info"), 300)
    return f"webserver up at {url}, daemon running (DAGSTER_HOME={team.dagster_home})"


def daemon_health(team: Team) -> dict[str, bool] | None:
    """Each daemon's health as the webserver reports it (scheduler, sensors, run queue...)."""
    query = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
    try:
        response = requests.post(f"http://{team.host}:{team.port('dagster')}/graphql", json={"query": query}, timeout=10)
        statuses = response.json()["data"]["instance"]["daemonHealth"]["allDaemonStatuses"]
    except Exception:
        return None
    return {s["daemonType"]: bool(s["healthy"]) for s in statuses if s["required"]}
