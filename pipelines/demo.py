"""`make demo`: the whole pipeline through Dagster, recorded in the repo's own Dagster instance.

    python -m pipelines.demo                     # job `pipeline`: download -> ... -> register
    python -m pipelines.demo --job eval_and_report

Notable:
- Runs the job in this process against the persistent instance in $DAGSTER_HOME
  (the repo's .dagster/ by default), so `make ui` afterwards shows every asset
  materialized, with its metadata, checks and logs, and this run in its run list.
- Each step is `dvc repro --single-item <stage>`: a second `make demo` re-runs only
  what changed and takes seconds.
- Ends with a table of what each stage did and how long it took (the step's wall
  time, the DVC command's, and the difference: Dagster's overhead), then where to look.
- A demo killed hard (SIGKILL, OOM) leaves its run STARTED and its `dvc` pool slot
  claimed, which would make the next demo wait forever; runs launched this way carry
  their pid, so the next demo frees what a dead one holds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from nanoforge.formats import human

ROOT = Path(os.environ.get("NANOFORGE_ROOT") or Path(__file__).resolve().parents[1])


def _home() -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(ROOT / ".dagster")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and (ROOT / ".dagster/dagster.yaml").exists():
        shutil.copy(ROOT / ".dagster/dagster.yaml", home / "dagster.yaml")
    return home


def free_dead_claims(instance, pool: str = "dvc") -> list[str]:
    """Release pool slots held by demo runs whose process is gone; returns their run ids."""
    import socket

    import psutil

    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    freed = []
    for slot in storage.get_concurrency_info(pool).claimed_slots:
        run = instance.get_run_by_id(slot.run_id)
        tags = run.tags if run else {}
        dead = run is None or run.is_finished or (
            tags.get("nanoforge/host") == socket.gethostname() and tags.get("nanoforge/pid")
            and not psutil.pid_exists(int(tags["nanoforge/pid"])))
        if dead:
            if run is not None and not run.is_finished:
                instance.report_run_failed(run, "its process died (found by the next `make demo`)")
            storage.free_concurrency_slots_for_run(slot.run_id)
            freed.append(slot.run_id)
    return freed


def step_times(instance, run_id: str) -> dict[str, float]:
    import dagster as dg

    start: dict[str, float] = {}
    took: dict[str, float] = {}
    for entry in instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS,
                                                     dg.DagsterEventType.STEP_FAILURE}):
        if entry.dagster_event.event_type == dg.DagsterEventType.STEP_START:
            start[entry.step_key] = entry.timestamp
        elif entry.step_key in start:
            took[entry.step_key] = entry.timestamp - start[entry.step_key]
    return took


HEADLINE = {"download": ("shards", "rows"), "tokenizer": ("vocab_size", "val_bytes_per_token"),
            "train": ("val_bpb", "tok_per_sec", "mfu_percent"), "evaluate": ("val_bpb", "core"),
            "register": ("decision", "model_version"), "report": ("report_html",)}


def numbers(name: str, meta: dict) -> str:
    """The asset's headline numbers, formatted as everywhere else (nanoforge/formats.py); each BPB with its tokens."""
    parts = []
    for key in HEADLINE.get(name, ()):
        if key not in meta:
            continue
        text = f"{key.removesuffix('_percent')} {human(key, meta[key])}"
        if key.endswith("_bpb") and meta.get(f"{key}_tokens") is not None:
            text += f" ({human(f'{key}_tokens', meta[f'{key}_tokens'])} tokens)"
        parts.append(text)
    if name == "register" and meta.get("up_to_date") and "decision" not in meta:
        parts.append("no new model version (the model and its scores are unchanged)")
    return ", ".join(parts)


def summary(result, instance) -> str:
    took = step_times(instance, result.run_id)
    rows = [("asset", "what happened", "step s", "command s", "overhead s", "numbers")]
    for event in result.all_events:
        if event.event_type_value != "ASSET_MATERIALIZATION" or event.step_key is None:
            continue
        m = event.event_specific_data.materialization
        name = m.asset_key.to_user_string()
        if name != event.step_key:  # shard partitions logged by the download step
            continue
        meta = {k: v.value for k, v in m.metadata.items()}
        status = str(meta.get("dvc_status", "")).split(":")[0]
        command = float(meta.get("duration_s") or 0.0)
        step = took.get(name, command)
        rows.append((name, status, f"{step:.1f}", f"{command:.1f}", f"{step - command:.1f}", numbers(name, meta)))
    from pipelines.defs.sensors import step_failure_reason

    reasons = {e.step_key: step_failure_reason(e) for e in result.all_events if e.event_type_value == "STEP_FAILURE"}
    for key in took.keys() - {r[0] for r in rows}:  # failed steps, with the stage's own message
        rows.append((key, "FAILED", f"{took[key]:.1f}", "", "", (reasons.get(key) or "")[:200]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--job", default="pipeline", help="pipeline (default), retrain, eval_and_report")
    args = parser.parse_args(argv)
    home = _home()
    os.chdir(ROOT)

    import dagster as dg

    from pipelines.definitions import build_definitions

    defs = build_definitions(ROOT)
    try:
        job = defs.resolve_job_def(args.job)
    except Exception:
        names = sorted(j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__"))
        print(f"error: no job {args.job!r}; jobs: {', '.join(names)}", file=sys.stderr)
        return 2
    instance = dg.DagsterInstance.get()
    for run_id in free_dead_claims(instance):
        print(f"[demo] freed the `dvc` pool slot of run {run_id}, whose process had died", flush=True)
    print(f"[demo] job `{args.job}` through Dagster (DAGSTER_HOME={home}); each step runs `dvc repro --single-item`",
          flush=True)
    start = time.monotonic()
    result = job.execute_in_process(
        instance=instance, raise_on_error=False,
        tags={"nanoforge/trigger": "make demo", "nanoforge/pid": str(os.getpid()), "nanoforge/host": socket.gethostname()},
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
    )
    wall = time.monotonic() - start
    print("\n" + summary(result, instance))
    print(f"\n[demo] run {result.run_id} {'succeeded' if result.success else 'FAILED'} in {wall:.1f}s")
    uri = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")
    from pipelines.defs.resources import mlflow_ui_url

    print(f"""
Where to look:
  Dagster   make ui   -> http://127.0.0.1:3000/runs/{result.run_id}  (assets, metadata, checks, logs)
  Report    {ROOT / 'reports/report.html'}
  MLflow    make mlflow  -> {mlflow_ui_url()}  ({uri}: one parent run, a child per stage; model `nanoforge-base`)
  DVC       dvc status; dvc metrics show; dvc plots show""")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
