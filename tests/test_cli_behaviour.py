"""What an admin (or cron) sees: exit codes, summaries, grouped errors, stops on quota and
--max-errors, no tracebacks, dry runs that create nothing, streamed output."""

from __future__ import annotations

import re

import pytest

from migrate import cli
from migrate.engine import exit_code
from migrate.results import JobResult, group_errors
from migrate.errors import EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_REFUSED
from migrate.imap_copy import ImapCopy
from migrate.store import Store
from tests.rig import mailgen
from tests.rig.interrupt import count_in, fill_many
from tests.rig.jobs import imap_job, run_cli, write_config


def result(code=EXIT_OK, errors=()):
    return JobResult("j", "imap-copy", False, errors=list(errors), exit_code=code)


def test_exit_code_precedence_never_hides_a_failure():
    locked, failed = result(EXIT_LOCKED, ["busy"]), result(errors=["x"])
    refused, done = result(EXIT_REFUSED, ["no"]), result()
    assert exit_code([locked, failed]) == EXIT_FAILED
    assert exit_code([failed, locked]) == EXIT_FAILED
    assert exit_code([locked, refused, failed]) == EXIT_REFUSED
    assert exit_code([done, locked]) == EXIT_LOCKED
    assert exit_code([done, done]) == EXIT_OK
    a_folder_failed = JobResult("j", "imap-copy", False, counts={"failed_folders": 1})
    assert exit_code([a_folder_failed, locked]) == EXIT_FAILED


def test_repeated_errors_are_grouped_with_count_and_examples():
    texts = [f"folder 'INBOX': message UID {u} ({u * 10} bytes, <m{u}@x>): destination "
             "refused the message: [OVERQUOTA] Quota exceeded" for u in range(1, 1315)]
    texts.append("folder 'Sent': cannot select")
    lines = group_errors(texts)
    assert len(lines) == 2
    assert lines[0].startswith("folder 'INBOX': message UID 1 (10 bytes, <m1@x>)")
    assert "[1314 errors like this; more examples: folder 'INBOX': message UID 2 " in lines[0]
    assert lines[0].count("message UID") == 3
    assert lines[1] == "folder 'Sent': cannot select"


def test_server_timing_notes_do_not_split_a_group():
    """Dovecot appends "(0.001 + 0.000 secs)" to its answers, with a third figure when it
    waited for a lock: the same refusal all the same."""
    lines = group_errors([
        "UID 1: [LIMIT] Mail size is larger (0.001 + 0.000 secs).",
        "UID 2: [LIMIT] Mail size is larger (0.001 + 0.000 + 0.004 secs).",
        "UID 3: [LIMIT] Mail size is larger (1 secs)."])
    assert len(lines) == 1 and "[3 errors like this" in lines[0]


def test_failed_job_is_not_hidden_by_a_locked_one(old_account, new_account, tmp_path):
    mailgen.fill(old_account, mailgen.realistic_mailbox(count=4, big=False, seed=30))
    bad = imap_job("bob", old_account, new_account)
    bad["source"]["password"] = "wrong-password"
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account),
                                              bad])
    store = Store(f"sqlite:///{tmp_path / 'mailmigrate.db'}")
    try:
        with store.job_lock("alice"):
            proc = run_cli("run", "-c", str(path), "--no-progress")
    finally:
        store.close()
    assert proc.returncode == EXIT_FAILED, (proc.stdout, proc.stderr)
    lines = proc.stdout.splitlines()
    assert "alice: already running elsewhere; nothing was done" in lines
    assert any(line.startswith("bob: FAILED — ") for line in lines), lines
    assert lines[-1].startswith("total: 2 jobs (2 FAILED, refused or locked): ")
    assert "mailmigrate: error: bob: " in proc.stderr and "login" in proc.stderr


