"""The same jobs with the state in PostgreSQL; secrets stay out of output and state."""

from __future__ import annotations

import collections

from migrate.store import Store
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
