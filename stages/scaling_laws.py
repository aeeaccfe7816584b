"""The sweep's fit: isoFLOP parabolas and the compute-optimal power laws from every finished cell.

    python -m stages.scaling_laws      # sweep/dvc.yaml runs it after the last cell

Reads artifacts/sweep/<cell>/cell.json for every cell of sweep.budgets x sweep.depths (all must
be finished), fits val BPB against ln N per budget, then N* ~ C^a and D* ~ C^b with their
uncertainty (nanoforge/sweep/fit.py), and writes artifacts/sweep/scaling_laws.json, the charts
and reports/sweep/scaling_laws.{md,html}. The work is in nanoforge/sweep/results.py.
"""

from __future__ import annotations

import sys

from nanoforge.config import ConfigError, resolve, stage_parser
from nanoforge.sweep.fit import FitError
from nanoforge.sweep.pipeline import open_parent
from nanoforge.sweep.results import FIT_FILE, PAGE_DIR, collect, draw, fit, log_to_parent, summary, write_all


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("sweep", __doc__.split("\n\n")[0])
    parser.prog = "python -m stages.scaling_laws"
    args = parser.parse_args(argv)
    try:
        params = resolve("sweep", args)
        rows = collect(params)
        result, finding = fit(params, rows)
    except (ConfigError, FitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    figures = draw(result, rows, params=params.sweep.params_convention)
    s = summary(params, result, rows, finding)
    write_all(s, figures)
    log_to_parent(open_parent(params), s, figures)
    if result is None:  # the cells are results; the page says what the grid lacks (Dagster's fits_finite fails)
        print(f"[scaling_laws] warning: no scaling law from this grid: {finding}", file=sys.stderr, flush=True)
        print(f"[scaling_laws] -> {FIT_FILE}, {PAGE_DIR}/scaling_laws.html (the cells and the measured curves)")
        return 0
    print(f"[scaling_laws] a = {s['a']:.3f} [{s['a_low']:.3f}, {s['a_high']:.3f}], b = {s['b']:.3f} "
          f"[{s['b_low']:.3f}, {s['b_high']:.3f}], D*/N* = {s['ratio']:.3g}; {s['sum_check']}", flush=True)
    print(f"[scaling_laws] -> {FIT_FILE}, {PAGE_DIR}/scaling_laws.html", flush=True)
    return 0  # a + b off 1 is a finding (the page and the Dagster check say it), not a failure


if __name__ == "__main__":
    sys.exit(main())
