"""The Dagster definitions, one kind per file; `pipelines/definitions.py` loads every module here.

- assets.py     one asset per dvc.yaml stage (`dvc repro --single-item <stage>` through Pipes)
- data.py       `fineweb_shards` (partitioned) and `download` (data/, versioned by data.dvc)
- remote.py     `dvc_remote` (`dvc push`)
- checks.py     the asset checks, beside the assets they guard
- jobs.py       `pipeline`, `retrain` (nightly, then push), `eval_and_report`
- schedules.py  `nightly_retrain`
- sensors.py    `pipeline_inputs_changed` (params a stage reads, data.dvc), `alert_on_failure`
- resources.py  `dvc` (the executor, through Pipes) and `mlflow` (the parent run of a Dagster run)
- step.py, metadata.py  what every asset's step does around its command, and what it shows

A module with `defs(project) -> dg.Definitions` contributes to the code location.
"""
