"""The scaling_laws stage's work: fit the finished cells, write the JSON, the plots and a page.

Notable:
- Every cell of the grid must be finished (its cell.json): a fit over part of a grid would
  quietly move the optimum; the error names the missing cells and the command that runs them.
- artifacts/scaling_laws/scaling_laws.json holds the fit (a, b, D/N with intervals, every
  budget's vertex) and the cells' rows; metrics.json beside it the headline numbers.
- The page, reports/sweep/scaling_laws.{md,html}: the numbers, the a + b check, and the
  three charts (isoFLOP parabolas, the compute-optimal frontier, val BPB against FLOPs);
  the HTML embeds its images, so it opens anywhere.
- The fitted numbers and the charts also go to the sweep's MLflow parent run.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import re
from pathlib import Path

from nanoforge.common import REPORTS_DIR, write_json, write_text
from nanoforge.config import ConfigError, Params
from nanoforge.sweep.fit import FitError, ScalingFit, check_sum, fit_scaling, points_from_rows
from nanoforge.sweep.pipeline import SWEEP_DIR, cell_dir, finished_rows, grid_of

# beside artifacts/sweep/, not in it: the fit depends on that whole folder (every cell's row)
FIT_DIR = SWEEP_DIR.with_name("scaling_laws")
FIT_FILE = FIT_DIR / "scaling_laws.json"
METRICS_FILE = FIT_DIR / "metrics.json"
PAGE_DIR = REPORTS_DIR / "sweep"
FIGURES = ("isoflops.png", "frontier.png", "bpb_vs_flops.png")


def collect(params: Params) -> list[dict]:
    """The rows of every cell, or a ConfigError naming the unfinished ones."""
    rows, missing = finished_rows(grid_of(params))
    if missing:
        raise ConfigError(f"{len(missing)} cell(s) not finished: {', '.join(missing)}; run them with "
                          "`dvc repro sweep/dvc.yaml` (each resumes from its checkpoint)")
    return rows


def val_curve(name: str) -> tuple[list[float], list[float]]:
    path = cell_dir(name) / "train" / "val.csv"
    flops, bpb = [], []
    if path.exists():
        for r in csv.DictReader(path.read_text().splitlines()):
            if r.get("val_bpb") and r.get("flops"):
                flops.append(float(r["flops"]))
                bpb.append(float(r["val_bpb"]))
    return flops, bpb


def fit(params: Params, rows: list[dict]) -> tuple[ScalingFit | None, str | None]:
    """(the fit, None), or (None, why not) when the finished cells hold no law: an isoFLOP minimum at the
    grid's edge, a curve that bends down. Those are findings about the grid, not broken inputs: the
    stage still writes the cells, the raw curves and what to change (bad rows still raise)."""
    sw = params.sweep
    points = points_from_rows(rows, f"params_{sw.params_convention}")
    try:
        return fit_scaling(points, sw.bootstrap, sw.seed), None
    except FitError as exc:
        return None, str(exc)


def draw(result: ScalingFit | None, rows: list[dict], out: Path = PAGE_DIR, params: str = "no_embedding") -> list[Path]:
    from nanoforge.sweep import plots

    curves = [{"budget": r["budget"], "depth": r["depth"], **dict(zip(("flops", "val_bpb"), val_curve(r["name"])))}
              for r in rows]
    if result is None:  # no parabolas to draw: the measured isoFLOP points, so the edge minimum shows
        drawn = [plots.isoflop_points(rows, f"params_{params}", out / FIGURES[0]), False,
                 plots.bpb_vs_flops(curves, out / FIGURES[2])]
    else:
        drawn = [plots.isoflops(result, out / FIGURES[0]), plots.frontier(result, out / FIGURES[1]),
                 plots.bpb_vs_flops(curves, out / FIGURES[2])]
    for name, ok in zip(FIGURES, drawn):
        if not ok:
            (out / name).unlink(missing_ok=True)  # an earlier run's chart would describe another fit
    return [out / f for f, ok in zip(FIGURES, drawn) if ok]


NO_FIT_KEYS = ("a", "a_stderr", "a_low", "a_high", "b", "b_stderr", "b_low", "b_high", "ratio", "ratio_low",
               "ratio_high", "sum_deviation")


def summary(params: Params, result: ScalingFit | None, rows: list[dict], finding: str | None = None) -> dict:
    common = {"sum_tolerance": params.sweep.sum_tolerance, "params_convention": params.sweep.params_convention,
              "cells": rows}
    if result is None:
        return {**{k: None for k in NO_FIT_KEYS}, "level": 0.0, "budgets": [], "sum_ok": False,
                "sum_check": f"no fit: {finding}", "finding": finding, **common}
    ok, sentence = check_sum(result, params.sweep.sum_tolerance)
    return {**result.to_dict(), "sum_ok": ok, "sum_check": sentence, "finding": None, **common}


def _fmt(x: float, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def page_markdown(s: dict, figures: list[Path]) -> str:
    if s.get("finding"):
        return no_fit_markdown(s, figures)
    level = int(round(s["level"] * 100))
    lines = [
        "# Scaling laws", "",
        f"{len(s['cells'])} cells, N = params ({s['params_convention']}). Fitted from `artifacts/sweep/*/cell.json` "
        "by `dvc repro sweep/dvc.yaml`.", "",
        f"| quantity | value | ± stderr | {level}% bootstrap |", "|---|---:|---:|---|",
        f"| a (N* ∝ C^a) | {_fmt(s['a'])} | {_fmt(s['a_stderr'])} | [{_fmt(s['a_low'])}, {_fmt(s['a_high'])}] |",
        f"| b (D* ∝ C^b) | {_fmt(s['b'])} | {_fmt(s['b_stderr'])} | [{_fmt(s['b_low'])}, {_fmt(s['b_high'])}] |",
        f"| D*/N* (tokens per param) | {_fmt(s['ratio'], '.3g')} | | [{_fmt(s['ratio_low'], '.3g')}, "
        f"{_fmt(s['ratio_high'], '.3g')}] |", "",
        f"a + b ≈ 1: **{'ok' if s['sum_ok'] else 'not within tolerance'}**: {s['sum_check']}", "",
        "| budget C | N* | D* | D*/N* | val BPB at N* |", "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {b['budget']:.3g} | {b['n_star']:.3g} | {b['d_star']:.3g} | {b['ratio']:.3g} | {b['bpb_star']:.4f} |"
              for b in s["budgets"]]
    lines += [""] + cells_table(s)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def cells_table(s: dict) -> list[str]:
    lines = ["| cell | depth | N | steps | tokens | val BPB |", "|---|---:|---:|---:|---:|---:|"]
    return lines + [f"| {r['name']} | {r['depth']} | {r['params_' + s['params_convention']]:,} | {r['num_iterations']} | "
                    f"{r['tokens_trained']:,} | {r['val_bpb']:.4f} |" for r in s["cells"]]


def no_fit_markdown(s: dict, figures: list[Path]) -> str:
    lines = ["# Scaling laws", "",
             f"{len(s['cells'])} cells, N = params ({s['params_convention']}). **No scaling law from this grid**: "
             f"{s['finding']}.", "",
             "An isoFLOP minimum at the smallest model means every model of the grid is larger than compute-optimal "
             "at these budgets: raise `sweep.budgets` (or add smaller models); at the largest, the opposite. The "
             "measured points are below; the cells stay cached, so a wider grid trains only its new cells.", ""]
    lines += cells_table(s) + [""] + [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def page_html(markdown: str, figures: list[Path]) -> str:
    """The page's markdown (headings, tables, paragraphs, images: all it uses) as HTML, images embedded."""
    images = {p.name: base64.b64encode(p.read_bytes()).decode() for p in figures}
    out, table = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-:"):  # the separator row
                table.append(cells)
            continue
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            table = []
        if line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            out.append(f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{images.get(name, "")}"></p>')
        elif line.strip():
            text = html.escape(line)
            out.append("<p>" + re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", re.sub(r"`(.+?)`", r"<code>\1</code>", text)) + "</p>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Scaling laws</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}</style></head><body>"
            + "\n".join(out) + "</body></html>\n")


