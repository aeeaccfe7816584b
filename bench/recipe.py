"""`python -m bench.recipe`: the 2025 and 2026 recipes (train.recipe) at equal training FLOPs on this CPU.

    python -m bench.recipe                      # depths 4 (tiny) and 6, 2025 vs 2026
    python -m bench.recipe --ablate             # also 2026 with one option set back to 2025 (depth 4)
    python -m bench.recipe --budget-steps 60    # the 2025 run's steps that set the FLOPs budget

Notable:
- Equal FLOPs: the budget is the 2025 run's steps x tokens per step x its estimate_flops();
  every other variant trains round(budget / (its FLOPs per token x tokens per step)) steps
  (the 2026 model has more matmul params - the gates - and fewer attention FLOPs with windows).
- The tiny preset's shape and schedule (seq 256, 4,096 tokens per step, no warmup, 20% warmdown
  to 0, the LR keys as params.yaml), fp32, one process. The recipe switch sets only its options:
  the LR and schedule keys are pinned to the 2025 values for both (PINNED; train.recipe 2026 alone
  would also take HEAD's embedding_lr 0.3, unembedding 0.008, 40 warmup steps, 65% warmdown to 0.05, no clip).
- Data: the shared real sample (../shared/data/fineweb_sample: shards 0-1 train, 2 val, a 4,096-token
  BPE trained on shard 0), as one BOS-separated token stream cut into rows, in the same order for
  every variant; val BPB over the first 64 rows of the val shard (nanochat's bits per byte).
- tok/s is the training step's (forward, backward, optimizer), on whatever else this machine runs:
  the load average is recorded with it. The 2025 Muon orthogonalises in bf16 (as nanochat), which a
  CPU without bf16 matmul units runs far slower than fp32; the 2026 Muon uses fp32 off CUDA.
- Cost: on 2 shared cores a 2025 d4 step took 2-5 s, so the recorded runs
  (bench/results/recipe.json: d4 --ablate, recipe_d6.json: d6) use --budget-steps 6: a check that
  both recipes train at equal FLOPs, not yet a quality ranking (that needs hundreds of steps).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

from nanoforge.common import write_json

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO.parent / "shared" / "data" / "fineweb_sample"
RESULTS = REPO / "bench" / "results" / "recipe.json"
SEQ, ROWS, VOCAB, VAL_ROWS = 256, 16, 4096, 64
ABLATIONS = {  # 2026 with one option back at its 2025 value
    "no value_embeds": dict(value_embeds=False),
    "window L": dict(window_pattern="L"),
    "no lambdas": dict(lambdas=False),
    "no smear/backout": dict(smear=False, backout=False),
    "init/rope/qk 2025": dict(init_scheme="2025", rope_base=10_000.0, qk_scale=1.0),
    "muon 2025": dict(muon_orthogonalize="newton_schulz", normuon=False, muon_weight_decay=0.0,
                      cautious_weight_decay=False, momentum_schedule="2025", adamw_groups="2025"),
}


def token_rows():
    """(tokenizer, train rows (N, SEQ+1), val rows (VAL_ROWS, SEQ+1)) from the shared sample."""
    from nanoforge.data.shards import iter_documents
    from nanoforge.tokenizer.bpe import train_bpe

    files = sorted(SAMPLE_DIR.glob("shard_*.parquet"))
    if len(files) < 3:
        raise SystemExit(f"bench.recipe needs the shared sample in {SAMPLE_DIR} (3 shards)")
    tok = train_bpe(iter_documents(files[:1]), VOCAB)

    def rows(paths):
        ids = [t for doc in tok.encode(list(iter_documents(paths)), prepend="<|bos|>") for t in doc]
        n = (len(ids) - 1) // SEQ
        flat = torch.tensor(ids[: n * SEQ + 1])
        return torch.stack([flat[i * SEQ : i * SEQ + SEQ + 1] for i in range(n)])

    return tok, rows(files[:2]), rows(files[2:])[:VAL_ROWS]


def val_bpb(model, val, token_bytes) -> float:
    with torch.no_grad():
        x, y = val[:, :-1], val[:, 1:]
        loss = model(x, y, loss_reduction="none")
        nbytes = token_bytes[y]
        return (loss * (nbytes > 0)).sum().item() / math.log(2) / nbytes.sum().item()


# the recorded results compare the recipes' options under one LR schedule: the 2025 one, for both
PINNED = dict(embedding_lr=0.2, unembedding_lr=0.004, grad_clip=1.0, warmup_steps=0, warmdown_ratio=0.2,
              final_lr_frac=0.0)


def run_variant(depth: int, recipe: str, overrides: dict, steps: int, train, val, token_bytes) -> dict:
    from nanoforge.config import TrainConfig
    from nanoforge.model.gpt import build_model, config_for_depth
    from nanoforge.training.optim import (
        apply_schedules, build_for_config, lr_multiplier, momentum_for, set_weight_decay, weight_decay_multiplier,
    )

    cfg = TrainConfig(depth=depth, recipe=recipe, num_iterations=steps, **{**PINNED, **overrides})
    torch.manual_seed(cfg.seed)
    model = build_model(config_for_depth(depth, VOCAB, SEQ, **cfg.model_options()))
    opts = build_for_config(model, cfg)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = train[(step * ROWS + torch.arange(ROWS)) % len(train)]
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.option("grad_clip"))
        set_weight_decay(opts, weight_decay_multiplier(cfg, step, steps))
        lrm = lr_multiplier(step, steps, cfg.warmup_ratio, cfg.option("warmdown_ratio"), cfg.option("final_lr_frac"),
                            cfg.option("warmup_steps"))
        apply_schedules(opts, lrm, momentum_for(cfg, step, steps))
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {"depth": depth, "recipe": recipe, "overrides": overrides, "steps": steps,
            "flops_per_token": model.estimate_flops(), "train_flops": model.estimate_flops() * steps * ROWS * SEQ,
            "final_loss": round(loss.item(), 4), "val_bpb": round(val_bpb(model, val, token_bytes), 4),
            "tok_per_s": round(steps * ROWS * SEQ / seconds), "seconds": round(seconds, 1)}


def steps_for(depth: int, recipe: str, overrides: dict, budget: float) -> int:
    from nanoforge.config import TrainConfig
    from nanoforge.model.gpt import GPT, config_for_depth

    cfg = TrainConfig(depth=depth, recipe=recipe, **overrides)
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, VOCAB, SEQ, **cfg.model_options()))
    return max(1, round(budget / (model.estimate_flops() * ROWS * SEQ)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--budget-steps", type=int, default=100, help="the 2025 run's steps (sets the FLOPs)")
    parser.add_argument("--ablate", action="store_true", help="also each 2026 option back at 2025 (first depth)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results JSON")
    args = parser.parse_args(argv)
    tok, train, val = token_rows()
    token_bytes = torch.as_tensor(tok.token_bytes)
    print(f"data: {len(train)} train rows, {len(val)} val rows of {SEQ}; load average {os.getloadavg()}", flush=True)
    rows = []
    for depth in args.depths:
        variants = [("2025", {}), ("2026", {})]
        if args.ablate and depth == args.depths[0]:
            variants += [("2026", o) for o in ABLATIONS.values()]
        budget = None
        for recipe, overrides in variants:
            if budget is None:
                row = run_variant(depth, recipe, overrides, args.budget_steps, train, val, token_bytes)
                budget = row["train_flops"]
            else:
                steps = steps_for(depth, recipe, overrides, budget)
                row = run_variant(depth, recipe, overrides, steps, train, val, token_bytes)
            name = next((k for k, v in ABLATIONS.items() if v == overrides), "") or recipe
            row["name"] = name
            rows.append(row)
            print(f"d{depth} {name:18s} steps {row['steps']:4d}  FLOPs {row['train_flops']:.3e}  "
                  f"val bpb {row['val_bpb']:.4f}  loss {row['final_loss']:.4f}  {row['tok_per_s']:6d} tok/s", flush=True)
    load = os.getloadavg()
    print(f"load average after: {load}")
    write_json(args.out, {"rows": rows, "load_average_after": load, "threads": torch.get_num_threads(),
                         "seq": SEQ, "tokens_per_step": ROWS * SEQ, "vocab": VOCAB, "data": str(SAMPLE_DIR.name)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
