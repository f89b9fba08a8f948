"""The state store on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import create_engine, text

from migrate.errors import SafetyError, StateError
from migrate.states import TRANSITIONS, State, can_move, sources_of
from migrate.store import SCHEMA_VERSION, Store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = Store(url)
    yield s
    s.close()


def _message(store, name="INBOX", n=3):
    job_id = store.ensure_job("alice", "imap-copy")
    folder = store.upsert_folder(job_id, name, name.replace(".", "/"), 42)
    ids = store.add_messages(folder.id, [
        {"source_key": f"42:{i}", "source_uidvalidity": 42, "source_uid": i, "size": 100 + i,
         "message_id": f"<m{i}@x>", "flags": ["\\Seen", "$Label1"]} for i in range(1, n + 1)])
    return job_id, folder, ids


def test_schema_version_recorded(store):
    assert store.schema_version() == SCHEMA_VERSION


def test_sqlite_uses_wal(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'x.db'}")
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    s.close()


def test_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    Store(url).close()
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("UPDATE meta SET value = '99' WHERE key = 'schema_version'"))
    eng.dispose()
    with pytest.raises(StateError, match="has schema version 99, but this mailmigrate "
                                         f"understands up to {SCHEMA_VERSION}; upgrade "
                                         "mailmigrate"):
        Store(url)


def test_messages_roundtrip_and_idempotent_add(store):
    _, folder, ids = _message(store)
    assert len(ids) == 3
    again = store.add_messages(folder.id, [{"source_key": "42:1", "size": 1}])
    assert again == {"42:1": ids["42:1"]}
    rows = store.messages(folder.id)
    assert rows["42:2"].state == State.SEEN
    assert rows["42:2"].flags == frozenset({"\\Seen", "$Label1"})
    assert rows["42:2"].message_id == "<m2@x>" and rows["42:2"].size == 102


def test_transitions_follow_the_state_machine(store):
    _, folder, ids = _message(store)
    a = ids["42:1"]
    store.transition(State.APPENDING, [{"id": a, "sha256": "ab" * 32}])
    store.apply([(State.COPIED, [{"id": a, "destination_uidvalidity": 7,
                                  "destination_uid": 11}], False),
                 (State.VERIFIED, [{"id": a}], False)])
    row = store.messages(folder.id)["42:1"]
    assert row.state == State.VERIFIED and row.destination_uid == 11
    assert row.sha256 == "ab" * 32 and row.verified_at is not None
    # compare-and-set: a verified message cannot go back to appending
    with pytest.raises(StateError, match="state conflict"):
        store.transition(State.APPENDING, [{"id": a}])
    # seen → deleting is not allowed: only verified messages may be deleted
    with pytest.raises(StateError):
        store.transition(State.DELETING, [{"id": ids["42:2"]}])
    assert store.messages(folder.id)["42:2"].state == State.SEEN


def test_apply_is_one_transaction(store):
    _, folder, ids = _message(store)
    with pytest.raises(StateError):
        store.apply([(State.APPENDING, [{"id": ids["42:1"]}], False),
                     (State.DELETED, [{"id": ids["42:2"]}], False)])
    assert store.messages(folder.id)["42:1"].state == State.SEEN  # rolled back


def test_failed_bumps_attempts_and_records_error(store):
    _, folder, ids = _message(store)
    store.transition(State.FAILED, [{"id": ids["42:3"], "last_error": "quota exceeded"}],
                     bump_attempts=True)
    row = store.messages(folder.id)["42:3"]
    assert row.state == State.FAILED and row.attempts == 1


def test_protocol_binding(store):
    server = ["cert:aa11", "name:mail.old.example", "ip:192.0.2.7"]
    first = store.bind_mailbox(server, "Mail.Old.Example:993", "Alice@old.example", "imap",
                               "alice")
    assert first.protocol == "imap" and first.host == "mail.old.example:993"
    # the same server under another name (only the certificate in common) is the same mailbox
    assert store.bind_mailbox(["cert:aa11", "ip:127.0.0.1:10995"], "localhost:10995",
                              "alice@old.example", "imap", "other").bound_by_job == "alice"
    with pytest.raises(SafetyError) as info:
        store.bind_mailbox(["ip:192.0.2.7"], "192.0.2.7:995", "alice@old.example", "pop3",
                           "alice-pop")
    text_ = str(info.value)
    assert "bound to IMAP by job 'alice' since" in text_
    assert "a POP3 client deletes mail" in text_
    assert "mailmigrate unbind alice@old.example --host mail.old.example:993" in text_
    # a dry run only checks: it is refused the same way and writes nothing
    with pytest.raises(SafetyError):
        store.bind_mailbox(["cert:aa11"], "x:1", "alice@old.example", "pop3", "p",
                           check_only=True)
    assert store.bind_mailbox(["cert:ffff"], "x:1", "alice@old.example", "pop3", "p",
                              check_only=True) is None
    # a different server (another certificate, a loopback tunnel) is another mailbox
    assert store.bind_mailbox(["cert:bb22", "ip:127.0.0.1:20995"], "127.0.0.1:20995",
                              "alice@old.example", "pop3", "tunnel").protocol == "pop3"
    assert store.unbind("alice@old.example", "mail.old.example")  # the host part is enough
    assert store.bind_mailbox(["name:mail.old.example"], "mail.old.example:995",
                              "alice@old.example", "pop3", "p").protocol == "pop3"


def test_second_reader_of_a_mailbox_that_one_job_deletes_from_is_refused(store):
    for name in ("copy", "archive", "mirror"):
        store.ensure_job(name, "imap-copy")
    server = ["cert:aa11"]
    store.bind_mailbox(server, "h:993", "bob@old.example", "imap", "copy", deletes=True)
    with pytest.raises(SafetyError) as info:
        store.bind_mailbox(server, "h:993", "bob@old.example", "imap", "archive")
    assert "jobs 'archive' and 'copy' both read mailbox bob@old.example" in str(info.value)
    assert "'copy' deletes from it" in str(info.value)
    # the job itself may run again, and without deletion two readers are fine
    store.bind_mailbox(server, "h:993", "bob@old.example", "imap", "copy", deletes=False)
    store.bind_mailbox(server, "h:993", "bob@old.example", "imap", "archive")
    with pytest.raises(SafetyError, match="'mirror' deletes from it"):
        store.bind_mailbox(server, "h:993", "bob@old.example", "imap", "mirror", deletes=True)


def test_runs_are_recorded(store):
    job_id = store.ensure_job("alice", "imap-copy")
    run_id = store.start_run(job_id, dry_run=False)
    store.finish_run(run_id, "ok", {"copied": 5, "bytes": 12345})
    (run,) = store.runs(job_id)
    assert run["outcome"] == "ok" and run["copied"] == 5 and run["bytes"] == 12345
    assert run["ended_at"] >= run["started_at"]


def test_clock_is_injectable(tmp_path):
    fixed = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    s = Store(f"sqlite:///{tmp_path / 'c.db'}", clock=lambda: fixed)
    _, folder, ids = _message(s)
    s.apply([(State.APPENDING, [{"id": ids["42:1"]}], False),
             (State.COPIED, [{"id": ids["42:1"]}], False),
             (State.VERIFIED, [{"id": ids["42:1"]}], False)])
    assert s.messages(folder.id)["42:1"].verified_at == fixed
    s.close()


def test_state_machine_table_is_consistent():
    assert all(isinstance(t, frozenset) for t in TRANSITIONS.values())
    assert sources_of(State.DELETING) == {State.VERIFIED}
    assert not can_move(State.SEEN, State.DELETED)
    assert not TRANSITIONS[State.DELETED]
    # from verified only to deletion, vanished, or failed (copy gone before deletion)
    assert TRANSITIONS[State.VERIFIED] == {State.DELETING, State.VANISHED, State.FAILED}


def test_unreachable_database_is_a_clear_error(tmp_path):
    with pytest.raises(StateError, match="cannot open state database"):
        Store(f"sqlite:///{tmp_path}/no/such/dir/x.db")


def test_version_1_database_is_upgraded_and_keeps_its_bindings(tmp_path):
    """A state database written by the previous release: its tables gain the new columns
    and its host-name bindings keep refusing the other protocol."""
    import sqlite3

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE mailboxes (id INTEGER PRIMARY KEY, host VARCHAR(255) NOT NULL,
            username VARCHAR(320) NOT NULL, protocol VARCHAR(8) NOT NULL,
            bound_by_job VARCHAR(200) NOT NULL, bound_at DATETIME NOT NULL,
            CONSTRAINT uq_mailbox UNIQUE (host, username));
        INSERT INTO mailboxes VALUES (1, 'mail.old.example', 'alice@old.example', 'imap',
            'alice', '2026-01-02 03:04:05');
        CREATE TABLE jobs (id INTEGER PRIMARY KEY, name VARCHAR(200) NOT NULL UNIQUE,
            kind VARCHAR(32) NOT NULL, mailbox_id INTEGER REFERENCES mailboxes(id),
            created_at DATETIME NOT NULL);
        INSERT INTO jobs VALUES (1, 'alice', 'imap-copy', 1, '2026-01-02 03:04:05');
        CREATE TABLE runs (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs(id),
            started_at DATETIME NOT NULL, ended_at DATETIME, outcome VARCHAR(16) NOT NULL,
            dry_run BOOLEAN NOT NULL, hostname VARCHAR(255) NOT NULL, pid INTEGER NOT NULL,
            folders INTEGER NOT NULL, copied INTEGER NOT NULL, skipped INTEGER NOT NULL,
            flags_updated INTEGER NOT NULL, deleted INTEGER NOT NULL, failed INTEGER NOT NULL,
            vanished INTEGER NOT NULL, bytes BIGINT NOT NULL, error TEXT);
        CREATE TABLE folders (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs(id),
            source_name TEXT NOT NULL, destination_name TEXT NOT NULL, uidvalidity BIGINT,
            destination_uidvalidity BIGINT, updated_at DATETIME NOT NULL,
            CONSTRAINT uq_folder UNIQUE (job_id, source_name));
        CREATE TABLE messages (id INTEGER PRIMARY KEY,
            folder_id INTEGER NOT NULL REFERENCES folders(id), source_key VARCHAR(512) NOT NULL,
            source_uidvalidity BIGINT, source_uid BIGINT, size BIGINT NOT NULL,
            message_id TEXT, sha256 VARCHAR(64), flags TEXT NOT NULL, internaldate DATETIME,
            destination_uidvalidity BIGINT, destination_uid BIGINT, destination_path TEXT,
            state VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, last_error TEXT,
            first_seen_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
            verified_at DATETIME, deleted_at DATETIME,
            CONSTRAINT uq_message UNIQUE (folder_id, source_key));
        INSERT INTO folders VALUES (1, 1, 'INBOX', 'INBOX', 7, 9, '2026-01-02 03:04:05');
        INSERT INTO messages VALUES (1, 1, '7:1', 7, 1, 100, NULL, NULL, '', NULL, 9, 3,
            NULL, 'verified', 0, NULL, '2026-01-02 03:04:05', '2026-01-02 03:04:05',
            '2026-01-02 03:04:05', NULL);
    """)
    db.close()
    store = Store(f"sqlite:///{path}")
    try:
        assert store.schema_version() == SCHEMA_VERSION
        (row,) = store.messages(1).values()
        assert row.state == State.VERIFIED and row.destination_size is None
        with pytest.raises(SafetyError, match="bound to IMAP by job 'alice'"):
            store.bind_mailbox(["name:mail.old.example", "cert:ab"], "mail.old.example:995",
                               "alice@old.example", "pop3", "alice-pop")
        run_id = store.start_run(1, dry_run=False)
        store.finish_run(run_id, "ok", {"quarantined": 2})
        assert store.runs(1)[-1]["quarantined"] == 2
    finally:
        store.close()


