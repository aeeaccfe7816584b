"""CORE and BPB evaluation speed, nanochat's evaluator vs ours, same model, same items, this CPU.

    python -m bench.core --against /path/to/nanochat          # a checkout of karpathy/nanochat (or NANOCHAT_DIR)
    python -m bench.core --against ../nanochat --items 20 --rounds 2 --context 256

Notable:
- nanochat's own code is imported from the checkout (`nanochat.core_eval.evaluate_example`,
  `nanochat.loss_eval.evaluate_bpb`) and given OUR model and tokenizer behind thin
  adapters (nanochat's call conventions), so both evaluators score the same weights on
  the same items: the comparison is of the evaluators, not of the models.
- The model is nanoforge's GPT at the tiny preset's shape (depth 4, context 256, vocab
  4096), randomly initialised with every matrix non-zero (nanochat's init zeroes the
  output projections and the head, which would make every option tie). Speed does not
  depend on what the weights learned. The tokenizer is trained on the FineWeb sample
  (generated text when absent).
- Tasks: every task of the real bundle (../shared/data/eval_bundle) when present, else
  the generated toy bundle of tests/datagen.py; `--items` per task, nanochat's shuffle.
- Rows longer than `--context` keep their last tokens in both evaluators (nanochat crops
  when the model has `max_seq_len`; the stage crops to the model's context). Cropped
  options of different lengths start at different tokens, so they share nothing.
- Per task: nanochat's evaluator and ours alternate, `--rounds` times (the best round of
  each is reported, and every round's seconds are kept). Per-item decisions are checked
  three ways: nanochat vs ours, and ours with vs without prefix sharing; every
  difference is listed with its margin (the gap between the two best mean losses, or
  for LM the smallest top-2 logit gap over the span) and called a tie when the margin
  is within `TIE_TOLERANCE`.
- Token share saved per task type: 1 - forwarded tokens / the tokens of every option's
  full row; also against what nanochat forwards (each item's options padded to the
  longest).
- Other processes share the CPU: the load average is printed and saved with the numbers.
- Writes bench/results/core.json (`--out`), also after every task ("complete": false).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanoforge.common import write_json
from nanoforge.evaluation import core, prefix
from nanoforge.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
REAL_BUNDLE = REPO.parent / "shared" / "data" / "eval_bundle"
SAMPLE_DIR = REPO.parent / "shared" / "data" / "fineweb_sample"
RESULTS = REPO / "bench" / "results" / "core.json"
TIE_TOLERANCE = 1e-4  # mean-loss (nats) or logit gap below which two choices are a float tie


def tokenizer(vocab_size: int):
    from nanoforge.tokenizer.bpe import train_bpe

    files = sorted(SAMPLE_DIR.glob("shard_*.parquet"))
    if files:
        from nanoforge.data.shards import iter_documents

        return train_bpe(iter_documents(files[:1]), vocab_size), f"{files[0]}"
    from tests.datagen import make_documents

    return train_bpe(make_documents(3000, seed=0), vocab_size), "generated text"


def load_tasks(tmp: Path):
    if REAL_BUNDLE.exists():
        found, skipped = core.load_bundle(REAL_BUNDLE, skip_bad=True)
        # recorded relative to the checkout: results travel with the repo, machine paths would not
        return found, f"{os.path.relpath(REAL_BUNDLE, REPO)} ({len(found)} tasks)"
    from tests.datagen import make_eval_bundle

    found, _ = core.load_bundle(make_eval_bundle(tmp / "bundle", items_per_task=200))
    return found, "generated toy bundle"


class NanochatModel:
    """Our GPT with nanochat's call conventions: model(ids), max_seq_len, get_device()."""

    def __init__(self, model, max_seq_len):
        self.model, self.max_seq_len = model, max_seq_len

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def get_device(self):
        return self.model.lm_head.weight.device


class NanochatTokenizer:
    def __init__(self, tok):
        self.tok = tok

    def __call__(self, texts, prepend=None):
        return self.tok.encode(texts, prepend=prepend)

    def get_bos_token_id(self):
        return self.tok.bos_id


def import_nanochat(path: Path):
    if not (path / "nanochat" / "core_eval.py").exists():
        raise SystemExit(f"--against {path}: no nanochat/core_eval.py there; point it at a karpathy/nanochat checkout")
    sys.path.insert(0, str(path))
    return importlib.import_module("nanochat.core_eval"), importlib.import_module("nanochat.loss_eval")


