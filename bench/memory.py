"""The memory budget of a preset on a GPU of a given size, and the checkpoint save time, before renting.

    python -m bench.memory --preset d20 --gpu-mem 80   # one preset on an 80 GiB GPU
    python -m bench.memory                             # the table: tiny, d12, d20 at 80 GiB
    python -m bench.memory --save-time                 # also write a d20-sized checkpoint here and time it

Notable:
- The numbers are the train stage's own estimate (`nanoforge.training.plan.estimate_memory`,
  the one that refuses a model before any work), per rank, as the run will be on CUDA:
  compiled when train.compile allows it, the loss in checkpointed chunks. Eager (compile
  off, or compile failing) is shown beside it, with the device batch that would fit.
- "fits" means the peak (state + the larger of a training micro-step and a val BPB pass)
  leaves at least `--headroom` (10%) of the GPU free: the allocator's fragmentation, the
  CUDA context and NCCL buffers live there.
- The optimizer row is per rank: its 1/world share of the state (train.shard_optimizer, ZeRO-1),
  Muon's Newton-Schulz transient for its share of a stack, or the step's broadcast buffers.
- The eval transient is the in-training val BPB and the evaluate stage's BPB pass: the
  hidden states plus one chunk of the head (model/gpt.py, LOSS_CHUNK_BYTES).
- `--save-time` writes a checkpoint of the preset's size with the train stage's own
  `save_checkpoint` (CPU tensors of the real shapes: the weights of the real model, optimizer
  state of the real sizes) into a temporary folder beside artifacts/ (or `--dir`), and
  compares it with torchrun's grace window between SIGTERM and SIGKILL (30 s, or
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT). Records the load average: the disk is shared.
- Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path("bench/results/memory.json")
PRESETS = ("tiny", "d12", "d20")
GIB = 2**30


def preset_train(name: str):
    """The preset's validated train config and the evaluate section (as `python -m nanoforge.presets` writes it)."""
    from nanoforge.presets import build

    params, _ = build(name)
    return params.train, params.evaluate, params.tokenizer.vocab_size


def budget(name: str, gpu_gib: float, headroom: float) -> dict:
    """Every part of the estimate for `name` on a GPU of `gpu_gib` GiB, in bytes, and whether it fits."""
    import torch

    from nanoforge.model.gpt import GPT, config_for_depth
    from nanoforge.training.plan import EVAL_BYTES_PER_WIDTH, estimate_memory, largest_fitting_batch, uses_compile

    cfg, evaluate, vocab = preset_train(name)
    model_config = config_for_depth(cfg.depth, vocab, cfg.max_seq_len, cfg.n_kv_head)
    with torch.device("meta"):
        num_params = GPT(model_config).num_params()
    limit = int(gpu_gib * GIB * (1 - headroom))
    compiled = uses_compile(cfg, "cuda")
    need = estimate_memory(cfg, model_config, num_params, compiled=compiled, cuda=True)
    unsharded = estimate_memory(cfg.model_copy(update={"shard_optimizer": False}), model_config, num_params,
                                compiled=compiled, cuda=True)
    eager = estimate_memory(cfg, model_config, num_params, compiled=False, cuda=True)
    eval_cfg = cfg.model_copy(update={"device_batch_size": evaluate.device_batch_size})
    eval_stage = estimate_memory(eval_cfg, model_config, num_params, compiled=compiled, cuda=True)
    eval_tokens = evaluate.device_batch_size * cfg.max_seq_len
    core_logits = eval_tokens * (6 * vocab + (4 + EVAL_BYTES_PER_WIDTH) * model_config.n_embd)
    return {
        "preset": name, "depth": cfg.depth, "num_params": num_params, "seq": cfg.max_seq_len,
        "device_batch_size": cfg.device_batch_size, "vocab": vocab, "ranks": cfg.nproc_per_node,
        "gpu_gib": gpu_gib, "headroom": headroom, "compiled": compiled,
        **{k: need[k] for k in ("weights", "gradients", "optimizer", "activations", "eval_transient", "total")},
        # ZeRO-1 (training/shard.py): the state a rank keeps, its shards, and what every rank kept before
        "optimizer_state": need["optimizer_state"], "optimizer_shards": need["optimizer_shards"],
        "optimizer_state_unsharded": unsharded["optimizer_state"], "optimizer_unsharded": unsharded["optimizer"],
        # the evaluate stage holds only the weights beside its BPB pass (chunked) or its CORE
        # batch, whose full logits exist once in bf16 and once in fp32 (softcap in place)
        "evaluate_stage_total": eval_stage["weights"] + max(eval_stage["eval_transient"], core_logits),
        "fits": need["total"] <= limit,
        "free_fraction": 1 - need["total"] / (gpu_gib * GIB),
        "largest_fitting_batch": largest_fitting_batch(cfg, model_config, num_params, limit, compiled, cuda=True),
        "eager_total": eager["total"],
        "eager_fits": eager["total"] <= limit,
        "eager_largest_fitting_batch": largest_fitting_batch(cfg, model_config, num_params, limit, False, cuda=True),
    }


