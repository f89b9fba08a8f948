"""A run whose job lock dies under it (PostgreSQL: the session holding the advisory lock
ends while the process lives on) must notice before it does anything more that could
collide with another run: it takes the lock again when that is safe, and stops otherwise,
deleting nothing.

The moments are exact: the run stops itself (SIGSTOP) at a checkpoint
(MAILMIGRATE_PAUSE_AT), the test ends its lock session with pg_terminate_backend and
lets other runs work, then resumes it (SIGCONT).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psycopg
import pytest

from migrate.store import Store, libpq_url
from tests.rig.interrupt import count_in, fill_many, hashes_at, hashes_of
from tests.rig.jobs import imap_job, run_cli, write_config

COUNT = 300
BATCH = "20"  # --batch-messages: 15 batches, so a pause at the 4th boundary is mid-copy


class Paused:
    """A `mailmigrate run` that stops itself at a checkpoint; output goes to files (no
    pipe to fill while it stands still)."""

    def __init__(self, tmp_path, name: str, config, pause_at: str,
                 command: tuple[str, ...] = ("run", "--no-progress")):
        self.out = open(tmp_path / f"{name}.out", "w+", encoding="utf-8")  # noqa: SIM115
        self.err = open(tmp_path / f"{name}.err", "w+", encoding="utf-8")  # noqa: SIM115
        env = {**os.environ, "MAILMIGRATE_PAUSE_AT": pause_at}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrate", command[0], "-c", str(config), *command[1:],
             "--batch-messages", BATCH], stdout=self.out, stderr=self.err, env=env)
        self.pid = self.proc.pid

    def wait_stopped(self) -> None:
        _, status = os.waitpid(self.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            pytest.fail(f"the run ended before its pause: {self.output()}")

    def resume_and_finish(self) -> int:
        os.kill(self.pid, signal.SIGCONT)
        return self.proc.wait(timeout=300)

    def output(self) -> str:
        text = []
        for f in (self.out, self.err):
            f.seek(0)
            text.append(f.read())
        return "\n".join(text)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            os.kill(self.pid, signal.SIGCONT)
            self.proc.wait(timeout=30)
        self.out.close()
        self.err.close()


def end_lock_session(pg_url: str, pid: int) -> None:
    """Terminate the database session holding the job lock of process ``pid`` (named
    "mailmigrate pid N on HOST"; the slot sessions are named otherwise), and wait until
    it is gone."""
    with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
        ended = [r[0] for r in conn.execute(
            "SELECT pg_terminate_backend(pid, 60000) FROM pg_stat_activity "
            "WHERE application_name LIKE %s", (f"mailmigrate pid {pid} on %",))]
    assert ended == [True]


def another_run_takes_over(tmp_path, pg_url, deleting, keeping) -> tuple[int, str]:
    """``deleting`` pauses right before its first deletion, loses its lock session, and
    a run of ``keeping`` does the whole job meanwhile; then ``deleting`` goes on.  Its
    exit code and output."""
    run = Paused(tmp_path, "a", deleting, "delete-unit:1")
    try:
        run.wait_stopped()
        end_lock_session(pg_url, run.pid)
        other = run_cli("run", "-c", str(keeping), "--no-progress")
        assert other.returncode == 0, (other.stdout, other.stderr)
        return run.resume_and_finish(), run.output()
    finally:
        run.close()


def outcomes(url: str) -> list[str]:
    store = Store(url)
    try:
        return [r["outcome"] for r in store.runs(store.find_job("alice"))]
    finally:
        store.close()


def config_for(tmp_path, name, old_account, new_account, state_url, delete: bool):
    return write_config(tmp_path / name, [imap_job("alice", old_account, new_account,
                                                   delete_after_verify=delete)],
                        state_url=state_url)


def test_lock_session_ended_mid_copy_is_taken_again(pg_url, old_account, new_account,
                                                    tmp_path):
    """Nobody else took the job meanwhile: the run takes its lock again, says so, and
    finishes - every message copied once, the originals deleted after verifying."""
    bodies = fill_many(old_account, COUNT, seed=61)
    path = config_for(tmp_path, "c.toml", old_account, new_account, pg_url, delete=True)
    run = Paused(tmp_path, "a", path, "after-append:3")  # in the middle of a batch
    try:
        run.wait_stopped()
        end_lock_session(pg_url, run.pid)
        code = run.resume_and_finish()
        out = run.output()
    finally:
        run.close()
    assert code == 0, out
    assert "the lock was taken again (no other run had taken the job meanwhile)" in out
    assert hashes_at(new_account) == hashes_of(bodies)
    assert count_in(old_account) == 0
    assert outcomes(pg_url) == ["ok"]


def test_another_run_took_the_job_before_deleting_stops_without_deleting(pg_url, old_account,
                                                             new_account, tmp_path):
    """Everything is copied and verified; right before the first deletion the lock
    session ends, and another run takes the job and finishes before this run looks
    again.  Taking the lock back would succeed, but the run record shows the other run:
    this run stops with the error and deletes nothing (without the check it would
    delete every original: delete_after_verify = true)."""
    bodies = fill_many(old_account, COUNT, seed=62)
    deleting = config_for(tmp_path, "a.toml", old_account, new_account, pg_url, delete=True)
    keeping = config_for(tmp_path, "b.toml", old_account, new_account, pg_url, delete=False)
    code, out = another_run_takes_over(tmp_path, pg_url, deleting, keeping)
    assert code == 1, out
    assert ("lost the job lock: the state database connection that held it ended; "
            "another run took the job meanwhile; stopped so that no other run works on "
            "this mailbox at the same time; run again") in out
    assert "alice: FAILED" in out
    assert count_in(old_account) == COUNT  # nothing deleted
    assert hashes_at(new_account) == hashes_of(bodies)  # nothing twice
    assert outcomes(pg_url) == ["failed", "ok"]


def test_another_run_holds_the_lock_stops_at_the_next_batch(pg_url, old_account,
                                                            new_account, tmp_path):
    """The lock session ends and another run takes the job and is still at work when
    this run reaches its next batch boundary: this run stops there with the error naming
    the other, deleting nothing; the other finishes the job.  Afterwards every message is
    at the destination once and the source holds what the other run did not delete."""
    bodies = fill_many(old_account, COUNT, seed=63)
    path = config_for(tmp_path, "c.toml", old_account, new_account, pg_url, delete=True)
    first = Paused(tmp_path, "a", path, "batch-boundary:4")
    second = None
    try:
        first.wait_stopped()
        end_lock_session(pg_url, first.pid)
        second = Paused(tmp_path, "b", path, "batch-boundary:2")  # holds the job lock
        second.wait_stopped()
        code = first.resume_and_finish()
        out = first.output()
        assert code == 1, out
        assert (f"lost the job lock: the state database connection that held it ended; "
                f"another run holds it now (pid {second.pid} on ") in out
        assert count_in(old_account) == COUNT  # the first run deleted nothing
        assert second.resume_and_finish() == 0, second.output()
    finally:
        first.close()
        if second is not None:
            second.close()
    assert hashes_at(new_account) == hashes_of(bodies)
    assert count_in(old_account) == 0  # deleted by the second run, after verifying
    assert outcomes(pg_url) == ["failed", "ok"]


def test_sqlite_lock_cannot_be_lost(old_account, new_account, tmp_path):
    """SQLite's flock lives with the process: held all along, nothing to check at the
    batch boundaries, and the run goes on as before."""
    bodies = fill_many(old_account, COUNT, seed=64)
    path = config_for(tmp_path, "c.toml", old_account, new_account, None, delete=True)
    state_url = f"sqlite:///{tmp_path / 'mailmigrate.db'}"
    run = Paused(tmp_path, "a", path, "batch-boundary:4")
    try:
        run.wait_stopped()
        store = Store.open_existing(state_url)
        try:
            assert store.job_is_running("alice")  # the flock, held by the stopped run
        finally:
            store.close()
        code = run.resume_and_finish()
        out = run.output()
    finally:
        run.close()
    assert code == 0, out
    assert "job lock" not in out
    assert hashes_at(new_account) == hashes_of(bodies)
    assert count_in(old_account) == 0
    assert outcomes(state_url) == ["ok"]
    store = Store(state_url)
    try:
        with store.job_lock("probe") as hold:
            assert hold.check() is None
    finally:
        store.close()


def test_a_worker_that_lost_the_lock_puts_the_job_back_into_the_queue(
        pg_url, old_account, new_account, tmp_path):
    """Workers run the same engine: a worker's job that lost its lock to another run stops
    with the error and goes back into the queue (tried again later, like a job another
    run holds) - not failed, although [workers] retries = 0 here."""
    from tests.test_workers import _config, _enqueue, _queue, _upgrade

    bodies = fill_many(old_account, COUNT, seed=65)
    path = _config(tmp_path, [imap_job("alice", old_account, new_account,
                                       delete_after_verify=True)], pg_url)
    _upgrade(path)
    _enqueue(path)
    worker = Paused(tmp_path, "worker", path, "batch-boundary:4",
                    command=("worker", "--until-empty"))
    other = None
    try:
        worker.wait_stopped()
        end_lock_session(pg_url, worker.pid)
        other = Paused(tmp_path, "b", path, "batch-boundary:2")  # takes the job lock
        other.wait_stopped()
        code = worker.resume_and_finish()
        out = worker.output()
        assert code == 1, out
        assert (f"lost the job lock: the state database connection that held it ended; "
                f"another run holds it now (pid {other.pid} on ") in out
        assert "Traceback" not in out
        assert _queue(pg_url) == {"todo": 1}  # back into the queue, not failed
        assert count_in(old_account) == COUNT  # the worker deleted nothing
        assert other.resume_and_finish() == 0, other.output()
    finally:
        worker.close()
        if other is not None:
            other.close()
    assert hashes_at(new_account) == hashes_of(bodies)
    assert count_in(old_account) == 0
    assert outcomes(pg_url) == ["failed", "ok"]


def test_pop3_archive_that_lost_the_lock_deletes_nothing(pg_url, old_account, tmp_path):
    """The same for a pop3-archive job (the same choke point): the lock session ends
    right before its deletion and another run takes the job meanwhile; no DELE is sent,
    and QUIT deletes nothing."""
    from tests.test_pop3_archive import archive_files, hashes, pop_job

    bodies = fill_many(old_account, 60, seed=66)
    archive = tmp_path / "arch"
    deleting = write_config(tmp_path / "a.toml", [pop_job(
        old_account, archive, name="alice", delete_after_verify=True)], state_url=pg_url)
    keeping = write_config(tmp_path / "b.toml", [pop_job(
        old_account, archive, name="alice")], state_url=pg_url)
    code, out = another_run_takes_over(tmp_path, pg_url, deleting, keeping)
    assert code == 1, out
    assert "lost the job lock" in out and "another run took the job meanwhile" in out
    assert count_in(old_account) == 60  # nothing deleted
    assert hashes(archive_files(archive)) == hashes_of(bodies)  # each archived once
    assert outcomes(pg_url) == ["failed", "ok"]
