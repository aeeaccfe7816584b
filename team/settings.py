"""Team mode's settings: team/team.env, then <state>/team.env, then the environment (which wins).

Notable:
- One env file holds every port, credential and URL; `${NAME}` refers to a line above, after
  overrides, so `NANOFORGE_TEAM_PG_PORT=6000` moves every URL that uses the port.
- Postgres URLs are accepted plainly (`postgresql://`, `postgres://`) and passed on with the
  driver spelled out (`postgresql+psycopg2://`): SQLAlchemy 2.1 picks psycopg 3 for a plain URL,
  and Dagster's daemon fails on its NOTIFY statement under psycopg 3; psycopg2 is what
  the project pins and installs.
- A setting with a wrong value is refused with one line naming it, before anything starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DEFAULTS = Path(__file__).with_name("team.env")
SERVICES = ("postgres", "s3", "mlflow", "dagster")
_LINE = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")
_REF = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


class SettingError(ValueError):
    """A team setting with a value that cannot work (the message names the setting)."""


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines in order; comments and blank lines skipped; no quoting rules (values are plain)."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise SettingError(f"{path}:{number}: expected NAME=value, got {line!r}")
        out[match.group(1)] = match.group(2).strip()
    return out


def _expand(value: str, resolved: dict[str, str], where: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in resolved:
            raise SettingError(f"{where}: ${{{m.group(1)}}} is not defined above it in team.env")
        return resolved[m.group(1)]

    return _REF.sub(sub, value)


def resolve(root: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Every setting, resolved: environment > <state>/team.env > team/team.env."""
    environ = dict(os.environ if environ is None else environ)
    defaults = parse_env_file(DEFAULTS)
    state = Path(environ.get("NANOFORGE_TEAM_STATE") or defaults["NANOFORGE_TEAM_STATE"])
    local = parse_env_file((state if state.is_absolute() else root / state) / "team.env")
    resolved: dict[str, str] = {}
    for key in [*defaults, *(k for k in local if k not in defaults)]:
        if key in environ:
            resolved[key] = environ[key]  # the environment is taken literally
        else:
            resolved[key] = _expand(local.get(key, defaults.get(key, "")), resolved, key)
    return resolved


def sqlalchemy_url(url: str, setting: str) -> str:
    """A Postgres URL with the installed driver named; other databases (sqlite://) unchanged."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme:
        raise SettingError(f"{setting}={url!r} is not a URL (expected postgresql://user:password@host:port/db)")
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    if scheme.startswith("postgresql+") and scheme != "postgresql+psycopg2":
        raise SettingError(f"{setting} uses the driver {scheme.split('+', 1)[1]!r}; the project installs psycopg2: "
                           f"write postgresql:// or postgresql+psycopg2://")
    return url


@dataclass(frozen=True)
class Team:
    """The resolved settings, with the names the services are started under."""

    root: Path
    values: dict[str, str]

    @classmethod
    def load(cls, root: str | Path, environ: dict[str, str] | None = None) -> "Team":
        team = cls(Path(root).resolve(), resolve(Path(root).resolve(), environ))
        team.check()
        return team

    def __getitem__(self, key: str) -> str:
        return self.values[key]

    @property
    def state(self) -> Path:
        state = Path(self["NANOFORGE_TEAM_STATE"])
        return state if state.is_absolute() else self.root / state

    @property
    def services(self) -> list[str]:
        return [s.strip() for s in self["NANOFORGE_TEAM_SERVICES"].split(",") if s.strip()]

    def port(self, name: str) -> int:
        return int(self[f"NANOFORGE_TEAM_{name.upper()}_PORT"])

    @property
    def host(self) -> str:
        return self["NANOFORGE_TEAM_HOST"]

    @property
    def mlflow_backend(self) -> str:
        return sqlalchemy_url(self["NANOFORGE_MLFLOW_BACKEND_URI"], "NANOFORGE_MLFLOW_BACKEND_URI")

    @property
    def dagster_pg_url(self) -> str:
        return sqlalchemy_url(self["NANOFORGE_DAGSTER_PG_URL"], "NANOFORGE_DAGSTER_PG_URL")

    @property
    def dagster_home(self) -> Path:
        return self.state / "dagster"

    def check(self) -> None:
        unknown = [s for s in self.services if s not in SERVICES]
        if unknown:
            raise SettingError(f"NANOFORGE_TEAM_SERVICES names {', '.join(unknown)}; known: {', '.join(SERVICES)}")
        for name in ("PG", "S3", "MLFLOW", "DAGSTER"):
            key = f"NANOFORGE_TEAM_{name}_PORT"
            if not self.values.get(key, "").isdigit() or not 0 < int(self.values[key]) < 65536:
                raise SettingError(f"{key}={self.values.get(key)!r} is not a port number (1-65535)")
        self.mlflow_backend, self.dagster_pg_url  # noqa: B018 (refuses a bad URL now, naming it)
        for key in ("NANOFORGE_MLFLOW_ARTIFACTS", "NANOFORGE_DVC_REMOTE_URL", "NANOFORGE_CHECKPOINTS_URL"):
            if urlsplit(self[key]).scheme != "s3" or not urlsplit(self[key]).netloc:
                raise SettingError(f"{key}={self[key]!r} must be s3://bucket/prefix")

    def client_env(self) -> dict[str, str]:
        """What every process of the team's pipeline needs: the MLflow server, S3 credentials, Dagster home."""
        env = {k: self[k] for k in ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                     "AWS_DEFAULT_REGION")}
        env["DAGSTER_HOME"] = str(self.dagster_home)
        env["NANOFORGE_DAGSTER_PG_URL"] = self.dagster_pg_url
        if self["NANOFORGE_S3_ENDPOINT_URL"]:
            env["MLFLOW_S3_ENDPOINT_URL"] = self["NANOFORGE_S3_ENDPOINT_URL"]
            env["AWS_ENDPOINT_URL_S3"] = self["NANOFORGE_S3_ENDPOINT_URL"]
        return env
