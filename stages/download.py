"""The download stage: the pretraining shards (download.dataset) and the CORE eval bundle into data/, versioned by data.dvc.

    python -m stages.download                              # params.yaml's download section
    python -m stages.download --set num_train_shards=8     # a one-off change
    python -m stages.download --only-shards 0-3,1822 --no-dvc-add   # a subset (orchestrator partitions)
    NANOFORGE_MIRROR=http://127.0.0.1:8765 python -m stages.download   # a mirror: URL or folder

The work is in nanoforge/data/: download.py (sources, shards, manifest, `dvc add`), fetch.py
(retries, Range resume, verify-then-rename), eval_bundle.py (safe unpacking), shards.py (validation).
"""

from __future__ import annotations

import sys

from nanoforge import pipes
from nanoforge.common import MANIFEST_FILE
from nanoforge.config import ConfigError, parse_override, resolve, stage_parser
from nanoforge.data.download import (
    DownloadError, check_folder_dataset, check_sources, configured_indices, parse_indices, resolve_sources, run_download,
    unpack_limits,
)
from nanoforge.data.eval_bundle import BundleError
from nanoforge.data.fetch import FetchError
from nanoforge.data.shards import ShardError
from nanoforge.tracking import stage_run

REPORTED = ("shards", "rows", "chars", "bytes", "seconds", "downloaded_shards", "mb_per_s")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("download", __doc__.split("\n\n")[0])
    parser.add_argument("--only-shards", metavar="LIST",
                        help="fetch just these shards, e.g. 0,3,1822 or 0-7 (no bundle, manifest or dvc add)")
    parser.add_argument("--no-dvc-add", action="store_true", help="don't run `dvc add data` at the end")
    args = parser.parse_args(argv)
    try:  # plan: every check that can fail before a byte moves
        cfg = resolve("download", args).download
        only = parse_indices(args.only_shards, cfg.spec.last) if args.only_shards is not None else None
        overridden = {parse_override(o, "download")[0].split(".", 1)[1] for o in args.overrides}
        sources = resolve_sources(cfg, overridden)
        print(f"[download] {sources.describe()}", flush=True)
        check_folder_dataset(cfg)  # data/fineweb holds another dataset's shards: refuse to mix them
        check_sources(sources, only if only is not None else configured_indices(cfg), bundle=only is None)
        unpack_limits(cfg)  # a bad NANOFORGE_BUNDLE_MAX_* fails here, not after the shards
    except (ConfigError, DownloadError, BundleError, ShardError) as exc:
        pipes.error(exc)  # prints `error: ...` and gives Dagster the failure's message
        return 2

    logged = {**cfg.model_dump(mode="json"), "shards_source": sources.shards, "bundle_source": sources.bundle}
    tags = {"only_shards": args.only_shards} if only is not None else {}
    try:
        with stage_run("download", logged, tags=tags) as run:
            summary = run_download(cfg, sources, only, run_dvc=not args.no_dvc_add)
            final = summary.pop("final")
            run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            if final is not None and run.enabled:  # (set_tags imports mlflow even when tracking is off)
                run.log_artifact(MANIFEST_FILE)
                run.set_tags({"data_dvc": final["dvc"]["status"], "data_dvc_changed": final["dvc"]["changed"],
                              "data_dvc_md5": final["dvc"]["md5"] or ""})
    except (DownloadError, FetchError, BundleError, ShardError) as exc:
        pipes.error(exc)  # prints `error: ...` and gives Dagster the failure's message
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished files are kept and partial ones resume on the next run", file=sys.stderr)
        return 130

    pipes.report({k: summary[k] for k in REPORTED} | {"mlflow_run_id": run.run_id})
    what = "shards" if only is not None else "shards + eval bundle"
    print(f"[download] {summary['shards']} {what}: {summary['rows']:,} rows, {summary['chars']:,} characters, "
          f"{summary['bytes'] / 1e6:,.1f} MB; fetched {summary['downloaded_shards']} shards "
          f"({summary['downloaded_bytes'] / 1e6:,.1f} MB, {summary['mb_per_s']:.1f} MB/s) in {summary['seconds']:.1f}s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
