"""MLflow tracking for stages: one MLflow run per stage run, and it never blocks.

Notable:
- Embedded default: a SQLite store `mlflow.db` at the repo root with artifacts in
  `mlartifacts/` beside it, addressed by absolute URI so every process (DVC,
  torchrun ranks, Dagster) agrees. `MLFLOW_TRACKING_URI` points teams at a server.
- Only rank 0 logs under torchrun; other ranks get a tracker that does nothing.
- Metrics are buffered and sent with `log_batch`, never one call per metric in a
  hot loop.
- The experiment is tagged as model training (`mlflow.experimentKind`), so MLflow 3
  opens it on its runs, not on the GenAI overview ("No data available").
- Run URLs are links people can click: the tracking server's own, or `make mlflow`'s
  (http://127.0.0.1:$MLFLOW_PORT, default 5000) for the embedded SQLite store.
- A failed stage leaves its run FAILED with the error as a tag; a stage stopped on
  purpose (Ctrl-C, SIGTERM: the train stage's Preempted) leaves it KILLED.
- An unreachable server, or any tracking error mid-run, is one warning and no lost data:
  the stage goes on, and the rest of its run is kept as JSON lines in `mlruns-offline/`
  (named in the warning); `python -m nanoforge.tracking replay` sends it when the server
  is back (a run cut mid-way continues the same MLflow run).
- Runs carry lineage tags: git commit and dirty flag, stage, hostname, the DVC
  hashes of the stage's inputs, and the parent run (NANOFORGE_PARENT_RUN_ID) that
  groups one pipeline run. A stage run by a bare `dvc repro` (no parent given)
  joins a parent run for that dvc process, so it groups the same way.
- `open_pipeline_run(group)` opens the parent run of one pipeline run (find-or-create
  by a group key, so the several processes of one Dagster run agree on one parent);
  `end_pipeline_run` closes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import yaml

from nanoforge.common import DATA_DIR, get_logger, is_rank0

EXPERIMENT = "nanoforge"
# MLflow 3 picks the experiment's landing page from this tag; without it an experiment
# of plain runs opens on the GenAI overview and names train runs "Evaluations"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
PARENT_ENV = "NANOFORGE_PARENT_RUN_ID"
# runs kept while MLflow is away (relative to the stage's cwd, the repo root); git- and dvc-ignored
OFFLINE_DIR = "mlruns-offline"
REPLAY_CMD = "python -m nanoforge.tracking replay"
_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_FLUSH_EVERY_S = 10.0
_FLUSH_EVERY_N = 500

log = get_logger("tracking")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def _artifact_location() -> str | None:
    # a SQLite store keeps its artifacts beside the database; a server decides its own
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()


def git_info(cwd: str | Path = ".") -> dict[str, str]:
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    # dvc.lock and .gitignore files do not count: `dvc repro` rewrites them as the run's
    # *output*, and committing them afterwards is the normal flow
    status = run("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock",
                 ":(exclude,glob)**/.gitignore")
    if status is None:
        return {"git_commit": commit, "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(bool(status)).lower()}


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.exists() else None
    except (OSError, yaml.YAMLError):
        return None


def _out_hash(out: dict) -> str | None:
    return out.get("md5") or out.get("hash") or out.get("etag")


def input_hashes(stage: str, root: str | Path = ".") -> dict[str, str]:
    """DVC hashes of the data this stage reads: from data.dvc and upstream dvc.lock outs.

    dvc.lock's entry for *this* stage describes its previous run, so the inputs of
    the current run are looked up where they were produced instead.
    """
    root = Path(root)
    tags: dict[str, str] = {}
    produced: dict[str, str] = {}
    data_dvc = _load_yaml(root / "data.dvc") or {}
    for out in data_dvc.get("outs", []):
        if _out_hash(out):
            produced[out["path"]] = _out_hash(out)
            tags["dvc.data_dvc_md5"] = _out_hash(out)
    lock = _load_yaml(root / "dvc.lock") or {}
    for name, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs", []) or []:
            if _out_hash(out):
                produced[out["path"].rstrip("/")] = _out_hash(out)
    if (root / "dvc.lock").exists():
        tags["dvc.lock_sha256"] = hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()[:16]
    spec = _load_yaml(root / "dvc.yaml") or {}
    deps = ((spec.get("stages") or {}).get(stage) or {}).get("deps") or []
    if stage == "download":
        deps = []
    for dep in deps:
        dep = str(dep).rstrip("/")
        if dep in produced:
            tags[f"input.{dep}"] = produced[dep]
        else:  # a path inside a tracked directory, e.g. data/fineweb inside data/
            for path, digest in produced.items():
                if dep.startswith(path + "/"):
                    tags[f"input.{dep}"] = f"{path}@{digest}"
    return tags


class StageRun:
    """What a stage logs through. Every method is a no-op when tracking is off.

    Online it sends to MLflow; offline (server down at start, or a call failed mid-run)
    it appends the same params/metrics/tags as JSON lines to a file under OFFLINE_DIR,
    which `python -m nanoforge.tracking replay` sends once the server is back.
    """

    def __init__(self, client=None, run_id: str | None = None, url: str | None = None):
        self._client = client
        self.run_id = run_id
        self.url = url
        self.offline_file: Path | None = None  # where this run is kept while MLflow is away
        self._buffer: list = []
        self._last_flush = time.monotonic()
        self._auto_parent: str | None = None  # the dvc-process parent this run closes when it ends
        self._offline_group: str | None = None  # the same, for a run kept offline from its start

    @property
    def enabled(self) -> bool:
        """Sending to MLflow right now (an offline run keeps its records, but is not enabled)."""
        return self._client is not None

    @property
    def _active(self) -> bool:
        return self._client is not None or self.offline_file is not None

    def go_offline(self, reason: str, start: dict[str, Any]) -> None:
        """Keep the rest of this run in a local file; one warning says where and how to send it."""
        self._client = None
        name = f"{start.get('stage') or 'run'}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        path = Path(OFFLINE_DIR).resolve() / f"{name}.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("%s, and %s can't be written (%s); this run goes untracked", reason, path.parent, exc)
            return
        self.offline_file = path
        self._write({"op": "run", "uri": tracking_uri(), "start_ms": int(time.time() * 1000), **start})
        log.warning("%s; this run's params, metrics and tags are kept in %s: once MLflow "
                    "(MLFLOW_TRACKING_URI=%s) is back, send them with `%s`", reason, path, tracking_uri(), REPLAY_CMD)

    def _write(self, record: dict[str, Any]) -> None:
        if self.offline_file is None:
            return
        try:  # one line per call, appended: a crash loses at most the line being written
            with open(self.offline_file, "a") as fh:
                fh.write(json.dumps(record, default=str) + "\n")
        except OSError as exc:
            log.warning("can't append to %s (%s); tracking is off for the rest of this run", self.offline_file, exc)
            self.offline_file = None

    def _guard(self, what: str, fn, *args, record: dict[str, Any] | None = None, **kwargs):
        """Call MLflow; on failure (or already offline) keep `record` locally instead. Never raises."""
        if self._client is None:
            if record is not None:
                self._write(record)
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # tracking must never take the pipeline down, nor lose what it was sending
            self.go_offline(f"MLflow {what} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})",
                            {"run_id": self.run_id, "auto_parent": self._auto_parent})
            if record is not None:
                self._write(record)
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self._active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i:i + 100]
            self._guard("log params", self._client and self._client.log_batch, self.run_id, params=chunk,
                        record={"op": "params", "params": {p.key: p.value for p in chunk}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self._active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        if items:
            self._guard("set tags", self._client and self._client.log_batch, self.run_id, tags=items,
                        record={"op": "tags", "tags": {t.key: t.value for t in items}})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Buffer metrics; they are sent in batches every few seconds and at the end."""
        if not self._active:
            return
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self._buffer.append(Metric(key, float(value), now_ms, int(step or 0)))
        if len(self._buffer) >= _FLUSH_EVERY_N or time.monotonic() - self._last_flush > _FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        for i in range(0, len(buffer), _MAX_BATCH):
            chunk = buffer[i:i + _MAX_BATCH]
            self._guard("log metrics", self._client and self._client.log_batch, self.run_id, metrics=chunk,
                        record={"op": "metrics", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in chunk]})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not self._active or not path.exists():
            return
        # offline, the file is named, not copied: replay sends it if it is still there
        record = {"op": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path}
        if path.is_dir():
            self._guard("log artifacts", self._client and self._client.log_artifacts, self.run_id, str(path),
                        artifact_path, record=record)
        else:
            self._guard("log artifact", self._client and self._client.log_artifact, self.run_id, str(path),
                        artifact_path, record=record)

    def log_dict(self, data: Any, name: str) -> None:
        if self._active:
            self._guard("log dict", self._client and self._client.log_dict, self.run_id, data, name,
                        record={"op": "dict", "data": data, "name": name})

    def end(self, status: str) -> None:
        """Flush and close the run (and the dvc-process parent it joined) as `status`."""
        self.flush()
        if not self._active:
            return
        end_ms = int(time.time() * 1000)
        record = {"op": "end", "status": status, "end_ms": end_ms}
        self._guard("end run", self._client and self._client.set_terminated, self.run_id, status, end_ms,
                    record=record)
        if self._auto_parent or self._offline_group:
            self._guard("end parent run", _end_parent, self._client, self._auto_parent, status,
                        record={"op": "end_parent", "run_id": self._auto_parent, "status": status})


