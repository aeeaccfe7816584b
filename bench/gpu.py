"""The one device check, at most 8 minutes on one H100/H200: the gpu tests, then what one GPU does.

    python -m bench.gpu                 # everything; writes bench/results/gpu.json
    python -m bench.gpu --budget 300    # a shorter budget (seconds, all parts together)

Notable:
- Parts, in order, each in its own process with its share of the time (a hang, an OOM or
  a compile failure costs that part, not the run): `pytest -m gpu tests/test_gpu.py`, then
  training throughput at d12 and d20 on one GPU (seq 2048, device batch 32, vocab 65,536,
  bf16, torch.compile, 2 micro-steps a step: gradient accumulation as on fewer GPUs than
  the preset), then CORE items/s.
- Throughput runs the stage's own optimizer step (`training.loop.train_step`) on random
  token ids of the real shapes: tok/s is the median of the timed steps after a warm-up
  (the first pays for compile: `cold_s`), MFU is against `runtime.peak_flops` (the
  datasheet's dense bf16). Peak memory is torch's max allocated (and reserved) over the
  training steps, then over one val BPB pass at the device batch (the in-training eval),
  each beside the train stage's own estimate (`training.plan.estimate_memory`): this is
  the run that checks the estimate bench.memory prints.
- CORE items/s: a d12 model (random weights: speed does not depend on what they learned)
  over the generated toy bundle (tests/datagen.py), context 2048, batches of 32 contexts.
- bench/results/gpu.json is rewritten after every part, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("bench/results/gpu.json")
DRY_RUN_ENV = "NANOFORGE_BENCH_GPU_DRY_RUN"  # 1: every part on the CPU at toy sizes (checks the code, not the GPU)
DRY = os.environ.get(DRY_RUN_ENV) == "1"
SEQ, BATCH, VOCAB, ACCUM = (64, 2, 512, 2) if DRY else (2048, 32, 65_536, 2)
DEVICE = "cpu" if DRY else "cuda"
# seconds of the default 480-second budget each part may use (what is left over rolls on)
SHARES = {"tests": 240, "throughput_d12": 60, "throughput_d20": 135, "core": 40}


def device_info() -> dict:
    import torch

    import nanoforge.runtime as runtime  # sets the allocator's expandable segments before CUDA starts

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, gpus=torch.cuda.device_count(), memory_gib=props.total_memory / 2**30,
                    peak_tflops=(runtime.gpu_peak_flops(props.name) or 0) / 1e12 or None)
    return info


def run_part(name: str, cmd: list[str], timeout: float) -> dict:
    """One part in its own process; its JSON is the last stdout line (or the failure, with the output's tail)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:]
        return {"part": name, "ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": timeout,
                "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    seconds = time.perf_counter() - t0
    result = {"part": name, "ok": proc.returncode == 0, "returncode": proc.returncode, "seconds": seconds}
    lines = proc.stdout.strip().splitlines()
    try:
        result.update(json.loads(lines[-1]))
    except (IndexError, ValueError):
        pass
    if proc.returncode != 0 or "error" in result:
        result["output_tail"] = (proc.stdout[-2500:] + "\n--- stderr\n" + proc.stderr[-2500:])
    return result


def part_tests() -> dict:
    """pytest -m gpu: the summary line, as pytest prints it."""
    env = {**os.environ, "NANOFORGE_GPU_TESTS_ON_CPU": "1"} if DRY else None
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_gpu.py"], capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    print(proc.stdout[-4000:], file=sys.stderr)
    result = {"pytest_returncode": proc.returncode, "summary": lines[-1] if lines else ""}
    if proc.returncode != 0:
        result["error"] = f"pytest exited {proc.returncode}: {result['summary']}"
    return result


def part_throughput(depth: int, steps: int = 5, warmup: int = 2) -> dict:
    import nanoforge.runtime as rt  # first: the allocator setting precedes CUDA's first allocation

    import torch

    from bench.train import RandomBatches
    from nanoforge.config import TrainConfig
    from nanoforge.model.gpt import build_model, config_for_depth
    from nanoforge.training.loop import train_step
    from nanoforge.training.optim import build_optimizers
    from nanoforge.training.plan import estimate_memory

    runtime = rt.init_runtime(DEVICE, "auto")
    device = runtime.device
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, VOCAB, SEQ), device)
    optimizers = build_optimizers(model, 0.02, 0.2, 0.004)
    train_model = torch.compile(model, dynamic=False)
    loader = RandomBatches(BATCH, SEQ, VOCAB, device)
    x, y, _ = next(loader)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(1 + warmup + steps):
        runtime.synchronize()
        t0 = time.perf_counter()
        loss_sum, _norm, (x, y, _) = train_step(model, train_model, None, optimizers, loader, x, y, ACCUM, 1.0, 1.0,
                                                0.85, runtime)
        loss_sum.item()
        runtime.synchronize()
        times.append(time.perf_counter() - t0)
    train_peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    train_reserved = torch.cuda.max_memory_reserved(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model.eval()
    with torch.no_grad(), runtime.autocast():  # the in-training val BPB pass, at the device batch
        model(x, y, loss_reduction="none").sum().item()
    eval_peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    dt = statistics.median(times[1 + warmup:])
    tokens = BATCH * SEQ * ACCUM
    peak = rt.peak_flops(runtime)
    cfg = TrainConfig(depth=depth, max_seq_len=SEQ, device_batch_size=BATCH, total_batch_size=tokens, compile="on")
    est = estimate_memory(cfg, model.config, model.num_params(), compiled=True, cuda=True)
    gib = 2**30
    return {"depth": depth, "num_params": model.num_params(), "seq": SEQ, "device_batch_size": BATCH, "accum": ACCUM,
            "dtype": str(runtime.dtype).replace("torch.", ""), "tf32": torch.get_float32_matmul_precision(),
            "cold_s": times[0], "step_s": dt, "tok_per_s": tokens / dt,
            "mfu": model.estimate_flops() * tokens / dt / peak if peak else None,
            "train_peak_allocated_gib": train_peak / gib, "train_peak_reserved_gib": train_reserved / gib,
            "eval_peak_allocated_gib": eval_peak / gib,
            # the estimate counts gradients during eval too (DDP keeps its buckets); here they are freed
            "estimate_train_gib": (est["weights_grads_optimizer"] + est["activations"]) / gib,
            "estimate_eval_gib": (est["weights_grads_optimizer"] + est["eval_transient"]) / gib}


def part_core(depth: int = 2 if DRY else 12, items: int = 4 if DRY else 100) -> dict:
    import nanoforge.runtime as rt

    import tempfile

    import torch

    from nanoforge.evaluation.core import evaluate_core, load_bundle
    from nanoforge.model.gpt import build_model, config_for_depth
    from nanoforge.tokenizer.bpe import train_bpe
    from tests.datagen import make_documents, make_eval_bundle

    runtime = rt.init_runtime(DEVICE, "auto")
    tok = train_bpe(make_documents(1000, seed=0), vocab_size=2048)
    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, tok.vocab_size, SEQ), runtime.device)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        tasks, _ = load_bundle(make_eval_bundle(Path(tmp) / "bundle", items_per_task=items))
        evaluate_core(model, tok, tasks[:1], runtime, max_len=SEQ, batch_tokens=BATCH * SEQ, max_per_task=8)  # warm-up
        runtime.synchronize()
        t0 = time.perf_counter()
        core, results = evaluate_core(model, tok, tasks, runtime, max_len=SEQ, batch_tokens=BATCH * SEQ)
        runtime.synchronize()
        seconds = time.perf_counter() - t0
    n = sum(r.items for r in results)
    return {"depth": depth, "tasks": len(results), "items": n, "seconds": seconds, "items_per_s": n / seconds,
            "bundle": "generated toy bundle (tests/datagen.py)", "dtype": str(runtime.dtype).replace("torch.", "")}


