"""The report as one self-contained HTML page (inline CSS, no scripts, no external
assets) to attach to a change ticket.  Rendered from the same document as the JSON, so
its numbers are the JSON's: every number cell carries ``data-key`` with the JSON field
it shows, ``data-value`` with the exact number (the text is for people: "3.7 MB",
"12,345"), and ``data-job`` / ``data-folder`` say whose it is."""

from __future__ import annotations

from html import escape

from .text import deletion_text, duration, size_text

BYTE_KEYS = frozenset({"source_bytes", "to_copy_bytes"})
# columns left out of a job's folder table when they are 0 for every folder of the job
# (said under the table); the totals and jobs tables always show every column
QUIET_KEYS = ("flags_to_update", "to_delete", "failed", "quarantined", "vanished")

CSS = """
body{font:13px/1.35 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em;color:#222}
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.2em;margin:1.6em 0 .4em}
.meta{color:#666;margin:0 0 1em}
table{border-collapse:collapse;margin:.4em 0 1em;min-width:60%}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0;position:sticky;top:0}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.n.zero{color:#aaa}td.name{white-space:nowrap}.bad{color:#b00;font-weight:bold}
td.name .bad{white-space:normal}
.warnings{background:#fff4e5;border:1px solid #f0a030;padding:.6em 1em;margin:1em 0}
.warnings li{margin:.2em 0}.error{background:#fde8e8;border:1px solid #d33;padding:.6em 1em}
.ok{background:#eaf7ea;border:1px solid #5a5;padding:.6em 1em}
.bar{display:inline-flex;width:7em;height:.9em;background:#eee;border:1px solid #bbb;
vertical-align:middle}td.pct{white-space:nowrap}td.pct small{margin-left:.4em}
.bar .done{background:#4a9d4a}.bar .todo{background:#e0a030}
.legend span{display:inline-block;width:.9em;height:.9em;vertical-align:middle;margin:0 .3em}
small{color:#666}
"""

COLUMNS = (("source_messages", "messages"), ("source_bytes", "bytes"),
           ("already_there", "already there"), ("to_copy", "to copy"),
           ("to_copy_bytes", "bytes to copy"), ("flags_to_update", "flag updates"),
           ("to_delete", "to delete"), ("failed", "failed earlier"),
           ("quarantined", "quarantined"), ("vanished", "vanished"))


def _bar(done: int, todo: int) -> str:
    """Already at the destination (green) against still to copy (orange), and the share
    already there in words: a bar alone does not say 98 % from 100 %."""
    whole = done + todo
    d = 100.0 * done / whole if whole else 100.0
    pct = "nothing to copy" if not todo else f"{int(d)} % there"  # 99.6 → 99, never 100
    return (f'<td class="pct"><span class="bar" title="{done:,} already there, '
            f'{todo:,} to copy"><span class="done" style="width:{d:.1f}%"></span>'
            f'<span class="todo" style="width:{100 - d:.1f}%"></span></span>'
            f"<small>{pct}</small></td>")


def number_text(key: str, value: int) -> str:
    """What a number cell shows: bytes as "3.7 MB", counts as "12,345"."""
    return size_text(value) if key in BYTE_KEYS and value else f"{value:,}"


def _cell(key: str, value: int, attrs: str) -> str:
    zero = " zero" if value == 0 else ""
    title = f' title="{value:,} bytes"' if key in BYTE_KEYS else ""
    return (f'<td class="n{zero}" data-key="{key}" data-value="{value}" {attrs}{title}>'
            f"{number_text(key, value)}</td>")


def _cells(values: dict, attrs: str, columns=COLUMNS) -> str:
    return "".join(_cell(k, values[k], attrs) for k, _label in columns)


def _head(first: list[str], columns=COLUMNS) -> str:
    return "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in first) + "".join(
        f"<th>{escape(label)}</th>" for _k, label in columns) + \
        "<th>already there / to copy</th></tr>"


LEGEND = ('<p class="legend"><span style="background:#4a9d4a"></span>already at the '
          'destination <span style="background:#e0a030"></span>still to copy '
          "<small>(bars per job and folder; numbers in grey are 0; hover a size for the "
          "exact bytes)</small></p>")