def test_over_quota_destination_stops_the_job_and_reports_once(old_account, new_host,
                                                                tmp_path):
    full = new_host.add_user("over-quota@new.test", "pw-quota",
                             quota_rule="*:storage=100K")
    fill_many(old_account, 400, seed=31)  # ~1 KB each: 400 KB for 100 KB of quota
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, full)])
    proc = run_cli("run", "-c", str(path), "--no-progress", "--batch-messages", "10")
    assert proc.returncode == EXIT_FAILED, proc.stderr
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith("mailmigrate: error:")]
    assert 1 <= len(errors) <= 3, errors  # not one line per refused message
    assert any("the destination is over quota; this job stopped copying" in e
               for e in errors), errors
    summary = proc.stdout.splitlines()[-1]
    assert summary.startswith("alice: FAILED — "), summary
    failed = int(re.search(r"(\d+) failed", summary).group(1))
    copied = count_in(full)
    assert failed <= 20  # the batch in flight (MULTIAPPEND), not the remaining hundreds
    assert copied + failed < 400


def test_max_errors_stops_a_job_and_errors_are_grouped(old_account, new_host, tmp_path):
    tiny = new_host.add_user("tiny-mails@new.test", "pw-tiny", quota_max_mail_size="500")
    fill_many(old_account, 30, seed=32)  # every one over 500 bytes: all refused
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, tiny)])
    proc = run_cli("run", "-c", str(path), "--no-progress", "--batch-messages", "2")
    assert proc.returncode == EXIT_FAILED
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith("mailmigrate: error:")]
    assert len(errors) == 1, errors
    assert "[30 errors like this; more examples: " in errors[0]
    assert "30 failed" in proc.stdout
    proc = run_cli("run", "-c", str(path), "--no-progress", "--batch-messages", "2",
                   "--max-errors", "4")
    assert proc.returncode == EXIT_FAILED
    assert "stopped after 4 errors (--max-errors 4)" in proc.stderr
    failed = int(re.search(r"(\d+) failed", proc.stdout).group(1))
    assert 4 <= failed <= 5  # at most the rest of the batch in flight


def test_unexpected_exception_fails_one_job_the_others_run(old_account, new_account,
                                                           tmp_path, monkeypatch, capsys):
    msgs = mailgen.realistic_mailbox(count=6, big=False, seed=33)
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [
        imap_job("good", old_account, new_account),
        imap_job("broken", old_account, new_account, folders={"include": ["INBOX"]})])
    real_run = ImapCopy.run
    seen_before = {}

    def run(self):
        if self.job.name == "broken":
            # output streams: the first job's summary is out before this one starts
            seen_before["out"] = capsys.readouterr().out
            raise RuntimeError("something nobody expected")
        return real_run(self)

    monkeypatch.setattr(ImapCopy, "run", run)
    assert cli.main(["run", "-c", str(path), "--no-progress"]) == EXIT_FAILED
    out, err = capsys.readouterr()
    assert seen_before["out"].startswith("good: 6 folders, 6 copied")
    assert "broken: FAILED — " in out and out.splitlines()[-1].startswith("total: 2 jobs")
    assert "mailmigrate: error: broken: unexpected error, the job stopped: RuntimeError: " \
           "something nobody expected (run with -vv for the traceback" in err
    assert "Traceback" not in err
    assert cli.main(["run", "-c", str(path), "--no-progress", "-vv"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "something nobody expected" in err


def test_broken_state_database_is_a_clear_error(old_account, new_account, tmp_path):
    (tmp_path / "state.db").write_bytes(b"this is not a database, just bytes " * 100)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)],
                        state_url="sqlite:///state.db")
    proc = run_cli("run", "-c", str(path), "--no-progress")
    assert proc.returncode == EXIT_REFUSED
    assert proc.stderr.startswith(("mailmigrate: error: state database error",
                                   "mailmigrate: error: cannot open state database")), \
        proc.stderr
    assert "file is not a database" in proc.stderr and "Traceback" not in proc.stderr