def _reachable(uri: str) -> bool:
    if not uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=3)
        return True
    except requests.RequestException:
        return False


def _experiment_id(client) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # a store made before the tag existed
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=_artifact_location(),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise
        return exp.experiment_id


def ui_base() -> str:
    """Where people open MLflow: the tracking server, or `make mlflow` for the embedded store."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return f"http://127.0.0.1:{os.environ.get('MLFLOW_PORT', '').strip() or '5000'}"


def run_url(run_id: str, experiment_id: str) -> str:
    return f"{ui_base()}/#/experiments/{experiment_id}/runs/{run_id}"


def link_for_run(run_id: str) -> str | None:
    """The URL of an existing run (its experiment looked up), or None when MLflow can't say."""
    if not run_id or not _reachable(tracking_uri()):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mlflow.tracking import MlflowClient
        return run_url(run_id, MlflowClient(tracking_uri=tracking_uri()).get_run(run_id).info.experiment_id)
    except Exception:
        return None


def _open(stage: str, params: dict[str, Any], run_name: str | None, tags: dict[str, Any]) -> StageRun:
    uri = tracking_uri()
    all_tags = {"stage": stage, "host": socket.gethostname(), **git_info(), **input_hashes(stage), **tags}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    # what replay needs to create this run later, should MLflow not take it now
    offline_start = {"stage": stage, "run_name": run_name or stage,
                     "tags": {k: str(v) for k, v in all_tags.items()},
                     "group": None if parent else dvc_process_group()}
    if not _reachable(uri):
        tracker = StageRun()
        tracker.go_offline(f"MLflow at {uri} is unreachable", offline_start)
        tracker._offline_group = offline_start["group"]
        tracker.log_params(params)
        return tracker
    # fail fast instead of MLflow's default minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow.tracking import MlflowClient
    auto_parent = None
    try:
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client)
        if offline_start["group"]:
            parent = auto_parent = _find_or_create_parent(client, exp_id, offline_start["group"], "dvc repro", {})
            all_tags["mlflow.parentRunId"] = parent
        run = client.create_run(exp_id, run_name=run_name or stage, tags={k: str(v) for k, v in all_tags.items()})
    except Exception as exc:
        tracker = StageRun()
        tracker.go_offline(f"MLflow at {uri} failed to start a run ({type(exc).__name__}: {exc})", offline_start)
        tracker._offline_group = offline_start["group"]
        tracker.log_params(params)
        return tracker
    tracker = StageRun(client, run.info.run_id, run_url(run.info.run_id, exp_id))
    tracker._auto_parent = auto_parent
    tracker.log_params(params)
    return tracker


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: dict[str, Any] | None = None,
    run_name: str | None = None,
    tags: dict[str, Any] | None = None,
) -> Iterator[StageRun]:
    """One MLflow run around a stage. Rank 0 only; FAILED with the error on exceptions."""
    from nanoforge.config import flatten

    if not is_rank0() or os.environ.get("NANOFORGE_TRACKING", "on") == "off":
        yield StageRun()
        return
    tracker = _open(stage, flatten(params or {}), run_name, tags or {})
    if tracker.enabled:
        log.info("MLflow run %s (%s)", tracker.run_id, tracker.url)
    try:
        yield tracker
    except BaseException as exc:
        tracker.flush()
        tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"})
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")  # the last stage of a dvc process leaves its parent FINISHED