def render(doc: dict) -> str:
    e = escape
    jobs = doc["jobs"]
    t = doc["totals"]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>mailmigrate report {e(doc['generated_at'])}</title>",
           f"<style>{CSS}</style></head><body>",
           "<h1>mailmigrate report</h1>",
           f'<p class="meta">generated {e(doc["generated_at"])} from {e(doc["config"])}; '
           f'schema {e(doc["schema"])}; state database {e(doc["state_database"])}'
           + ("" if doc["database_exists"] else " (none yet)") + "</p>"]
    # warnings (and jobs that could not be planned) first: they are what needs a decision
    problems = [(j["name"], j["error"]) for j in jobs if j["error"]]
    warnings = [(j["name"], w) for j in jobs for w in j["warnings"]]
    if problems:
        out.append('<div class="error" id="errors"><strong>Not planned</strong><ul>')
        out += [f'<li data-job="{e(n)}"><b>{e(n)}</b>: {e(x)}</li>' for n, x in problems]
        out.append("</ul></div>")
    if warnings:
        out.append(f'<div class="warnings" id="warnings"><strong>{len(warnings)} '
                   f'warning{"s" if len(warnings) != 1 else ""}</strong><ul>')
        out += [f'<li data-job="{e(n)}"><b>{e(n)}</b>: {e(w)}</li>' for n, w in warnings]
        out.append("</ul></div>")
    elif not problems:
        out.append('<div class="ok" id="warnings">No warnings.</div>')
    est = duration(t["estimated_seconds"]) if t["estimated_seconds"] is not None else "—"
    out.append('<h2>Totals</h2>' + LEGEND + '<table id="totals">' + _head(["jobs"]))
    out.append("<tr>" + _cell("jobs", t["jobs"], "") + _cells(t, 'data-job=""')
               + _bar(t["already_there"], t["to_copy"]) + "</tr></table>")
    if t["jobs_not_planned"]:
        out.append(f'<p class="bad">{t["jobs_not_planned"]} of {t["jobs"]} jobs NOT PLANNED '
                   "(see above): not counted in these totals</p>")
    out.append(f'<p>estimated duration: <b id="estimate">{e(est)}</b> <small>(measured on a '
               "small sample of message bodies; an estimate only)</small></p>")
    out.append('<h2>Jobs</h2><table id="jobs">' + _head(["job", "kind", "status"]))
    for j in jobs:
        status = ('<td>planned</td>' if j["planned"] else
                  '<td class="bad">NOT PLANNED</td>')
        if j["refused"] and j["planned"]:
            status = '<td class="bad">a run would be refused</td>'
        jt = j["totals"]
        out.append(f'<tr><td class="name"><a href="#job-{e(j["name"])}">{e(j["name"])}</a>'
                   f'</td><td class="name">{e(j["kind"])}</td>{status}'
                   + _cells(jt, f'data-job="{e(j["name"])}"')
                   + _bar(jt["already_there"], jt["to_copy"]) + "</tr>")
    out.append("</table>")
    for j in jobs:
        name = e(j["name"])
        out.append(f'<h2 id="job-{name}">{name} <small>({e(j["kind"])})</small></h2>')
        if j["source"]:
            out.append(f"<p>from {e(j['source'])}<br>to {e(j['destination'])}</p>")
        if not j["planned"]:
            out.append(f'<p class="error">not planned: {e(j["error"] or "")}</p>')
            continue
        quiet = [k for k in QUIET_KEYS if not any(f[k] for f in j["folders"])]
        columns = [(k, label) for k, label in COLUMNS if k not in quiet]
        out.append('<table class="folders">'
                   + _head(["source folder", "destination", "action", "why"], columns))
        for f in j["folders"]:
            attrs = f'data-job="{name}" data-folder="{e(f["source"])}"'
            error = (f'<br><span class="bad">could not be read: {e(f["error"])}</span>'
                     if f["error"] else "")
            out.append(f"<tr><td class=\"name\">{e(f['source'])}{error}</td>"
                       f"<td class=\"name\">{e(f['destination'])}</td>"
                       f"<td>{e(f['action'])}</td><td class=\"name\">{e(f['why'])}</td>"
                       + _cells(f, attrs, columns)
                       + _bar(f["already_there"], f["to_copy"]) + "</tr>")
        out.append("</table>")
        if quiet:
            labels = dict(COLUMNS)
            out.append("<p><small>0 in every folder, so not shown: "
                       + ", ".join(labels[k] for k in quiet) + "</small></p>")
        if j["excluded"]:
            out.append("<p>excluded folders:</p><ul>" + "".join(
                f"<li>{e(x['source'])}: {e(x['rule'])}</li>" for x in j["excluded"]) + "</ul>")
        if j["largest"]:
            out.append("<p>largest messages:</p><ul>" + "".join(
                f"<li>{e(m['folder'])} {e(m['id'])}: {size_text(m['size'])}</li>"
                for m in j["largest"]) + "</ul>")
        if j["destination_refuses"]:
            out.append("<p>the destination will refuse:</p><ul>" + "".join(
                f"<li>{e(r['folder'] or '')} {e(r['id'] or '')} {e(r['reason'])}</li>"
                for r in j["destination_refuses"]) + "</ul>")
        if j["quota"]:
            q = j["quota"]
            out.append(f"<p>destination quota: {size_text(q['used_bytes'])} used of "
                       f"{size_text(q['limit_bytes'])}</p>")
        out.append(f"<p>deletion: {e(deletion_text(j))}</p>")
        if j["estimate"]:
            out.append(f"<p>estimated duration: {e(duration(j['estimate']['seconds']))}"
                       f" <small>({e(j['estimate']['method'])})</small></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
