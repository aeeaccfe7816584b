"""Report a stage's results to an orchestrator, when one is listening.

Stages never import Dagster. Under a Dagster Pipes subprocess (the asset runs
`dvc repro -s <stage>`, DVC runs the stage, the environment passes through) the
stage sends its headline numbers as materialization metadata through the small
`dagster-pipes` package. Without Pipes, and on ranks other than 0, this does
nothing, so every stage stays runnable by hand, by DVC or by torchrun.
"""

from __future__ import annotations

import os
from typing import Any

from nanoforge.common import get_logger, is_rank0

PIPES_ENV = "DAGSTER_PIPES_CONTEXT"  # dagster_pipes 1.13 has no is_dagster_pipes_process()


def under_pipes() -> bool:
    return PIPES_ENV in os.environ and is_rank0()


def _plain(value: Any) -> Any:
    # Pipes metadata must be JSON: numpy/torch scalars and paths become plain values
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict) and set(value) >= {"raw_value", "type"}:
        return value  # already a typed Pipes metadata value, e.g. {"raw_value": md, "type": "md"}
    return str(value)


def report(metadata: dict[str, Any]) -> bool:
    """Send `metadata` as the asset's materialization metadata. True if sent."""
    if not under_pipes():
        return False
    try:
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            pipes.report_asset_materialization(metadata={k: _plain(v) for k, v in metadata.items()})
        return True
    except Exception as exc:  # the orchestrator is a viewer; the stage's outputs are what matter
        get_logger("pipes").warning("could not report to Dagster Pipes: %s: %s", type(exc).__name__, exc)
        return False


def markdown(text: str) -> dict[str, str]:
    return {"raw_value": text, "type": "md"}
