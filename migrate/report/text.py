"""The report as text: what `mailmigrate report` and `run --dry-run` print."""

from __future__ import annotations

from ..results import plural, size_text


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 1:
        return "under 1 s"
    if seconds < 60:
        return f"about {seconds:.0f} s"
    if seconds < 3600:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def totals_text(t: dict) -> str:
    return (f"{plural(t['source_messages'], 'message')} ({size_text(t['source_bytes'])}) at the "
            f"source, {t['already_there']} already there, {t['to_copy']} to copy "
            f"({size_text(t['to_copy_bytes'])}), {t['flags_to_update']} flag updates, "
            f"{t['to_delete']} to delete, {t['failed']} failed earlier, "
            f"{t['quarantined']} quarantined")


def folder_text(f: dict) -> str:
    line = (f"{f['source']} → {f['destination']} ({f['action']}, {f['why']}): "
            f"{plural(f['source_messages'], 'message')} ({size_text(f['source_bytes'])}), "
            f"{f['already_there']} already there, {f['to_copy']} to copy "
            f"({size_text(f['to_copy_bytes'])}), {f['flags_to_update']} flag updates, "
            f"{f['to_delete']} to delete")
    extra = [f"{f[k]} {k}" for k in ("failed", "quarantined", "vanished") if f[k]]
    if extra:
        line += ", " + ", ".join(extra)
    if f["error"]:
        line += f" — could not be read: {f['error']}"
    return line


def deletion_text(job: dict) -> str:
    d = job["deletion"]
    n = job["totals"]["to_delete"]
    if d["delete_after_verify"]:
        text = (f"delete_after_verify: {plural(n, 'message')} would be deleted from the "
                "source once verified at the destination")
    elif d["leave_on_server_days"] is not None:
        text = (f"leave_on_server_days = {d['leave_on_server_days']}: "
                f"{plural(n, 'message')} archived longer ago than that would be deleted "
                "from the server")
    else:
        text = "nothing is deleted from the source (mail stays there)"
    if d["refused"]:
        text += f"; REFUSED: {d['refused']}"
    return text


def render(doc: dict) -> str:
    out = [f"mailmigrate report, generated {doc['generated_at']} from {doc['config']}",
           f"state database: {doc['state_database']}"
           + ("" if doc["database_exists"] else " (none yet: no run has happened)")]
    for job in doc["jobs"]:
        out.append("")
        out += job_lines(job)
    t = doc["totals"]
    out.append("")
    missing = t["jobs_not_planned"]
    if not missing:
        line = f"overall: {plural(t['jobs'], 'job')}, {totals_text(t)}"
    elif missing == t["jobs"]:  # no numbers at all: zeros would read as "nothing to do"
        line = ("overall: the job could not be planned" if missing == 1 else
                f"overall: none of the {missing} jobs could be planned")
        line += " (see above): nothing is counted"
    else:
        line = (f"overall: {plural(t['jobs'], 'job')}, {missing} of them NOT PLANNED (see "
                f"above, not counted here); the others: {totals_text(t)}")
    out.append(line)
    if t["estimated_seconds"] is not None:
        out.append(f"estimated duration of all jobs: {duration(t['estimated_seconds'])}"
                   " (jobs one after the other)")
    return "\n".join(out) + "\n"


def job_lines(job: dict) -> list[str]:
    out = [f"job {job['name']} ({job['kind']})"]
    if job["source"]:
        out.append(f"  from {job['source']}")
        out.append(f"  to   {job['destination']}")
    if job["error"]:
        out.append(f"  NOT PLANNED: {job['error']}")
    for w in job["warnings"]:
        out.append(f"  warning: {w}")
    if not job["planned"]:
        return out
    out.append("  folders (source → destination, action, why):")
    for f in job["folders"]:
        out.append(f"    {folder_text(f)}")
    if job["excluded"]:
        out.append("  excluded:")
        for e in job["excluded"]:
            out.append(f"    {e['source']}: {e['rule']}")
    if job["largest"]:
        out.append("  largest messages: " + ", ".join(
            f"{m['folder']} {m['id']} ({size_text(m['size'])})" for m in job["largest"]))
    for r in job["destination_refuses"]:
        where = f"{r['folder']} {r['id']} ({size_text(r['size'])}): " if r["folder"] else ""
        out.append(f"  the destination will refuse: {where}{r['reason']}")
    if job["quota"]:
        q = job["quota"]
        out.append(f"  destination quota: {size_text(q['used_bytes'])} used of "
                   f"{size_text(q['limit_bytes'])}")
    out.append(f"  deletion: {deletion_text(job)}")
    e = job["estimate"]
    if e:
        out.append(f"  estimated duration: {duration(e['seconds'])} (measured: {e['method']})")
    out.append(f"  total: {totals_text(job['totals'])}")
    return out
