"""The project the Dagster definitions are built from: dvc.yaml, the .dvc files and params.yaml, read once.

Plain Python (no Dagster import), like dvc_graph.py beside it.

Notable:
- Asset names are stage names made safe for Dagster keys; `data.dvc` is the
  `download` asset (the download stage writes it), other `.dvc` files are external
  `dvc_<name>` assets, and the pipeline ends in `dvc_remote`.
- Only the `pipeline:` and `download:` sections of params.yaml are validated here:
  a typo in train's section is the train stage's error, not the UI's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from nanoforge.config import ConfigError, DownloadConfig, Params, PipelineConfig, _format_errors, parse_yaml
from pipelines import dvc_graph
from pipelines.dvc_graph import Import, Stage

DOWNLOAD, SHARDS, REMOTE = "download", "fineweb_shards", "dvc_remote"
DATA_IMPORT = Import("data.dvc", "data")  # written by the download stage, not by dvc.yaml


@dataclass
class Project:
    """Everything the definitions are built from, read once at load time."""

    root: Path
    stages: list[Stage]
    imports: list[Import]
    graph: dict[str, list[str]]  # stage -> upstream stages / .dvc files
    pipeline: PipelineConfig
    download: DownloadConfig
    order: list[str] = field(default_factory=list)  # every pipeline asset's name, upstream first

    @property
    def stage_assets(self) -> list[str]:
        return [asset_name(s.name) for s in self.stages]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


def asset_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", stage)


def upstream_asset(name: str, imports: list[Import]) -> str:
    """The asset of an upstream stage or `.dvc` file."""
    if name == DATA_IMPORT.dvc_file:
        return DOWNLOAD
    if any(i.dvc_file == name for i in imports):
        return asset_name("dvc_" + Path(name).stem)
    return asset_name(name)


def load_project(root: str | Path) -> Project:
    root = Path(root).resolve()
    stages = dvc_graph.load_stages(root)
    imports = [DATA_IMPORT] + [i for i in dvc_graph.load_imports(root) if i.dvc_file != DATA_IMPORT.dvc_file]
    graph = dvc_graph.upstream(stages, imports)
    raw = (parse_yaml((root / "params.yaml").read_text()) or {}) if (root / "params.yaml").exists() else {}
    subset = {k: raw[k] for k in ("pipeline", "download") if k in raw}
    try:
        sections = Params.model_validate(subset)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, str(root / "params.yaml"), subset)) from None
    project = Project(root, stages, imports, graph, sections.pipeline, sections.download)
    project.order = [SHARDS, DOWNLOAD] + [asset_name(n) for n in dvc_graph.topological(graph)] + [REMOTE]
    return project


def data_dvc_md5(root: Path) -> str | None:
    """data.dvc's hash of data/ (None before the first download)."""
    return (dvc_graph.import_hashes(root).get(DATA_IMPORT.dvc_file) or {}).get(DATA_IMPORT.path)
