"""train.recipe: 2026 (nanochat HEAD's recipe as options) against nanochat's own code, and the 2025 default.

The fidelity test runs nanochat HEAD's model and optimizer from a checkout of karpathy/nanochat
named by NANOFORGE_NANOCHAT_HEAD (checked at 92d63d4), eagerly in fp32 on CPU (its torch.compile'd
optimizer kernels are called unwrapped: the same math, no C++ build), and is skipped otherwise.
"""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from nanoforge.config import RECIPES, TrainConfig
from nanoforge.model.gpt import build_model, config_for_depth
from nanoforge.training.checkpoint import compat_diff
from nanoforge.training.optim import (
    Muon, Muon2026, apply_schedules, build_for_config, lr_multiplier, momentum_for, polar_express, set_weight_decay,
    weight_decay_multiplier,
)
from nanoforge.training.plan import RECIPE_2025_COMPAT

HEAD_ENV = "NANOFORGE_NANOCHAT_HEAD"
DEPTH, VOCAB, SEQ, BATCH, STEPS = 4, 512, 256, 2, 10  # SEQ 256: the short windows (128) really slide


def import_nanochat(path: str, monkeypatch):
    """Import the nanochat package of checkout `path` afresh (the other test may hold another checkout's)."""
    for name in [m for m in sys.modules if m == "nanochat" or m.startswith("nanochat.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(path)
    import nanochat.gpt

    return nanochat


def nanochat_head(monkeypatch):
    """The nanochat package of the checkout in $NANOFORGE_NANOCHAT_HEAD, or a skip that says why."""
    path = os.environ.get(HEAD_ENV)
    if not path:
        pytest.skip(f"set {HEAD_ENV} to a checkout of karpathy/nanochat (checked at 92d63d4) to compare with it")
    if not (Path(path) / "nanochat" / "optim.py").exists():
        pytest.skip(f"{HEAD_ENV}={path}: no nanochat/optim.py there (HEAD's layout, 2026)")
    nanochat = import_nanochat(path, monkeypatch)
    import nanochat.optim

    return nanochat


def cfg_2026(**overrides) -> TrainConfig:
    # 10 steps that cross every schedule: 2 warmup steps, 65% warmdown to 0.05, cosine weight decay
    base = dict(recipe="2026", depth=DEPTH, max_seq_len=SEQ, device_batch_size=BATCH, total_batch_size=BATCH * SEQ,
                num_iterations=STEPS, warmup_ratio=0.2, warmdown_ratio=0.65, final_lr_frac=0.05, grad_clip=0.0,
                embedding_lr=0.3, unembedding_lr=0.008, muon_weight_decay=0.28)
    return TrainConfig(**{**base, **overrides})


def head_schedules(it: int, n: int, warmup: int, warmdown_ratio: float, final: float, wd: float):
    """base_train.py's get_lr_multiplier, get_muon_momentum, get_weight_decay (92d63d4), verbatim math."""
    warmdown_iters = round(warmdown_ratio * n)
    if it < warmup:
        lrm = (it + 1) / warmup
    elif it <= n - warmdown_iters:
        lrm = 1.0
    else:
        progress = (n - it) / warmdown_iters
        lrm = progress * 1.0 + (1 - progress) * final
    warmdown_start = n - warmdown_iters
    if it < 400:
        frac = it / 400
        momentum = (1 - frac) * 0.85 + frac * 0.97
    elif it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown_iters
        momentum = 0.97 * (1 - progress) + 0.90 * progress
    else:
        momentum = 0.97
    return lrm, momentum, wd * 0.5 * (1 + math.cos(math.pi * it / n))


@pytest.mark.cluster  # ~2 min on 2 loaded cores (nanochat's eager optimizer and ours, 10 steps each)
def test_2026_matches_nanochat_head(monkeypatch):
    nanochat = nanochat_head(monkeypatch)
    from nanochat.gpt import GPT as HeadGPT, GPTConfig as HeadConfig

    opt_mod = nanochat.optim
    for name in ("adamw_step_fused", "muon_step_fused"):  # eager: the same function, without inductor
        monkeypatch.setattr(opt_mod, name, getattr(opt_mod, name)._torchdynamo_orig_callable)
    cfg = cfg_2026()
    ours_config = config_for_depth(DEPTH, VOCAB, SEQ, **cfg.model_options())
    torch.manual_seed(0)
    with torch.device("meta"):  # as base_train: meta build, to_empty, init_weights
        head = HeadGPT(HeadConfig(sequence_len=SEQ, vocab_size=VOCAB, n_layer=DEPTH, n_head=ours_config.n_head,
                                  n_kv_head=ours_config.n_kv_head, n_embd=ours_config.n_embd, window_pattern="SSSL"))
    head.to_empty(device="cpu")
    head.init_weights()
    torch.manual_seed(0)
    ours = build_model(ours_config)

    # the same parameter names and shapes, bit-identical initialisation, the same FLOPs and windows
    hp, op = dict(head.named_parameters()), dict(ours.named_parameters())
    assert list(hp) == list(op)
    for name in hp:
        assert hp[name].shape == op[name].shape, name
        assert torch.equal(hp[name], op[name]), name
    assert [w for w, _ in head.window_sizes] == ours.window_sizes == [128, 128, 128, 256]
    assert head.estimate_flops() == ours.estimate_flops()

    head_opt = head.setup_optimizer(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                    matrix_lr=cfg.matrix_lr, weight_decay=cfg.option("muon_weight_decay"),
                                    scalar_lr=cfg.option("scalar_lr"))
    ours_opts = build_for_config(ours, cfg)
    assert isinstance(ours_opts[1], Muon2026)

    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for step in range(STEPS):
        x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        # nanochat HEAD's step (base_train.py)
        head_loss = head(x, y)
        head_loss.backward()
        lrm, momentum, wd = head_schedules(step, STEPS, 2, cfg.warmdown_ratio, cfg.final_lr_frac,
                                           cfg.option("muon_weight_decay"))
        for group in head_opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = momentum, wd
        head_opt.step()
        head.zero_grad(set_to_none=True)
        # ours (training/loop.py's step)
        ours_loss = ours(x, y)
        ours_loss.backward()
        our_lrm = lr_multiplier(step, STEPS, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
        assert our_lrm == pytest.approx(lrm) and momentum_for(cfg, step, STEPS) == pytest.approx(momentum)
        set_weight_decay(ours_opts, weight_decay_multiplier(cfg, step, STEPS))
        assert ours_opts[1].param_groups[0]["weight_decay"] == pytest.approx(wd)
        apply_schedules(ours_opts, our_lrm, momentum_for(cfg, step, STEPS))
        for opt in ours_opts:
            opt.step()
        ours.zero_grad(set_to_none=True)
        if step == 0:
            assert ours_loss.item() == head_loss.item()  # the same init, the same forward: the same bits
        worst = max(worst, abs(ours_loss.item() - head_loss.item()))
        assert ours_loss.item() == pytest.approx(head_loss.item(), rel=1e-4), step
    print(f"max |loss difference| over {STEPS} steps vs nanochat HEAD: {worst:.2e}")
    for name in hp:  # the weights after 10 steps (AdamW's m/sqrt(v) amplifies float rounding elementwise)
        assert (op[name] - hp[name]).norm() <= 1e-3 * hp[name].norm() + 1e-4, name


def test_2025_default_is_the_fineweb_recipe():
    cfg = TrainConfig()
    assert cfg.recipe == "2025" and cfg.recipe_options() == RECIPES["2025"]
    model = build_model(config_for_depth(2, 512, 32, **cfg.model_options()))
    plain = build_model(config_for_depth(2, 512, 32))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    opts = build_for_config(model, cfg)
    assert type(opts[1]) is Muon and [g["name"] for g in opts[0].param_groups] == ["lm_head", "embedding"]


def test_each_option_overrides_its_recipe():
    cfg = TrainConfig(recipe="2026", window_pattern="L", value_embeds=False, softcap=30.0)
    assert cfg.option("window_pattern") == "L" and cfg.option("value_embeds") is False
    assert cfg.option("softcap") == 30.0 and cfg.option("lambdas") is True  # the rest from 2026
    model = build_model(config_for_depth(2, 512, 64, **cfg.model_options()))
    assert not hasattr(model, "value_embeds") and model.window_sizes == [64, 64]
    names = {n for n, _ in model.named_parameters()}
    assert {"resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda"} <= names
    with pytest.raises(ValueError, match="train.window_pattern='SLX'"):
        TrainConfig(window_pattern="SLX")


def test_2026_model_trains_and_windows_are_causal():
    cfg = cfg_2026(depth=2, max_seq_len=256)
    torch.manual_seed(0)
    model = build_model(config_for_depth(2, 256, 256, **cfg.model_options()))
    assert model.window_sizes == [128, 256]
    idx = torch.randint(0, 256, (1, 256))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        changed = idx.clone()
        changed[0, -1] = (idx[0, -1] + 1) % 256
        assert torch.allclose(model(idx)[0, :-1], model(changed)[0, :-1], atol=1e-5)  # causal with windows
    opts = build_for_config(model, cfg)
    x, y = torch.randint(0, 256, (1, 256)), torch.randint(0, 256, (1, 256))
    losses = []
    for step in range(6):  # one batch, memorised: the loss must fall
        loss = model(x, y)
        loss.backward()
        set_weight_decay(opts, weight_decay_multiplier(cfg, step, 6))
        apply_schedules(opts, 1.0, momentum_for(cfg, step, 6))
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_polar_express_orthogonalises(shape):
    torch.manual_seed(0)
    g = torch.randn(1, *shape)
    x = polar_express(g)[0]
    s = torch.linalg.svdvals(x)
    assert x.norm().item() == pytest.approx(min(shape) ** 0.5, rel=1e-4)  # Muon+ renormalisation
    assert s.max() < 1.6 and (s > 0.5).float().mean() > 0.9


def test_crossing_recipes_names_the_changed_keys():
    # a checkpoint's compat against a run of the other recipe: the plan restarts and says which keys changed
    cfg25, cfg26 = TrainConfig(), TrainConfig(recipe="2026", window_pattern="L")
    compat25 = {"train.recipe": "2025", **{f"train.{k}": v for k, v in cfg25.recipe_options().items()}}
    compat26 = {"train.recipe": "2026", **{f"train.{k}": v for k, v in cfg26.recipe_options().items()}}
    diff = compat_diff(compat25, compat26)
    assert "train.recipe: '2025' -> '2026'" in diff and "train.value_embeds: False -> True" in diff
    assert not any(d.startswith("train.window_pattern") for d in diff)  # overridden back to 2025's
    # a checkpoint from before the recipe keys existed was a 2025 run: it resumes a 2025 run unchanged
    assert compat_diff({**RECIPE_2025_COMPAT}, compat25) == []


FW_ENV = "NANOFORGE_NANOCHAT_FW"


@pytest.mark.cluster  # ~1 min on 2 loaded cores (bf16 Newton-Schulz on CPU, both sides)
def test_2025_default_still_matches_nanochat_fineweb(monkeypatch):
    """The default recipe against nanochat's FineWeb-era code (10231df, in $NANOFORGE_NANOCHAT_FW): the same
    names and shapes, bit-identical init, the same 10 losses (base_train's schedules and grad clip 1.0)."""
    path = os.environ.get(FW_ENV)
    if not path or not (Path(path) / "nanochat" / "muon.py").exists():
        pytest.skip(f"set {FW_ENV} to a checkout of karpathy/nanochat at 10231df (nanochat/muon.py) to compare with it")
    nanochat = import_nanochat(path, monkeypatch)
    import nanochat.muon
    from nanochat.gpt import GPT as FwGPT, GPTConfig as FwConfig

    monkeypatch.setattr(nanochat.muon, "zeropower_via_newtonschulz5",
                        nanochat.muon.zeropower_via_newtonschulz5._torchdynamo_orig_callable)
    depth, vocab, seq, batch, steps = 2, 512, 64, 2, 10
    cfg = TrainConfig(depth=depth, max_seq_len=seq, device_batch_size=batch, total_batch_size=batch * seq,
                      num_iterations=steps, warmdown_ratio=0.2)
    config = config_for_depth(depth, vocab, seq, **cfg.model_options())
    torch.manual_seed(0)
    with torch.device("meta"):
        fw = FwGPT(FwConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=config.n_head,
                            n_kv_head=config.n_kv_head, n_embd=config.n_embd))
    fw.to_empty(device="cpu")
    fw.init_weights()
    torch.manual_seed(0)
    ours = build_model(config)
    fp, op = dict(fw.named_parameters()), dict(ours.named_parameters())
    assert list(fp) == list(op) and all(torch.equal(fp[k], op[k]) for k in fp)
    fw_opts = fw.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0)
    ours_opts = build_for_config(ours, cfg)
    gen, worst = torch.Generator().manual_seed(1), 0.0
    for step in range(steps):
        x = torch.randint(0, vocab, (batch, seq), generator=gen)
        y = torch.randint(0, vocab, (batch, seq), generator=gen)
        lrm = lr_multiplier(step, steps, 0.0, 0.2, 0.0)  # base_train 10231df: no warmup, 20% warmdown to 0
        momentum = min(step / 300, 1) * 0.95 + (1 - min(step / 300, 1)) * 0.85  # base_train's get_muon_momentum
        assert momentum_for(cfg, step, steps) == pytest.approx(momentum)
        losses = []
        for model, opts in ((fw, fw_opts), (ours, ours_opts)):
            loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for opt in opts:  # base_train's loop (ours: apply_schedules does the same)
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
                    if "momentum" in group:
                        group["momentum"] = momentum
            for opt in opts:
                opt.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        worst = max(worst, abs(losses[1] - losses[0]))
        assert losses[1] == pytest.approx(losses[0], rel=2e-3), step
    print(f"max |loss difference| over {steps} steps vs nanochat 10231df: {worst:.2e}")
