"""Download throughput from a local HTTP mirror: MB/s by number of workers.

    python -m bench.download                         # 8 shards x ~25 MB, workers 1, 2, 4
    python -m bench.download --shards 4 --shard-mb 10 --workers 1 2 --repeats 3

Notable:
- Shards are generated once per run into a temp folder: web-like text (Zipf-
  distributed words, ~3x zstd compression like FineWeb-Edu), 1024-row row groups,
  every shard a different permutation of the documents so no two are identical.
- The server (tests/mirror_server.py, sendfile) runs in its own process, as a real
  mirror would, so it does not compete with the downloader for the GIL.
- Two numbers per worker count: `transfer` is fetch() alone (HTTP into .part and
  rename, no verification); `stage` is download_shards() as the stage runs it
  (plus HEAD preflight, parquet verification, character count and sha256 of every
  shard). The gap is what verification costs.
- One discarded warm-up pass, then the best of --repeats (default 2). Other processes share this machine's cores; the load average
  is printed and saved with the numbers. Writes bench/results/download.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanoforge.common import shard_name, write_json
from nanoforge.config import DownloadConfig
from nanoforge.data.download import Sources, download_shards
from nanoforge.data.fetch import fetch

RESULTS = Path("bench/results/download.json")


def make_texts(target_chars: int, seed: int = 0) -> list[str]:
    """Documents of Zipf-distributed pseudo-words: compresses about like real web text."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20000)]
    vocab = np.array(vocab, dtype=object)
    texts, total = [], 0
    while total < target_chars:
        n = int(rng.integers(100, 1200))
        ids = np.minimum(rng.zipf(1.3, size=n) - 1, len(vocab) - 1)
        text = " ".join(vocab[ids]).capitalize() + "."
        texts.append(text)
        total += len(text)
    return texts


def make_shards(folder: Path, count: int, shard_mb: float) -> list[int]:
    texts = make_texts(int(shard_mb * 1e6 * 4.0))  # ~4 characters per compressed byte
    rng = np.random.default_rng(1)
    for index in range(count):
        order = rng.permutation(len(texts))
        table = pa.table({"text": [texts[i] for i in order]})
        pq.write_table(table, folder / shard_name(index), row_group_size=1024, compression="zstd")
    return list(range(count))


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.mirror", "serve", str(folder), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        raise SystemExit(f"the mirror server did not start: {line!r}")
    return proc, line.rsplit(" at ", 1)[1].strip()


def transfer(url: str, indices: list[int], out: Path, workers: int) -> float:
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda i: fetch(f"{url}/{shard_name(i)}", out / shard_name(i)), indices))
    return time.perf_counter() - start


def stage(url: str, indices: list[int], out: Path, workers: int) -> float:
    cfg = DownloadConfig(num_train_shards=1, workers=workers)
    sources = Sources(url, f"{url}/eval_bundle.zip", "bench", "bench")
    start = time.perf_counter()
    download_shards(indices, cfg, sources, directory=out)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mb", type=float, default=25.0, help="approximate size of each shard")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        tmp = Path(tmp)
        mirror = tmp / "mirror"
        mirror.mkdir()
        t0 = time.perf_counter()
        indices = make_shards(mirror, args.shards, args.shard_mb)
        total = sum((mirror / shard_name(i)).stat().st_size for i in indices)
        print(f"generated {len(indices)} shards, {total / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s", flush=True)
        proc, url = serve(mirror)
        rows = []
        try:
            warm = tmp / "warm"  # first pass discarded: page cache, connections, imports
            warm.mkdir()
            transfer(url, indices, warm, max(args.workers))
            shutil.rmtree(warm)
            for workers in args.workers:
                best = {}
                for kind, fn in (("transfer", transfer), ("stage", stage)):
                    times = []
                    for _ in range(args.repeats):
                        out = tmp / "out"
                        shutil.rmtree(out, ignore_errors=True)
                        out.mkdir()
                        times.append(fn(url, indices, out, workers))
                    best[kind] = min(times)
                rows.append({
                    "workers": workers,
                    "transfer_s": round(best["transfer"], 3), "transfer_mb_s": round(total / 1e6 / best["transfer"], 1),
                    "stage_s": round(best["stage"], 3), "stage_mb_s": round(total / 1e6 / best["stage"], 1),
                })
                r = rows[-1]
                print(f"  workers={workers}: transfer {r['transfer_mb_s']:.1f} MB/s, stage {r['stage_mb_s']:.1f} MB/s",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    load = os.getloadavg()
    print(f"\n{len(indices)} shards, {total / 1e6:.1f} MB, {os.cpu_count()} CPUs, load average {load[0]:.2f}")
    print(f"{'workers':>7}  {'transfer MB/s':>13}  {'stage MB/s':>10}  {'stage s':>8}")
    for r in rows:
        print(f"{r['workers']:>7}  {r['transfer_mb_s']:>13.1f}  {r['stage_mb_s']:>10.1f}  {r['stage_s']:>8.2f}")
    write_json(RESULTS, {
        "shards": len(indices), "total_mb": round(total / 1e6, 1), "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in load], "repeats": args.repeats, "rows": rows,
    })
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
