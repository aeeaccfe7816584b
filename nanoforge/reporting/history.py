"""Earlier runs from MLflow, for the report's comparison: the last N train runs and the champion.

Notable:
- A "run" to compare is a train run (stage tag `train`, FINISHED) of experiment
  `nanoforge`. Its headline numbers come from the train run's own metrics and
  params, then from the evaluate run of that model (tag `model.train_run_id`, else
  the same parent run), then from the report run that summarised it (tag
  `train_run_id`), later sources winning. So CORE and the evaluate stage's official
  val BPB appear even though training logged neither. The train run's own `val_bpb`
  (the loop's estimate over train.eval_tokens) is dropped: compared figures are the
  evaluate stage's only, n/a for a run that was never evaluated.
- The champion is the model version behind the registry alias (`nanoforge-base@champion`);
  its numbers come from the run that logged the model and that run's siblings.
- Loss curves are the per-step `loss` metric history of each train run.
- A handful of queries in all, not one per metric. MLflow missing or unreachable
  gives a note for the report, never an exception.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone

from nanoforge.tracking import EXPERIMENT, tracking_uri

# the numbers a reader compares, and which direction is better
HEADLINE = [
    # key, label, better ("lower" | "higher" | None)
    ("val_bpb", "val BPB", "lower"),
    ("core", "CORE", "higher"),
    ("final_loss", "final loss (EMA)", "lower"),
    ("tok_per_sec", "tok/s", "higher"),
    ("mfu", "MFU", "higher"),
    ("train_seconds", "train time", None),
    ("num_params", "params", None),
    ("tokens_trained", "tokens", None),
]
# metrics the evaluate stage owns: its numbers win over the train loop's estimates
_EVAL_KEYS = ("val_bpb", "core", "train_bpb")
_SEARCH_LIMIT = 500


@dataclass
class PastRun:
    label: str
    run_id: str
    start_time: datetime | None
    metrics: dict[str, float] = field(default_factory=dict)
    loss_steps: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)


@dataclass
class History:
    previous: list[PastRun] = field(default_factory=list)
    champion: PastRun | None = None
    champion_version: str | None = None
    champion_is_current: bool = False  # the champion is the run this report describes (a first run)
    notes: list[str] = field(default_factory=list)


def _client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=tracking_uri())


def _when(run) -> datetime | None:
    ms = run.info.start_time
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None


def _label(run, prefix: str = "") -> str:
    when = _when(run)
    stamp = when.strftime("%Y-%m-%d %H:%M") if when else "?"
    return f"{prefix}{stamp} · {run.info.run_id[:8]}"


def _search(client, exp_id: str, stage: str, extra: str = "", limit: int = _SEARCH_LIMIT) -> list:
    query = f"tags.stage = '{stage}' and attributes.status = 'FINISHED'" + (f" and {extra}" if extra else "")
    return list(client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=limit))


def _train_metrics(run) -> dict[str, float]:
    """The train run's last values, with the headline numbers it logs under other names derived."""
    metrics = dict(run.data.metrics)
    for key in ("val_bpb", "min_val_bpb", "val_bpb_tokens"):  # the loop's estimate, over other tokens
        metrics.pop(key, None)
    params = run.data.params

    def param(name: str) -> float | None:
        try:
            return float(params[name])
        except (KeyError, TypeError, ValueError):
            return None

    if "final_loss" not in metrics and "loss_ema" in metrics:
        metrics["final_loss"] = metrics["loss_ema"]
    if "num_params" not in metrics and param("derived.num_params") is not None:
        metrics["num_params"] = param("derived.num_params")
    if "tokens_trained" not in metrics and "flops" in metrics and param("derived.flops_per_token"):
        metrics["tokens_trained"] = metrics["flops"] / param("derived.flops_per_token")
    return metrics