def show(row: dict) -> str:
    g = lambda b: f"{b / GIB:6.1f}"  # noqa: E731
    verdict = (f"fits, {100 * row['free_fraction']:.0f}% free" if row["fits"] else
               f"does NOT fit with {100 * row['headroom']:.0f}% headroom; device_batch_size "
               f"{row['largest_fitting_batch']} does")
    eager = ("fits" if row["eager_fits"] else f"does not fit; device_batch_size {row['eager_largest_fitting_batch']} does")
    return "\n".join([
        f"{row['preset']}: depth {row['depth']}, {row['num_params'] / 1e6:,.0f}M params, seq {row['seq']}, "
        f"device batch {row['device_batch_size']}, vocab {row['vocab']:,}, {row['ranks']} rank(s), "
        f"{row['gpu_gib']:g} GiB GPU, {'compiled' if row['compiled'] else 'eager'} (GiB per rank)",
        f"  weights {g(row['weights'])} | gradients {g(row['gradients'])} | optimizer {g(row['optimizer'])} | "
        f"activations/micro-batch {g(row['activations'])} | eval transient {g(row['eval_transient'])}",
        (f"  optimizer state {g(row['optimizer_state'])} = 1/{row['optimizer_shards']} of {g(row['optimizer_state_unsharded'])}"
         f" (sharded across the ranks; unsharded the optimizer row would be {g(row['optimizer_unsharded'])})"
         if row["optimizer_shards"] > 1 else f"  optimizer state {g(row['optimizer_state'])} (one rank: not sharded)"),
        f"  peak {g(row['total'])}: {verdict}",
        f"  eager (compile off or failing): peak {g(row['eager_total'])}: {eager}",
        f"  evaluate stage: {g(row['evaluate_stage_total'])}",
    ])


class _StateOnly:
    """An optimizer stand-in: only `state_dict()`, which is all `save_checkpoint` calls."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def save_time(name: str, directory: Path | None) -> dict:
    """Seconds `save_checkpoint` takes for a checkpoint of the preset's size, on this disk."""
    import torch

    from nanoforge.model.gpt import GPT, config_for_depth
    from nanoforge.training.checkpoint import save_checkpoint
    from nanoforge.training.plan import checkpoint_bytes, grace_seconds

    cfg, _, vocab = preset_train(name)
    model_config = config_for_depth(cfg.depth, vocab, cfg.max_seq_len, cfg.n_kv_head)
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device="cpu")  # real shapes, uninitialised: the values do not change the write
    groups = model.param_groups()
    zeros = lambda p: torch.zeros_like(p, memory_format=torch.contiguous_format)  # noqa: E731
    adamw = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": zeros(p), "exp_avg_sq": zeros(p)}
                       for i, p in enumerate(groups["lm_head"] + groups["embedding"])}, "param_groups": []}
    muon = {"state": {i: {"momentum_buffer": zeros(p)} for i, p in enumerate(groups["matrix"])}, "param_groups": []}
    base = Path(directory) if directory else Path("artifacts") if Path("artifacts").is_dir() else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=".bench-save.", dir=base))
    try:
        t0 = time.perf_counter()
        path = save_checkpoint(root, 1, model, [_StateOnly(adamw), _StateOnly(muon)], {"compat": {}}, {}, keep=1)
        seconds = time.perf_counter() - t0
        written = sum(f.stat().st_size for f in path.iterdir())
        t0 = time.perf_counter()
        os.sync()  # what the page cache still held: the disk's own share of the time
        sync_seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    window = grace_seconds()
    return {"preset": name, "bytes": written, "estimated_bytes": checkpoint_bytes(model_config, model.num_params()),
            "seconds": seconds, "sync_seconds": sync_seconds, "grace_seconds": window, "dir": os.path.relpath(base.resolve()),
            "within_window": seconds + sync_seconds <= window, "loadavg": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    from nanoforge.common import write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, action="append", help="default: all three")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GPU memory in GiB (H100/A100 80, H200 141)")
    parser.add_argument("--headroom", type=float, default=0.10, help="fraction of the GPU left free (default 0.10)")
    parser.add_argument("--save-time", action="store_true", help="write a checkpoint of the largest preset and time it")
    parser.add_argument("--dir", type=Path, default=None, help="where --save-time writes (default: artifacts/)")
    args = parser.parse_args(argv)
    rows = [budget(name, args.gpu_mem, args.headroom) for name in args.preset or PRESETS]
    for row in rows:
        print(show(row))
    out = {"budgets": rows}
    if args.save_time:
        name = (args.preset or PRESETS)[-1]
        save = save_time(name, args.dir)
        verdict = "within" if save["within_window"] else "LONGER than"
        print(f"save: a {name} checkpoint ({save['bytes'] / 1e9:.2f} GB) took {save['seconds']:.1f} s to write, "
              f"+{save['sync_seconds']:.1f} s to sync, in {save['dir']}: {verdict} torchrun's "
              f"{save['grace_seconds']:.0f} s window (load average {save['loadavg'][0]:.1f}); the step in flight "
              "comes first")
        out["save"] = save
    if not args.preset:  # the full table is the record; a one-off look is not
        write_json(RESULTS, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
