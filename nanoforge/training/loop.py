"""Stage 3, train: nanochat's base pretraining, on one process or under torchrun.

`python -m stages.train` (one process) or `torchrun --nproc_per_node=N -m stages.train`
(DDP: gloo on CPU, NCCL on CUDA). `--fresh` / NANOFORGE_RESUME=fresh starts over
(old checkpoints move to artifacts/checkpoints-archive/<time>/, never deleted);
`--init-from PATH` / NANOFORGE_INIT_FROM=PATH starts from a checkpoint's weights.

Notable:
- Everything is checked before any work: params, batch arithmetic at the real
  world size, manifest and shards, tokenizer, and whether the checkpoint in
  artifacts/checkpoints can resume this config (if not, the error names the keys
  that changed and the ways out).
- Resume is automatic and exact: weights, optimizer state, loader position, loss
  EMA, RNG and the logged history come back, so a killed run continues the same
  loss curve bit for bit on CPU. Resuming at another world size or device batch
  works (the global batches do not depend on them).
- The loop is nanochat's, in its order: eval, sample, (stop at the end), micro-steps
  with the next batch fetched during backward, clip the *synchronised* gradient,
  schedules, step, log. DDP skips the all-reduce on all but the last micro-step.
- SIGTERM or Ctrl-C: finish the step, save a checkpoint, exit 143 (every rank agrees
  through the step's all-reduce). A NaN/inf loss stops at once, keeps the last good
  checkpoint and fails the MLflow run.
- Writes artifacts/model/, artifacts/train/{metrics.json, steps.csv, val.csv}.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanoforge import pipes
from nanoforge.tokenizer.bpe import TokenizerError, load_tokenizer
from nanoforge.training.checkpoint import (
    CheckpointError, archive_checkpoints, archive_dir, compat_diff, latest_checkpoint, load_checkpoint, read_meta, remove_partial,
    save_checkpoint, save_model,
)
from nanoforge.common import CHECKPOINT_DIR, FINEWEB_DIR, TOKENIZER_DIR, TRAIN_DIR, get_logger, read_json, write_json, write_text
from nanoforge.config import ConfigError, TrainConfig, resolve, stage_parser
from nanoforge.data.shards import ShardError, read_manifest, train_shard_paths, val_shard_path

RESUME_ENV = "NANOFORGE_RESUME"  # auto (default) | fresh
INIT_ENV = "NANOFORGE_INIT_FROM"
EMA_BETA = 0.9
PREEMPTED_EXIT = 143  # 128 + SIGTERM: the stage did not finish; run it again to resume
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]
STEP_COLUMNS = ["step", "loss", "loss_ema", "lr_mult", "grad_norm", "dt", "tok_per_sec", "mfu", "flops"]
VAL_COLUMNS = ["step", "flops", "val_bpb"]

log = get_logger("train")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; training stopped."""


class Preempted(KeyboardInterrupt):
    """SIGTERM/SIGINT: a checkpoint was saved and the run stopped early (MLflow: KILLED)."""


@dataclass
class Plan:
    """Everything decided before any work: what to train, on what, for how long, from where."""

    cfg: TrainConfig
    world_size: int
    accum: int
    model_config: object
    num_params: int
    num_embedding_params: int
    flops_per_token: int
    num_iterations: int
    horizon_source: str
    train_paths: list
    val_path: Path | None
    tokenizer: object
    compat: dict
    resume_from: Path | None = None
    init_from: Path | None = None
    init_weights: dict | None = None  # read before old checkpoints are archived (the path may move)


# ---------------------------------------------------------------------------
# planning: every check, before any work

