"""Crash points for the kill -9 tests.

``MAILMIGRATE_CRASH_AT=<point>:<n>`` makes the process SIGKILL itself the n-th time it
passes ``checkpoint(<point>)``: a real kill -9 at an exact, repeatable place.  Without
the variable, checkpoint() is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
import threading

_lock = threading.Lock()
_hits: dict[str, int] = {}


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec or ":" not in spec:
        return None
    point, _, count = spec.rpartition(":")
    return point, int(count)


_TARGET = _parse(os.environ.get("MAILMIGRATE_CRASH_AT"))


def checkpoint(point: str) -> None:
    if _TARGET is None or _TARGET[0] != point:
        return
    with _lock:
        _hits[point] = _hits.get(point, 0) + 1
        if _hits[point] >= _TARGET[1]:
            os.kill(os.getpid(), signal.SIGKILL)
