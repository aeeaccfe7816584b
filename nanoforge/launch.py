"""Run a torchrun stage (train, evaluate) here or as a Slurm job, as params.yaml's `launch:` says.

    python -m nanoforge.launch [--params params.yaml] [--set launch.nodes=2] stages.train [stage args]

Notable:
- `launch.launcher: local` is dvc.yaml's old command, unchanged: nanoforge.torchrun
  --standalone in this process, `<stage>.nproc_per_node` processes.
- `slurm` checks the request before anything is submitted (sbatch on PATH, the partition
  known to sinfo, nodes x tasks fitting train's batch arithmetic, then `sbatch --test-only`,
  the cluster's own verdict), each a one-line error naming the `launch.*` key.
- The batch script (artifacts/slurm/<stage>-<time>.sbatch, its log beside it as .out) runs
  one torchrun agent per node with srun, meeting over c10d on the job's first node. It is
  submitted with `sbatch --parsable --wait`, so this command returns when the job ends and
  `dvc repro` keeps its semantics (same cmd, deps, params, outs; the stage writes them on
  the shared filesystem). The job's log is followed onto our stdout while it runs.
- SIGTERM/SIGINT here become `scancel --signal=TERM <job>`: the tasks get SIGTERM, train
  saves a checkpoint, and the same command resumes. The exit code is the job's; a failed
  job prints Slurm's state and reason (scontrol, else sacct).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from nanoforge.common import write_text
from nanoforge.config import PARAMS_FILE, ConfigError, LaunchConfig, Params, TrainConfig, load_params

SLURM_DIR = Path("artifacts/slurm")
STAGES = ("train", "evaluate")  # the stages that run under torchrun


class LaunchError(RuntimeError):
    """A launch request that cannot run; the message names the `launch.*` key to change."""


def stage_of(module: str) -> str:
    stage = module.removeprefix("stages.")
    if module != f"stages.{stage}" or stage not in STAGES:
        raise LaunchError(f"{module!r}: expected one of {', '.join('stages.' + s for s in STAGES)}")
    return stage


def tasks_per_node(params: Params, stage: str) -> int:
    return params.launch.tasks_per_node or getattr(params, stage).nproc_per_node


def check_world(params: Params, stage: str) -> None:
    """nodes x tasks_per_node must fit train's batch arithmetic (evaluate splits any world size)."""
    if stage != "train":
        return
    cfg, world = params.train, params.launch.nodes * tasks_per_node(params, stage)
    try:
        TrainConfig.batch_geometry(cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len, world,
                                   f"launch.nodes x launch.tasks_per_node ({params.launch.nodes} x "
                                   f"{tasks_per_node(params, stage)})")
    except ValueError as exc:
        raise LaunchError(str(exc)) from None


def torchrun_args(params: Params, stage: str, stage_args: list[str]) -> list[str]:
    """What nanoforge.torchrun gets under `local`: today's dvc.yaml command."""
    return ["--standalone", f"--nproc_per_node={tasks_per_node(params, stage)}", "-m", f"stages.{stage}",
            *stage_args]


# ---------------------------------------------------------------------------
# Slurm

def check_cluster(cfg: LaunchConfig) -> None:
    """Before any script is written: the client tools and the partition."""
    if shutil.which("sbatch") is None:
        raise LaunchError("launch.launcher=slurm but sbatch is not on PATH: install Slurm's client tools "
                          "(Debian: slurm-client) or set launch.launcher: local")
    if cfg.partition is None:
        return
    proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise LaunchError(f"sinfo failed ({proc.stderr.strip() or proc.returncode}): cannot check "
                          f"launch.partition={cfg.partition!r}; is slurmctld reachable?")
    known = [p.strip().rstrip("*") for p in proc.stdout.split()]
    if cfg.partition not in known:
        raise LaunchError(f"launch.partition={cfg.partition!r} is not a partition of this cluster "
                          f"(sinfo: {', '.join(known) or 'none'}); set one of them, or null for the default")


def batch_script(params: Params, stage: str, stage_args: list[str], log: Path, cwd: Path) -> str:
    """The sbatch script: one torchrun agent per node (srun), c10d rendezvous on the first node."""
    cfg = params.launch
    lines = ["#!/bin/bash", f"#SBATCH --job-name=nanoforge-{stage}", f"#SBATCH --nodes={cfg.nodes}",
             "#SBATCH --ntasks-per-node=1",  # the agent; it starts tasks_per_node workers itself
             f"#SBATCH --output={log}", f"#SBATCH --chdir={cwd}"]
    if cfg.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={cfg.gpus_per_node}")
    for key, flag in (("partition", "--partition"), ("account", "--account"), ("time_limit", "--time")):
        if getattr(cfg, key) is not None:
            lines.append(f"#SBATCH {flag}={getattr(cfg, key).strip()}")
    lines += [f"#SBATCH {shlex.quote(option)}" for option in cfg.sbatch_options]
    torchrun = [shlex.quote(sys.executable), "-m", "nanoforge.torchrun", "--nnodes=$SLURM_NNODES",
                f"--nproc_per_node={tasks_per_node(params, stage)}", "--rdzv_backend=c10d",
                f'--rdzv_endpoint="$head:{cfg.rdzv_port}"', "--rdzv_id=$SLURM_JOB_ID", "-m", f"stages.{stage}"]
    lines += [
        "set -euo pipefail",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f'echo "nanoforge: job $SLURM_JOB_ID, $SLURM_NNODES node(s), rendezvous on $head:{cfg.rdzv_port}"',
        # --kill-on-bad-exit: a node that fails ends the others instead of leaving them in a collective
        "srun --kill-on-bad-exit=1 " + " ".join(torchrun) + "".join(" " + shlex.quote(a) for a in stage_args),
    ]
    return "\n".join(lines) + "\n"


