"""PostgreSQL from the distribution's package, its data dir under the team state folder.

Notable:
- Installed with apt when missing (as root); the binaries are found under
  /usr/lib/postgresql/<version>/bin, the highest version first.
- Postgres refuses to run as root: as root, initdb, the server and pg_ctl run as the
  package's `postgres` user, which owns the data dir (every folder above it must be
  traversable by that user: the error names NANOFORGE_TEAM_STATE when not).
- TCP on NANOFORGE_TEAM_HOST only, no Unix socket (no shared /var/run/postgresql),
  password auth (scram-sha-256); the superuser is NANOFORGE_TEAM_PG_USER, and the MLflow and
  Dagster databases are created from their URLs' names.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

from team.settings import Team

PG_OWNER = "postgres"


def bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


def install() -> Path:
    """The Postgres binaries, installed with apt first when missing."""
    found = bin_dir()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("PostgreSQL is not installed and this is not root with apt-get: install the "
                           "distribution's `postgresql` package, or drop postgres from NANOFORGE_TEAM_SERVICES")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("team: installing postgresql with apt-get (once)", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=env)
    found = bin_dir()
    if not found:
        raise RuntimeError("apt-get installed postgresql but pg_ctl is not under /usr/lib/postgresql/*/bin")
    return found


def pg_dir(team: Team) -> Path:
    return team.state / "postgres"


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", PG_OWNER, "--", *cmd] if os.geteuid() == 0 else cmd


def _prepare_dir(team: Team) -> None:
    base = pg_dir(team)
    base.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return
    owner = pwd.getpwnam(PG_OWNER)
    os.chown(base, owner.pw_uid, owner.pw_gid)
    for parent in base.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise RuntimeError(f"Postgres runs as `{PG_OWNER}`, which cannot enter {parent} (mode "
                               f"{oct(os.stat(parent).st_mode & 0o777)}): put NANOFORGE_TEAM_STATE elsewhere, "
                               f"or `chmod o+x {parent}`")


def initdb(team: Team, bindir: Path) -> None:
    data = pg_dir(team) / "data"
    if (data / "PG_VERSION").exists():
        return
    _prepare_dir(team)
    pwfile = pg_dir(team) / "pwfile"
    pwfile.write_text(team["NANOFORGE_TEAM_PG_PASSWORD"] + "\n")
    if os.geteuid() == 0:
        owner = pwd.getpwnam(PG_OWNER)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    os.chmod(pwfile, 0o600)
    try:
        subprocess.run(_as_owner([str(bindir / "initdb"), "-D", str(data), "-U", team["NANOFORGE_TEAM_PG_USER"],
                                  f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"]),
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"initdb failed for {data}:\n{exc.stderr.strip()[-2000:]}") from None
    finally:
        pwfile.unlink(missing_ok=True)


def start(team: Team) -> str:
    bindir = install()
    initdb(team, bindir)
    data, log = pg_dir(team) / "data", pg_dir(team) / "postgres.log"
    if _server_answers(team):
        return f"already up on {team.host}:{team.port('pg')}"
    options = f"-c listen_addresses={team.host} -c port={team.port('pg')} -c unix_socket_directories=''"
    proc = subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                     "-w", "-t", "120", "start"]), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else proc.stderr
        raise RuntimeError(f"Postgres did not start on {team.host}:{team.port('pg')} "
                           f"(NANOFORGE_TEAM_PG_PORT):\n{tail.strip()}")
    for key in ("NANOFORGE_MLFLOW_BACKEND_URI", "NANOFORGE_DAGSTER_PG_URL"):
        create_database(team, key)
    return f"up on {team.host}:{team.port('pg')} (data dir {data})"


def stop(team: Team) -> bool:
    data, bindir = pg_dir(team) / "data", bin_dir()
    if bindir is None or not (data / "postmaster.pid").exists():
        return False
    subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                   capture_output=True, text=True)
    return True


def _connect(url: str, dbname: str | None = None):
    import psycopg2

    parts = urlsplit(url.replace("postgresql+psycopg2://", "postgresql://", 1))
    return psycopg2.connect(host=parts.hostname, port=parts.port or 5432, user=unquote(parts.username or ""),
                            password=unquote(parts.password or ""), dbname=dbname or parts.path.lstrip("/"),
                            connect_timeout=5)


def _server_answers(team: Team) -> bool:
    try:
        _connect(team.dagster_pg_url, dbname="postgres").close()
        return True
    except Exception:
        return False


def ping(team: Team, key: str = "NANOFORGE_DAGSTER_PG_URL") -> str | None:
    """None when the database in setting `key` answers; else one line saying why not, naming `key`."""
    url = team.dagster_pg_url if key == "NANOFORGE_DAGSTER_PG_URL" else team.mlflow_backend
    try:
        _connect(url).close()
        return None
    except Exception as exc:  # psycopg2.OperationalError, or the driver missing
        parts = urlsplit(url)
        reason = " ".join(str(exc).split())[:300]
        return f"Postgres at {parts.hostname}:{parts.port} ({key}) does not answer: {reason}"


def create_database(team: Team, key: str) -> None:
    url = team.dagster_pg_url if key == "NANOFORGE_DAGSTER_PG_URL" else team.mlflow_backend
    name = urlsplit(url).path.lstrip("/")
    conn = _connect(url, dbname="postgres")
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