class _Index:
    """Evaluate and report runs, indexed by the train run they describe and by pipeline run (parent)."""

    def __init__(self, client, exp_id: str):
        self.eval_by_train: dict[str, dict] = {}
        self.eval_by_parent: dict[str, dict] = {}
        self.report_by_train: dict[str, dict] = {}
        # newest first: keep the first (latest) run per key
        for run in _search(client, exp_id, "evaluate"):
            train_id = run.data.tags.get("model.train_run_id")
            if train_id:
                self.eval_by_train.setdefault(train_id, dict(run.data.metrics))
            parent = run.data.tags.get("mlflow.parentRunId")
            if parent:
                self.eval_by_parent.setdefault(parent, dict(run.data.metrics))
        for run in _search(client, exp_id, "report"):
            train_id = run.data.tags.get("train_run_id")
            if train_id:
                self.report_by_train.setdefault(train_id, dict(run.data.metrics))
        self._client, self._exp_id = client, exp_id

    def metrics_for_train(self, run) -> dict[str, float]:
        metrics = _train_metrics(run)
        parent = run.data.tags.get("mlflow.parentRunId")
        evaluated = self.eval_by_train.get(run.info.run_id) or (self.eval_by_parent.get(parent, {}) if parent else {})
        metrics.update({k: v for k, v in evaluated.items() if k in _EVAL_KEYS})
        metrics.update(self.report_by_train.get(run.info.run_id, {}))
        return metrics

    def train_sibling(self, run):
        """The train run of the pipeline run that `run` belongs to (itself when it is one)."""
        if run.data.tags.get("stage") == "train":
            return run
        train_id = run.data.tags.get("train_run_id") or run.data.tags.get("model.train_run_id")
        if train_id:
            try:
                return self._client.get_run(train_id)
            except Exception:
                return None
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            found = _search(self._client, self._exp_id, "train", f"tags.`mlflow.parentRunId` = '{parent}'", 1)
            return found[0] if found else None
        return None


def _loss_history(client, run_id: str) -> tuple[list[float], list[float]]:
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    return [float(m.step) for m in history], [float(m.value) for m in history]


def load_history(current_train_run_id: str | None, compare_runs: int, champion: str) -> History:
    """The last `compare_runs` train runs before this one, and the `name@alias` champion."""
    out = History()
    try:
        client = _client()
        exp = client.get_experiment_by_name(EXPERIMENT)
    except Exception as exc:
        out.notes.append(f"MLflow at `{tracking_uri()}` could not be read ({type(exc).__name__}: {exc}).")
        return out
    if exp is None:
        out.notes.append(f"MLflow has no `{EXPERIMENT}` experiment yet: nothing to compare with.")
        return out
    try:
        index = _Index(client, exp.experiment_id)
        if compare_runs > 0:
            for run in _search(client, exp.experiment_id, "train", limit=compare_runs + 1):
                if run.info.run_id == current_train_run_id or len(out.previous) == compare_runs:
                    continue
                past = PastRun(_label(run), run.info.run_id, _when(run), index.metrics_for_train(run))
                past.loss_steps, past.loss = _loss_history(client, run.info.run_id)
                out.previous.append(past)
        _load_champion(client, index, champion, current_train_run_id, out)
    except Exception as exc:  # a half-migrated store, a server hiccup: the report goes on
        out.notes.append(f"MLflow query failed ({type(exc).__name__}: {exc}); the comparison is incomplete.")
    return out


def _load_champion(client, index: _Index, champion: str, current_train_run_id: str | None, out: History) -> None:
    name, _, alias = champion.partition("@")
    try:
        version = client.get_model_version_by_alias(name, alias)
    except Exception:  # no registered model, or no alias yet: normal before the first promotion
        out.notes.append(f"No registered champion (`{champion}`) yet.")
        return
    run = client.get_run(version.run_id) if version.run_id else None
    if run is None:
        out.notes.append(f"`{champion}` (version {version.version}) has no source run to compare with.")
        return
    train = index.train_sibling(run)
    metrics = index.metrics_for_train(train) if train is not None else {}
    for key, _, _ in HEADLINE:  # the model's own run fills gaps; evaluate's numbers stay the official ones
        if key not in metrics and key in run.data.metrics and key not in _EVAL_KEYS:
            metrics[key] = run.data.metrics[key]
    for key in ("val_bpb", "core"):  # registered with the evaluate stage's scores (registry.py)
        if key not in metrics and (version.tags or {}).get(key) not in (None, ""):
            try:
                metrics[key] = float(version.tags[key])
            except ValueError:
                pass
    this = " (this run)" if train is not None and train.info.run_id == current_train_run_id else ""
    past = PastRun(f"champion v{version.version}{this} · {_label(train or run)}", (train or run).info.run_id,
                   _when(train or run), metrics)
    if train is not None:
        past.loss_steps, past.loss = _loss_history(client, train.info.run_id)
    out.champion, out.champion_version = past, str(version.version)
    out.champion_is_current = bool(this)


def train_run_params(run_id: str | None) -> dict[str, str]:
    """The params a train run logged: its resolved config exactly as it ran. {} when unavailable."""
    if not run_id:
        return {}
    try:
        return dict(_client().get_run(run_id).data.params)
    except Exception:
        return {}
