"""DVC experiments right after a finished run, as the README tells a newcomer to try them.

Issue 15: `dvc exp run -S train.num_iterations=...` after `make demo` used to fail with
"cannot resume from artifacts/checkpoints/step_...: it was written by a different run
configuration" under a torchrun traceback. A params change is a new run: the old
checkpoints are archived and training starts fresh.
"""

from __future__ import annotations

import pytest

import json
import os

from tests.conftest import TINY, copy_project, run, tool


@pytest.mark.cluster  # a whole pipeline, then dvc exp runs: minutes; make test-slurm runs it, make test stays under 10
def test_dvc_exp_run_with_a_changed_horizon_right_after_a_finished_run(tiny_pipeline, tmp_path):
    project, env = tiny_pipeline
    work = copy_project(project, tmp_path / "project")
    env = {**env, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}  # this test's own store: the shared one is read by others
    # the README's "record the run in git" step, so experiments compare against it
    run("git add -A && git commit -q -m 'the tiny run'", work, env=env)
    steps = TINY["train.num_iterations"] // 2
    proc = run([tool("dvc"), "exp", "run", "-S", f"train.num_iterations={steps}"], work, env=env, check=False,
               timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "cannot resume" not in out
    assert [line for line in out.splitlines() if "new run, starting fresh" in line], out[-4000:]
    assert "train.num_iterations" in out or "train horizon" in out  # the one line names what changed
    assert json.loads((work / "artifacts/train/details.json").read_text())["steps"] == steps  # metrics.json: compared numbers only
    # nothing of the finished run is lost: its checkpoints are in the archive
    archived = [p.name for p in (work / "artifacts/checkpoints-archive").glob("*/step_*")]
    assert f"step_{TINY['train.num_iterations']:06d}" in archived, archived
    # and DVC records the experiment against the committed run
    shown = run([tool("dvc"), "exp", "show", "--json"], work, env=env).stdout
    assert str(steps) in shown
    # going back to the committed params finds the committed results: DVC's run cache, no retraining
    back = run([tool("dvc"), "exp", "run", "-S", f"train.num_iterations={TINY['train.num_iterations']}"], work,
               env=env, check=False, timeout=600)
    out = back.stdout + back.stderr
    assert back.returncode == 0, out[-4000:]
    assert "Stage 'train' is cached - skipping run" in out, out[-4000:]  # DVC's run cache
    assert json.loads((work / "artifacts/train/details.json").read_text())["steps"] == TINY["train.num_iterations"]
