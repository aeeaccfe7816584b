"""nanoforge.launch: the local launcher is today's torchrun command; the Slurm one is checked before submission.

The Slurm runs themselves (a real cluster on localhost) are in tests/slurm/ (`make test-slurm`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nanoforge.config import ConfigError, load_params
from nanoforge.launch import SLURM_DIR, batch_script, torchrun_args
from nanoforge.tokenizer.bpe import train_bpe
from tests.conftest import REPO
from tests.datagen import make_documents, make_fineweb

TINY = {"depth": 1, "max_seq_len": 32, "device_batch_size": 4, "total_batch_size": 256, "num_iterations": 6,
        "eval_every": 3, "eval_tokens": 1024, "sample_every": 0, "save_every": 2, "keep_checkpoints": 10,
        "dtype": "float32", "device": "cpu"}


def write_params(root: Path, launch: dict | None = None, **train) -> Path:
    params = {"train": {**TINY, **train}, **({"launch": launch} if launch is not None else {})}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


def make_workdir(root: Path, launch: dict | None = None, **train) -> Path:
    """Generated shards, a real tokenizer and a tiny params.yaml: what the train stage reads."""
    make_fineweb(root / "data" / "fineweb", train=[0, 1], val=1822, docs_per_shard=120, row_group_size=32)
    train_bpe(make_documents(300, seed=7), 300).save(root / "artifacts" / "tokenizer")
    write_params(root, launch, **train)
    return root


def launch(root: Path, *args: str, path: str | None = None, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NANOFORGE_TRACKING": "off",
            "NANOFORGE_CACHE_DIR": str(root / ".cache"), **env}
    if path is not None:
        full["PATH"] = path
    return subprocess.run([sys.executable, "-m", "nanoforge.launch", *args], cwd=root, env=full,
                          capture_output=True, text=True, timeout=timeout)


def test_local_is_todays_torchrun_command(tmp_path):
    params = load_params(write_params(tmp_path, nproc_per_node=2), section="train")
    assert params.launch.launcher == "local"  # no launch: section means local
    assert torchrun_args(params, "train", ["--set", "depth=2"]) == [
        "--standalone", "--nproc_per_node=2", "-m", "stages.train", "--set", "depth=2"]
    params = load_params(write_params(tmp_path, {"tasks_per_node": 4}), section="train")
    assert torchrun_args(params, "evaluate", [])[:2] == ["--standalone", "--nproc_per_node=4"]


@pytest.mark.slow
def test_local_launch_trains_under_torchrun(tmp_path):
    root = make_workdir(tmp_path, nproc_per_node=2)
    proc = launch(root, "stages.train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = (root / "artifacts/train/steps.csv").read_text().splitlines()
    assert len(steps) == 1 + TINY["num_iterations"] and (root / "artifacts/model").is_dir()
    assert not (root / SLURM_DIR).exists()


def test_slurm_without_sbatch_is_one_line_before_any_work(tmp_path):
    write_params(tmp_path, {"launcher": "slurm"})
    proc = launch(tmp_path, "stages.train", path=str(Path(sys.executable).parent))  # a PATH with no sbatch
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: launch.launcher=slurm but sbatch is not on PATH: install Slurm's client "
                                   "tools (Debian: slurm-client) or set launch.launcher: local")
    assert not (tmp_path / SLURM_DIR).exists()  # nothing written


def test_nodes_times_tasks_must_fit_the_batch_arithmetic(tmp_path):
    write_params(tmp_path, {"launcher": "slurm", "nodes": 3, "tasks_per_node": 1})
    proc = launch(tmp_path, "stages.train", path=str(Path(sys.executable).parent))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "launch.nodes x launch.tasks_per_node (3 x 1)" in line and "nearest valid total_batch_size: 384" in line, line


def test_bad_launch_values_name_the_key(tmp_path):
    for launch_cfg, key in (({"nodes": 2}, "launch.nodes=2 needs launch.launcher: slurm"),
                            ({"launcher": "slurm", "time_limit": "4h"}, "launch.time_limit='4h' is not a Slurm time"),
                            ({"launcher": "slurm", "sbatch_options": ["qos=high"]}, "launch.sbatch_options"),
                            ({"launcher": "slurm", "partition": "a b"}, "launch.partition='a b'"),
                            ({"launcher": "pbs"}, "launch.launcher")):
        with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(".", r"\.")):
            load_params(write_params(tmp_path, launch_cfg), section="train")
    write_params(tmp_path)
    proc = launch(tmp_path, "--set", "depth=3", "stages.train")  # the launcher's options go before the stage
    assert proc.returncode == 2 and "overrides launch.* only" in proc.stderr
    proc = launch(tmp_path, "stages.report")
    assert proc.returncode == 2 and "expected one of stages.train, stages.evaluate" in proc.stderr


def test_batch_script_runs_one_agent_per_node_with_c10d_on_the_first(tmp_path):
    launch_cfg = {"launcher": "slurm", "nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8, "partition": "gpu",
                  "account": "lab", "time_limit": "1-00:00:00", "sbatch_options": ["--qos=high", "--exclusive"],
                  "rdzv_port": 29611}
    params = load_params(write_params(tmp_path, launch_cfg, device_batch_size=2, total_batch_size=1024),
                         section="train")
    script = batch_script(params, "train", ["--set", "note=a b"], tmp_path / "t.out", tmp_path)
    lines = script.splitlines()
    for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=1-00:00:00",
                 "#SBATCH --qos=high", "#SBATCH --exclusive", f"#SBATCH --output={tmp_path / 't.out'}"):
        assert want in lines, want
    (srun,) = [l for l in lines if l.startswith("srun ")]
    assert srun.endswith("--nnodes=$SLURM_NNODES --nproc_per_node=8 --rdzv_backend=c10d "
                         "--rdzv_endpoint=\"$head:29611\" --rdzv_id=$SLURM_JOB_ID -m stages.train --set 'note=a b'")
    assert "-m nanoforge.torchrun" in srun
    # every #SBATCH line comes before the first command (sbatch stops reading them there)
    first_cmd = next(i for i, l in enumerate(lines[1:], 1) if not l.startswith("#"))
    assert all(not l.startswith("#SBATCH") for l in lines[first_cmd:])
    (tmp_path / "t.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "t.sbatch")]).returncode == 0
