"""THE destructive choke point: every deletion from a source, for every job, runs here.

    select candidates → cap → (per unit) refuse early → look again at the destination →
    intent → delete → record

Jobs only provide a small ``SourceUnit`` per unit of deletion (an IMAP folder, a POP3
mailbox): "why can't you delete at all", "look at these copies again", "delete these".
The sequence itself - and with it the rules that keep mail safe - exists once:

* only rows ``verified`` or ``deleting`` (an interrupted earlier deletion) are candidates,
  and a ``deleting`` row is looked at again exactly like a ``verified`` one;
* the cap (--max-delete) is checked on all candidates of the job before anything is
  deleted (the dry-run planner, migrate.report, applies the same ``check_cap``, so a dry
  run reports what a real run would do);
* a unit that cannot delete (e.g. no UID EXPUNGE) is refused before any intent is written;
* the ``deleting`` intent is committed right before the destructive command, and
  ``deleted`` only after the server confirmed it;
* the run must still hold the job's lock (``JobRunner.holding_lock``) when a unit starts
  and right before each intent: a run whose lock was lost deletes nothing more.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from . import faults
from .results import plural
from .errors import SafetyError
from .states import State
from .store import MessageRow

if TYPE_CHECKING:
    from .runner import JobRunner

T = TypeVar("T")
DELETABLE = frozenset({State.VERIFIED, State.DELETING})


@dataclass
class LookedAgain:
    """What a unit found when it looked at the copies once more."""

    gone: dict[int, str] = field(default_factory=dict)  # row id → why: copy again
    held: dict[int, str] = field(default_factory=dict)  # row id → why: keep, do not copy
    # no longer at the source: someone else deleted it (or our own interrupted deletion
    # did, for a row already 'deleting') - not counted as deleted by this run
    not_at_source: set[int] = field(default_factory=set)


class SourceUnit(Protocol):
    label: str  # "folder 'INBOX.Sent'", for messages to the admin
    destination: str  # where the copies are: "'Sent'", "the archive /srv/mail/alice"
    batch: int | None  # rows per destructive command; None: all at once (POP3 QUIT)

    def refusal(self) -> str | None:
        """Why this source cannot delete at all (checked before any intent), or None."""

    def look_again(self, rows: Sequence[MessageRow]) -> LookedAgain:
        """Check each row's copy at the destination right now (and bring its flags up to
        date where the protocol has them)."""

    def delete(self, rows: Sequence[MessageRow]) -> None:
        """Delete exactly these messages from the source; return only once the server
        has confirmed it (raise otherwise)."""


def candidates(rows: Sequence[MessageRow], now: dt.datetime, delete_after_verify: bool,
               leave_on_server_days: int | None) -> list[MessageRow]:
    """What a run should delete: every verified message with delete_after_verify; with
    leave_on_server_days = N, those verified more than N days ago; otherwise nothing."""
    rows = [r for r in rows if r.state in DELETABLE]
    if delete_after_verify:
        return rows
    if leave_on_server_days is not None:
        cutoff = now - dt.timedelta(days=leave_on_server_days)
        return [r for r in rows if r.verified_at is not None and r.verified_at <= cutoff]
    return []


def check_cap(job_name: str, count: int, max_delete: int | None) -> None:
    if max_delete is not None and count > max_delete:
        raise SafetyError(
            f"job {job_name!r}: {count} messages would be deleted from the source, more "
            f"than --max-delete {max_delete}; nothing was deleted (the copy itself is "
            "complete). Check the summary, then re-run with a higher --max-delete")


def delete_unit(runner: JobRunner, unit: SourceUnit, rows: Sequence[MessageRow]) -> int:
    """Look again, then delete, one unit's candidates.  Returns how many were deleted.
    Safe to call again after any failure: it starts over from the committed state."""
    rows = [r for r in rows if r.state in DELETABLE]
    if not rows:
        return 0
    faults.checkpoint("delete-unit")
    if not runner.holding_lock():  # lost: another run may be working on this mailbox
        return 0
    why = unit.refusal()
    if why:
        runner.error(f"{unit.label}: {why}; nothing was deleted there")
        return 0
    seen = unit.look_again(rows)
    gone = [r for r in rows if r.id in seen.gone]
    if gone:
        runner.keep_back(gone, seen.gone,
                         f"{unit.label}: {plural(len(gone), 'verified copy', 'verified copies')}"
                         " gone from "
                         f"{unit.destination}; their originals were NOT deleted and will be "
                         "copied again by the next run")
    held = [r for r in rows if r.id in seen.held]
    if held:
        runner.store.transition(State.VERIFIED, [
            {"id": r.id, "last_error": seen.held[r.id]} for r in held
            if r.state == State.DELETING])
        for r in held:
            r.state = State.VERIFIED
        runner.error(f"{unit.label}: {plural(len(held), 'message')} NOT deleted: "
                     f"{next(iter(seen.held.values()))}")
    away = [r for r in rows if r.id in seen.not_at_source]
    if away:
        runner.settle_missing(away)
    todo = [r for r in rows if r.id not in seen.gone and r.id not in seen.held
            and r.id not in seen.not_at_source]
    done = 0
    step = unit.batch or max(1, len(todo))
    for start in range(0, len(todo), step):
        chunk = todo[start:start + step]
        # Still ours?  Asked right before each intent: a run that lost the job's lock
        # deletes nothing more (the job halted; the next run deletes).
        if not runner.holding_lock():
            break
        # The intent, committed right before the command that really deletes.
        runner.store.transition(State.DELETING, [{"id": r.id} for r in chunk
                                                 if r.state == State.VERIFIED])
        for r in chunk:
            r.state = State.DELETING
        faults.checkpoint("before-delete")
        unit.delete(chunk)
        faults.checkpoint("after-delete")
        runner.store.transition(State.DELETED, [{"id": r.id} for r in chunk])
        for r in chunk:
            r.state = State.DELETED
        runner.counters.add("deleted", len(chunk))
        done += len(chunk)
    return done


def delete_all(runner: JobRunner, work: Sequence[tuple[T, Sequence[MessageRow]]],
               run_unit: Callable[[T, Sequence[MessageRow]], object]) -> None:
    """Every unit of a job: the cap over all candidates first, then unit by unit.
    ``work`` pairs a job's handle for a unit (a folder) with its candidates;
    ``run_unit(handle, rows)`` runs delete_unit for it on the job's own connection."""
    total = sum(len([r for r in rows if r.state in DELETABLE]) for _, rows in work)
    try:
        check_cap(runner.job.name, total, runner.options.max_delete)
    except SafetyError as exc:
        runner.refuse(exc)
        return
    for handle, rows in work:
        if rows:
            run_unit(handle, rows)