# ---------------------------------------------------------------------------
# pipeline runs: one parent run per pipeline run, a child per stage

GROUP_TAG = "nanoforge.group"  # what one pipeline run is: a Dagster run id, a dvc process


def pipeline_tags(root: str | Path = ".") -> dict[str, str]:
    """What identifies the code and data a pipeline run starts from."""
    root = Path(root)
    tags = {"stage": "pipeline", "host": socket.gethostname(), **git_info(root)}
    if (root / "dvc.lock").exists():
        tags["dvc.lock_sha256"] = hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()[:16]
    for out in (_load_yaml(root / "data.dvc") or {}).get("outs", []):
        if _out_hash(out):
            tags["dvc.data_dvc_md5"] = _out_hash(out)
    return tags


def dvc_process_group() -> str | None:
    """'dvc:<pid>:<start>' when this process runs under `dvc repro`/`dvc exp run`, else None."""
    try:
        import psutil

        for proc in psutil.Process().parents():
            cmd = proc.cmdline()
            names = [Path(c).name for c in cmd[:3]]
            if "dvc" in names and any(word in cmd for word in ("repro", "exp")):
                return f"dvc:{proc.pid}:{int(proc.create_time())}"
    except Exception:
        return None
    return None


@contextlib.contextmanager
def _group_lock(group: str) -> Iterator[None]:
    # several processes may race to open the same parent (ranks, parallel steps)
    import fcntl
    import tempfile

    name = hashlib.sha256(group.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"nanoforge-group-{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _find_or_create_parent(client, exp_id: str, group: str, run_name: str, tags: dict[str, Any],
                           root: str | Path = ".") -> str:
    with _group_lock(group):
        found = client.search_runs([exp_id], filter_string=f"tags.`{GROUP_TAG}` = '{group}'", max_results=1)
        if found:
            run = found[0]
            if run.info.status != "RUNNING":  # a later step of the same pipeline run
                client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        all_tags = {**pipeline_tags(root), **tags, GROUP_TAG: group}
        run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
        return run.info.run_id


