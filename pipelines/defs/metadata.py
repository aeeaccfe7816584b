"""What an asset shows in the Dagster UI, read from the files its DVC stage wrote.

Notable:
- Generic over dvc.yaml: every stage's `metrics:` files become metadata (numbers
  are charted over time by the UI), a dict of records (CORE's per-task results,
  the tokenizer's compression table) becomes a markdown table, and every `plots:`
  file with x/y becomes a PNG embedded in markdown (the UI renders data URIs).
- The same metadata is attached whether the stage ran or DVC skipped it as up to
  date, so a no-op materialization still says what the asset holds (the report's
  headline numbers come from its reports/summary.json; an HTML output gets a path).
- Numbers are rounded for people by nanoforge/formats.py, the same helper as the
  report and the terminal (val BPB to 4 decimals, MFU as `mfu_percent`); the files
  keep full precision. `humanize()` does the same to what a stage reports over Pipes.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import dagster as dg

from nanoforge.formats import for_dagster, human, kind_of
from pipelines.dvc_graph import Stage

MAX_TABLE_ROWS = 60
MAX_SCALARS = 40  # per metrics file; the UI is for people


def _number(value: Any) -> dg.MetadataValue | None:
    """A number as metadata; round it with formats.for_dagster first."""
    if isinstance(value, bool):
        return dg.MetadataValue.bool(value)
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    if isinstance(value, float):
        return dg.MetadataValue.float(value) if math.isfinite(value) else dg.MetadataValue.text(str(value))
    return None


def _fmt(value: Any, key: str = "") -> str:
    if isinstance(value, float):  # a known quantity as everywhere else; anything else to 4 significant digits
        return human(key, value) if kind_of(key) != "number" else f"{value:.4g}"
    if value is None:
        return "—"
    return str(value).replace("|", "\\|").replace("\n", " ")


def is_records(value: Any) -> bool:
    """{label: {field: scalar}}, e.g. CORE's tasks."""
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values()) for v in value.values()))


def records_table(records: dict[str, dict], label: str = "name") -> str:
    columns: list[str] = []
    for row in records.values():
        for key in row:
            if key not in columns:
                columns.append(key)
    lines = [f"| {label} | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for i, (name, row) in enumerate(records.items()):
        if i == MAX_TABLE_ROWS:
            lines.append(f"| … {len(records) - MAX_TABLE_ROWS} more | " + " | ".join("" for _ in columns) + " |")
            break
        lines.append(f"| {_fmt(name)} | " + " | ".join(_fmt(row.get(c), c) for c in columns) + " |")
    return "\n".join(lines)


def _json_object(path: Path) -> dict:
    """The JSON object in `path`, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def metrics_metadata(path: Path) -> dict[str, dg.MetadataValue]:
    """Scalars of a metrics JSON as metadata; records as markdown tables; small dicts flattened."""
    data = _json_object(path)
    out: dict[str, dg.MetadataValue] = {}
    for key, value in data.items():
        if len(out) >= MAX_SCALARS:
            break
        if (mv := _number(for_dagster(key, value)[1])) is not None:
            out[for_dagster(key, value)[0]] = mv
        elif isinstance(value, str) and len(value) <= 200:
            out[key] = dg.MetadataValue.text(value)
        elif is_records(value):
            out[f"{key}_table"] = dg.MetadataValue.md(records_table(value, label=key.rstrip("s") or key))
        elif isinstance(value, dict):
            for sub, subvalue in value.items():
                name, number = for_dagster(f"{key}.{sub}", subvalue)
                if (mv := _number(number)) is not None:
                    out[name] = mv
    return out


def read_series(path: Path, x: str | None, y: str) -> tuple[list[float], list[float]]:
    """x and y columns of a DVC plot file (CSV, TSV or a JSON list of records)."""
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if isinstance(rows, dict):  # {"key": [records]} is also a DVC plot layout
            rows = next((v for v in rows.values() if isinstance(v, list)), [])
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    xs, ys = [], []
    for i, row in enumerate(rows):
        try:
            yv = float(row[y])
            xv = float(row[x]) if x else float(i)
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(yv):
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def plot_png(xs: list[float], ys: list[float], x: str, y: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
    ax.plot(xs, ys, linewidth=1.0, color="#4f46e5", alpha=0.45 if len(ys) > 20 else 1.0, label=y)
    if len(ys) > 20:  # a debiased EMA makes a noisy loss readable
        ema, smooth = 0.0, []
        for i, v in enumerate(ys, start=1):
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema / (1 - 0.9 ** i))
        ax.plot(xs, smooth, linewidth=1.6, color="#dc2626", label=f"{y} (EMA)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_metadata(stage: Stage, root: Path) -> dict[str, dg.MetadataValue]:
    """Each `plots:` output with a y column, as an embedded PNG (plus the file path)."""
    out: dict[str, dg.MetadataValue] = {}
    for plot in stage.outs_of("plot"):
        y = plot.options.get("y")
        path = root / plot.path
        if not isinstance(y, str) or not path.exists():
            continue
        x = plot.options.get("x") if isinstance(plot.options.get("x"), str) else None
        try:
            xs, ys = read_series(path, x, y)
            if len(ys) < 2:
                continue
            png = plot_png(xs, ys, x or "index", y, f"{stage.name}: {y}")
        except Exception as exc:  # a plot is a nicety; never fail the asset over it
            out[f"{y}_curve_error"] = dg.MetadataValue.text(f"{type(exc).__name__}: {exc}")
            continue
        name = f"{y}_plot"  # e.g. loss_plot (a stage may report its own `loss_curve` table)
        out[name] = dg.MetadataValue.md(f"![{y} vs {x or 'index'}](data:image/png;base64,{base64.b64encode(png).decode()})")
        out[f"{name}_file"] = dg.MetadataValue.path(plot.path)
    return out


def humanize(metadata: dict[str, Any]) -> dict[str, Any]:
    """Raw numbers (e.g. what a stage reported over Pipes) rounded for people, MFU as `mfu_percent`."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        raw = getattr(value, "value", value) if isinstance(value, dg.FloatMetadataValue) else value
        name, number = for_dagster(key, raw)
        out[name] = number if number is not raw else value
    return out


def html_metadata(stage: Stage, root: Path) -> dict[str, dg.MetadataValue]:
    """Each HTML output as a path (the report's `report_html`), so an up-to-date report still links its page."""
    return {f"{Path(o.path).stem}_html": dg.MetadataValue.path(str((root / o.path).resolve()))
            for o in stage.outs if o.path.endswith(".html") and (root / o.path).exists()}


def details_tables(path: Path) -> dict[str, dg.MetadataValue]:
    """The record tables of a plain `details.json` output (CORE per task), not its scalars (timings, ids)."""
    data = _json_object(path)
    return {f"{key}_table": dg.MetadataValue.md(records_table(value, label=key.rstrip("s") or key))
            for key, value in data.items() if is_records(value)}


def stage_metadata(stage: Stage, root: Path) -> dict[str, dg.MetadataValue]:
    out: dict[str, dg.MetadataValue] = {}
    for metric in stage.outs_of("metric"):
        path = root / metric.path
        if path.suffix in (".json",) and path.exists():
            out.update(metrics_metadata(path))
    for plain in stage.outs_of("out"):  # the tables people look at moved out of metrics.json with the details
        path = root / plain.path
        if path.name == "details.json" and path.exists():
            out.update(details_tables(path))
    out.update(html_metadata(stage, root))
    out.update(plot_metadata(stage, root))
    return out
