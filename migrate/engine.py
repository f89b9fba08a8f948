"""The job engine: runs jobs, records runs, enforces protocol binding, summarises.

The protocol-specific work lives in ``imap_copy`` and ``pop3_archive``; both move
messages through the state machine in ``states`` via the ``Store``.  Nothing here is
process-global, so several jobs (or hosts) can run this code side by side.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from tenacity import (Retrying, retry_if_exception, stop_after_attempt, stop_after_delay,
                      wait_exponential)
from tqdm import tqdm

from .config import IMAP_COPY, Config, Job
from .errors import (
    EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_REFUSED, JobLocked, MigrateError, StateError,
)
from .states import State
from .store import DATABASE_ERRORS, MessageRow, Store, database_error_text, sqlite_file

log = logging.getLogger("migrate")

# An APPEND (or CREATE) refused because the destination mailbox is full: RFC 5530's
# [OVERQUOTA], or a server's own words.  Every further APPEND would fail the same way.
_OVER_QUOTA = re.compile(r"\[OVERQUOTA\]|\bquota\b", re.IGNORECASE)


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
    max_errors: int | None = None  # a job stops after this many errors (None: never)
    # Set (by the CLI's SIGINT/SIGTERM handler) to stop every job after its batch in
    # flight: jobs check it between batches and folders, and start nothing new.
    stop: threading.Event = field(default_factory=threading.Event)


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
        self._errors = 0
        self._halted: str | None = None  # why this job stops early, once it does
        self._halt_reported = False

    def error(self, text: str) -> None:
        halt = None
        with self._lock:
            self.result.errors.append(text)
            self._errors += 1
            if self._halted is None:
                if _OVER_QUOTA.search(text):
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
        SIGTERM), or this job hit a stop condition (over quota, --max-errors)."""
        return self.options.stop.is_set() or self._halted is not None

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
                                                    State.VERIFIED, State.FAILED,
                                                    State.QUARANTINED)]
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
    back-off (tenacity), at most ``options.retries`` attempts and ``options.retry_deadline``
    seconds.  Permanent errors pass through at once, and nothing is retried once the run
    is asked to stop.

    A server that is unreachable (refused, no answer) is only retried once a connection
    of this loop had reached it (``reached``, or an earlier attempt that failed later
    than connecting): on first contact it means a wrong host or port.  An error the loop
    gives up on leaves marked as not transient, so an enclosing loop does not retry the
    same thing again (retries never multiply)."""

    def __init__(self, options: RunOptions, reached: bool):
        self.options = options
        self.reached = reached

    def _worth_retrying(self, exc: BaseException) -> bool:
        if not (isinstance(exc, MigrateError) and exc.transient):
            return False
        unreachable = getattr(exc, "unreachable", False)
        if not unreachable:
            self.reached = True
        return self.reached and not self.options.stop.is_set()

    def __call__(self, work, *args, **kwargs):
        opts = self.options
        attempts = max(1, opts.retries)
        loop = Retrying(
            stop=stop_after_attempt(attempts) | stop_after_delay(opts.retry_deadline),
            wait=wait_exponential(multiplier=opts.retry_wait, max=30),
            retry=retry_if_exception(self._worth_retrying),
            before_sleep=lambda rs: log.warning(
                "connection problem (%s); retrying (attempt %d of %d)",
                rs.outcome.exception(), rs.attempt_number + 1, attempts),
            reraise=True)
        try:
            return loop(work, *args, **kwargs)
        except MigrateError as exc:
            exc.transient = False  # final: see the class comment
            raise


def retrying(options: RunOptions, *, reached: bool = False) -> RetryLoop:
    """``retrying(options)(work, *args)``: see RetryLoop."""
    return RetryLoop(options, reached)


def run_jobs(config: Config, names: Sequence[str] | None, options: RunOptions,
             store: Store | None = None,
             on_result: Callable[[JobResult], None] | None = None) -> list[JobResult]:
    """Run the jobs one after the other; ``on_result`` gets each result as soon as its
    job is done (the CLI prints it then, so cron mail shows what finished before a kill).
    Whatever goes wrong in one job is that job's error: the others still run."""
    jobs = [config.job(n) for n in names] if names else list(config.jobs)
    scratch = None
    if store is None:
        url = config.state_url
        database = sqlite_file(url)
        if options.dry_run and database is not None and not os.path.exists(database):
            # A dry run creates no state database: it reads an empty one, as if no
            # earlier run had happened, and throws it away.
            scratch = tempfile.mkdtemp(prefix="mailmigrate-dry-run-")
            url = f"sqlite:///{os.path.join(scratch, 'state.db')}"
        try:
            own_store = Store(url)
        except DATABASE_ERRORS as exc:
            shutil.rmtree(scratch or "", ignore_errors=True)
            raise StateError(database_error_text(exc, url)) from None
        except BaseException:
            shutil.rmtree(scratch or "", ignore_errors=True)
            raise
    else:
        own_store = None
    results = []
    try:
        for job in jobs:
            if options.stop.is_set():
                result = JobResult(job.name, job.kind, options.dry_run, interrupted=True,
                                   started=False)
            else:
                result = run_job(job, own_store or store, options)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results
    finally:
        if own_store is not None:
            own_store.close()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def run_job(job: Job, store: Store, options: RunOptions) -> JobResult:
    """One job, whatever happens: its result, never an exception (but KeyboardInterrupt)."""
    try:
        if options.dry_run:  # read-only: may run beside a real run
            return _run_job(job, store, options)
        with store.job_lock(job.name):
            return _run_job(job, store, options)
    except JobLocked as exc:
        result = JobResult(job.name, job.kind, options.dry_run, exit_code=exc.exit_code)
        result.errors.append(str(exc))
        return result
    except Exception as exc:  # taking or releasing the lock failed
        result = JobResult(job.name, job.kind, options.dry_run)
        _job_error(result, exc, store)
        return result