def _end_parent(client, run_id: str, status: str, root: str | Path = ".") -> None:
    tags = {}
    lock = Path(root) / "dvc.lock"
    if lock.exists():  # the outputs this pipeline run leaves behind
        tags["dvc.lock_sha256_end"] = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)


def open_pipeline_run(group: str, run_name: str = "pipeline", tags: dict[str, Any] | None = None,
                      root: str | Path = ".") -> str | None:
    """Find or create the parent run of pipeline run `group`; its id, or None when tracking is off.

    Stages join it through NANOFORGE_PARENT_RUN_ID. Calling again with the same
    group (another step of the same Dagster run) returns the same run.
    """
    if os.environ.get("NANOFORGE_TRACKING", "on") == "off":
        return None
    uri = tracking_uri()
    if not _reachable(uri):
        log.warning("MLflow at %s is unreachable; the pipeline runs untracked", uri)
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow.tracking import MlflowClient
    try:
        client = MlflowClient(tracking_uri=uri)
        return _find_or_create_parent(client, _experiment_id(client), group, run_name, tags or {}, root)
    except Exception as exc:
        log.warning("MLflow at %s failed to open the pipeline run (%s: %s)", uri, type(exc).__name__, exc)
        return None


def end_pipeline_run(run_id: str | None, status: str = "FINISHED", tags: dict[str, Any] | None = None,
                     root: str | Path = ".") -> None:
    """Close a parent run (FINISHED, FAILED or KILLED); `root` holds its dvc.lock. Never raises."""
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri())
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, str(value)[:5000])
        _end_parent(client, run_id, status, root)
    except Exception as exc:
        log.warning("could not close MLflow pipeline run %s (%s: %s)", run_id, type(exc).__name__, exc)