def resolve_horizon(cfg: TrainConfig, num_params: int, flops_per_token: int) -> tuple[int, str]:
    """Precedence: explicit num_iterations > target_flops > target_param_data_ratio."""
    if cfg.num_iterations is not None:
        return cfg.num_iterations, "num_iterations"
    if cfg.target_flops is not None:
        return max(1, round(cfg.target_flops / (flops_per_token * cfg.total_batch_size))), "target_flops"
    return max(1, int(cfg.target_param_data_ratio * num_params) // cfg.total_batch_size), "target_param_data_ratio"


def compat_key(cfg: TrainConfig, num_iterations: int, tokenizer, manifest: dict) -> dict:
    """What must match for a checkpoint to resume this run exactly, named as the user knows it."""
    shards = {s["index"]: s.get("sha256") for s in manifest.get("shards", [])}
    same = ("depth", "n_kv_head", "max_seq_len", "total_batch_size", "seed", "matrix_lr", "embedding_lr",
            "unembedding_lr", "weight_decay", "grad_clip", "warmup_ratio", "warmdown_ratio", "final_lr_frac")
    return {
        **{f"train.{k}": getattr(cfg, k) for k in same},
        "train horizon (steps)": num_iterations,
        "tokenizer (sha256 of artifacts/tokenizer/tokenizer.tiktoken)": tokenizer.meta.get("ranks_sha256"),
        "training shards (index, sha256)": [[i, shards.get(i)] for i in manifest["train_shards"]],
    }  # the model's shape follows from depth, n_kv_head, max_seq_len and the tokenizer


def plan_run(cfg: TrainConfig, world_size: int, resume_mode: str, init_from: str | None,
             checkpoint_dir: Path = CHECKPOINT_DIR) -> Plan:
    """Validate inputs and decide the run; raises (ValueError family) with a message naming problem and fix."""
    import torch

    from nanoforge.model.gpt import GPT, config_for_depth

    if resume_mode not in ("auto", "fresh"):
        raise ConfigError(f"{RESUME_ENV}={resume_mode!r}: expected 'auto' (resume when possible) or 'fresh'")
    accum = TrainConfig.batch_geometry(cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len, world_size)
    manifest = read_manifest(FINEWEB_DIR / "MANIFEST.json")
    train_paths = train_shard_paths(manifest, FINEWEB_DIR)
    val_path = val_shard_path(manifest, FINEWEB_DIR) if cfg.eval_every else None
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    model_config = config_for_depth(cfg.depth, tokenizer.vocab_size, cfg.max_seq_len, cfg.n_kv_head)
    with torch.device("meta"):  # count without allocating
        meta_model = GPT(model_config)
    num_params, num_emb = meta_model.num_params(), meta_model.num_embedding_params()
    flops_per_token = meta_model.estimate_flops()
    num_iterations, source = resolve_horizon(cfg, num_params, flops_per_token)

    init_path = Path(init_from) if init_from else None
    if init_path is not None:
        from nanoforge.training.checkpoint import CONFIG, META, WEIGHTS

        if not (init_path / WEIGHTS).exists() or not ((init_path / META).exists() or (init_path / CONFIG).exists()):
            raise CheckpointError(
                f"--init-from {init_path}: not a checkpoint folder (step_NNNNNN/) or a model folder (artifacts/model/)"
            )
        source = read_json(init_path / CONFIG) if (init_path / CONFIG).exists() else read_meta(init_path)
        shape = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")  # sequence_len may change: RoPE has no weights
        old_model, new_model = source.get("model", {}), model_config.to_dict()
        diff = compat_diff({"model": {k: old_model.get(k) for k in shape}}, {"model": {k: new_model[k] for k in shape}})
        if diff:
            raise CheckpointError(
                f"--init-from {init_path}: its weights are for another model shape, so they cannot start this one:\n"
                + "\n".join(f"    {d}" for d in diff)
                + "\n  Set train.depth / train.n_kv_head / train.max_seq_len (and the tokenizer) to match it"
            )
    compat = compat_key(cfg, num_iterations, tokenizer, manifest)
    plan = Plan(cfg, world_size, accum, model_config, num_params, num_emb, flops_per_token, num_iterations, source,
                train_paths, val_path, tokenizer, compat, init_from=init_path)

    latest = latest_checkpoint(checkpoint_dir)
    if latest is not None and resume_mode == "auto":
        meta = read_meta(latest)
        diff = compat_diff(meta.get("compat", {}), compat)
        if init_path is not None and str(init_path) != str(meta.get("init_from")):
            # an explicit --init-from means "start a new run from those weights", not "resume another one"
            diff.append(f"init from: {meta.get('init_from')!r} -> {str(init_path)!r}")
        if diff:
            raise CheckpointError(refusal_message(latest, diff, checkpoint_dir))
        plan.resume_from = latest
        plan.init_from = Path(meta["init_from"]) if meta.get("init_from") else None  # lineage, not reloaded
    return plan


def refusal_message(latest: Path, diff: list[str], checkpoint_dir: Path) -> str:
    lines = "\n".join(f"    {d}" for d in diff)
    return (
        f"cannot resume from {latest}: it was written by a different run configuration:\n{lines}\n"
        "  Ways out:\n"
        "    - resume it: put those params back as they were;\n"
        f"    - start fresh (old checkpoints move to {archive_dir(checkpoint_dir)}/<time>/, nothing is deleted):\n"
        f"        {RESUME_ENV}=fresh dvc repro train     or: python -m stages.train --fresh\n"
        "    - fine-tune from it with the new params (weights only; new optimizer and schedule):\n"
        f"        {RESUME_ENV}=fresh {INIT_ENV}={latest} dvc repro train\n"
        f"        or: python -m stages.train --fresh --init-from {latest}"
    )


# ---------------------------------------------------------------------------
# the run

class StopFlag:
    """First SIGTERM/SIGINT asks the loop to checkpoint and stop; a second Ctrl-C interrupts at once.

    Repeated SIGTERMs are absorbed: launchers (torchrun, Dagster, schedulers) may send
    more than one, and dying mid-save would lose the preemption checkpoint.
    """

    def __init__(self):
        self.signum = 0
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        if signum == signal.SIGINT:  # a person pressing Ctrl-C twice means it
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train_step(model, train_model, ddp, optimizers, loader, x, y, accum: int, grad_clip: float, lrm: float,
               momentum: float, runtime):
    """One optimizer step over `accum` micro-batches. Returns (summed micro losses, grad norm, next batch).

    The next micro-batch is fetched right after each backward is launched (on CUDA it
    overlaps the backward). DDP all-reduces only on the last micro-step.
    """
    import torch

    from nanoforge.training.optim import apply_schedules

    loss_sum = torch.zeros((), device=runtime.device)
    for micro in range(accum):
        sync = ddp is None or micro == accum - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with runtime.autocast():
                loss = train_model(x, y)
            loss_sum += loss.detach()
            (loss / accum).backward()
        x, y, state = next(loader)
    # the gradients are synchronised now: clip those (nanochat clipped each rank's local ones)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    apply_schedules(optimizers, lrm, momentum)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, (x, y, state)


def train(plan: Plan, runtime, run, stop: StopFlag, checkpoint_dir: Path = CHECKPOINT_DIR) -> dict:
    """Build, resume, loop, save. Returns the summary (rank 0 writes the outputs)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nanoforge.evaluation.bpb import evaluate_bpb, rank_batches, shard_rows
    from nanoforge.model.gpt import build_model
    from nanoforge.training.loader import TrainLoader
    from nanoforge.training.optim import build_optimizers, lr_multiplier, muon_momentum
    from nanoforge.runtime import peak_flops
    from nanoforge.model.sampling import generate

    cfg, device, main = plan.cfg, runtime.device, runtime.is_main
    torch.manual_seed(cfg.seed)
    model = build_model(plan.model_config, device)
    optimizers = build_optimizers(model, cfg.matrix_lr, cfg.embedding_lr, cfg.unembedding_lr, cfg.weight_decay)

    # --- where do we start
    step, loader_state, ema, elapsed_before, history = 0, None, 0.0, 0.0, {"steps": [], "val": [], "samples": []}
    if plan.resume_from is not None:
        meta, history = load_checkpoint(plan.resume_from, model, optimizers, device)
        step, loader_state = meta["step"], meta["loader"]
        ema, elapsed_before = meta["loss_ema_raw"], meta["elapsed"]
        history = {"steps": [], "val": [], "samples": [], **history}
        if main:
            log.info("resuming from %s (step %d, world size %d -> %d)", plan.resume_from, step,
                     meta.get("world_size", 0), plan.world_size)
    elif plan.init_weights is not None:
        model.load_state_dict(plan.init_weights)
        if main:
            log.info("initialised from the weights of %s", plan.init_from)
    runtime.barrier()

    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    ddp = None
    if runtime.distributed:  # gradients live in the all-reduce buckets: no second copy of them
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    train_model = ddp if ddp is not None else model
    if use_compile:
        train_model = torch.compile(train_model, dynamic=False)
    eval_model = model

    threads = max(1, min(8, (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    loader = TrainLoader(plan.train_paths, plan.tokenizer, cfg.max_seq_len, cfg.device_batch_size, cfg.total_batch_size,
                         runtime.rank, plan.world_size, cfg.seed, loader_state, device, threads=threads)
    val_rows = None
    if plan.val_path is not None:
        val_rows = shard_rows([plan.val_path], plan.tokenizer, cfg.max_seq_len, cfg.eval_tokens)
    peak = peak_flops(runtime) if main else None
    tokens_per_step = cfg.total_batch_size
    flops_per_step = plan.flops_per_token * tokens_per_step
    n = plan.num_iterations
    t_start = time.perf_counter()
    timed_dt, timed_steps, first_step = 0.0, 0, step
    segment = len({r.get("segment", 0) for r in history["steps"]})  # which process of this run wrote a row
    summary = {}

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def save(at_step: int, state: dict) -> None:
        if main:
            meta = {"compat": plan.compat, "config": cfg.model_dump(mode="json"), "model": plan.model_config.to_dict(),
                    "loader": state, "loss_ema_raw": ema, "elapsed": elapsed(), "tokens": at_step * tokens_per_step,
                    "world_size": plan.world_size, "dtype": str(runtime.dtype).replace("torch.", ""),
                    "mlflow_run_id": run.run_id, "num_iterations": n,
                    "init_from": str(plan.init_from) if plan.init_from else None}
            path = save_checkpoint(checkpoint_dir, at_step, model, optimizers, meta, history, cfg.keep_checkpoints)
            log.info("checkpoint saved: %s", path)
        runtime.barrier()  # nobody leaves (or dies) while rank 0 is still writing

    x, y, state = next(loader)
    try:
        while True:
            last = step == n
            # --- eval
            if val_rows is not None and (last or step % cfg.eval_every == 0):
                t0 = time.perf_counter()
                bpb = evaluate_bpb(eval_model, rank_batches(val_rows, cfg.device_batch_size, runtime),
                                   plan.tokenizer.token_bytes, runtime)
                history["val"] = [r for r in history["val"] if r["step"] != step]
                history["val"].append({"step": step, "flops": step * flops_per_step, "val_bpb": bpb})
                run.log_metrics({"val_bpb": bpb}, step=step)
                if main:
                    log.info("step %d/%d | val bpb %.4f | %.1fs", step, n, bpb, time.perf_counter() - t0)
            # --- samples (rank 0 alone: generation has no collectives)
            if main and cfg.sample_every and (last or (step > 0 and step % cfg.sample_every == 0)):
                texts = generate(eval_model, plan.tokenizer, SAMPLE_PROMPTS, max_tokens=16, temperature=0.0, runtime=runtime)
                history["samples"] = [s for s in history["samples"] if s["step"] != step]
                history["samples"].append({"step": step, "samples": [p + t for p, t in zip(SAMPLE_PROMPTS, texts)]})
                for p, t in zip(SAMPLE_PROMPTS, texts):
                    log.info("sample | %s|%s", p, t.replace("\n", " "))
            if last:
                break

            # --- one optimizer step: micro-steps, next batch fetched during backward
            runtime.synchronize()
            t0 = time.perf_counter()
            lrm = lr_multiplier(step, n, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
            loss_sum, grad_norm, (x, y, state) = train_step(
                model, train_model, ddp, optimizers, loader, x, y, plan.accum, cfg.grad_clip, lrm, muon_momentum(step),
                runtime,
            )
            # one all-reduce carries the mean loss and whether any rank was asked to stop
            stats = torch.stack([loss_sum / plan.accum, torch.tensor(float(stop.signum > 0), device=device)])
            runtime.all_reduce_sum(stats)
            loss_value = stats[0].item() / plan.world_size
            stop_now = stats[1].item() > 0
            runtime.synchronize()
            dt = time.perf_counter() - t0
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(
                    f"loss is {loss_value} at step {step + 1}/{n}; stopped. The last good checkpoint is kept in "
                    f"{checkpoint_dir}. Try a lower learning rate, grad_clip > 0, or dtype float32"
                )

            # --- log
            ema = EMA_BETA * ema + (1 - EMA_BETA) * loss_value
            loss_ema = ema / (1 - EMA_BETA ** (step + 1))
            if step > first_step:  # the first step of a process pays for compile and warm-up
                timed_dt += dt
                timed_steps += 1
            tok_per_sec = tokens_per_step / dt
            mfu = flops_per_step / dt / (peak * plan.world_size) if peak else None
            gnorm = float(grad_norm)
            row = {"step": step + 1, "loss": loss_value, "loss_ema": loss_ema, "lr_mult": lrm, "grad_norm": gnorm,
                   "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu, "flops": (step + 1) * flops_per_step,
                   "segment": segment}
            history["steps"].append(row)
            if main:
                eta = (n - step - 1) * (timed_dt / timed_steps if timed_steps else dt)
                mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
                print(f"step {step + 1:05d}/{n:05d} | loss {loss_ema:.6f} | grad {gnorm:.4f} | lrm {lrm:.3f} | "
                      f"dt {1000 * dt:.0f}ms | tok/s {tok_per_sec:,.0f} | mfu {mfu_text} | "
                      f"elapsed {fmt_time(elapsed())} | eta {fmt_time(eta)}", flush=True)
                run.log_metrics({k: row[k] for k in STEP_COLUMNS[1:] if row[k] is not None}, step=row["step"])
            step += 1

            # --- checkpoint
            if stop_now:
                save(step, state)
                raise Preempted(f"stopped by signal at step {step}/{n}; checkpoint saved, run the same command to resume")
            if cfg.save_every and step % cfg.save_every == 0 and step < n:
                save(step, state)
        save(step, state)
    finally:
        loader.close()

    if main:
        rows = history["steps"]
        # the first step of each process pays for warm-up (and compile): leave it out of the speed
        measured = [r for i, r in enumerate(rows) if i > 0 and r.get("segment") == rows[i - 1].get("segment")]
        step_time = sum(r["dt"] for r in measured)
        tok_s = len(measured) * tokens_per_step / step_time if step_time > 0 else None
        if device.type == "cuda":
            peak_mem = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        vals = [r["val_bpb"] for r in history["val"]]
        summary = {
            "num_params": plan.num_params,
            "num_embedding_params": plan.num_embedding_params,
            "num_flops_per_token": plan.flops_per_token,
            "tokens_trained": step * tokens_per_step,
            "steps": step,
            "num_iterations": n,
            "horizon_source": plan.horizon_source,
            "world_size": plan.world_size,
            "grad_accum_steps": plan.accum,
            "total_batch_size": tokens_per_step,
            "depth": cfg.depth,
            "final_loss": rows[-1]["loss_ema"] if rows else None,
            "val_bpb": vals[-1] if vals else None,
            "min_val_bpb": min(vals) if vals else None,
            "tok_per_sec": tok_s,
            "mfu": (flops_per_step * len(measured) / step_time / (peak * plan.world_size)) if (peak and step_time > 0) else None,
            "train_seconds": elapsed(),
            "step_seconds": sum(r["dt"] for r in rows),
            "peak_memory_mb": peak_mem,
            "device": str(device.type),
            "dtype": str(runtime.dtype).replace("torch.", ""),
            "compile": use_compile,
            "resumed_from": str(plan.resume_from) if plan.resume_from else None,
            "init_from": str(plan.init_from) if plan.init_from else None,
            "mlflow_run_id": run.run_id,
        }
        summary["_history"] = history
        summary["_model"] = model
    return summary


def write_outputs(summary: dict) -> None:
    history, model = summary.pop("_history"), summary.pop("_model")
    save_model(model, {k: summary[k] for k in ("steps", "tokens_trained", "num_params", "num_flops_per_token",
                                               "val_bpb", "final_loss", "depth", "mlflow_run_id")})
    write_text(TRAIN_DIR / "steps.csv", to_csv(history["steps"], STEP_COLUMNS))
    write_text(TRAIN_DIR / "val.csv", to_csv(history["val"], VAL_COLUMNS))
    write_json(TRAIN_DIR / "metrics.json", summary)
    summary["_samples"] = history.get("samples", [])
    summary["_steps"] = history["steps"]


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    return buf.getvalue()


def curve_markdown(rows: list[dict], val: list[dict] | None = None, points: int = 10) -> str:
    if not rows:
        return "(no steps)"
    picks = sorted({rows[min(len(rows) - 1, round(i * (len(rows) - 1) / (points - 1)))]["step"] for i in range(points)})
    by_step = {r["step"]: r for r in rows}
    lines = ["| step | loss (EMA) | tok/s |", "|---:|---:|---:|"]
    for s in picks:
        r = by_step[s]
        lines.append(f"| {s} | {r['loss_ema']:.4f} | {r['tok_per_sec']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("train", __doc__)
    parser.add_argument("--fresh", action="store_true",
                        help=f"start over: move existing checkpoints to the archive folder (env: {RESUME_ENV}=fresh)")
    parser.add_argument("--init-from", default=None, metavar="PATH",
                        help=f"start from the weights of a checkpoint or model folder (env: {INIT_ENV})")
    args = parser.parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        params = resolve("train", args, quiet=not rank0)
        cfg = params.train
        resume_mode = "fresh" if args.fresh else os.environ.get(RESUME_ENV, "auto").strip().lower() or "auto"
        init_from = args.init_from or os.environ.get(INIT_ENV) or None
        plan = plan_run(cfg, world_size, resume_mode, init_from)
    except (ConfigError, ShardError, TokenizerError, CheckpointError, ValueError) as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr)
        else:  # the same check fails on every rank: one full message is enough
            print(f"error (rank {os.environ.get('RANK')}): {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2

    from nanoforge.runtime import init_runtime, shutdown
    from nanoforge.tracking import stage_run

    runtime = init_runtime(cfg.device, cfg.dtype)
    stop = StopFlag()
    stop.install()
    try:
        if plan.init_from is not None and plan.resume_from is None:
            from safetensors.torch import load_file

            plan.init_weights = load_file(str(plan.init_from / "model.safetensors"))
        runtime.barrier()  # every rank holds the init weights before their folder may move
        if runtime.is_main:
            for path in remove_partial(CHECKPOINT_DIR):
                log.info("removed %s: a checkpoint that was being written when the last run was killed", path)
        if resume_mode == "fresh" and runtime.is_main:
            moved = archive_checkpoints(CHECKPOINT_DIR)
            if moved:
                log.info("starting fresh: old checkpoints moved to %s", moved)
        runtime.barrier()
        if runtime.is_main:
            log.info(
                "model: depth %d, %s params (%s embedding), %s FLOPs/token | horizon %d steps (%s), %s tokens | "
                "world %d x device batch %d x seq %d x accum %d = %d tokens/step | %s %s",
                cfg.depth, f"{plan.num_params:,}", f"{plan.num_embedding_params:,}", f"{plan.flops_per_token:,}",
                plan.num_iterations, plan.horizon_source, f"{plan.num_iterations * cfg.total_batch_size:,}",
                plan.world_size, cfg.device_batch_size, cfg.max_seq_len, plan.accum, cfg.total_batch_size,
                runtime.device, str(runtime.dtype).replace("torch.", ""),
            )
        tags = {"world_size": plan.world_size, "device": runtime.device.type,
                "resumed_from": str(plan.resume_from or "")}
        try:
            with stage_run("train", cfg.model_dump(mode="json"), tags=tags) as run:
                if run.enabled:
                    run.log_params({"derived.num_params": plan.num_params, "derived.num_iterations": plan.num_iterations,
                                    "derived.flops_per_token": plan.flops_per_token, "derived.grad_accum_steps": plan.accum,
                                    "derived.world_size": plan.world_size, "derived.dtype": str(runtime.dtype)})
                summary = train(plan, runtime, run, stop)
                if runtime.is_main:
                    write_outputs(summary)
                    headline = ("tok_per_sec", "mfu", "train_seconds", "peak_memory_mb", "final_loss", "val_bpb",
                                "min_val_bpb", "num_params", "tokens_trained")
                    run.log_metrics({k: summary[k] for k in headline if isinstance(summary.get(k), (int, float))},
                                    step=summary["steps"])
                    run.log_artifact(TRAIN_DIR / "steps.csv", "train")
                    run.log_artifact(TRAIN_DIR / "val.csv", "train")
                    run.log_artifact(TRAIN_DIR / "metrics.json", "train")
                    run.log_dict(summary.get("_samples", []), "train/samples.json")
        except Preempted as exc:
            if runtime.is_main:
                print(f"stopped: {exc}", file=sys.stderr)
            return PREEMPTED_EXIT
        except NonFiniteLoss as exc:
            if runtime.is_main:
                print(f"error: {exc}", file=sys.stderr)
            return 1
    finally:
        stop.restore()
        shutdown(runtime)

    if runtime.is_main:
        steps = summary.pop("_steps", [])
        summary.pop("_samples", None)
        pipes.report({
            "num_params": summary["num_params"],
            "tokens_trained": summary["tokens_trained"],
            "steps": summary["steps"],
            "world_size": summary["world_size"],
            "tok_per_sec": summary["tok_per_sec"],
            "mfu": summary["mfu"],
            "final_loss": summary["final_loss"],
            "val_bpb": summary["val_bpb"],
            "train_seconds": summary["train_seconds"],
            "device": f"{summary['device']} {summary['dtype']}",
            "loss_curve": pipes.markdown(curve_markdown(steps)),
            "mlflow_run_id": summary["mlflow_run_id"],
        })
        log.info("done: %d steps, final loss %.4f, val bpb %s, %s", summary["steps"], summary["final_loss"] or float("nan"),
                 f"{summary['val_bpb']:.4f}" if summary["val_bpb"] is not None else "n/a", fmt_time(summary["train_seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