def write_all(s: dict, figures: list[Path]) -> None:
    markdown = page_markdown(s, figures)
    write_text(PAGE_DIR / "scaling_laws.md", markdown)
    write_text(PAGE_DIR / "scaling_laws.html", page_html(markdown, figures))
    keys = ("a", "a_stderr", "b", "b_stderr", "ratio", "sum_deviation")
    write_json(METRICS_FILE, {k: s[k] for k in keys if isinstance(s[k], float) and math.isfinite(s[k])})
    write_json(FIT_FILE, s)  # last: its presence means the rest is complete


def log_to_parent(parent: str | None, s: dict, figures: list[Path]) -> None:
    """The fit's numbers, its JSON and the charts on the sweep's MLflow parent run; never fails the stage."""
    if not parent:
        return
    try:
        from mlflow.tracking import MlflowClient

        from nanoforge.tracking import tracking_uri

        client = MlflowClient(tracking_uri=tracking_uri())
        for key in ("a", "a_stderr", "b", "b_stderr", "ratio", "sum_deviation"):
            if isinstance(s[key], float) and math.isfinite(s[key]):
                client.log_metric(parent, f"fit.{key}", s[key])
        client.set_tag(parent, "fit.sum_check", s["sum_check"][:5000])
        for path in [FIT_FILE, PAGE_DIR / "scaling_laws.html", *figures]:
            client.log_artifact(parent, str(path), "scaling_laws")
        client.set_terminated(parent, "FINISHED")
    except Exception as exc:
        print(f"[scaling_laws] warning: MLflow parent {parent}: {type(exc).__name__}: {exc}")
