"""Command line: arguments → library calls → exit code.  No IMAP, no SQL here."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from . import __version__
from . import config as config_mod
from .results import JobResult, plural, run_document, total_line
from .errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, MigrateError

log = logging.getLogger("migrate")

EPILOG = """exit codes: 0 everything done; 1 something failed (details above the summary);
2 configuration error or refused for safety; 3 a job was already running (only when no
job failed or was refused); 130/143 interrupted by SIGINT/SIGTERM"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailmigrate", epilog=EPILOG,
        description="Resumable, verified mailbox migration: IMAP-to-IMAP copy and POP3 "
                    "archival pull.")
    p.add_argument("--version", action="version", version=f"mailmigrate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run jobs (all, or those named with --job)",
                         epilog=EPILOG)
    run.add_argument("-c", "--config", required=True, help="the TOML config file")
    run.add_argument("--job", action="append", metavar="NAME",
                     help="run only this job (repeatable)")
    run.add_argument("--dry-run", action="store_true",
                     help="connect read-only and print what would be done; change nothing")
    run.add_argument("--max-delete", type=int, metavar="N",
                     help="refuse deletion (not the copy) when more than N messages would "
                          "be deleted from a source in one run")
    run.add_argument("--max-errors", type=int, metavar="N",
                     help="stop a job after N errors (default: no limit)")
    run.add_argument("--retry-failed", action="store_true",
                     help="try quarantined messages again (they are not retried by "
                          "themselves)")
    run.add_argument("--workers", type=int, default=1, metavar="N",
                     help="run up to N jobs at the same time (default 1); max_connections "
                          "still limits the connections to each server across all of them")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--batch-messages", type=int, default=200, help=argparse.SUPPRESS)
    run.add_argument("--batch-mb", type=float, default=4.0, help=argparse.SUPPRESS)
    run.add_argument("-v", "--verbose", action="count", default=0,
                     help="log what happens to stderr (-vv: also every batch, tracebacks)")
    run.add_argument("--json", action="store_true",
                     help="print one JSON document (schema mailmigrate.run/1) on stdout "
                          "at the end instead of the summary lines")
    run.add_argument("--log-file", metavar="FILE",
                     help="also append a timestamped log to FILE (what -v shows; -vv: "
                          "also every batch)")

    report = sub.add_parser(
        "report", help="what a run would do now, per job and folder (read-only): text, "
                       "JSON (schema mailmigrate.report/1) or a self-contained HTML page",
        epilog="exit codes: 0 the report was made (also when there is work to do); 1 a job "
               "could not be planned (its error is in the report); 2 configuration error")
    report.add_argument("-c", "--config", required=True, help="the TOML config file")
    report.add_argument("--job", action="append", metavar="NAME",
                        help="only this job (repeatable)")
    report.add_argument("--format", choices=("text", "json", "html"), default="text")
    report.add_argument("-o", "--output", metavar="FILE",
                        help="write the report to FILE instead of stdout")
    report.add_argument("--max-delete", type=int, metavar="N",
                        help="say whether a run with --max-delete N would refuse deletion")
    report.add_argument("--no-sample", action="store_true",
                        help="read no message bodies at all (no duration estimate)")

    check = sub.add_parser("check-config", help="validate the config file and exit")
    check.add_argument("-c", "--config", required=True)

    diagnose = sub.add_parser(
        "check", help="connect to every server of every job, read-only, and say step by "
                      "step what works and what to fix (exit 0: a run can go ahead)")
    diagnose.add_argument("-c", "--config", required=True, help="the TOML config file")
    diagnose.add_argument("--job", action="append", metavar="NAME",
                          help="only this job (repeatable)")
    diagnose.add_argument("--json", action="store_true",
                          help="one JSON document (schema mailmigrate.check/1)")

    unbind = sub.add_parser(
        "unbind", help="release a mailbox's protocol binding (after the job using the "
                       "other protocol is finished for good)")
    unbind.add_argument("mailbox", metavar="MAILBOX", help="the username, e.g. alice@old.example")
    unbind.add_argument("-c", "--config", required=True)
    unbind.add_argument("--host", help="the server, when the username is bound on several")

    verify = sub.add_parser(
        "verify", help="compare source and destination message by message, read-only "
                       "(the sign-off before cutover); exit 0 only when every source "
                       "message is at the destination, identical")
    verify.add_argument("-c", "--config", required=True)
    verify.add_argument("--job", action="append", metavar="NAME",
                        help="only this job (repeatable)")
    verify.add_argument("--quick", action="store_true",
                        help="compare Message-ID, size, flags and date only, without "
                             "reading bodies (misses an altered copy of the same size)")
    verify.add_argument("--json", action="store_true",
                        help="one JSON document (schema mailmigrate.verify/1)")
    verify.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what happens to stderr")
    _add_worker_commands(sub)

    for name, what, schema in (
            ("status", "what the state database says about each job (read-only)",
             "mailmigrate.status/1"),
            ("failed", "list every failed or quarantined message (read-only)",
             "mailmigrate.failed/1")):
        report = sub.add_parser(name, help=what)
        report.add_argument("-c", "--config", required=True)
        report.add_argument("--job", action="append", metavar="NAME",
                            help="only this job (repeatable)")
        report.add_argument("--json", action="store_true",
                            help=f"one JSON document (schema {schema})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _setup_logging(getattr(args, "verbose", 0), getattr(args, "log_file", None))
    except OSError as exc:
        print(f"mailmigrate: error: cannot open --log-file {args.log_file}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_REFUSED
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "report":
            return _plan_report(args, args.format, args.output, dry_run=False)
        if args.command == "check-config":
            cfg = config_mod.load(args.config)
            for refusal in cfg.refusals:
                print(f"mailmigrate: error: {refusal.name}: {refusal.message}",
                      file=sys.stderr)
            print(f"{args.config}: {'REFUSED ROWS' if cfg.refusals else 'OK'}, "
                  f"{len(cfg.jobs)} jobs: "
                  + ", ".join(f"{j.name} ({j.kind})" for j in cfg.jobs)
                  + (f"; {len(cfg.refusals)} refused (see above)" if cfg.refusals else ""))
            return EXIT_REFUSED if cfg.refusals else EXIT_OK
        if args.command == "unbind":
            return _unbind(args)
        if args.command == "check":
            return _check(args)
        if args.command in ("status", "failed"):
            return _report(args)
        if args.command == "verify":
            return _verify(args)
        if args.command in ("enqueue", "worker", "db"):
            return _workers_command(args)
    except MigrateError as exc:
        print(f"mailmigrate: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mailmigrate: interrupted; progress so far is saved, re-run to continue",
              file=sys.stderr)
        return 130
    return EXIT_FAILED


def _run(args) -> int:
    if args.max_delete is not None and args.max_delete < 0:
        print("mailmigrate: error: --max-delete must be 0 or more", file=sys.stderr)
        return EXIT_REFUSED
    if args.max_errors is not None and args.max_errors < 1:
        print("mailmigrate: error: --max-errors must be 1 or more", file=sys.stderr)
        return EXIT_REFUSED
    if args.workers < 1:
        print("mailmigrate: error: --workers must be 1 or more", file=sys.stderr)
        return EXIT_REFUSED
    if args.dry_run:  # the report, read-only, instead of a run
        return _plan_report(args, "json" if args.json else "text", None, dry_run=True)
    # each command imports what it needs, here and below: start-up time is part of every
    # cron run, and a run needs neither the report nor check, verify or the task queue
    from .engine import exit_code, run_jobs
    from .runner import RunOptions

    cfg = config_mod.load(args.config)
    cfg.select(args.job)  # unknown names fail before anything runs
    _fewer_malloc_arenas()
    options = RunOptions(dry_run=args.dry_run, max_delete=args.max_delete, workers=args.workers,
                         max_errors=args.max_errors, retry_failed=args.retry_failed,
                         progress=False if args.no_progress else None,
                         batch_messages=max(1, args.batch_messages),
                         batch_bytes=max(1, int(args.batch_mb * 1024 * 1024)))
    stopper = StopOnSignal(options.stop)
    stopper.install()
    started = time.monotonic()
    log.info("run started: config %s, jobs %s%s", args.config,
             ", ".join(args.job or [j.name for j in cfg.jobs]),
             " (dry run)" if args.dry_run else "", extra={"file_only": True})
    try:
        results = run_jobs(cfg, args.job, options,
                           on_result=lambda r: _show(r, summary=not args.json))
    finally:
        stopper.uninstall()
    elapsed = time.monotonic() - started
    code = 128 + stopper.signum if stopper.signum is not None else exit_code(results)
    if args.json:
        document = run_document(results, elapsed, code, _now())
        print(json.dumps(document, ensure_ascii=False, indent=2), flush=True)
    elif len(results) > 1:
        print(total_line(results, elapsed), flush=True)
    if len(results) > 1:
        log.info("%s", total_line(results, elapsed), extra={"file_only": True})
    log.info("run ended: exit code %d", code, extra={"file_only": True})
    return code


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _show(r: JobResult, summary: bool = True) -> None:
    """One finished job: its plan, warnings and errors, then its summary line - printed
    as soon as the job is done, so cron mail has it even if a later job hangs.  With
    --json only the warnings and errors (stderr): stdout carries the document alone."""
    if summary:
        for line in r.plan:
            print(f"{r.job}: {line}")
        sys.stdout.flush()
    for w in r.warnings:
        print(f"mailmigrate: warning: {r.job}: {w}", file=sys.stderr)
    for e in r.error_lines():
        print(f"mailmigrate: error: {r.job}: {e}", file=sys.stderr)
    sys.stderr.flush()
    if summary:
        print(r.summary_line(), flush=True)
    log.info("%s", r.summary_line(), extra={"file_only": True})


class StopOnSignal:
    """SIGINT/SIGTERM once: every job finishes its batch in flight and starts nothing
    new, summaries are printed, runs are recorded as aborted.  A second one: exit at
    once (the state database is crash-safe; the next run records this one as aborted)."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        # os.write, not print: the handler may interrupt a print of the main thread
        if self.signum is None:
            self.signum = signum
            self.stop.set()
            os.write(2, f"mailmigrate: {name}: stopping after the batch in flight; "
                        f"{name} again stops at once\n".encode())
        else:
            os.write(2, f"mailmigrate: {name} again: stopping now; the next run "
                        "continues where this one stopped\n".encode())
            os._exit(128 + (self.signum or signum))


def _check(args) -> int:
    """check: read-only diagnosis of every endpoint; 0 when a run can go ahead."""
    from . import check

    cfg = config_mod.load(args.config)
    items = cfg.select(args.job)
    for refusal in items:
        if isinstance(refusal, config_mod.Refusal):
            print(f"mailmigrate: error: {refusal.name}: {refusal.message}", file=sys.stderr)
    reports = check.check_jobs(cfg, [i for i in items if isinstance(i, config_mod.Job)])
    if args.json:
        print(json.dumps(check.check_document(reports, _now()),
                         ensure_ascii=not check.unicode_terminal(sys.stdout),
                         indent=2))
    else:
        print("\n".join(check.check_text(reports, check.unicode_terminal(sys.stdout))))
    if len(reports) < len(items):
        return EXIT_REFUSED
    return EXIT_OK if check.passed(reports) else EXIT_FAILED


def _add_worker_commands(sub) -> None:
    """enqueue / worker / db upgrade: jobs on several hosts (migrate/workers.py)."""
    enqueue = sub.add_parser(
        "enqueue", help="put jobs into the queue of the PostgreSQL state database, for "
                        "`mailmigrate worker` on any host (one task per mailbox)")
    enqueue.add_argument("-c", "--config", required=True)
    enqueue.add_argument("--job", action="append", metavar="NAME",
                         help="only this job or accounts entry (repeatable)")
    worker = sub.add_parser(
        "worker", help="run queued and scheduled jobs until SIGTERM (start one on every "
                       "host)", epilog=EPILOG)
    worker.add_argument("-c", "--config", required=True)
    worker.add_argument("--concurrency", type=int, default=1, metavar="N",
                        help="run up to N mailbox jobs at the same time (default 1)")
    worker.add_argument("--until-empty", action="store_true",
                        help="stop when the queue is empty instead of waiting for more; "
                             "the exit code then tells how the jobs it ran ended")
    worker.add_argument("--batch-messages", type=int, default=200, help=argparse.SUPPRESS)
    worker.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what happens to stderr (-vv: also every batch)")
    worker.add_argument("--log-file", metavar="FILE", help="also append a timestamped log")
    db = sub.add_parser("db", help="state database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_sub.add_parser(
        "upgrade", help="create or upgrade the state schema and the task queue's (safe to "
                        "run on several hosts at once)")
    upgrade.add_argument("-c", "--config", required=True)


def _workers_command(args) -> int:
    from . import workers
    from .engine import exit_code
    from .runner import RunOptions

    cfg = config_mod.load(args.config)
    if args.command == "db":
        for line in workers.upgrade(cfg):
            print(line)
        return EXIT_OK
    if args.command == "enqueue":
        cfg.select(args.job)  # unknown names fail before anything is queued
        done = workers.enqueue(cfg, args.job)
        for refusal in done.refused:
            print(f"mailmigrate: error: {refusal.name}: {refusal.message}", file=sys.stderr)
        print(f"enqueued {plural(len(done.added), 'job')}; {len(done.already_waiting)} "
              "already waiting in the queue" + (f"; {len(done.refused)} refused (see above)"
                                                if done.refused else ""))
        return EXIT_REFUSED if done.refused else EXIT_OK
    _fewer_malloc_arenas()
    if args.concurrency < 1:
        print("mailmigrate: error: --concurrency must be 1 or more", file=sys.stderr)
        return EXIT_REFUSED
    options = RunOptions(progress=False, batch_messages=max(1, args.batch_messages))
    # the task engine's messages go where ours go (-v, --log-file); a job's outcome is
    # printed by _show, not again as the engine's traceback
    ours, engine_log = logging.getLogger("migrate"), logging.getLogger("procrastinate")
    for handler in ours.handlers:
        handler.addFilter(lambda record: not workers.is_reported_outcome(record))
    engine_log.handlers[:] = ours.handlers
    engine_log.setLevel(ours.level)
    engine_log.propagate = False
    log.info("worker %s started: config %s, concurrency %d", workers.worker_name(),
             args.config, args.concurrency, extra={"file_only": True})
    results: list[JobResult] = []

    def on_result(result: JobResult) -> None:
        _show(result)
        results.append(result)  # list.append: safe from the jobs' threads

    signum = workers.run_worker(cfg, args.concurrency, options, on_result=on_result,
                                wait=not args.until_empty)
    return 128 + signum if signum is not None else exit_code(results)


def _unbind(args) -> int:
    from .store import Store

    cfg = config_mod.load(args.config)
    store = Store(cfg.state_url)
    try:
        bindings = store.bindings(args.mailbox)
        if args.host:
            host = args.host.lower()
            bindings = [b for b in bindings if host in (b.host, b.host.rsplit(":", 1)[0])]
        if not bindings:
            print(f"mailmigrate: no protocol binding for {args.mailbox}"
                  + (f" on {args.host}" if args.host else ""), file=sys.stderr)
            return EXIT_FAILED
        if len(bindings) > 1:
            hosts = ", ".join(b.host for b in bindings)
            print(f"mailmigrate: error: {args.mailbox} is bound on several hosts ({hosts}); "
                  "choose one with --host", file=sys.stderr)
            return EXIT_REFUSED
        b = bindings[0]
        store.unbind(b.username, b.host)
        print(f"released {b.username} at {b.host} (was bound to {b.protocol.upper()} by job "
              f"{b.bound_by_job!r} since {b.bound_at:%Y-%m-%d %H:%M} UTC)")
        return EXIT_OK
    finally:
        store.close()


def _report(args) -> int:
    """status / failed: read the state database, never create or change it."""
    from . import status
    from .store import Store, sqlite_file

    cfg = config_mod.load(args.config)
    # an accounts entry's name stands for its rows' jobs; unknown names: a config error
    names = [item.name for item in cfg.select(args.job)
             if isinstance(item, config_mod.Job)]
    database = sqlite_file(cfg.state_url) or config_mod.redact_url(cfg.state_url)
    store = Store.open_existing(cfg.state_url)
    try:
        if args.command == "status":
            document = status.status_document(cfg, store, names, database)
            if args.json:
                print(json.dumps(document, ensure_ascii=False, indent=2))
            else:
                print("\n".join(status.status_text(document)))
            return EXIT_OK
        rows = status.failed_rows(store, names)
        if args.json:
            print(json.dumps({"schema": status.FAILED_SCHEMA, "generated_at": _now(),
                              "messages": list(rows)}, ensure_ascii=False, indent=2))
        elif store is None:
            print(f"no runs yet (state database {database} does not exist)")
        else:
            print("\n".join(status.failed_text(rows)))
        return EXIT_OK
    finally:
        if store is not None:
            store.close()


def _verify(args) -> int:
    """verify: both sides compared, read-only; the state database is not opened."""
    from . import verify

    cfg = config_mod.load(args.config)

    def show(v: verify.JobVerdict) -> None:
        if not args.json:
            print("\n".join(verify.verify_text(v)), flush=True)

    try:
        verdicts = verify.verify_jobs(cfg, args.job, quick=args.quick, on_job=show)
    except KeyboardInterrupt:
        print("mailmigrate: interrupted; verify changes nothing, run it again",
              file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(verify.verify_document(verdicts, args.quick, _now()),
                         ensure_ascii=False, indent=2, default=str))
    elif verify.summary_line(verdicts):
        print(verify.summary_line(verdicts))
    return verify.exit_code(verdicts)


def _plan_report(args, fmt: str, output: str | None, dry_run: bool) -> int:
    """`report` and `run --dry-run`: what a run would do now; reads, never writes."""
    from . import report

    if args.max_delete is not None and args.max_delete < 0:
        print("mailmigrate: error: --max-delete must be 0 or more", file=sys.stderr)
        return EXIT_REFUSED
    cfg = config_mod.load(args.config)
    options = report.PlanOptions(max_delete=args.max_delete,
                                 sample=not getattr(args, "no_sample", False))
    document = report.build_report(cfg, args.job, options)
    rendered = report.render(document, fmt)
    if output:
        try:
            with open(output, "w", encoding="utf-8") as f:
                f.write(rendered)
        except OSError as exc:
            print(f"mailmigrate: error: cannot write {output}: {exc.strerror}",
                  file=sys.stderr)
            return EXIT_REFUSED
    else:
        sys.stdout.write(rendered)
        sys.stdout.flush()
    if output or fmt != "text":  # the text on the terminal already says it
        for job in document["jobs"]:
            if job["error"]:
                print(f"mailmigrate: error: {job['name']}: {job['error']}", file=sys.stderr)
    bad_rows = any(j["refused"] and j["source"] is None for j in document["jobs"])
    if bad_rows or (dry_run and any(j["refused"] for j in document["jobs"])):
        # a refused accounts row is a config error; a run would be refused (binding)
        return EXIT_REFUSED
    if any(not j["planned"] for j in document["jobs"]):
        return EXIT_FAILED
    return EXIT_OK


def _fewer_malloc_arenas() -> None:
    """Before the copying threads start: glibc gives every thread its own malloc arena
    (up to 8 per core), each keeping freed memory of its own; with a dozen threads moving
    message bodies that is ~6 MB of peak RSS for nothing (50,000 messages: 85 → 79 MB).
    Two arenas cost no measurable speed here.  Like MALLOC_ARENA_MAX=2, which wins when set."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        pass


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# the pid tells apart overlapping runs appending to one file
FILE_LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(message)s"


def _setup_logging(verbose: int, log_file: str | None = None) -> None:
    """Warnings and errors always reach stderr; -v adds what happens, -vv every batch
    and the traceback of an unexpected error.  --log-file appends what -v shows (-vv:
    what -vv shows) to a file, with timestamps, whatever stderr gets."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    if verbose:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    else:
        handler.setFormatter(_PlainFormatter())
        # a job's own warnings and errors are printed once, right before its summary
        handler.addFilter(lambda record: not getattr(record, "reported", False))
    # summary lines and run start/end: stdout has them already
    handler.addFilter(lambda record: not getattr(record, "file_only", False))
    handlers: list[logging.Handler] = [handler]
    if log_file:
        # append, never truncate: safe to keep for weeks; rotate with copytruncate
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setLevel(min(level, logging.INFO))
        file_handler.setFormatter(logging.Formatter(FILE_LOG_FORMAT))
        handlers.append(file_handler)
        level = min(level, logging.INFO)
    root = logging.getLogger("migrate")
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    root.propagate = False


class _PlainFormatter(logging.Formatter):
    """``mailmigrate: warning: ...`` like the CLI's own messages (cron mail)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"mailmigrate: {record.levelname.lower()}: {record.getMessage()}"