def test_folder_status_roundtrip_and_unsettled_folders(store):
    """Schema 4: a saved STATUS pair comes back as saved; a folder holding unfinished
    messages of its current UIDVALIDITY is unsettled, other states and older UIDVALIDITYs
    are not."""
    job_id, folder, ids = _message(store)
    assert store.saved_statuses(job_id) == {}
    store.save_folder_status(folder.id, (42, 4, 3, 17), (9, 4, 3, None), True)
    saved = store.saved_statuses(job_id)["INBOX"]
    assert (saved.folder_id, saved.destination_name, saved.source, saved.destination,
            saved.settled) == \
        (folder.id, "INBOX", (42, 4, 3, 17), (9, 4, 3, None), True)
    store.save_folder_status(folder.id, (42, 5, 4, 18), (9, 5, 4, 2), False)
    assert store.saved_statuses(job_id)["INBOX"].source == (42, 5, 4, 18)
    assert store.unsettled_folders(job_id, [State.SEEN]) == {folder.id}
    assert store.unsettled_folders(job_id, [State.FAILED]) == set()
    store.upsert_folder(job_id, "INBOX", "INBOX", 43)  # the source folder was re-created
    assert store.unsettled_folders(job_id, [State.SEEN]) == set()
    store.forget_folder_status(folder.id)
    assert store.saved_statuses(job_id) == {}


