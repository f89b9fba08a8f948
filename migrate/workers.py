"""Jobs on many hosts: a queue of mailbox jobs in the shared PostgreSQL state database,
worked off by ``mailmigrate worker`` processes on any number of hosts.

The queue is procrastinate's (a well-kept PostgreSQL task engine): one task per mailbox
job, with ``lock`` = the job name (one mailbox never runs twice at once) and
``queueing_lock`` = the job name (enqueueing it again while one waits adds nothing),
retries, periodic tasks for ``schedule = "..."``, worker heartbeats.  A task runs the
job with ``engine.run_jobs``, exactly as ``mailmigrate run --job NAME`` does, so the
state database and run records are the same; the job's own lock (``Store.job_lock``)
stays as a second guard.  procrastinate is imported here only, lazily: ``mailmigrate
run`` on SQLite never needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, Job, Refusal, redact_url
from .engine import run_jobs
from .errors import EXIT_LOCKED, EXIT_OK, ConfigError, StateError
from .limits import ConnectionLimits, SharedConnectionLimits
from .results import JobResult
from .runner import RunOptions
from .store import DATABASE_ERRORS, MAILBOX_TASK, Store, is_postgresql, libpq_url

log = logging.getLogger("migrate")

QUEUE = "mailmigrate"
SCHEDULE_TASK = "mailmigrate.defer_scheduled"
# the procrastinate schema version applied by `mailmigrate db upgrade` (meta table)
QUEUE_SCHEMA_KEY = "procrastinate_schema"
# a job that another run holds (e.g. a `mailmigrate run` on one host) is tried again
BUSY_RETRY_SECONDS = 30
BUSY_RETRIES = 100


class MailboxInterrupted(Exception):
    """The worker was stopped (SIGTERM) in the middle of the job: back into the queue."""


class MailboxBusy(Exception):
    """Another run holds the job's lock: tried again later."""


class MailboxLockLost(MailboxBusy):
    """The job stopped because it lost its lock (its database session ended; another
    run may have the job now): tried again later, like a busy one."""


class MailboxFailed(Exception):
    """The job ended with errors: retried ``[workers] retries`` times, then failed."""


