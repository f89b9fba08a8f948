"""The job engine: runs jobs, records runs, enforces protocol binding, summarises.

The protocol-specific work lives in ``imap_copy`` and ``pop3_archive``; both move
messages through the state machine in ``states`` via the ``Store``.  Nothing here is
process-global, so several jobs (or hosts) can run this code side by side.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from .config import IMAP_COPY, Config, Job
from .errors import EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_REFUSED, JobLocked, MigrateError
from .states import State
from .store import MessageRow, Store

log = logging.getLogger("migrate")


@dataclass
class RunOptions:
    dry_run: bool = False
    max_delete: int | None = None
    progress: bool | None = None  # None: only when stderr is a TTY
    retries: int = 4  # connection attempts per unit of work
    retry_wait: float = 1.0  # first back-off in seconds, doubling, capped at 30 s
    # a retry loop gives up this many seconds after its first failure (with the back-off
    # above, 4 attempts take ~7 s: the bound is for slow failures, e.g. timeouts)
    retry_deadline: float = 120.0
    batch_bytes: int = 4 * 1024 * 1024  # size bound of one FETCH/APPEND batch
    batch_messages: int = 200
    # Server capabilities to ignore (both sides), e.g. {"UIDPLUS"}: tests use it to exercise
    # the fallbacks for servers without them.
    ignore_capabilities: frozenset[str] = frozenset()
    retry_failed: bool = False  # quarantined messages are tried again
    # a message that failed this many runs is quarantined (not retried by itself)
    quarantine_after: int = 3


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

    @property
    def ok(self) -> bool:
        return not self.errors and not self.counts.get("failed", 0)

    def summary_line(self) -> str:
        c = self.counts
        if self.exit_code == EXIT_LOCKED:
            return f"{self.job}: already running elsewhere; nothing was done"
        if self.exit_code == EXIT_REFUSED and not c:
            return f"{self.job}: refused; nothing was done (see the error above)"
        if self.dry_run:
            verb = "archive" if self.kind != IMAP_COPY else "copy"
            line = (f"{self.job} (dry run): would {verb} {c.get('would_copy', 0)} messages "
                    f"({c.get('would_copy_bytes', 0) / 1e6:.1f} MB)")
            if self.kind == IMAP_COPY:
                line += (f" in {c.get('folders', 0)} folders, update flags on "
                         f"{c.get('flags_updated', 0)}")
            line += f", delete {c.get('would_delete', 0)} now verified"
            if c.get("vanished"):
                line += f"; {c['vanished']} vanished since the last run"
            return line + "; nothing was changed"
        mb = c.get("bytes", 0) / 1e6
        secs = max(self.elapsed, 1e-6)
        rate = c.get("copied", 0) / secs
        prefix = f"{self.job} (dry run)" if self.dry_run else self.job
        unit = "archived" if self.kind != IMAP_COPY else "copied"
        parts = []
        if self.kind == IMAP_COPY:
            parts.append(f"{c.get('folders', 0)} folders")
        parts += [f"{c.get('copied', 0)} {unit}",
                  f"{c.get('skipped', 0)} skipped as duplicates"]
        if self.kind == IMAP_COPY:
            parts.append(f"{c.get('flags_updated', 0)} flags updated")
        parts += [f"{c.get('deleted', 0)} deleted", f"{c.get('failed', 0)} failed"]
        if c.get("vanished"):
            parts.append(f"{c['vanished']} vanished")
        return (f"{prefix}: " + ", ".join(parts)
                + f", {mb:.1f} MB in {self.elapsed:.1f} s ({rate:.0f} msgs/s, "
                f"{mb / secs:.1f} MB/s)")


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
    """A tqdm bar on a TTY; nothing otherwise.  Totals grow as folders are listed."""

    def __init__(self, label: str, enabled: bool | None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._lock = threading.Lock()
        self.bar = tqdm(total=0, unit="msg", desc=label, disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True, leave=False)

    def grow(self, n: int) -> None:
        if n:
            with self._lock:
                self.bar.total += n
                self.bar.refresh()

    def advance(self, n: int) -> None:
        if n:
            with self._lock:
                self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class JobRunner:
    """What both jobs share: their context, error/warning collection, and what to make
    of messages that are no longer at the source."""

    def __init__(self, job: Job, store: Store, job_id: int | None, options: RunOptions,
                 counters: Counters, result: JobResult):
        self.job = job
        self.store = store
        self.job_id = job_id
        self.options = options
        self.counters = counters
        self.result = result
        self.dry = options.dry_run
        self._lock = threading.Lock()

    def error(self, text: str) -> None:
        with self._lock:
            self.result.errors.append(text)
        log.error("%s: %s", self.job.name, text)

    def warn(self, text: str) -> None:
        with self._lock:
            self.result.warnings.append(text)
        log.warning("%s: %s", self.job.name, text)

    def batches(self, rows: Sequence[MessageRow], max_bytes: int) -> Iterator[list[MessageRow]]:
        """Consecutive rows in size- and count-bounded batches; a large message travels
        alone."""
        batch: list[MessageRow] = []
        size = 0
        for r in rows:
            if batch and (size + r.size > max_bytes
                          or len(batch) >= self.options.batch_messages):
                yield batch
                batch, size = [], 0
            batch.append(r)
            size += r.size
        if batch:
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
            deletes=job.delete_after_verify or job.leave_on_server_days is not None,
            check_only=self.dry)

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
        if back and not self.dry:
            self.store.transition(State.SEEN, [{"id": r.id} for r in back])
        for r in back:
            r.state = State.SEEN

    def settle_missing(self, missing: Sequence[MessageRow]) -> int:
        """Messages gone from the source: a ``deleting`` one was deleted by us (the
        EXPUNGE/QUIT went through before a crash or drop); any other has *vanished*:
        someone else deleted it.  Returns how many vanished."""
        ours = [r for r in missing if r.state == State.DELETING]
        theirs = [r for r in missing if r.state in (State.SEEN, State.APPENDING, State.COPIED,
                                                    State.VERIFIED, State.FAILED)]
        if not self.dry:
            self.store.apply([(State.DELETED, [{"id": r.id} for r in ours], False),
                              (State.VANISHED, [{"id": r.id} for r in theirs], False)])
            for r in ours:
                r.state = State.DELETED
            for r in theirs:
                r.state = State.VANISHED
        self.counters.add("vanished", len(theirs))
        return len(theirs)


class RetryLoop:
    """Runs a unit of work again after transient (connection) errors, with exponential
    back-off, at most ``options.retries`` attempts and ``options.retry_deadline`` seconds
    after the first failure.  Permanent errors pass through at once.

    A server that is unreachable (refused, no answer) is only retried once a connection
    of this loop had reached it (``reached``, or an earlier attempt that failed later
    than connecting): on first contact it means a wrong host or port.  An error the loop
    gives up on leaves marked as not transient, so an enclosing loop does not retry the
    same thing again (retries never multiply)."""

    def __init__(self, options: RunOptions, reached: bool):
        self.options = options
        self.reached = reached

    def __call__(self, work, *args, **kwargs):
        opts = self.options
        attempts = max(1, opts.retries)
        first_failure: float | None = None
        attempt = 0
        while True:
            attempt += 1
            try:
                return work(*args, **kwargs)
            except MigrateError as exc:
                if not exc.transient:
                    raise
                unreachable = getattr(exc, "unreachable", False)
                if not unreachable:
                    self.reached = True
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                wait = min(opts.retry_wait * 2 ** (attempt - 1), 30.0)
                left = opts.retry_deadline - (now - first_failure)
                if (unreachable and not self.reached) or attempt >= attempts or wait >= left:
                    exc.transient = False  # final: see the class comment
                    raise
                log.warning("connection problem (%s); retrying in %.1f s (attempt %d of %d)",
                            exc, wait, attempt + 1, attempts)
                time.sleep(wait)


def retrying(options: RunOptions, *, reached: bool = False) -> RetryLoop:
    """``retrying(options)(work, *args)``: see RetryLoop."""
    return RetryLoop(options, reached)


def run_jobs(config: Config, names: Sequence[str] | None, options: RunOptions,
             store: Store | None = None) -> list[JobResult]:
    jobs = [config.job(n) for n in names] if names else list(config.jobs)
    own_store = store is None
    store = store or Store(config.state_url)
    try:
        return [run_job(job, store, options) for job in jobs]
    finally:
        if own_store:
            store.close()


def run_job(job: Job, store: Store, options: RunOptions) -> JobResult:
    if options.dry_run:  # read-only: may run beside a real run
        return _run_job(job, store, options)
    try:
        with store.job_lock(job.name):
            return _run_job(job, store, options)
    except JobLocked as exc:
        result = JobResult(job.name, job.kind, options.dry_run, exit_code=exc.exit_code)
        result.errors.append(str(exc))
        return result


def _run_job(job: Job, store: Store, options: RunOptions) -> JobResult:
    from .imap_copy import ImapCopy
    from .pop3_archive import Pop3Archive

    result = JobResult(job.name, job.kind, options.dry_run)
    # A dry run writes nothing to the state database: it only reads what earlier runs did.
    # The protocol binding is checked by the job right after its first connection (the
    # server's certificate tells which server it is); a refusal there touches nothing.
    if options.dry_run:
        job_id, run_id = store.find_job(job.name), None
    else:
        job_id = store.ensure_job(job.name, job.kind)
        if options.retry_failed:
            store.release_quarantine(job_id)
        run_id = store.start_run(job_id, dry_run=False)
    counters = Counters()
    started = time.monotonic()
    worker_cls = ImapCopy if job.kind == IMAP_COPY else Pop3Archive
    outcome = "ok"
    try:
        worker_cls(job, store, job_id, options, counters, result).run()
    except MigrateError as exc:  # ConfigError here: a password source that failed
        result.errors.append(str(exc))
        result.exit_code = max(result.exit_code, exc.exit_code)
        outcome = "failed"
    except BaseException as exc:
        outcome = "aborted"
        if run_id is not None:
            store.finish_run(run_id, outcome, counters.values, error=type(exc).__name__)
        raise
    result.elapsed = time.monotonic() - started
    result.counts = dict(counters.values)
    if result.counts.get("failed") or result.errors:
        outcome = "failed"
    if run_id is not None:
        store.finish_run(run_id, outcome, result.counts,
                         error="; ".join(result.errors)[:2000] or None)
    return result


def exit_code(results: Sequence[JobResult]) -> int:
    """The worst outcome: 3 a job was already running, 2 refused, 1 failed, 0 done."""
    codes = [r.exit_code for r in results]
    codes += [EXIT_OK if r.ok else EXIT_FAILED for r in results]
    return max(codes, default=EXIT_OK)
