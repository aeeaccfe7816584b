"""train.recipe's LR and schedule keys: 2026 resolves to nanochat HEAD's base_train.py defaults, 2025 to the
FineWeb-era values (what these keys defaulted to before they became recipe options), and old checkpoints
still resume (their compat recorded the same names and values)."""

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from nanoforge.config import TrainConfig
from nanoforge.training.checkpoint import compat_diff
from nanoforge.training.optim import lr_multiplier
from nanoforge.training.plan import LEGACY_COMPAT, compat_key

HEAD_ENV = "NANOFORGE_NANOCHAT_HEAD"
SCHEDULE_KEYS = ("embedding_lr", "unembedding_lr", "grad_clip", "warmup_steps", "warmdown_ratio", "final_lr_frac")
# the defaults these keys had before they were recipe options (= nanochat 10231df's base_train.py)
FINEWEB_ERA = dict(embedding_lr=0.2, unembedding_lr=0.004, grad_clip=1.0, warmup_steps=0, warmdown_ratio=0.2,
                   final_lr_frac=0.0)
# nanochat HEAD 92d63d4 scripts/base_train.py's argparse defaults, used when no checkout is given
# (no --grad-clip: HEAD does not clip, grad_clip 0)
HEAD_DEFAULTS = {"embedding-lr": 0.3, "unembedding-lr": 0.008, "warmup-steps": 40, "warmdown-ratio": 0.65,
                 "final-lr-frac": 0.05, "weight-decay": 0.28, "scalar-lr": 0.5, "matrix-lr": 0.02}
OURS = {"embedding-lr": "embedding_lr", "unembedding-lr": "unembedding_lr", "warmup-steps": "warmup_steps",
        "warmdown-ratio": "warmdown_ratio", "final-lr-frac": "final_lr_frac", "weight-decay": "muon_weight_decay",
        "scalar-lr": "scalar_lr", "matrix-lr": "matrix_lr"}


def head_defaults() -> tuple[dict, str]:
    """HEAD's defaults read from its base_train.py when a checkout is given, else the constants above."""
    head = os.environ.get(HEAD_ENV)
    if not head:
        return HEAD_DEFAULTS, ""
    text = (Path(head) / "scripts/base_train.py").read_text()
    found = {}
    for flag in HEAD_DEFAULTS:
        m = re.search(rf'add_argument\("--{flag}", type=(int|float), default=([-0-9.e]+)', text)
        assert m, f"--{flag} not found in {head}/scripts/base_train.py"
        found[flag] = int(m.group(2)) if m.group(1) == "int" else float(m.group(2))
    return found, text


def test_2026_resolves_to_nanochat_heads_base_train_defaults():
    defaults, text = head_defaults()
    cfg = TrainConfig(recipe="2026")
    assert {flag: cfg.option(ours) for flag, ours in OURS.items()} == defaults
    assert cfg.option("grad_clip") == 0.0
    if text:  # HEAD's training loop has no gradient clipping at all
        assert "clip_grad" not in text and "grad-clip" not in text


def test_2025_resolves_to_the_fineweb_era_values_and_a_key_overrides_its_recipe():
    assert {k: TrainConfig().option(k) for k in SCHEDULE_KEYS} == FINEWEB_ERA
    assert TrainConfig(recipe="2026", grad_clip=1.0, warmdown_ratio=0.2).option("warmdown_ratio") == 0.2
    assert TrainConfig(recipe="2026", grad_clip=1.0).option("grad_clip") == 1.0


def test_the_schedule_follows_heads_warmup_steps():
    # base_train.py 92d63d4 get_lr_multiplier, with its defaults (40 warmup steps, 65% warmdown to 0.05)
    def head(it, n, warmup=40, warmdown_ratio=0.65, final=0.05):
        warmdown = round(warmdown_ratio * n)
        if it < warmup:
            return (it + 1) / warmup
        if it <= n - warmdown:
            return 1.0
        progress = (n - it) / warmdown
        return progress * 1.0 + (1 - progress) * final

    cfg, n = TrainConfig(recipe="2026"), 1000
    ours = [lr_multiplier(s, n, cfg.warmup_ratio, cfg.option("warmdown_ratio"), cfg.option("final_lr_frac"),
                          cfg.option("warmup_steps")) for s in range(n + 1)]
    assert ours == [head(s, n) for s in range(n + 1)]
    # 2025: warmup_steps 0, so the FineWeb-era ratio alone, as before
    assert lr_multiplier(5, 100, 0.1, 0.2, 0.0, 0) == lr_multiplier(5, 100, 0.1, 0.2, 0.0) == 0.6


def test_an_old_checkpoints_compat_still_resumes_and_2026_names_the_schedule_keys():
    tokenizer, manifest = SimpleNamespace(meta={}), {"shards": [], "train_shards": []}
    new25 = compat_key(TrainConfig(), 100, tokenizer, manifest)
    # written before these keys were recipe options: the same names with the resolved values, no warmup_steps
    old = {k: v for k, v in new25.items() if k != "train.warmup_steps"}
    assert {k: old[f"train.{k}"] for k in FINEWEB_ERA if k != "warmup_steps"} == \
           {k: v for k, v in FINEWEB_ERA.items() if k != "warmup_steps"}
    assert compat_diff({**LEGACY_COMPAT, **old}, new25) == []
    new26 = compat_key(TrainConfig(recipe="2026"), 100, tokenizer, manifest)
    diff = "\n".join(compat_diff({**LEGACY_COMPAT, **old}, new26))
    for line in ("train.embedding_lr: 0.2 -> 0.3", "train.grad_clip: 1.0 -> 0.0", "train.warmup_steps: 0 -> 40",
                 "train.warmdown_ratio: 0.2 -> 0.65", "train.final_lr_frac: 0.0 -> 0.05"):
        assert line in diff, diff
