"""imap-copy's folder-skipping shortcut (issue 10): a re-run opens only folders whose
STATUS changed, and every change is still picked up.

A folder is skipped only when both sides answer STATUS exactly as after the last clean
sync, HIGHESTMODSEQ included, and nothing in it is unfinished.  These tests change one
thing at a time at the source or destination (real Dovecot) and check that the change
arrives, that only the changed folder is opened (SELECT/EXAMINE counted in the session),
and that a server without CONDSTORE always takes the listing path with the same result.
"""

from __future__ import annotations

import collections
import logging
import random

import pytest
from sqlalchemy import create_engine, text

from migrate.endpoints.imap import ImapSession
from migrate.states import State
from migrate.store import Store
from tests.rig import mailgen
from tests.rig.dovecot import DovecotServer, start_or_fail
from tests.rig.jobs import imap_job, run, write_config

NAMES = {"INBOX": "INBOX", "INBOX.Sent Messages": "Sent", "INBOX.Archive": "Archive",
         "INBOX.Archive.2019": "Archive/2019", "INBOX.Entwürfe": "Entwürfe",
         "INBOX.Projekte.Überblick": "Projekte/Überblick"}

# Dovecot 2.3's capabilities after login, without CONDSTORE and QRESYNC (LIST-STATUS kept:
# the STATUS round trip is the same, only HIGHESTMODSEQ is missing)
NO_CONDSTORE = ("imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT "
                "THREAD=REFERENCES MULTIAPPEND UNSELECT CHILDREN NAMESPACE UIDPLUS "
                "LIST-EXTENDED I18NLEVEL=1 ESEARCH SEARCHRES WITHIN LIST-STATUS BINARY MOVE "
                "LITERAL+ SPECIAL-USE QUOTA")


@pytest.fixture
def opened(monkeypatch):
    """(port, folder) → how many times a job's session SELECTed/EXAMINEd it."""
    counts: collections.Counter = collections.Counter()
    real = ImapSession.select

    def counting(self, name, readonly):
        counts[(self.endpoint.port, name)] += 1
        return real(self, name, readonly)

    monkeypatch.setattr(ImapSession, "select", counting)
    return counts


def source_opened(opened, account) -> set[str]:
    port = account.server.ports["imaps"]
    return {name for (p, name), n in opened.items() if p == port and n}


def content(account):
    return {folder: collections.Counter((m.sha256, m.flags, m.internaldate) for m in msgs)
            for folder, msgs in mailgen.snapshot(account).items()}


def assert_same(old_account, new_account, names=NAMES):
    old, new = content(old_account), content(new_account)
    for src, dst in names.items():
        assert new[dst] == old.get(src, collections.Counter()), f"{src} → {dst} differs"


def copied_and_settled(old_account, new_account, tmp_path, opened, **extra):
    mailgen.fill(old_account, mailgen.realistic_mailbox(count=24, big=False))
    config = write_config(tmp_path / "config.toml",
                          [imap_job("alice", old_account, new_account, **extra)])
    first = run(config)
    assert first.ok, first.errors
    assert first.counts["copied"] == 24
    opened.clear()
    return config


def test_unchanged_folders_are_not_opened_on_either_side(old_account, new_account, tmp_path,
                                                         opened):
    config = copied_and_settled(old_account, new_account, tmp_path, opened)
    again = run(config)
    assert again.ok, again.errors
    assert again.counts.get("copied", 0) == 0 and again.counts["folders"] == len(NAMES)
    assert sum(opened.values()) == 0, opened
    assert_same(old_account, new_account)


