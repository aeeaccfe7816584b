"""A local mirror of the download stage's sources, and a server for it: demos without the internet.

    python3 -m bench.mirror build [DIR]                # default /tmp/nanoforge-mirror (any python 3)
    .venv/bin/python -m bench.mirror build --generated # generated data needs the project env (pyarrow)
    python3 -m bench.mirror serve [DIR] [--port 8765]  # http://127.0.0.1:8765, Ctrl-C to stop
    NANOFORGE_MIRROR=http://127.0.0.1:8765 make demo   # (another shell) the demo downloads from it
    NANOFORGE_MIRROR=/tmp/nanoforge-mirror make demo   # or no HTTP at all: a folder mirror works too

Notable:
- The mirror has the official layout, so the download stage cannot tell it from
  Hugging Face + S3: shard_00000.parquet and shard_00001.parquet (train),
  shard_01822.parquet (the pinned val shard) and eval_bundle.zip, whose entries
  sit under a top-level eval_bundle/ folder like the real zip's.
- Built from the real-format samples in ../shared/data (fineweb_sample's three
  shards, the third one becoming shard 1822; the eval_bundle folder). Their
  PROVENANCE.md files travel along (attribution is required). Without that folder,
  `build --generated` makes the same layout from tests/datagen.py's generated text.
- The server is tests/mirror_server.py's (Range support, sendfile), faults off.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DIR = Path(tempfile.gettempdir()) / "nanoforge-mirror"
VAL_SHARD = 1822


def _zip_bundle(bundle: Path, archive: Path) -> None:
    """eval_bundle.zip with every entry under eval_bundle/, as the official zip has it."""
    tmp = archive.with_name(archive.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                zf.write(path, Path("eval_bundle") / path.relative_to(bundle))
    tmp.replace(archive)


def build_mirror(out: str | Path = DEFAULT_DIR, fineweb: str | Path = SHARED / "fineweb_sample",
                 bundle: str | Path = SHARED / "eval_bundle", generated: bool = False) -> Path:
    """Write the mirror into `out` (replacing what is there) and return it."""
    out, fineweb, bundle = Path(out), Path(fineweb), Path(bundle)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard_*.parquet"):
        old.unlink()
    if generated:
        try:  # generated shards need pyarrow: the project environment, not the system python
            from tests.datagen import make_eval_bundle, make_fineweb
        except ImportError as exc:
            raise SystemExit(f"build --generated needs the project environment ({exc.name} is missing here): "
                             "run `make setup`, then `.venv/bin/python -m bench.mirror build --generated`")

        make_fineweb(out, train=(0, 1), val=VAL_SHARD, docs_per_shard=2000, row_group_size=1024, manifest=False)
        with tempfile.TemporaryDirectory() as tmp:
            _zip_bundle(make_eval_bundle(Path(tmp) / "eval_bundle", items_per_task=50), out / "eval_bundle.zip")
        return out
    samples = sorted(fineweb.glob("shard_*.parquet"))
    if len(samples) < 3 or not (bundle / "core.yaml").exists():
        raise SystemExit(
            f"need 3 sample shards in {fineweb} and a bundle in {bundle}; "
            "pass --fineweb/--bundle, or --generated for generated data"
        )
    for index, src in zip((0, 1, VAL_SHARD), samples[:3]):
        shutil.copyfile(src, out / f"shard_{index:05d}.parquet")
    if (fineweb / "PROVENANCE.md").exists():
        shutil.copyfile(fineweb / "PROVENANCE.md", out / "PROVENANCE_fineweb_sample.md")
    _zip_bundle(bundle, out / "eval_bundle.zip")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mirror", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the mirror folder")
    b.add_argument("dir", nargs="?", default=str(DEFAULT_DIR))
    b.add_argument("--fineweb", default=str(SHARED / "fineweb_sample"), help="folder of 3+ sample shards")
    b.add_argument("--bundle", default=str(SHARED / "eval_bundle"), help="an eval bundle folder")
    b.add_argument("--generated", action="store_true", help="generated text instead of the samples")
    s = sub.add_parser("serve", help="serve a mirror folder on 127.0.0.1 (builds it first if empty)")
    s.add_argument("dir", nargs="?", default=str(DEFAULT_DIR))
    s.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    args = parser.parse_args(argv)

    if args.command == "build":
        out = build_mirror(args.dir, args.fineweb, args.bundle, args.generated)
        for path in sorted(out.iterdir()):
            print(f"  {path.name:32s} {path.stat().st_size:>12,} bytes")
        print(f"mirror ready: NANOFORGE_MIRROR={out} make demo   (or serve it: python -m bench.mirror serve {out})")
        return 0

    from tests.mirror_server import MirrorServer

    folder = Path(args.dir)
    if not any(folder.glob("shard_*.parquet")):
        build_mirror(folder)
    server = MirrorServer(folder, port=args.port).start()
    print(f"serving {folder} at {server.url}", flush=True)  # bench/download.py reads this line
    print(f"point the pipeline at it: NANOFORGE_MIRROR={server.url} make demo   (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
