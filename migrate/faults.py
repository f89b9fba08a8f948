"""Crash points for the kill -9 tests.

``MAILMIGRATE_CRASH_AT=<point>:<n>`` makes the process SIGKILL itself the n-th time it
passes ``checkpoint(<point>)``: a real kill -9 at an exact, repeatable place.  Without
the variable, checkpoint() is a dictionary lookup and nothing else.

``MAILMIGRATE_PAUSE_AT=<point>:<n>`` makes it stop itself (SIGSTOP) there instead, once:
a test waits for the stop (waitpid WUNTRACED), does something to the world while the
process stands still (e.g. ends its database session), then sends SIGCONT.
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
_PAUSE = _parse(os.environ.get("MAILMIGRATE_PAUSE_AT"))


def checkpoint(point: str) -> None:
    if _TARGET is not None and _TARGET[0] == point:
        with _lock:
            _hits[point] = _hits.get(point, 0) + 1
            if _hits[point] >= _TARGET[1]:
                os.kill(os.getpid(), signal.SIGKILL)
    if _PAUSE is not None and _PAUSE[0] == point:
        with _lock:
            key = "pause:" + point
            _hits[key] = _hits.get(key, 0) + 1
            if _hits[key] == _PAUSE[1]:
                os.kill(os.getpid(), signal.SIGSTOP)