def test_state_database_down_mid_run_is_a_job_error(pg_url, old_account, new_account,
                                                     tmp_path, monkeypatch, capsys):
    """PostgreSQL goes away in the middle of a job: a clear error for each job, each
    summary printed, no traceback."""
    import psycopg

    from migrate import faults

    mailgen.fill(old_account, mailgen.realistic_mailbox(count=12, big=False, seed=34))
    path = write_config(tmp_path / "c.toml", [
        imap_job("alice", old_account, new_account),
        imap_job("bob", old_account, new_account, folders={"include": ["INBOX"]})],
        state_url=pg_url)
    admin_url = pg_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0]
    name = pg_url.rsplit("/", 1)[1]

    def database_goes_away(point):
        if point == "after-append":
            with psycopg.connect(f"{admin_url}/postgres", autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))

    monkeypatch.setattr(faults, "checkpoint", database_goes_away)
    try:
        assert cli.main(["run", "-c", str(path), "--no-progress"]) == EXIT_FAILED
    finally:
        with psycopg.connect(f"{admin_url}/postgres", autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "mailmigrate: error: alice: state database error" in err
    assert "bob: FAILED — " in out or "mailmigrate: error: bob: state database error" in err
    assert out.count("FAILED") >= 2, out


def test_dry_run_creates_no_state_database_and_sorts_its_plan(old_account, new_account,
                                                               tmp_path):
    mailgen.fill(old_account, mailgen.realistic_mailbox(count=12, big=False, seed=35))
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    first = run_cli("run", "-c", str(path), "--dry-run")
    assert first.returncode == 0, first.stderr
    assert list(tmp_path.glob("mailmigrate.db*")) == []
    plan = [line.strip() for line in first.stdout.splitlines()
            if " → " in line and not line.strip().startswith("folders")]
    assert len(plan) == 6 and plan[0].startswith("INBOX → ") and plan[1:] == sorted(plan[1:])
    assert any("(create, " in line for line in plan)

    def stable(out: str) -> list[str]:  # without the time stamp and the measured estimate
        return [line for line in out.splitlines()[1:] if "estimated duration" not in line]
    # the same order every time
    assert stable(run_cli("run", "-c", str(path), "--dry-run").stdout) == stable(first.stdout)


def test_counts_say_one_message_not_one_messages(old_account, new_account, tmp_path):
    mailgen.fill(old_account, mailgen.realistic_mailbox(count=1, big=False, seed=36))
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account,
                                                       folders={"include": ["INBOX"]})])
    dry = run_cli("run", "-c", str(path), "--dry-run")
    assert "overall: 1 job, 1 message (" in dry.stdout
    assert ", 1 to copy (" in dry.stdout
    real = run_cli("run", "-c", str(path), "--no-progress")
    assert real.stdout.startswith("alice: 1 folder, 1 copied, "), real.stdout


def test_warnings_reach_stderr_without_verbose_and_vv_adds_batches(old_account, new_account,
                                                                    tmp_path):
    mailgen.fill(old_account, mailgen.realistic_mailbox(count=12, big=False, seed=37))
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    verbose = run_cli("run", "-c", str(path), "--no-progress", "-v")
    assert verbose.returncode == 0 and "batch of" not in verbose.stderr
    mailgen.expunge_first(old_account, "INBOX", 2)  # another client deletes mail
    quiet = run_cli("run", "-c", str(path), "--no-progress")
    assert quiet.returncode == 0
    assert quiet.stderr.splitlines() == [
        "mailmigrate: warning: alice: folder 'INBOX': 2 messages vanished from the source "
        "since the last run without mailmigrate deleting them; another client (often a POP3 "
        "client) is deleting mail from this mailbox"]
    mailgen.fill(old_account, mailgen.realistic_mailbox(count=3, big=False, seed=38))
    debug = run_cli("run", "-c", str(path), "--no-progress", "-vv", "--batch-messages", "1")
    assert debug.returncode == 0
    assert re.search(r"DEBUG alice: batch of 1 message, \d+ bytes", debug.stderr), debug.stderr


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_errors_must_be_positive(value, tmp_path, old_account, new_account):
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    proc = run_cli("run", "-c", str(path), "--max-errors", value)
    assert proc.returncode == EXIT_REFUSED and "--max-errors must be 1 or more" in proc.stderr
