"""Trying to break the workers (issue 11, second pass): a lost slot-lock session, a
worker frozen past its heartbeat, kill -9 while deleting, enqueue while running, and
status beside a dead worker.  Real PostgreSQL and Dovecot; workers are OS processes;
every wait polls with a deadline."""

from __future__ import annotations

import collections
import signal
import uuid

import psycopg
import pytest

from migrate.limits import server_lock_key
from migrate.store import MAILBOX_TASK
from tests.rig import mailgen
from tests.rig.countingproxy import CountingProxy
from tests.rig.interrupt import count_in, fill_many, hashes_at, hashes_of
from tests.rig.jobs import run_cli
from tests.test_accounts import _accounts_entry
from tests.test_workers import (
    DEADLINE, _assert_never_overlapping, _config, _enqueue, _libpq, _output, _queue, _runs,
    _start_worker, _status, _stop, _upgrade, _wait_until,
)


def _job(name, old_account, new_account, **extra) -> dict:
    return {"name": name, "kind": "imap-copy", "source": old_account.endpoint_toml(),
            "destination": new_account.endpoint_toml(), **extra}


def _source_left(account) -> collections.Counter:
    return hashes_at(account)


def _hold_source_slot(pg_url: str, port: int, slot: int = 0) -> psycopg.Connection:
    """Another process holding a connection slot of the source server."""
    holder = psycopg.connect(_libpq(pg_url), autocommit=True)
    key = server_lock_key(("127.0.0.1", port))
    assert holder.execute("SELECT pg_try_advisory_lock(%s, %s)", (key, slot)).fetchone()[0]
    return holder