def is_reported_outcome(record: logging.LogRecord) -> bool:
    """procrastinate's log record of a job that ended with one of the outcomes above:
    the job's summary and errors are printed already, without a traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    return isinstance(exc, (MailboxInterrupted, MailboxBusy, MailboxFailed))


# --- checks ------------------------------------------------------------------------


def require_postgresql(config: Config) -> str:
    """The libpq URL of the shared state database; a ConfigError (exit 2) saying what
    to add when [state] is not PostgreSQL."""
    if not is_postgresql(config.state_url):
        raise ConfigError(
            f"workers need the state database on a PostgreSQL server that every worker "
            f"host reaches; [state] url is {redact_url(config.state_url)}. Add to "
            f"{config.path}:\n    [state]\n    url = \"postgresql+psycopg://USER@DBHOST/"
            f"mailmigrate\"\nthen run `mailmigrate db upgrade -c {config.path}` once "
            "(single host without a server: `mailmigrate run --workers N` instead)")
    return libpq_url(config.state_url)


def _procrastinate():
    try:
        import procrastinate
    except ModuleNotFoundError:
        raise ConfigError("workers need the procrastinate package: pip install "
                          "'mailmigrate[workers]'") from None
    return procrastinate


def schedules(config: Config) -> dict[str, str]:
    """What the workers run by themselves: {config entry name: cron}.  An accounts
    entry is one schedule for all its rows (one periodic task, not one per mailbox)."""
    out: dict[str, str] = {}
    grouped = {name: entry for entry, rows in config.groups.items() for name in rows}
    for job in config.jobs:
        if job.schedule:
            out.setdefault(grouped.get(job.name, job.name), job.schedule)
    return out


# --- the procrastinate app ------------------------------------------------------------


@dataclass
class WorkerRuntime:
    """What the jobs of one worker process share: config, state database, one stop
    flag (SIGTERM) and the connection limits kept in the database."""

    config: Config
    store: Store
    options: RunOptions
    on_result: Callable[[JobResult], None] | None = None


@dataclass
class Queue:
    app: Any  # procrastinate.App on the state database
    mailbox: Any  # its task running one mailbox job


def build_queue(config: Config, runtime: WorkerRuntime | None = None) -> Queue:
    """The procrastinate App on the config's PostgreSQL state database, with the
    mailbox task (and, for a worker, the periodic tasks of the schedules)."""
    procrastinate = _procrastinate()
    dsn = require_postgresql(config)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=dsn, kwargs={"application_name": "mailmigrate worker"}))
    retries = config.workers.retries

    class MailboxRetry(procrastinate.BaseRetryStrategy):
        def get_retry_decision(self, *, exception, job):
            if isinstance(exception, MailboxInterrupted):
                return procrastinate.RetryDecision(retry_in={"seconds": 0})
            if isinstance(exception, MailboxBusy) and job.attempts < BUSY_RETRIES:
                return procrastinate.RetryDecision(retry_in={"seconds": BUSY_RETRY_SECONDS})
            if isinstance(exception, MailboxFailed) and job.attempts < retries:
                return procrastinate.RetryDecision(
                    retry_in={"seconds": min(600, 30 * 2 ** job.attempts)})
            return None

    def run_mailbox_job(job: str) -> str:
        """One mailbox job, as `mailmigrate run --job JOB` runs it."""
        if runtime is None:
            raise RuntimeError("this app only enqueues")
        try:
            (result,) = run_jobs(runtime.config, [job], runtime.options, store=runtime.store)
        except ConfigError as exc:  # the job left the config since it was enqueued
            raise MailboxFailed(str(exc)) from None
        if runtime.on_result is not None:
            runtime.on_result(result)
        if result.interrupted or not result.started:
            raise MailboxInterrupted(result.summary_line())
        if result.lock_lost:  # not the mailbox's fault: no failure retry used up
            raise MailboxLockLost("; ".join(result.error_lines()))
        if result.exit_code == EXIT_LOCKED:
            raise MailboxBusy("; ".join(result.error_lines()))
        if not result.ok or result.exit_code != EXIT_OK:
            raise MailboxFailed("; ".join(result.error_lines()) or result.summary_line())
        return result.summary_line()

    mailbox = app.task(name=MAILBOX_TASK, queue=QUEUE, retry=MailboxRetry())(run_mailbox_job)

    async def defer_scheduled(entry: str, timestamp: int) -> int:
        """A schedule is due: enqueue its jobs (those already waiting stay as they are)."""
        return await _defer(mailbox, _job_names(config, [entry]), procrastinate)

    scheduler = app.task(name=SCHEDULE_TASK, queue=QUEUE)(defer_scheduled)
    if runtime is not None:
        for entry, cron in schedules(config).items():
            # at most one tick of a schedule waits for a free worker: busy workers do
            # not pile up ticks
            app.periodic(cron=cron, periodic_id=entry, queueing_lock=f"schedule:{entry}",
                         task_kwargs={"entry": entry})(scheduler)
    return Queue(app, mailbox)


def _job_names(config: Config, names: Sequence[str] | None) -> list[str]:
    return [item.name for item in config.select(names) if isinstance(item, Job)]


async def _defer(mailbox, names: Sequence[str], procrastinate) -> int:
    added = 0
    for name in names:
        try:
            await mailbox.configure(lock=name, queueing_lock=name,
                                    task_kwargs={"job": name}).defer_async()
            added += 1
        except procrastinate.exceptions.AlreadyEnqueued:
            pass
    return added


# --- enqueue --------------------------------------------------------------------------


@dataclass
class Enqueued:
    added: list[str] = field(default_factory=list)
    already_waiting: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


def enqueue(config: Config, names: Sequence[str] | None) -> Enqueued:
    """One task per job (an accounts entry: one per mailbox); a job already waiting in
    the queue is not added again."""
    procrastinate = _procrastinate()
    require_postgresql(config)
    # connecting through our store first: an unreachable server is a clear error
    store = Store.open_existing(config.state_url)
    if store is None:
        raise StateError(_UPGRADE_FIRST.format(url=redact_url(config.state_url),
                                               path=config.path))
    store.close()
    selected = config.select(names)
    outcome = Enqueued(refused=[item for item in selected if isinstance(item, Refusal)])
    queue = build_queue(config)

    async def main() -> None:
        async with queue.app.open_async():
            await _require_queue_schema(queue.app, config)
            for item in selected:
                if not isinstance(item, Job):
                    continue
                if await _defer(queue.mailbox, [item.name], procrastinate):
                    outcome.added.append(item.name)
                else:
                    outcome.already_waiting.append(item.name)

    asyncio.run(main())
    return outcome


_UPGRADE_FIRST = ("the task queue is not set up in {url}; run `mailmigrate db upgrade -c "
                  "{path}` first")


async def _require_queue_schema(app, config: Config) -> None:
    if not await app.check_connection_async():
        raise StateError(_UPGRADE_FIRST.format(url=redact_url(config.state_url),
                                               path=config.path))


# --- the worker -----------------------------------------------------------------------


def worker_name() -> str:
    """Who runs a job, as status shows it (the run records have host and pid too)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_worker(config: Config, concurrency: int, options: RunOptions,
               on_result: Callable[[JobResult], None] | None = None,
               wait: bool = True) -> int | None:
    """Take tasks and run them until SIGTERM/SIGINT (then: every job finishes its batch
    in flight and goes back into the queue, and the worker stops).  Returns the signal
    number that stopped it, or None (``wait=False``: when the queue was empty)."""
    _procrastinate()
    require_postgresql(config)
    store = Store(config.state_url)
    slots = store.slot_locks()
    sizes = ConnectionLimits.for_jobs(config.jobs).sizes
    lost: list[Exception] = []
    stop_work: list[Callable[[], None]] = []

    def on_slots_lost(exc: Exception) -> None:
        """The connection slots may be others' now: every job stops after its batch in
        flight and goes back into the queue, and the worker ends (to be started again)."""
        if not lost:
            lost.append(exc)
            options.stop.set()
            for stop in stop_work:
                stop()

    limits = SharedConnectionLimits(sizes, slots, on_lost=on_slots_lost)
    options = dataclasses.replace(options, workers=1, connection_limits=limits)
    runtime = WorkerRuntime(config, store, options, on_result)
    app = build_queue(config, runtime).app
    _reregister_when_pruned(app)
    settings = config.workers
    received: list[int] = []
    watching = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # sync tasks run in the default executor: one thread per concurrent job
        loop.set_default_executor(ThreadPoolExecutor(concurrency + 2,
                                                     thread_name_prefix="mm-worker"))
        async with app.open_async():
            await _require_queue_schema(app, config)
            work = asyncio.create_task(app.run_worker_async(
                queues=[QUEUE], name=worker_name(), concurrency=concurrency, wait=wait,
                install_signal_handlers=False,
                update_heartbeat_interval=settings.heartbeat_seconds,
                stalled_worker_timeout=settings.stalled_after_seconds,
                fetch_job_polling_interval=min(5.0, settings.heartbeat_seconds),
                abort_job_polling_interval=max(5.0, settings.heartbeat_seconds)))
            recovery = asyncio.create_task(_recover_stalled(app, config, store))
            stop_work.append(lambda: loop.call_soon_threadsafe(work.cancel))
            limits.watch(min(1.0, settings.heartbeat_seconds), watching)

            def on_signal(signum: int) -> None:
                if received:  # the second one: at once (the next run resumes)
                    os._exit(128 + received[0])
                received.append(signum)
                name = signal.Signals(signum).name
                os.write(2, f"mailmigrate: {name}: the jobs running finish their batch in "
                            f"flight and go back into the queue; {name} again stops at "
                            "once\n".encode())
                options.stop.set()
                work.cancel()  # procrastinate's graceful stop: waits for running jobs

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal, sig)
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
                recovery.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await recovery

    try:
        asyncio.run(main())
    finally:
        watching.set()
        slots.close()
        store.close()
    if lost and not received:
        raise StateError(f"this worker lost its hold on the connection slots in the state "
                         f"database ({lost[0]}); its jobs stopped after their batch in "
                         "flight and went back into the queue. Start the worker again "
                         "(a service manager restarts it on this exit code)")
    return received[0] if received else None


