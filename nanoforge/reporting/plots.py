"""The report's charts: matplotlib on the Agg backend, one PNG per chart.

Notable:
- Agg is forced before pyplot is imported: no display, no GUI toolkit, the same
  pixels on a laptop, a CI box and a GPU node.
- Each function takes plain columns (lists of floats, None for a missing value)
  and a path, and returns whether it drew something: an empty series is no chart.
- Curves from different runs are smoothed the same way here (debiased EMA) so an
  overlay compares runs, not their logging noise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_DPI = 110


def _points(xs: Sequence, ys: Sequence) -> tuple[list[float], list[float]]:
    """Pairs where both values are finite numbers."""
    px, py = [], []
    for x, y in zip(xs, ys):
        if x is None or y is None:
            continue
        x, y = float(x), float(y)
        if math.isfinite(x) and math.isfinite(y):
            px.append(x)
            py.append(y)
    return px, py


def ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Debiased exponential moving average, as the train loop's loss_ema."""
    out, smooth = [], 0.0
    for i, v in enumerate(values):
        smooth = beta * smooth + (1 - beta) * v
        out.append(smooth / (1 - beta ** (i + 1)))
    return out


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def training_loss(steps: Sequence, loss: Sequence, loss_ema: Sequence, path: Path) -> bool:
    x, y = _points(steps, loss)
    xe, ye = _points(steps, loss_ema)
    if not x and not xe:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    if x:
        ax.plot(x, y, color="#9ecae1", linewidth=0.8, label="loss (raw)")
    if xe:
        ax.plot(xe, ye, color="#08519c", linewidth=1.6, label="loss (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return True


def val_bpb(steps: Sequence, flops: Sequence, bpb: Sequence, path: Path) -> bool:
    xs, ys = _points(steps, bpb)
    xf, yf = _points(flops, bpb)
    if not xs and not xf:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, y, label in ((left, xs, ys, "step"), (right, xf, yf, "training FLOPs")):
        if x:
            ax.plot(x, y, marker="o", markersize=3, color="#a63603")
        ax.set_xlabel(label)
        ax.set_ylabel("val bits per byte")
        ax.grid(alpha=0.3)
    if xf and min(xf) > 0:
        right.set_xscale("log")
    left.set_title("Validation BPB vs step")
    right.set_title("Validation BPB vs FLOPs")
    _save(fig, path)
    return True


def schedule_and_throughput(steps: Sequence, lr_mult: Sequence, tok_per_sec: Sequence, path: Path) -> bool:
    xl, yl = _points(steps, lr_mult)
    xt, yt = _points(steps, tok_per_sec)
    if not xl and not xt:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if xl:
        left.plot(xl, yl, color="#54278f")
    left.set_title("Learning-rate multiplier")
    left.set_xlabel("step")
    left.set_ylim(bottom=0)
    if xt:
        right.plot(xt, yt, color="#006d2c", linewidth=0.9)
    right.set_title("Throughput")
    right.set_xlabel("step")
    right.set_ylabel("tokens / s")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def core_tasks(labels: Sequence[str], centered: Sequence[float], core: float | None, path: Path) -> bool:
    pairs = [(l, float(c)) for l, c in zip(labels, centered) if c is not None and math.isfinite(float(c))]
    if not pairs:
        return False
    pairs.sort(key=lambda p: p[1])
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.32 * len(pairs) + 1.2)))
    colors = ["#2171b5" if v >= 0 else "#cb181d" for _, v in pairs]
    ax.barh([l for l, _ in pairs], [v for _, v in pairs], color=colors)
    ax.axvline(0, color="black", linewidth=0.8)
    if core is not None and math.isfinite(core):
        ax.axvline(core, color="#ff7f00", linestyle="--", linewidth=1.2, label=f"CORE = {core:.4g}")
        ax.legend(loc="lower right")
    ax.set_xlabel("centered accuracy (0 = random, 1 = perfect)")
    ax.set_title("CORE tasks")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return True


def loss_overlay(curves: Sequence[tuple[str, Sequence, Sequence]], path: Path) -> bool:
    """curves: (label, steps, loss) per run; the first is this run, drawn on top."""
    drawn = []
    for label, steps, loss in curves:
        x, y = _points(steps, loss)
        if x:
            drawn.append((label, x, ema(y)))
    if not drawn:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (label, x, y) in reversed(list(enumerate(drawn))):
        ax.plot(x, y, linewidth=2.0 if i == 0 else 1.0, alpha=1.0 if i == 0 else 0.8, label=label, zorder=10 - i)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss, EMA 0.9")
    ax.set_title("Training loss: this run against earlier runs")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8)
    _save(fig, path)
    return True
