"""Seeing what happens: run --json, --log-file, and the read-only status / failed commands
(against a state database left by real Dovecot runs, or one built here)."""

from __future__ import annotations

import datetime as dt
import json
import random
import re

import pytest

from migrate.errors import EXIT_FAILED, EXIT_OK, JobLocked
from migrate.states import State
from migrate.store import SCHEMA_VERSION, Store
from tests.rig import mailgen
from tests.rig.interrupt import fill_many
from tests.rig.jobs import imap_job, run_cli, write_config

RUN_JOB_KEYS = {"name", "kind", "dry_run", "outcome", "exit_code", "counts", "bytes",
                "seconds", "errors", "warnings"}


def _with_one_refused_message(old_account, new_host, seed):
    """Six small messages and one the destination refuses (over its size limit)."""
    dest = new_host.add_user(f"small-mails-{seed}@new.test", f"pw-small-{seed}",
                             quota_max_mail_size="3000")
    fill_many(old_account, 6, seed=seed)
    big, _ = mailgen.make_message(random.Random(seed), 99, size=6000)
    client = mailgen.connect(old_account)
    try:
        client.append("INBOX", big)
    finally:
        client.logout()
    return dest


def test_run_json_is_one_document_with_the_documented_keys(old_account, new_host,
                                                           new_account, tmp_path):
    dest = _with_one_refused_message(old_account, new_host, seed=81)
    wrong = imap_job("bob", old_account, new_account)
    wrong["source"]["password"] = "wrong-secret-Pw-8181"
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, dest), wrong])
    proc = run_cli("run", "-c", str(path), "--json")
    assert proc.returncode == EXIT_FAILED, proc.stderr
    doc = json.loads(proc.stdout)  # stdout holds the document and nothing else
    assert doc["schema"] == "mailmigrate.run/1" and doc["exit_code"] == EXIT_FAILED
    dt.datetime.fromisoformat(doc["generated_at"])
    alice, bob = doc["jobs"]
    assert set(alice) >= RUN_JOB_KEYS and set(bob) >= RUN_JOB_KEYS
    assert (alice["name"], alice["kind"], alice["outcome"]) == ("alice", "imap-copy", "failed")
    assert alice["counts"]["copied"] == 6 and alice["counts"]["failed"] == 1
    assert alice["bytes"] > 6 * 800 and alice["seconds"] > 0
    (group,) = alice["errors"]
    assert group["count"] == 1 and "refused" in group["examples"][0]
    assert set(group) == {"pattern", "count", "examples"}
    assert bob["outcome"] == "failed" and "login" in bob["errors"][0]["examples"][0].lower()
    assert doc["totals"]["jobs"] == 2 and doc["totals"]["counts"]["copied"] == 6
    assert doc["totals"]["outcomes"] == {"failed": 2}
    for secret in ("wrong-secret-Pw-8181", old_account.password, dest.password):
        assert secret not in proc.stdout and secret not in proc.stderr
    # the errors still reach stderr for cron mail; no summary lines on stdout
    assert "mailmigrate: error: bob: " in proc.stderr
    assert "FAILED —" not in proc.stdout

    # same outcome, same exit code as without --json
    again = run_cli("run", "-c", str(path), "--job", "alice", "--json")
    text = run_cli("run", "-c", str(path), "--job", "alice")
    assert again.returncode == text.returncode == EXIT_FAILED
    assert json.loads(again.stdout)["jobs"][0]["counts"]["copied"] == 0