def _wait_for_kill(proc) -> None:
    """The worker killed itself at its crash point (else it is stopped: no leftover)."""
    try:
        code = proc.wait(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == -signal.SIGKILL, _output(proc)


# --- 3. kill -9 while deleting ---------------------------------------------------------


@pytest.mark.parametrize("point", ["before-delete:1", "after-delete:1", "before-expunge:1"])
def test_kill_9_while_deleting_another_worker_finishes_each_message_once(
        point, old_account, new_account, pg_url, tmp_path):
    bodies = fill_many(old_account, 200)
    path = _config(tmp_path, [_job("mover", old_account, new_account,
                                   delete_after_verify=True)], pg_url)
    _upgrade(path)
    _enqueue(path)
    doomed = _start_worker(path, tmp_path, "--batch-messages", "50",
                           env={"MAILMIGRATE_CRASH_AT": point})
    _wait_for_kill(doomed)
    # the crash left the job "running" in the queue, and the source not yet emptied
    assert _queue(pg_url) == {"doing": 1}
    assert count_in(new_account) == 200
    other = _start_worker(path, tmp_path, "--batch-messages", "50")
    try:
        _wait_until("the job done by the other worker",
                    lambda: _queue(pg_url) == {"succeeded": 1}, [other])
    finally:
        _stop([other])
    assert hashes_at(new_account) == hashes_of(bodies)  # all 200, each exactly once
    assert _source_left(old_account) == {}  # every original deleted, after its copy
    runs = _runs(pg_url)["mover"]
    assert [(r["outcome"], r["pid"]) for r in runs] == [("aborted", doomed.pid),
                                                        ("ok", other.pid)]
    _assert_never_overlapping({"mover": runs})


# --- 4. enqueue while the job runs -----------------------------------------------------


def test_enqueue_while_the_job_runs_queues_exactly_one_more_run(
        old_account, new_account, pg_url, tmp_path):
    mailgen.fill(old_account, [mailgen.TestMessage("INBOX", b, (), None)
                               for b in fill_bodies(4)])
    path = _config(tmp_path, [_job("solo", old_account, new_account,
                                   source=old_account.endpoint_toml(max_connections=1))],
                   pg_url)
    _upgrade(path)
    _enqueue(path)
    # the job starts but waits for the source's only connection slot: it stays running
    holder = _hold_source_slot(pg_url, old_account.endpoint_toml()["port"])
    worker = _start_worker(path, tmp_path)
    try:
        _wait_until("the job running", lambda: _runs(pg_url).get("solo"), [worker])
        assert _queue(pg_url) == {"doing": 1}
        assert "enqueued 1 job; 0 already waiting" in _enqueue(path)
        assert "enqueued 0 jobs; 1 already waiting" in _enqueue(path)  # not several
        assert _queue(pg_url) == {"doing": 1, "todo": 1}
        holder.close()
        _wait_until("both runs done", lambda: _queue(pg_url) == {"succeeded": 2}, [worker])
    finally:
        holder.close()
        _stop([worker])
    runs = _runs(pg_url)["solo"]
    assert [r["outcome"] for r in runs] == ["ok", "ok"]
    assert [r["copied"] for r in runs] == [4, 0]  # the second found nothing new
    _assert_never_overlapping({"solo": runs})


def fill_bodies(count: int, seed: int = 11) -> list[bytes]:
    import random

    rng = random.Random(seed)
    return [mailgen.make_message(rng, i)[0] for i in range(count)]


# --- 5. status beside a dead worker ----------------------------------------------------


def test_status_of_a_job_whose_worker_died_says_so(old_account, new_account, pg_url,
                                                    tmp_path):
    fill_many(old_account, 100)
    path = _config(tmp_path, [_job("orphan", old_account, new_account)], pg_url)
    _upgrade(path)
    _enqueue(path)
    doomed = _start_worker(path, tmp_path, "--batch-messages", "20",
                           env={"MAILMIGRATE_CRASH_AT": "after-append:2"})
    _wait_for_kill(doomed)
    worker_id_name = f"pid {doomed.pid}"
    # no live worker: nobody has handed the job back yet
    doc = _wait_until("the dead worker's heartbeat late", lambda: (
        lambda d: d if d["queue"]["workers"] and d["queue"]["workers"][0]["stalled"]
        else None)(_status(path)))
    assert doc["queue"]["running"] == 1 and doc["queue"]["alive_workers"] == 0
    (running,) = doc["queue"]["running_jobs"]
    assert running["job"] == "orphan" and running["pid"] == doomed.pid
    assert running["worker_stalled"] is True
    text = run_cli("status", "-c", str(path)).stdout
    assert "0 workers alive, 1 not heard from" in text
    assert "running: orphan on " in text and worker_id_name in text
    assert "its worker is not heard from since" in text
    assert "goes back into the queue when a worker" in text
    # a worker started now hands it back and finishes it
    worker = _start_worker(path, tmp_path)
    try:
        _wait_until("the job done", lambda: _queue(pg_url) == {"succeeded": 1}, [worker])
    finally:
        _stop([worker])
    doc = _status(path)
    assert doc["queue"]["running"] == 0 and doc["queue"]["running_jobs"] == []
    assert doc["jobs"][0]["running_run"] is None
    assert count_in(new_account) == 100




# --- 2. a live worker frozen past its heartbeat ------------------------------------------


def _queue_row(pg_url: str) -> tuple[str, int]:
    with psycopg.connect(_libpq(pg_url)) as conn:
        (row,) = conn.execute("SELECT status::text, attempts FROM procrastinate_jobs "
                              "WHERE task_name = %s", (MAILBOX_TASK,)).fetchall()
    return row


def test_a_frozen_worker_s_job_never_runs_twice_at_once_and_ends_sane(
        old_account, new_account, pg_url, tmp_path):
    bodies = fill_many(old_account, 1500)
    path = _config(tmp_path, [_job("frozen", old_account, new_account)], pg_url)
    _upgrade(path)
    _enqueue(path)
    first = _start_worker(path, tmp_path, "--batch-messages", "20")
    second = None
    try:
        _wait_until("the first copies", lambda: count_in(new_account) >= 20, [first])
        first.send_signal(signal.SIGSTOP)  # alive, but no heartbeat any more
        second = _start_worker(path, tmp_path, "--batch-messages", "20")
        # the second worker sees the silence, but the job's own lock (held by the frozen
        # process's session) says it is alive: the job is left to it, not handed on
        _wait_until("the second worker's verdict", lambda: "left to it (frozen" in
                    _output(second)[1], [second])
        assert _queue_row(pg_url) == ("doing", 0)
        assert {r["pid"] for r in _runs(pg_url)["frozen"]} == {first.pid}
        doc = _status(path)
        (running,) = doc["queue"]["running_jobs"]
        assert running["worker_stalled"] and running["lock_held"]
        assert "frozen or overloaded, not dead" in run_cli("status", "-c", str(path)).stdout
        first.send_signal(signal.SIGCONT)
        _wait_until("the job done", lambda: _queue(pg_url) == {"succeeded": 1}, [first, second])
        # the woken worker is still a registered, live worker: it takes the next task
        assert "enqueued 1 job" in _enqueue(path)
        _wait_until("the next task done", lambda: _queue(pg_url) == {"succeeded": 2},
                    [first, second])
        doc = _status(path)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
        _stop([p for p in (first, second) if p is not None])
    assert hashes_at(new_account) == hashes_of(bodies)  # each exactly once
    runs = _runs(pg_url)["frozen"]
    _assert_never_overlapping({"frozen": runs})
    assert sum(r["copied"] for r in runs) == 1500
    assert runs[0]["pid"] == first.pid and runs[0]["copied"] == 1500
    assert doc["queue"]["running"] == 0 and doc["queue"]["alive_workers"] == 2 and doc["jobs"][0]["running_run"] is None
    assert not doc["jobs"][0]["running"]
    for proc in (first, second):
        out, err = _output(proc)
        assert "Traceback" not in err, err


# --- 1. the slot-lock session ends under a running job ------------------------------------


def _slot_sessions(pg_url: str, role: str, pid: int | None = None) -> list[int]:
    """Backend pids of the workers' slot sessions ("slots" or "slots guard")."""
    with psycopg.connect(_libpq(pg_url)) as conn:
        return [p for (p,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE %s",
            (f"mailmigrate {role} pid {pid if pid else '%'} on %",))]


def _terminate(pg_url: str, backends: list[int]) -> None:
    with psycopg.connect(_libpq(pg_url), autocommit=True) as conn:
        for backend in backends:
            assert conn.execute("SELECT pg_terminate_backend(%s)", (backend,)).fetchone()[0]


def _slot_holder(pg_url: str, port: int) -> int | None:
    """The OS pid of the process holding the source's only slot."""
    key = server_lock_key(("127.0.0.1", port)) & 0xFFFFFFFF
    with psycopg.connect(_libpq(pg_url)) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
            "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid::bigint = %s AND a.application_name LIKE 'mailmigrate slots pid %%'",
            (key,)).fetchone()
    return int(row[0].split()[3]) if row else None


