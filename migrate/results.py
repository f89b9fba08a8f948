"""What a job did, and how it reads: per-job results, summary lines, grouped errors.

Shared by the jobs (which fill a JobResult), the engine (which returns them) and the CLI
(which prints them); it imports nothing of the engine or the jobs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import IMAP_COPY
from .errors import EXIT_LOCKED, EXIT_OK, EXIT_REFUSED


def plural(n: int, singular: str, plural_form: str | None = None) -> str:
    """"1 message", "2 messages": every count shown to the admin goes through here."""
    return f"{n} {singular if n == 1 else plural_form or singular + 's'}"


# What varies between otherwise identical errors: Message-IDs, quoted sizes, UIDs and any
# other number.  Folder names stay: the same error in two folders is two patterns.
_VARYING = re.compile(r"<[^<>\s]*>|\b\d+\b")
EXAMPLES_PER_PATTERN = 3


def group_errors(texts: Sequence[str]) -> list[str]:
    """One line per distinct error pattern (numbers and Message-IDs normalised), in order
    of first appearance: the first example in full, with the count and up to two more
    examples when it repeats.  One over-quota destination must not print 1,314 lines."""
    groups: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for text in texts:
        key = _VARYING.sub("#", text)
        examples = groups.setdefault(key, [])
        counts[key] = counts.get(key, 0) + 1
        if len(examples) < EXAMPLES_PER_PATTERN:
            examples.append(text)
    lines = []
    for key, examples in groups.items():
        if counts[key] == 1:
            lines.append(examples[0])
            continue
        line = f"{examples[0]} [{counts[key]} errors like this"
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
