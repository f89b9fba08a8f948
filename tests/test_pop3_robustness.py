"""pop3-archive against servers that misbehave the way real ones do: one bad message
never blocks the rest, reused UIDLs never overwrite or hide mail, a lost state database
never duplicates the archive.  Real Dovecot where it can show the behaviour, the fake
POP3 server (tests/rig/fakepop.py) where it cannot."""

from __future__ import annotations

import collections
import hashlib
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from migrate.endpoints import maildir
from migrate.states import State
from migrate.store import Store
from tests.rig import mailgen
from tests.rig.fakepop import FakePop3
from tests.rig.jobs import run, run_measuring_memory, write_config
from tests.test_pop3_archive import archive_files, hashes, pop_job, server_bodies

WHEN = mailgen.realistic_mailbox(count=1)[0].date


def fake_job(server: FakePop3, archive: Path, **extra) -> dict:
    job = {"name": "legacy", "kind": "pop3-archive", "source": server.job_source(),
           "archive": {"path": str(archive)}}
    job.update(extra)
    return job


def body(tag: str, extra: bytes = b"") -> bytes:
    return (f"Subject: {tag}\r\nMessage-ID: <{tag}@fake.test>\r\n\r\n".encode()
            + extra + f"text of {tag}\r\n.dotted line\r\n".encode())


def rows(tmp_path: Path, job: str = "legacy") -> dict:
    store = Store(f"sqlite:///{tmp_path / 'mailmigrate.db'}")
    try:
        folder = store.folders(store.find_job(job))[0]
        return store.messages(folder.id)
    finally:
        store.close()


@pytest.fixture
def fake():
    servers = []

    def start(messages, **options) -> FakePop3:
        servers.append(FakePop3(messages, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# --- 1. UTF8 (RFC 6856) -----------------------------------------------------------

@pytest.mark.parametrize("offered", [True, False], ids=["offered", "not-offered"])
def test_utf8_is_sent_after_login_exactly_when_offered(offered, fake, tmp_path):
    eight_bit = "Subject: Grüße\r\n\r\nKöln\r\n".encode()
    server = fake({"u1": eight_bit}, utf8=offered)
    result = run(write_config(tmp_path / "c.toml", [fake_job(server, tmp_path / "arch")]))
    assert result.ok, result.errors
    assert archive_files(tmp_path / "arch") == [eight_bit]
    (commands,) = server.sessions
    if offered:
        utf8_at = commands.index(b"UTF8")
        assert commands.index(b"PASS") < utf8_at < commands.index(b"UIDL")
    else:
        assert b"UTF8" not in commands


# --- 2. a file that did not verify leaves new/ ------------------------------------

def test_file_that_does_not_verify_is_removed_from_new(old_account, tmp_path, monkeypatch):
    msgs = [m for m in mailgen.realistic_mailbox(count=40, seed=2, big=False)
            if m.folder == "INBOX"][:6]
    mailgen.fill(old_account, msgs)
    reference = server_bodies(old_account)
    arch = tmp_path / "arch"
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, arch,
                                                      delete_after_verify=True)])
    real_sync = maildir.MaildirArchive.sync
    spoiled = []

    def sync_then_spoil(self):  # a disk that does not give back what was written
        real_sync(self)
        if not spoiled:
            victim = sorted((self.root / "new").iterdir())[0]
            victim.write_bytes(victim.read_bytes()[:-1] + b"X")
            spoiled.append(victim.name)

    monkeypatch.setattr(maildir.MaildirArchive, "sync", sync_then_spoil)
    result = run(path)
    monkeypatch.undo()
    assert result.counts["failed"] == 1 and result.counts["copied"] == len(msgs) - 1
    assert any("does not match what was received" in e and "it stays on the server" in e
               for e in result.errors), result.errors
    assert spoiled[0] not in os.listdir(arch / "new")
    assert len(archive_files(arch)) == len(msgs) - 1
    assert hashes(archive_files(arch)) <= reference  # only verified mail in new/
    assert os.listdir(arch / "tmp") == []
    assert len(mailgen.snapshot(old_account)["INBOX"]) == 1  # the spoiled one stays
    again = run(path)
    assert again.ok, again.errors
    assert again.counts["copied"] == 1 and again.counts["deleted"] == 1
    assert hashes(archive_files(arch)) == reference


