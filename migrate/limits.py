"""Connections per server, shared by every job of a run.

``max_connections`` of an endpoint limits the connections to that server (host and
port: the port tells the protocol) from the whole run, not from one job: with
``--workers 8`` and 500 mailboxes on one old host, the host still sees at most its
smallest configured ``max_connections``.  A connection holds a slot of its server from
before it connects until it is closed.

No deadlock: a connection pair takes the slots of both its servers at once or waits
holding none (never one side while waiting for the other), and a job waiting for a new
pair also takes an idle pair of its own pool as soon as one is given back.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .config import Endpoint, Job
from .errors import MigrateError

T = TypeVar("T")
# how often a wait looks at the stop flag when nothing else wakes it
_STOP_POLL = 0.2


class SlotWaitStopped(MigrateError):
    """The run is being stopped while a job waited for a free connection slot."""


def server_key(endpoint: Endpoint) -> tuple[str, int]:
    return (endpoint.host.lower(), endpoint.port)


class ConnectionLimits:
    """A counting semaphore per server, sized by the smallest ``max_connections`` any
    job of the run configures for it; several slots are taken all at once."""

    def __init__(self, sizes: dict[tuple[str, int], int]):
        self.sizes = dict(sizes)
        self._free = dict(sizes)
        self._cond = threading.Condition()
        self.peak: dict[tuple[str, int], int] = {k: 0 for k in sizes}  # for -v and tests

    @classmethod
    def for_jobs(cls, jobs: Iterable[Job]) -> ConnectionLimits:
        sizes: dict[tuple[str, int], int] = {}
        for job in jobs:
            for endpoint in (job.source, job.destination):
                if endpoint is not None:
                    key = server_key(endpoint)
                    sizes[key] = min(sizes.get(key, endpoint.max_connections),
                                     endpoint.max_connections)
        return cls(sizes)

    def size(self, endpoint: Endpoint) -> int:
        return self.sizes.get(server_key(endpoint), endpoint.max_connections)

    def take(self, endpoints: Sequence[Endpoint], stop: threading.Event,
             instead: Callable[[], T | None] | None = None) -> T | None:
        """Wait until every endpoint's server has a free slot and take them (returns
        None), or until ``instead()`` offers something else to use (returns it, taking
        nothing).  Raises SlotWaitStopped once ``stop`` is set."""
        keys = [server_key(e) for e in endpoints]
        with self._cond:
            for key in keys:  # a server no job of the run named (a direct caller): no limit
                self.sizes.setdefault(key, 1 << 30)
                self.peak.setdefault(key, 0)
            while True:
                if stop.is_set():
                    raise SlotWaitStopped("stopped while waiting for a free connection")
                if instead is not None:
                    offered = instead()
                    if offered is not None:
                        return offered
                if self._try_take(keys):
                    return None
                self._cond.wait(self._poll)

    # how long a waiter sleeps before it looks again without being woken
    _poll = _STOP_POLL

    def _try_take(self, keys: list[tuple[str, int]]) -> bool:
        """One free slot per key (two for a key named twice), all or none; with the
        condition held."""
        for key in keys:
            self._free.setdefault(key, 1 << 30)
        if not all(self._free[k] >= keys.count(k) for k in keys):
            return False
        for k in keys:
            self._free[k] -= 1
            self.peak[k] = max(self.peak[k], self.sizes[k] - self._free[k])
        return True

    def give_back(self, endpoints: Sequence[Endpoint]) -> None:
        """Release the slots of closed connections."""
        with self._cond:
            for e in endpoints:
                self._free[server_key(e)] += 1
            self._cond.notify_all()

    def wake(self) -> None:
        """Something a waiter may take ``instead`` became available."""
        with self._cond:
            self._cond.notify_all()


# how often a wait for a slot another process holds looks again (a slot given back in
# this process wakes the waiters at once)
_SHARED_POLL = 0.1


class SharedConnectionLimits(ConnectionLimits):
    """The same limit kept in PostgreSQL for every worker on every host: slot ``i`` of a
    server is the advisory lock ``(server, i)``, held by this process's own session
    (``slots``, a ``store.SlotLocks``) while a connection of it is open.  A killed
    worker's slots are free again as soon as PostgreSQL sees its session end."""

    def __init__(self, sizes: dict[tuple[str, int], int], slots,
                 on_lost: Callable[[Exception], None] | None = None):
        super().__init__(sizes)
        self._slots = slots
        self._held: dict[tuple[str, int], list[int]] = {}
        # called once the slots are lost (store.SlotsLost); it must stop the jobs, whose
        # waits for a slot then end as stopped.  None: SlotsLost is the job's error.
        self._on_lost = on_lost

    def watch(self, every: float, done: threading.Event) -> threading.Thread:
        """Look at the slot sessions every ``every`` seconds until ``done``: a lost one is
        replaced at once (its slots taken again), not only at the next take."""
        from .store import SlotsLost

        def loop() -> None:
            while not done.wait(every):
                try:
                    with self._cond:
                        self._slots.check()
                except SlotsLost as exc:
                    if self._on_lost is not None:
                        self._on_lost(exc)
                    return
                except Exception:  # noqa: BLE001 - a database hiccup: the next look
                    pass

        thread = threading.Thread(target=loop, name="mm-slot-watch", daemon=True)
        thread.start()
        return thread

    _poll = _SHARED_POLL  # a slot another process gives back wakes nobody here

    def _try_take(self, keys: list[tuple[str, int]]) -> bool:
        from .store import SlotsLost

        try:
            taken = self._try_take_all(keys)
        except SlotsLost as exc:
            if self._on_lost is None:
                raise
            self._on_lost(exc)
            raise SlotWaitStopped("stopped: the connection slots were lost") from None
        if taken is None:
            return False
        for key, slot in taken:
            self._held.setdefault(key, []).append(slot)
            self.peak[key] = max(self.peak[key], len(self._held[key]))
        return True

    def _try_take_all(self, keys: list[tuple[str, int]]
                      ) -> list[tuple[tuple[str, int], int]] | None:
        """One free slot per key (two for a key named twice), all or none."""
        taken: list[tuple[tuple[str, int], int]] = []
        for key in keys:
            size = self.sizes[key]
            if size >= 1 << 30:  # a server no job of the config named: no limit
                taken.append((key, -1))
                continue
            # a session may take its own advisory lock again: skip what we hold
            mine = set(self._held.get(key, ())) | {s for k, s in taken if k == key}
            got = next((slot for slot in range(size) if slot not in mine
                        and self._slots.try_take(server_lock_key(key), slot)), None)
            if got is None:
                for k, s in taken:
                    if s >= 0:
                        self._slots.release(server_lock_key(k), s)
                return None
            taken.append((key, got))
        return taken

    def give_back(self, endpoints: Sequence[Endpoint]) -> None:
        with self._cond:
            for e in endpoints:
                key = server_key(e)
                slot = self._held[key].pop()
                if slot >= 0:
                    self._slots.release(server_lock_key(key), slot)
            self._cond.notify_all()


def server_lock_key(key: tuple[str, int]) -> int:
    """A stable signed 32-bit key for a server's slot locks (the first of the two
    advisory lock keys; the slot number is the second)."""
    digest = hashlib.sha256(f"mailmigrate server slots:{key[0]}:{key[1]}".encode()).digest()
    return int.from_bytes(digest[:4], "big", signed=True)
