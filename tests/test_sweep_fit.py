"""The scaling-law sweep's library: the grid's checks, the fit on synthetic laws with known exponents, the plots.

The synthetic loss is Chinchilla's form L(N, D) = E + A/N^alpha + B/D^beta on isoFLOP
budgets (D = C / 6N), whose compute-optimal exponents are known in closed form:
N* ∝ C^(beta/(alpha+beta)), D* ∝ C^(alpha/(alpha+beta)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanoforge.sweep.fit import FitError, Point, check_sum, fit_scaling, points_from_rows
from nanoforge.sweep.grid import GridError, build_grid, cell_name, estimate_hours, model_counts

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28  # Hoffmann et al. 2022, approach 3
TRUE_A, TRUE_B = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
NANOCHAT_BUDGETS = [1e18, 2.15e18, 4.64e18, 1e19]


def n_opt(budget: float) -> float:
    return G * (budget / 6) ** TRUE_A


def loss(n: float, d: float) -> float:
    return E + A / n**ALPHA + B / d**BETA


def synthetic(budgets, sizes_for, noise: float = 0.0, seed: int = 0) -> list[Point]:
    rng = np.random.default_rng(seed)
    points = []
    for budget in budgets:
        for depth, n in enumerate(sizes_for(budget)):
            d = budget / (6 * n)
            points.append(Point(budget, depth, n, d, loss(n, d) + rng.normal(0, noise), cell_name(budget, depth)))
    return points


FIXED_SIZES = np.geomspace(2e7, 2e9, 9)  # one set of models for every budget, as fixed depths give


def test_exponents_recovered_on_a_centred_grid():
    pts = synthetic([1e17, 1e18, 1e19, 1e20], lambda c: n_opt(c) * np.geomspace(1 / 8, 8, 7))
    fit = fit_scaling(pts, replicates=0)
    assert fit.a == pytest.approx(TRUE_A, abs=0.005)
    assert fit.b == pytest.approx(TRUE_B, abs=0.005)
    for c in fit.curves:  # the parabola's vertex vs the true optimum: a few percent on a factor-64 span
        assert c.n_star == pytest.approx(n_opt(c.budget), rel=0.08)
        assert c.d_star == pytest.approx(c.budget / (6 * c.n_star), rel=1e-9)
    ok, found = check_sum(fit)
    assert ok and abs(fit.sum_deviation) < 1e-9, found


def test_exponents_recovered_with_fixed_sizes_across_budgets():
    """Fixed depths: the optimum moves across the same models, so each vertex sits elsewhere in its curve."""
    fit = fit_scaling(synthetic(NANOCHAT_BUDGETS, lambda c: FIXED_SIZES), replicates=0)
    assert fit.a == pytest.approx(TRUE_A, abs=0.03)
    assert fit.b == pytest.approx(TRUE_B, abs=0.03)
    assert math.isfinite(fit.n_law.stderr) and fit.n_law.stderr < 0.03
    expected_ratio = np.exp(np.mean([np.log(c / (6 * n_opt(c) ** 2)) for c in NANOCHAT_BUDGETS]))
    assert fit.ratio == pytest.approx(expected_ratio, rel=0.2)


def test_noisy_fit_bootstrap_covers_the_truth():
    pts = synthetic([1e17, 1e18, 1e19, 1e20], lambda c: n_opt(c) * np.geomspace(1 / 10, 10, 9), noise=0.003, seed=3)
    fit = fit_scaling(pts, replicates=200, seed=7)
    low, high = fit.n_law.interval
    assert low < TRUE_A < high and high - low < 0.2, (low, high)
    low, high = fit.d_law.interval
    assert low < TRUE_B < high, (low, high)
    assert fit.ratio_interval[0] < fit.ratio < fit.ratio_interval[1]
    assert fit.bootstrap["used"] > 0.9 * fit.bootstrap["replicates"]
    # seeded: the same seed gives the same interval
    assert fit_scaling(pts, replicates=200, seed=7).n_law.interval == fit.n_law.interval
    summary = fit.to_dict()
    assert all(math.isfinite(summary[k]) for k in ("a", "b", "a_low", "a_high", "ratio", "sum_deviation"))
    assert len(summary["budgets"]) == 4


def test_minimum_at_the_edge_names_the_budget():
    # at 1e21 the optimum lies beyond the largest fixed size
    pts = synthetic([1e18, 1e19, 1e21], lambda c: FIXED_SIZES[:6])
    with pytest.raises(FitError, match=r"budget 1e\+21: .*larger than the largest"):
        fit_scaling(pts, replicates=0)
    pts = synthetic([1e15, 1e18], lambda c: FIXED_SIZES)
    with pytest.raises(FitError, match=r"budget 1e\+15: .*smaller than the smallest"):
        fit_scaling(pts, replicates=0)


def test_fit_refuses_too_little():
    with pytest.raises(FitError, match="1 budget"):
        fit_scaling(synthetic([1e18], lambda c: FIXED_SIZES), replicates=0)
    with pytest.raises(FitError, match="2 distinct model sizes"):
        fit_scaling(synthetic([1e18, 1e19], lambda c: FIXED_SIZES[3:5]), replicates=0)
    with pytest.raises(FitError, match="cell c1e18-d4: .*val_bpb"):
        points_from_rows([{"name": "c1e18-d4", "budget": 1e18, "depth": 4, "num_params": 1e6, "tokens": 1e9,
                           "val_bpb": float("nan")}])
    cell = build_grid([1e13], [2, 3, 4], vocab_size=4096, sequence_len=64, total_batch_size=512)[0]
    (p,) = points_from_rows([{**cell.to_dict(), "tokens_trained": 1234, "val_bpb": 1.5}])
    assert (p.name, p.budget, p.depth, p.num_params, p.tokens) == (cell.name, 1e13, 2, cell.num_params, 1234)
    (p,) = points_from_rows([{**cell.to_dict(), "n": cell.params("no_embedding"), "val_bpb": 1.5}], params_key="n")
    assert p.num_params == cell.num_params - cell.params_wte and p.tokens == cell.tokens
    with pytest.raises(FitError, match="no 'tokens'"):
        points_from_rows([{"budget": 1e18, "depth": 4, "num_params": 1e6, "val_bpb": 1.0}])


def test_grid_counts_match_the_model_and_the_train_horizon():
    torch = pytest.importorskip("torch")
    from nanoforge.config import TrainConfig
    from nanoforge.model.gpt import GPT, config_for_depth
    from nanoforge.training.plan import resolve_horizon

    for depth, kv in ((2, None), (4, None), (6, 1), (12, 2)):
        with torch.device("meta"):
            model = GPT(config_for_depth(depth, 4100, 256, kv))
        assert model_counts(depth, 4100, 256, kv) == (model.num_params(), model.estimate_flops())
    cells = build_grid([3e12, 1e13], [2, 3, 4], vocab_size=4096, sequence_len=64, total_batch_size=512)
    assert [c.name for c in cells] == ["c3e12-d2", "c3e12-d3", "c3e12-d4", "c1e13-d2", "c1e13-d3", "c1e13-d4"]
    with torch.device("meta"):
        model = GPT(config_for_depth(3, 4096, 64))
    c = cells[1]
    assert (c.params_wte, c.params_lm_head) == (model.transformer.wte.weight.numel(), model.lm_head.weight.numel())
    assert c.params("transformer") == sum(p.numel() for p in model.transformer.h.parameters())
    assert c.params("no_embedding") == c.params("transformer") + c.params_lm_head == c.num_params - c.params_wte
    with pytest.raises(GridError, match="params convention 'kaplan'"):
        c.params("kaplan")
    for c in cells:
        cfg = TrainConfig(depth=c.depth, max_seq_len=64, device_batch_size=8, total_batch_size=512,
                          num_iterations=None, target_flops=c.budget)
        assert c.num_iterations == resolve_horizon(cfg, c.num_params, c.flops_per_token)[0]
        assert c.overrides() == {"train.depth": c.depth, "train.target_flops": c.budget, "train.num_iterations": None}
        assert c.flops == pytest.approx(c.budget, rel=0.1)


def test_cell_names_are_stable():
    assert [cell_name(b, 10) for b in NANOCHAT_BUDGETS] == ["c1e18-d10", "c2.15e18-d10", "c4.64e18-d10", "c1e19-d10"]
    assert cell_name(1e15, 4) == "c1e15-d4" and cell_name(3.5e12, 2) == "c3.5e12-d2"


def test_grid_refuses_before_any_work():
    shape = dict(vocab_size=4096, sequence_len=64, total_batch_size=512)
    with pytest.raises(GridError, match=r"sweep.depths=\[4\]: .*at least 3 depths"):
        build_grid([1e13], [4], **shape)
    with pytest.raises(GridError, match="sweep.depths: \\[4\\] listed twice"):
        build_grid([1e13], [4, 4, 5], **shape)
    # 2e10 FLOPs: 7 steps for depth 2, 2 for depth 4
    with pytest.raises(GridError, match=r"sweep.budgets: 3 cell.*\n  c2e10-d2: \d steps .*\n.*c2e10-d3.*\n"
                                        r"  c2e10-d4: \d steps .*sweep.budgets >= 1.33e11") as err:
        build_grid([2e10, 1e13], [2, 3, 4], **shape)
    assert "c1e13" not in str(err.value)
    with pytest.raises(GridError, match="sweep.depths: depth 6 .*no model shape.*n_kv_head=2"):
        build_grid([1e13], [4, 6, 8], vocab_size=4096, sequence_len=64, total_batch_size=512, n_kv_head=2)
    with pytest.raises(GridError, match="sweep.depths: \\[0\\]: .*at least 1"):
        build_grid([1e13], [0, 2, 4], **shape)
    with pytest.raises(GridError, match="sweep.budgets: \\[-1.0\\]"):
        build_grid([-1], [2, 3, 4], **shape)


def test_estimated_hours():
    # nanochat's runs/scaling_laws.sh grid: 4 budgets x depths 10, 12, .., 20
    cells = build_grid(NANOCHAT_BUDGETS, list(range(10, 21, 2)), vocab_size=65536, sequence_len=2048,
                       total_batch_size=524288)
    hours = estimate_hours(cells, flops_per_second=4e14)  # ~40% MFU on one H100-class GPU
    assert hours["total_hours"] == pytest.approx(sum(c.flops for c in cells) / 4e14 / 3600)
    assert hours["total_hours"] == pytest.approx(6 * sum(NANOCHAT_BUDGETS) / 4e14 / 3600, rel=0.05)
    assert set(hours["per_cell_hours"]) == {c.name for c in cells}
    with pytest.raises(GridError, match="must be positive"):
        estimate_hours(cells, 0)


def test_plots_are_written(tmp_path):
    from nanoforge.sweep import plots

    pts = synthetic(NANOCHAT_BUDGETS, lambda c: FIXED_SIZES, noise=0.002, seed=1)
    fit = fit_scaling(pts, replicates=50)
    assert plots.isoflops(fit, tmp_path / "isoflops.png")
    assert plots.frontier(fit, tmp_path / "frontier.png")
    curves = [{"name": p.name, "depth": p.depth, "budget": p.budget, "flops": [0, p.budget / 2, p.budget],
               "val_bpb": [None, p.val_bpb + 0.1, p.val_bpb]} for p in pts]
    assert plots.bpb_vs_flops(curves, tmp_path / "bpb_vs_flops.png")
    assert not plots.bpb_vs_flops([], tmp_path / "empty.png")
    for name in ("isoflops.png", "frontier.png", "bpb_vs_flops.png"):
        data = (tmp_path / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "empty.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpb_vs_flops.png", "frontier.png", "isoflops.png"]  # no temps


def test_fit_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, nanoforge.sweep.fit, nanoforge.sweep.grid; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
