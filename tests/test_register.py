"""The register stage without MLflow: the registry is MLflow's, so it refuses in one line before any work.

Registering for real (a version, the champion alias, a served model) is tests/test_pipelines_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def inputs(tmp_path) -> Path:
    """What check_inputs looks for (file names only: nothing is loaded before the MLflow check)."""
    for path in ("artifacts/model/model.safetensors", "artifacts/model/config.json",
                 "artifacts/tokenizer/tokenizer.tiktoken", "artifacts/tokenizer/tokenizer.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("{}")
    (tmp_path / "artifacts/eval").mkdir(parents=True)
    (tmp_path / "artifacts/eval/metrics.json").write_text('{"val_bpb": 1.5, "core": 0.1}')
    (tmp_path / "params.yaml").write_text("pipeline:\n  registered_model: nanoforge-base\n")
    return tmp_path


def register(root: Path, monkeypatch, capfd, **env) -> tuple[int, str]:
    """stages.register.main in this process (the same code path as `python -m`, without its start-up)."""
    from stages.register import main

    for var in ("NANOFORGE_TRACKING", "MLFLOW_TRACKING_URI", "NANOFORGE_PARENT_RUN_ID", "DAGSTER_PIPES_CONTEXT"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(root)
    code = main([])
    return code, capfd.readouterr().err


@pytest.mark.parametrize("env, setting", [
    ({"NANOFORGE_TRACKING": "off"}, "but NANOFORGE_TRACKING=off: unset it to register the model"),
    ({"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "but MLFLOW_TRACKING_URI=http://127.0.0.1:9 does not answer"),
], ids=["tracking-off", "server-unreachable"])
def test_register_without_mlflow_is_one_clear_error_before_any_work(inputs, env, setting, monkeypatch, capfd):
    # issue 18.11: it failed after opening a run ("runs untracked" warning, then "off or unreachable")
    code, err = register(inputs, monkeypatch, capfd, **env)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: register needs MLflow (the model registry is MLflow's; every other stage runs untracked without it), "
        f"{setting}"), err
    assert "untracked" not in err.replace(errors[0], "")  # no "runs untracked" warning first
    assert not (inputs / "artifacts/registry").exists() and not (inputs / "mlflow.db").exists()
