"""The sweep grid: compute budgets (FLOPs) x depths -> cells, checked before any work.

Notable:
- A cell's name is stable and readable, `c1e15-d4` (budget in shortest scientific
  form, depth), so it can name a folder (artifacts/sweep/<cell>/), a DVC matrix item
  and a Dagster partition, and adding a budget never renames an old cell.
- Params and FLOPs per token come from the model's shape rule (shape.py) counted here
  without torch, the same numbers as GPT.num_params() / estimate_flops(), so params
  validation can run anywhere. A cell trains `round(C / (flops_per_token * batch))`
  steps, exactly as the train stage's `train.target_flops` horizon (plan.resolve_horizon).
- A grid with fewer than `min_depths` depths has no isoFLOP curve to fit (a parabola
  needs 3 points), and a budget that gives a depth only a few optimizer steps measures
  the warmup, not the model: both are refused naming the cell and the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from nanoforge.config import budget_label  # noqa: F401  (the config checks budgets in this form)
from nanoforge.model.shape import config_for_depth

MIN_STEPS = 10  # fewer optimizer steps than this and val BPB says more about the schedule than the size
MIN_DEPTHS = 3  # points per isoFLOP parabola (3 coefficients)
# Which parameters count as N in the fit (nanochat's dev/scaling_analysis.ipynb offers the same three and
# uses no_embedding): the embedding is a lookup, not compute, and dominates N at small depths.
PARAM_CONVENTIONS = ("total", "no_embedding", "transformer")


class GridError(ValueError):
    """A sweep grid that cannot give a fit. The message names the cell and the key."""


@dataclass(frozen=True)
class Cell:
    name: str
    budget: float  # training FLOPs (the train.target_flops of this cell)
    depth: int
    num_params: int  # all parameters, embedding and LM head included (GPT.num_params)
    flops_per_token: int  # GPT.estimate_flops
    num_iterations: int  # optimizer steps at this budget
    tokens: int  # num_iterations * total_batch_size
    params_wte: int = 0  # the token embedding
    params_lm_head: int = 0

    def params(self, convention: str = "total") -> int:
        """N under one of PARAM_CONVENTIONS: total, no_embedding (lm head + blocks), transformer (blocks only)."""
        if convention not in PARAM_CONVENTIONS:
            raise GridError(f"params convention {convention!r}: expected one of {', '.join(PARAM_CONVENTIONS)}")
        drop = {"total": 0, "no_embedding": self.params_wte, "transformer": self.params_wte + self.params_lm_head}
        return self.num_params - drop[convention]

    @property
    def flops(self) -> float:
        """What the cell really trains: the budget rounded to whole steps."""
        return float(self.flops_per_token) * self.tokens

    def overrides(self) -> dict:
        """The train section keys this cell sets (the target_flops horizon, no explicit steps)."""
        return {"train.depth": self.depth, "train.target_flops": self.budget, "train.num_iterations": None}

    def to_dict(self) -> dict:
        return asdict(self)


def cell_name(budget: float, depth: int) -> str:
    return f"c{budget_label(budget)}-d{depth}"


def model_counts(depth: int, vocab_size: int, sequence_len: int, n_kv_head: int | None = None) -> tuple[int, int]:
    """(params, FLOPs per token) of the GPT of this depth, as GPT.num_params() and estimate_flops() count them."""
    c = config_for_depth(depth, vocab_size, sequence_len, n_kv_head)
    kv = c.n_kv_head * c.head_dim
    per_layer = 2 * c.n_embd * c.n_embd + 2 * c.n_embd * kv + 8 * c.n_embd * c.n_embd  # q, proj, k, v; MLP 4x
    embedding = c.padded_vocab_size * c.n_embd
    params = c.n_layer * per_layer + 2 * embedding  # untied embedding and LM head
    flops = 6 * (params - embedding) + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
    return params, flops


def _unique(values: Sequence, key: str) -> None:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise GridError(f"{key}: {seen} listed twice; each value makes one column of the grid")


def build_grid(budgets: Sequence[float], depths: Sequence[int], vocab_size: int, sequence_len: int,
               total_batch_size: int, n_kv_head: int | None = None, min_steps: int = MIN_STEPS,
               min_depths: int = MIN_DEPTHS) -> list[Cell]:
    """Every (budget, depth) cell, budgets ascending then depths; a GridError before any work when one cannot run."""
    budgets, depths = [float(b) for b in budgets], [int(d) for d in depths]
    if not budgets:
        raise GridError("sweep.budgets is empty: give at least one compute budget (FLOPs)")
    _unique(budgets, "sweep.budgets")
    _unique(depths, "sweep.depths")
    if len(depths) < min_depths:
        raise GridError(f"sweep.depths={depths}: an isoFLOP curve (a parabola in log params) needs at least "
                        f"{min_depths} depths per budget, this grid has {len(depths)}")
    bad_budget = [b for b in budgets if not b > 0 or b != b or b == float("inf")]
    if bad_budget:
        raise GridError(f"sweep.budgets: {bad_budget} must be positive finite FLOPs")
    if min(depths) < 1:
        raise GridError(f"sweep.depths: {[d for d in depths if d < 1]}: a depth is a number of layers, at least 1")
    names = [cell_name(b, d) for b in budgets for d in depths]
    _unique(names, "sweep.budgets (budgets equal to 6 significant digits share a cell name)")
    cells, short = [], []
    for depth in sorted(depths):
        try:
            params, fpt = model_counts(depth, vocab_size, sequence_len, n_kv_head)
            shape = config_for_depth(depth, vocab_size, sequence_len, n_kv_head)
            embedding = shape.padded_vocab_size * shape.n_embd  # the embedding's size, and the LM head's (untied)
        except ValueError as exc:
            raise GridError(f"sweep.depths: depth {depth} (cell {cell_name(budgets[0], depth)}) has no model shape: "
                            f"{exc}") from None
        for budget in budgets:
            # the train stage's horizon for target_flops (plan.resolve_horizon), to the step
            steps = max(1, round(budget / (fpt * total_batch_size)))
            cell = Cell(cell_name(budget, depth), budget, depth, params, fpt, steps, steps * total_batch_size,
                        embedding, embedding)
            if steps < min_steps:
                short.append(cell)
            cells.append(cell)
    if short:
        lines = [f"  {c.name}: {c.num_iterations} steps ({c.num_params:,} params, {c.flops_per_token:,} FLOPs/token, "
                 f"{total_batch_size:,} tokens/step); it needs sweep.budgets >= "
                 f"{min_steps * c.flops_per_token * total_batch_size:.3g}".replace("+", "") for c in short]
        raise GridError(f"sweep.budgets: {len(short)} cell(s) get fewer than {min_steps} optimizer steps:\n"
                        + "\n".join(lines)
                        + "\n  Raise the budget, drop the depth from sweep.depths, or lower train.total_batch_size")
    return sorted(cells, key=lambda c: (c.budget, c.depth))


def estimate_hours(cells: Sequence[Cell], flops_per_second: float) -> dict:
    """Wall-clock hours of a grid at an achieved training throughput (model FLOPs/s: tok/s x FLOPs/token).

    FLOPs/s carries over between depths far better than tokens/s (a deeper model is slower per
    token, not per FLOP), so one measured run prices the whole grid.
    """
    if not flops_per_second > 0:
        raise GridError(f"throughput {flops_per_second!r} FLOPs/s: must be positive")
    per_cell = {c.name: c.flops / flops_per_second / 3600 for c in cells}
    return {"total_hours": sum(per_cell.values()), "per_cell_hours": per_cell, "flops_per_second": flops_per_second}
