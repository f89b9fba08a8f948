"""The tool against a real Courier IMAP/POP3 5.0 (tests/rig/courier.py): imap-copy
Dovecot → Courier and Courier → Dovecot, pop3-archive from Courier; every message
byte-identical with its flags and INTERNALDATE, and a re-run adds nothing."""

from __future__ import annotations

import collections
import hashlib
import random

from tests.rig import mailgen
from tests.rig.courier import courier_account, courier_host  # noqa: F401
from tests.rig.jobs import imap_job, run, write_config
from tests.rig.streaming import large_messages_stream_through


def content(listing):
    """Folder → multiset of (sha256, flags, INTERNALDATE) — what must survive a copy."""
    return {folder: collections.Counter((m.sha256, m.flags, m.internaldate) for m in msgs)
            for folder, msgs in listing.items() if msgs}


def test_imap_copy_dovecot_to_courier(old_account, courier_account, tmp_path):
    """Courier shows a message APPENDed in a session to that session only after a NOOP;
    the read-back verification must not depend on that."""
    msgs = mailgen.realistic_mailbox(count=30)
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("to-courier", old_account,
                                                       courier_account)])
    result = run(path)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(msgs)
    # both sides use '.' and "INBOX." and Courier has no special-use: names carry over
    old = content(mailgen.snapshot(old_account))
    assert content(mailgen.snapshot(courier_account)) == old
    again = run(path)
    assert again.ok, again.errors
    assert again.counts.get("copied", 0) == 0
    assert again.counts.get("flags_updated", 0) == 0
    assert content(mailgen.snapshot(courier_account)) == old


def test_imap_copy_courier_to_dovecot(courier_account, new_account, tmp_path):
    msgs = mailgen.realistic_mailbox(count=30)
    mailgen.fill(courier_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("from-courier", courier_account,
                                                       new_account)])
    result = run(path)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(msgs)
    old = content(mailgen.snapshot(courier_account))
    new = content(mailgen.snapshot(new_account))
    # '.' + "INBOX." → '/' without prefix; Courier announces no special-use folders
    renamed = {("INBOX" if name == "INBOX" else name.removeprefix("INBOX.").replace(".", "/")):
               c for name, c in old.items()}
    assert new == renamed
    again = run(path)
    assert again.ok and again.counts.get("copied", 0) == 0
    assert content(mailgen.snapshot(new_account)) == new


def test_imap_copy_from_courier_without_state_database_appends_no_duplicates(
        courier_account, new_account, tmp_path):
    """Courier answers BODY[HEADER.FIELDS ("MESSAGE-ID")] (quoted); the Message-IDs must
    still be read, or a copy cannot be recognised without the state database."""
    msgs = mailgen.realistic_mailbox(count=12, big=False)
    mailgen.fill(courier_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("from-courier", courier_account,
                                                       new_account)])
    assert run(path).counts["copied"] == len(msgs)
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"mailmigrate.db{suffix}").unlink(missing_ok=True)
    result = run(path)
    assert result.ok, result.errors
    assert result.counts.get("copied", 0) == 0
    assert sum(len(v) for v in mailgen.snapshot(new_account).values()) == len(msgs)


def pop3_archive(account, tmp_path, messages):
    mailgen.fill(account, messages)
    archive = tmp_path / "arch"
    job = {"name": "from-courier", "kind": "pop3-archive",
           "source": account.endpoint_toml("pop3"), "archive": {"path": str(archive)}}
    path = write_config(tmp_path / "c.toml", [job])
    result = run(path)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(messages)
    stored = [p.read_bytes() for sub in ("new", "cur") for p in (archive / sub).iterdir()]
    assert collections.Counter(hashlib.sha256(b).hexdigest() for b in stored) == \
        collections.Counter(m.sha256 for m in messages)
    again = run(path)
    assert again.ok and again.counts.get("copied", 0) == 0


def test_pop3_archive_from_courier(courier_account, tmp_path):
    inbox = [m for m in mailgen.realistic_mailbox(count=60, seed=4) if m.folder == "INBOX"]
    body, mid = mailgen.make_message(random.Random(4), 500, lone_dot=True, size=4_000_000)
    inbox.append(mailgen.TestMessage("INBOX", body, (), inbox[0].date, mid))
    assert not any(b >= 0x80 for m in inbox for b in m.body.split(b"\r\n\r\n")[0])
    pop3_archive(courier_account, tmp_path, inbox)


def test_pop3_archive_8bit_headers_from_courier(courier_account, tmp_path):
    """Courier's POP3 (CAPA 'UTF8 USER') replaces a message with 8-bit headers by a
    generated 'Cannot display Unicode content' notice unless the client sent 'UTF8'
    (RFC 6856); the tool sends it, so the message arrives as stored."""
    body, mid = mailgen.make_message(random.Random(4), 500, eight_bit=True, lone_dot=True)
    plain, plain_mid = mailgen.make_message(random.Random(5), 501)
    date = mailgen.realistic_mailbox(count=1)[0].date
    pop3_archive(courier_account, tmp_path, [mailgen.TestMessage("INBOX", body, (), date, mid),
                                             mailgen.TestMessage("INBOX", plain, (), date,
                                                                 plain_mid)])


def test_large_messages_stream_to_and_from_courier(old_account, courier_account, new_account,
        tmp_path, monkeypatch):
    large_messages_stream_through(courier_account, old_account, new_account, tmp_path,
                                  monkeypatch)
