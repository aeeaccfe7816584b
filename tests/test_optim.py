"""Muon + AdamW: the update rule, the parameter split, the LR and momentum schedules."""

import copy

import pytest
import torch

from nanoforge.model.gpt import build_model, config_for_depth
from nanoforge.training.optim import (
    Muon, apply_schedules, build_optimizers, lr_multiplier, muon_momentum, zeropower_via_newtonschulz5,
)


def test_lr_schedule_warmup_constant_warmdown():
    n = 100
    lrm = [lr_multiplier(s, n, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1) for s in range(n + 1)]
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert all(v == 1.0 for v in lrm[10:81])  # constant
    assert lrm[90] == pytest.approx(0.5 * 1 + 0.5 * 0.1)  # halfway down the warmdown
    assert lrm[100] == pytest.approx(0.1)  # ends at final_lr_frac
    assert all(a >= b for a, b in zip(lrm[80:], lrm[81:]))  # monotone down
    # nanochat's default: no warmup, 20% warmdown to 0
    assert lr_multiplier(0, 200, 0.0, 0.2, 0.0) == 1.0
    assert lr_multiplier(199, 200, 0.0, 0.2, 0.0) == pytest.approx(1 / 40)


def test_muon_momentum_ramp():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)


@pytest.mark.parametrize("shape", [(64, 64), (64, 256), (256, 64)])
def test_newton_schulz_orthogonalises(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape)
    x = zeropower_via_newtonschulz5(g).float()
    assert x.shape == g.shape
    s = torch.linalg.svdvals(x)
    # the quintic iteration lands singular values in roughly [0.7, 1.2], not exactly 1
    # (a square Gaussian's few tiniest ones stay small after 5 steps)
    assert s.max() < 1.3 and (s > 0.5).float().mean() > 0.9
    # same singular vectors as the exact polar factor U V^T
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (x * (u @ vh)).sum() / (x.norm() * (u @ vh).norm())
    assert cos > 0.95


def reference_muon_step(p, grad, buf, lr, momentum):
    # nanochat's Muon, one matrix at a time
    buf.lerp_(grad, 1 - momentum)
    g = grad.lerp(buf, momentum)
    g = zeropower_via_newtonschulz5(g)
    return p - lr * max(1, p.size(-2) / p.size(-1)) ** 0.5 * g.float()


def test_batched_muon_matches_per_matrix_reference():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(32, 16)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(16, 64))]
    opt = Muon(params, lr=0.02, momentum=0.9)
    bufs = [torch.zeros_like(p) for p in params]
    current = [p.detach().clone() for p in params]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        current = [reference_muon_step(c, g, b, 0.02, 0.9) for c, g, b in zip(current, grads, bufs)]
        for p, c in zip(params, current):
            torch.testing.assert_close(p.detach(), c, atol=1e-6, rtol=0)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_parameter_split_and_learning_rates():
    model = build_model(config_for_depth(2, 512, 32))  # width 128: s = (128/768)^-0.5
    adamw, muon = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    s = (128 / 768) ** -0.5
    by_name = {g["name"]: g for g in adamw.param_groups}
    assert by_name["embedding"]["lr"] == pytest.approx(0.2 * s)
    assert by_name["lm_head"]["lr"] == pytest.approx(0.004 * s)
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-10
    assert adamw.defaults["weight_decay"] == 0.0
    assert by_name["embedding"]["params"][0] is model.transformer.wte.weight
    assert by_name["lm_head"]["params"][0] is model.lm_head.weight
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_params == {id(p) for p in model.transformer.h.parameters()}
    # every parameter is optimised exactly once
    adam_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not (muon_params & adam_params)
    assert muon_params | adam_params == {id(p) for p in model.parameters()}
    apply_schedules([adamw, muon], lr_mult=0.5, momentum=0.9)
    assert by_name["embedding"]["lr"] == pytest.approx(0.1 * s)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01) and muon.param_groups[0]["momentum"] == 0.9


def test_optimizer_state_round_trips():
    torch.manual_seed(0)
    model = build_model(config_for_depth(1, 300, 16))
    opts = build_optimizers(model, 0.02, 0.2, 0.004)
    idx = torch.randint(0, 300, (2, 16))
    model(idx, idx).backward()
    for opt in opts:
        opt.step()
    states = [copy.deepcopy(opt.state_dict()) for opt in opts]  # as from disk: no shared tensors
    clone = build_model(config_for_depth(1, 300, 16))
    clone.load_state_dict(model.state_dict())
    clone_opts = build_optimizers(clone, 0.02, 0.2, 0.004)
    for opt, sd in zip(clone_opts, states):
        opt.load_state_dict(sd)
    for m, o in ((model, opts), (clone, clone_opts)):
        m.zero_grad()
        m(idx, idx).backward()
        for opt in o:
            opt.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
