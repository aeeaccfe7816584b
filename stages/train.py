"""Stage 3, train: nanochat's base pretraining, on one process or under torchrun.

`python -m stages.train` (one process) or `torchrun --nproc_per_node=N -m stages.train`
(DDP: gloo on CPU, NCCL on CUDA). `--fresh` / NANOFORGE_RESUME=fresh starts over
(old checkpoints move to artifacts/checkpoints-archive/<time>/, never deleted);
`--init-from PATH` / NANOFORGE_INIT_FROM=PATH starts from a checkpoint's weights.

Notable:
- Everything is checked before any work (nanoforge/training/plan.py): params, batch
  arithmetic at the real world size, shards, tokenizer, memory, resumability.
- A params change is a new run (`dvc exp run -S train.depth=6` just works): when the
  latest checkpoint's math params differ, its checkpoints move to the archive and
  training starts fresh, with one log line naming the changed keys. Same params: resume.
- One run at a time per output folder: rank 0 holds an OS lock (artifacts/checkpoints/.lock:
  pid, host, command, start) for the whole run; a second run refuses and names the holder.
- One-off runs: `--set` overrides that change the math (model, batch, schedule, seed,
  horizon) write to artifacts/oneoff/<hash of those overrides>/{checkpoints,model,train},
  never into the pipeline's folders (run it again: it resumes there). Overrides that leave
  the math alone (device_batch_size, eval/sample/save cadence) use the pipeline's folders.
- Resume is exact (a killed run continues the same loss curve bit for bit on CPU), at any
  world size or device batch. The loop is nanochat's, in its order (training/loop.py).
- SIGTERM or Ctrl-C: finish the step, save a checkpoint, exit 143. A NaN/inf loss or
  gradient stops at once, keeps the last good checkpoint and fails the MLflow run.
- One `error:` line naming the file and the fix: a damaged checkpoint (2), a full disk (1).
- Writes artifacts/model/, artifacts/train/{metrics.json, steps.csv, val.csv} (outputs.py).
"""

from __future__ import annotations

import os
import sys

from nanoforge.common import get_logger
from nanoforge.config import ConfigError, load_params, resolve, stage_parser
from nanoforge.data.shards import ShardError
from nanoforge.tokenizer.bpe import TokenizerError
from nanoforge.training.checkpoint import CheckpointError, CheckpointWriteError, check_start, latest_checkpoint
from nanoforge.training.lock import OutputsLocked, RunLock
from nanoforge.training.plan import INIT_ENV, RESUME_ENV, describe, plan_run, run_dirs, start_runtime

PREEMPTED_EXIT = 143  # 128 + SIGTERM: the stage did not finish; run it again to resume
log = get_logger("train")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("train", __doc__)
    parser.add_argument("--fresh", action="store_true",
                        help=f"start over: move existing checkpoints to the archive folder (env: {RESUME_ENV}=fresh)")
    parser.add_argument("--init-from", default=None, metavar="PATH",
                        help=f"start from the weights of a checkpoint or model folder (env: {INIT_ENV})")
    args = parser.parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = (params := resolve("train", args, quiet=not rank0)).train
        resume_mode = "fresh" if args.fresh else os.environ.get(RESUME_ENV, "auto").strip().lower() or "auto"
        init_from = args.init_from or os.environ.get(INIT_ENV) or None
        dirs, oneoff = run_dirs(load_params(args.params, section="train").train if args.overrides else cfg, cfg)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        plan = plan_run(cfg, world_size, resume_mode, init_from, dirs, params.download.dataset)
        lock = RunLock(plan.dirs.checkpoints).acquire() if rank0 else None  # held until this process exits
        if latest_checkpoint(plan.dirs.checkpoints) != plan.latest:  # another run finished while we planned
            plan = plan_run(cfg, world_size, resume_mode, init_from, plan.dirs, params.download.dataset)
        check_start(plan.resume_from, plan.init_from)  # a damaged file to start from fails now, not mid-run
    except (ConfigError, ShardError, TokenizerError, CheckpointError, OutputsLocked, ValueError) as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr)
        else:  # the same check fails on every rank: one full message is enough
            print(f"error (rank {os.environ.get('RANK')}): {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2

    from nanoforge.runtime import shutdown
    from nanoforge.tracking import stage_run
    from nanoforge.training.loop import NonFiniteLoss, Preempted, ReplicasDiverged, StopFlag, fmt_time, prepare, train
    from nanoforge.training.outputs import log_outputs, report, write_outputs

    runtime = start_runtime(plan, log)  # device, dtype (auto: probed for this model), process group
    stop = StopFlag()
    stop.install()
    try:
        prepare(plan, runtime, resume_mode)
        if runtime.is_main:
            if oneoff:
                log.info("one-off run (%s): writing to %s, not the pipeline's folders",
                         ", ".join(f"{k}={v}" for k, v in oneoff.items()), plan.dirs.checkpoints.parent)
            log.info("%s", describe(plan, runtime))
        tags = {"world_size": plan.world_size, "device": runtime.device.type, "resumed_from": str(plan.resume_from or "")}
        try:
            with stage_run("train", cfg.model_dump(mode="json"), tags=tags) as run:
                if run.enabled:
                    run.log_params({"derived.num_params": plan.num_params, "derived.num_iterations": plan.num_iterations,
                                    "derived.flops_per_token": plan.flops_per_token, "derived.grad_accum_steps": plan.accum,
                                    "derived.world_size": plan.world_size, "derived.dtype": str(runtime.dtype)})
                result = train(plan, runtime, run, stop)
                if runtime.is_main:
                    write_outputs(result, plan.dirs.model, plan.dirs.train)
                    log_outputs(run, result, plan.dirs.train)
        except Preempted as exc:
            if runtime.is_main:
                print(f"stopped: {exc}", file=sys.stderr)
            return PREEMPTED_EXIT
        except (CheckpointError, NonFiniteLoss, CheckpointWriteError, ReplicasDiverged) as exc:  # bad state.pt: 2; else 1
            if runtime.is_main:
                print(f"error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, CheckpointError) else 1
    finally:
        stop.restore()
        shutdown(runtime)
        if lock is not None:
            lock.release()

    if runtime.is_main:
        report(result)
        s = result.summary
        log.info("done: %d steps, final loss %.4f, val bpb %s, %s", s["steps"], s["final_loss"] or float("nan"),
                 f"{s['val_bpb']:.4f}" if s["val_bpb"] is not None else "n/a", fmt_time(s["train_seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
