"""`python -m bench.train --against PATH`: our training step and nanochat's, side by side.

Notable:
- Every measurement is a fresh process (`python -m bench.train --child ours|nanochat`),
  so neither side inherits the other's compiled kernels, allocator state or threads;
  the parent alternates them, swapping the order every round, and reads one JSON line.
- nanochat's side is nanochat's own code from the checkout: `nanochat.gpt.GPT` built on
  the meta device and `init_weights()` as base_train does, `setup_optimizers()` with
  base_train's learning rates, `torch.compile(dynamic=False)`, and base_train's step.
- A child that fails prints its stderr's tail and the parent stops: a half-measured
  table would read as a result.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from nanoforge.common import write_json


def nanochat_one(path: Path, depth: int, seq: int, device_batch: int, total_batch: int, dtype: torch.dtype,
                 compile_: bool, steps: int, warmup: int, vocab: int) -> dict:
    """Time nanochat's base_train step (10231df layout) on CPU; the same fields as bench_one."""
    sys.path.insert(0, str(path))
    from nanochat.gpt import GPT, GPTConfig

    from bench.train import RandomBatches

    model_dim = depth * 64  # base_train's shape rule
    num_heads = max(1, (model_dim + 127) // 128)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=num_heads,
                              n_kv_head=num_heads, n_embd=model_dim))
    model.to_empty(device="cpu")
    model.init_weights()
    orig_model = model
    model = torch.compile(model, dynamic=False) if compile_ else model
    optimizers = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0)
    muon = optimizers[1]
    accum = total_batch // (device_batch * seq)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    loader = RandomBatches(device_batch, seq, vocab, torch.device("cpu"))
    x, y, _ = next(loader)
    times = []
    for step in range(1 + warmup + steps):
        t0 = time.perf_counter()
        for _ in range(accum):
            with autocast:
                loss = model(x, y)
            (loss / accum).backward()
            x, y, _ = next(loader)
        torch.nn.utils.clip_grad_norm_(orig_model.parameters(), 1.0).item()
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * 1.0
        frac = min(step / 300, 1)
        for group in muon.param_groups:
            group["momentum"] = (1 - frac) * 0.85 + frac * 0.95
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[1 + warmup:])
    flops = orig_model.estimate_flops()
    return {"side": "nanochat", "dtype": str(dtype).replace("torch.", ""), "compile": compile_, "accum": accum,
            "params": sum(p.numel() for p in orig_model.parameters()), "flops_per_token": flops, "step_s": dt,
            "cold_s": times[0], "tok_per_sec": total_batch / dt, "tok_per_sec_best": total_batch / min(times[1 + warmup:]),
            "gflops": flops * total_batch / dt / 1e9}


def run_child(side: str, dtype: str, against: Path, steps: int, warmup: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.train", "--child", side, "--dtypes", dtype, "--against", str(against),
           "--steps", str(steps), "--warmup", str(warmup)]
    if threads:
        cmd += ["--threads", str(threads)]
    load_before = os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"{side} {dtype} child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["load_before"], row["load_after"] = load_before, os.getloadavg()[0]
    return row


def against(args, results: Path) -> int:
    path = Path(args.against).resolve()
    if not (path / "nanochat" / "gpt.py").exists():
        raise SystemExit(f"--against {path}: no nanochat/gpt.py there; point it at a karpathy/nanochat checkout")
    dtypes = args.dtypes.split(",")
    print(f"torch {torch.__version__}; nanochat at {path}; depth 4, seq 256, device batch 8, total batch 2048, "
          f"vocab 4096, compile on; {args.rounds} rounds, fresh process per run", flush=True)
    print(f"{'round':<6}{'dtype':<10}{'side':<10}{'tok/s':>8}{'best':>8}{'cold':>7}{'load':>12}", flush=True)
    runs = []
    for r in range(args.rounds):
        for dtype in dtypes:
            order = ("ours", "nanochat") if r % 2 == 0 else ("nanochat", "ours")
            for side in order:
                row = run_child(side, dtype, path, args.steps, args.warmup, args.threads)
                row["round"] = r + 1
                runs.append(row)
                print(f"{r + 1:<6}{dtype:<10}{side:<10}{row['tok_per_sec']:>8,.0f}{row['tok_per_sec_best']:>8,.0f}"
                      f"{row['cold_s']:>6.1f}s{row['load_before']:>6.2f}->{row['load_after']:<5.2f}", flush=True)
    summary = {}
    print(f"\n{'dtype':<10}{'ours':>8}{'nanochat':>10}{'ratio':>7}{'ratio best':>11}{'cold ours':>10}{'cold nc':>9}")
    for dtype in dtypes:
        side = {s: [x for x in runs if x["dtype"] == dtype and x["side"] == s] for s in ("ours", "nanochat")}
        med = {s: statistics.median(x["tok_per_sec"] for x in rows) for s, rows in side.items()}
        best = {s: max(x["tok_per_sec_best"] for x in rows) for s, rows in side.items()}
        cold = {s: statistics.median(x["cold_s"] for x in rows) for s, rows in side.items()}
        summary[dtype] = {"ours_tok_per_sec": med["ours"], "nanochat_tok_per_sec": med["nanochat"],
                          "ratio": med["ours"] / med["nanochat"], "ratio_best": best["ours"] / best["nanochat"],
                          "cold_s": cold}
        print(f"{dtype:<10}{med['ours']:>8,.0f}{med['nanochat']:>10,.0f}{summary[dtype]['ratio']:>6.2f}x"
              f"{summary[dtype]['ratio_best']:>10.2f}x{cold['ours']:>9.1f}s{cold['nanochat']:>8.1f}s")
    loads = [x["load_before"] for x in runs] + [x["load_after"] for x in runs]
    print(f"load average (1-minute) during the runs: {min(loads):.2f} to {max(loads):.2f}; the machine is shared")
    write_json(results, {"torch": torch.__version__, "against": str(path), "config": {"depth": 4, "seq": 256,
               "device_batch": 8, "total_batch": 2048, "vocab": 4096, "compile": True}, "runs": runs, "summary": summary})
    print(f"wrote {results}")
    return 0
