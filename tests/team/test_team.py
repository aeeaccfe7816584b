"""Team mode end to end, on real servers the repo starts itself (`python -m team up`), all on 127.0.0.1:
PostgreSQL (MLflow's store and Dagster's storage), moto's S3 server (DVC remote and MLflow's
artifacts), the MLflow tracking server, Dagster's daemon and webserver as separate processes.

The tiny pipeline runs through the daemon: the nightly schedule fires (its cron set to every
minute, then stopped once it fired), a run submitted meanwhile waits in the queue, and a
params.yaml change makes the sensor start another. Then: the runs in the MLflow server, the
champion, the artifacts in S3, `dvc push` by the nightly job, and a fresh clone's `dvc pull`.
`make test-team` runs it (a few minutes: about 4 of them waiting on servers and the run queue).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import BIN, REPO, make_project, run, tool
from tests.datagen import make_eval_bundle, make_fineweb
from tests.team.dagster_api import DONE, Dagster
from tests.test_pipelines_e2e import TINY as E2E_TINY

pytestmark = pytest.mark.team

# the e2e test's tiny pipeline, with a nightly schedule that fires at the next minute (the test stops it once it has)
TINY = {**E2E_TINY, "pipeline.nightly_cron": "* * * * *"}
STAGES = ["tokenizer", "train", "evaluate", "report", "register"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def team(cmd: str, env: dict, root: Path, check: bool = True, timeout: float = 600):
    # exactly the member's environment: this process's may hold a test's MLFLOW_TRACKING_URI (importing
    # pipelines.definitions sets one), and team's settings let the environment win
    return run([sys.executable, "-m", "team", cmd, "--root", str(root)], REPO, env=env, check=check, timeout=timeout,
               inherit_env=False)


def team_env(base: Path, mirror: Path) -> dict[str, str]:
    """The environment a team member's shell has: team.env's settings on free ports, nothing of the tests'."""
    pg, s3, mlflow, dagster = free_ports(4)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DAGSTER_", "NANOFORGE_", "AWS_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH")}
    env.update(NANOFORGE_TEAM_STATE=str(base / "state"), NANOFORGE_TEAM_PG_PORT=str(pg),
               NANOFORGE_TEAM_S3_PORT=str(s3), NANOFORGE_TEAM_MLFLOW_PORT=str(mlflow),
               NANOFORGE_TEAM_DAGSTER_PORT=str(dagster), NANOFORGE_MIRROR=str(mirror), NANOFORGE_OFFLINE="1",
               DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    exports = run([sys.executable, "-m", "team", "env"], REPO, env=env, inherit_env=False).stdout
    for line in exports.splitlines():  # what `eval "$(python -m team env)"` gives a shell
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip("'")
    return env


def drive_runs(dagster: Dagster, project: Path) -> SimpleNamespace:
    """The schedule fires; a submitted run and a sensor's run queue behind it; all of them finish."""
    nightly = dagster.wait(lambda runs: [r for r in runs if r["tags"].get("dagster/schedule_name") == "nightly_retrain"],
                           240, "the nightly schedule to fire under the daemon")[0]
    assert dagster.stop_schedule("nightly_retrain") == "STOPPED"  # one nightly run is enough
    # the sensor must have looked once (remembering the hashes) before params.yaml changes
    dagster.wait(lambda _: dagster.sensor_ticks("pipeline_inputs_changed"), 120, "the sensor's first tick")
    submitted = dagster.submit("pipeline")
    seen_queued = dagster.wait(lambda runs: [r for r in runs if r["runId"] == submitted and r["status"] == "QUEUED"
                                             and any(o["status"] == "STARTED" for o in runs if o["runId"] != submitted)],
                               60, "the submitted run to wait in the queue while another runs", every=0.5)
    params = project / "params.yaml"  # a value the report stage reads: the sensor runs report (and what follows)
    assert "compare_runs: 5\n" in params.read_text()
    params.write_text(params.read_text().replace("compare_runs: 5\n", "compare_runs: 4\n"))
    dagster.wait(lambda runs: [r for r in runs if r["tags"].get("dagster/sensor_name") == "pipeline_inputs_changed"],
                 600, "the sensor to start a run after params.yaml changed (it waits for the queue to drain)")
    runs = dagster.wait(lambda runs: runs if all(r["status"] in DONE for r in runs) else None,
                        900, "every run to finish", every=5)
    return SimpleNamespace(nightly=nightly["runId"], submitted=submitted, queued=seen_queued[0], runs=runs)


@pytest.fixture(scope="module")
def stack():
    # not pytest's tmp_path: its /tmp/pytest-of-root is 0700, and Postgres runs as its own user
    base = Path(tempfile.mkdtemp(prefix="nanoforge-team-", dir="/tmp"))
    base.chmod(0o711)
    mirror = base / "mirror"
    make_fineweb(mirror, train=(0, 1), val=1822, docs_per_shard=300, manifest=False)
    make_eval_bundle(mirror / "eval_bundle", items_per_task=8)
    env = team_env(base, mirror)
    project = make_project(base / "project", TINY)
    for name in ("workspace.yaml", ".gitignore"):  # as a clone of the repo has them
        shutil.copy2(REPO / name, project / name)
    run("git add -A && git commit -q -m 'workspace, gitignore'", project)
    started = time.monotonic()
    try:
        up = team("up", env, project, timeout=900)
        ns = SimpleNamespace(base=base, env=env, project=project, up=up, up_s=time.monotonic() - started,
                             dagster=Dagster(f"http://127.0.0.1:{env['NANOFORGE_TEAM_DAGSTER_PORT']}"))
        ns.status = team("status", env, project, check=False)
        ns.flow = drive_runs(ns.dagster, project)
        ns.flow_s = time.monotonic() - started - ns.up_s
        yield ns
    finally:
        state = base / "state"
        logs = state / "logs"
        if logs.exists():  # what the servers said, for a failing run
            for log in sorted(logs.glob("*.log")):
                print(f"--- {log.name} (last lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        team("down", env, project, check=False, timeout=300)
        shutil.rmtree(base, ignore_errors=True)


def test_team_up_starts_every_service_and_status_says_so(stack):
    assert stack.status.returncode == 0, stack.status.stdout + stack.status.stderr
    lines = stack.status.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["postgres", "postgres", "s3", "mlflow", "dagster"]
    assert all(line.split()[1] == "up" for line in lines), lines
    # the instance the daemon and webserver share lives in Postgres, with the URL's driver spelled out
    home = Path(stack.env["DAGSTER_HOME"])
    assert yaml.safe_load((home / "dagster.yaml").read_text())["storage"]["postgres"]["postgres_url"] == {
        "env": "NANOFORGE_DAGSTER_PG_URL"}
    assert stack.env["NANOFORGE_DAGSTER_PG_URL"].startswith("postgresql+psycopg2://")
    print(f"team up took {stack.up_s:.0f}s, the runs {stack.flow_s:.0f}s (load {os.getloadavg()[0]:.1f})")


def test_status_names_a_missing_bucket(stack):
    proc = team("status", {**stack.env, "NANOFORGE_S3_BUCKET": "no-such-bucket"}, stack.project, check=False)
    s3 = next(line for line in proc.stdout.splitlines() if line.startswith("s3"))
    assert proc.returncode == 1 and "DOWN" in s3 and "'no-such-bucket' does not exist (NANOFORGE_S3_BUCKET)" in s3, s3


def test_runs_go_through_the_daemon_one_at_a_time_and_succeed(stack):
    runs = {r["runId"]: r for r in stack.flow.runs}
    failed = [(r["jobName"], r["status"]) for r in runs.values() if r["status"] != "SUCCESS"]
    assert not failed, failed
    nightly, submitted = runs[stack.flow.nightly], runs[stack.flow.submitted]
    assert nightly["jobName"] == "retrain" and submitted["jobName"] == "pipeline"
    assert stack.flow.queued["status"] == "QUEUED"  # seen waiting while the nightly run ran
    sensed = [r for r in runs.values() if r["tags"].get("dagster/sensor_name") == "pipeline_inputs_changed"]
    assert len(sensed) == 1 and "params of report changed" in sensed[0]["tags"]["nanoforge/trigger"], sensed
    spans = sorted((r["startTime"], r["endTime"]) for r in runs.values())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans  # never two runs at once: max_concurrent_runs is 1


def test_the_nightly_run_pushed_to_the_s3_remote(stack):
    from team.services import s3_client
    from team.settings import Team

    settings = Team.load(stack.project, stack.env)
    keys = [o["Key"] for page in s3_client(settings).get_paginator("list_objects_v2").paginate(
        Bucket=settings["NANOFORGE_S3_BUCKET"], Prefix="dvc/") for o in page.get("Contents", [])]
    assert len(keys) > 10, keys  # data shards, tokenizer, model, reports...
    # DVC agrees: everything in this dvc.lock and data.dvc is on the remote
    status = run([tool("dvc"), "status", "--cloud", "--json"], stack.project, env=stack.env)
    assert json.loads(status.stdout or "{}") == {}, status.stdout


def test_mlflow_server_holds_the_runs_the_champion_and_the_artifacts_in_s3(stack):
    import mlflow
    from mlflow.tracking import MlflowClient

    from team.services import s3_client
    from team.settings import Team

    uri = stack.env["MLFLOW_TRACKING_URI"]
    assert uri.startswith("http://127.0.0.1:")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("nanoforge")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = {r.data.tags.get("dagster_run_id"): r for r in runs if r.data.tags.get("stage") == "pipeline"}
    parent = parents[stack.flow.nightly]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {c.data.tags["stage"] for c in children} >= {"download", *STAGES}
    assert all(c.info.status == "FINISHED" for c in children)
    train = next(c for c in children if c.data.tags["stage"] == "train")
    assert train.data.params["depth"] == "1"
    assert len(client.get_metric_history(train.info.run_id, "loss")) == 10  # every step reached the server
    champion = client.get_model_version_by_alias("nanoforge-base", "champion")
    ev = json.loads((stack.project / "artifacts/eval/metrics.json").read_text())
    assert float(champion.tags["val_bpb"]) == pytest.approx(ev["val_bpb"])
    # artifacts are proxied: the client only knows the server, the bytes are in the S3 bucket
    assert client.get_run(train.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    settings = Team.load(stack.project, stack.env)
    stored = [o["Key"] for page in s3_client(settings).get_paginator("list_objects_v2").paginate(
        Bucket=settings["NANOFORGE_S3_BUCKET"], Prefix="mlartifacts/") for o in page.get("Contents", [])]
    assert any(k.endswith("/MLmodel") for k in stored), stored[:20]  # the registered model's files
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/nanoforge-base@champion")
    out = model.predict(["The cat sees"], params={"max_tokens": 4})
    assert len(out) == 1 and isinstance(out[0], str)


def files_of(root: Path, rel: str) -> dict[str, str]:
    path = root / rel
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


def cached_outs(root: Path) -> list[str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    outs = [o["path"] for s in lock["stages"].values() for o in s.get("outs", [])]
    return ["data", *outs]


@pytest.fixture(scope="module")
def clone(stack):
    """The run committed, then cloned elsewhere: the remote config by `team remote`, `dvc pull`, and the
    checkpoints (no DVC output) by `team checkpoints-push` there and `checkpoints-pull` here."""
    pushed = team("checkpoints-push", stack.env, stack.project)
    run("git add -A && git commit -q -m 'run: tiny preset, team mode'", stack.project)
    dest = stack.base / "clone"
    run(["git", "clone", "-q", str(stack.project), str(dest)], stack.base)
    team("remote", stack.env, dest)
    pull = run([tool("dvc"), "pull"], dest, env=stack.env)
    pulled = team("checkpoints-pull", stack.env, dest)
    return SimpleNamespace(root=dest, pull=pull, pushed=pushed, pulled=pulled)


def uncached_outputs(root: Path) -> list[str]:
    """dvc.yaml's outputs, metrics and plots declared `cache: false`."""
    found = []
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                if isinstance(entry, dict):
                    path, opts = next(iter(entry.items()))
                    if isinstance(opts, dict) and opts.get("cache") is False:
                        found.append(path)
    return found


def test_every_output_reaches_a_clone_by_the_remote_or_by_git():
    """An uncached output travels in git; one that git ignores reaches no clone (`dvc status` then
    says its stage changed). Needs no servers: the repo's own dvc.yaml and .gitignore."""
    ignored = [p for p in uncached_outputs(REPO)
               if run(["git", "check-ignore", "-q", p], REPO, check=False).returncode == 0]
    assert not ignored, (f"{ignored}: cache: false in dvc.yaml and ignored by git (.gitignore), so neither "
                         f"the DVC remote nor git brings them to a fresh clone")


def test_a_fresh_clone_pulls_every_output_byte_identical_and_is_up_to_date(stack, clone):
    differ = [rel for rel in cached_outs(stack.project) if files_of(clone.root, rel) != files_of(stack.project, rel)]
    assert not differ, f"not restored byte-identical in the clone: {differ}"
    status = run([tool("dvc"), "status", "--json"], clone.root, env=stack.env)
    assert json.loads(status.stdout or "{}") == {}, status.stdout
    repro = run([tool("dvc"), "repro"], clone.root, env=stack.env)
    assert "Running stage" not in repro.stdout, repro.stdout


def test_a_fresh_clone_gets_the_latest_checkpoint_to_resume_from(stack, clone):
    from nanoforge.training.checkpoint import latest_checkpoint

    here, there = stack.project / "artifacts/checkpoints", clone.root / "artifacts/checkpoints"
    assert "pushed" in clone.pushed.stdout and "pulled" in clone.pulled.stdout
    ours = {k: v for k, v in files_of(stack.project, "artifacts/checkpoints").items() if not k.endswith("/.lock")}
    assert files_of(clone.root, "artifacts/checkpoints") == ours  # .lock: train's flock here, not pushed
    assert latest_checkpoint(there).name == latest_checkpoint(here).name  # what train resumes from
    # a second pull does not overwrite checkpoints the clone has
    again = team("checkpoints-pull", stack.env, clone.root, check=False)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr, again.stderr
