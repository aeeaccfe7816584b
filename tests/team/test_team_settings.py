"""Team mode's settings and its refusals, without servers (seconds; part of `make test`).

The servers themselves are tested by test_team.py (`make test-team`)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from team.settings import SettingError, Team, sqlalchemy_url
from tests.conftest import REPO, run


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on it now
    return port


@pytest.fixture
def team_env(tmp_path) -> dict[str, str]:
    """team.env's defaults, its state in tmp_path, every port closed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DAGSTER_", "NANOFORGE_TEAM", "AWS_"))}
    env["NANOFORGE_TEAM_STATE"] = str(tmp_path / "state")
    for name in ("PG", "S3", "MLFLOW", "DAGSTER"):
        env[f"NANOFORGE_TEAM_{name}_PORT"] = str(closed_port())
    return env


def test_plain_postgres_urls_get_the_installed_driver():
    assert sqlalchemy_url("postgresql://u:p@h:5/db", "X") == "postgresql+psycopg2://u:p@h:5/db"
    assert sqlalchemy_url("postgres://u@h/db", "X") == "postgresql+psycopg2://u@h/db"
    assert sqlalchemy_url("postgresql+psycopg2://u@h/db", "X") == "postgresql+psycopg2://u@h/db"
    assert sqlalchemy_url("sqlite:///x.db", "X") == "sqlite:///x.db"
    with pytest.raises(SettingError, match="NANOFORGE_MLFLOW_BACKEND_URI uses the driver 'psycopg'"):
        sqlalchemy_url("postgresql+psycopg://u@h/db", "NANOFORGE_MLFLOW_BACKEND_URI")


def test_the_driver_the_url_names_is_installed_and_sqlalchemy_builds_an_engine():
    """The plain URL failed because SQLAlchemy 2.1's default Postgres driver (psycopg 3) is not
    installed; the normalised one must load the driver that is (psycopg2, pinned)."""
    from sqlalchemy import create_engine

    engine = create_engine(sqlalchemy_url("postgresql://u:p@127.0.0.1:1/db", "X"))
    assert engine.dialect.driver == "psycopg2"
    import dagster_postgres  # noqa: F401  (Dagster's Postgres storage, pinned with dagster)


def test_overrides_flow_into_the_urls_that_use_them(team_env):
    team = Team.load(REPO, {**team_env, "NANOFORGE_TEAM_PG_PORT": "6001", "NANOFORGE_TEAM_PG_PASSWORD": "s3cret"})
    assert team.dagster_pg_url == "postgresql+psycopg2://nanoforge:s3cret@127.0.0.1:6001/dagster"
    assert team.mlflow_backend.endswith("@127.0.0.1:6001/mlflow")
    assert team.client_env()["NANOFORGE_DAGSTER_PG_URL"] == team.dagster_pg_url
    # a line in <state>/team.env overrides the defaults; the environment overrides both
    state = Path(team_env["NANOFORGE_TEAM_STATE"])
    state.mkdir()
    (state / "team.env").write_text("NANOFORGE_TEAM_PG_USER=alice\nNANOFORGE_S3_BUCKET=shared\n")
    team = Team.load(REPO, {**team_env, "NANOFORGE_S3_BUCKET": "mine"})
    assert "//alice:" in team.dagster_pg_url and team["NANOFORGE_DVC_REMOTE_URL"] == "s3://mine/dvc"


@pytest.mark.parametrize("key, value, message", [
    ("NANOFORGE_TEAM_PG_PORT", "54x", "NANOFORGE_TEAM_PG_PORT='54x' is not a port number"),
    ("NANOFORGE_TEAM_SERVICES", "postgres,redis", "NANOFORGE_TEAM_SERVICES names redis"),
    ("NANOFORGE_DAGSTER_PG_URL", "localhost:5432", "NANOFORGE_DAGSTER_PG_URL='localhost:5432' is not a URL"),
    ("NANOFORGE_DVC_REMOTE_URL", "/tmp/remote", "NANOFORGE_DVC_REMOTE_URL='/tmp/remote' must be s3://"),
])
def test_a_bad_setting_is_one_line_naming_it_before_anything_starts(team_env, key, value, message):
    proc = run([sys.executable, "-m", "team", "up"], REPO, env={**team_env, key: value}, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (Path(team_env["NANOFORGE_TEAM_STATE"]) / "run").exists()  # nothing was started


def test_status_names_what_is_down_and_dagster_refuses_to_start_without_postgres(team_env):
    status = run([sys.executable, "-m", "team", "status"], REPO, env=team_env, check=False, timeout=120)
    assert status.returncode == 1, status.stdout
    lines = status.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["postgres", "DOWN"]] * 2 + [
        ["s3", "DOWN"], ["mlflow", "DOWN"], ["dagster", "DOWN"]]
    assert "(NANOFORGE_DAGSTER_PG_URL) does not answer" in lines[0] and "(MLFLOW_TRACKING_URI)" in lines[3]
    # the webserver and daemon are not started against a Postgres that is not there
    up = run([sys.executable, "-m", "team", "up"], REPO, env={**team_env, "NANOFORGE_TEAM_SERVICES": "dagster"},
             check=False, timeout=120)
    assert up.returncode == 2 and "Traceback" not in up.stderr, up.stderr
    assert up.stderr.startswith("team up: Dagster not started: Postgres at 127.0.0.1:")
    assert "(NANOFORGE_DAGSTER_PG_URL) does not answer" in up.stderr
    assert not list((Path(team_env["NANOFORGE_TEAM_STATE"]) / "run").glob("*.pid"))
