"""``mailmigrate report`` and ``run --dry-run``: what a run would do now (read-only).

``plan.build_report`` reads the servers and the state database into one document
(schema ``mailmigrate.report/1``, docs/report.schema.json); ``text``, ``html`` and
``render(doc, "json")`` show it.
"""

from __future__ import annotations

import json

from . import html, text
from .plan import SCHEMA, PlanOptions, build_report

FORMATS = ("text", "json", "html")


def render(doc: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"
    if fmt == "html":
        return html.render(doc)
    return text.render(doc)


__all__ = ["FORMATS", "SCHEMA", "PlanOptions", "build_report", "render"]


def dry_run_results(config, names, options) -> list:
    """``run_jobs`` with ``dry_run``: the report, one JobResult per job (its plan is the
    job's text section).  The library keeps its dry run; it is the planner's now."""
    from ..errors import EXIT_OK, EXIT_REFUSED
    from ..results import JobResult

    doc = build_report(config, names, PlanOptions(max_delete=options.max_delete))
    out = []
    for job in doc["jobs"]:
        result = JobResult(job["name"], job["kind"], True,
                           exit_code=EXIT_REFUSED if job["refused"] else EXIT_OK)
        t = job["totals"]
        result.counts = {"folders": t["folders"], "would_copy": t["to_copy"],
                         "would_copy_bytes": t["to_copy_bytes"], "would_delete": t["to_delete"],
                         "flags_updated": t["flags_to_update"], "vanished": t["vanished"]}
        result.warnings = list(job["warnings"])
        if job["error"]:
            result.errors.append(job["error"])
        result.plan = text.job_lines(job)
        out.append(result)
    return out
