"""CORE scoring speed on CPU: items per second, packed batches vs one forward per item vs per option.

    python -m bench.core                      # tiny preset model, 40 items per task
    python -m bench.core --items 100 --depth 4 --threads 2

Notable:
- The model is the tiny preset's shape (depth 4, context 256, vocab 4096), randomly
  initialised: speed does not depend on what the weights learned. The tokenizer is
  trained on /work/shared/data/fineweb_sample (generated text when absent).
- Tasks: the real bundle in /work/shared/data/eval_bundle when present (five tasks
  of all three types, few-shot prompts cropped to the context as in the stage), else
  the generated toy bundle of tests/datagen.py.
- Three ways to run the same rows through the model:
  packed = stages.core as the stage runs it (rows of many items sorted by length,
  up to device_batch_size contexts per forward); per_item = nanochat's loop (one
  padded forward holding the options of one item); per_option = one forward per
  option. All three must give the same accuracy; the table shows items/s and the
  speed-up of packing.
- What to expect on a CPU: the three are close (measured within ~10% with one
  thread). The forward is compute-bound there, so fewer, larger forwards save
  little, and very large batches lose some speed to cache misses on the logits.
  Packing is for GPUs, where one small forward per item leaves the device idle.
- Writes bench/results/core.json. Other processes share the CPU: the best of
  `--repeats` is reported, with the load average.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from nanoforge.common import write_json
from nanoforge.evaluation.core import build_rows, load_bundle, prepare_items, score_rows
from nanoforge.runtime import Runtime

REAL_BUNDLE = Path("/work/shared/data/eval_bundle")
SAMPLE_DIR = Path("/work/shared/data/fineweb_sample")
REAL_TASKS = ["hellaswag_zeroshot", "arc_easy", "piqa", "winogrande", "lambada_openai"]
RESULTS = Path("bench/results/core.json")


def tokenizer(vocab_size: int):
    from nanoforge.tokenizer.bpe import train_bpe

    files = sorted(SAMPLE_DIR.glob("shard_*.parquet"))
    if files:
        from nanoforge.data.shards import iter_documents

        return train_bpe(iter_documents(files), vocab_size), f"{SAMPLE_DIR}"
    from tests.datagen import make_documents

    return train_bpe(make_documents(3000, seed=0), vocab_size), "generated text"


def tasks(tmp: Path):
    if REAL_BUNDLE.exists():
        found, _ = load_bundle(REAL_BUNDLE, REAL_TASKS)
        return found, f"{REAL_BUNDLE} ({', '.join(REAL_TASKS)})"
    from tests.datagen import make_eval_bundle

    found, _ = load_bundle(make_eval_bundle(tmp / "bundle", items_per_task=200))
    return found, "generated toy bundle"


def score(model, rows, bos, runtime, mode: str, batch_tokens: int):
    if mode == "packed":
        return score_rows(model, rows, bos, runtime, batch_tokens)
    if mode == "per_option":
        return score_rows(model, rows, bos, runtime, batch_tokens, max_rows=1)
    # per_item: nanochat's loop, one forward with the options of one item
    mean_loss, exact = [0.0] * len(rows), [False] * len(rows)
    start = 0
    while start < len(rows):
        end = start
        while end < len(rows) and rows[end][0] == rows[start][0]:
            end += 1
        m, e = score_rows(model, rows[start:end], bos, runtime, 10**9)
        mean_loss[start:end], exact[start:end] = m, e
        start = end
    return mean_loss, exact


def accuracy(task, data, rows, mean_loss, exact) -> float:
    best, correct = {}, 0
    for r, (i, option, *_rest) in enumerate(rows):
        if task.kind == "language_modeling":
            correct += exact[r]
        elif i not in best or mean_loss[r] < best[i][0]:
            best[i] = (mean_loss[r], option)
    correct += sum(option == data[i]["gold"] for i, (_, option) in best.items())
    return correct / len(data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=40, help="items per task")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="device_batch_size: contexts per packed forward")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (the issue's number), or cuda / auto")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from nanoforge.model.gpt import build_model, config_for_depth

    tok, tok_source = tokenizer(args.vocab)
    torch.manual_seed(0)
    from nanoforge.runtime import pick_device

    device = pick_device(args.device)
    model = build_model(config_for_depth(args.depth, tok.vocab_size, args.seq), device)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)
    model.eval()
    runtime = Runtime(device, torch.float32)  # float32: the comparison is about batching, not dtype
    with tempfile.TemporaryDirectory() as tmp:
        found, bundle_source = tasks(Path(tmp))
    prepared = []
    for task in found:
        data = prepare_items(task.items, args.items)
        rows = build_rows(task, data, range(len(data)), tok, args.seq, {})
        prepared.append((task, data, rows))
    n_items = sum(len(d) for _, d, _ in prepared)
    n_rows = sum(len(r) for *_, r in prepared)
    n_tokens = sum(len(row[2]) for *_, rows in prepared for row in rows)
    print(f"model: depth {args.depth}, context {args.seq}, vocab {tok.vocab_size} (tokenizer from {tok_source}); "
          f"{device}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"tasks: {bundle_source}: {n_items} items, {n_rows} rows, {n_tokens} tokens")
    modes = ("packed", "per_item", "per_option")
    for mode in modes:  # warm-up: first calls pay for kernel selection and allocation
        task, data, rows = prepared[0]
        score(model, rows[:8], tok.bos_id, runtime, mode, args.batch * args.seq)
    best: dict[str, float] = {}
    accs: dict[str, dict] = {}
    for _ in range(args.repeats):  # modes interleaved, so a busy moment does not land on one mode only
        for mode in modes:
            runtime.synchronize()
            t0 = time.perf_counter()
            accs[mode] = {}
            for task, data, rows in prepared:
                m, e = score(model, rows, tok.bos_id, runtime, mode, args.batch * args.seq)
                accs[mode][task.label] = accuracy(task, data, rows, m, e)
            runtime.synchronize()
            best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - t0)
    results = {mode: {"seconds": best[mode], "items_per_s": n_items / best[mode], "tokens_per_s": n_tokens / best[mode],
                      "accuracy": accs[mode]} for mode in modes}
    base = results["packed"]["accuracy"]
    agree = all(results[m]["accuracy"] == base for m in results)
    print(f"\n{'mode':<12}{'seconds':>10}{'items/s':>10}{'tokens/s':>12}{'packed x':>10}")
    for mode, r in results.items():
        speedup = r["seconds"] / results["packed"]["seconds"]
        print(f"{mode:<12}{r['seconds']:>10.2f}{r['items_per_s']:>10.1f}{r['tokens_per_s']:>12.0f}{speedup:>10.2f}")
    print(f"\naccuracies identical across modes: {agree}")
    write_json(RESULTS, {
        "model": {"depth": args.depth, "sequence_len": args.seq, "vocab_size": tok.vocab_size},
        "device": str(device), "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "tasks": bundle_source,
        "items": n_items, "rows": n_rows, "tokens": n_tokens, "batch_contexts": args.batch, "results": results,
        "speedup_packed_vs_per_item": results["per_item"]["seconds"] / results["packed"]["seconds"],
        "speedup_packed_vs_per_option": results["per_option"]["seconds"] / results["packed"]["seconds"],
        "accuracies_agree": agree,
    })
    print(f"wrote {RESULTS}")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