# --- 3. a message without a final CRLF --------------------------------------------

def test_message_without_final_crlf_is_archived_as_stored(old_account, tmp_path):
    """Dovecot stores an APPENDed message without a final line break as it is (IMAP
    BODY[] returns it so) but has to add CRLF before POP3's terminating dot: RETR sends
    LIST size + 2 bytes."""
    unterminated = body("no-final-crlf")[:-2]
    ordinary = body("ordinary")
    mailgen.fill(old_account, [mailgen.TestMessage("INBOX", unterminated, (), WHEN),
                               mailgen.TestMessage("INBOX", ordinary, (), WHEN)])
    assert server_bodies(old_account) == hashes([unterminated, ordinary])
    arch = tmp_path / "arch"
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, arch,
                                                      delete_after_verify=True)])
    result = run(path)
    assert result.ok, result.errors
    assert result.counts["copied"] == 2 and result.counts["deleted"] == 2
    assert sorted(archive_files(arch)) == sorted([unterminated, ordinary])
    assert server_bodies(old_account) == collections.Counter()


def test_other_size_differences_are_still_a_mismatch(fake, tmp_path):
    """Only exactly the server-added CRLF is accepted; any other difference from LIST
    fails that message (and leaves no file in new/), the others are archived."""
    server = fake({"u1": body("one"), "u2": body("two"), "u3": body("three")})
    server.list_sizes = {"u2": len(server.messages["u2"]) - 1}
    path = write_config(tmp_path / "c.toml", [fake_job(server, tmp_path / "arch",
                                                       delete_after_verify=True)])
    result = run(path)
    assert result.counts["copied"] == 2 and result.counts["failed"] == 1
    assert any(f"server announced {len(server.messages['u2']) - 1} bytes (LIST) but sent "
               f"{len(server.messages['u2'])}" in e for e in result.errors), result.errors
    assert hashes(archive_files(tmp_path / "arch")) == hashes([body("one"), body("three")])
    assert os.listdir(tmp_path / "arch" / "tmp") == []
    assert list(server.messages) == ["u2"]


# --- 4. a line longer than 8 MB ---------------------------------------------------

def test_nine_mb_line_streams_and_the_others_are_archived(fake, tmp_path):
    huge = body("huge", extra=b"Z" * 9_000_000 + b"\r\n")
    messages = {"u1": body("one"), "u2": huge, "u3": body("three")}
    server = fake(messages, pipelining=True)
    server.warm()  # the server's own copies are made before the measurement
    path = write_config(tmp_path / "c.toml", [fake_job(server, tmp_path / "arch")])
    result, peak = run_measuring_memory(path)
    assert result.ok, result.errors
    assert result.counts["copied"] == 3
    assert hashes(archive_files(tmp_path / "arch")) == hashes(messages.values())
    assert peak < 4_000_000, f"peak Python allocations {peak / 1e6:.1f} MB for a 9 MB line"


# --- 5. a UIDL reused for another message -----------------------------------------

def test_uidl_reused_after_deletion_is_a_new_message(fake, tmp_path):
    first = {"uid-a": body("a"), "uid-b": body("b")}
    server = fake(first)
    arch = tmp_path / "arch"
    path = write_config(tmp_path / "c.toml", [fake_job(server, arch,
                                                       delete_after_verify=True)])
    assert run(path).counts["deleted"] == 2
    assert server.messages == {}
    reused = body("a-new, same UIDL", extra=b"quite different\r\n")
    server.messages["uid-a"] = reused  # the server hands out "uid-a" again
    second = run(path)
    assert second.ok, second.errors
    assert second.counts["copied"] == 1 and second.counts["deleted"] == 1
    assert hashes(archive_files(arch)) == hashes([*first.values(), reused])
    states = {k: r.state for k, r in rows(tmp_path).items()}
    assert states == {"uid-a": State.DELETED, "uid-b": State.DELETED,
                      "uid-a (2)": State.DELETED}


