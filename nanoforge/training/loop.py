"""The training loop: nanochat's base pretraining, on one process or under DDP.

Notable:
- The loop is nanochat's, in its order: eval, sample, (stop at the end), micro-steps
  with the next batch fetched during backward, clip the *synchronised* gradient,
  schedules, step, log, checkpoint. DDP skips the all-reduce on all but the last micro-step.
- Resume is exact: weights, optimizer state, loader position, loss EMA, RNG and the
  logged history come back from the checkpoint the plan chose.
- SIGTERM or Ctrl-C: finish the step, save a checkpoint, raise Preempted (every rank
  agrees through the step's all-reduce). A NaN/inf loss, or a NaN/inf gradient norm
  (checked before the optimizer step, so bad weights are never applied nor saved),
  raises NonFiniteLoss at once and keeps the last good checkpoint.
- Before every checkpoint the ranks compare their weights (agree.check_replicas): replicas
  that drifted apart raise ReplicasDiverged on every rank, and that checkpoint is not written.
- Under DDP the optimizer state is sharded (shard.py, ZeRO-1; train.shard_optimizer): each rank
  steps 1/world of the parameters and broadcasts them; checkpoints keep one process's format.
"""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import time
from dataclasses import dataclass, field

from nanoforge import pipes
from nanoforge.common import get_logger
from nanoforge.formats import human
from nanoforge.training.agree import ReplicasDiverged, agree, check_replicas, perturb_for_test
from nanoforge.training.checkpoint import archive_checkpoints, load_checkpoint, remove_partial, save_checkpoint
from nanoforge.training.outputs import STEP_COLUMNS
from nanoforge.training.plan import Plan, restart_message

EMA_BETA = 0.9
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]

log = get_logger("train")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; training stopped."""


class NonFiniteGradient(NonFiniteLoss):
    """The synchronised gradient norm became NaN or inf; stopped before the optimizer step."""

    def __init__(self, message: str, loss_sum=None):
        super().__init__(message)
        self.loss_sum = loss_sum  # this rank's summed micro losses, to tell which went first


class Preempted(KeyboardInterrupt):
    """SIGTERM/SIGINT: a checkpoint was saved and the run stopped early (MLflow: KILLED)."""


@dataclass
class TrainResult:
    """What a finished run hands to the outputs: numbers, the logged history, the trained model."""

    summary: dict  # numbers and labels only: artifacts/train/metrics.json (empty on ranks > 0)
    history: dict = field(default_factory=dict)  # {"steps": [...], "val": [...], "samples": [...]}
    model: object = None


def prepare(plan: Plan, runtime, resume_mode: str) -> None:
    """The first work: read --init-from weights, clear a killed save, archive old checkpoints for a new run."""
    agree(plan, runtime)  # before it: the same params, checkpoint folder and resume step on every rank, or exit 2
    checkpoint_dir = plan.dirs.checkpoints
    if plan.init_from is not None and plan.resume_from is None:
        from safetensors.torch import load_file

        plan.init_weights = load_file(str(plan.init_from / "model.safetensors"))
    runtime.barrier()  # every rank holds the init weights before their folder may move
    if runtime.is_main:
        for path in remove_partial(checkpoint_dir):
            log.info("removed %s: a checkpoint that was being written when the last run was killed", path)
    if (resume_mode == "fresh" or plan.restart) and runtime.is_main:
        moved = archive_checkpoints(checkpoint_dir)
        if plan.restart:
            log.info("%s", restart_message(plan, moved))
        elif moved:
            log.info("starting fresh: old checkpoints moved to %s", moved)
    runtime.barrier()


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
    if not torch.isfinite(grad_norm):  # the same synchronised norm on every rank: all stop together
        model.zero_grad(set_to_none=True)
        raise NonFiniteGradient(f"gradient norm is {float(grad_norm)}", loss_sum)
    apply_schedules(optimizers, lrm, momentum)
    if hasattr(optimizers, "step"):  # ZeRO-1 (shard.py): each rank steps its own share, then the owners broadcast
        optimizers.step()
    else:
        for opt in optimizers:
            opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, (x, y, state)


def wrap_ddp(model, device):
    """DDP around `model`: gradients live in the all-reduce buckets (no second copy of them), and no buffer
    broadcast. The model's only buffers are the rotary cos/sin tables, computed from the config on every
    rank and never trained (nothing like BatchNorm's running stats); DDP's default broadcast_buffers=True
    would send rank 0's copy to every rank before every forward, a collective per micro-step that changes
    nothing. check_replicas compares them with the weights at every checkpoint."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # PyTorch 2.13 renamed broadcast_buffers (now deprecated, with a warning) to forward_sync_buffers
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               **{name: False})