def test_only(script: Path) -> None:
    """`sbatch --test-only`: the cluster's verdict on the request, before anything runs."""
    proc = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split()) or f"exit {proc.returncode}"
        raise LaunchError(f"Slurm rejects the job ({msg}); change launch.nodes, launch.tasks_per_node, "
                          "launch.gpus_per_node, launch.partition, launch.account, launch.time_limit or "
                          f"launch.sbatch_options (script: {script})")


def _follow(path: Path, done: threading.Event) -> None:
    """Copy the job's log onto our stdout as it grows, until the job has ended."""
    pos = 0
    while True:
        finished = done.is_set()
        if path.exists():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            if chunk:
                pos += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if finished:
            return
        time.sleep(0.2)


def job_reason(job_id: str) -> str:
    """Slurm's account of how a job ended: scontrol while it remembers the job, else sacct."""
    proc = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    if proc.returncode == 0:
        fields = dict(re.findall(r"(\w+)=(\S+)", proc.stdout))
        return f"state {fields.get('JobState', '?')}, exit {fields.get('ExitCode', '?')}, reason {fields.get('Reason', '?')}"
    proc = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State,ExitCode,Reason"], capture_output=True,
                          text=True, timeout=30)
    return " ".join(proc.stdout.split()) if proc.returncode == 0 and proc.stdout.strip() else "unknown (no accounting)"


def cancel(job_id: str) -> None:
    """TERM to the job's tasks (train checkpoints); a job still pending has nothing to save: cancel it."""
    proc = subprocess.run(["scancel", "--signal=TERM", job_id], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or "pending" in proc.stderr.lower():
        subprocess.run(["scancel", job_id], timeout=30)


def submit(script: Path, log: Path) -> int:
    """sbatch --parsable --wait; forwards SIGTERM/SIGINT as scancel --signal=TERM; returns the job's exit code."""
    job, stopping = [], []

    def forward(signum, _frame):
        stopping.append(signum)
        if job:  # before sbatch has said the id, the cancel happens as soon as it does
            print(f"slurm: {signal.Signals(signum).name}, scancel --signal=TERM {job[0]} (the job saves a "
                  "checkpoint)", file=sys.stderr, flush=True)
            cancel(job[0])

    # installed before the submission, so no signal can leave a job running behind us
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    done = threading.Event()
    follower = threading.Thread(target=_follow, args=(log, done), daemon=True)
    try:
        # its own session: a Ctrl-C on the terminal reaches us only, and becomes a scancel
        proc = subprocess.Popen(["sbatch", "--parsable", "--wait", str(script)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        job_id = proc.stdout.readline().strip().split(";")[0]
        if not job_id:
            err = " ".join(proc.stderr.read().split())
            proc.wait()
            raise LaunchError(f"sbatch failed: {err or f'exit {proc.returncode}'} (script: {script})")
        job.append(job_id)
        print(f"slurm: submitted job {job_id} ({script}); its log: {log}", flush=True)
        if stopping:
            forward(stopping[0], None)
        follower.start()
        code = proc.wait()
    finally:
        done.set()
        if follower.is_alive():
            follower.join(timeout=10)
        for s, handler in old.items():
            signal.signal(s, handler)
    if code != 0:
        why = "stopped on request" if stopping else "failed"
        print(f"slurm: job {job_id} {why}: {job_reason(job_id)}; its log: {log}", file=sys.stderr, flush=True)
    return code


def run_slurm(params: Params, stage: str, stage_args: list[str]) -> int:
    check_cluster(params.launch)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    script = (SLURM_DIR / f"{stage}-{stamp}.sbatch").resolve()
    log = script.with_suffix(".out")
    write_text(script, batch_script(params, stage, stage_args, log, Path.cwd()))
    test_only(script)
    return submit(script, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanoforge.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the stage: stages.train or stages.evaluate")
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="launch.KEY=VALUE",
                        help="override a launch param for this run (repeatable, before the stage); "
                             "a stage's own --set goes after the stage")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, help="passed to the stage")
    args = parser.parse_args(argv)
    stage_args = args.stage_args[1:] if args.stage_args[:1] == ["--"] else args.stage_args
    if args.params != str(PARAMS_FILE):
        stage_args = ["--params", args.params, *stage_args]  # the stage reads the same file
    try:
        stage = stage_of(args.module)
        bad = [o for o in args.overrides if not o.startswith("launch.")]
        if bad:
            raise LaunchError(f"--set {bad[0]}: nanoforge.launch overrides launch.* only; a stage's own "
                              f"--set goes after the stage (python -m nanoforge.launch stages.train --set depth=6)")
        # the stage's section must be in the file (never a silent run on defaults); launch: may be absent (local)
        params = load_params(args.params, args.overrides, section=stage)
        check_world(params, stage)
        if params.launch.launcher == "local":
            from nanoforge.torchrun import main as torchrun

            return torchrun(torchrun_args(params, stage, stage_args))
        return run_slurm(params, stage, stage_args)
    except (ConfigError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
