"""Register the trained model in MLflow; make it the champion only when it is better (entry point: stages/register.py).

Notable:
- Logs artifacts/model (weights + config) and artifacts/tokenizer as one MLflow
  pyfunc model whose predict() generates text: prompts in, completions out. It is
  an MLflow "model from code" (this file; no pickle), and the nanoforge package
  travels with it, so
  `mlflow.pyfunc.load_model("models:/nanoforge-base@champion").predict(["The sky"])`
  works anywhere with the dependencies installed. Requirements are pinned from
  this environment instead of inferred (inference loads the model in a subprocess).
- Registers a new version of `pipeline.registered_model` each time the model or its
  scores change (DVC re-runs this stage exactly then), tagged with val BPB and the
  tokens it was measured over (the evaluate stage's figure only, never the training
  loop's), CORE, the git commit, the data hashes and the model's DVC hash
  (`model_md5`, so a check can tell when the champion is the model at hand).
- Moves the `champion` alias only when val BPB (the primary metric; lower is better)
  beats the current champion's; CORE breaks an exact tie. A non-finite val BPB is
  never promoted. The decision and both numbers go into the MLflow run and into
  artifacts/registry/decision.json.
- Needs a working tracking store: without one the stage fails (exit 1) instead of
  writing a decision that registered nothing; `dvc repro` retries it next time.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path
from typing import Any

from nanoforge.common import ARTIFACTS_DIR, EVAL_DIR, MODEL_DIR, TOKENIZER_DIR, TRAIN_DIR, read_json, write_json
from nanoforge.tokenizer.bpe import META_FILE, RANKS_FILE
from nanoforge.tracking import tracking_uri
from nanoforge.training.checkpoint import CONFIG, WEIGHTS

ALIAS = "champion"
REGISTRY_DIR = ARTIFACTS_DIR / "registry"
DECISION_FILE = REGISTRY_DIR / "decision.json"
MODEL_FILES = (WEIGHTS, CONFIG)  # defined where the model is saved: training/checkpoint.py
TOKENIZER_FILES = (RANKS_FILE, META_FILE)
REQUIREMENTS = ("torch", "numpy", "tiktoken", "safetensors", "pyyaml", "pydantic", "pyarrow")


class RegisterError(RuntimeError):
    """Missing inputs, or a registry that cannot be reached."""


NEEDS_MLFLOW = "register needs MLflow (the model registry is MLflow's; every other stage runs untracked without it)"


def require_mlflow() -> None:
    """Refuse before any work when tracking is off or the server does not answer: one line naming the setting."""
    import os

    from nanoforge.tracking import _reachable

    if os.environ.get("NANOFORGE_TRACKING", "on") == "off":
        raise RegisterError(f"{NEEDS_MLFLOW}, but NANOFORGE_TRACKING=off: unset it to register the model")
    uri = tracking_uri()
    if not _reachable(uri):
        raise RegisterError(f"{NEEDS_MLFLOW}, but MLFLOW_TRACKING_URI={uri} does not answer: start that server, "
                            "or unset MLFLOW_TRACKING_URI to use the embedded store (mlflow.db)")


# --- the model as MLflow serves it

try:
    import mlflow.pyfunc as _pyfunc

    _Base = _pyfunc.PythonModel
except Exception:  # pragma: no cover - mlflow is a project dependency
    _Base = object


# MLflow warns at class creation that predict() has no type hints (its own filter
# overrides ours); the signature is logged explicitly, so keep that out of the logs
with contextlib.redirect_stderr(io.StringIO()):

    class TextGenerator(_Base):
        """pyfunc: a list of prompts in, their completions out (greedy by default)."""

        def load_context(self, context) -> None:
            from nanoforge.tokenizer.bpe import load_tokenizer
            from nanoforge.training.checkpoint import load_model

            self.model, self.meta = load_model(context.artifacts["model"], device="cpu")
            self.tokenizer = load_tokenizer(context.artifacts["tokenizer"])

        def predict(self, context, model_input, params=None):  # the signature is logged explicitly
            from nanoforge.model.sampling import generate

            params = params or {}
            if hasattr(model_input, "columns"):  # a DataFrame: the first (or "prompt") column
                column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
                model_input = model_input[column].tolist()
            prompts = [str(p) for p in model_input]
            return generate(self.model, self.tokenizer, prompts, max_tokens=int(params.get("max_tokens", 32)),
                            temperature=float(params.get("temperature", 0.0)), seed=int(params.get("seed", 42)))


# --- the decision

def decide(candidate: dict, champion: dict | None) -> tuple[bool, str]:
    """(promote?, why). Lower val BPB wins; CORE (higher) breaks an exact tie."""
    bpb = candidate.get("val_bpb")
    if bpb is None or not math.isfinite(bpb):
        return False, f"candidate val BPB is {bpb}: never promoted"
    if champion is None:
        return True, "no champion yet"
    best = champion.get("val_bpb")
    if best is None or not math.isfinite(best):
        return True, f"champion v{champion.get('version')} has no finite val BPB"
    tokens, theirs = candidate.get("val_bpb_tokens"), champion.get("val_bpb_tokens")
    if tokens is not None and theirs is not None and float(tokens) != float(theirs):
        # not the same measurement: say so rather than pretend the numbers compare
        bpb_note = f" (over {int(float(tokens)):,} tokens vs the champion's {int(float(theirs)):,})"
    else:
        bpb_note = ""
    if bpb < best:
        return True, f"val BPB {bpb:.4f} < champion v{champion['version']}'s {best:.4f}{bpb_note}"
    if bpb == best and (candidate.get("core") or -math.inf) > (champion.get("core") or -math.inf):
        return True, f"val BPB ties champion v{champion['version']} ({bpb:.4f}); CORE {candidate.get('core')} > {champion.get('core')}"
    return False, f"val BPB {bpb:.4f} does not beat champion v{champion['version']}'s {best:.4f}{bpb_note}"


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def champion(client, name: str) -> dict | None:
    """The current champion's version and scores, or None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None
    tags = mv.tags or {}
    found = {"version": int(mv.version), "run_id": mv.run_id, "val_bpb": _float(tags.get("val_bpb")),
             "val_bpb_tokens": _float(tags.get("val_bpb_tokens")), "core": _float(tags.get("core")),
             "model_md5": tags.get("model_md5")}
    if found["val_bpb"] is None and mv.run_id:  # a version registered by hand: read its run
        metrics = client.get_run(mv.run_id).data.metrics
        found["val_bpb"] = metrics.get("candidate_val_bpb", metrics.get("val_bpb"))
        found["core"] = found["core"] if found["core"] is not None else metrics.get("core")
    return found


