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
