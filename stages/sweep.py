"""The sweep, one cell: train params.yaml's recipe at one depth to exactly one compute budget.

    python -m stages.sweep --budget 1e13 --depth 4     # sweep/dvc.yaml runs it for every cell

The grid is sweep.budgets x sweep.depths (checked whole before any work: a budget that gives
a depth too few steps, or fewer than 3 depths, is an error naming the cell and the key). The
cell's train run writes artifacts/sweep/<cell>/{checkpoints,model,train}; killed, the same
command resumes it from its checkpoint. Then artifacts/sweep/<cell>/cell.json: the row the
scaling_laws stage fits. The work is in nanoforge/sweep/pipeline.py.
"""

from __future__ import annotations

import sys

from nanoforge.config import ConfigError, load_params, stage_parser
from nanoforge.sweep.pipeline import find_cell, grid_of, open_parent, run_cell, tag_child, write_row


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("sweep", __doc__.split("\n\n")[0])
    parser.add_argument("--budget", required=True, help="the cell's training FLOPs, as in sweep.budgets (e.g. 1e13)")
    parser.add_argument("--depth", required=True, type=int, help="the cell's depth, as in sweep.depths")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.overrides, section="sweep")
        cells = grid_of(params)  # the whole grid: a bad cell anywhere fails before this one trains
        cell = find_cell(cells, float(args.budget), args.depth)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.overrides:  # the cell's train run reads the file: an override here would be lost
        print("error: --set is not passed on to the cell's train run; edit params.yaml", file=sys.stderr)
        return 2
    code = run_cell(cell, params, args.params, open_parent(params))
    if code != 0:
        print(f"[sweep] cell {cell.name}: train exited {code}; run the same command again to resume it",
              file=sys.stderr)
        return code
    try:
        row = write_row(cell, params)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tag_child(row)
    print(f"[sweep] cell {cell.name}: val bpb {row['val_bpb']:.4f} after {row['tokens_trained']:,} tokens", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
