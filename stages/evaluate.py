"""The evaluate stage: val/train bits per byte, DCLM CORE and samples of artifacts/model, into artifacts/eval.

    python -m stages.evaluate                                   # params.yaml's evaluate section
    torchrun --standalone --nproc_per_node=2 -m stages.evaluate # BPB rows and CORE items split over ranks

The work is in nanoforge/evaluation/: evaluate.py (input checks, the run, the outputs), bpb.py
(bits per byte), core.py (the CORE bundle and its scoring).
"""

from __future__ import annotations

import sys

from nanoforge import pipes
from nanoforge.common import EVAL_DIR, get_logger, is_rank0
from nanoforge.config import ConfigError, resolve, stage_parser
from nanoforge.data.shards import ShardError
from nanoforge.evaluation.core import BundleError
from nanoforge.evaluation.evaluate import (
    OUTPUT_FILES, check_inputs, markdown_table, mlflow_metrics, run_evaluation, task_table, write_outputs,
)
from nanoforge.tokenizer.bpe import TokenizerError
from nanoforge.training.checkpoint import CheckpointError
from nanoforge.tracking import stage_run


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("evaluate", __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    log = get_logger("evaluate")
    try:  # plan: params, model files, tokenizer, manifest and the whole bundle, before the model loads
        params = resolve("evaluate", args, quiet=not is_rank0())
        cfg = params.evaluate
        inputs = check_inputs(cfg, log, params.download.dataset)
    except (ConfigError, BundleError, ShardError, TokenizerError, CheckpointError, FileNotFoundError) as exc:
        pipes.error(exc)  # prints `error: ...` and gives Dagster the failure's message
        return 2

    from nanoforge.runtime import ProbeShape, init_runtime, shutdown

    probe = ProbeShape.of(inputs["model_meta"]["model"], cfg.device_batch_size, train=False)  # dtype auto's probe
    runtime = init_runtime(cfg.device, cfg.dtype, cfg.collective_timeout_s, "evaluate.collective_timeout_s", probe, log)
    try:
        tags = {"world_size": runtime.world_size, "device": str(runtime.device)}
        with stage_run("evaluate", cfg.model_dump(mode="json"), tags=tags) as run:
            out = run_evaluation(cfg, inputs, runtime, log)
            if runtime.is_main:
                train_run = out["model_train"].get("mlflow_run_id")
                if train_run:
                    run.set_tags({"model.train_run_id": train_run})
                metrics = write_outputs(out, inputs, runtime, run.run_id)
                run.log_metrics(mlflow_metrics(metrics))
                for name in OUTPUT_FILES:
                    run.log_artifact(EVAL_DIR / name, "eval")
        if runtime.is_main:
            pipes.report({
                "val_bpb": metrics["val_bpb"],
                "train_bpb": metrics["train_bpb"],
                "core": metrics["core"],
                "tasks_table": pipes.markdown(markdown_table(task_table(out["results"]), metrics["core"])),
                "eval_seconds": metrics["eval_seconds"],
                "mlflow_run_id": run.run_id,
            })
            log.info("val_bpb %.4f  train_bpb %.4f  CORE %.4f  -> %s", metrics["val_bpb"], metrics["train_bpb"],
                     metrics["core"], EVAL_DIR / "metrics.json")
    finally:
        shutdown(runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
