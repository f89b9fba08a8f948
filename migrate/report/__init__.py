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
