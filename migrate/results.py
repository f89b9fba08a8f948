"""What a job did, and how it reads: per-job results, summary lines, grouped errors.

Shared by the jobs (which fill a JobResult), the engine (which returns them) and the CLI
(which prints them); it imports nothing of the engine or the jobs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import IMAP_COPY
from .errors import EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_REFUSED


def plural(n: int, singular: str, plural_form: str | None = None) -> str:
    """"1 message", "2 messages": every count shown to the admin goes through here."""
    return f"{n} {singular if n == 1 else plural_form or singular + 's'}"


# What varies between otherwise identical errors: Message-IDs, quoted sizes, UIDs and any
# other number, and a server's timing note (Dovecot: "(0.001 + 0.000 secs)", with a third
# figure when it waited for a lock).  Folder names stay: the same error in two folders is
# two patterns.
_VARYING = re.compile(r"\(\d+(?:\.\d+)?(?: \+ \d+(?:\.\d+)?)* secs\)|<[^<>\s]*>|\b\d+\b")
EXAMPLES_PER_PATTERN = 3


def error_groups(texts: Sequence[str], weights: Sequence[int] | None = None) -> list[dict]:
    """Errors grouped by pattern (numbers and Message-IDs normalised to ``#``), in order of
    first appearance: {"pattern", "count", "examples"} with up to three examples.
    ``weights``: how many times each text occurred (default: once each)."""
    groups: dict[str, dict] = {}
    for i, text in enumerate(texts):
        key = _VARYING.sub("#", text)
        group = groups.setdefault(key, {"pattern": key, "count": 0, "examples": []})
        group["count"] += weights[i] if weights is not None else 1
        if len(group["examples"]) < EXAMPLES_PER_PATTERN:
            group["examples"].append(text)
    return list(groups.values())


def group_errors(texts: Sequence[str]) -> list[str]:
    """One line per distinct error pattern, in order of first appearance: the first
    example in full, with the count and up to two more examples when it repeats.  One
    over-quota destination must not print 1,314 lines."""
    lines = []
    for group in error_groups(texts):
        examples = group["examples"]
        if group["count"] == 1:
            lines.append(examples[0])
            continue
        line = f"{examples[0]} [{group['count']} errors like this"
        if len(examples) > 1:
            line += "; more examples: " + " | ".join(examples[1:])
        lines.append(line + "]")
    return lines


@dataclass
class JobResult:
    job: str
    kind: str
    dry_run: bool
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)  # dry run: what would happen
    elapsed: float = 0.0
    exit_code: int = EXIT_OK  # raised to 2 when the job was refused (config, safety)
    interrupted: bool = False  # stopped by SIGINT/SIGTERM before it was done
    started: bool = True  # False: the run was interrupted before this job began
    # the job stopped because its lock was lost (store.JobLockHold.check): "run again"
    lock_lost: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors and not self.counts.get("failed", 0) \
            and not self.counts.get("failed_folders", 0)

    def error_lines(self) -> list[str]:
        """The errors as shown to the admin: repeated ones grouped."""
        return group_errors(self.errors)

    def summary_line(self) -> str:
        c = self.counts
        if not self.started:
            return f"{self.job}: not started (the run was interrupted)"
        if self.exit_code == EXIT_LOCKED:
            return f"{self.job}: already running elsewhere; nothing was done"
        if self.exit_code == EXIT_REFUSED and not c:
            return f"{self.job}: refused; nothing was done (see the error above)"
        if self.dry_run:
            verb = "archive" if self.kind != IMAP_COPY else "copy"
            line = (f"{self.job} (dry run): would {verb} "
                    f"{plural(c.get('would_copy', 0), 'message')} "
                    f"({c.get('would_copy_bytes', 0) / 1e6:.1f} MB)")
            if self.kind == IMAP_COPY:
                line += (f" in {plural(c.get('folders', 0), 'folder')}, update flags on "
                         f"{c.get('flags_updated', 0)}")
            line += f", delete {c.get('would_delete', 0)} now verified"
            if c.get("vanished"):
                line += f"; {c['vanished']} vanished since the last run"
            if not self.ok:
                line += f"; {plural(len(self.errors), 'error')} (see above)"
            return line + "; nothing was changed"
        mb = c.get("bytes", 0) / 1e6
        secs = max(self.elapsed, 1e-6)
        rate = c.get("copied", 0) / secs
        if self.interrupted:
            prefix = f"{self.job}: INTERRUPTED — "
        elif not self.ok or self.exit_code != EXIT_OK:
            prefix = f"{self.job}: FAILED — "
        else:
            prefix = f"{self.job}: "
        return prefix + ", ".join(count_parts(self.kind, c)) + (
            f", {mb:.1f} MB in {self.elapsed:.1f} s ({rate:.0f} msgs/s, {mb / secs:.1f} MB/s)")


def count_parts(kind: str | None, c: dict[str, int]) -> list[str]:
    """The counters of a summary line; kind None: the grand total of several jobs."""
    parts = []
    if kind == IMAP_COPY or (kind is None and c.get("folders")):
        parts.append(plural(c.get("folders", 0), "folder"))
    unit = "copied" if kind == IMAP_COPY else "archived" if kind else "copied or archived"
    parts += [f"{c.get('copied', 0)} {unit}",
              f"{c.get('skipped', 0)} skipped as duplicates"]
    if kind in (IMAP_COPY, None):
        parts.append(plural(c.get("flags_updated", 0), "flag updated", "flags updated"))
    parts += [f"{c.get('deleted', 0)} deleted", f"{c.get('failed', 0)} failed"]
    if c.get("quarantined"):
        parts.append(f"{c['quarantined']} quarantined")
    if c.get("failed_folders"):
        parts.append(plural(c["failed_folders"], "failed folder"))
    if c.get("vanished"):
        parts.append(f"{c['vanished']} vanished")
    if c.get("waited_seconds"):  # servers that pushed back (runner.BackoffAccount)
        parts.append(f"waited {c['waited_seconds']:.1f} s for the server")
    return parts


def total_line(results: Sequence[JobResult], elapsed: float) -> str:
    """The grand total when a run had several jobs."""
    totals: dict[str, int] = {}
    for r in results:
        for k, v in r.counts.items():
            totals[k] = totals.get(k, 0) + v
    bad = sum(1 for r in results if not r.ok or r.exit_code != EXIT_OK)
    head = f"total: {plural(len(results), 'job')}"
    if bad:
        head += f" ({bad} FAILED, refused or locked)"
    mb = totals.get("bytes", 0) / 1e6
    return head + ": " + ", ".join(count_parts(None, totals)) + f", {mb:.1f} MB in " \
        f"{elapsed:.1f} s"


RUN_SCHEMA = "mailmigrate.run/1"


def outcome(r: JobResult) -> str:
    """One word for how a job ended: ok, failed, refused, locked, interrupted, not started."""
    if not r.started:
        return "not started"
    if r.exit_code == EXIT_LOCKED:
        return "locked"
    if r.exit_code == EXIT_REFUSED:
        return "refused"
    if r.interrupted:
        return "interrupted"
    if not r.ok or r.exit_code != EXIT_OK:
        return "failed"
    return "ok"


def run_document(results: Sequence[JobResult], elapsed: float, code: int,
                 generated_at: str) -> dict:
    """``run --json``: the whole run as one JSON-ready document (README: schema
    mailmigrate.run/1).  Counters absent from a job are 0, so every key is always there."""
    counter_names = ("folders", "copied", "skipped", "flags_updated", "deleted", "failed",
                     "quarantined", "failed_folders", "vanished")
    dry_names = ("would_copy", "would_copy_bytes", "would_delete")
    jobs = []
    totals = dict.fromkeys(counter_names, 0)
    totals_bytes = 0
    outcomes: dict[str, int] = {}
    for r in results:
        names = counter_names + (dry_names if r.dry_run else ())
        counts = {k: int(r.counts.get(k, 0)) for k in names}
        for k in counter_names:
            totals[k] += counts[k]
        totals_bytes += int(r.counts.get("bytes", 0))
        word = outcome(r)
        outcomes[word] = outcomes.get(word, 0) + 1
        job = {"name": r.job, "kind": r.kind, "dry_run": r.dry_run, "outcome": word,
               "exit_code": r.exit_code if r.exit_code != EXIT_OK or r.ok else EXIT_FAILED,
               "counts": counts, "bytes": int(r.counts.get("bytes", 0)),
               "seconds": round(r.elapsed, 3), "errors": error_groups(r.errors),
               "warnings": list(r.warnings)}
        if r.dry_run:
            job["plan"] = list(r.plan)
        jobs.append(job)
    return {"schema": RUN_SCHEMA, "generated_at": generated_at, "exit_code": code,
            "jobs": jobs,
            "totals": {"jobs": len(results), "outcomes": outcomes, "counts": totals,
                       "bytes": totals_bytes, "seconds": round(elapsed, 3)}}


def size_text(n: int) -> str:
    """Bytes for people (decimal units, as mail clients and the run summary count)."""
    if n < 1_000_000:
        return f"{n / 1e3:.0f} KB" if n >= 1000 or n == 0 else "1 KB"
    if n < 1_000_000_000:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.2f} GB"