def use_fp8(model, cfg, device, main: bool):
    """train.fp8: (what details.json says, the context that evaluation runs in). Skipped with the reason where the
    device has no fp8 matmuls (nanoforge/model/fp8.py), so a preset copied to an older GPU still trains."""
    if not cfg.fp8:
        return "off", contextlib.nullcontext
    from nanoforge.model import fp8

    reason = fp8.unsupported(device)
    if reason is not None:
        if main:
            log.warning("train.fp8: skipped, training without it: %s", reason)
        return f"skipped: {reason}", contextlib.nullcontext
    converted, total = fp8.convert(model)
    if main:
        log.info("train.fp8: %d of %d Linear layers in fp8 (the others are too small or not multiples of 16)",
                 converted, total)
    return f"on: {converted} of {total} Linear layers", fp8.full_precision


def train(plan: Plan, runtime, run, stop: StopFlag) -> TrainResult:
    """Build, resume, loop, save. Returns the result on every rank (its summary on rank 0 only)."""
    import torch

    from nanoforge.evaluation.bpb import evaluate_bpb, rank_batches, shard_rows
    from nanoforge.model.gpt import build_model
    from nanoforge.cpus import thread_plan
    from nanoforge.training.loader import TrainLoader
    from nanoforge.training.optim import build_for_config, lr_multiplier, momentum_for, set_weight_decay, weight_decay_multiplier
    from nanoforge.runtime import peak_flops, probe_details
    from nanoforge.training.shard import ShardedOptimizers
    from nanoforge.model.sampling import generate

    cfg, device, main = plan.cfg, runtime.device, runtime.is_main
    checkpoint_dir = plan.dirs.checkpoints
    torch.manual_seed(cfg.seed)
    model = build_model(plan.model_config, device)
    optimizers = build_for_config(model, cfg)  # train.recipe's optimizers (2025: build_optimizers')
    if runtime.distributed and cfg.shard_optimizer:  # before the resume: each rank loads only its own pieces
        optimizers = ShardedOptimizers(optimizers)

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

    fp8_state, full_precision = use_fp8(model, cfg, device, main)  # before DDP and compile see the modules
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    ddp = None
    if runtime.distributed:
        ddp = wrap_ddp(model, device)
        perturb_for_test(model, runtime.rank)  # a no-op unless a test sets NANOFORGE_TEST_PERTURB_RANK
    train_model = ddp if ddp is not None else model
    if use_compile:
        train_model = torch.compile(train_model, dynamic=False)
    eval_model = model

    threads = runtime.threads or thread_plan(device.type)  # the plan init_runtime applied to torch
    if main:
        log.info("%s", threads.describe())
    loader = TrainLoader(plan.train_paths, plan.tokenizer, cfg.max_seq_len, cfg.device_batch_size, cfg.total_batch_size,
                         runtime.rank, plan.world_size, cfg.seed, loader_state, device, threads=threads.loader,
                         kind=cfg.option("loader"), buffer_docs=cfg.loader_buffer_docs)
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
        check_replicas(model, runtime, at_step, checkpoint_dir)  # every rank: equal weights, or no checkpoint
        # sharded: every rank sends its pieces, rank 0 gets one process's state dicts (None elsewhere)
        states = optimizers.state_dicts() if isinstance(optimizers, ShardedOptimizers) else optimizers
        if main:
            meta = {"compat": plan.compat, "config": cfg.model_dump(mode="json"), "model": plan.model_config.to_dict(),
                    "loader": state, "loss_ema_raw": ema, "elapsed": elapsed(), "tokens": at_step * tokens_per_step,
                    "world_size": plan.world_size, "dtype": str(runtime.dtype).replace("torch.", ""),
                    "mlflow_run_id": run.run_id, "num_iterations": n,
                    "init_from": str(plan.init_from) if plan.init_from else None}
            path = save_checkpoint(checkpoint_dir, at_step, model, states, meta, history, cfg.keep_checkpoints)
            log.info("checkpoint saved: %s", path)
        runtime.barrier()  # nobody leaves (or dies) while rank 0 is still writing

    x, y, state = next(loader)
    try:
        while True:
            last = step == n
            # --- eval
            if val_rows is not None and (last or step % cfg.eval_every == 0):
                t0 = time.perf_counter()
                with full_precision(model):  # no fp8 in evaluation (nanochat's disable_fp8)
                    bpb = evaluate_bpb(eval_model, rank_batches(val_rows, cfg.device_batch_size, runtime),
                                       plan.tokenizer.token_bytes, runtime)
                history["val"] = [r for r in history["val"] if r["step"] != step]
                history["val"].append({"step": step, "flops": step * flops_per_step, "val_bpb": bpb})
                run.log_metrics({"val_bpb": bpb}, step=step)
                if main:
                    log.info("step %d/%d | val bpb %.4f | %.1fs", step, n, bpb, time.perf_counter() - t0)
            # --- samples (rank 0 alone: generation has no collectives)
            if main and cfg.sample_every and (last or (step > 0 and step % cfg.sample_every == 0)):
                with full_precision(model):
                    texts = generate(eval_model, plan.tokenizer, SAMPLE_PROMPTS, max_tokens=16, temperature=0.0,
                                     runtime=runtime)
                history["samples"] = [s for s in history["samples"] if s["step"] != step]
                history["samples"].append({"step": step, "samples": [p + t for p, t in zip(SAMPLE_PROMPTS, texts)]})
                for p, t in zip(SAMPLE_PROMPTS, texts):
                    log.info("sample | %s|%s", p, t.replace("\n", " "))
            if last:
                break

            # --- one optimizer step: micro-steps, next batch fetched during backward
            runtime.synchronize()
            t0 = time.perf_counter()
            lrm = lr_multiplier(step, n, cfg.warmup_ratio, cfg.option("warmdown_ratio"), cfg.option("final_lr_frac"),
                                cfg.option("warmup_steps"))
            set_weight_decay(optimizers, weight_decay_multiplier(cfg, step, n))  # Muon2026's (2026 recipe)
            try:
                loss_sum, grad_norm, (x, y, state) = train_step(
                    model, train_model, ddp, optimizers, loader, x, y, plan.accum, cfg.option("grad_clip"), lrm,
                    momentum_for(cfg, step, n), runtime,
                )
            except NonFiniteGradient as exc:  # every rank is here: the norm was synchronised
                mean_loss = exc.loss_sum / plan.accum
                runtime.all_reduce_sum(mean_loss)
                if not math.isfinite(mean_loss.item()):
                    raise NonFiniteLoss(
                        f"loss is {mean_loss.item() / plan.world_size} at step {step + 1}/{n}; stopped. The last good "
                        f"checkpoint is kept in {checkpoint_dir}. Try a lower learning rate, grad_clip > 0, or dtype float32"
                    ) from None
                raise NonFiniteGradient(
                    f"{exc} at step {step + 1}/{n} while the loss was still finite ({mean_loss.item() / plan.world_size:.4f}); "
                    "stopped before the optimizer step, so nothing was applied. The last "
                    f"good checkpoint is kept in {checkpoint_dir}. Lower the learning rates (train.matrix_lr, "
                    "train.embedding_lr, train.unembedding_lr), set train.grad_clip > 0, or train.dtype float32"
                ) from None
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
                # loss_ema: the smoothed loss nanochat prints; MLflow and steps.csv keep both (loss, loss_ema)
                line = (f"step {step + 1:05d}/{n:05d} | loss_ema {loss_ema:.6f} | grad {gnorm:.4f} | lrm {lrm:.3f} | "
                        f"dt {1000 * dt:.0f}ms | tok/s {human('tok_per_sec', tok_per_sec)} | mfu {human('mfu', mfu)} | "
                        f"elapsed {fmt_time(elapsed())} | eta {fmt_time(eta)}")
                print(line, flush=True)
                pipes.progress(line, {"step": step + 1, "num_iterations": n, "loss": loss_ema, "tok_per_sec": tok_per_sec,
                                      "mfu": mfu, "eta_s": eta, "eta": fmt_time(eta), "elapsed_s": elapsed()},
                               last=step + 1 == n)  # Dagster shows it while training runs (throttled)
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
            "fp8": fp8_state,
            "final_loss": rows[-1]["loss_ema"] if rows else None,
            "val_bpb": vals[-1] if vals else None,
            "min_val_bpb": min(vals) if vals else None,
            # the budget of those BPB figures (train.eval_tokens, as many whole rows as fit)
            "val_bpb_tokens": int(val_rows.size(0)) * cfg.max_seq_len if val_rows is not None else None,
            "tok_per_sec": tok_s,
            "mfu": (flops_per_step * len(measured) / step_time / (peak * plan.world_size)) if (peak and step_time > 0) else None,
            "train_seconds": elapsed(),
            "step_seconds": sum(r["dt"] for r in rows),
            "peak_memory_mb": peak_mem,
            "device": str(device.type),
            "dtype": str(runtime.dtype).replace("torch.", ""),
            "dtype_probe": probe_details(runtime.dtype_probe),  # what dtype auto measured (None: not auto, or CUDA)
            "compile": use_compile,
            "resumed_from": str(plan.resume_from) if plan.resume_from else None,
            "init_from": str(plan.init_from) if plan.init_from else None,
            "mlflow_run_id": run.run_id,
        }
    return TrainResult(summary, history, model)
