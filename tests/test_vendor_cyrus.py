"""The real tool against Cyrus IMAP 3.6: Dovecot → Cyrus, Cyrus → Dovecot, POP3 archive.

Cyrus here uses its 3.x defaults: '/' as separator, folders beside INBOX, munge8bit on.
"""

from __future__ import annotations

# The Cyrus fixtures are imported by name, so test parameters "redefine" them.
# ruff: noqa: F811

import collections
import hashlib
import random

import pytest

from tests.rig import mailgen
from tests.rig.cyrus import CyrusServer, start_or_fail
from tests.rig.cyrus import cyrus_account, cyrus_host  # noqa: F401
from tests.rig.jobs import imap_job, run, write_config
from tests.rig.streaming import large_messages_stream_through

# Dovecot old host ('.' + "INBOX.") → Cyrus ('/', no prefix, no special-use folders yet)
DOVECOT_TO_CYRUS = {
    "INBOX": "INBOX",
    "INBOX.Sent Messages": "Sent Messages",
    "INBOX.Archive": "Archive",
    "INBOX.Archive.2019": "Archive/2019",
    "INBOX.Entwürfe": "Entwürfe",
    "INBOX.Projekte.Überblick": "Projekte/Überblick",
}
# Cyrus → Dovecot new host ('/' both sides; new host's special-use \Sent is "Sent")
CYRUS_TO_DOVECOT = {
    "INBOX": "INBOX",
    "Sent Messages": "Sent Messages",
    "Archive": "Archive",
    "Archive/2019": "Archive/2019",
    "Entwürfe": "Entwürfe",
    "Projekte/Überblick": "Projekte/Überblick",
}


def content(listing):
    """Folder → multiset of (sha256, flags, INTERNALDATE) — what must survive a copy."""
    return {folder: collections.Counter((m.sha256, m.flags, m.internaldate) for m in msgs)
            for folder, msgs in listing.items()}


def total(listing) -> int:
    return sum(len(msgs) for msgs in listing.values())


def assert_copied(source, destination, names):
    old = content(mailgen.snapshot(source))
    new = content(mailgen.snapshot(destination))
    for src, dst in names.items():
        assert new.get(dst) == old[src], f"{src} → {dst} differs"
    assert sum(sum(c.values()) for c in new.values()) == \
        sum(sum(c.values()) for c in old.values())
    return old, new


def copy_twice(source, destination, tmp_path, count):
    """A full run, then a re-run that must find nothing to do."""
    path = write_config(tmp_path / "c.toml", [imap_job("cyrus", source, destination)])
    result = run(path)
    assert result.ok, (result.errors, result.warnings)
    assert result.counts["copied"] == count
    listing = mailgen.snapshot(destination)
    again = run(path)
    assert again.ok, again.errors
    assert again.counts.get("copied", 0) == 0 and again.counts.get("flags_updated", 0) == 0
    assert mailgen.snapshot(destination) == listing  # no message added or changed
    return result


def ascii_only(msgs):
    """Messages whose headers Cyrus stores unchanged (munge8bit rewrites 8-bit ones)."""
    return [m for m in msgs if m.body.split(b"\r\n\r\n", 1)[0].isascii()]


def test_dovecot_to_cyrus(old_account, cyrus_account, tmp_path):
    msgs = ascii_only(mailgen.realistic_mailbox(count=40, seed=21))
    assert {m.folder for m in msgs} == set(DOVECOT_TO_CYRUS)
    mailgen.fill(old_account, msgs)
    copy_twice(old_account, cyrus_account, tmp_path, len(msgs))
    _, new = assert_copied(old_account, cyrus_account, DOVECOT_TO_CYRUS)
    all_flags = set().union(*(f for c in new.values() for (_, f, _) in c))
    assert {"$Label1", "project-x", "\\Flagged", "\\Answered", "\\Seen"} <= all_flags


def eight_bit_messages(count=3):
    rng = random.Random(22)
    date = mailgen.realistic_mailbox(count=1)[0].date
    return [mailgen.TestMessage("INBOX", mailgen.make_message(rng, i, eight_bit=True)[0],
                                ("\\Seen", "$Label1"), date) for i in range(count)]


def test_dovecot_to_cyrus_8bit_headers_are_quarantined_once(old_account, cyrus_account,
                                                             tmp_path):
    """munge8bit (Cyrus' default) stores every 8-bit header byte as 'X': the copy can never
    verify.  At most one copy per source message lands, the message is quarantined with a
    hint, nothing is deleted, and re-runs (even with deletion on) add nothing."""
    msgs = eight_bit_messages()
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("cyrus", old_account, cyrus_account,
                                                       delete_after_verify=True)])
    first = run(path)
    assert not first.ok and first.counts.get("quarantined") == len(msgs)
    assert all("munge8bit" in e for e in first.errors if "quarantined" in e), first.errors
    for _ in range(3):
        again = run(path)
        assert again.counts.get("copied", 0) == 0 and again.counts.get("deleted", 0) == 0
        assert any("quarantined by earlier runs" in w for w in again.warnings)
    assert len(mailgen.snapshot(cyrus_account)["INBOX"]) == len(msgs)  # one copy each
    assert len(mailgen.snapshot(old_account)["INBOX"]) == len(msgs)  # nothing deleted
    # --retry-failed looks at the existing copies again; still no second copy
    retried = run(path, retry_failed=True)
    assert retried.counts.get("quarantined") == len(msgs)
    assert len(mailgen.snapshot(cyrus_account)["INBOX"]) == len(msgs)