def test_flag_change_new_message_and_expunge_are_picked_up(old_account, new_account,
                                                           tmp_path, opened, caplog):
    config = copied_and_settled(old_account, new_account, tmp_path, opened)
    caplog.set_level(logging.INFO, logger="migrate.imap_copy")
    client = mailgen.connect(old_account)
    client.select_folder("INBOX.Archive")
    uid = client.search("ALL")[0]
    client.add_flags([uid], ["\\Flagged", "$Later"])
    client.append("INBOX.Entwürfe", mailgen.make_message(random.Random(5),
                                                         999)[0], flags=["\\Seen"])
    client.logout()
    mailgen.expunge_first(old_account, "INBOX.Archive.2019", 1)
    result = run(config)
    assert result.ok, result.errors
    assert result.counts["flags_updated"] == 1
    assert result.counts["copied"] == 1
    assert result.counts["vanished"] == 1
    assert source_opened(opened, old_account) == {"INBOX.Archive", "INBOX.Entwürfe",
                                                  "INBOX.Archive.2019"}
    # CONDSTORE: the changed folders were not listed whole, only what changed
    incremental = [r.getMessage() for r in caplog.records if "since MODSEQ" in r.getMessage()]
    assert len(incremental) == 3, incremental
    assert any("'INBOX.Archive': 4 known messages, 1 with flags changed" in m
               for m in incremental), incremental
    # the expunged message's copy stays at the destination (no deletion asked for)
    old, new = content(old_account), content(new_account)
    assert sum(new["Archive/2019"].values()) == sum(old["INBOX.Archive.2019"].values()) + 1
    assert_same(old_account, new_account,
                {k: v for k, v in NAMES.items() if k != "INBOX.Archive.2019"})
    opened.clear()
    assert run(config).ok and sum(opened.values()) == 0


