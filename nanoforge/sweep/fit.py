"""Scaling laws from finished sweep cells: isoFLOP parabolas, then N* ~ C^a and D* ~ C^b.

Notable:
- Per budget C, val BPB is fitted as a parabola in ln N (least squares); its vertex is
  N*(C). A vertex outside the sampled params (or a curve that bends down) is refused,
  naming the budget: extrapolating a parabola is a guess, not a measurement.
- D*(C) is read from the cells' own tokens (ln D fitted linearly in ln N on the curve,
  at ln N*), not C / (6 N*): this project's N counts the embedding and LM head while its
  FLOPs per token leave the embedding out and add attention, so 6ND is off by their
  share (large for small models). On exact 6ND data both give the same D*.
- The power laws are straight lines in log-log space (least squares), with the
  standard errors from the fit's covariance (none with only 2 budgets) and a seeded
  residual bootstrap over cells: each replicate adds resampled parabola residuals to
  the fitted curves and refits everything; replicates whose vertex leaves the range
  are counted, not used.
- a + b = 1 when D* ∝ C / N*; `sum_deviation` is a + b - 1, what is left over.
- numpy only (no torch, no matplotlib): Dagster and the report import it cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

SUM_TOLERANCE = 0.1  # |a + b - 1| beyond this says the budgets' accounting or the fits disagree


class FitError(ValueError):
    """Cells that cannot give a scaling law. The message names the budget or cell."""


@dataclass(frozen=True)
class Point:
    """One finished cell: its budget, depth, params N, tokens D and final val BPB."""

    budget: float
    depth: int
    num_params: float
    tokens: float
    val_bpb: float
    name: str = ""


@dataclass
class IsoFlop:
    budget: float
    coeffs: tuple[float, float, float]  # val_bpb = c2 ln(N)^2 + c1 ln(N) + c0
    n_star: float
    d_star: float
    bpb_star: float
    points: list[Point]

    @property
    def ratio(self) -> float:
        return self.d_star / self.n_star


@dataclass
class PowerLaw:
    """y = coefficient * C^exponent, fitted in log-log space."""

    exponent: float
    coefficient: float
    stderr: float  # from the covariance; nan with 2 budgets
    interval: tuple[float, float] = (math.nan, math.nan)  # bootstrap percentile interval of the exponent

    def __call__(self, budget):
        return self.coefficient * np.asarray(budget, dtype=float) ** self.exponent


@dataclass
class ScalingFit:
    curves: list[IsoFlop]
    n_law: PowerLaw  # N*(C) ∝ C^a
    d_law: PowerLaw  # D*(C) ∝ C^b
    ratio: float  # tokens:params at the optimum, geometric mean over the budgets
    ratio_interval: tuple[float, float]
    level: float
    bootstrap: dict = field(default_factory=dict)  # replicates, used, seed

    @property
    def a(self) -> float:
        return self.n_law.exponent

    @property
    def b(self) -> float:
        return self.d_law.exponent

    @property
    def sum_deviation(self) -> float:
        return self.a + self.b - 1.0

    def to_dict(self) -> dict:
        """Plain numbers for metrics.json / MLflow / Dagster metadata."""
        return {
            "a": self.a, "a_stderr": self.n_law.stderr, "a_low": self.n_law.interval[0], "a_high": self.n_law.interval[1],
            "b": self.b, "b_stderr": self.d_law.stderr, "b_low": self.d_law.interval[0], "b_high": self.d_law.interval[1],
            "ratio": self.ratio, "ratio_low": self.ratio_interval[0], "ratio_high": self.ratio_interval[1],
            "sum_deviation": self.sum_deviation, "level": self.level, **{f"bootstrap_{k}": v for k, v in self.bootstrap.items()},
            "budgets": [{"budget": c.budget, "n_star": c.n_star, "d_star": c.d_star, "bpb_star": c.bpb_star,
                         "ratio": c.ratio, "coeffs": list(c.coeffs)} for c in self.curves],
        }


def points_from_rows(rows: Iterable[Mapping], params_key: str = "num_params") -> list[Point]:
    """Rows (dicts with budget, depth, num_params, tokens, val_bpb; optional name) -> checked Points.

    `tokens_trained` (the train stage's metric: what the cell really trained) wins over `tokens`
    (the grid's plan), so a row can be a grid Cell's dict updated with the cell's metrics.json.
    `params_key` names the row's N (e.g. a column holding `Cell.params("no_embedding")`).
    """
    out = []
    for i, row in enumerate(rows):
        name = str(row.get("name") or f"row {i}")
        try:
            tokens = row["tokens_trained"] if row.get("tokens_trained") is not None else row["tokens"]
            p = Point(float(row["budget"]), int(row["depth"]), float(row[params_key]), float(tokens),
                      float(row["val_bpb"]), name)
        except KeyError as exc:
            raise FitError(f"cell {name}: no {exc.args[0]!r} (needs budget, depth, num_params, tokens, val_bpb)") from None
        except (TypeError, ValueError):
            raise FitError(f"cell {name}: a value is missing or not a number: {dict(row)}") from None
        bad = [k for k in ("budget", "num_params", "tokens") if not (math.isfinite(getattr(p, k)) and getattr(p, k) > 0)]
        if bad or not math.isfinite(p.val_bpb):
            raise FitError(f"cell {name}: {bad or ['val_bpb']} must be finite (and positive): {dict(row)}")
        out.append(p)
    return out


def _by_budget(points: Sequence[Point]) -> dict[float, list[Point]]:
    groups: dict[float, list[Point]] = {}
    for p in points:
        groups.setdefault(p.budget, []).append(p)
    return {b: sorted(g, key=lambda p: p.num_params) for b, g in sorted(groups.items())}


def _vertex(budget: float, log_n: np.ndarray, bpb: np.ndarray) -> tuple[np.ndarray, float]:
    """Parabola coefficients and the ln N of its minimum, or a FitError naming the budget."""
    if len(np.unique(log_n)) < 3:
        raise FitError(f"budget {budget:.3g}: {len(np.unique(log_n))} distinct model sizes; an isoFLOP parabola "
                       "needs at least 3 (add depths to sweep.depths)")
    coeffs = np.polyfit(log_n, bpb, 2)
    if not coeffs[0] > 0:
        raise FitError(f"budget {budget:.3g}: val BPB against ln(params) bends down (curvature {coeffs[0]:.3g}), "
                       "no minimum to fit; the sizes may all sit on one side of the optimum")
    x_star = -coeffs[1] / (2 * coeffs[0])
    lo, hi = float(log_n.min()), float(log_n.max())
    if not lo < x_star < hi:
        side = "smaller than the smallest" if x_star <= lo else "larger than the largest"
        raise FitError(f"budget {budget:.3g}: the isoFLOP minimum (N* ~ {math.exp(x_star):.3g} params) is {side} "
                       f"model sampled ({math.exp(lo):.3g} .. {math.exp(hi):.3g}); widen sweep.depths on that side")
    return coeffs, float(x_star)


def isoflop(budget: float, points: Sequence[Point], bpb: np.ndarray | None = None) -> IsoFlop:
    """One budget's parabola and optimum; `bpb` replaces the points' val BPB (the bootstrap)."""
    log_n = np.log([p.num_params for p in points])
    y = np.array([p.val_bpb for p in points]) if bpb is None else bpb
    coeffs, x_star = _vertex(budget, log_n, y)
    # ln D is (nearly) linear in ln N along one budget (D = C / FLOPs per token)
    slope, intercept = np.polyfit(log_n, np.log([p.tokens for p in points]), 1)
    d_star = math.exp(intercept + slope * x_star)
    return IsoFlop(budget, tuple(float(c) for c in coeffs), math.exp(x_star), d_star,
                   float(np.polyval(coeffs, x_star)), list(points))


def power_law(budgets: Sequence[float], values: Sequence[float]) -> PowerLaw:
    """Least squares of ln(values) = k + e ln(C), with the exponent's standard error (nan when n = 2)."""
    x, y = np.log(np.asarray(budgets, float)), np.log(np.asarray(values, float))
    design = np.stack([x, np.ones_like(x)], axis=1)
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(x) - 2
    if dof > 0:
        s2 = float(np.sum((y - design @ beta) ** 2)) / dof
        stderr = math.sqrt(s2 * np.linalg.inv(design.T @ design)[0, 0])
    else:
        stderr = math.nan
    return PowerLaw(float(beta[0]), math.exp(beta[1]), stderr)


def _ratio(curves: Sequence[IsoFlop]) -> float:
    return math.exp(float(np.mean([math.log(c.ratio) for c in curves])))


def _laws(curves: Sequence[IsoFlop]) -> tuple[PowerLaw, PowerLaw]:
    budgets = [c.budget for c in curves]
    return power_law(budgets, [c.n_star for c in curves]), power_law(budgets, [c.d_star for c in curves])


def _bootstrap(groups: dict[float, list[Point]], curves: list[IsoFlop], replicates: int, seed: int) -> np.ndarray:
    """(used, 3) array of (a, b, ratio) over residual-bootstrap replicates."""
    fitted = {c.budget: np.polyval(c.coeffs, np.log([p.num_params for p in c.points])) for c in curves}
    residuals = np.concatenate([np.array([p.val_bpb for p in groups[b]]) - fitted[b] for b in groups])
    # raw residuals of a 3-coefficient fit understate the noise: inflate to the unbiased scale
    dof = len(residuals) - 3 * len(groups)
    if dof > 0:
        residuals = residuals * math.sqrt(len(residuals) / dof)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(replicates):
        try:
            reps = [isoflop(b, groups[b], fitted[b] + rng.choice(residuals, size=len(groups[b]))) for b in groups]
        except FitError:
            continue  # the vertex left the sampled range in this replicate: counted, not used
        n_law, d_law = _laws(reps)
        draws.append((n_law.exponent, d_law.exponent, _ratio(reps)))
    return np.array(draws).reshape(-1, 3)


def fit_scaling(points: Sequence[Point], replicates: int = 1000, seed: int = 0, level: float = 0.95) -> ScalingFit:
    """The isoFLOP curves and power laws from finished cells (FitError naming the budget when one cannot fit)."""
    groups = _by_budget(points)
    if len(groups) < 2:
        raise FitError(f"{len(groups)} budget(s) finished ({[f'{b:.3g}' for b in groups]}); a power law in C needs at "
                       "least 2 (3 for an uncertainty from the fit): add budgets to sweep.budgets")
    curves = [isoflop(b, g) for b, g in groups.items()]
    n_law, d_law = _laws(curves)
    draws = _bootstrap(groups, curves, replicates, seed) if replicates else np.empty((0, 3))
    tail = (1 - level) / 2 * 100
    bounds = lambda col: (tuple(float(v) for v in np.percentile(draws[:, col], [tail, 100 - tail]))  # noqa: E731
                          if len(draws) else (math.nan, math.nan))
    n_law.interval, d_law.interval = bounds(0), bounds(1)
    return ScalingFit(curves, n_law, d_law, _ratio(curves), bounds(2), level,
                      {"replicates": replicates, "used": len(draws), "seed": seed})


def check_sum(fit: ScalingFit, tolerance: float = SUM_TOLERANCE) -> tuple[bool, str]:
    """Whether a + b ≈ 1, with a sentence saying what was found."""
    dev = fit.sum_deviation
    found = f"a + b = {fit.a:.3f} + {fit.b:.3f} = {fit.a + fit.b:.3f} (deviation {dev:+.3f}, tolerance {tolerance})"
    if not math.isfinite(dev):
        return False, f"{found}: a fit is not finite"
    if abs(dev) <= tolerance:
        return True, found
    why = ("D* grows faster than C / N*: the tokens per FLOP rise with size (attention and embedding accounting), "
           "or a vertex sits near its curve's edge" if dev > 0 else
           "D* grows slower than C / N*: the FLOPs per token grow faster than N (attention at long sequences), "
           "or a vertex sits near its curve's edge")
    return False, f"{found}: {why}"
