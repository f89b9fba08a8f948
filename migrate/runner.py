"""What every job shares: its options, counters, progress bar, error and warning
collection, the bounded retry loop, and what to make of messages no longer at the source.

The jobs (``imap_copy``, ``pop3_archive``) build on ``JobRunner``; the engine runs them.
Nothing here knows a protocol.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from tenacity import Retrying, retry_if_exception

from .config import Endpoint, Job
from .endpoints.backoff import ServerBackoff
from .errors import JobLockLost, MailboxError, MigrateError
from .limits import ConnectionLimits
from .results import JobResult, plural
from .states import State
from .store import JobLockHold, MessageRow, Store

log = logging.getLogger("migrate")

# An APPEND (or CREATE) refused because the destination mailbox is full: RFC 5530's
# [OVERQUOTA], or a server's own words.  Every further APPEND would fail the same way.
_OVER_QUOTA = re.compile(r"\[OVERQUOTA\]|\bquota\b", re.IGNORECASE)


def over_quota(text: str) -> bool:
    """Is this refusal the destination being full (not the message's own fault)?"""
    return bool(_OVER_QUOTA.search(text))


@dataclass
class RunOptions:
    # run_jobs plans a dry run with migrate.report; the jobs themselves never see one
    dry_run: bool = False
    max_delete: int | None = None
    progress: bool | None = None  # None: only when stderr is a TTY
    retries: int = 4  # connection attempts per unit of work
    retry_wait: float = 1.0  # first back-off in seconds, doubling, capped at 30 s
    # a retry loop gives up this many seconds after its first failure (with the back-off
    # above, 4 attempts take ~7 s: the bound is for slow failures, e.g. timeouts)
    retry_deadline: float = 120.0
    # Servers that push back ([UNAVAILABLE], [THROTTLED], "Suggested Backoff Time", POP3
    # [IN-USE]/[LOGIN-DELAY]): a job waits what they ask (at least the back-off above,
    # backoff_default when they name no time), at most backoff_budget seconds in all.
    backoff_budget: float = 600.0
    backoff_default: float = 5.0
    batch_bytes: int = 4 * 1024 * 1024  # size bound of one FETCH/APPEND batch
    batch_messages: int = 200
    # Server capabilities to ignore (both sides), e.g. {"UIDPLUS"}: tests use it to exercise
    # the fallbacks for servers without them.
    ignore_capabilities: frozenset[str] = frozenset()
    retry_failed: bool = False  # quarantined messages are tried again
    # a message that failed this many runs is quarantined (not retried by itself)
    quarantine_after: int = 3
    max_errors: int | None = None  # a job stops after this many errors (None: never)
    # Set (by the CLI's SIGINT/SIGTERM handler) to stop every job after its batch in
    # flight: jobs check it between batches and folders, and start nothing new.
    stop: threading.Event = field(default_factory=threading.Event)
    workers: int = 1  # jobs run at the same time (--workers)
    # connection slots per server shared by every job of the run (engine.run_jobs sets
    # it); None: each job only keeps to its own endpoints' max_connections
    connection_limits: ConnectionLimits | None = None


class Counters:
    """Thread-safe counters shared by a job's workers."""

    def __init__(self):
        self._lock = threading.Lock()
        self.values: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self.values[name] = self.values.get(name, 0) + n


class Progress:
    """A tqdm bar on a TTY; nothing otherwise (tqdm is then not even imported: cron runs
    start faster).  Totals grow as folders are listed."""

    def __init__(self, label: str, enabled: bool | None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._lock = threading.Lock()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="msg", desc=label, file=sys.stderr,
                            dynamic_ncols=True, leave=False)

    def grow(self, n: int) -> None:
        if n and self.bar is not None:
            with self._lock:
                self.bar.total += n
                self.bar.refresh()

    def advance(self, n: int) -> None:
        if n and self.bar is not None:
            with self._lock:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class JobRunner:
    """What both jobs share: their context, error/warning collection, and what to make
    of messages that are no longer at the source."""

    def __init__(self, job: Job, store: Store, job_id: int, options: RunOptions,
                 counters: Counters, result: JobResult, job_lock: JobLockHold | None = None):
        self.job = job
        # the engine's hold on the job's lock (none: a job run without one, in tests)
        self.job_lock = job_lock or JobLockHold()
        self.store = store
        self.job_id = job_id
        self.options = options
        self.counters = counters
        self.result = result
        self._lock = threading.Lock()
        self._errors = 0
        self._halted: str | None = None  # why this job stops early, once it does
        self._halt_reported = False
        self.backoff = BackoffAccount(options.backoff_budget, counters, self.warn)

    def retrying(self, *, reached: bool = False) -> RetryLoop:
        """A retry loop whose waits for servers that push back count against this job's
        back-off budget (and show in its summary)."""
        return RetryLoop(self.options, reached, self.backoff)

    def error(self, text: str) -> None:
        halt = None
        with self._lock:
            self.result.errors.append(text)
            self._errors += 1
            if self._halted is None:
                if over_quota(text):
                    halt = ("the destination is over quota; this job stopped copying (make "
                            "room or raise the quota, then run it again)")
                elif (self.options.max_errors is not None
                      and self._errors >= self.options.max_errors):
                    halt = (f"stopped after {plural(self._errors, 'error')} "
                            f"(--max-errors {self.options.max_errors})")
                if halt:
                    self._halted = halt
                    self.result.errors.append(halt)
        # shown by the CLI right before the job's summary; logged as it happens with -v
        log.error("%s: %s", self.job.name, text, extra={"reported": True})
        if halt:
            log.error("%s: %s", self.job.name, halt, extra={"reported": True})

    def stopping(self) -> bool:
        """Start no new batch, folder or deletion: the run was interrupted (SIGINT or
        SIGTERM), or this job hit a stop condition (over quota, --max-errors, its lock
        lost)."""
        return self.options.stop.is_set() or self._halted is not None

    def holding_lock(self) -> bool:
        """Does this run still hold the job's lock?  Asked at batch boundaries and right
        before every deletion: one round trip on PostgreSQL, nothing on SQLite.  A lock
        lost for good (its database session ended and another run may have the job now)
        halts the job, as an error (exit 1): False, and nothing more may be started."""
        try:
            note = self.job_lock.check()
        except JobLockLost as exc:
            self.halt(str(exc))
            self.result.lock_lost = True
            return False
        if note:
            self.warn(note)
        return True

    def halt(self, text: str) -> None:
        """Stop this job (after the work in flight) for this reason, an error."""
        with self._lock:
            first = self._halted is None
            if first:
                self._halted = text
                self.result.errors.append(text)
        if first:
            log.error("%s: %s", self.job.name, text, extra={"reported": True})

    @contextmanager
    def connection_slot(self, endpoint: Endpoint) -> Iterator[None]:
        """Hold a slot of the endpoint's server (shared by every job of the run) for a
        connection opened and closed inside the block; waits for a free one."""
        limits = self.options.connection_limits
        if limits is None:
            yield
            return
        limits.take([endpoint], self.options.stop)
        try:
            yield
        finally:
            limits.give_back([endpoint])

    def warn(self, text: str) -> None:
        with self._lock:
            self.result.warnings.append(text)
        log.warning("%s: %s", self.job.name, text, extra={"reported": True})

    def batches(self, rows: Sequence[MessageRow], max_bytes: int) -> Iterator[list[MessageRow]]:
        """Consecutive rows in size- and count-bounded batches; a large message travels
        alone."""
        batch: list[MessageRow] = []
        size = 0
        for r in rows:
            if batch and (size + r.size > max_bytes
                          or len(batch) >= self.options.batch_messages):
                if self.stopping():
                    return
                log.debug("%s: batch of %s, %d bytes", self.job.name,
                          plural(len(batch), "message"), size)
                yield batch
                batch, size = [], 0
            batch.append(r)
            size += r.size
        if batch and not self.stopping():
            log.debug("%s: batch of %s, %d bytes", self.job.name,
                      plural(len(batch), "message"), size)
            yield batch

    def refuse(self, exc: MigrateError) -> None:
        """A safety refusal (e.g. --max-delete): reported, and the run exits with 2."""
        self.error(str(exc))
        with self._lock:
            self.result.exit_code = max(self.result.exit_code, exc.exit_code)

    def bind_source(self, aliases: Sequence[str]) -> None:
        """Protocol binding, right after the first connection to the source told us which
        server this really is; raises SafetyError (exit 2) before anything is read."""
        src, job = self.job.source, self.job
        self.store.bind_mailbox(
            aliases, f"{src.host}:{src.port}", src.username, src.protocol, job.name,
            deletes=job.delete_after_verify or job.leave_on_server_days is not None)

    def keep_back(self, gone: Sequence[MessageRow], why: dict[int, str], report: str) -> None:
        """Messages whose copy is gone when looked at right before deleting the
        originals: they become failed (kept at the source, copied again by the next
        run), never deleted."""
        if gone:
            self.store.transition(State.FAILED, [{"id": r.id, "last_error": why[r.id],
                                                  "destination_uid": None} for r in gone],
                                  bump_attempts=True)
            for r in gone:
                r.state, r.destination_uid = State.FAILED, None
            self.counters.add("failed", len(gone))
            self.error(report)

    def revive(self, present: Sequence[MessageRow]) -> None:
        """Rows marked vanished whose message is back at the source (some servers hide
        messages for a while): they go through the copy path again — never lost."""
        back = [r for r in present if r.state == State.VANISHED]
        if back:
            self.store.transition(State.SEEN, [{"id": r.id} for r in back])
        for r in back:
            r.state = State.SEEN

    def settle_missing(self, missing: Sequence[MessageRow]) -> int:
        """Messages gone from the source: a ``deleting`` one was deleted by us (the
        EXPUNGE/QUIT went through before a crash or drop); any other has *vanished*:
        someone else deleted it.  Returns how many vanished."""
        ours = [r for r in missing if r.state == State.DELETING]
        theirs = [r for r in missing if r.state in (State.SEEN, State.APPENDING, State.COPIED,
                                                    State.VERIFIED, State.FAILED,
                                                    State.QUARANTINED)]
        self.store.apply([(State.DELETED, [{"id": r.id} for r in ours], False),
                          (State.VANISHED, [{"id": r.id} for r in theirs], False)])
        for r in ours:
            r.state = State.DELETED
        for r in theirs:
            r.state = State.VANISHED
        self.counters.add("vanished", len(theirs))
        return len(theirs)


class BackoffAccount:
    """The time one job waits because servers asked it to: bounded in all by the budget
    (waits of parallel workers add up), counted as ``waited_seconds``, and reported once
    with the server's reason."""

    def __init__(self, budget: float, counters: Counters | None = None, warn=None):
        self.budget = budget
        self.counters = counters
        self.warn = warn
        self.promised = 0.0  # seconds of waiting granted so far
        self._lock = threading.Lock()
        self._warned = False

    def reserve(self, seconds: float) -> bool:
        """May the job wait ``seconds`` more?  If so they are granted (counted against
        the budget at once, so parallel workers cannot overdraw it)."""
        with self._lock:
            if self.promised + seconds > self.budget:
                return False
            self.promised += seconds
            return True

    def waited(self, seconds: float, exc: ServerBackoff) -> None:
        with self._lock:
            first, self._warned = not self._warned, True
        if self.counters is not None:
            self.counters.add("waited_seconds", seconds)
        if first and self.warn is not None:
            self.warn(f"server {exc.server} pushed back ({exc.reason}); waiting as it asks, "
                      f"at most {self.budget:g} s in all for this job")


class RetryLoop:
    """Runs a unit of work again after transient (connection) errors, with exponential
    back-off, at most ``options.retries`` attempts and ``options.retry_deadline`` seconds
    (waits for push-back not counted).  Permanent errors pass through at once, and
    nothing is retried once the run is asked to stop.

    A server that pushes back (ServerBackoff) is waited for as long as it asks - at
    least the exponential back-off, ``options.backoff_default`` when it names no time -
    bounded not by the attempts but by the job's back-off budget (``backoff``; without
    one, a budget of this loop's own).  A wait the budget does not cover fails at once,
    naming the server's reason and the budget.

    A server that is unreachable (refused, no answer) is only retried once a connection
    of this loop had reached it (``reached``, or an earlier attempt that failed later
    than connecting): on first contact it means a wrong host or port.  An error the loop
    gives up on leaves marked as not transient, so an enclosing loop does not retry the
    same thing again (retries never multiply)."""

    def __init__(self, options: RunOptions, reached: bool,
                 backoff: BackoffAccount | None = None):
        self.options = options
        self.reached = reached
        self.backoff = backoff or BackoffAccount(options.backoff_budget)
        self._failures = 0  # failures other than push-back
        self._pushback_waits = 0.0  # seconds of this loop spent waiting for push-back
        self._decided: tuple[int, tuple[bool, float]] = (0, (False, 0.0))
        self._last: BaseException | None = None
        self._refused_wait: float | None = None  # a push-back wait the budget refused

    def _worth_retrying(self, exc: BaseException) -> bool:
        if not (isinstance(exc, MigrateError) and exc.transient):
            return False
        unreachable = getattr(exc, "unreachable", False)
        if not unreachable:
            self.reached = True
        return self.reached and not self.options.stop.is_set()

    def _exponential(self, attempt: int) -> float:
        return min(30.0, self.options.retry_wait * 2 ** (attempt - 1))

    def _decide(self, rs) -> tuple[bool, float]:
        """(give up?, seconds to wait before the next attempt) after a failed attempt;
        decided once per attempt (tenacity asks for the wait and the stop separately)."""
        if self._decided[0] == rs.attempt_number:
            return self._decided[1]
        exc = rs.outcome.exception()
        self._last = exc
        backoff = self._exponential(rs.attempt_number)
        if isinstance(exc, ServerBackoff):
            hint = exc.retry_after
            wait = max(backoff, self.options.backoff_default if hint is None else hint)
            if self.backoff.reserve(wait):
                decision = (False, wait)
            else:
                self._refused_wait = wait
                decision = (True, 0.0)
        else:
            self._failures += 1
            working = rs.seconds_since_start - self._pushback_waits
            decision = (self._failures >= max(1, self.options.retries)
                        or working >= self.options.retry_deadline, backoff)
        self._decided = (rs.attempt_number, decision)
        return decision

    def _sleep(self, seconds: float) -> None:
        """Wait, but not past a request to stop the run (a long push-back included)."""
        exc = self._last
        started = time.monotonic()
        deadline = started + seconds
        # at least what the server asked (a timed wait may wake a little early)
        while not self.options.stop.is_set() and time.monotonic() < deadline:
            self.options.stop.wait(deadline - time.monotonic())
        slept = time.monotonic() - started
        if isinstance(exc, ServerBackoff):
            self._pushback_waits += slept
            self.backoff.waited(slept, exc)
        if self.options.stop.is_set() and exc is not None:
            raise exc

    def _before_sleep(self, rs) -> None:
        exc = rs.outcome.exception()
        if isinstance(exc, ServerBackoff):
            log.warning("%s; waiting %.1f s before trying again", exc, self._decide(rs)[1])
        else:
            log.warning("connection problem (%s); retrying (attempt %d of %d)",
                        exc, self._failures + 1, max(1, self.options.retries))

    def __call__(self, work, *args, **kwargs):
        loop = Retrying(
            stop=lambda rs: self._decide(rs)[0],
            wait=lambda rs: self._decide(rs)[1],
            sleep=self._sleep,
            retry=retry_if_exception(self._worth_retrying),
            before_sleep=self._before_sleep,
            reraise=True)
        try:
            return loop(work, *args, **kwargs)
        except ServerBackoff as exc:
            if self._refused_wait is None:
                exc.transient = False  # final: see the class comment
                raise
            raise MailboxError(
                f"{exc}; gave up: waiting {self._refused_wait:g} s more would go beyond "
                f"this job's back-off budget of {self.backoff.budget:g} s (waited "
                f"{self.backoff.promised:g} s so far)") from None
        except MigrateError as exc:
            exc.transient = False  # final: see the class comment
            raise


def retrying(options: RunOptions, *, reached: bool = False,
             backoff: BackoffAccount | None = None) -> RetryLoop:
    """``retrying(options)(work, *args)``: see RetryLoop; jobs use JobRunner.retrying,
    which counts push-back waits against the job's budget."""
    return RetryLoop(options, reached, backoff)