def test_run_json_when_everything_is_fine_exits_0(old_account, new_account, tmp_path):
    fill_many(old_account, 3, seed=82)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account,
                                                       folders={"include": ["INBOX"]})])
    proc = run_cli("run", "-c", str(path), "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["exit_code"] == 0 and doc["jobs"][0]["outcome"] == "ok"
    assert doc["jobs"][0]["errors"] == [] and doc["totals"]["outcomes"] == {"ok": 1}


def test_run_json_after_sigterm_exits_143_with_interrupted_and_not_started_jobs(
        old_account, new_account, tmp_path):
    import signal
    import subprocess

    from tests.rig.interrupt import start_cli, wait_for_copies

    fill_many(old_account, 3000, seed=85)
    path = write_config(tmp_path / "c.toml", [
        imap_job("alice", old_account, new_account),
        imap_job("bob", old_account, new_account, folders={"include": ["INBOX"]})])
    proc = start_cli("run", "-c", str(path), "--json", "--batch-messages", "5")
    wait_for_copies(proc, new_account)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("still copying 30 s after SIGTERM") from None
    assert proc.returncode == 128 + signal.SIGTERM, err
    doc = json.loads(out)
    assert doc["exit_code"] == 128 + signal.SIGTERM
    assert [(j["name"], j["outcome"]) for j in doc["jobs"]] == [
        ("alice", "interrupted"), ("bob", "not started")]
    assert 0 < doc["jobs"][0]["counts"]["copied"] < 3000


def test_log_file_has_timestamped_job_lines_appends_and_holds_no_secret(
        old_account, new_account, tmp_path):
    fill_many(old_account, 4, seed=83)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    log_file = tmp_path / "logs" / "mailmigrate.log"
    log_file.parent.mkdir()
    first = run_cli("run", "-c", str(path), "--no-progress", "--log-file", str(log_file))
    assert first.returncode == EXIT_OK, first.stderr
    assert first.stderr == ""  # INFO goes to the file, not to stderr without -v
    second = run_cli("run", "-c", str(path), "--no-progress", "--log-file", str(log_file))
    assert second.returncode == EXIT_OK
    lines = log_file.read_text().splitlines()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] (INFO|WARNING|ERROR) "
    assert all(re.match(stamp, line) for line in lines), lines
    assert sum("run started: " in line for line in lines) == 2  # appended, not replaced
    assert any(re.search(r"INFO alice: folder 'INBOX' → 'INBOX': 4 messages", line)
               for line in lines), lines
    assert any(re.search(r"INFO alice: \d+ folders?, 4 copied", line) for line in lines)
    assert any(re.search(r"INFO alice: \d+ folders?, 0 copied", line) for line in lines)
    assert lines[-1].endswith("INFO run ended: exit code 0")
    assert "batch of" not in log_file.read_text()  # DEBUG only with -vv
    for secret in (old_account.password, new_account.password):
        assert secret not in log_file.read_text()


