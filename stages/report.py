"""The report stage: one human report of the whole run, reports/report.md (+ PNGs) and reports/report.html.

    python -m stages.report                          # params.yaml's report section
    python -m stages.report --set compare_runs=10    # compare with more earlier runs

The work is in nanoforge/reporting/: report.py (inputs, sections, cost), doc.py (the document model,
Markdown and HTML, number formatting), plots.py (the PNGs), history.py (earlier runs from MLflow).
"""

from __future__ import annotations

import sys

from nanoforge import pipes
from nanoforge.common import REPORTS_DIR, get_logger
from nanoforge.config import ConfigError, resolve, stage_parser
from nanoforge.reporting.report import (
    REPORT_HTML, REPORT_MD, headline, load_inputs, read_history, summary_markdown, write_reports,
)
from nanoforge.sysinfo import system_info
from nanoforge.tracking import stage_run

log = get_logger("report")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("report", __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    try:
        cfg = resolve("report", args).report
    except ConfigError as exc:
        pipes.error(exc)  # prints `error: ...` and gives Dagster the failure's message
        return 2
    inputs = load_inputs()  # a missing upstream output is a "Not run" section, never an error
    for problem in inputs.problems.values():
        log.info("%s", problem)
    train_run_id = (inputs.get("train") or {}).get("mlflow_run_id")
    eval_run_id = (inputs.get("eval") or {}).get("mlflow_run_id")
    machine = system_info()
    tags = {k: v for k, v in {"train_run_id": train_run_id, "evaluate_run_id": eval_run_id}.items() if v}
    with stage_run("report", cfg.model_dump(mode="json"), tags=tags) as run:
        history, history_note = read_history(cfg, train_run_id, inputs)
        run_urls = {name: rid for name, rid in (("train", train_run_id), ("evaluate", eval_run_id)) if rid}
        if run.enabled:
            run_urls["report"] = run.url
        facts, figures = write_reports(inputs, cfg, machine, history, history_note, run_urls)
        numbers = headline(inputs)
        numbers.update({"cost_usd": facts["cost_usd"], "hourly_usd": facts["hourly_usd"]})
        run.log_metrics({k: v for k, v in numbers.items() if v is not None})
        run.set_tags({"git_commit_report": facts["git_commit"]})
        run.log_artifact(REPORTS_DIR, "report")
    log.info("wrote %s and %s (%d figures)", REPORT_MD, REPORT_HTML, len(figures))
    pipes.report({
        "report_html": str(REPORT_HTML.resolve()),
        "report_md": str(REPORT_MD.resolve()),
        "figures": len(figures),
        "sections_not_run": len(inputs.problems),
        **{k: v for k, v in numbers.items() if v is not None},
        "mlflow_run_id": run.run_id,
        "summary": pipes.markdown(summary_markdown(numbers)),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
