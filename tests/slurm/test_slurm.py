"""nanoforge.launch under `launcher: slurm` on a real one-node Slurm cluster (tests/slurm/cluster.py).

`make test-slurm` (not in `make test`): installs slurm-wlm and munge with apt when missing,
starts munged + slurmctld + slurmd in a temp dir, and stops them after. One node x 2 CPU
tasks (gloo), a tiny train run through sbatch --wait, SIGTERM -> scancel -> checkpoint -> resume.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nanoforge.training.checkpoint import list_checkpoints
from tests.conftest import REPO
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