def test_status_and_failed_after_a_refused_message(old_account, new_host, tmp_path):
    dest = _with_one_refused_message(old_account, new_host, seed=84)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, dest)])
    assert run_cli("run", "-c", str(path), "--no-progress").returncode == EXIT_FAILED
    db = tmp_path / "mailmigrate.db"
    before = db.stat().st_mtime_ns

    proc = run_cli("status", "-c", str(path), "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "mailmigrate.status/1" and doc["database_exists"]
    (job,) = doc["jobs"]
    assert job["last_run"]["outcome"] == "failed"
    assert job["last_run"]["counts"]["copied"] == 6 and job["last_run"]["ended_at"]
    assert job["messages"]["verified"] == 6 and job["messages"]["failed"] == 1
    assert job["bytes_verified"] == job["bytes"]["verified"] > 6 * 800
    assert job["binding"] == {"protocol": "imap", "username": old_account.username,
                              "server": job["binding"]["server"]}
    assert job["running"] is False and job["running_run"] is None
    (top,) = job["top_errors"]
    assert top["count"] == 1 and "refused" in top["examples"][0]

    text = run_cli("status", "-c", str(path))
    assert text.returncode == EXIT_OK
    assert "alice (imap-copy):" in text.stdout and "running now: no" in text.stdout
    assert "6 verified" in text.stdout and "1 failed" in text.stdout
    assert f"{old_account.username} at " in text.stdout and "bound to IMAP" in text.stdout

    failed = run_cli("failed", "-c", str(path), "--json")
    assert failed.returncode == EXIT_OK
    listed = json.loads(failed.stdout)
    assert listed["schema"] == "mailmigrate.failed/1"
    (msg,) = listed["messages"]
    assert msg["job"] == "alice" and msg["folder"] == "INBOX" and msg["state"] == "failed"
    assert msg["uid"] == 7 and msg["size"] > 6000 and msg["message_id"].startswith("<m99.")
    assert msg["attempts"] == 1 and "refused" in msg["last_error"]
    table = run_cli("failed", "-c", str(path)).stdout.splitlines()
    assert table[0].split()[:3] == ["JOB", "FOLDER", "UID/UIDL"]
    assert table[1].startswith("alice") and msg["message_id"] in table[1]
    assert table[-1] == "1 failed or quarantined message"
    assert db.stat().st_mtime_ns == before  # read-only
    for secret in (old_account.password, dest.password):
        assert secret not in proc.stdout + text.stdout + failed.stdout


# --- plain SQLite state databases -----------------------------------------------------

CONFIG = """
[[jobs]]
name = "{name}"
kind = "imap-copy"
[jobs.source]
host = "old.example"
username = "{name}@old.example"
password = "src-secret-Pw"
[jobs.destination]
host = "new.example"
username = "{name}@new.example"
password = "dst-secret-Pw"
"""


def _config(tmp_path, *names, state_url=None):
    path = tmp_path / "c.toml"
    head = f'[state]\nurl = "{state_url}"\n' if state_url else ""
    path.write_text(head + "".join(CONFIG.format(name=n) for n in names))
    return path


def test_status_without_a_state_database_creates_nothing(tmp_path):
    path = _config(tmp_path, "alice")
    proc = run_cli("status", "-c", str(path))
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.startswith("no runs yet (state database ")
    doc = json.loads(run_cli("status", "-c", str(path), "--json").stdout)
    assert doc["database_exists"] is False and doc["jobs"][0]["recorded"] is False
    failed = run_cli("failed", "-c", str(path))
    assert failed.returncode == EXIT_OK and failed.stdout.startswith("no runs yet")
    assert json.loads(run_cli("failed", "-c", str(path), "--json").stdout)["messages"] == []
    assert list(tmp_path.iterdir()) == [path]


def _fill(store, job, n_verified, errors):
    job_id = store.ensure_job(job, "imap-copy")
    folder = store.upsert_folder(job_id, "INBOX", "INBOX", 42)
    rows = [{"source_key": f"42:{i}", "source_uid": i, "size": 1000 + i,
             "message_id": f"<m{i}@x>"} for i in range(1, n_verified + len(errors) + 1)]
    ids = store.add_messages(folder.id, rows)
    ordered = [ids[r["source_key"]] for r in rows]
    store.apply([(State.COPIED, [{"id": i} for i in ordered[:n_verified]], False),
                 (State.VERIFIED, [{"id": i} for i in ordered[:n_verified]], False)])
    store.transition(State.FAILED, [{"id": i, "last_error": e}
                                    for i, e in zip(ordered[n_verified:], errors,
                                                    strict=True)], bump_attempts=True)
    return job_id


def test_status_groups_errors_and_sees_a_run_in_progress(tmp_path):
    path = _config(tmp_path, "alice", "bob")
    store = Store(f"sqlite:///{tmp_path / 'mailmigrate.db'}")
    errors = [f"message UID {u}: destination refused the message: [OVERQUOTA] {u} bytes"
              for u in range(11, 21)] + ["message UID 30: connection lost"] * 2
    job_id = _fill(store, "alice", 5, errors)
    run_id = store.start_run(job_id, dry_run=False)
    try:
        with store.job_lock("alice"):
            doc = json.loads(run_cli("status", "-c", str(path), "--json").stdout)
            text = run_cli("status", "-c", str(path), "--job", "alice").stdout
        alice, bob = doc["jobs"]
        assert alice["running"] is True and alice["running_run"]["pid"] > 0
        assert alice["last_run"]["outcome"] == "running"
        assert re.search(r"running now: yes \(pid \d+ on ", text), text
        assert "bob" not in text
        assert alice["messages"]["verified"] == 5 and alice["messages"]["failed"] == 12
        assert alice["bytes_verified"] == sum(1000 + i for i in range(1, 6))
        counts = [(g["count"], g["pattern"]) for g in alice["top_errors"]]
        assert counts == [
            (10, "message UID #: destination refused the message: [OVERQUOTA] # bytes"),
            (2, "message UID #: connection lost")]
        assert "    10 × message UID " in text
        assert bob["recorded"] is False
        # the lock is gone, the row still says running: a killed run
        after = json.loads(run_cli("status", "-c", str(path), "--json").stdout)["jobs"][0]
        assert after["running"] is False and after["running_run"]["outcome"] == "running"
        assert "holds no lock" in run_cli("status", "-c", str(path)).stdout
        failed = json.loads(run_cli("failed", "-c", str(path), "--json").stdout)["messages"]
        assert [m["uid"] for m in failed] == list(range(6, 18))
        assert {m["attempts"] for m in failed} == {1}
    finally:
        store.finish_run(run_id, "ok", {})
        store.close()


def test_status_on_postgresql_sees_the_advisory_lock_without_taking_it(pg_url, tmp_path):
    path = _config(tmp_path, "alice", state_url=pg_url)
    empty = json.loads(run_cli("status", "-c", str(path), "--json").stdout)
    assert empty["database_exists"] is False  # an empty database: no schema created
    store = Store(pg_url)
    try:
        _fill(store, "alice", 3, ["message UID 9: connection lost"])
        with store.job_lock("alice"):
            proc = run_cli("status", "-c", str(path), "--json")
            with pytest.raises(JobLocked):  # status neither took nor broke the lock
                with store.job_lock("alice"):
                    pass
        after = json.loads(run_cli("status", "-c", str(path), "--json").stdout)["jobs"][0]
    finally:
        store.close()
    assert proc.returncode == EXIT_OK, proc.stderr
    job = json.loads(proc.stdout)["jobs"][0]
    assert job["running"] is True and job["messages"]["verified"] == 3
    assert job["top_errors"][0]["count"] == 1
    assert after["running"] is False


def test_schema_3_adds_the_status_index_to_an_older_database(tmp_path):
    from sqlalchemy import create_engine, inspect, text

    url = f"sqlite:///{tmp_path / 'x.db'}"
    Store(url).close()
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("DROP INDEX ix_messages_folder_state_size"))
        conn.execute(text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
    store = Store(url)
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    names = {ix["name"] for ix in inspect(eng).get_indexes("messages")}
    eng.dispose()
    assert "ix_messages_folder_state_size" in names