def test_version_3_database_is_upgraded_to_4_in_place(tmp_path):
    """A schema 3 database (no folder_status table) keeps its messages and gains the
    table; no folder has a saved status, so the first run lists every folder."""
    from sqlalchemy import inspect

    url = f"sqlite:///{tmp_path / 'v3.db'}"
    s = Store(url)
    job_id, folder, ids = _message(s)
    s.close()
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("DROP TABLE folder_status"))
        conn.execute(text("DROP INDEX ix_messages_folder_uid"))
        conn.execute(text("UPDATE meta SET value = '3' WHERE key = 'schema_version'"))
    assert "folder_status" not in inspect(eng).get_table_names()
    s = Store(url)
    try:
        assert s.schema_version() == SCHEMA_VERSION == 4
        assert "folder_status" in inspect(eng).get_table_names()
        assert "ix_messages_folder_uid" in {ix["name"] for ix in inspect(eng).get_indexes(
            "messages")}
        assert set(s.messages_in_uid_range(folder.id, 42, 2, None)) == {"42:2", "42:3"}
        assert set(s.messages_in_uid_range(folder.id, 42, 1, 2)) == {"42:1", "42:2"}
        assert s.messages_in_uid_range(folder.id, 41, 1, None) == {}
        assert len(s.messages(folder.id)) == 3
        assert s.saved_statuses(job_id) == {}
        s.save_folder_status(folder.id, (42, 4, 3, None), (9, 4, 3, None), True)
        assert s.saved_statuses(job_id)["INBOX"].settled
    finally:
        s.close()
        eng.dispose()