# a worker's registration, put back under its own id if another worker removed it
_REGISTER_AGAIN = (
    "INSERT INTO procrastinate_workers (id, last_heartbeat) OVERRIDING SYSTEM VALUE "
    "VALUES (%(worker_id)s, now()) ON CONFLICT (id) DO {action} RETURNING xmax = 0 AS new")


def _reregister_when_pruned(app) -> None:
    """A worker silent for longer than ``stalled_after_seconds`` (frozen, a paused VM)
    loses its registration to another worker's sweep; when it wakes, procrastinate only
    updates a row that is gone, and its next fetch would break the jobs' foreign key on
    the worker id and end the worker.  So heartbeats and fetches put the row back first
    (under the same id), saying so once."""
    manager = app.job_manager
    fetch, connector = manager.fetch_job, app.connector

    async def register_again(worker_id: int, action: str) -> None:
        row = await connector.execute_query_one_async(
            _REGISTER_AGAIN.format(action=action), worker_id=worker_id)
        if row and row["new"]:
            log.warning("this worker was silent for longer than stalled_after_seconds and "
                        "was taken for dead; it is registered again and goes on")

    async def update_heartbeat(worker_id: int) -> None:
        await register_again(worker_id, "UPDATE SET last_heartbeat = now()")

    async def fetch_job(queues, worker_id):
        await register_again(
            worker_id, "UPDATE SET last_heartbeat = procrastinate_workers.last_heartbeat")
        return await fetch(queues=queues, worker_id=worker_id)

    manager.update_heartbeat = update_heartbeat
    manager.fetch_job = fetch_job