def test_a_lost_slot_session_never_lets_the_limit_be_exceeded(
        old_host, new_host, pg_url, tmp_path):
    pairs = []
    for i in range(2):
        src = old_host.add_user(f"slots{i}-{uuid.uuid4().hex[:6]}@old.test", "o-" + str(i))
        dst = new_host.add_user(src.username.replace("old", "new"), "n-" + str(i))
        pairs.append((src, dst, hashes_of(fill_many(src, 2000, seed=i))))
    proxy = CountingProxy(old_host.ports["imaps"])
    procs = []
    try:
        entry = _accounts_entry(tmp_path, old_host, new_host, pairs, proxy.port)
        entry["source"]["max_connections"] = 1
        path = _config(tmp_path, [entry], pg_url)
        _upgrade(path)
        _enqueue(path)
        procs = [_start_worker(path, tmp_path, "--batch-messages", "10") for _ in range(2)]
        # both jobs running: one copies, the other waits for the source's only slot
        _wait_until("both jobs running, one copying", lambda: _queue(pg_url)["doing"] == 2
                    and sum(count_in(d) for _, d, _ in pairs) >= 40, procs)
        holder = _slot_holder(pg_url, proxy.port)
        assert holder in {p.pid for p in procs}
        # an admin (or a pooler) ends every worker's slot session, then every guard: the
        # other half of each slot pair keeps the waiting worker out, and the lost half is
        # taken again on a new session
        for role in ("slots", "slots guard"):
            before = _slot_sessions(pg_url, role)
            assert len(before) == 2
            _terminate(pg_url, before)
            _wait_until(f"new {role} sessions", lambda role=role, before=before: len(
                set(_slot_sessions(pg_url, role)) - set(before)) == 2, procs)
            # a new session is open before it holds its half again: wait for the lock
            _wait_until("the slot held again by the copying worker",
                        lambda: _slot_holder(pg_url, proxy.port) == holder, procs)
        assert proxy.peak == 1, f"peak {proxy.peak} concurrent source connections"
        # both sessions of the copying worker end at once (as in a database restart): it
        # stops its job after the batch in flight, the job goes back into the queue, the
        # worker ends saying so; the other worker finishes everything
        doomed = next(p for p in procs if p.pid == _slot_holder(pg_url, proxy.port))
        _terminate(pg_url, _slot_sessions(pg_url, "slots", doomed.pid)
                   + _slot_sessions(pg_url, "slots guard", doomed.pid))
        assert doomed.wait(timeout=DEADLINE) == 2, _output(doomed)
        survivor = next(p for p in procs if p is not doomed)
        _wait_until("every task done", lambda: _queue(pg_url) == {"succeeded": 2},
                    [survivor])
    finally:
        _stop(procs)
        proxy.close()
    out, err = _output(doomed)
    assert "lost its hold on the connection slots" in err and "Traceback" not in err
    assert "INTERRUPTED" in out
    for _src, dst, expected in pairs:
        assert hashes_at(dst) == expected  # every message exactly once
    runs = _runs(pg_url)
    for job_runs in runs.values():
        _assert_never_overlapping({"job": job_runs})
    assert sorted(r["outcome"] for rs in runs.values() for r in rs) == ["aborted", "ok", "ok"]


