"""`dvc plots show` works offline: the repo's page template carries vega inline, and every plot
is declared once (top-level `plots:` in dvc.yaml)."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO, copy_project, run, tool
from tests.test_report import CHROMIUM_FLAGS, chromium  # noqa: F401 (the session fixture)


def declared_plots(spec: dict) -> list[tuple[str, str | None, str]]:
    """(file, x, y) of every chart dvc.yaml declares: top-level plots and stage-level ones."""
    charts = []
    for plot in spec.get("plots", []):
        body = next(iter(plot.values())) if isinstance(plot, dict) else {}
        for path, ys in (body.get("y") or {}).items():
            charts += [(path, body.get("x"), y) for y in ([ys] if isinstance(ys, str) else ys)]
    for stage in spec["stages"].values():
        for entry in stage.get("plots") or []:
            path = entry if isinstance(entry, str) else next(iter(entry))
            props = {} if isinstance(entry, str) else (entry[path] or {})
            charts.append((path, props.get("x"), props.get("y")))
    return charts


def test_plots_are_declared_once():
    charts = declared_plots(yaml.safe_load((REPO / "dvc.yaml").read_text()))
    assert len(charts) == len(set(charts)), f"a chart is drawn twice: {sorted(charts)}"


def test_dvc_plots_show_draws_offline(tiny_pipeline, chromium, tmp_path):  # noqa: F811
    project, env = tiny_pipeline
    work = copy_project(project, tmp_path / "p")
    out = tmp_path / "plots"
    run([tool("dvc"), "plots", "show", "-o", str(out)], work, env=env)
    page = (out / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=", page), "the page loads a script from elsewhere: blank offline"
    divs = page.count("vegaEmbed('#")
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert divs == len(spec["plots"]) + sum(len(s.get("plots") or []) for s in spec["stages"].values())
    # the browser has no network here: the charts exist only if vega ran from the page itself
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = run([*base, "--dump-dom", (out / "index.html").as_uri()], tmp_path, timeout=120).stdout
    assert dom.count("<canvas") + dom.count("<svg") >= divs, dom[-800:]
