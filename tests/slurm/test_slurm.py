"""nanoforge.launch under `launcher: slurm` on a real one-node Slurm cluster (tests/slurm/cluster.py).

`make test-slurm` (not in `make test`): installs slurm-wlm and munge with apt when missing,
starts munged + slurmctld + slurmd in a temp dir, and stops them after. One node x 2 CPU
tasks (gloo), a tiny train run through sbatch --wait, SIGTERM -> scancel -> checkpoint -> resume;
then the same through Dagster: the pipeline as Slurm jobs, and a cancel from `dagster dev` mid-job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanoforge.training.checkpoint import list_checkpoints
from tests.conftest import REPO, tool
from tests.slurm.cluster import Cluster, ClusterUnavailable
from tests.test_launch import launch, make_workdir, write_params

pytestmark = pytest.mark.slurm
STEPS = 200  # long enough that SIGTERM lands mid-run (tens of ms a step), short enough to finish on resume


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        running = Cluster(tmp_path_factory.mktemp("slurm")).start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no local Slurm cluster: {exc}")
    yield running
    running.stop()


def slurm_launch(**extra) -> dict:
    return {"launcher": "slurm", "tasks_per_node": 2, "partition": "debug", "rdzv_port": free_port(), **extra}


def test_a_train_run_through_sbatch_writes_every_output(cluster, tmp_path):
    root = make_workdir(tmp_path, slurm_launch(time_limit="10"), nproc_per_node=2)
    proc = launch(root, "stages.train", **cluster.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("slurm: submitted job "), proc.stdout[:500]
    assert "step 00006/00006" in proc.stdout  # the job's log, followed onto our stdout
    metrics = json.loads((root / "artifacts/train/details.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert (root / "artifacts/model").is_dir()
    (script,) = (root / "artifacts/slurm").glob("train-*.sbatch")
    assert "#SBATCH --time=10" in script.read_text() and script.with_suffix(".out").exists()


def test_sigterm_becomes_scancel_leaves_a_checkpoint_and_the_next_run_resumes(cluster, tmp_path):
    root = make_workdir(tmp_path, slurm_launch(), nproc_per_node=2, num_iterations=STEPS, save_every=0,
                        eval_every=0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NANOFORGE_TRACKING": "off",
           "NANOFORGE_CACHE_DIR": str(root / ".cache"), **cluster.env}
    proc = subprocess.Popen([sys.executable, "-m", "nanoforge.launch", "stages.train"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 00004/"):
            proc.send_signal(signal.SIGTERM)  # what dvc_exec or a scheduler sends the stage's command
            break
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, out[-3000:] + err[-3000:]
    assert "scancel --signal=TERM" in err and "stopped on request: state FAILED, exit 143:0" in err, err
    assert "checkpoint saved, run the same command to resume" in out, out[-3000:]
    (saved,) = list_checkpoints(root / "artifacts/checkpoints")
    stopped_at = int(saved.name.split("_")[1])
    assert 4 <= stopped_at < STEPS and not (root / "artifacts/model").exists()
    resumed = launch(root, "stages.train", **cluster.env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from artifacts/checkpoints/step_{stopped_at:06d}" in resumed.stdout, resumed.stdout[-3000:]
    steps = (root / "artifacts/train/steps.csv").read_text().splitlines()[1:]
    assert [int(l.split(",")[0]) for l in steps] == list(range(1, STEPS + 1))  # the stopped run's steps kept
    assert (root / "artifacts/model").is_dir()


def test_bad_requests_are_refused_before_submission(cluster, tmp_path):
    write_params(tmp_path, slurm_launch(partition="gpu"), nproc_per_node=2)
    proc = launch(tmp_path, "stages.train", **cluster.env)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: launch.partition='gpu' is not a partition of this cluster (sinfo: debug); "
        "set one of them, or null for the default")
    # a request the cluster cannot meet: Slurm's own message, the keys to change, and no job
    write_params(tmp_path, slurm_launch(nodes=2, tasks_per_node=1), nproc_per_node=1)
    proc = launch(tmp_path, "stages.train", **cluster.env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: Slurm rejects the job (") and "launch.nodes" in proc.stderr, proc.stderr
    assert "submitted job" not in proc.stdout


def test_a_failed_job_fails_the_command_with_slurms_reason(cluster, tmp_path):
    root = make_workdir(tmp_path, slurm_launch(), nproc_per_node=2)
    for shard in (root / "data/fineweb").glob("shard_*.parquet"):
        shard.unlink()  # the stage fails inside the job, after submission
    proc = launch(root, "stages.train", **cluster.env)
    assert proc.returncode != 0 and "submitted job" in proc.stdout
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("slurm: job ")]
    assert " failed: state FAILED, exit " in line and "reason NonZeroExitCode" in line, line


def test_the_pipeline_through_dagster_runs_train_and_evaluate_as_slurm_jobs(cluster, tmp_path_factory):
    """dvc.yaml's command is nanoforge.launch, so `launcher: slurm` in params.yaml is all it takes:
    the Dagster assets run `dvc repro`, DVC runs the launcher, the launcher submits and waits. The
    stage talks to Dagster over the file-based Pipes channel in the project (which the nodes share),
    and the run shows the Slurm job."""
    import dagster as dg

    from pipelines.definitions import build_definitions
    from tests.conftest import make_project, module_env
    from tests.datagen import make_eval_bundle, make_fineweb
    from tests.test_pipelines_e2e import TINY, materializations

    base = tmp_path_factory.mktemp("dagster-slurm")
    with module_env(base) as mp:
        mirror = base / "mirror"
        make_fineweb(mirror, train=(0, 1), val=1822, docs_per_shard=300, manifest=False)
        make_eval_bundle(mirror / "eval_bundle", items_per_task=8)
        mp.setenv("NANOFORGE_MIRROR", str(mirror))
        mp.setenv("PYTHONPATH", str(REPO))  # the job's Python finds the project as a plain run's does
        for key, value in cluster.env.items():
            mp.setenv(key, value)
        # two tasks: device batch 2 keeps train's batch arithmetic (256 tokens = 2 x 64 x 2 ranks)
        project = make_project(base / "project", {**TINY, "train.device_batch_size": 2, "launch.launcher": "slurm",
                                                  "launch.tasks_per_node": 2, "launch.partition": "debug",
                                                  "launch.rdzv_port": free_port()})
        result = build_definitions(project).resolve_job_def("pipeline").execute_in_process(
            instance=dg.DagsterInstance.get(), raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    done = materializations(result)
    for stage in ("train", "evaluate"):
        assert done[stage]["slurm_job_id"].isdigit(), done[stage]
        assert len(list((project / "artifacts/slurm").glob(f"{stage}-*.sbatch"))) == 1
    assert done["train"]["slurm_job_id"] != done["evaluate"]["slurm_job_id"]
    # while it ran: the job id as an observation of the asset (and a log line), not only at the end
    seen = [e.event_specific_data.asset_observation.metadata for e in result.all_events
            if e.event_type_value == "ASSET_OBSERVATION" and e.asset_key.to_user_string() == "train"]
    assert any(m.get("slurm_job_id") and m["slurm_job_id"].value == done["train"]["slurm_job_id"] for m in seen)
    details = json.loads((project / "artifacts/train/details.json").read_text())
    assert details["world_size"] == 2
    assert not any((project / ".pipes").iterdir())  # each step's channel is removed when it ends


@contextlib.contextmanager
def dagster_dev(root: Path, env: dict[str, str]):
    """`dagster dev` on a free port over the project `root`; yields (gql, the repository selector, its log
    file, which also gets the steps' output); stopped after."""
    import requests

    log_path = root.parent / "dagster-dev.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([tool("dagster"), "dev", "-h", "127.0.0.1", "-p", str(port := free_port())], cwd=root,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def gql(query: str, variables: dict | None = None) -> dict:
        answer = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": query, "variables": variables or {}},
                               timeout=30).json()
        assert "errors" not in answer, answer
        return answer["data"]

    try:
        deadline, nodes = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None and not nodes:
            try:
                nodes = gql(REPOS)["repositoriesOrError"].get("nodes")
            except (requests.RequestException, ValueError, AssertionError):
                time.sleep(1)
        assert nodes, log_path.read_text()[-3000:]
        selector = {"repositoryLocationName": nodes[0]["location"]["name"], "repositoryName": nodes[0]["name"]}
        yield gql, selector, log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # dagster dev stops with its process group, not its pid
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