def _registered_workers(pg_url: str) -> set[int]:
    with psycopg.connect(_libpq(pg_url)) as conn:
        return {i for (i,) in conn.execute("SELECT id FROM procrastinate_workers")}


def test_an_idle_worker_taken_for_dead_comes_back_and_works(
        old_account, new_account, pg_url, tmp_path):
    bodies = fill_many(old_account, 50)
    path = _config(tmp_path, [_job("later", old_account, new_account)], pg_url)
    _upgrade(path)
    sleeper = _start_worker(path, tmp_path)
    other = None
    try:
        (first_id,) = _wait_until("the first worker registered",
                                  lambda: _registered_workers(pg_url), [sleeper])
        sleeper.send_signal(signal.SIGSTOP)
        other = _start_worker(path, tmp_path)
        # the other worker's sweep removes the silent one's registration
        _wait_until("the frozen worker pruned", lambda: len(_registered_workers(pg_url)) == 1
                    and first_id not in _registered_workers(pg_url), [other])
        sleeper.send_signal(signal.SIGCONT)
        _wait_until("both registered again", lambda: len(_registered_workers(pg_url)) == 2,
                    [sleeper, other])
        for _ in range(4):  # tasks for either worker
            _enqueue(path)
            _wait_until("the task done", lambda: _queue(pg_url)["todo"] == 0
                        and _queue(pg_url)["doing"] == 0, [sleeper, other])
    finally:
        if sleeper.poll() is None:
            sleeper.send_signal(signal.SIGCONT)
        _stop([p for p in (sleeper, other) if p is not None])
    assert [p.returncode for p in (sleeper, other)] == [143, 143]
    for proc in (sleeper, other):
        assert "Traceback" not in _output(proc)[1], _output(proc)
    assert _queue(pg_url) == {"succeeded": 4}
    assert hashes_at(new_account) == hashes_of(bodies)
