"""Run every benchmark in turn: `python -m bench` (or `make bench`).

Each one prints its table and writes bench/results/<name>.json. They measure
speed on this machine, so run them on a quiet one. `bench.mirror` is a tool
(a local mirror for offline demos), not a benchmark, and is not run here.

    python -m bench                 # all of them
    python -m bench train core      # some of them
"""

import subprocess
import sys

BENCHMARKS = ["download", "tokenizer", "train", "core", "orchestration", "oversubscribed"]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== bench.{name} ===", flush=True)
        if subprocess.run([sys.executable, "-m", f"bench.{name}"]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
