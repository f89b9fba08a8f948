"""Jobs on several hosts (issue 11): `mailmigrate worker` processes sharing one queue in
PostgreSQL (procrastinate), against real Dovecot servers.  Workers are separate OS
processes, as on separate hosts; every wait polls the database or the servers with a
deadline."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import croniter
import psycopg
import pytest

from migrate import config as cfg
from migrate import status
from migrate.limits import server_lock_key
from migrate.store import MAILBOX_TASK, Store
from tests.rig import mailgen
from tests.rig.countingproxy import CountingProxy
from tests.rig.interrupt import count_in, fill_many, hashes_at, hashes_of
from tests.rig.jobs import run_cli, write_config
from tests.test_accounts import _accounts_entry, _hashes, _mailboxes

# short heartbeats: a killed worker's job is handed on within seconds (8 s: a margin
# for a live worker whose heartbeat is late on a loaded machine)
WORKERS = {"heartbeat_seconds": 0.5, "stalled_after_seconds": 8, "retries": 0}
DEADLINE = 180


def _config(tmp_path: Path, jobs: list[dict], pg_url: str) -> Path:
    path = write_config(tmp_path / "config.toml", jobs, state_url=pg_url)
    lines = ["[workers]"] + [f"{k} = {v}" for k, v in WORKERS.items()] + [""]
    path.write_text("\n".join(lines) + path.read_text())
    return path


def _libpq(pg_url: str) -> str:
    return pg_url.replace("postgresql+psycopg://", "postgresql://")


def _upgrade(path: Path) -> None:
    proc = run_cli("db", "upgrade", "-c", str(path))
    assert proc.returncode == 0, proc.stderr


def _enqueue(path: Path, *args: str) -> str:
    proc = run_cli("enqueue", "-c", str(path), *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _start_worker(path: Path, tmp_path: Path, *args: str, env: dict | None = None
                  ) -> subprocess.Popen:
    """A worker process; its output goes to files (a full pipe would block it)."""
    tag = uuid.uuid4().hex[:6]
    out = open(tmp_path / f"worker-{tag}.out", "w+")  # noqa: SIM115 - kept with the process
    err = open(tmp_path / f"worker-{tag}.err", "w+")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "migrate", "worker", "-c", str(path),
                             *args], stdout=out, stderr=err,
                            env={**os.environ, **(env or {})})
    proc.out_file, proc.err_file = out, err
    return proc


def _output(proc: subprocess.Popen) -> tuple[str, str]:
    proc.out_file.seek(0)
    proc.err_file.seek(0)
    return proc.out_file.read(), proc.err_file.read()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, as at a host's shutdown: idle workers stop at once with 143."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"worker {proc.pid} did not stop on SIGTERM: {_output(proc)}")


def _wait_until(what: str, check, procs=(), timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"worker {proc.pid} ended ({proc.returncode}) while waiting "
                            f"for {what}: {_output(proc)}")
        time.sleep(0.05)  # polling interval, not synchronisation
    pytest.fail(f"timed out waiting for {what}: " + " / ".join(str(_output(p)) for p in procs))


def _queue(pg_url: str) -> collections.Counter:
    with psycopg.connect(_libpq(pg_url)) as conn:
        return collections.Counter({s: n for s, n in conn.execute(
            "SELECT status::text, count(*) FROM procrastinate_jobs WHERE task_name = %s "
            "GROUP BY status", (MAILBOX_TASK,))})


def _runs(pg_url: str) -> dict[str, list[dict]]:
    with psycopg.connect(_libpq(pg_url)) as conn:
        rows = conn.execute(
            "SELECT j.name, r.started_at, r.ended_at, r.outcome, r.pid, r.copied "
            "FROM runs r JOIN jobs j ON j.id = r.job_id ORDER BY r.id").fetchall()
    runs = collections.defaultdict(list)
    for name, started, ended, outcome, pid, copied in rows:
        runs[name].append({"started": started, "ended": ended, "outcome": outcome,
                           "pid": pid, "copied": copied})
    return runs


def _assert_never_overlapping(runs: dict[str, list[dict]]) -> None:
    for name, job_runs in runs.items():
        spans = sorted((r["started"], r["ended"]) for r in job_runs)
        assert all(end is not None for _, end in spans), (name, spans)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, f"{name}: two runs at once: {spans}"


def _status(path: Path) -> dict:
    config = cfg.load(path)
    store = Store.open_existing(config.state_url)
    try:
        return status.status_document(config, store, None, "db")
    finally:
        store.close()


def test_three_workers_thirty_mailboxes_each_once_at_a_time_within_the_limit(
        old_host, new_host, pg_url, tmp_path):
    pairs = _mailboxes(old_host, new_host, 30, 6)
    proxy = CountingProxy(old_host.ports["imaps"])
    procs = []
    try:
        job = _accounts_entry(tmp_path, old_host, new_host, pairs, proxy.port)  # limit 2
        path = _config(tmp_path, [job], pg_url)
        _upgrade(path)
        assert "enqueued 30 jobs; 0 already waiting" in _enqueue(path)
        assert "enqueued 0 jobs; 30 already waiting" in _enqueue(path)  # no pile-up
        assert _queue(pg_url) == {"todo": 30}
        procs = [_start_worker(path, tmp_path, "--concurrency", "2") for _ in range(3)]
        # once jobs run, enqueue everything again: the running and finished jobs get a
        # second task, which must never run beside the first (lock = job name)
        _wait_until("a job running", lambda: _queue(pg_url)["doing"]
                    or _queue(pg_url)["succeeded"], procs)
        again = _enqueue(path)
        _wait_until("every task done", lambda: _queue(pg_url).keys() == {"succeeded"}
                    and _queue(pg_url)["succeeded"] > 30, procs)
        queue = _queue(pg_url)
    finally:
        _stop(procs)
        proxy.close()
    assert [p.returncode for p in procs] == [143] * 3, [_output(p) for p in procs]
    assert "already waiting" in again
    assert queue["succeeded"] == 30 + int(again.split()[1])
    # the limit is kept in the database: 2 source connections across 3 processes × 2 jobs
    assert proxy.peak <= 2, f"peak {proxy.peak} concurrent source connections"
    assert proxy.connections >= 30
    for _src, dst, expected in pairs:
        assert _hashes(dst) == expected  # every message exactly once
    runs = _runs(pg_url)
    assert len(runs) == 30 and all(r["outcome"] == "ok" for rs in runs.values() for r in rs)
    assert any(len(rs) == 2 for rs in runs.values())  # some were enqueued twice
    _assert_never_overlapping(runs)
    assert sum(r["copied"] for rs in runs.values() for r in rs) == 30 * 6
    assert len({r["pid"] for rs in runs.values() for r in rs}) >= 2  # shared out


def test_a_killed_worker_s_mailbox_is_finished_by_another_without_duplicates(
        old_account, new_account, pg_url, tmp_path):
    bodies = fill_many(old_account, 600)
    job = {"name": "big", "kind": "imap-copy", "source": old_account.endpoint_toml(),
           "destination": new_account.endpoint_toml()}
    path = _config(tmp_path, [job], pg_url)
    _upgrade(path)
    _enqueue(path)
    # kill -9 of itself in the middle of the mailbox: after the 4th batch's APPEND,
    # before it is recorded
    doomed = _start_worker(path, tmp_path, "--batch-messages", "50",
                           env={"MAILMIGRATE_CRASH_AT": "after-append:4"})
    _wait_until("the doomed worker's job running (or the worker dead already)",
                lambda: _queue(pg_url)["doing"] or doomed.poll() is not None)
    other = _start_worker(path, tmp_path, "--batch-messages", "50")
    try:
        assert doomed.wait(timeout=DEADLINE) == -signal.SIGKILL
        _wait_until("the job done by the other worker",
                    lambda: _queue(pg_url) == {"succeeded": 1}, [other])
    finally:
        _stop([other])
    assert other.returncode == 143
    _, err = _output(other)
    assert "stopped sending heartbeats; it goes back into the queue" in err
    (runs,) = _runs(pg_url).values()
    assert [(r["outcome"], r["pid"]) for r in runs] == [("aborted", doomed.pid),
                                                        ("ok", other.pid)]
    _assert_never_overlapping({"big": runs})
    assert hashes_at(new_account) == hashes_of(bodies)  # all 600, each exactly once


def test_a_scheduled_job_runs_again_by_itself_and_copies_only_what_is_new(
        old_account, new_account, pg_url, tmp_path):
    first = [mailgen.TestMessage("INBOX", mailgen.make_message(random.Random(1), i)[0], (),
                                 None) for i in range(5)]
    mailgen.fill(old_account, first)
    # six fields: seconds last (croniter's order, which procrastinate uses)
    job = {"name": "sched", "kind": "imap-copy", "schedule": "* * * * * */2",
           "source": old_account.endpoint_toml(), "destination": new_account.endpoint_toml()}
    path = _config(tmp_path, [job], pg_url)
    _upgrade(path)
    worker = _start_worker(path, tmp_path)  # nothing enqueued: the schedule does it
    try:
        _wait_until("the first scheduled run", lambda: any(
            r["outcome"] == "ok" and r["copied"] == 5 for r in _runs(pg_url)["sched"]),
            [worker])
        more = [mailgen.TestMessage("INBOX", mailgen.make_message(
            random.Random(2), 100 + i)[0], (), None) for i in range(3)]
        mailgen.fill(old_account, more)
        _wait_until("a later run copying the new messages", lambda: any(
            r["outcome"] == "ok" and r["copied"] == 3 for r in _runs(pg_url)["sched"]),
            [worker])
    finally:
        _stop([worker])
    runs = _runs(pg_url)["sched"]
    assert all(r["copied"] in (0, 3, 5) for r in runs)
    assert sum(r["copied"] for r in runs) == 8  # only what was new, once
    _assert_never_overlapping({"sched": runs})
    assert sorted(hashes_at(new_account).elements()) == sorted(
        m.sha256 for m in first + more)


def test_status_shows_waiting_running_failed_and_sigterm_requeues_the_running_job(
        old_host, new_host, pg_url, tmp_path):
    pairs = _mailboxes(old_host, new_host, 2, 3)
    entry = _accounts_entry(tmp_path, old_host, new_host, pairs, old_host.ports["imaps"])
    entry["source"]["max_connections"] = 1
    src, dst, _ = pairs[0]
    # a wrong password, on a server named otherwise ("localhost": its own slots)
    broken = {"name": "broken", "kind": "imap-copy",
              "source": {**src.endpoint_toml(), "host": "localhost", "password": "wrong"},
              "destination": dst.endpoint_toml()}
    path = _config(tmp_path, [entry, broken], pg_url)
    _upgrade(path)
    _enqueue(path)
    doc = _status(path)
    assert (doc["queue"]["waiting"], doc["queue"]["running"]) == (3, 0)
    assert [j["queue"]["state"] for j in doc["jobs"]] == ["waiting"] * 3
    text = run_cli("status", "-c", str(path))
    assert text.returncode == 0 and "queue: 3 waiting, 0 running, 0 failed" in text.stdout

    # another process holds the source's only connection slot: the worker's first job
    # runs but waits for it
    holder = psycopg.connect(_libpq(pg_url), autocommit=True)
    key = server_lock_key(("127.0.0.1", old_host.ports["imaps"]))
    assert holder.execute("SELECT pg_try_advisory_lock(%s, 0)", (key,)).fetchone()[0]
    worker = _start_worker(path, tmp_path)
    try:
        doc = _wait_until("a job running", lambda: (lambda d: d if d["queue"]["running_jobs"]
                          and d["queue"]["running_jobs"][0]["host"] else None)(
                          _status(path)), [worker])
        (running,) = doc["queue"]["running_jobs"]
        assert running["job"] == f"many:{src.username}" and running["pid"] == worker.pid
        assert doc["queue"]["waiting"] == 2 and len(doc["queue"]["workers"]) == 1
        text = run_cli("status", "-c", str(path)).stdout
        assert f"running: many:{src.username} on " in text and f"pid {worker.pid}" in text
        # SIGTERM: the job stops waiting, goes back into the queue, the worker ends
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=DEADLINE) == 143, _output(worker)
    finally:
        if worker.poll() is None:
            worker.kill()
    doc = _status(path)
    assert doc["queue"]["waiting"] == 3 and doc["queue"]["running"] == 0
    assert doc["jobs"][0]["last_run"]["outcome"] == "aborted"

    holder.close()  # the slot is free: a new worker finishes the queue
    proc = run_cli("worker", "-c", str(path), "--until-empty")
    assert proc.returncode == 1, proc.stderr  # "broken" failed; retries = 0
    assert "mailmigrate: error: broken: " in proc.stderr and "Traceback" not in proc.stderr
    doc = _status(path)
    assert (doc["queue"]["done"], doc["queue"]["failed"], doc["queue"]["waiting"]) == (2, 1, 0)
    states = {j["name"]: (j["queue"]["state"], j["last_run"]["outcome"]) for j in doc["jobs"]}
    assert states == {f"many:{pairs[0][0].username}": ("done", "ok"),
                      f"many:{pairs[1][0].username}": ("done", "ok"),
                      "broken": ("failed", "failed")}
    text = run_cli("status", "-c", str(path)).stdout
    assert "queue: 0 waiting, 0 running, 1 failed, 2 done" in text
    assert "broken (imap-copy):\n  queue:       failed" in text
    for _src, d, expected in pairs:
        assert _hashes(d) == expected


def test_workers_need_postgresql_and_say_what_to_add(tmp_path, old_account, new_account):
    job = {"name": "a", "kind": "imap-copy", "source": old_account.endpoint_toml(),
           "destination": new_account.endpoint_toml()}
    path = write_config(tmp_path / "config.toml", [job])  # SQLite
    for command in (["worker"], ["enqueue"], ["db", "upgrade"]):
        proc = run_cli(*command, "-c", str(path))
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert 'url = "postgresql+psycopg://USER@DBHOST/mailmigrate"' in proc.stderr
    assert not (tmp_path / "mailmigrate.db").exists()  # nothing created


def test_db_upgrade_on_several_hosts_at_once(pg_url, tmp_path, old_account, new_account):
    job = {"name": "a", "kind": "imap-copy", "source": old_account.endpoint_toml(),
           "destination": new_account.endpoint_toml()}
    path = _config(tmp_path, [job], pg_url)
    procs = [subprocess.Popen([sys.executable, "-m", "migrate", "db", "upgrade", "-c",
                               str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=DEADLINE) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    created = [o for o, _ in outs if "task queue schema created" in o]
    assert len(created) == 1, outs  # one host created it, the others found it
    again = run_cli("db", "upgrade", "-c", str(path))
    assert "task queue schema up to date" in again.stdout
    assert _queue(pg_url) == {}
    # a queue schema written by a newer procrastinate: refused, not downgraded
    with psycopg.connect(_libpq(pg_url), autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = '99.0.0' WHERE key = 'procrastinate_schema'")
    newer = run_cli("db", "upgrade", "-c", str(path))
    assert newer.returncode == 2 and "Traceback" not in newer.stderr
    assert "schema is of procrastinate 99.0.0, newer than the installed" in newer.stderr


def test_a_bad_schedule_is_a_config_error_naming_it(tmp_path):
    job = {"name": "a", "kind": "imap-copy", "schedule": "*/70 * * *",
           "source": {"host": "mail.old.example", "username": "a@old.example",
                      "password": "x"},
           "destination": {"host": "mail.new.example", "username": "a@new.example",
                           "password": "x"}}
    path = write_config(tmp_path / "config.toml", [job])
    proc = run_cli("check-config", "-c", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "schedule = '*/70 * * *': has 4 fields, not 5" in proc.stderr
    # the same verdicts as croniter, which the workers use to run schedules
    for bad, says in (("61 * * * *", "minute field '61' is out of range"),
                      ("* 24 * * *", "hour field '24' is out of range"),
                      ("* * * * mon-sunday", "day of week field 'mon-sunday' is out of"),
                      ("*/0 * * * *", "has a bad step")):
        assert says in cfg.cron_problem(bad)
        assert not croniter.croniter.is_valid(bad), bad
    for good in ("*/30 * * * *", "0 3 * * mon-fri", "@hourly", "* * * * * */2",
                 "0,30 8-18 1-31/2 jan-dec 0-7", "0 22-2 * * *", "* * * * mon-sun"):
        assert cfg.cron_problem(good) is None, good
        assert croniter.croniter.is_valid(good), good


def test_a_plain_run_on_postgresql_keeps_to_the_same_database_kept_limit(
        old_account, new_account, pg_url, tmp_path):
    """`mailmigrate run` beside workers (another host): one limit for all of them."""
    mailgen.fill(old_account, [mailgen.TestMessage(
        "INBOX", mailgen.make_message(random.Random(3), i)[0], (), None) for i in range(4)])
    job = {"name": "solo", "kind": "imap-copy",
           "source": old_account.endpoint_toml(max_connections=1),
           "destination": new_account.endpoint_toml()}
    path = _config(tmp_path, [job], pg_url)
    _upgrade(path)
    holder = psycopg.connect(_libpq(pg_url), autocommit=True)
    key = server_lock_key(("127.0.0.1", old_account.endpoint_toml()["port"]))
    assert holder.execute("SELECT pg_try_advisory_lock(%s, 0)", (key,)).fetchone()[0]
    proc = subprocess.Popen([sys.executable, "-m", "migrate", "run", "-c", str(path),
                             "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_until("the run waiting for the slot", lambda: _runs(pg_url).get("solo"))
        assert proc.poll() is None and hashes_at(new_account) == {}
        holder.close()  # the slot is free: the run goes on
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "4 copied" in out


def test_enqueue_and_worker_before_db_upgrade_say_to_run_it(pg_url, tmp_path, old_account,
                                                            new_account):
    job = {"name": "a", "kind": "imap-copy", "source": old_account.endpoint_toml(),
           "destination": new_account.endpoint_toml()}
    path = _config(tmp_path, [job], pg_url)
    for command in ("enqueue", "worker"):
        proc = run_cli(command, "-c", str(path))
        assert proc.returncode == 2, proc.stderr
        assert f"run `mailmigrate db upgrade -c {path}` first" in proc.stderr
        assert "Traceback" not in proc.stderr
    unknown = run_cli("enqueue", "-c", str(path), "--job", "nobody")
    assert unknown.returncode == 2 and "no job named 'nobody'" in unknown.stderr


def test_sigterm_mid_copy_finishes_the_batch_requeues_and_another_worker_continues(
        old_account, new_account, pg_url, tmp_path):
    bodies = fill_many(old_account, 2000)
    job = {"name": "big", "kind": "imap-copy", "source": old_account.endpoint_toml(),
           "destination": new_account.endpoint_toml()}
    path = _config(tmp_path, [job], pg_url)
    _upgrade(path)
    _enqueue(path)
    worker = _start_worker(path, tmp_path, "--batch-messages", "20")
    try:
        _wait_until("the first copies", lambda: count_in(new_account) >= 20, [worker])
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=DEADLINE) == 143, _output(worker)
    finally:
        if worker.poll() is None:
            worker.kill()
    out, err = _output(worker)
    assert "big: INTERRUPTED" in out and "go back into the queue" in err
    assert _queue(pg_url) == {"todo": 1}  # waiting again, for any worker
    (run,) = _runs(pg_url)["big"]
    assert run["outcome"] == "aborted" and 0 < run["copied"] < 2000
    # every batch begun was finished and recorded: the destination holds what was recorded
    assert count_in(new_account) == run["copied"]
    proc = run_cli("worker", "-c", str(path), "--until-empty")
    assert proc.returncode == 0, proc.stderr
    assert hashes_at(new_account) == hashes_of(bodies)  # the rest, nothing twice
    assert [r["outcome"] for r in _runs(pg_url)["big"]] == ["aborted", "ok"]
