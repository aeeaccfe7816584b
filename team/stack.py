"""The team stack as a whole: up, down, status, the DVC remote, and the shell environment.

Notable:
- `up` starts what NANOFORGE_TEAM_SERVICES names in dependency order (Postgres, S3,
  MLflow, Dagster) and stops again what it started when a later one fails, so a
  failed `up` leaves nothing half-running.
- `remote` writes the S3 remote into .dvc/config.local (credentials stay out of git);
  a fresh clone runs it once, then `dvc pull`.
- `env` prints the exports a shell (or a CI step) needs to use the stack:
  `eval "$(python -m team env)"`.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from team import postgres, procs, services
from team.settings import Team

ORDER = ("postgres", "s3", "mlflow", "dagster")
PROCESSES = {"s3": ["s3"], "mlflow": ["mlflow"], "dagster": ["dagster-webserver", "dagster-daemon"]}
REMOTE_NAME = "team"


def _state_dir(team: Team) -> None:
    team.state.mkdir(parents=True, exist_ok=True)
    team.state.chmod(0o711)  # Postgres' own user must be able to enter it
    ignore = team.state / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# team mode's local state (python -m team up): never committed\n*\n")


def up(team: Team) -> None:
    _state_dir(team)
    start = {"postgres": postgres.start, "s3": services.start_s3, "mlflow": services.start_mlflow,
             "dagster": services.start_dagster}
    started = []
    for name in ORDER:
        if name not in team.services:
            continue
        try:
            print(f"team: {name}: {start[name](team)}", flush=True)
        except Exception:
            for done in reversed(started):  # nothing half-running
                stop_service(team, done)
            stop_service(team, name)
            raise
        started.append(name)
    if "s3" in team.services or team["NANOFORGE_S3_ENDPOINT_URL"]:
        remote(team)
    print(f"team: up. In a shell: eval \"$({sys.executable} -m team env)\"", flush=True)


def stop_service(team: Team, name: str) -> bool:
    if name == "postgres":
        return postgres.stop(team)
    return any([procs.stop(team.state, p, timeout=60 if p == "dagster-daemon" else 20) for p in PROCESSES[name]])


def down(team: Team) -> None:
    for name in reversed(ORDER):
        if name in team.services:
            print(f"team: {name}: {'stopped' if stop_service(team, name) else 'was not running'}", flush=True)


def status(team: Team) -> int:
    """One line per service; exit code 1 when any of them is down."""
    lines = []
    for key in ("NANOFORGE_DAGSTER_PG_URL", "NANOFORGE_MLFLOW_BACKEND_URI"):  # local or managed: both need it
        problem = postgres.ping(team, key)
        lines.append(("postgres", problem or f"{key.split('_')[1].lower()} database answers"))
    problem = services.check_bucket(team)
    lines.append(("s3", problem or f"bucket {team['NANOFORGE_S3_BUCKET']} answers at "
                                   f"{team['NANOFORGE_S3_ENDPOINT_URL'] or 'AWS'}"))
    url = team["MLFLOW_TRACKING_URI"]
    lines.append(("mlflow", f"up at {url}" if services._http_ok(url + "/health")
                  else f"MLflow server at {url} does not answer (MLFLOW_TRACKING_URI)"))
    health = services.daemon_health(team)
    web = f"http://{team.host}:{team.port('dagster')}"
    if health is None:
        lines.append(("dagster", f"webserver at {web} does not answer (NANOFORGE_TEAM_DAGSTER_PORT)"))
    else:
        sick = [name for name, ok in health.items() if not ok]
        lines.append(("dagster", f"daemons not healthy: {', '.join(sick)} (see {procs.log_file(team.state, 'dagster-daemon')})"
                      if sick else f"webserver up at {web}, daemons healthy"))
    down_ = False
    for name, text in lines:
        bad = any(w in text for w in ("does not", "not healthy", "refused", "not exist"))
        down_ |= bad
        print(f"{name:9s} {'DOWN' if bad else 'up  '}  {text}", flush=True)
    return 1 if down_ else 0


def remote(team: Team, root: Path | None = None) -> None:
    """The S3 DVC remote, as the default, in <root>/.dvc/config.local."""
    root = root or team.root
    dvc = services.REPO / ".venv/bin/dvc"
    dvc_cmd = str(dvc) if dvc.exists() else "dvc"

    def run(*args: str) -> None:
        subprocess.run([dvc_cmd, *args], cwd=root, check=True, capture_output=True, text=True)

    run("remote", "add", "--local", "--force", "--default", REMOTE_NAME, team["NANOFORGE_DVC_REMOTE_URL"])
    if team["NANOFORGE_S3_ENDPOINT_URL"]:
        run("remote", "modify", "--local", REMOTE_NAME, "endpointurl", team["NANOFORGE_S3_ENDPOINT_URL"])
    run("remote", "modify", "--local", REMOTE_NAME, "access_key_id", team["AWS_ACCESS_KEY_ID"])
    run("remote", "modify", "--local", REMOTE_NAME, "secret_access_key", team["AWS_SECRET_ACCESS_KEY"])
    run("remote", "modify", "--local", REMOTE_NAME, "region", team["AWS_DEFAULT_REGION"])
    print(f"team: dvc remote `{REMOTE_NAME}` -> {team['NANOFORGE_DVC_REMOTE_URL']} (in {root}/.dvc/config.local)",
          flush=True)


def env_lines(team: Team) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for k, v in team.client_env().items()]
