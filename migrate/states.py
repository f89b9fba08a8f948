"""The per-message state machine.  Every allowed transition is listed here, once.

    seen ──► appending ──► copied ──► verified ──► deleting ──► deleted
      │          │            │          │            │
      └──────────┴────────────┴──► failed ◄───────────┘ (copy gone when looked at again)
                                  │    ▲
                                  ▼    │ run --retry-failed
                              quarantined (failed again and again, or the destination
                                           alters the message: not retried by itself)
    failed ──► appending / copied (retried by a later run)
    deleting ──► verified (deletion turned off, or the copy's flags could not be updated)
    any state before deleting ──► vanished (gone from the source, not deleted by us)
    vanished ──► seen (it reappeared: copied again, after the duplicate check)

* ``appending`` is an intent written *before* the APPEND (or the archive write): after a
  crash it says "this message may or may not be at the destination"; the next run looks
  for it there instead of appending blindly.
* ``deleting`` is the same for deletion: the source may or may not still have it.
* Only ``verified`` messages may move towards ``deleting``: nothing is removed from a
  source unless its copy was proven identical and that fact is committed.  Nothing
  leads back from ``verified`` except ``failed``: just before deleting, the copies are
  looked up once more (``deleting`` ones from an interrupted run too), and one that is
  gone (a server bug, another client) makes its message ``failed`` — kept at the source
  and copied again — instead of deleted.
* ``quarantined`` holds a message that will not copy correctly by retrying: it is
  reported with its reason and left alone until ``run --retry-failed``.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    SEEN = "seen"
    APPENDING = "appending"
    COPIED = "copied"
    VERIFIED = "verified"
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"
    VANISHED = "vanished"
    QUARANTINED = "quarantined"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.SEEN: frozenset({State.APPENDING, State.COPIED, State.FAILED, State.VANISHED}),
    State.APPENDING: frozenset({State.COPIED, State.FAILED, State.VANISHED}),
    State.COPIED: frozenset({State.VERIFIED, State.FAILED, State.VANISHED,
                             State.QUARANTINED}),
    # failed: the verified copy was gone when we looked again just before deleting
    State.VERIFIED: frozenset({State.DELETING, State.VANISHED, State.FAILED}),
    # failed: looked at again after an interrupted deletion, the copy was gone
    State.DELETING: frozenset({State.DELETED, State.VERIFIED, State.FAILED}),
    State.DELETED: frozenset(),
    State.FAILED: frozenset({State.APPENDING, State.COPIED, State.VANISHED,
                             State.QUARANTINED}),
    State.QUARANTINED: frozenset({State.FAILED, State.VANISHED}),
    # reappeared (a server that hid it for a while): copied again, duplicate check first
    State.VANISHED: frozenset({State.SEEN}),
}

# States in which the message is known to be safely at the destination.
AT_DESTINATION = frozenset({State.VERIFIED, State.DELETING, State.DELETED})
# States that still need work on a (re-)run.
PENDING = frozenset({State.SEEN, State.APPENDING, State.COPIED, State.FAILED})


def sources_of(target: State) -> frozenset[State]:
    """The states from which ``target`` may be entered."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


def can_move(current: State, target: State) -> bool:
    return target in TRANSITIONS[current]