def random_model(depth: int, vocab: int, seq: int):
    from nanoforge.model.gpt import build_model, config_for_depth

    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, vocab, seq), "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name:
                p.normal_(0, 1.0 / p.size(1) ** 0.5)  # every matrix non-zero: options must differ
    return model.eval()


def nanochat_items(nc, model, tok, task, data, max_len) -> tuple[list[bool], float]:
    """nanochat's evaluate_task loop, one rank: per-item correctness and seconds."""
    meta = {"task_type": task.kind, "num_fewshot": task.num_fewshot, "continuation_delimiter": task.delimiter}
    view, ntok = NanochatModel(model, max_len), NanochatTokenizer(tok)
    t0 = time.perf_counter()
    correct = [bool(nc.evaluate_example(i, view, ntok, data, "cpu", meta)) for i in range(len(data))]
    return correct, time.perf_counter() - t0


def decisions(task, data, rows, mean_loss, exact):
    """Per item: (correct, chosen option); and per item the rows' mean losses."""
    out, losses = [], {}
    for r, (i, option, *_rest) in enumerate(rows):
        losses.setdefault(i, []).append(mean_loss[r])
    for i in range(len(data)):
        if task.kind == "language_modeling":
            r = next(r for r, row in enumerate(rows) if row[0] == i)
            out.append((exact[r], 0))
        else:
            ls = losses[i]
            choice = ls.index(min(ls))
            out.append((choice == data[i]["gold"], choice))
    return out, losses


@torch.no_grad()
def lm_margin(model, row) -> float:
    """Smallest top-1 minus top-2 logit gap over an LM row's span (full forward)."""
    tokens, start, end = row[2], row[3], row[4]
    logits = model(torch.tensor([tokens]))[0, start - 1: end - 1]
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def margin(losses: list[float]) -> float:
    ordered = sorted(losses)
    return ordered[1] - ordered[0]


def check_task(model, tok, task, data, max_len, batch_tokens, runtime, nanochat_correct):
    """Decisions of the shared and the full scoring, and every difference (with nanochat's) with its margin."""
    rows = core.build_rows(task, data, range(len(data)), tok, max_len, {})
    full_loss, full_exact = core.score_rows(model, rows, tok.bos_id, runtime, batch_tokens)
    shared_loss, shared_exact, tokens = prefix.score_rows_shared(model, rows, tok.bos_id, runtime, batch_tokens)
    full, losses = decisions(task, data, rows, full_loss, full_exact)
    shared, _ = decisions(task, data, rows, shared_loss, shared_exact)
    diffs = []
    for i in range(len(data)):
        against = [name for name, ok in (("full_forward", full[i] != shared[i]),
                                         ("nanochat", nanochat_correct[i] != shared[i][0])) if ok]
        if not against:
            continue
        if task.kind == "language_modeling":
            m = lm_margin(model, next(r for r in rows if r[0] == i))
        else:
            m = margin(losses[i])
        diffs.append({"task": task.label, "item": i, "differs_from": against, "margin": m, "tie": m <= TIE_TOLERANCE})
    worst = max(abs(a - b) for a, b in zip(full_loss, shared_loss))
    nanochat_tokens = 0  # nanochat pads each item's options to the longest
    for i in range(len(data)):
        lens = [len(r[2]) for r in rows if r[0] == i]
        nanochat_tokens += len(lens) * max(lens)
    tokens["nanochat_tokens"] = nanochat_tokens
    return diffs, worst, tokens