def test_uidl_renumbered_to_another_message_overwrites_nothing(fake, tmp_path):
    old = {"uid-a": body("a"), "uid-c": body("c")}
    server = fake(old)
    arch = tmp_path / "arch"
    path = write_config(tmp_path / "c.toml", [fake_job(server, arch)])
    assert run(path).counts["copied"] == 2
    stored = {p.name: p.read_bytes() for p in (arch / "new").iterdir()}
    other = body("another message under uid-c", extra=b"longer than the first\r\n")
    server.messages["uid-c"] = other  # a server that renumbered: same UIDL, other mail
    second = run(path)
    assert second.counts["copied"] == 1, second.errors
    assert second.counts["vanished"] == 1  # the original of uid-c is gone from the server
    for name, content in stored.items():  # nothing archived before was touched
        assert (arch / "new" / name).read_bytes() == content
    assert hashes(archive_files(arch)) == hashes([*old.values(), other])
    # and a run with deletion deletes the new message, never the wrong one
    path = write_config(tmp_path / "c.toml", [fake_job(server, arch,
                                                       delete_after_verify=True)])
    third = run(path)
    assert third.ok, third.errors
    assert sorted(server.deleted) == ["uid-a", "uid-c"] and server.messages == {}


def test_a_different_file_under_the_same_name_is_never_replaced(fake, tmp_path):
    content = body("a")
    server = fake({"uid-a": content})
    arch = tmp_path / "arch"
    (arch / "new").mkdir(parents=True)
    name = maildir.file_name("legacy", "uid-a", hashlib.sha256(content).hexdigest())
    (arch / "new" / name).write_bytes(b"someone else's file\r\n")
    result = run(write_config(tmp_path / "c.toml", [fake_job(server, arch)]))
    assert result.ok, result.errors
    assert (arch / "new" / name).read_bytes() == b"someone else's file\r\n"
    assert hashes(archive_files(arch)) == hashes([b"someone else's file\r\n", content])
    assert rows(tmp_path)["uid-a"].destination_path == f"new/{name}".replace(
        maildir.SUFFIX, "-1" + maildir.SUFFIX)


# --- 6. a lost state database, another host name, old file names --------------------

def test_lost_state_database_and_new_host_name_duplicate_nothing(old_account, tmp_path):
    msgs = [m for m in mailgen.realistic_mailbox(count=40, seed=6, big=False)
            if m.folder == "INBOX"][:8]
    mailgen.fill(old_account, msgs)
    reference = server_bodies(old_account)
    arch = tmp_path / "arch"
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, arch)])
    assert run(path).counts["copied"] == len(msgs)
    names = sorted(os.listdir(arch / "new"))
    read = arch / "new" / names[0]  # read by a mail client meanwhile
    read.rename(arch / "cur" / (names[0] + ":2,S"))
    for p in tmp_path.glob("mailmigrate.db*"):
        p.unlink()
    # the re-run happens on a host with another name
    proc = subprocess.run(
        ["unshare", "--uts", "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh",
         "archive-host-2", sys.executable, "-m", "migrate", "run", "-c", str(path),
         "--no-progress"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"0 archived, {len(msgs)} skipped as duplicates" in proc.stdout
    assert sorted(os.listdir(arch / "new")) == names[1:]
    assert os.listdir(arch / "cur") == [names[0] + ":2,S"]
    assert {r.state for r in rows(tmp_path, "archive").values()} == {State.VERIFIED}
    assert server_bodies(old_account) == reference  # keep-on-server: nothing deleted
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, arch,
                                                      delete_after_verify=True)])
    last = run(path)
    assert last.ok, last.errors
    assert last.counts["deleted"] == len(msgs) and last.counts.get("copied", 0) == 0
    assert hashes(archive_files(arch)) == reference
    assert server_bodies(old_account) == collections.Counter()


def test_old_format_file_names_are_still_found(old_account, tmp_path):
    """Files written by the earlier naming scheme ("<first seen>.M<hash>.<host>") are
    found by the path the state database recorded, in new/ and (read) in cur/."""
    msgs = [m for m in mailgen.realistic_mailbox(count=40, seed=8, big=False)
            if m.folder == "INBOX"][:5]
    mailgen.fill(old_account, msgs)
    reference = server_bodies(old_account)
    arch = tmp_path / "arch"
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, arch)])
    assert run(path).counts["copied"] == len(msgs)
    db = sqlite3.connect(tmp_path / "mailmigrate.db")
    for n, (row_id, key, relpath) in enumerate(db.execute(
            "SELECT id, source_key, destination_path FROM messages").fetchall()):
        digest = hashlib.sha256(f"archive\0{key}".encode()).hexdigest()[:32]
        old_name = f"1700000000.M{digest}.oldhost"
        target = f"cur/{old_name}:2,S" if n == 0 else f"new/{old_name}"
        os.rename(arch / relpath, arch / target)
        db.execute("UPDATE messages SET destination_path = ? WHERE id = ?",
                   (f"new/{old_name}", row_id))
    db.commit()
    db.close()
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, arch,
                                                      delete_after_verify=True)])
    result = run(path)
    assert result.ok, result.errors
    assert result.counts["deleted"] == len(msgs) and result.counts.get("copied", 0) == 0
    assert all(".oldhost" in name for sub in ("new", "cur") for name in os.listdir(arch / sub))
    assert hashes(archive_files(arch)) == reference