@pytest.fixture(scope="module")
def cyrus_8bit_account(test_ca):
    server = start_or_fail(CyrusServer("cyrus-8bit", test_ca, munge8bit=False))
    yield server.add_user("eight-bit-1@cyrus.test", "pw-8bit")
    server.cleanup()


def test_dovecot_to_cyrus_8bit_headers_with_munge8bit_off(old_account, cyrus_8bit_account,
                                                          tmp_path):
    msgs = eight_bit_messages()
    mailgen.fill(old_account, msgs)
    copy_twice(old_account, cyrus_8bit_account, tmp_path, len(msgs))
    assert_copied(old_account, cyrus_8bit_account, {"INBOX": "INBOX"})


def test_cyrus_to_dovecot(cyrus_account, new_account, tmp_path):
    msgs = mailgen.realistic_mailbox(separator="/", prefix="", count=40, seed=23)
    mailgen.fill(cyrus_account, msgs)  # 8-bit headers arrive munged: that is the source
    copy_twice(cyrus_account, new_account, tmp_path, len(msgs))
    assert_copied(cyrus_account, new_account, CYRUS_TO_DOVECOT)


def test_pop3_archive_from_cyrus(cyrus_account, tmp_path):
    rng = random.Random(24)
    date = mailgen.realistic_mailbox(count=1)[0].date
    bodies = [mailgen.make_message(rng, i, lone_dot=(i % 3 == 0), attachment=(i % 4 == 1))[0]
              for i in range(12)]
    mailgen.fill(cyrus_account, [mailgen.TestMessage("INBOX", b, (), date) for b in bodies])
    reference = collections.Counter(m.sha256 for m in mailgen.snapshot(cyrus_account)["INBOX"])
    assert reference == collections.Counter(hashlib.sha256(b).hexdigest() for b in bodies)
    archive = tmp_path / "arch"
    path = write_config(tmp_path / "c.toml", [{
        "name": "archive", "kind": "pop3-archive",
        "source": cyrus_account.endpoint_toml("pop3"), "archive": {"path": str(archive)}}])
    result = run(path)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(bodies)

    def archived():
        return collections.Counter(hashlib.sha256(p.read_bytes()).hexdigest()
                                   for sub in ("new", "cur") for p in (archive / sub).iterdir())

    assert archived() == reference
    again = run(path)
    assert again.ok and again.counts.get("copied", 0) == 0
    assert archived() == reference


def test_folder_shared_by_another_user_is_neither_copied_nor_emptied(cyrus_host,
                                                                    cyrus_account,
                                                                    new_account, tmp_path):
    """Cyrus lists a folder bob shared with alice under "Other Users/": not alice's mail."""
    bob = cyrus_host.add_user("bob-shares@cyrus.test", "pw-bob-shares")
    shared = mailgen.realistic_mailbox(separator="/", prefix="", count=6, big=False, seed=26)
    mailgen.fill(bob, [mailgen.TestMessage("Shared", m.body, m.flags, m.date)
                       for m in shared])
    client = mailgen.connect(bob)
    client.setacl("Shared", cyrus_account.username, "lrswipkxtecda")
    client.logout()
    client = mailgen.connect(cyrus_account)
    names = [name for _f, _d, name in client.list_folders()]
    client.logout()
    assert any(n.startswith("Other Users/") for n in names), names  # alice sees it
    mine = [m for m in mailgen.realistic_mailbox(separator="/", prefix="", count=6,
                                                 big=False, seed=27) if m.folder == "INBOX"]
    mailgen.fill(cyrus_account, mine)
    result = run(write_config(tmp_path / "c.toml", [imap_job(
        "alice", cyrus_account, new_account, delete_after_verify=True)]))
    assert result.ok, result.errors
    assert len(mailgen.snapshot(bob)["Shared"]) == len(shared)  # bob's folder untouched
    assert not any("Shared" in n or "Other Users" in n for n in mailgen.snapshot(new_account))
    assert mailgen.snapshot(cyrus_account)["INBOX"] == []  # alice's own mail was moved


def test_large_messages_stream_to_and_from_cyrus(old_account, cyrus_account, new_account,
        tmp_path, monkeypatch):
    large_messages_stream_through(cyrus_account, old_account, new_account, tmp_path,
                                  monkeypatch)