def test_source_uidvalidity_change_is_reconciled_without_duplicates(old_account, new_account,
                                                                    tmp_path, opened):
    config = copied_and_settled(old_account, new_account, tmp_path, opened)
    client = mailgen.connect(old_account)
    before = client.folder_status("INBOX.Archive", ["UIDVALIDITY"])[b"UIDVALIDITY"]
    client.select_folder("INBOX.Archive", readonly=True)
    data = client.fetch(client.search("ALL"), ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"])
    client.close_folder()
    client.delete_folder("INBOX.Archive")
    client.create_folder("INBOX.Archive")
    for _uid, item in sorted(data.items()):
        client.append("INBOX.Archive", item[b"BODY[]"],
                      flags=[f for f in item[b"FLAGS"] if f != b"\\Recent"],
                      msg_time=item[b"INTERNALDATE"])
    after = client.folder_status("INBOX.Archive", ["UIDVALIDITY"])[b"UIDVALIDITY"]
    client.logout()
    assert after != before
    result = run(config)
    assert result.ok, result.errors
    assert any("UIDVALIDITY changed" in w for w in result.warnings)
    assert result.counts.get("copied", 0) == 0
    assert result.counts["skipped"] == len(data)  # found at the destination by content
    assert "INBOX.Archive" in source_opened(opened, old_account)
    assert_same(old_account, new_account)


def test_copy_deleted_at_the_destination_reopens_the_folder(old_account, new_account,
                                                            tmp_path, opened):
    config = copied_and_settled(old_account, new_account, tmp_path, opened)
    mailgen.expunge_first(new_account, "Projekte/Überblick", 1)
    result = run(config)
    assert result.ok, result.errors
    assert source_opened(opened, old_account) == {"INBOX.Projekte.Überblick"}
    assert (new_account.server.ports["imaps"], "Projekte/Überblick") in opened


def test_deletion_turned_on_later_still_deletes_from_unchanged_folders(
        old_account, new_account, tmp_path, opened):
    """The folders' STATUS is unchanged, but verified messages are work once
    delete_after_verify is on: every folder is opened and emptied; an expunge by another
    client meanwhile is recorded, not mistaken for a deletion of ours."""
    copied_and_settled(old_account, new_account, tmp_path, opened)
    before = content(old_account)
    mailgen.expunge_first(old_account, "INBOX", 1)
    config = write_config(tmp_path / "config.toml", [imap_job(
        "alice", old_account, new_account, delete_after_verify=True)])
    result = run(config)
    assert result.ok, result.errors
    assert result.counts["vanished"] == 1
    assert result.counts["deleted"] == 24 - 1
    assert source_opened(opened, old_account) == set(NAMES)
    assert all(not c for c in content(old_account).values())
    new = content(new_account)
    for src, dst in NAMES.items():  # nothing lost: every original has its copy
        assert new[dst] == before[src]
    # a message arriving later is copied and deleted too; the others stay skipped
    client = mailgen.connect(old_account)
    client.append("INBOX.Archive", mailgen.make_message(random.Random(7),
                                                        1234)[0])
    client.logout()
    later = run(config)
    assert later.ok and later.counts["copied"] == 1 and later.counts["deleted"] == 1
    assert sum(sum(c.values()) for c in content(new_account).values()) == 24 + 1
    # our own expunges changed the source's STATUS: the next run lists once more, and
    # then nothing is opened any more
    assert run(config).ok
    opened.clear()
    quiet = run(config)
    assert quiet.ok and not quiet.counts.get("copied") and not quiet.counts.get("deleted")
    assert sum(opened.values()) == 0


def test_quarantined_messages_keep_their_folder_listed_and_retry_failed_copies_them(old_account, new_account,
                                                                 tmp_path, opened):
    config = copied_and_settled(old_account, new_account, tmp_path, opened)
    url = f"sqlite:///{tmp_path / 'mailmigrate.db'}"
    eng = create_engine(url)
    with eng.begin() as conn:  # as if an earlier run had quarantined it
        folder_id = conn.execute(text(
            "SELECT id FROM folders WHERE source_name = 'INBOX.Archive'")).scalar()
        conn.execute(text("UPDATE messages SET state = 'quarantined', last_error = 'x' "
                          "WHERE id = (SELECT min(id) FROM messages WHERE folder_id = :f)"),
                     {"f": folder_id})
    eng.dispose()
    left = run(config)  # quarantined: reported by every run, left alone
    assert left.ok, left.errors
    assert any("quarantined by earlier runs" in w for w in left.warnings)
    assert source_opened(opened, old_account) == {"INBOX.Archive"}
    assert left.counts.get("copied", 0) == 0
    opened.clear()
    result = run(config, retry_failed=True)
    assert result.ok, result.errors
    assert source_opened(opened, old_account) == {"INBOX.Archive"}
    store = Store(url)
    try:
        states = collections.Counter(r.state for r in store.messages(folder_id).values())
    finally:
        store.close()
    assert states == {State.VERIFIED: 4}


@pytest.fixture(scope="module")
def plain_host(test_ca):
    server = start_or_fail(DovecotServer("plain", ".", test_ca, inbox_prefix=True,
                                         special_use={"Sent Messages": "\\Sent"},
                                         extra_config=NO_CONDSTORE))
    yield server
    server.cleanup()


def test_without_condstore_every_folder_is_listed_with_the_same_result(
        plain_host, new_account, tmp_path, opened):
    old_account = plain_host.add_user("plain@old.test", "plain-pw-1234")
    client = mailgen.connect(old_account)
    caps = set(client.capabilities())
    client.logout()
    assert b"CONDSTORE" not in caps and b"QRESYNC" not in caps
    config = copied_and_settled(old_account, new_account, tmp_path, opened)
    again = run(config)
    assert again.ok and again.counts.get("copied", 0) == 0
    assert source_opened(opened, old_account) == set(NAMES)  # the slow path, every time
    client = mailgen.connect(old_account)
    client.select_folder("INBOX.Archive")
    client.add_flags([client.search("ALL")[0]], ["\\Flagged"])
    client.logout()
    mailgen.expunge_first(old_account, "INBOX.Archive.2019", 1)
    result = run(config)
    assert result.ok, result.errors
    assert result.counts["flags_updated"] == 1 and result.counts["vanished"] == 1
    assert_same(old_account, new_account,
                {k: v for k, v in NAMES.items() if k != "INBOX.Archive.2019"})


def test_folders_larger_than_a_listing_window(old_account, new_account, tmp_path, opened,
                                              monkeypatch):
    """With 3 UIDs per window every folder spans several: new messages, an expunge and a
    flag change in different windows all arrive (reported once per folder), and with a
    fresh state database every copy is found again, none appended twice."""
    monkeypatch.setattr("migrate.endpoints.imap.LIST_WINDOW", 3)
    config = copied_and_settled(old_account, new_account, tmp_path, opened)
    client = mailgen.connect(old_account)
    client.select_folder("INBOX")
    uids = client.search("ALL")
    client.add_flags([uids[-1]], ["$Late"])
    rng = random.Random(11)
    for i in range(5):
        client.append("INBOX", mailgen.make_message(rng, 500 + i)[0])
    client.logout()
    mailgen.expunge_first(old_account, "INBOX", 1)
    result = run(config)
    assert result.ok, result.errors
    assert (result.counts["copied"], result.counts["flags_updated"],
            result.counts["vanished"]) == (5, 1, 1)
    assert [w for w in result.warnings if "vanished" in w] == [
        "folder 'INBOX': 1 message vanished from the source since the last run without "
        "mailmigrate deleting them; another client (often a POP3 client) is deleting mail "
        "from this mailbox"]
    old, new = content(old_account), content(new_account)
    assert sum(new["INBOX"].values()) == sum(old["INBOX"].values()) + 1  # the expunged one
    assert_same(old_account, new_account, {k: v for k, v in NAMES.items() if k != "INBOX"})
    # a fresh state database: every copy is found at the destination across windows
    fresh = write_config(tmp_path / "fresh.toml",
                         [imap_job("alice", old_account, new_account)],
                         state_url=f"sqlite:///{tmp_path / 'fresh.db'}")
    again = run(fresh)
    assert again.ok, again.errors
    assert again.counts.get("copied", 0) == 0
    assert again.counts["skipped"] == sum(sum(c.values()) for c in old.values())


def test_session_status_windows_and_changes_on_a_real_server(old_account, monkeypatch):
    """The endpoint pieces on Dovecot: STATUS by LIST-STATUS and pipelined (several
    rounds) agree, HIGHESTMODSEQ only with CONDSTORE; UID windows cover every UID, dense
    or sparse; CHANGEDSINCE and UID SEARCH see exactly what changed."""
    from migrate import config as cfg

    raw = {"name": "x", "kind": "imap-copy", "source": old_account.endpoint_toml("imap"),
           "destination": old_account.endpoint_toml("imap")}
    endpoint = cfg.parse({"jobs": [raw]}, base_dir=old_account.server.base).jobs[0].source
    client = mailgen.connect(old_account)
    client.create_folder("INBOX.Entwürfe")
    rng = random.Random(3)
    for i in range(30):
        client.append("INBOX.Entwürfe", mailgen.make_message(rng, i)[0])
    client.select_folder("INBOX.Entwürfe")
    client.delete_messages(list(range(2, 28)))
    client.expunge()
    client.logout()
    session = ImapSession.connect(endpoint)
    try:
        names = ["INBOX", "INBOX.Entwürfe", "INBOX.Missing"]
        listed = session.statuses(names)
        assert set(listed) == {"INBOX", "INBOX.Entwürfe"}
        mine = listed["INBOX.Entwürfe"]
        assert (mine.uidnext, mine.messages) == (31, 4) and mine.highestmodseq
        monkeypatch.setattr("migrate.endpoints.imap.STATUS_PIPELINE", 2)
        session.capabilities.discard("LIST-STATUS")
        assert session.statuses(names) == listed
        session.capabilities.discard("CONDSTORE")
        plain = session.statuses(names)["INBOX.Entwürfe"]
        assert plain.highestmodseq is None and plain.as_tuple()[:3] == mine.as_tuple()[:3]
        session.capabilities.add("CONDSTORE")

        session.select("INBOX.Entwürfe", readonly=True)
        assert session.uids_up_to(30) == [1, 28, 29, 30]
        assert list(session.uid_windows(size=2)) == ["1:28", "29:*"]  # sparse: real UIDs
        listed_uids = [m.uid for w in session.uid_windows(size=2) for m in session.list_range(w)]
        assert listed_uids == [1, 28, 29, 30]
        session.capabilities.discard("ESEARCH")
        assert session.uids_up_to(29) == [1, 28, 29]
        session.capabilities.add("ESEARCH")
        assert session.list_range("31:*") == []  # '31:*' answers UID 30: left out

        other = mailgen.connect(old_account)
        other.select_folder("INBOX.Entwürfe")
        other.add_flags([29], ["$Changed"])
        other.logout()
        assert session.flags_changed_since(mine.highestmodseq, 30) == {29: {"$Changed"}}
        assert session.flags_changed_since(mine.highestmodseq, 28) == {}

        client = mailgen.connect(old_account)
        client.create_folder("INBOX.Dense")
        for i in range(6):
            client.append("INBOX.Dense", mailgen.make_message(rng, 100 + i)[0])
        client.logout()
        session.select("INBOX.Dense", readonly=True)
        assert list(session.uid_windows(size=2)) == ["1:2", "3:4", "5:*"]
    finally:
        session.logout()


def test_uid_bits_is_a_set_of_uids():
    from migrate.imap_copy import UidBits

    bits = UidBits([1, 5, 65536, 2**32 + 7])
    bits.add(70000)
    bits.update([3])
    members = {0, 1, 3, 5, 65535, 65536, 70000, 2**32 + 6, 2**32 + 7}
    assert {u for u in members if u in bits} == {1, 3, 5, 65536, 70000, 2**32 + 7}
    assert "1" not in bits and None not in bits
