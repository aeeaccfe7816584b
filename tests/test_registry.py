"""The champion comparison: the evaluate stage's val BPB only, its token budget said, never the model against itself."""

from __future__ import annotations

import json
from pathlib import Path

from nanoforge.config import load_params
from nanoforge.registry import decide, model_md5
from tests.conftest import REPO

MODEL_MD5 = "0123456789abcdef0123456789abcdef.dir"


def _lock(root: Path, md5: str = MODEL_MD5) -> None:
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  train:\n    cmd: torchrun -m stages.train\n    outs:\n"
        f"    - path: artifacts/model\n      hash: md5\n      md5: {md5}\n")


def _check_input(root: Path, champion: dict | None):
    from pipelines.defs.checks import CheckInput

    return CheckInput(root, load_params(REPO / "params.yaml").pipeline, lambda: champion)


def _eval_metrics(root: Path, val_bpb: float) -> None:
    (root / "artifacts/eval").mkdir(parents=True)
    (root / "artifacts/eval/metrics.json").write_text(json.dumps({"val_bpb": val_bpb, "val_bpb_tokens": 65536, "core": 0.1}))


def test_model_hash_from_dvc_lock(tmp_path):
    assert model_md5(tmp_path) is None  # before any dvc repro
    _lock(tmp_path)
    assert model_md5(tmp_path) == MODEL_MD5


def test_check_does_not_compare_the_champion_with_itself(tmp_path):
    # after the first register, v1 *is* this model: "val BPB 2.3711 vs champion v1 2.3711" says nothing
    from pipelines.defs.checks import bpb_vs_champion

    _lock(tmp_path)
    _eval_metrics(tmp_path, 2.3711)
    same = {"version": 1, "val_bpb": 2.3711, "model_md5": MODEL_MD5}
    passed, text, meta = bpb_vs_champion(_check_input(tmp_path, same))
    assert passed and "is this model" in text and "nothing to compare" in text and "tolerance" not in text
    # another model: the real comparison, against the champion's evaluate-stage figure
    other = {"version": 1, "val_bpb": 2.30, "model_md5": "feedfacefeedfacefeedfacefeedface.dir"}
    passed, text, meta = bpb_vs_champion(_check_input(tmp_path, other))
    assert not passed and "worse than champion v1" in text and meta["champion_val_bpb"] == 2.30


def test_decision_says_when_the_budgets_differ():
    candidate = {"val_bpb": 2.30, "val_bpb_tokens": 65536, "core": 0.1}
    promote, why = decide(candidate, {"version": 3, "val_bpb": 2.40, "val_bpb_tokens": 32768, "core": 0.1})
    assert promote and "over 65,536 tokens vs the champion's 32,768" in why
    promote, why = decide(candidate, {"version": 3, "val_bpb": 2.40, "val_bpb_tokens": 65536, "core": 0.1})
    assert promote and "tokens" not in why


def test_champion_scores_carry_the_model_hash_and_budget(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from nanoforge.registry import champion
    from nanoforge.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri())
    client.create_registered_model("m")
    mv = client.create_model_version("m", "file:///nowhere", tags={"val_bpb": "2.3", "val_bpb_tokens": "65536",
                                                                   "core": "0.1", "model_md5": MODEL_MD5})
    client.set_registered_model_alias("m", "champion", mv.version)
    found = champion(client, "m")
    assert found["model_md5"] == MODEL_MD5 and found["val_bpb_tokens"] == 65536 and found["val_bpb"] == 2.3
