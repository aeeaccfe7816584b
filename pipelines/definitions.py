"""The one Dagster entry point (pyproject's [tool.dagster] module_name, workspace.yaml): loads `defs/`.

Notable:
- Every module in pipelines/defs/ with a `defs(project)` function contributes its
  definitions (assets, checks, jobs, schedules, sensors, resources: one kind per
  file); they are merged here. A new file there joins with no change here.
- Everything is built from the project's dvc.yaml and params.yaml at load time
  (`build_definitions(root)`; tests build it for throwaway projects), so a change to
  either shows after "Reload definitions". Dagster's own `load_from_defs_folder`
  cannot pass that root to the files it loads, hence this small loader.
- The project root is this package's parent (the repo root, which `dagster dev` and
  workspace.yaml also use as working directory), or $NANOFORGE_ROOT.
- MLflow: the stages' default store (sqlite:///<root>/mlflow.db) unless
  MLFLOW_TRACKING_URI says otherwise; set here for every process of the location
  (runs, sensors) so they all agree with the stages.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import dagster as dg

import pipelines.defs
from pipelines.project import load_project


ROOT = Path(os.environ.get("NANOFORGE_ROOT") or Path(__file__).resolve().parents[1])


def defs_modules() -> list:
    """The modules of pipelines/defs/ that contribute definitions, in name order."""
    found = []
    for info in sorted(pkgutil.iter_modules(pipelines.defs.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{pipelines.defs.__name__}.{info.name}")
        if callable(getattr(module, "defs", None)):
            found.append(module)
    return found


def build_definitions(root: str | Path = ROOT) -> dg.Definitions:
    project = load_project(root)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{project.root / 'mlflow.db'}")
    return dg.Definitions.merge(*(module.defs(project) for module in defs_modules()))


defs = build_definitions()
