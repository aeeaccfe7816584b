"""train.fp8: nanochat HEAD's tensorwise fp8 matmuls, checked on the CPU (PyTorch emulates _scaled_mm there).

Against nanochat's own module when NANOFORGE_NANOCHAT_HEAD names a checkout (tests/test_recipe2026.py's
convention), bit for bit; without one, against a bf16 matmul within fp8's precision.
"""

import pytest
import torch
import torch.nn as nn

from nanoforge.model import fp8
from tests.test_recipe2026 import nanochat_head  # the checkout in NANOFORGE_NANOCHAT_HEAD, or a skip
from tests.test_train import template  # noqa: F401  (the module fixture: shards and a tokenizer)


def operands(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(384, 256, generator=g) * 0.05).requires_grad_()
    grad = torch.randn(64, 384, generator=g).to(torch.bfloat16)
    return x, w, grad


def run(matmul, x, w, grad):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = matmul.apply(x, w)
    out.backward(grad)
    return out, x.grad, w.grad


def test_the_three_matmuls_are_nanochats_bit_for_bit(monkeypatch):
    nanochat_head(monkeypatch)  # skips with the reason when no checkout is given
    from nanochat.fp8 import _Float8Matmul as Theirs

    ops = operands()
    for ours, theirs in zip(run(fp8._Float8Matmul, *ops), run(Theirs, *ops)):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_fp8_matmuls_stay_within_fp8_precision_of_bf16():
    x, w, grad = operands()
    out, gx, gw = run(fp8._Float8Matmul, x, w, grad)
    xr, wr = x.detach().clone().float().requires_grad_(), w.detach().clone().requires_grad_()
    ref = xr @ wr.t()
    ref.backward(grad.float())
    for ours, exact in ((out, ref), (gx, xr.grad), (gw, wr.grad)):
        rel = (ours.float() - exact).norm() / exact.norm()
        assert 1e-4 < rel < 0.1, rel  # really quantized (e4m3 ~2^-4, e5m2 ~2^-3), not wrong
    assert out.dtype == gx.dtype == torch.bfloat16 and gw.dtype == torch.float32  # the fp32 weight's gradient


def test_convert_takes_nanochats_layers_and_full_precision_swaps_back():
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 64, bias=False),  # 64 < 128: kept
                          nn.Sequential(nn.Linear(130, 256, bias=False)))  # 130 not divisible by 16: kept
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    assert fp8.convert(model) == (1, 3)
    assert isinstance(model[0], fp8.Float8Linear) and type(model[1]) is nn.Linear and type(model[2][0]) is nn.Linear
    assert [m.weight for m in model.modules() if isinstance(m, nn.Linear)] == weights  # shared, not copied
    x = torch.randn(2, 3, 256)
    with fp8.full_precision(model):
        assert type(model[0]) is nn.Linear and model[0].weight is weights[0]
        exact = model[0](x)
    assert isinstance(model[0], fp8.Float8Linear)
    assert torch.equal(exact, x @ weights[0].t())
    approx = model[0](x)
    assert approx.shape == (2, 3, 512) and approx.dtype == torch.bfloat16
    assert (approx.float() - exact).norm() / exact.norm() < 0.1


def test_where_fp8_runs_and_why_not(monkeypatch):
    monkeypatch.delenv(fp8.CPU_ENV, raising=False)
    reason = fp8.unsupported(torch.device("cpu"))
    assert reason and "compute capability 8.9+" in reason and "not cpu" in reason
    monkeypatch.setenv(fp8.CPU_ENV, "1")
    assert fp8.unsupported(torch.device("cpu")) is None


@pytest.mark.cluster  # two training runs, one in emulated fp8 (~1 min on 2 cores): make test-slurm
def test_a_run_trains_in_fp8_where_allowed_evaluates_without_it_and_skips_it_with_the_reason(template, tmp_path):
    import json

    from tests.test_train import clone, read_csv, run_train, write_params

    runs = {}
    for name, env in (("fp8", {fp8.CPU_ENV: "1"}), ("skipped", {})):
        root = clone(template, tmp_path / name)
        # depth 2: width 128, the smallest model with Linear layers fp8 takes (both dims >= 128)
        write_params(root, depth=2, num_iterations=3, eval_every=3, sample_every=0, save_every=0, fp8=True)
        proc = run_train(root, **env)
        details = json.loads((root / "artifacts/train/details.json").read_text())
        runs[name] = (proc, details, read_csv(root / "artifacts/train/steps.csv"), read_csv(root / "artifacts/train/val.csv"))
    proc, details, steps, val = runs["fp8"]
    assert details["fp8"] == "on: 13 of 13 Linear layers", details["fp8"]  # 2 blocks x 6 and the LM head (128 x 320)
    _, skipped, plain_steps, plain_val = runs["skipped"]
    assert skipped["fp8"].startswith("skipped: fp8 matmuls need a CUDA GPU of compute capability 8.9+")
    assert "train.fp8: skipped, training without it" in runs["skipped"][0].stderr + runs["skipped"][0].stdout
    # the same init; evaluation without fp8 gives the same step-0 val BPB; the fp8 steps differ, a little
    assert val[0]["val_bpb"] == plain_val[0]["val_bpb"]
    losses = [float(r["loss"]) for r in steps]
    plain = [float(r["loss"]) for r in plain_steps]
    # step 1 is ln(vocab) either way (the LM head starts at zero); then fp8's rounding shows
    assert losses[1] != plain[1] and all(abs(a - b) < 0.05 * b for a, b in zip(losses, plain)), (losses, plain)
