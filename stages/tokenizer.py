"""The tokenizer stage: a byte-level BPE trained on the training shards, saved to artifacts/tokenizer, evaluated.

    python -m stages.tokenizer                        # params.yaml's tokenizer section
    python -m stages.tokenizer --set vocab_size=8192  # a one-off change

The work is in nanoforge/tokenizer/: training.py (input checks, streaming, evaluation, staging),
bpe.py (the tokenizer itself, its files and their checks), texts.py (the fixed evaluation texts).
"""

from __future__ import annotations

import sys

from nanoforge import pipes
from nanoforge.common import TOKENIZER_DIR, get_logger
from nanoforge.config import ConfigError, resolve, stage_parser
from nanoforge.data.shards import ShardError, expect_dataset
from nanoforge.tokenizer.bpe import TokenizerError
from nanoforge.tokenizer.training import check_inputs, run_stage, show_rustbpe_progress
from nanoforge.tracking import stage_run

log = get_logger("tokenizer")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("tokenizer", __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    try:  # plan: the manifest, the shards' footers, the vocab size, all before training
        params = resolve("tokenizer", args)
        cfg = params.tokenizer
        inputs = check_inputs(cfg)
        expect_dataset(params.download.dataset)  # params switched datasets but data/ was not downloaded again
    except (ConfigError, ShardError, TokenizerError) as exc:
        pipes.error(exc)  # prints `error: ...` and gives Dagster the failure's message
        return 2
    for warning in inputs.warnings:
        log.warning(warning)
    show_rustbpe_progress()
    try:
        with stage_run("tokenizer", cfg.model_dump(mode="json")) as run:
            metrics, table = run_stage(cfg, inputs, run)
    except ShardError as exc:  # the run is already marked FAILED in MLflow
        pipes.error(exc)  # prints `error: ...` and gives Dagster the failure's message
        return 2

    pipes.report({
        "vocab_size": metrics["vocab_size"],
        "val_bytes_per_token": metrics["val_bytes_per_token"],
        "train_seconds": metrics["train_seconds"],
        "train_chars": metrics["train_chars"],
        "roundtrip_ok": metrics["roundtrip_ok"],
        "compression": pipes.markdown(table),
        "warnings": len(metrics["warnings"]),
        "mlflow_run_id": metrics["mlflow_run_id"],
    })
    log.info("wrote %s (vocab %s, val %.3f bytes/token)", TOKENIZER_DIR, f"{metrics['vocab_size']:,}",
             metrics["val_bytes_per_token"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
