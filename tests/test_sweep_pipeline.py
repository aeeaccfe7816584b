"""The scaling-law sweep as a pipeline (issue 13): params, sweep/dvc.yaml, the cell and fit stages.

Fast: the sweep params are checked before any work (a float budget, a non-canonical one, one depth,
a budget too small for a depth: each an error naming the key or the cell, and nothing written);
sweep/dvc.yaml's deps cover every module its stages import (tests/test_layout.py's rule, here for
the second pipeline file), and DVC's cell names match the grid's folders.

Cluster (`make test-slurm`): the cell caching through real `dvc repro` and real torchrun on a tiny
model: two cells run; a new budget runs only its cell; a train param change re-runs both; a cell
killed after its checkpoint resumes from it.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from nanoforge.config import ConfigError, Params, load_params
from nanoforge.sweep.grid import cell_name
from nanoforge.sweep.pipeline import grid_of
from tests.conftest import BIN, REPO, make_project, run, tool
from tests.test_layout import import_closure, missing_deps


def params_with(tmp_path: Path, **sweep) -> Path:
    raw = Params().model_dump(mode="json")
    raw["sweep"].update(sweep)
    path = tmp_path / "params.yaml"
    path.write_text(dump(raw))
    return path


def dump(tree: dict) -> str:
    """YAML as the presets write it: '3e12' quoted (PyYAML 1.1 would write it plain, which DVC and
    our loader read as a float)."""
    from nanoforge.presets import dump_yaml

    return dump_yaml(tree)


def test_budgets_are_quoted_canonical_text(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep\.budgets.*write the budget 1000000000000000.0 as the quoted string '1e15'"):
        load_params(params_with(tmp_path, budgets=[1e15]))
    with pytest.raises(ConfigError, match=r"sweep\.budgets: write '1000000' as '1e6'"):
        load_params(params_with(tmp_path, budgets=["1000000"]))
    with pytest.raises(ConfigError, match=r"sweep\.params_convention"):
        load_params(params_with(tmp_path, params_convention="all"))


def test_bad_grid_is_refused_before_any_work(tmp_path, monkeypatch):
    """One depth, or a budget that gives a depth too few steps: the stage exits 2 naming it, writing nothing."""
    from stages import sweep as stage

    monkeypatch.chdir(tmp_path)
    params_with(tmp_path, depths=[2])
    assert stage.main(["--budget", "3e12", "--depth", "2"]) == 2
    params_with(tmp_path, budgets=["1e9", "3e12"], depths=[1, 2, 4])
    with pytest.raises(ConfigError, match=r"c1e9-d4: \d steps .* it needs sweep\.budgets >= "):
        grid_of(load_params("params.yaml"))
    assert stage.main(["--budget", "3e12", "--depth", "1"]) == 2  # a fine cell, in a grid with a bad one
    assert not (tmp_path / "artifacts").exists()


def test_bad_grid_message_names_the_depths(tmp_path, capsys, monkeypatch):
    from stages import sweep as stage

    monkeypatch.chdir(tmp_path)
    params_with(tmp_path, depths=[2, 4])
    assert stage.main(["--budget", "3e12", "--depth", "2"]) == 2
    err = capsys.readouterr().err
    assert "sweep.depths=[2, 4]" in err and "at least 3" in err


def sweep_spec_dir(tmp_path: Path) -> Path:
    """sweep/dvc.yaml as a dvc.yaml beside the code, for test_layout's check."""
    for name in ("nanoforge", "stages"):
        (tmp_path / name).symlink_to(REPO / name)
    shutil.copy(REPO / "sweep/dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


def test_sweep_stages_list_the_modules_they_import(tmp_path):
    root = sweep_spec_dir(tmp_path)
    assert missing_deps(root) == {}
    # the cell runs the train stage (a subprocess): its code is a dep too, so a train change re-runs the cells
    spec = yaml.safe_load((REPO / "sweep/dvc.yaml").read_text())
    deps = set(spec["stages"]["sweep"]["deps"])
    train = {str(p.relative_to(REPO)) for p in import_closure(REPO, REPO / "stages/train.py")}
    assert train - deps == set(), ("sweep/dvc.yaml's sweep stage runs stages.train: add these train modules to its "
                                   f"deps too: {sorted(train - deps)}")


def test_dvc_names_the_cells_as_the_grid_does(tmp_path):
    project = tmp_path  # no git, no stages of dvc.yaml: only what `dvc stage list` reads
    shutil.copytree(REPO / "sweep", project / "sweep")
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    run([tool("dvc"), "init", "-q", "--no-scm"], project)
    out = run([tool("dvc"), "stage", "list", "sweep/dvc.yaml"], project).stdout
    params = load_params(project / "params.yaml")
    for budget in params.sweep.budgets:
        for depth in params.sweep.depths:
            assert f"sweep/dvc.yaml:sweep@{budget}-{depth} " in out
            assert f"artifacts/sweep/{cell_name(float(budget), depth)}/model" in out
    assert "sweep/dvc.yaml:scaling_laws" in out


# ---------------------------------------------------------------------------
# real DVC, real torchrun

CELL_TINY = {
    "tokenizer.vocab_size": 512, "tokenizer.max_chars": 200_000, "tokenizer.eval_chars": 20_000,
    "train.max_seq_len": 64, "train.device_batch_size": 4, "train.total_batch_size": 256,
    "train.eval_every": 20, "train.eval_tokens": 1024, "train.sample_every": 0, "train.save_every": 10,
}


def ran_cells(out: str) -> list[str]:
    return sorted(line.split("@", 1)[1].rstrip("':") for line in out.splitlines()
                  if line.startswith("Running stage 'sweep/dvc.yaml:sweep@"))


def set_params(project: Path, **values) -> None:
    from nanoforge.config import parse_yaml

    tree = parse_yaml((project / "params.yaml").read_text())
    for dotted, value in values.items():
        section, key = dotted.split(".")
        tree[section][key] = value
    (project / "params.yaml").write_text(dump(tree))


@pytest.fixture
def sweep_project(tmp_path, monkeypatch):
    from tests.datagen import make_fineweb

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PATH", f"{BIN}:{__import__('os').environ['PATH']}")
    project = make_project(tmp_path / "project", CELL_TINY)
    set_params(project, **{"sweep.budgets": ["3e10"], "sweep.depths": [1, 2, 3]})
    shutil.copytree(REPO / "sweep", project / "sweep")
    make_fineweb(project / "data/fineweb", train=(0, 1), val=1822, docs_per_shard=300)
    run([tool("dvc"), "add", "-q", "data"], project)
    run("git add -A && git commit -q -m data", project)
    return project


@pytest.mark.cluster
def test_cells_cache_and_rerun_as_the_grid_and_recipe_change(sweep_project, monkeypatch, tmp_path):
    project = sweep_project
    monkeypatch.delenv("NANOFORGE_TRACKING")  # MLflow on: one parent for the sweep, a child run per cell
    two = ["sweep/dvc.yaml:sweep@3e10-1", "sweep/dvc.yaml:sweep@3e10-2"]
    first = run([tool("dvc"), "repro", *two], project, timeout=600).stdout
    assert ran_cells(first) == ["3e10-1", "3e10-2"]
    row = json.loads((project / "artifacts/sweep/c3e10-d1/cell.json").read_text())
    assert row["name"] == "c3e10-d1" and row["val_bpb"] > 0 and row["tokens_trained"] == row["tokens"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nanoforge").experiment_id])
    cells = {r.data.tags.get("sweep.name"): r for r in runs if r.data.tags.get("sweep.name")}
    assert set(cells) == {"c3e10-d1", "c3e10-d2"}
    parents = {r.data.tags["mlflow.parentRunId"] for r in cells.values()}
    assert len(parents) == 1 and client.get_run(parents.pop()).data.tags["nanoforge.kind"] == "sweep"
    assert cells["c3e10-d1"].data.tags["mlflow.runName"] == "cell c3e10-d1"
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")
    assert (project / "artifacts/sweep/c3e10-d1/checkpoints").is_dir()
    assert not (project / "artifacts/checkpoints").exists()  # never the main train stage's folder

    # a new budget: only its cell runs; the finished ones are up to date
    set_params(project, **{"sweep.budgets": ["3e10", "6e10"]})
    again = run([tool("dvc"), "repro", *two, "sweep/dvc.yaml:sweep@6e10-1"], project, timeout=600).stdout
    assert ran_cells(again) == ["6e10-1"]

    # the recipe changes: every cell runs again (and starts fresh, not from the old checkpoint)
    set_params(project, **{"train.seed": 7})
    changed = run([tool("dvc"), "repro", *two], project, timeout=600)
    assert ran_cells(changed.stdout) == ["3e10-1", "3e10-2"]
    assert "new run, starting fresh" in changed.stdout + changed.stderr  # the train log


@pytest.mark.cluster
def test_a_killed_cell_resumes_from_its_checkpoint(sweep_project):
    project = sweep_project
    target = "sweep/dvc.yaml:sweep@3e10-1"  # 217 steps, a checkpoint every 10
    run([tool("dvc"), "repro", "tokenizer"], project, timeout=300)
    proc = subprocess.Popen([tool("dvc"), "repro", target], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ckpt = project / "artifacts/sweep/c3e10-d1/checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(ckpt.glob("step_*")):
        time.sleep(0.5)
    import os

    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: train saves a checkpoint and stops
    proc.communicate(timeout=120)
    assert any(ckpt.glob("step_*")) and not (project / "artifacts/sweep/c3e10-d1/cell.json").exists()
    out = run([tool("dvc"), "repro", target], project, timeout=600)
    assert ran_cells(out.stdout) == ["3e10-1"] and "resum" in (out.stdout + out.stderr).lower()
    assert json.loads((project / "artifacts/sweep/c3e10-d1/cell.json").read_text())["val_bpb"] > 0


def test_the_fit_stage_writes_the_laws_plots_and_page(tmp_path, monkeypatch):
    """scaling_laws on the rows of a finished grid (Chinchilla's synthetic loss for each cell's N and
    tokens, no training): the JSON, the metrics, the three charts and the page with them embedded."""
    from nanoforge.sweep.pipeline import cell_dir
    from stages import scaling_laws
    from tests.test_sweep_fit import loss

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")
    params_with(tmp_path, budgets=["1e18", "2.15e18", "4.64e18", "1e19"], depths=[6, 8, 10, 12, 14, 16, 20],
                bootstrap=50)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["tokenizer"]["vocab_size"], raw["train"]["max_seq_len"], raw["train"]["total_batch_size"] = 65536, 2048, 524288
    raw["train"]["device_batch_size"] = 32
    (tmp_path / "params.yaml").write_text(dump(raw))
    params = load_params("params.yaml")
    cells = grid_of(params)
    for cell in cells:
        n = cell.params("no_embedding")
        row = {**cell.to_dict(), **{f"params_{c}": cell.params(c) for c in ("total", "no_embedding", "transformer")},
               "val_bpb": loss(n, cell.tokens), "tokens_trained": cell.tokens}
        cell_dir(cell).mkdir(parents=True)
        (cell_dir(cell) / "cell.json").write_text(json.dumps(row))
        (cell_dir(cell) / "train").mkdir()
        (cell_dir(cell) / "train/val.csv").write_text(
            f"step,flops,val_bpb\n0,0,4.0\n1,{cell.flops / 2},3.0\n2,{cell.flops},{row['val_bpb']}\n")
    missing = cell_dir(cells[-1]) / "cell.json"
    saved = missing.read_text()
    missing.unlink()
    assert scaling_laws.main([]) == 2  # a cell unfinished: refused, naming it
    missing.write_text(saved)
    assert scaling_laws.main([]) == 0
    fit = json.loads((tmp_path / "artifacts/scaling_laws/scaling_laws.json").read_text())
    assert 0.3 < fit["a"] < 0.7 and 0.3 < fit["b"] < 0.7 and len(fit["budgets"]) == 4 and len(fit["cells"]) == 28
    assert set(json.loads((tmp_path / "artifacts/scaling_laws/metrics.json").read_text())) >= {"a", "b", "ratio"}
    page = tmp_path / "reports/sweep"
    assert {p.name for p in page.glob("*.png")} == {"isoflops.png", "frontier.png", "bpb_vs_flops.png"}
    md, html = (page / "scaling_laws.md").read_text(), (page / "scaling_laws.html").read_text()
    assert "| a (N* ∝ C^a) |" in md and "![isoflops](isoflops.png)" in md
    assert html.count("data:image/png;base64,") == 3 and "<table>" in html


def test_a_grid_without_an_interior_minimum_is_a_finding_with_the_curves_not_a_crash(tmp_path, monkeypatch):
    """What the tiny CPU grid gives at budgets this machine trains in minutes: every isoFLOP curve falls toward
    the smallest model. The stage still writes the cells, the measured curves and what to change."""
    from nanoforge.sweep.pipeline import cell_dir
    from stages import scaling_laws

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOFORGE_TRACKING", "off")
    params_with(tmp_path, budgets=["3e10", "6e10", "1.2e11"], depths=[1, 2, 3], bootstrap=0, min_steps=1)
    for cell in grid_of(load_params("params.yaml")):
        row = {**cell.to_dict(), **{f"params_{c}": cell.params(c) for c in ("total", "no_embedding", "transformer")},
               "val_bpb": 3.0 + 0.3 * cell.depth - 0.1 * math.log10(cell.budget / 3e10), "tokens_trained": cell.tokens}
        cell_dir(cell).mkdir(parents=True)
        (cell_dir(cell) / "cell.json").write_text(json.dumps(row))
    assert scaling_laws.main([]) == 0
    fit = json.loads((tmp_path / "artifacts/scaling_laws/scaling_laws.json").read_text())
    assert fit["a"] is None and "smaller than the smallest model" in fit["finding"] and len(fit["cells"]) == 9
    assert json.loads((tmp_path / "artifacts/scaling_laws/metrics.json").read_text()) == {}
    md = (tmp_path / "reports/sweep/scaling_laws.md").read_text()
    assert "**No scaling law from this grid**" in md and "raise `sweep.budgets`" in md and "| c3e10-d1 |" in md
    assert {p.name for p in (tmp_path / "reports/sweep").glob("*.png")} == {"isoflops.png"}  # no val curves here


def test_a_sweep_of_a_model_the_grid_cannot_count_is_refused_naming_the_keys(tmp_path):
    path = params_with(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["train"]["recipe"] = "2026"
    path.write_text(dump(raw))
    with pytest.raises(ConfigError, match=r"does not know train.value_embeds=True, train.window_pattern='SSSL' "
                                          r"\(train.recipe: 2026\); set train.value_embeds: False, "
                                          r"train.window_pattern: 'L' for a sweep"):
        grid_of(load_params(path))
    raw["train"].update(value_embeds=False, window_pattern="L")  # the rest of 2026 (optimizer, lambdas...) is fine
    path.write_text(dump(raw))
    assert grid_of(load_params(path))


def test_core_per_cell_is_refused_not_ignored(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep\.core: true is not supported yet"):
        load_params(params_with(tmp_path, core=True))


def test_the_default_grid_is_a_valid_grid():
    # params.yaml's sweep: section must be runnable as it is (its depth 6 once had 9 steps at 3e12: refused)
    from tests.conftest import REPO

    assert len(grid_of(load_params(REPO / "params.yaml"))) == 12