REPOS = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"
CANCEL_STEPS = 80  # the cancel lands some 10 steps after step 5 (a second or two); the resume runs the rest


def wait_until(what, timeout: float, why) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why()
        time.sleep(0.5)


def test_cancelling_the_train_asset_in_dagster_scancels_the_job_and_a_rerun_resumes(cluster, tmp_path):
    """issue 17: a cancel in Dagster's UI (GraphQL terminateRun, what its button sends) reaches the
    Slurm job as scancel --signal=TERM: the job checkpoints, the run is CANCELED, and the next
    run of the asset resumes from that checkpoint on the cluster and finishes."""
    import dagster as dg

    from tests.conftest import make_project
    from tests.datagen import make_eval_bundle, make_fineweb
    from tests.test_pipelines import LAUNCH, STATUS, TERMINATE
    from tests.test_pipelines_e2e import TINY

    mirror = tmp_path / "mirror"
    make_fineweb(mirror, train=(0, 1), val=1822, docs_per_shard=300, manifest=False)
    make_eval_bundle(mirror / "eval_bundle", items_per_task=8)
    project = make_project(tmp_path / "project", {
        **TINY, "train.device_batch_size": 2, "train.num_iterations": CANCEL_STEPS,
        "train.eval_every": CANCEL_STEPS,  # once, at the end: the asset's val_bpb check needs it
        "launch.launcher": "slurm", "launch.tasks_per_node": 2, "launch.partition": "debug",
        "launch.rdzv_port": free_port()})
    home = tmp_path / "dagster"
    home.mkdir()
    shutil.copy(REPO / ".dagster/dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, **cluster.env, "DAGSTER_HOME": str(home), "NANOFORGE_TRACKING": "off", "OMP_NUM_THREADS": "1",
           "NANOFORGE_MIRROR": str(mirror), "NANOFORGE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    # train's inputs, made here (the test is about train's run, not the data assets) while dagster dev starts
    prep: list[subprocess.CompletedProcess] = []

    def make_inputs() -> None:
        for cmd in ([sys.executable, "-m", "stages.download"], [tool("dvc"), "repro", "--single-item", "tokenizer"]):
            prep.append(subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300))
            if prep[-1].returncode != 0:
                return

    maker = threading.Thread(target=make_inputs)
    maker.start()
    instance = dg.DagsterInstance.from_config(str(home))
    with dagster_dev(project, env) as (gql, selector, log):
        maker.join(timeout=300)
        assert len(prep) == 2 and all(p.returncode == 0 for p in prep), [p.stdout[-2000:] + p.stderr[-2000:] for p in prep]
        params = {"selector": {**selector, "jobName": "pipeline", "assetSelection": [{"path": ["train"]}]}}
        run_id = gql(LAUNCH, {"p": params})["launchRun"]["run"]["runId"]

        def job_id() -> str | None:  # the run shows the job while it runs: an observation of the asset
            for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION):
                value = entry.dagster_event.event_specific_data.asset_observation.metadata.get("slurm_job_id")
                if value is not None:
                    return value.value

        def job_log() -> str:
            return "".join(p.read_text(errors="replace") for p in (project / "artifacts/slurm").glob("train-*.out"))

        wait_until(lambda: job_id() and "step 00005/" in job_log(), 240, lambda: log.read_text()[-4000:])
        job = job_id()
        assert gql(TERMINATE, {"id": run_id})["terminateRun"]["__typename"] == "TerminateRunSuccess"
        status = lambda rid: gql(STATUS, {"id": rid})["runOrError"]["status"]  # noqa: E731
        wait_until(lambda: status(run_id) in ("SUCCESS", "FAILURE", "CANCELED"), 240, lambda: log.read_text()[-4000:])
        assert status(run_id) == "CANCELED", log.read_text()[-4000:]
        queued = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True)
        assert queued.stdout.strip() == "", queued.stdout  # the job has ended, not left running
        said = log.read_text()  # the stage's output, as the run's logs show it: launch's lines and the job's
        assert f"scancel --signal=TERM {job}" in said, said[-4000:]
        assert f"slurm: job {job} stopped on request: state FAILED, exit 143:0" in said, said[-4000:]
        assert "checkpoint saved, run the same command to resume" in job_log(), job_log()[-3000:]
        (saved,) = list_checkpoints(project / "artifacts/checkpoints")
        stopped_at = int(saved.name.split("_")[1])
        assert 5 <= stopped_at < CANCEL_STEPS and not (project / "artifacts/model").exists()
        # DVC released its lock and recorded nothing: the next run resumes on the cluster
        again = gql(LAUNCH, {"p": params})["launchRun"]["run"]["runId"]
        wait_until(lambda: status(again) in ("SUCCESS", "FAILURE", "CANCELED"), 300, lambda: log.read_text()[-4000:])
        assert status(again) == "SUCCESS", log.read_text()[-4000:]
    assert f"resuming from artifacts/checkpoints/step_{stopped_at:06d}" in job_log(), job_log()[-3000:]
    steps = (project / "artifacts/train/steps.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in steps] == list(range(1, CANCEL_STEPS + 1))
    assert len(list((project / "artifacts/slurm").glob("train-*.sbatch"))) == 2