def bench_bpb(nl, model, tok, seq: int, batch: int, rows_n: int, rounds: int) -> dict:
    """nanochat's evaluate_bpb vs ours on the same rows of the same model: seconds and the two numbers."""
    from nanoforge.evaluation.bpb import evaluate_bpb

    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, tok.vocab_size, (rows_n, seq + 1), generator=gen)
    batches = [(rows[i: i + batch, :-1].contiguous(), rows[i: i + batch, 1:].contiguous()) for i in range(0, rows_n, batch)]
    token_bytes = tok.token_bytes
    runtime = Runtime(torch.device("cpu"), torch.float32)
    best = {"nanochat": float("inf"), "ours": float("inf")}
    values = {}
    for _ in range(rounds):
        t0 = time.perf_counter()
        values["nanochat"] = nl.evaluate_bpb(NanochatModel(model, None), batches, len(batches), token_bytes)
        best["nanochat"] = min(best["nanochat"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        values["ours"] = evaluate_bpb(model, iter(batches), token_bytes, runtime)
        best["ours"] = min(best["ours"], time.perf_counter() - t0)
    tokens = rows_n * seq
    return {"tokens": tokens, "seconds": best, "tokens_per_s": {k: tokens / v for k, v in best.items()},
            "bpb": values, "speedup": best["nanochat"] / best["ours"]}


def by_type(per_task: list[dict]) -> dict:
    out = {}
    for kind in core.TASK_TYPES:
        rows = [t for t in per_task if t["kind"] == kind]
        if not rows:
            continue
        items = sum(t["items"] for t in rows)
        nano_s, ours_s = sum(t["nanochat_s"] for t in rows), sum(t["ours_s"] for t in rows)
        row_t, fwd_t, nano_t = (sum(t["tokens"][k] for t in rows) for k in ("row_tokens", "packed_tokens", "nanochat_tokens"))
        out[kind] = {"tasks": len(rows), "items": items, "nanochat_items_per_s": items / nano_s,
                     "ours_items_per_s": items / ours_s, "speedup": nano_s / ours_s,
                     "tokens_saved_vs_full_rows": 1 - fwd_t / row_t, "tokens_saved_vs_nanochat": 1 - fwd_t / nano_t}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, default=os.environ.get("NANOCHAT_DIR"),
                        help="a karpathy/nanochat checkout (default: $NANOCHAT_DIR)")
    parser.add_argument("--items", type=int, default=50, help="items per task")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="the model's training context")
    # 2048, nanochat's context: its evaluator asserts (core_eval.py "this should never happen right?") when a crop
    # reaches into an item's continuation, which 50 items per task at a crop of 256 do (piqa)
    parser.add_argument("--context", type=int, default=2048, help="crop rows to this many tokens (nanochat's "
                                                                 "context: 2048)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="device_batch_size: batch_tokens = batch * seq")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", default=None, help="comma-separated labels (default: every task)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--bpb-rows", type=int, default=64, help="rows of seq tokens for the BPB timing (0: skip)")
    args = parser.parse_args(argv)
    if args.against is None:  # `python -m bench` runs every bench without arguments: a skip, not a failure
        print("bench.core: skipped: it times nanochat's evaluator next to ours; give --against PATH "
              "(a karpathy/nanochat checkout) or set NANOCHAT_DIR")
        return 0
    args.against = Path(args.against)
    nc, nl = import_nanochat(args.against.resolve())
    if args.items <= 10:
        parser.error("--items must be at least 11: nanochat samples 10 few-shot examples from the other items")
    if args.threads:
        torch.set_num_threads(args.threads)
    max_len = args.context
    batch_tokens = args.batch * args.seq
    runtime = Runtime(torch.device("cpu"), torch.float32)  # fp32: the comparison is about the evaluator
    tok, tok_source = tokenizer(args.vocab)
    model = random_model(args.depth, tok.vocab_size, args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        found, source = load_tasks(Path(tmp))
    if args.tasks:
        wanted = args.tasks.split(",")
        found = [t for t in found if t.label in wanted]
    load0 = os.getloadavg()
    print(f"model: depth {args.depth}, context {args.seq}, crop {max_len}, vocab {tok.vocab_size} ({tok_source}); "
          f"{torch.get_num_threads()} threads; tasks: {source}; load average {load0[0]:.2f}", flush=True)
    core.evaluate_task(model, tok, found[0], runtime, max_len, batch_tokens, 4)  # warm-up
    per_task, all_diffs = [], []
    print(f"{'task':<36}{'type':<18}{'items':>6}{'nanochat/s':>11}{'ours/s':>9}{'x':>6}{'saved':>7}  accuracy", flush=True)
    for task in found:
        data = core.prepare_items(task.items, args.items)
        nano_s, ours_s = [], []
        for _ in range(args.rounds):  # alternate, so a busy moment does not land on one side only
            nano_correct, s = nanochat_items(nc, model, tok, task, data, max_len)
            nano_s.append(s)
            result = core.evaluate_task(model, tok, task, runtime, max_len, batch_tokens, args.items)
            ours_s.append(result.seconds)
        diffs, worst, tokens = check_task(model, tok, task, data, max_len, batch_tokens, runtime, nano_correct)
        all_diffs += diffs
        nano_acc = sum(nano_correct) / len(data)
        row = {"task": task.label, "kind": task.kind, "items": len(data), "nanochat_s": min(nano_s),
               "ours_s": min(ours_s), "rounds_nanochat_s": nano_s, "rounds_ours_s": ours_s,
               "nanochat_accuracy": nano_acc, "ours_accuracy": result.accuracy,
               "accuracy_equal": nano_acc == result.accuracy, "max_mean_loss_diff_shared_vs_full": worst,
               "tokens": tokens, "notes": result.notes}
        per_task.append(row)
        # after every task, so a run stopped early (a busy machine) still leaves its numbers
        write_json(args.out, {"complete": False, "crop": max_len, "rounds": args.rounds, "threads": torch.get_num_threads(),
                              "load_average": {"start": load0, "now": os.getloadavg()}, "per_task": per_task,
                              "by_type": by_type(per_task), "decision_differences": all_diffs})
        saved = 1 - tokens["packed_tokens"] / tokens["row_tokens"]
        print(f"{task.label:<36}{task.kind:<18}{len(data):>6}{len(data) / row['nanochat_s']:>11.1f}"
              f"{len(data) / row['ours_s']:>9.1f}{row['nanochat_s'] / row['ours_s']:>6.2f}{saved:>7.0%}"
              f"  {nano_acc:.3f} {'==' if row['accuracy_equal'] else '!='} {result.accuracy:.3f}", flush=True)
    types = by_type(per_task)
    items = sum(t["items"] for t in per_task)
    total = {"items": items, "nanochat_items_per_s": items / sum(t["nanochat_s"] for t in per_task),
             "ours_items_per_s": items / sum(t["ours_s"] for t in per_task)}
    total["speedup"] = total["ours_items_per_s"] / total["nanochat_items_per_s"]
    print(f"\n{'type':<20}{'items':>6}{'nanochat/s':>11}{'ours/s':>9}{'x':>6}{'saved vs rows':>14}{'vs nanochat':>12}")
    for kind, t in types.items():
        print(f"{kind:<20}{t['items']:>6}{t['nanochat_items_per_s']:>11.1f}{t['ours_items_per_s']:>9.1f}"
              f"{t['speedup']:>6.2f}{t['tokens_saved_vs_full_rows']:>14.0%}{t['tokens_saved_vs_nanochat']:>12.0%}")
    print(f"{'all':<20}{items:>6}{total['nanochat_items_per_s']:>11.1f}{total['ours_items_per_s']:>9.1f}{total['speedup']:>6.2f}")
    equal = all(t["accuracy_equal"] for t in per_task)
    ties = all(d["tie"] for d in all_diffs)
    print(f"per-task accuracy identical: {equal}; decision differences: {len(all_diffs)} (all float ties: {ties})")
    for d in all_diffs:
        print(f"  {d['task']} item {d['item']}: differs from {', '.join(d['differs_from'])}, margin {d['margin']:.2e}"
              f"{' (tie)' if d['tie'] else ''}")
    bpb = bench_bpb(nl, model, tok, args.seq, args.batch, args.bpb_rows, args.rounds) if args.bpb_rows else None
    if bpb:
        print(f"BPB over {bpb['tokens']} tokens: nanochat {bpb['tokens_per_s']['nanochat']:,.0f} tok/s, ours "
              f"{bpb['tokens_per_s']['ours']:,.0f} tok/s ({bpb['speedup']:.2f}x); bpb {bpb['bpb']['nanochat']:.6f} "
              f"vs {bpb['bpb']['ours']:.6f}")
    load1 = os.getloadavg()
    print(f"load average: {load0[0]:.2f} at start, {load1[0]:.2f} at the end (1-minute); numbers under shared load")
    write_json(args.out, {
        "complete": True, "against": str(args.against), "model": {"depth": args.depth, "sequence_len": args.seq, "vocab_size": tok.vocab_size},
        "crop": max_len, "batch_tokens": batch_tokens, "threads": torch.get_num_threads(), "tasks_source": source,
        "rounds": args.rounds, "load_average": {"start": load0, "end": load1}, "per_task": per_task, "by_type": types,
        "total": total, "accuracy_equal": equal, "decision_differences": all_diffs, "all_differences_ties": ties,
        "tie_tolerance": TIE_TOLERANCE, "bpb": bpb,
    })
    print(f"wrote {args.out}")
    return 0 if equal and ties else 1


if __name__ == "__main__":
    raise SystemExit(main())
