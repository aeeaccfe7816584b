"""Shared fixtures: an isolated MLflow store per test, and throwaway git+DVC projects.

Tests never touch the repo's own mlflow.db, data/ or artifacts/, and never the
internet: data is generated (tests/datagen.py) and servers bind 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project venv: dvc, torchrun, dagster live here

# files a throwaway project needs to run the pipeline the way a user's clone does
PROJECT_FILES = ["nanoforge", "stages", "pipelines", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore"]


# `gpu` tests run where CUDA is; NANOFORGE_GPU_TESTS_ON_CPU=1 runs their bodies on the CPU
# instead (a smoke test of the code, e.g. before renting a GPU: slow, not the suite's)
GPU_ON_CPU_ENV = "NANOFORGE_GPU_TESTS_ON_CPU"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (tests/test_gpu.py, run by python -m bench.gpu); "
                                       "skipped with the reason elsewhere")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items or os.environ.get(GPU_ON_CPU_ENV) == "1":
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=f"needs CUDA: torch {torch.__version__} sees no GPU "
                                       f"(python -m bench.gpu runs these on one; {GPU_ON_CPU_ENV}=1 runs them on the CPU)")
        for item in gpu_items:
            item.add_marker(skip)


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, migrated once: creating one costs seconds, copying it none."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch, mlflow_template):
    """Every test gets its own MLflow SQLite store and Dagster home; PATH finds the venv's tools."""
    state = tmp_path_factory.mktemp("state")
    shutil.copyfile(mlflow_template, state / "mlflow.db")  # a real store of its own, pre-migrated
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{state / 'mlflow.db'}")
    monkeypatch.setenv("DAGSTER_HOME", str(state / "dagster"))
    (state / "dagster").mkdir()
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("NANOFORGE_OFFLINE", "1")  # tests never touch the internet, not even a DNS lookup
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("NANOFORGE_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("NANOFORGE_MIRROR", raising=False)
    monkeypatch.delenv("DAGSTER_PIPES_CONTEXT", raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    yield


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP's
    spin-waiting between two threads made such tests 10-50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def module_env(base: Path):
    """What `_isolated_env` gives a test, for a module- or session-scoped fixture (which runs
    before it): an own Dagster home (the repo's dagster.yaml) and MLflow store under `base`."""
    home = base / "dagster"
    home.mkdir()
    shutil.copy(REPO / ".dagster/dagster.yaml", home / "dagster.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow.db'}")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("NANOFORGE_OFFLINE", "1")
        mp.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        for var in ("NANOFORGE_PARENT_RUN_ID", "DAGSTER_PIPES_CONTEXT", "RANK", "WORLD_SIZE", "NANOFORGE_TRACKING",
                    "NANOFORGE_MIRROR", "PYTHONPATH"):
            mp.delenv(var, raising=False)
        yield mp


def run(cmd: list[str] | str, cwd: str | Path, check: bool = True, env: dict | None = None, timeout: float = 600,
        inherit_env: bool = True, **kw):
    """subprocess.run with output captured and shown when it fails; `env` adds to this process's
    environment, or with inherit_env=False is the whole environment."""
    full_env = {**os.environ, **(env or {})} if inherit_env else dict(env or {})
    proc = subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, shell=isinstance(cmd, str), **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {cmd}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def make_project(root: Path, params: dict | None = None) -> Path:
    """A throwaway clone of this project: the code, dvc.yaml, params.yaml; git and DVC initialised.

    `params` overrides params.yaml values, as {"train.depth": 2, ...}.
    """
    from nanoforge.config import parse_yaml
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, root / name)
    if params:
        tree = parse_yaml((root / "params.yaml").read_text())
        for dotted, value in params.items():
            node = tree
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        from nanoforge.presets import dump_yaml  # quotes what our reader would take for a number ('3e12')

        (root / "params.yaml").write_text(dump_yaml(tree))
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.email", "test@nanoforge"], root)
    run(["git", "config", "user.name", "nanoforge tests"], root)
    run([tool("dvc"), "init", "-q"], root)
    run([tool("dvc"), "config", "core.analytics", "false"], root)
    # the repo's offline `dvc plots show` page (.dvc/plots.html), as a clone has it
    shutil.copy2(REPO / ".dvc/plots.html", root / ".dvc/plots.html")
    run([tool("dvc"), "config", "plots.html_template", "plots.html"], root)
    run([tool("dvc"), "remote", "add", "-d", "local", str(root.parent / f"{root.name}-remote")], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "project"], root)
    return root


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "project")


# A tiny but complete pipeline: small enough for CI, every stage real.
TINY = {
    "tokenizer.vocab_size": 512, "tokenizer.max_chars": 200_000, "tokenizer.eval_chars": 20_000,
    "train.depth": 1, "train.max_seq_len": 64, "train.device_batch_size": 4, "train.total_batch_size": 256,
    "train.num_iterations": 12, "train.eval_every": 6, "train.eval_tokens": 1024, "train.sample_every": 0,
    "train.save_every": 0,
    "evaluate.val_tokens": 1024, "evaluate.core_max_per_task": 4, "evaluate.num_unconditioned_samples": 1,
    "evaluate.sample_max_tokens": 8,
}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, mlflow_template) -> tuple[Path, dict]:
    """One real `dvc repro` of the whole pipeline on generated data, in a throwaway git+DVC
    project, shared by the tests that read its results. Tests that change it work on a copy
    (`copy_project`). Returns (project, env): env points at the run's own MLflow store."""
    from tests.datagen import make_eval_bundle, make_fineweb

    root = tmp_path_factory.mktemp("tiny-pipeline")
    store = root / "mlflow.db"
    shutil.copyfile(mlflow_template, store)
    # session scope runs before the per-test isolation: spell the environment out
    env = {k: v for k, v in os.environ.items()
           if k not in ("NANOFORGE_PARENT_RUN_ID", "DAGSTER_PIPES_CONTEXT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                        "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", "NANOFORGE_TRACKING")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{store}", DVC_NO_ANALYTICS="1", NANOFORGE_OFFLINE="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    project = make_project(root / "project", TINY)
    make_fineweb(project / "data/fineweb", train=(0, 1), val=1822, docs_per_shard=300)
    make_eval_bundle(project / "data/eval_bundle", items_per_task=8)
    run([tool("dvc"), "add", "-q", "data"], project, env=env)
    run("git add -A && git commit -q -m data", project, env=env)
    run([tool("dvc"), "repro"], project, env=env, timeout=600)
    return project, env


def copy_project(project: Path, dest: Path) -> Path:
    """A copy of a DVC project (git, DVC cache, outputs) that a test may change freely."""
    shutil.copytree(project, dest, symlinks=True)
    return dest
