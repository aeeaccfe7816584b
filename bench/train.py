"""Training throughput on this machine: tokens/s, achieved GFLOP/s and MFU per dtype, and nanochat side by side.

    python -m bench.train                          # ours: both configs, fp32 and bf16, compile off and on
    python -m bench.train --steps 5 --no-compile   # a quick look
    python -m bench.train --against ../nanochat    # ours vs nanochat's own step, alternating fresh processes

Notable:
- Runs the stage's own optimizer step (`nanoforge.training.loop.train_step`: micro-steps,
  clipping, schedules, Muon + AdamW) on the stage's own model, in this process.
  Batches are random token ids of the real shapes (the loader runs in a background
  thread in the stage and does not change these numbers).
- Configs: the tiny preset (params.yaml defaults) and nanochat's CPU measurement
  point, depth 4 / seq 256 / device batch 8 / total batch 2048, both with the tiny
  preset's 4096-token vocabulary.
- `--against PATH` (a karpathy/nanochat checkout): at nanochat's CPU point, compile on,
  each side runs in a fresh process (`--child`), alternating, `--rounds` times per
  dtype, the order swapped every round so neither side always runs first. nanochat's
  side imports the checkout's own `GPT`, `setup_optimizers` (AdamW + Muon) and runs
  `scripts/base_train.py`'s step (micro-steps, clip, lr and momentum, both optimizers,
  zero_grad), with the same random batches. nanochat's base_train has no CPU autocast;
  the bf16 rows wrap both sides' forward in `torch.autocast("cpu", bfloat16)`.
  Prints tok/s per side and round, the ratio of the medians per dtype, and the load
  average around each run. No fixed reference numbers: they mean nothing on another CPU.
- `cold_s` is the first optimizer step including compile; tok/s is the median of
  the timed steps after `--warmup` more ("best": the fastest step, which is what a
  quiet machine gives when other processes come and go). MFU (of the median) is
  against the matmul peak this CPU measures for the dtype (`cpu_peak_flops`, cached).
- Other processes share the CPU: the load average is recorded with the numbers.
- Writes bench/results/train.json (bench/results/train_vs_nanochat.json with --against).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from nanoforge.common import write_json
from nanoforge.config import TrainConfig
from nanoforge.model.gpt import build_model, config_for_depth
from nanoforge.training.optim import build_optimizers
from nanoforge.runtime import Runtime, cpu_peak_flops, peak_flops
from nanoforge.training.loop import train_step

RESULTS = Path("bench/results/train.json")
VOCAB = 4096
RESULTS_AGAINST = Path("bench/results/train_vs_nanochat.json")
POINT = (4, 256, 8, 2048)  # nanochat's CPU point: depth, seq, device batch, total batch


class RandomBatches:
    def __init__(self, batch: int, seq: int, vocab: int, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.pool = [torch.randint(0, vocab, (batch, seq + 1), generator=gen) for _ in range(4)]
        self.i = 0
        self.device = device

    def __next__(self):
        block = self.pool[self.i % len(self.pool)]
        self.i += 1
        # contiguous, as the stage's loader gives them (nanochat's loss .view()s its targets)
        return block[:, :-1].to(self.device, torch.int32).contiguous(), block[:, 1:].to(self.device).contiguous(), None


def bench_one(depth: int, seq: int, device_batch: int, total_batch: int, dtype: torch.dtype, compile_: bool,
              steps: int, warmup: int, device: torch.device) -> dict:
    runtime = Runtime(device=device, dtype=dtype)
    accum = TrainConfig.batch_geometry(total_batch, device_batch, seq, 1)
    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, VOCAB, seq), device)
    optimizers = build_optimizers(model, 0.02, 0.2, 0.004)
    train_model = torch.compile(model, dynamic=False) if compile_ else model
    loader = RandomBatches(device_batch, seq, VOCAB, device)
    x, y, _ = next(loader)
    times = []
    for i in range(1 + warmup + steps):
        runtime.synchronize()
        t0 = time.perf_counter()
        loss_sum, grad_norm, (x, y, _) = train_step(model, train_model, None, optimizers, loader, x, y, accum, 1.0,
                                                     1.0, 0.85, runtime)
        loss_sum.item()
        runtime.synchronize()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[1 + warmup:])
    best = min(times[1 + warmup:])
    flops_per_token = model.estimate_flops()
    tok_s = total_batch / dt
    peak = peak_flops(runtime) if device.type != "cpu" else cpu_peak_flops(dtype)
    return {
        "depth": depth, "seq": seq, "device_batch": device_batch, "total_batch": total_batch, "accum": accum,
        "dtype": str(dtype).replace("torch.", ""), "compile": compile_, "params": model.num_params(),
        "flops_per_token": flops_per_token, "step_s": dt, "cold_s": times[0], "tok_per_sec": tok_s,
        "tok_per_sec_best": total_batch / best,
        "gflops": flops_per_token * tok_s / 1e9, "peak_gflops": peak / 1e9 if peak else None,
        "mfu": flops_per_token * tok_s / peak if peak else None,
    }


def child(args) -> int:
    import json

    dtype = getattr(torch, args.dtypes)
    if args.child == "ours":
        row = bench_one(*POINT, dtype, True, args.steps, args.warmup, torch.device("cpu"))
        row["side"] = "ours"
    else:
        from bench.train_against import nanochat_one

        row = nanochat_one(Path(args.against), *POINT, dtype, True, args.steps, args.warmup, VOCAB)
    row["threads"] = torch.get_num_threads()
    print(json.dumps(row))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--against", default=None, help="a karpathy/nanochat checkout: time its step next to ours")
    parser.add_argument("--rounds", type=int, default=3, help="with --against: runs per side and dtype")
    parser.add_argument("--child", choices=("ours", "nanochat"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:  # one side, one dtype, nanochat's CPU point, compile on: one JSON line for the parent
        return child(args)
    if args.against:
        from bench.train_against import against

        return against(args, RESULTS_AGAINST)
    device = torch.device(args.device)
    tiny = TrainConfig()
    configs = {
        "tiny preset": (tiny.depth, tiny.max_seq_len, tiny.device_batch_size, tiny.total_batch_size),
        "nanochat CPU point": (4, 256, 8, 2048),
    }
    rows = []
    header = (f"{'config':<20} {'dtype':<9} {'compile':<7} {'tok/s':>8} {'best':>8} {'GFLOP/s':>8} {'MFU':>6} "
              f"{'step':>7} {'cold':>7}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(header)
    for name, (depth, seq, batch, total) in configs.items():
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for compile_ in ([False] if args.no_compile else [False, True]):
                row = bench_one(depth, seq, batch, total, dtype, compile_, args.steps, args.warmup, device)
                row["config"] = name
                rows.append(row)
                mfu = f"{100 * row['mfu']:.0f}%" if row["mfu"] else "n/a"
                print(f"{name:<20} {row['dtype']:<9} {str(compile_):<7} {row['tok_per_sec']:>8,.0f} {row['tok_per_sec_best']:>8,.0f} "
                      f"{row['gflops']:>8.1f} {mfu:>6} {1000 * row['step_s']:>5.0f}ms {row['cold_s']:>6.1f}s",
                      flush=True)
    write_json(RESULTS, {"torch": torch.__version__, "threads": torch.get_num_threads(),
                         "load_average": os.getloadavg(), "rows": rows})
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
