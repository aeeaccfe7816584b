"""The register stage: artifacts/model as a new MLflow model version, promoted to champion only when better.

    python -m stages.register                 # dvc.yaml stage `register`, after evaluate

The work is in nanoforge/registry.py: the pyfunc model MLflow serves, the promotion rule, the registration.
"""

from __future__ import annotations

import sys

from nanoforge import pipes
from nanoforge.common import get_logger
from nanoforge.config import ConfigError, load_params, stage_parser
from nanoforge.registry import NEEDS_MLFLOW, RegisterError, check_inputs, register_and_decide, require_mlflow
from nanoforge.tracking import stage_run, tracking_uri

log = get_logger("register")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("register", __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    try:
        # this stage reads the `pipeline` section (its registered_model), like the orchestrator
        cfg = load_params(args.params, args.overrides, section="pipeline").pipeline
        print("[register] resolved config:\n  registered_model: " + cfg.registered_model, flush=True)
        candidate = check_inputs()
        require_mlflow()  # a registry is MLflow's: no MLflow, no registration (tracking elsewhere is only a warning)
    except (ConfigError, RegisterError) as exc:
        pipes.error(exc)  # prints `error: ...` and gives Dagster the failure's message
        return 2
    name = cfg.registered_model
    try:
        with stage_run("register", {"registered_model": name}) as run:
            if not run.enabled:
                raise RegisterError(f"{NEEDS_MLFLOW}, but MLflow at {tracking_uri()} failed to start a run (the warning "
                                    "above says why): fix it, or point MLFLOW_TRACKING_URI at a server that works")
            decision = register_and_decide(run, name, candidate)
    except RegisterError as exc:
        pipes.error(exc)  # prints `error: ...` and gives Dagster the failure's message
        return 1
    champ = decision["champion_before"] or {}
    log.info("%s v%s of %s: %s", decision["decision"], decision["version"], name, decision["reason"])
    report = {
        "decision": decision["decision"], "reason": decision["reason"], "model_version": decision["version"],
        "candidate_val_bpb": candidate["val_bpb"], "champion_val_bpb": champ.get("val_bpb"),
        "champion_version_before": champ.get("version"), "model_uri": decision["model_uri"],
        "mlflow_run_id": run.run_id,
    }
    pipes.report({k: v for k, v in report.items() if v is not None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
