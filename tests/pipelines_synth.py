"""A small synthetic DVC project for the orchestration tests: three quick stages that
track to MLflow and report over Dagster Pipes like the real ones, in seconds.

`make_synthetic(root)` is a throwaway clone of this repo (stages/, pipelines/, git,
DVC, a local remote) whose dvc.yaml is replaced by these stages.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import make_project, run

STEP = '''"""One synthetic stage: reads its params section and its input, writes outputs and metrics."""
import json, os, sys, time
import yaml
from nanoforge import pipes
from nanoforge.tracking import stage_run

name = sys.argv[1]
params = yaml.safe_load(open("params.yaml")).get(name) or {}
out = f"out/{name}"
os.makedirs(out, exist_ok=True)
if name == "prepare" and not isinstance(params.get("n"), int):  # like a real stage: one line, before any work
    pipes.error(f"prepare.n must be an integer, got {params.get('n')!r}: set prepare.n in params.yaml")
    sys.exit(2)
with stage_run(name, params) as run:
    time.sleep(float(os.environ.get("SYNTH_SLEEP", "0")))
    metrics = {"mlflow_run_id": run.run_id}
    if name == "prepare":
        open(f"{out}/data.txt", "w").write("x" * params["n"])
        metrics.update(n=params["n"])
    elif name == "fit":
        n = len(open("out/prepare/data.txt").read())
        resume = os.environ.get("NANOFORGE_RESUME", "auto")
        state = f"{out}/state.txt"  # kept between runs, no DVC output, like train's checkpoints
        runs = 1 if resume == "fresh" or not os.path.exists(state) else int(open(state).read()) + 1
        open(state, "w").write(str(runs))
        rows = [(s, 3.0 / (1 + s) + 1.0 / n) for s in range(params["steps"])]
        for s, loss in rows:  # the per-step progress, as train sends it
            pipes.progress(f"step {s + 1}/{len(rows)} | loss {loss:.4f}", {"step": s + 1, "loss": loss},
                           last=s + 1 == len(rows))
            wait, t0 = os.environ.get("SYNTH_WAIT_FOR"), time.time()
            while s == 0 and wait and not os.path.exists(wait) and time.time() - t0 < 60:
                time.sleep(0.05)  # the test says go once Dagster showed the first step
        open(f"{out}/steps.csv", "w").write("step,loss\\n" + "".join(f"{s},{l}\\n" for s, l in rows))
        open(f"{out}/model.txt", "w").write(f"model trained on {n} chars for {params['steps']} steps")
        metrics.update(val_bpb=rows[-1][1], tok_per_sec=1000.0, num_params=n * 10, resume=resume, runs=runs,
                       tasks={"alpha": {"accuracy": 0.5, "items": 4}, "beta": {"accuracy": 0.75, "items": 4}})
    elif name == "score":
        metrics.update(core=0.25, model_chars=len(open("out/fit/model.txt").read()))
    json.dump(metrics, open(f"{out}/metrics.json", "w"))
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
pipes.report({"reported_by_stage": name, "mlflow_run_id": run.run_id})
print(f"[{name}] done", flush=True)
'''

STAGES = {
    "prepare": {
        "cmd": "python synth.py prepare",
        "deps": ["synth.py"],
        "params": ["prepare"],
        "outs": ["out/prepare/data.txt"],
        "metrics": [{"out/prepare/metrics.json": {"cache": False}}],
    },
    "fit": {
        "cmd": "python synth.py fit",
        "deps": ["synth.py", "out/prepare/data.txt"],
        "params": ["fit"],
        "outs": ["out/fit/model.txt"],
        "metrics": [{"out/fit/metrics.json": {"cache": False}}],
        "plots": [{"out/fit/steps.csv": {"cache": False, "x": "step", "y": "loss"}}],
        "meta": {"dagster": {"group": "model", "owners": ["team:ml"], "kinds": ["pytorch"], "resumable": True}},
    },
}
EXTRA = {
    "score": {
        "cmd": "python synth.py score",
        "deps": ["synth.py", "out/fit/model.txt"],
        "metrics": [{"out/score/metrics.json": {"cache": False}}],
    },
}


def write_pipeline(root: Path, extra: bool = False) -> None:
    stages = {**STAGES, **(EXTRA if extra else {})}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))


def make_synthetic(root: Path, extra: bool = False, params: dict | None = None) -> Path:
    make_project(root, params={"pipeline.min_bytes_per_token": 1.0, **(params or {})})
    (root / "synth.py").write_text(STEP)
    write_pipeline(root, extra)
    tree = yaml.safe_load((root / "params.yaml").read_text())
    tree.update({"prepare": {"n": 50}, "fit": {"steps": 30}})
    (root / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "synthetic pipeline"], root)
    return root