def _job_error(result: JobResult, exc: Exception, store: Store) -> None:
    """An exception that ended a job, as one error line for the admin (the traceback
    only with -vv)."""
    if isinstance(exc, MigrateError):
        result.errors.append(str(exc))
        result.exit_code = max(result.exit_code, exc.exit_code)
        return
    if isinstance(exc, DATABASE_ERRORS):
        result.errors.append(database_error_text(exc, store.safe_url)
                             + "; the job stopped (its progress up to here is saved)")
    else:
        result.errors.append(
            f"unexpected error, the job stopped: {type(exc).__name__}: {exc} (run with -vv "
            "for the traceback; what was committed before is kept)")
    log.debug("%s: the job stopped on this exception", result.job, exc_info=exc)


def _run_job(job: Job, store: Store, options: RunOptions) -> JobResult:
    from .imap_copy import ImapCopy
    from .pop3_archive import Pop3Archive

    result = JobResult(job.name, job.kind, options.dry_run)
    counters = Counters()
    started = time.monotonic()
    worker_cls = ImapCopy if job.kind == IMAP_COPY else Pop3Archive
    run_id = None
    try:
        # A dry run writes nothing to the state database: it only reads what earlier runs
        # did.  The protocol binding is checked by the job right after its first
        # connection (the server's certificate tells which server it is); a refusal there
        # touches nothing.
        if options.dry_run:
            job_id = store.find_job(job.name)
        else:
            job_id = store.ensure_job(job.name, job.kind)
            # we hold the job's lock: a run still "running" died without finishing
            stale = store.abort_stale_runs(job_id)
            if stale:
                log.info("%s: %s left running by a killed process recorded as aborted",
                         job.name, plural(stale, "earlier run"))
            if options.retry_failed:
                store.release_quarantine(job_id)
            run_id = store.start_run(job_id, dry_run=False)
        worker_cls(job, store, job_id, options, counters, result).run()
    except Exception as exc:  # noqa: BLE001 - every failure is this job's, reported
        _job_error(result, exc, store)
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: record, then go
        if run_id is not None:
            try:
                store.finish_run(run_id, "aborted", counters.values,
                                 error=type(exc).__name__)
            except Exception:  # noqa: BLE001 - the next start marks it aborted anyway
                pass
        raise
    result.elapsed = time.monotonic() - started
    result.counts = dict(counters.values)
    result.interrupted = options.stop.is_set()
    if result.plan:  # folders finish in any order; show them in a stable one
        result.plan = sorted(result.plan, key=_plan_order)
    if result.interrupted:
        outcome = "aborted"
    elif not result.ok or result.exit_code != EXIT_OK:
        outcome = "failed"
    else:
        outcome = "ok"
    if run_id is not None:
        try:
            store.finish_run(run_id, outcome, result.counts,
                             error="; ".join(result.error_lines())[:2000] or None)
        except DATABASE_ERRORS as exc:
            result.errors.append("the outcome of this run could not be recorded: "
                                 + database_error_text(exc, store.safe_url))
    return result


def _plan_order(line: str) -> tuple[int, str]:
    """Dry-run plan: folders to create, then each folder by source name, then the rest."""
    if line.startswith("would create folder"):
        return 0, line
    if line.startswith("folder "):
        return 1, line
    return 2, ""


# Exit code precedence: a refusal or a failure is never hidden by another job having been
# locked ("already running") — cron must see that something needs attention.
_EXIT_RANK = {EXIT_OK: 0, EXIT_LOCKED: 1, EXIT_FAILED: 2, EXIT_REFUSED: 3}


def exit_code(results: Sequence[JobResult]) -> int:
    """The most serious outcome: 2 refused > 1 failed > 3 already running > 0 done."""
    codes = [r.exit_code for r in results]
    codes += [EXIT_FAILED for r in results if not r.ok and r.exit_code == EXIT_OK]
    return max(codes, key=lambda c: _EXIT_RANK.get(c, 2), default=EXIT_OK)