async def _recover_stalled(app, config: Config, store: Store) -> None:
    """Jobs of a worker that stopped sending heartbeats (killed, host down) go back into
    the queue for another worker.  Every worker sweeps; a hand-back is one transaction
    that first checks, with the job row locked, that the job is still running on a
    silent worker: a job handed back and at once taken by a live worker is never handed
    back again by a second sweeper.  (No lock for "one sweeper at a time": a sweeper
    frozen while holding it would stop every recovery.)

    A late heartbeat alone is no proof of death: a frozen or overloaded worker (SIGSTOP,
    swapping, a VM paused) is silent too, and goes on when it wakes.  While the job's own
    lock (``Store.job_lock``: a session lock, gone with the process) is still held, the
    job is left to its worker, and so is the worker's registration: handing it on would
    only make the other worker find it locked, and the woken worker's bookkeeping clash
    with the other's."""
    import psycopg

    settings = config.workers
    conn = await psycopg.AsyncConnection.connect(libpq_url(config.state_url), autocommit=True)
    told: set[int] = set()  # jobs left to a silent worker, said once
    try:
        while True:
            await asyncio.sleep(settings.heartbeat_seconds)
            try:
                await _sweep(app, conn, store, settings.stalled_after_seconds, told)
            except (psycopg.Error, *DATABASE_ERRORS) as exc:  # the next sweep tries again
                log.warning("stalled-job check failed: %s", exc)
    finally:
        await conn.close()


