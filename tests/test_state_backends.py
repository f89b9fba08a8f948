"""The same jobs with the state in PostgreSQL; secrets stay out of output and state."""

from __future__ import annotations

import collections
import re
import signal

from migrate.store import SCHEMA_VERSION, Store
from tests.rig import mailgen
from tests.rig.jobs import imap_job, run, run_cli, write_config


def test_imap_copy_with_postgresql_state(pg_url, old_account, new_account, tmp_path):
    msgs = mailgen.realistic_mailbox(count=24, big=False, seed=21)
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)],
                        state_url=pg_url)
    first = run(path)
    assert first.ok, first.errors
    assert first.counts["copied"] == len(msgs)
    assert run(path).counts.get("copied", 0) == 0
    assert not (tmp_path / "mailmigrate.db").exists()  # nothing fell back to SQLite
    store = Store(pg_url)
    job_id = store.find_job("alice")
    assert [r["outcome"] for r in store.runs(job_id)] == ["ok", "ok"]
    assert store.bindings()[0].protocol == "imap"
    store.close()
    got = collections.Counter(m.sha256 for ms in mailgen.snapshot(new_account).values()
                              for m in ms)
    assert got == collections.Counter(m.sha256 for m in msgs)


def test_secrets_never_reach_output_or_state(old_account, new_account, tmp_path):
    mailgen.fill(old_account, mailgen.realistic_mailbox(count=6, big=False, seed=22))
    job = imap_job("alice", old_account, new_account)
    job["source"].pop("password")
    job["source"]["password_env"] = "MM_SRC_SECRET"
    job["destination"].pop("password")
    job["destination"]["password_file"] = str(tmp_path / "dst-secret")
    (tmp_path / "dst-secret").write_text(new_account.password + "\n")
    path = write_config(tmp_path / "c.toml", [job])
    env = {"MM_SRC_SECRET": old_account.password}
    ok = run_cli("run", "-c", str(path), "-vv", "--no-progress", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "created folder" in ok.stderr  # verbose logging was really on
    # a failing login must not echo the password it tried
    bad = run_cli("run", "-c", str(path), "-vv", "--no-progress",
                  env={"MM_SRC_SECRET": "wrong-" + old_account.password})
    assert bad.returncode == 1 and "login" in bad.stderr
    state = b"".join(p.read_bytes() for p in tmp_path.glob("mailmigrate.db*"))
    for secret in (old_account.password, new_account.password):
        for text in (ok.stdout, ok.stderr, bad.stdout, bad.stderr):
            assert secret not in text
        assert secret.encode() not in state


def test_postgresql_job_lock_one_run_per_job(pg_url, old_account, new_account, tmp_path):
    """Two overlapping runs of one job with PostgreSQL state: the second exits 3 and does
    nothing; no message is copied twice."""
    from tests.rig.interrupt import fill_many, hashes_at, hashes_of, start_cli, wait_for_copies

    bodies = fill_many(old_account, 2000, seed=40)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)],
                        state_url=pg_url)
    first = start_cli("run", "-c", str(path), "--no-progress", "--batch-messages", "5")
    try:
        wait_for_copies(first, new_account)
        second = run_cli("run", "-c", str(path), "--no-progress")
        assert second.returncode == 3, (second.stdout, second.stderr)
        assert re.search(r"job 'alice' is already running \(pid \d+ on ", second.stderr)
        assert "alice: already running elsewhere; nothing was done" in second.stdout
    finally:
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert hashes_at(new_account) == hashes_of(bodies)
    store = Store(pg_url)
    assert [r["outcome"] for r in store.runs(store.find_job("alice"))] == ["ok"]
    store.close()


def test_postgresql_job_lock_dies_with_a_killed_holder(pg_url, old_account, new_account,
                                                       tmp_path):
    from tests.rig.interrupt import fill_many, hashes_at, hashes_of, start_cli, wait_for_copies

    bodies = fill_many(old_account, 2000, seed=41)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)],
                        state_url=pg_url)
    holder = start_cli("run", "-c", str(path), "--no-progress", "--batch-messages", "5")
    wait_for_copies(holder, new_account)
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=10)
    again = run_cli("run", "-c", str(path), "--no-progress")
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert hashes_at(new_account) == hashes_of(bodies)
    store = Store(pg_url)
    assert [r["outcome"] for r in store.runs(store.find_job("alice"))] == ["aborted", "ok"]
    store.close()


def test_hosts_starting_at_once_create_the_schema_once(pg_url):
    """Several workers opening a fresh PostgreSQL state database at the same moment."""
    import threading

    errors, stores = [], []
    barrier = threading.Barrier(6)

    def open_store():
        barrier.wait()
        try:
            stores.append(Store(pg_url))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {s.schema_version() for s in stores} == {SCHEMA_VERSION}
    for s in stores:
        s.close()
