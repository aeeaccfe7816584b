"""Tokenizer speed: training throughput of the stage vs. plain rustbpe, and batch encoding vs. tiktoken.

    python -m bench.tokenizer                 # ~200M characters, as the issue asks (minutes on 2 cores)
    python -m bench.tokenizer --chars 20e6    # a quick run

Notable:
- The corpus is built, not downloaded: ../shared/data/fineweb_sample (1.4M real
  characters; generated text from tests/datagen.py when absent) repeated in a new
  shuffled order each pass until `--chars`, written to temporary parquet shards in
  nanochat's layout (row groups of 1024 documents, zstd). Repetition keeps the
  splitting and counting work per character realistic, but the table of distinct
  chunks is as small as the sample's, so rustbpe's merge phase is shorter than on
  real FineWeb, which makes the stage's reading overhead look *larger*, not smaller.
- Training: `nanoforge.tokenizer.training.train_tokenizer` (parquet streaming, doc_cap, max_chars)
  against `rustbpe.Tokenizer.train_from_iterator` over the very same documents
  already in memory (as new str objects each repeat, like the stage's). Both must
  produce identical ranks; the overhead is the stage's best time over rustbpe's,
  in wall seconds and in CPU seconds (all threads; steady when others load the box).
- Encoding: `Tokenizer.encode(list)` with 1 and 2 threads against tiktoken's
  `encode_ordinary_batch` on the same ranks, on fresh string objects every
  repeat (CPython caches a str's UTF-8 form, and a data loader never re-encodes
  the same object), whole list and loader-sized batches.
- Writes bench/results/tokenizer.json. Other processes share the CPU: numbers are
  noisy, the best of a few repeats is reported with the load average.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanoforge.tokenizer.bpe import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from nanoforge.common import shard_name, write_json
from nanoforge.config import TokenizerConfig
from nanoforge.tokenizer.training import ReadStats, train_tokenizer, training_texts

# ../shared beside the checkout (the real-format samples), or NANOFORGE_SHARED_DATA=<folder>
SAMPLE_DIR = Path(os.environ.get("NANOFORGE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data") / "fineweb_sample"
RESULTS = Path("bench/results/tokenizer.json")


def source_documents() -> tuple[list[str], str]:
    files = sorted(SAMPLE_DIR.glob("shard_*.parquet"))
    if files:
        docs = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist() if t]
        return docs, f"{os.path.relpath(SAMPLE_DIR)} ({len(docs)} real documents)"  # relative: results travel with the repo
    from tests.datagen import make_documents

    docs = make_documents(5000, seed=0)
    return docs, "tests/datagen.py generated documents (fineweb_sample absent)"


def build_corpus(directory: Path, chars: int, shard_chars: int = 50_000_000, seed: int = 0) -> tuple[list[Path], str]:
    """Shards of about `shard_chars` characters holding `chars` characters in all."""
    docs, source = source_documents()
    rng = random.Random(seed)
    paths, written, shard_docs, shard_written = [], 0, [], 0

    def flush() -> None:
        nonlocal shard_docs, shard_written
        path = directory / shard_name(len(paths))
        pq.write_table(pa.table({"text": shard_docs}), path, row_group_size=1024, compression="zstd")
        paths.append(path)
        shard_docs, shard_written = [], 0

    while written < chars:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            shard_docs.append(docs[i])
            shard_written += len(docs[i])
            written += len(docs[i])
            if shard_written >= shard_chars:
                flush()
            if written >= chars:
                break
    if shard_docs:
        flush()
    return paths, source


def timed(fn):
    """(wall seconds, CPU seconds of all this process's threads, result)."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - w0, time.process_time() - c0, result


def bench_training(paths: list[Path], cfg: TokenizerConfig, repeats: int) -> dict:
    import rustbpe

    stats = ReadStats()
    texts = list(training_texts(paths, cfg.max_chars, cfg.doc_cap, stats))

    def plain(fresh: list[str]):
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(fresh), cfg.vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        return {bytes(t): r for t, r in trainer.get_mergeable_ranks()}

    # alternate the two so a burst of load from other processes hits both alike; CPU time (all
    # threads) is reported beside wall time because it barely moves when other processes compete
    plain_wall, plain_cpu, stage_wall, stage_cpu, read_times = [], [], [], [], []
    for _ in range(repeats):
        # new str objects each time, as the stage gets from parquet: CPython caches a str's UTF-8
        # form, which rustbpe reads, so reusing one list would hand plain rustbpe a free conversion
        fresh = [(t + ".")[:-1] for t in texts]
        wall, cpu, ranks = timed(lambda: plain(fresh))
        del fresh
        plain_wall.append(wall)
        plain_cpu.append(cpu)
        wall, cpu, (tok, st, _) = timed(lambda: train_tokenizer(cfg, paths))
        stage_wall.append(wall)
        stage_cpu.append(cpu)
        read_times.append(st.read_seconds)
    assert tok.mergeable_ranks == ranks, "the stage and plain rustbpe trained different ranks on the same text"
    plain_s, stage_s = min(plain_wall), min(stage_wall)
    return {
        "chars": stats.chars,
        "docs": stats.docs,
        "vocab_size": tok.vocab_size,
        "plain_rustbpe_seconds": round(plain_s, 3),
        "stage_seconds": round(stage_s, 3),
        "stage_read_seconds": round(min(read_times), 3),
        "plain_chars_per_sec": round(stats.chars / plain_s),
        "stage_chars_per_sec": round(stats.chars / stage_s),
        "overhead_pct": round(100 * (stage_s / plain_s - 1), 2),
        "plain_cpu_seconds": round(min(plain_cpu), 3),
        "stage_cpu_seconds": round(min(stage_cpu), 3),
        "overhead_cpu_pct": round(100 * (min(stage_cpu) / min(plain_cpu) - 1), 2),
        "all_plain_seconds": [round(t, 3) for t in plain_wall],
        "all_stage_seconds": [round(t, 3) for t in stage_wall],
    }, tok


def bench_encoding(tok: Tokenizer, docs: list[str], target_bytes: int, repeats: int, batch: int) -> list[dict]:
    texts, n_bytes = [], 0
    while n_bytes < target_bytes:
        for d in docs:
            texts.append(d)
            n_bytes += len(d.encode("utf-8"))
            if n_bytes >= target_bytes:
                break

    def fresh() -> list[str]:
        return [(t + ".")[:-1] for t in texts]  # new str objects: no cached UTF-8 from the last repeat

    runners = {
        "nanoforge Tokenizer.encode": lambda xs, n: tok.encode(xs, num_threads=n),
        "tiktoken encode_ordinary_batch": lambda xs, n: tok.enc.encode_ordinary_batch(xs, num_threads=n),
    }
    rows = []
    for name, fn in runners.items():
        for threads in (1, 2):
            whole, batched = [], []
            for _ in range(repeats):
                xs = fresh()
                gc.collect()
                t0 = time.perf_counter()
                fn(xs, threads)
                whole.append(time.perf_counter() - t0)
                xs = fresh()
                gc.collect()
                t0 = time.perf_counter()
                for i in range(0, len(xs), batch):
                    fn(xs[i:i + batch], threads)
                batched.append(time.perf_counter() - t0)
            rows.append({
                "encoder": name,
                "threads": threads,
                "mb_per_sec": round(n_bytes / min(whole) / 1e6, 2),
                f"mb_per_sec_batches_of_{batch}": round(n_bytes / min(batched) / 1e6, 2),
            })
    return rows, n_bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chars", type=float, default=200e6, help="training corpus size in characters (default 2e8)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocab size to train (default 32768)")
    parser.add_argument("--doc-cap", type=int, default=10_000)
    parser.add_argument("--encode-mb", type=float, default=20, help="MB of text to encode (default 20)")
    parser.add_argument("--batch", type=int, default=64, help="documents per call in the batched encoding test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    chars = int(args.chars)
    cfg = TokenizerConfig(vocab_size=args.vocab, max_chars=chars, doc_cap=args.doc_cap)
    with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as tmp:
        t0 = time.perf_counter()
        paths, source = build_corpus(Path(tmp), chars)
        print(f"corpus: {chars:,} chars in {len(paths)} shard(s) from {source}, built in {time.perf_counter() - t0:.1f}s")
        training, tok = bench_training(paths, cfg, args.repeats)
    docs, _ = source_documents()
    encoding, n_bytes = bench_encoding(tok, docs, int(args.encode_mb * 1e6), args.repeats, args.batch)

    print(f"\ntraining: {training['chars']:,} chars after doc_cap, {training['docs']:,} docs, vocab {training['vocab_size']:,}"
          f" (best of {args.repeats})")
    print(f"{'path':34s} {'seconds':>9s} {'M chars/s':>10s} {'CPU s':>8s}")
    print(f"{'plain rustbpe (text in memory)':34s} {training['plain_rustbpe_seconds']:9.2f} "
          f"{training['plain_chars_per_sec'] / 1e6:10.2f} {training['plain_cpu_seconds']:8.2f}")
    print(f"{'stage (parquet stream, doc_cap)':34s} {training['stage_seconds']:9.2f} "
          f"{training['stage_chars_per_sec'] / 1e6:10.2f} {training['stage_cpu_seconds']:8.2f}")
    print(f"overhead: {training['overhead_pct']:+.1f}% wall, {training['overhead_cpu_pct']:+.1f}% CPU "
          f"(parquet reading: {training['stage_read_seconds']:.2f}s)")
    print(f"\nencoding: {n_bytes / 1e6:.1f} MB, vocab {tok.vocab_size:,} (best of {args.repeats})")
    key = f"mb_per_sec_batches_of_{args.batch}"
    print(f"{'encoder':34s} {'threads':>7s} {'MB/s':>8s} {f'MB/s ({args.batch}/call)':>16s}")
    for row in encoding:
        print(f"{row['encoder']:34s} {row['threads']:7d} {row['mb_per_sec']:8.2f} {row[key]:16.2f}")

    result = {
        "command": " ".join(["python -m bench.tokenizer", *(argv if argv is not None else sys.argv[1:])]),
        "corpus": {"chars": chars, "shards": len(paths), "source": source,
                   "note": "real sample documents repeated in shuffled order to reach the size"},
        "training": training,
        "encoding": {"bytes": n_bytes, "vocab_size": tok.vocab_size, "rows": encoding},
        "machine": {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]},
    }
    write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