def one(name: str) -> dict:
    if name == "tests":
        return part_tests()
    if name.startswith("throughput_d"):
        return part_throughput(2 if DRY else int(name.removeprefix("throughput_d")), steps=1 if DRY else 4,
                               warmup=0 if DRY else 1)
    if name == "core":
        return part_core()
    raise SystemExit(f"--one {name}: expected one of {', '.join(SHARES)}")


def main(argv: list[str] | None = None) -> int:
    from nanoforge.common import write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=float(sum(SHARES.values())), help="seconds for every part")
    parser.add_argument("--parts", default=",".join(SHARES), help=f"comma-separated, of: {', '.join(SHARES)}")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a part, in this process (the child)
    args = parser.parse_args(argv)
    if args.one:
        try:
            result = one(args.one)
        except Exception as exc:  # the parent records it; an OOM is a result, not a crash
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        print(json.dumps(result))
        return 0 if "error" not in result else 1
    start = time.perf_counter()
    deadline = start + args.budget
    scale = args.budget / sum(SHARES.values())
    out = {"device": device_info(), "budget_s": args.budget, "parts": {}}
    if not out["device"]["cuda_available"] and not DRY:
        print("bench.gpu: torch sees no CUDA device; nothing to measure (the gpu tests skip here)", file=sys.stderr)
        return 2
    parts = [p for p in args.parts.split(",") if p]
    carry = 0.0
    for i, name in enumerate(parts):
        left = deadline - time.perf_counter()
        allotted = min(left, SHARES.get(name, 60) * scale + carry)
        if allotted < 10:
            out["parts"][name] = {"part": name, "ok": False, "error": "no time left in the budget"}
            continue
        t0 = time.perf_counter()
        result = run_part(name, [sys.executable, "-m", "bench.gpu", "--one", name], allotted)
        carry = max(0.0, allotted - (time.perf_counter() - t0))
        out["parts"][name] = result
        print(f"{name}: {summary(result)}", flush=True)
        out["total_s"] = time.perf_counter() - start
        write_json(RESULTS.with_name("gpu-dry-run.json") if DRY else RESULTS, out)
    return 0 if all(p.get("ok") for p in out["parts"].values()) else 1


def summary(r: dict) -> str:
    if not r.get("ok"):
        return f"FAILED ({r.get('error') or 'returncode ' + str(r.get('returncode'))}) after {r.get('seconds', 0):.0f} s"
    if "summary" in r:
        return f"{r['summary']} ({r['seconds']:.0f} s)"
    if "tok_per_s" in r:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        return (f"depth {r['depth']}: {r['tok_per_s']:,.0f} tok/s, MFU {mfu}, peak {r['train_peak_allocated_gib']:.1f} "
                f"GiB train (estimate {r['estimate_train_gib']:.1f}), {r['eval_peak_allocated_gib']:.1f} GiB eval "
                f"(estimate {r['estimate_eval_gib']:.1f}), cold {r['cold_s']:.0f} s")
    if "items_per_s" in r:
        return f"CORE {r['items_per_s']:,.1f} items/s ({r['items']} items, {r['seconds']:.1f} s)"
    return json.dumps(r)[:200]


if __name__ == "__main__":
    raise SystemExit(main())
