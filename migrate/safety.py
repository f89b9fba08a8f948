"""The one place that decides whether messages may be deleted from a source.

Every destructive step (IMAP \\Deleted + UID EXPUNGE, POP3 DELE) asks here first.  The
cap (--max-delete) is checked before the dry-run branch, so a dry run reports exactly
what a real run would do.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from .errors import SafetyError
from .states import State
from .store import MessageRow

DELETABLE = frozenset({State.VERIFIED, State.DELETING})


def deletable(rows: Sequence[MessageRow]) -> list[MessageRow]:
    """Only messages whose verified copy is committed in the state database."""
    return [r for r in rows if r.state in DELETABLE]


def due(rows: Sequence[MessageRow], now: dt.datetime, delete_after_verify: bool,
        leave_on_server_days: int | None) -> list[MessageRow]:
    """What a run should delete: every verified message with delete_after_verify; with
    leave_on_server_days = N, those verified more than N days ago; otherwise nothing."""
    rows = deletable(rows)
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