# --- 7. one bad message never blocks the rest -------------------------------------

@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_bad_messages_are_isolated_and_the_others_archived(pipelining, fake, tmp_path):
    good = {f"ok-{i}": body(f"ok {i}") for i in range(1, 6)}
    messages = {"ok-1": good["ok-1"], "refused": body("refused"), "empty": b"",
                "ok-2": good["ok-2"], "poison": body("poison"), "ok-3": good["ok-3"],
                "ok-4": good["ok-4"], "ok-5": good["ok-5"]}
    server = fake(messages, pipelining=pipelining)
    server.refuse_retr = {"refused"}
    server.drop_on_retr = {"poison"}
    arch = tmp_path / "arch"
    path = write_config(tmp_path / "c.toml", [fake_job(server, arch,
                                                       delete_after_verify=True)])
    result = run(path)
    assert result.counts["copied"] == 6 and result.counts["failed"] == 2
    assert hashes(archive_files(arch)) == hashes([*good.values(), b""])
    assert any("refused: -ERR cannot read this message" in e and "stays on the server"
               in e for e in result.errors), result.errors
    assert any("message poison" in e and "the server dropped the connection each time "
               "this message was retrieved (3 attempts)" in e for e in result.errors)
    assert any("message empty is empty on the server (0 bytes)" in w
               for w in result.warnings), result.warnings
    assert server.retrieved("poison") == 3
    assert sorted(server.messages) == ["poison", "refused"]  # the rest was deleted
    state = rows(tmp_path)
    assert state["poison"].state == State.FAILED
    assert "dropped the connection" in state["poison"].last_error
    assert state["refused"].state == State.FAILED
    assert os.listdir(arch / "tmp") == []
    # the next run tries the two again and leaves everything else alone
    server.refuse_retr = set()
    again = run(path)
    assert again.counts["copied"] == 1 and again.counts["failed"] == 1
    assert server.retrieved("refused") == 2
    assert sorted(server.messages) == ["poison"]


def test_unreachable_server_still_ends_the_job(fake, tmp_path):
    """Isolating messages must not turn a dead server into an endless loop."""
    server = fake({"u1": body("one")})
    job = fake_job(server, tmp_path / "arch")
    server.close()
    result = run(write_config(tmp_path / "c.toml", [job]))
    assert not result.ok
    assert any("cannot connect to POP3 server" in e for e in result.errors), result.errors


@pytest.mark.parametrize("buffer_size", [1, 3, 7, 64, 4096, 1 << 16])
def test_multiline_reader_streams_long_lines_exactly(buffer_size, monkeypatch):
    """The long-line path (no CRLF in the look-ahead) must unstuff and find the end
    exactly like the line path: lines around the threshold, dots and CRs at every
    boundary."""
    import io

    from migrate.endpoints import pop3

    monkeypatch.setattr(pop3, "LONG_LINE", 16)
    rng = random.Random(buffer_size)
    lines = [b"." * 40, b"x" * 15 + b"\r" + b"y" * 30, b"..", b"", b"." + b"\r" * 20]
    lines += [bytes(rng.choice(b"..ab\r") for _ in range(rng.randrange(60)))
              for _ in range(300)]
    lines = [line.rstrip(b"\r") for line in lines]  # a CR before CRLF is no line end
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                       for line in lines)
    reader = io.BufferedReader(io.BytesIO(stuffed + b".\r\n+OK next\r\n"),
                               buffer_size=buffer_size)
    pieces: list[bytes] = []
    assert pop3._read_multiline(reader, pieces.append) == len(message)
    assert b"".join(pieces) == message
    assert reader.read() == b"+OK next\r\n"
