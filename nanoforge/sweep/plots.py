"""The sweep's charts: isoFLOP curves, the compute-optimal frontier, val BPB against FLOPs.

Notable:
- The report's conventions (nanoforge/reporting/plots.py): Agg backend, its DPI, plain
  inputs, True when something was drawn. Written atomically: a half-written PNG never
  sits where DVC or the report would pick it up.
- One colour per budget throughout (viridis, low to high), so a curve, its vertex and
  its point on the frontier read as one thing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nanoforge.common import atomic_path
from nanoforge.reporting import plots as report_plots  # forces Agg before pyplot
from nanoforge.reporting.plots import plt
from nanoforge.sweep.fit import ScalingFit


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=report_plots._DPI, format="png")
    plt.close(fig)


def _colours(budgets: Sequence[float]) -> dict[float, tuple]:
    cmap = plt.get_cmap("viridis")
    order = sorted(set(budgets))
    return {b: cmap(0.1 + 0.8 * i / max(1, len(order) - 1)) for i, b in enumerate(order)}


def _finish_isoflops(fig, ax, path: Path, title: str) -> bool:
    """Val BPB against params N (log), one legend entry per budget."""
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("val bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def isoflops(fit: ScalingFit, path: Path) -> bool:
    """Val BPB against params per budget, the fitted parabola and its minimum."""
    if not fit.curves:
        return False
    colours = _colours([c.budget for c in fit.curves])
    fig, ax = plt.subplots(figsize=(8, 5))
    for c in fit.curves:
        n = np.array([p.num_params for p in c.points])
        y = np.array([p.val_bpb for p in c.points])
        grid = np.linspace(math.log(n.min()), math.log(n.max()), 100)
        colour = colours[c.budget]
        ax.scatter(n, y, color=colour, s=18, zorder=3)
        ax.plot(np.exp(grid), np.polyval(c.coeffs, grid), color=colour, linewidth=1.3, label=f"C = {c.budget:.3g}")
        ax.scatter([c.n_star], [c.bpb_star], marker="*", s=140, color=colour, edgecolor="black", zorder=4)
    return _finish_isoflops(fig, ax, path, "IsoFLOP curves (stars: fitted minima N*)")


def frontier(fit: ScalingFit, path: Path) -> bool:
    """N*(C) and D*(C), log-log, with the fitted power laws."""
    if not fit.curves:
        return False
    budgets = np.array([c.budget for c in fit.curves])
    span = np.geomspace(budgets.min(), budgets.max(), 50)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, values, law, name, colour in (
        (left, [c.n_star for c in fit.curves], fit.n_law, "N* (params)", "#08519c"),
        (right, [c.d_star for c in fit.curves], fit.d_law, "D* (tokens)", "#a63603"),
    ):
        ax.scatter(budgets, values, color=colour, zorder=3)
        low, high = law.interval
        ci = f" [{low:.3f}, {high:.3f}]" if math.isfinite(low) else ""
        ax.plot(span, law(span), color=colour, linewidth=1.3, label=f"∝ C^{law.exponent:.3f}{ci}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    left.set_title("Compute-optimal model size")
    right.set_title(f"Compute-optimal tokens (D*/N* ~ {fit.ratio:.3g})")
    _save(fig, path)
    return True


def isoflop_points(rows: Sequence[Mapping], params_key: str, path: Path) -> bool:
    """The measured isoFLOP curves without a fit (none was possible): val BPB against params per budget."""
    if not rows:
        return False
    budgets = sorted({float(r["budget"]) for r in rows})
    colours = _colours(budgets)
    fig, ax = plt.subplots(figsize=(8, 5))
    for budget in budgets:
        mine = sorted((float(r[params_key]), float(r["val_bpb"])) for r in rows if float(r["budget"]) == budget)
        ax.plot([n for n, _ in mine], [y for _, y in mine], color=colours[budget], marker="o", linewidth=1.0,
                label=f"C = {budget:.3g}")
    return _finish_isoflops(fig, ax, path, "IsoFLOP curves as measured (no fit: see the page)")


def bpb_vs_flops(cells: Sequence[Mapping], path: Path) -> bool:
    """Val BPB against training FLOPs for every cell: dicts with budget, flops, val_bpb (lists), optional depth."""
    drawn = [c for c in cells if any(v is not None for v in c.get("val_bpb", []))]
    if not drawn:
        return False
    colours = _colours([float(c["budget"]) for c in drawn])
    fig, ax = plt.subplots(figsize=(8, 5))
    seen = set()
    for c in drawn:
        xs, ys = report_plots._points(c["flops"], c["val_bpb"])
        xs, ys = [x for x in xs if x > 0], [y for x, y in zip(xs, ys) if x > 0]  # step 0 has no place on a log axis
        if not xs:
            continue
        budget = float(c["budget"])
        label = None if budget in seen else f"C = {budget:.3g}"
        seen.add(budget)
        ax.plot(xs, ys, color=colours[budget], marker="o", markersize=2.5, linewidth=0.9, label=label)
        if c.get("depth") is not None:  # the depth, not the whole cell name: a budget's cells end side by side
            ax.annotate(f"d{c['depth']}", (xs[-1], ys[-1]), fontsize=6, xytext=(3, 0), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("val bits per byte")
    ax.set_title("Validation BPB vs FLOPs, every cell")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True
