"""The job engine: runs jobs - one after the other, or up to ``--workers`` at once -
with locks, run records, one job's failure never stopping the others, and ranks their
outcomes into an exit code.

The protocol-specific work lives in the jobs (``imap_copy``, ``pop3_archive``, on the
shared ``runner``); both move messages through the state machine in ``states`` via the
``Store``.  Nothing here is process-global, so several jobs (or hosts) can run this code
side by side.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from .config import IMAP_COPY, Config, Job, Refusal
from .errors import (
    EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_REFUSED, JobLocked, MigrateError, StateError,
)
from .limits import ConnectionLimits, SharedConnectionLimits
from .results import JobResult, plural
from .runner import Counters, RunOptions
from .store import (
    DATABASE_ERRORS, JobLockHold, Store, database_error_text, is_postgresql,
)

log = logging.getLogger("migrate")

def run_jobs(config: Config, names: Sequence[str] | None, options: RunOptions,
             store: Store | None = None,
             on_result: Callable[[JobResult], None] | None = None) -> list[JobResult]:
    """Run the jobs, up to ``options.workers`` at once; ``on_result`` gets each result
    as soon as its job is done, in the calling thread (the CLI prints it then, so cron
    mail shows what finished before a kill).  Results come back in config order.
    Whatever goes wrong in one job is that job's error: the others still run.  Every
    job of the run shares one connection limit per server (``max_connections``)."""
    if options.dry_run:  # read-only: the report's planner, never the jobs themselves
        from .report import dry_run_results  # only here: a run does not load the planner

        results = dry_run_results(config, names, options)
        for r in results:
            if on_result is not None:
                on_result(r)
        return results
    selected = config.select(names)
    jobs = [item for item in selected if isinstance(item, Job)]
    if store is None:
        url = config.state_url
        try:
            own_store = Store(url)
        except DATABASE_ERRORS as exc:
            raise StateError(database_error_text(exc, url)) from None
    else:
        own_store = None
    the_store = own_store or store
    slots = None
    if options.connection_limits is None:
        limits = ConnectionLimits.for_jobs(jobs)
        if is_postgresql(the_store.url):
            # shared with every other run and worker on this database, on any host
            try:
                slots = the_store.slot_locks()
            except DATABASE_ERRORS as exc:
                if own_store is not None:
                    own_store.close()
                raise StateError(database_error_text(exc, the_store.safe_url)) from None
            limits = SharedConnectionLimits(limits.sizes, slots)
        # a copy: the caller's options may serve another run with other jobs
        options = dataclasses.replace(options, connection_limits=limits)

    def one(item: Job | Refusal) -> JobResult:
        if isinstance(item, Refusal):  # a bad accounts row: refused without connecting
            result = JobResult(item.name, item.kind, False, exit_code=EXIT_REFUSED)
            result.errors.append(item.message)
            return result
        if options.stop.is_set():  # interrupted: no new job starts
            return JobResult(item.name, item.kind, False, interrupted=True, started=False)
        return run_job(item, the_store, options)

    results: list[JobResult | None] = [None] * len(selected)
    try:
        if options.workers <= 1 or len(selected) <= 1:
            for i, item in enumerate(selected):
                results[i] = one(item)
                if on_result is not None:
                    on_result(results[i])
        else:
            with ThreadPoolExecutor(options.workers, thread_name_prefix="mm-job") as pool:
                futures = {pool.submit(one, item): i for i, item in enumerate(selected)}
                try:
                    for future in as_completed(futures):
                        result = future.result()  # run_job returns errors as a result
                        results[futures[future]] = result
                        if on_result is not None:
                            on_result(result)
                except BaseException:  # e.g. KeyboardInterrupt: the running jobs stop
                    options.stop.set()  # after their batch, no other job starts
                    raise
        return [r for r in results if r is not None]
    finally:
        if slots is not None:
            slots.close()
        if own_store is not None:
            own_store.close()


def run_job(job: Job, store: Store, options: RunOptions) -> JobResult:
    """One job, whatever happens: its result, never an exception (but KeyboardInterrupt).
    A real run only: dry runs are planned by ``run_jobs`` (migrate.report)."""
    if options.dry_run:
        raise ValueError("run_job runs a job for real; plan a dry run with run_jobs")
    try:
        with store.job_lock(job.name) as hold:
            return _run_job(job, store, options, hold)
    except JobLocked as exc:
        result = JobResult(job.name, job.kind, False, exit_code=exc.exit_code)
        result.errors.append(str(exc))
        return result
    except Exception as exc:  # taking or releasing the lock failed
        result = JobResult(job.name, job.kind, False)
        _job_error(result, exc, store)
        return result


def _job_class(kind: str) -> type:
    """The job's runner, imported when a job of that kind runs: a run loads only the
    protocol libraries its jobs use (imapclient or poplib and the Maildir writer)."""
    if kind == IMAP_COPY:
        from .imap_copy import ImapCopy

        return ImapCopy
    from .pop3_archive import Pop3Archive

    return Pop3Archive


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


def _run_job(job: Job, store: Store, options: RunOptions, hold: JobLockHold) -> JobResult:
    result = JobResult(job.name, job.kind, False)
    counters = Counters()
    started = time.monotonic()
    worker_cls = _job_class(job.kind)
    run_id = None
    try:
        # The protocol binding is checked by the job right after its first connection
        # (the server's certificate tells which server it is); a refusal there touches
        # nothing.
        job_id = store.ensure_job(job.name, job.kind)
        # we hold the job's lock: a run still "running" died without finishing
        stale = store.abort_stale_runs(job_id)
        if stale:
            log.info("%s: %s left running by a killed process recorded as aborted",
                     job.name, plural(stale, "earlier run"))
        if options.retry_failed:
            store.release_quarantine(job_id)
        run_id = store.start_run(job_id, dry_run=False)
        hold.bind_run(run_id)  # a lost lock is taken again only while this run is ours
        worker_cls(job, store, job_id, options, counters, result, hold).run()
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


# Exit code precedence: a refusal or a failure is never hidden by another job having been
# locked ("already running") — cron must see that something needs attention.
_EXIT_RANK = {EXIT_OK: 0, EXIT_LOCKED: 1, EXIT_FAILED: 2, EXIT_REFUSED: 3}


def exit_code(results: Sequence[JobResult]) -> int:
    """The most serious outcome: 2 refused > 1 failed > 3 already running > 0 done."""
    codes = [r.exit_code for r in results]
    codes += [EXIT_FAILED for r in results if not r.ok and r.exit_code == EXIT_OK]
    return max(codes, key=lambda c: _EXIT_RANK.get(c, 2), default=EXIT_OK)