# ---------------------------------------------------------------------------
# replay: send the runs kept offline once MLflow is back

def _read_offline(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line a crash cut short; everything before it is whole
            log.warning("%s:%d is not a whole record (a crash mid-write?); skipped", path, n)
    if not records or records[0].get("op") != "run":
        raise ValueError(f"{path} is not an offline MLflow run (its first line is no 'run' record)")
    return records


def _replay_run(client, path: Path) -> str:
    """Send one offline file to `client`'s store; the run's id (created, or the one it was cut from)."""
    from mlflow.entities import Metric, Param, RunTag

    records = _read_offline(path)
    head = records[0]
    # a run cut mid-run continues on the server; one replayed before (and cut again) is not made twice
    run_id = head.get("run_id") or next((r["run_id"] for r in records if r.get("op") == "replayed_as"), None)
    group_parent = head.get("auto_parent")
    if run_id is None:
        exp_id = _experiment_id(client)
        tags = dict(head.get("tags") or {})
        if head.get("group") and "mlflow.parentRunId" not in tags:
            group_parent = tags["mlflow.parentRunId"] = _find_or_create_parent(
                client, exp_id, head["group"], "dvc repro", {})
        run_id = client.create_run(exp_id, start_time=head.get("start_ms"), run_name=head.get("run_name"),
                                   tags=tags).info.run_id
        with open(path, "a") as fh:
            fh.write(json.dumps({"op": "replayed_as", "run_id": run_id}) + "\n")
    for r in records[1:]:
        op = r.get("op")
        if op == "params":
            client.log_batch(run_id, params=[Param(k, v) for k, v in r["params"].items()])
        elif op == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in r["tags"].items()])
        elif op == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in r["metrics"]])
        elif op == "dict":
            client.log_dict(run_id, r["data"], r["name"])
        elif op == "artifact":
            if not Path(r["path"]).exists():
                log.warning("%s: artifact %s is gone; not sent", path, r["path"])
            elif Path(r["path"]).is_dir():
                client.log_artifacts(run_id, r["path"], r.get("artifact_path"))
            else:
                client.log_artifact(run_id, r["path"], r.get("artifact_path"))
        elif op == "end":
            client.set_terminated(run_id, r["status"], r.get("end_ms"))
        elif op == "end_parent" and (r.get("run_id") or group_parent):
            _end_parent(client, r.get("run_id") or group_parent, r["status"])
    return run_id


def replay(directory: str | Path = OFFLINE_DIR) -> list[str]:
    """Send every run kept in `directory` to MLFLOW_TRACKING_URI; each file sent moves to `sent/`.

    Raises on the first file MLflow does not take; that file and those after it stay
    put, so running replay again continues where it stopped.
    """
    from mlflow.tracking import MlflowClient

    directory = Path(directory)
    uri = tracking_uri()
    if not _reachable(uri):
        raise ConnectionError(f"MLflow at {uri} (MLFLOW_TRACKING_URI) is still unreachable; nothing sent")
    client = MlflowClient(tracking_uri=uri)
    sent = []
    for path in sorted(directory.glob("*.jsonl")):
        run_id = _replay_run(client, path)
        (directory / "sent").mkdir(exist_ok=True)
        path.rename(directory / "sent" / path.name)
        log.info("sent %s to %s as run %s", path.name, uri, run_id)
        sent.append(run_id)
    return sent


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nanoforge.tracking",
                                 description="Send the runs kept offline (MLflow was down) to MLFLOW_TRACKING_URI.")
    ap.add_argument("command", choices=["replay"])
    ap.add_argument("--dir", default=OFFLINE_DIR, help=f"where the offline runs are (default {OFFLINE_DIR}/)")
    args = ap.parse_args(argv)
    try:
        sent = replay(args.dir)
    except Exception as exc:
        print(f"replay stopped: {type(exc).__name__}: {exc}")
        return 1
    print(f"sent {len(sent)} run(s) from {args.dir}/ to {tracking_uri()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
