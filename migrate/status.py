"""What the state database says: ``mailmigrate status`` and ``mailmigrate failed``.

Read-only: it opens an existing state database (never creates or upgrades one), runs a
few aggregate queries per job and renders them as text or as a JSON document.
"""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Iterable, Sequence

from .config import Config
from .results import error_groups, plural
from .states import AT_DESTINATION, State
from .store import Store

STATUS_SCHEMA = "mailmigrate.status/1"
FAILED_SCHEMA = "mailmigrate.failed/1"
TOP_ERRORS = 5
RUN_FIELDS = ("folders", "copied", "skipped", "flags_updated", "deleted", "failed",
              "vanished", "quarantined", "bytes")


def now_text() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _when(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _run(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"started_at": _when(row["started_at"]), "ended_at": _when(row["ended_at"]),
            "outcome": row["outcome"], "dry_run": bool(row["dry_run"]),
            "host": row["hostname"], "pid": row["pid"],
            "counts": {k: int(row[k] or 0) for k in RUN_FIELDS}, "error": row["error"]}


def job_status(store: Store | None, name: str, kind: str) -> dict:
    """One job: last run, messages by state, binding, whether a run holds it now, and
    its most frequent errors."""
    doc = {"name": name, "kind": kind, "recorded": False, "last_run": None,
           "messages": {s.value: 0 for s in State},
           "bytes": {s.value: 0 for s in State}, "bytes_verified": 0, "binding": None,
           "running": False, "running_run": None, "top_errors": []}
    if store is None:
        return doc
    doc["running"] = store.job_is_running(name)
    job = store.job_overview(name)
    if job is None:
        return doc
    doc["recorded"] = True
    doc["binding"] = job["binding"]
    last, running = store.last_runs(job["id"])
    doc["last_run"] = _run(last)
    doc["running_run"] = _run(running)
    for state, (count, size) in store.state_totals(job["id"]).items():
        doc["messages"][state] = count
        doc["bytes"][state] = size
    doc["bytes_verified"] = sum(doc["bytes"][s.value] for s in AT_DESTINATION)
    texts = store.error_texts(job["id"])
    groups = error_groups([t for t, _ in texts], [n for _, n in texts])
    groups.sort(key=lambda g: -g["count"])  # stable: ties keep the order of frequency
    doc["top_errors"] = groups[:TOP_ERRORS]
    return doc


def status_document(config: Config, store: Store | None, names: Sequence[str] | None,
                    database: str) -> dict:
    jobs = [config.job(n) for n in names] if names else list(config.jobs)
    docs = [job_status(store, j.name, j.kind) for j in jobs]
    queue = None if store is None else store.queue_overview([j.name for j in jobs])
    for doc in docs:
        doc["queue"] = _queued(queue["latest"].get(doc["name"])) if queue else None
    return {"schema": STATUS_SCHEMA, "generated_at": now_text(), "state_database": database,
            "database_exists": store is not None,
            "queue": _queue(queue, docs, config.workers.stalled_after_seconds),
            "jobs": docs}


# procrastinate's job states as status names them
QUEUE_STATES = {"todo": "waiting", "doing": "running", "failed": "failed",
                "succeeded": "done", "cancelled": "cancelled", "aborting": "running",
                "aborted": "aborted"}


def _queued(row: dict | None) -> dict | None:
    """A job's newest entry in the task queue (`mailmigrate enqueue`, schedules)."""
    if row is None:
        return None
    return {"state": QUEUE_STATES.get(row["status"], row["status"]),
            "attempts": int(row["attempts"]), "scheduled_at": _when(row["scheduled_at"]),
            "worker_id": row["worker_id"]}


def _queue(queue: dict | None, jobs: list[dict], stalled_after: float) -> dict | None:
    """The whole queue: mailbox tasks by state, which jobs run where, the workers.  A
    worker silent for longer than ``stalled_after`` seconds is "stalled": killed, or its
    host is down; its running job goes back into the queue when a live worker sees it."""
    if queue is None:
        return None
    counts = {name: 0 for name in ("waiting", "running", "failed", "done", "cancelled",
                                   "aborted")}
    for status, n in queue["counts"].items():
        name = QUEUE_STATES.get(status, status)
        counts[name] = counts.get(name, 0) + n
    workers = [{"id": w["id"], "last_heartbeat": _when(w["last_heartbeat"]),
                "silent_seconds": round(float(w["silent_seconds"]), 1),
                "stalled": float(w["silent_seconds"]) > stalled_after}
               for w in queue["workers"]]
    by_id = {w["id"]: w for w in workers}
    running = []
    for j in jobs:
        if not (j["queue"] and j["queue"]["state"] == "running"):
            continue
        run = j["running_run"] or {}
        worker = by_id.get(j["queue"]["worker_id"])
        running.append({"job": j["name"], "host": run.get("host"), "pid": run.get("pid"),
                        "since": run.get("started_at"), "worker_id": j["queue"]["worker_id"],
                        # gone from the table (pruned) or silent: not really running
                        "worker_stalled": worker is None or worker["stalled"],
                        # the job's session lock: held while its process lives
                        "lock_held": j["running"],
                        "worker_last_heartbeat": worker and worker["last_heartbeat"]})
    return {**counts, "running_jobs": running, "workers": workers,
            "alive_workers": sum(not w["stalled"] for w in workers),
            "stalled_after_seconds": stalled_after}


def status_text(doc: dict) -> list[str]:
    if not doc["database_exists"]:
        return [f"no runs yet (state database {doc['state_database']} does not exist)"]
    lines = []
    queue = doc.get("queue")
    if queue is not None:
        silent = len(queue["workers"]) - queue["alive_workers"]
        lines.append(f"queue: {queue['waiting']} waiting, {queue['running']} running, "
                     f"{queue['failed']} failed, {queue['done']} done; "
                     f"{plural(queue['alive_workers'], 'worker')} alive"
                     + (f", {silent} not heard from" if silent else ""))
        for r in queue["running_jobs"]:
            where = f"on {r['host']} (pid {r['pid']}, since {r['since']})" if r["host"] \
                else "(starting)"
            heard = (f"since {r['worker_last_heartbeat']}" if r["worker_last_heartbeat"]
                     else "for a while")
            if r["worker_stalled"] and r["lock_held"]:
                where += (f" - its worker is not heard from {heard}, but it still holds the "
                          "job's lock: frozen or overloaded, not dead; the job stays with it")
            elif r["worker_stalled"]:
                where += (f" - but its worker is not heard from {heard}: killed or its "
                          "host is down; the job goes back into the queue when a worker "
                          f"sees it (after {queue['stalled_after_seconds']:g} s of "
                          "silence)")
            lines.append(f"  running: {r['job']} {where}")
    for job in doc["jobs"]:
        head = f"{job['name']} ({job['kind']})"
        queued = job.get("queue")
        if not job["recorded"]:
            lines.append(f"{head}: no runs yet"
                         + (f"; queue: {_queued_text(queued)}" if queued else ""))
            continue
        lines.append(f"{head}:")
        if queued:
            lines.append("  queue:       " + _queued_text(queued))
        lines.append("  last run:    " + _run_text(job["last_run"]))
        lines.append("  running now: " + _running_text(job))
        m = job["messages"]
        parts = [f"{m[s]} {s}" for s in ("seen", "verified", "deleted", "failed",
                                         "quarantined", "vanished")]
        parts += [f"{m[s]} {s}" for s in ("appending", "copied", "deleting") if m[s]]
        lines.append("  messages:    " + ", ".join(parts)
                     + f"; {job['bytes_verified'] / 1e6:.1f} MB verified at the destination")
        b = job["binding"]
        lines.append("  mailbox:     " + (f"{b['username']} at {b['server']}, bound to "
                                          f"{b['protocol'].upper()}" if b else "not bound yet"))
        if job["top_errors"]:
            lines.append("  most frequent errors of failed and quarantined messages:")
            for g in job["top_errors"]:
                lines.append(f"    {g['count']} × {g['examples'][0]}")
    return lines


def _queued_text(queued: dict) -> str:
    text = queued["state"]
    if queued["state"] == "waiting" and queued["scheduled_at"]:
        text += f" (not before {queued['scheduled_at']})"
    if queued["attempts"]:
        text += f", {plural(queued['attempts'], 'earlier attempt')}"
    return text


def _run_text(run: dict | None) -> str:
    if run is None:
        return "none"
    c = run["counts"]
    ended = run["ended_at"] or "-"
    text = (f"{run['started_at']} → {ended}, {run['outcome']}"
            + (" (dry run)" if run["dry_run"] else "")
            + f": {c['copied']} copied or archived, {c['skipped']} skipped, "
              f"{c['deleted']} deleted, {c['failed']} failed, {c['bytes'] / 1e6:.1f} MB")
    return text


def _running_text(job: dict) -> str:
    row = job["running_run"]
    if job["running"]:
        where = f" (pid {row['pid']} on {row['host']}, since {row['started_at']})" if row \
            else ""
        return "yes" + where
    if row is not None:
        here = " on this host" if row["host"] == socket.gethostname() else ""
        return (f"no (a run of pid {row['pid']} on {row['host']} started "
                f"{row['started_at']} is still marked running but holds no lock{here}: "
                "it was killed; the next run records it as aborted)")
    return "no"


def failed_rows(store: Store | None, names: Iterable[str]) -> Iterable[dict]:
    if store is None:
        return
    for row in store.problem_messages(list(names)):
        yield {"job": row["job"], "folder": row["folder"], "source_key": row["source_key"],
               "uid": row["source_uid"], "size": int(row["size"]),
               "message_id": row["message_id"], "attempts": int(row["attempts"]),
               "state": row["state"], "last_error": row["last_error"],
               "updated_at": _when(row["updated_at"])}


def failed_text(rows: Iterable[dict]) -> list[str]:
    """A table, one message a line, columns aligned; the last error comes last, whole."""
    header = ("JOB", "FOLDER", "UID/UIDL", "SIZE", "MESSAGE-ID", "ATTEMPTS", "STATE",
              "LAST ERROR")
    table = [header] + [tuple(str(v) for v in (
        r["job"], r["folder"], r["source_key"], r["size"], r["message_id"] or "-",
        r["attempts"], r["state"], " ".join((r["last_error"] or "-").split())))
        for r in rows]
    if len(table) == 1:
        return ["no failed or quarantined messages"]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in table]
    return lines + [plural(len(table) - 1, "failed or quarantined message")]