def champion_scores(name: str, uri: str | None = None) -> dict | None:
    """For checks outside this stage (the orchestrator's val BPB vs champion check)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow.tracking import MlflowClient
    return champion(MlflowClient(tracking_uri=uri or tracking_uri()), name)


# --- the stage

def check_inputs() -> dict:
    for directory, names in ((MODEL_DIR, MODEL_FILES), (TOKENIZER_DIR, TOKENIZER_FILES)):
        for name in names:
            if not (directory / name).exists():
                raise RegisterError(f"{directory / name}: missing; run the pipeline up to evaluate first (dvc repro evaluate)")
    metrics_file = EVAL_DIR / "metrics.json"
    if not metrics_file.exists():
        raise RegisterError(f"{metrics_file}: missing; evaluate the model first (dvc repro evaluate)")
    scores = read_json(metrics_file)
    if "val_bpb" not in scores:
        raise RegisterError(f"{metrics_file}: has no val_bpb; re-run evaluate (dvc repro -f evaluate)")
    train = read_json(TRAIN_DIR / "metrics.json") if (TRAIN_DIR / "metrics.json").exists() else {}
    return {"val_bpb": _float(scores.get("val_bpb")), "val_bpb_tokens": scores.get("val_bpb_tokens"),
            "core": _float(scores.get("core")), "num_params": train.get("num_params"),
            "tokens_trained": train.get("tokens_trained")}


def model_md5(root: str | Path = ".") -> str | None:
    """The DVC hash of artifacts/model in dvc.lock (the train stage's output), or None before `dvc repro`."""
    import yaml

    try:
        lock = yaml.safe_load((Path(root) / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    for out in ((lock.get("stages") or {}).get("train") or {}).get("outs") or []:
        if str(out.get("path", "")).rstrip("/") == str(MODEL_DIR):
            return out.get("md5") or out.get("hash")
    return None


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def log_and_register(run, name: str, candidate: dict) -> tuple[str, Any]:
    """Log the pyfunc model into `run` and register it; returns (model uri, model version)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow

    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri())
    # prompts in, completions out; generation knobs as inference-time params
    signature = infer_signature(["The capital of France is"], ["Paris"],
                                params={"max_tokens": 32, "temperature": 0.0, "seed": 42})
    package_dir = Path(__file__).resolve().parent
    with mlflow.start_run(run_id=run.run_id):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).resolve()),  # models from code: no pickle
                artifacts={"model": str(MODEL_DIR.resolve()), "tokenizer": str(TOKENIZER_DIR.resolve())},
                code_paths=[str(package_dir)],
                pip_requirements=_requirements(),
                signature=signature,
            )
        tags = {k: str(v) for k, v in candidate.items() if v is not None}
        logged = run_tags(run)
        tags.update({k: v for k, v in logged.items() if k in ("git_commit", "dvc.data_dvc_md5", "dvc.lock_sha256")})
        if logged.get(f"input.{MODEL_DIR}"):  # the model's DVC hash, as the register run recorded its input
            tags["model_md5"] = logged[f"input.{MODEL_DIR}"]
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
    return info.model_uri, mv


def run_tags(run) -> dict:
    try:
        return dict(run._client.get_run(run.run_id).data.tags)
    except Exception:
        return {}


def register_and_decide(run, name: str, candidate: dict) -> dict:
    """Register the candidate as a new version of `name`, move the alias when it wins; the decision, also on disk."""
    before = champion(run._client, name)
    promote, reason = decide(candidate, before)
    model_uri, mv = log_and_register(run, name, candidate)
    if promote:
        run._client.set_registered_model_alias(name, ALIAS, mv.version)
    decision = {
        "decision": "promoted" if promote else "kept",
        "reason": reason,
        "registered_model": name,
        "version": int(mv.version),
        "model_uri": model_uri,
        "candidate": candidate,
        "champion_before": before,
        "champion_after": int(mv.version) if promote else (before or {}).get("version"),
        "mlflow_run_id": run.run_id,
    }
    run.set_tags({"decision": decision["decision"], "decision_reason": reason, "model_version": mv.version,
                  "champion_version": decision["champion_after"] or ""})
    run.log_metrics({k: v for k, v in {
        "candidate_val_bpb": candidate["val_bpb"], "candidate_core": candidate["core"],
        "champion_val_bpb": (before or {}).get("val_bpb"), "champion_core": (before or {}).get("core"),
        "promoted": float(promote)}.items() if v is not None and math.isfinite(v)})
    write_json(DECISION_FILE, decision)
    run.log_artifact(DECISION_FILE)
    return decision


if _Base is not object:  # MLflow loads this file as the model's code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        __import__("mlflow.models", fromlist=["set_model"]).set_model(TextGenerator())