async def _sweep(app, conn, store: Store, stalled_after: float, told: set[int]) -> None:
    from procrastinate.sql import queries as sql_queries

    kept_workers: set[int] = set()
    for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stalled_after):
        name = job.task_kwargs.get("job", job.task_name)
        if await asyncio.to_thread(store.job_is_running, name):
            # the worker's session is alive: late, not dead (or another run holds it)
            worker = await (await conn.execute(
                "SELECT worker_id FROM procrastinate_jobs WHERE id = %s", (job.id,))
            ).fetchone()
            if worker and worker[0] is not None:
                kept_workers.add(worker[0])
            if job.id not in told:
                told.add(job.id)
                log.warning("job %s (%s) runs on a worker not heard from for over %g s, "
                            "but the job's lock is still held: left to it (frozen or "
                            "overloaded, not dead)", name, job.id, stalled_after)
            continue
        async with conn.transaction():
            still = await (await conn.execute(
                "SELECT 1 FROM procrastinate_jobs WHERE id = %(id)s AND status = 'doing' "
                "AND (worker_id IS NULL OR worker_id NOT IN (SELECT id FROM "
                "procrastinate_workers WHERE last_heartbeat >= now() - "
                "make_interval(secs => %(secs)s))) FOR UPDATE",
                {"id": job.id, "secs": stalled_after})).fetchone()
            if still is None:  # finished meanwhile, or handed back and taken again
                continue
            await conn.execute(sql_queries["retry_job"], {
                "job_id": job.id, "retry_at": dt.datetime.now(dt.timezone.utc),
                "new_priority": None,
                "new_queue_name": None, "new_lock": None})
        log.warning("job %s (%s) was running on a worker that stopped sending heartbeats; "
                    "it goes back into the queue", name, job.id)
    # procrastinate's prune_stalled_workers, but keeping the workers left their jobs
    await conn.execute(
        "DELETE FROM procrastinate_workers WHERE last_heartbeat < now() - "
        "make_interval(secs => %s) AND NOT (id = ANY(%s))",
        (stalled_after, list(kept_workers)))


# --- schema ---------------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def upgrade(config: Config) -> list[str]:
    """Create or upgrade our schema and the task queue's, one host at a time (the
    others wait, then find it done); running it again changes nothing."""
    procrastinate = _procrastinate()
    import psycopg
    from procrastinate.schema import SchemaManager

    dsn = require_postgresql(config)
    done = []
    store = Store(config.state_url)  # ours: created or upgraded on open (locked)
    try:
        done.append(f"state schema version {store.schema_version()}")
        installed = procrastinate.__version__
        with store.upgrade_lock(), psycopg.connect(dsn, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()[0]
            recorded = store.get_meta(QUEUE_SCHEMA_KEY)
            manager = SchemaManager
            if exists is None:
                with conn.transaction():
                    conn.execute(manager.get_schema())
                done.append(f"task queue schema created (procrastinate {installed})")
            elif recorded is None:
                # set up by hand (`procrastinate schema --apply`): taken as current
                done.append(f"task queue schema found (taken as procrastinate {installed})")
            elif _version(recorded) > _version(installed):
                raise StateError(
                    f"the task queue schema is of procrastinate {recorded}, newer than the "
                    f"installed {installed}; upgrade mailmigrate[workers] on this host")
            elif _version(recorded) < _version(installed):
                steps = sorted(
                    p for p in Path(manager.get_migrations_path()).glob("*.sql")
                    if _version(recorded) < _version(p.name[:8]) <= _version(installed))
                with conn.transaction():
                    for step in steps:
                        conn.execute(step.read_text(encoding="utf-8"))
                done.append(f"task queue schema upgraded from procrastinate {recorded} to "
                            f"{installed} ({len(steps)} migrations)")
            else:
                done.append(f"task queue schema up to date (procrastinate {installed})")
            store.set_meta(QUEUE_SCHEMA_KEY, installed)
    finally:
        store.close()
    return done
