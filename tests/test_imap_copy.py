"""imap-copy against the real Dovecot pair: complete, incremental, verified, resumable."""

from __future__ import annotations

import collections
import random
import re

import pytest

from migrate import config as cfg
from migrate import imap_copy
from migrate.endpoints.imap import ImapSession
from migrate.report.text import size_text
from migrate.states import State
from migrate.store import Store
from tests.rig import mailgen
from tests.rig.jobs import imap_job, run, run_cli, run_measuring_memory, write_config

# old host name → expected new host name ('.' + "INBOX." → '/', special-use \Sent → Sent)
EXPECTED_NAMES = {
    "INBOX": "INBOX",
    "INBOX.Sent Messages": "Sent",
    "INBOX.Archive": "Archive",
    "INBOX.Archive.2019": "Archive/2019",
    "INBOX.Entwürfe": "Entwürfe",
    "INBOX.Projekte.Überblick": "Projekte/Überblick",
}


def content(listing):
    """Folder → multiset of (sha256, flags, INTERNALDATE) — what must survive a copy."""
    return {folder: collections.Counter((m.sha256, m.flags, m.internaldate) for m in msgs)
            for folder, msgs in listing.items()}


def assert_copied(old_account, new_account, names=EXPECTED_NAMES):
    old = content(mailgen.snapshot(old_account))
    new = content(mailgen.snapshot(new_account))
    for src, dst in names.items():
        assert new[dst] == old[src], f"{src} → {dst} differs"
    return old, new


@pytest.fixture
def filled(old_account):
    msgs = mailgen.realistic_mailbox()
    mailgen.fill(old_account, msgs)
    return msgs


@pytest.fixture
def config(tmp_path, old_account, new_account):
    def make(**extra):
        return write_config(tmp_path / "config.toml",
                            [imap_job("alice", old_account, new_account, **extra)])
    return make


def test_full_copy_is_byte_identical_with_flags_and_dates(filled, old_account, new_account,
                                                          config, tmp_path):
    before = mailgen.snapshot(old_account)
    result = run(config())
    assert result.ok, result.errors
    assert result.counts["copied"] == len(filled)
    assert result.counts["folders"] == len(EXPECTED_NAMES)
    old, new = assert_copied(old_account, new_account)
    # nothing extra appeared anywhere at the destination
    assert sum(sum(c.values()) for c in new.values()) == len(filled)
    # the source is untouched: still unread where it was unread (BODY.PEEK), same flags
    assert mailgen.snapshot(old_account) == before
    # keywords and 8-bit headers made it: spot-check the data itself
    all_flags = set().union(*(f for c in new.values() for (_, f, _) in c))
    assert {"$Label1", "project-x", "\\Flagged", "\\Answered", "\\Seen"} <= all_flags
    # created folders are subscribed, so mail clients show them
    client = mailgen.connect(new_account)
    subscribed = {name for _f, _d, name in client.list_sub_folders()}
    client.logout()
    assert {"Archive/2019", "Entwürfe", "Projekte/Überblick"} <= subscribed
    # every message verified in the state database
    store = Store(f"sqlite:///{tmp_path / 'mailmigrate.db'}")
    states = collections.Counter()
    for folder in store.folders(store.find_job("alice")):
        states.update(r.state for r in store.messages(folder.id).values())
    assert states == {State.VERIFIED: len(filled)}
    store.close()


def test_rerun_is_incremental_new_messages_and_flags(filled, old_account, new_account, config):
    path = config()
    assert run(path).counts["copied"] == len(filled)
    again = run(path)
    assert again.ok and again.counts.get("copied", 0) == 0
    assert again.counts.get("flags_updated", 0) == 0

    # a new message and changed flags at the source
    body, _ = mailgen.make_message(random.Random(99), 999)
    client = mailgen.connect(old_account)
    client.append("INBOX.Archive.2019", body, flags=["$Important"])
    client.select_folder("INBOX")
    uids = client.search("ALL")[:3]
    client.add_flags(uids, ["\\Flagged", "$Label9"])
    client.remove_flags(uids, ["\\Seen"])
    client.logout()

    third = run(path)
    assert third.ok, third.errors
    assert third.counts["copied"] == 1
    assert third.counts["flags_updated"] == 3
    assert_copied(old_account, new_account)


def test_lost_state_database_appends_no_duplicates(filled, old_account, new_account, config,
                                                   tmp_path):
    path = config()
    run(path)
    (tmp_path / "mailmigrate.db").unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"mailmigrate.db{suffix}").unlink(missing_ok=True)
    result = run(path)
    assert result.ok, result.errors
    assert result.counts.get("copied", 0) == 0
    assert result.counts["skipped"] == len(filled)
    _, new = assert_copied(old_account, new_account)
    assert sum(sum(c.values()) for c in new.values()) == len(filled)


def test_identical_duplicates_in_source_are_both_copied(old_account, new_account, config):
    body, mid = mailgen.make_message(random.Random(5), 1)
    twin = mailgen.TestMessage("INBOX", body, ("\\Seen",),
                               mailgen.realistic_mailbox(count=1)[0].date, mid)
    mailgen.fill(old_account, [twin, twin])
    path = config()
    assert run(path).counts["copied"] == 2
    assert run(path).counts.get("copied", 0) == 0
    assert sum(len(v) for v in mailgen.snapshot(new_account).values()) == 2


def test_changed_uidvalidity_is_reconciled_not_recopied(filled, old_account, new_account,
                                                        config):
    path = config()
    run(path)
    old_account.server.doveadm("mailbox", "update", "-u", old_account.username,
                               "--uid-validity", "4242", "INBOX")
    result = run(path)
    assert result.ok, result.errors
    assert result.counts.get("copied", 0) == 0
    inbox_count = sum(1 for m in filled if m.folder == "INBOX")
    assert result.counts["skipped"] == inbox_count
    assert any("UIDVALIDITY changed" in w for w in result.warnings)
    assert_copied(old_account, new_account)


def test_vanished_messages_are_reported(filled, old_account, config):
    path = config()
    run(path)
    mailgen.expunge_first(old_account, "INBOX", 2)
    result = run(path)
    assert result.counts["vanished"] == 2
    assert any("2 messages vanished from the source since the last run without mailmigrate "
               "deleting them; another client (often a POP3 client)" in w
               for w in result.warnings)


def test_folder_filters_and_map(filled, old_account, new_account, config):
    path = config(folders={"include": ["INBOX*"], "exclude": ["INBOX.Archive*"],
                           "map": {"INBOX.Entwürfe": "Drafts"}})
    result = run(path)
    assert result.ok, result.errors
    new = mailgen.snapshot(new_account)
    assert "Archive/2019" not in new
    assert not new.get("Archive")  # the special-use folder exists but stays empty
    old = content(mailgen.snapshot(old_account))
    assert content(new)["Drafts"] == old["INBOX.Entwürfe"]


@pytest.mark.parametrize("ignored", [{"UIDPLUS"}, {"UIDPLUS", "LITERAL+"},
                                     {"MULTIAPPEND", "LITERAL+"}],
                         ids=["no-uidplus", "no-literal-plus", "no-multiappend"])
def test_fallbacks_for_servers_without_extensions(ignored, filled, old_account, new_account,
                                                  config):
    """Without APPENDUID copies are found by search; without LITERAL+ / MULTIAPPEND the
    synchronising and one-by-one paths are used, for batches and for streamed messages."""
    body, mid = mailgen.make_message(random.Random(6), 2)
    twin = mailgen.TestMessage("INBOX", body, (), filled[0].date, mid)
    mailgen.fill(old_account, [twin, twin])  # identical twins in one batch
    filled = filled + [twin, twin]
    # 1 MB batches: the 3 MB message takes the streamed path
    result = run(config(), ignore_capabilities=frozenset(ignored), batch_bytes=1024 * 1024)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(filled)
    assert_copied(old_account, new_account)


def test_dry_run_changes_nothing(filled, old_account, new_account, config, tmp_path):
    before = (mailgen.snapshot(old_account), mailgen.snapshot(new_account))
    path = config(delete_after_verify=True)
    proc = run_cli("run", "-c", str(path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "INBOX.Archive.2019 → Archive/2019 (create, same name): " in proc.stdout
    assert re.search(r"INBOX → INBOX \(existing, same name\): 10 messages \([0-9.]+ [KMG]B\), "
                     r"0 already there, 10 to copy", proc.stdout), proc.stdout
    total = size_text(sum(len(m.body) for m in filled))
    assert (f"overall: 1 job, {len(filled)} messages ({total}) at the source, 0 "
            f"already there, {len(filled)} to copy ({total}), 0 flag updates, "
            f"{len(filled)} to delete") in proc.stdout
    assert (mailgen.snapshot(old_account), mailgen.snapshot(new_account)) == before
    store = Store(f"sqlite:///{tmp_path / 'mailmigrate.db'}")
    assert store.find_job("alice") is None and store.bindings() == []
    store.close()


def test_dry_run_after_a_copy_reports_flag_updates_and_deletions(filled, old_account,
                                                                 new_account, config):
    path = config(delete_after_verify=False)
    run(path)
    client = mailgen.connect(old_account)
    client.select_folder("INBOX")
    client.add_flags(client.search("ALL")[:2], ["\\Flagged"])
    client.logout()
    before = (mailgen.snapshot(old_account), mailgen.snapshot(new_account))
    path = config(delete_after_verify=True)
    result = run(path, dry_run=True, max_delete=5)
    assert any(re.search(r"INBOX → INBOX \(existing, same name\): 10 messages \([0-9.]+ "
                         r"[KMG]B\), 10 already there, 0 to copy \(0 KB\), 2 flag updates, 10 to "
                         r"delete$", line) for line in result.plan), result.plan
    assert any("deletion would be refused" in line and "more than --max-delete 5" in line
               for line in result.plan)
    assert result.counts["flags_updated"] == 2 and result.counts["would_copy"] == 0
    assert (mailgen.snapshot(old_account), mailgen.snapshot(new_account)) == before


@pytest.mark.parametrize("batch_bytes", [4 * 1024 * 1024, 256 * 1024],
                         ids=["in-memory", "streamed"])
def test_delete_after_verify_removes_verified_only(batch_bytes, old_account, new_host,
                                                   tmp_path):
    small = new_host.add_user(f"small-quota-{batch_bytes}@new.test", "pw-small",
                              quota_max_mail_size="1M")
    msgs = mailgen.realistic_mailbox(count=12)  # message #7 is 3 MB: over the limit
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, small,
                                                       delete_after_verify=True)])
    result = run(path, batch_bytes=batch_bytes)
    assert not result.ok
    assert result.counts["failed"] == 1 and result.counts["deleted"] == 11, \
        (result.counts, result.errors, result.warnings)
    assert any("destination refused the message" in e for e in result.errors)
    left = [m for ms in mailgen.snapshot(old_account).values() for m in ms]
    assert len(left) == 1 and left[0].size > 1_000_000
    copied = sum(len(v) for v in mailgen.snapshot(small).values())
    assert copied == 11
    # the rejected message stays failed, and stays on the source, run after run
    again = run(path, batch_bytes=batch_bytes)
    assert again.counts["failed"] == 1 and again.counts.get("deleted", 0) == 0
    assert len([m for ms in mailgen.snapshot(old_account).values() for m in ms]) == 1


def test_max_delete_aborts_deletion_not_copy(filled, old_account, new_account, config):
    path = config(delete_after_verify=True)
    proc = run_cli("run", "-c", str(path), "--max-delete", "5", "--no-progress")
    assert proc.returncode == 2  # refused for safety, as the README says
    assert f"{len(filled)} messages would be deleted from the source, more than " \
           "--max-delete 5; nothing was deleted" in proc.stderr
    assert sum(len(v) for v in mailgen.snapshot(old_account).values()) == len(filled)
    assert_copied(old_account, new_account)
    # within the cap it deletes, and only what was verified
    proc = run_cli("run", "-c", str(path), "--max-delete", str(len(filled)))
    assert proc.returncode == 0, proc.stderr
    assert sum(len(v) for v in mailgen.snapshot(old_account).values()) == 0
    assert sum(len(v) for v in mailgen.snapshot(new_account).values()) == len(filled)


def test_cli_summary_line(filled, config):
    proc = run_cli("run", "-c", str(config()), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"alice: 6 folders, {len(filled)} copied, 0 skipped as duplicates, "
                           "0 flags updated, 0 deleted, 0 failed, ")
    assert "msgs/s" in line and "MB/s" in line


@pytest.mark.parametrize("point,hit", [("after-intent", 1), ("after-append", 1),
                                       ("after-append", 4), ("after-intent", 7)])
def test_kill_9_then_rerun_copies_each_message_exactly_once(point, hit, old_account,
                                                            new_account, tmp_path):
    msgs = mailgen.realistic_mailbox(count=90, big=False, seed=3)
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    proc = run_cli("run", "-c", str(path), "--batch-messages", "5", "--no-progress",
                   env={"MAILMIGRATE_CRASH_AT": f"{point}:{hit}"})
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    proc = run_cli("run", "-c", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    old = content(mailgen.snapshot(old_account))
    new = content(mailgen.snapshot(new_account))
    for src, dst in EXPECTED_NAMES.items():
        assert new[dst] == old[src], (
            f"{src} → {dst}: missing {old[src] - new[dst]}, extra {new[dst] - old[src]}; "
            f"re-run said: {proc.stdout} {proc.stderr}")


@pytest.mark.parametrize("point", ["before-expunge", "after-expunge"])
def test_kill_9_during_deletion_loses_nothing(point, old_account, new_account, tmp_path):
    msgs = mailgen.realistic_mailbox(count=30, big=False, seed=4)
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account,
                                                       delete_after_verify=True)])
    first = run_cli("run", "-c", str(path), "--no-progress", "-v",
                    env={"MAILMIGRATE_CRASH_AT": f"{point}:1"})
    assert first.returncode == -9
    proc = run_cli("run", "-c", str(path), "--no-progress", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "vanished" not in proc.stderr  # our own deletion is not someone else's
    assert sum(len(v) for v in mailgen.snapshot(old_account).values()) == 0
    new = mailgen.snapshot(new_account)
    got = collections.Counter(m.sha256 for ms in new.values() for m in ms)
    want = collections.Counter(m.sha256 for m in msgs)
    missing = [(m.folder, m.sha256[:8]) for m in msgs if got[m.sha256] < want[m.sha256]]
    assert got == want, (f"missing {missing}; destination "
                         f"{ {k: len(v) for k, v in new.items()} }\nfirst run:\n"
                         f"{first.stderr}\nsecond run:\n{proc.stdout}{proc.stderr}")


def test_folder_that_cannot_be_created_fails_alone(filled, old_account, new_account, config):
    path = config(folders={"map": {"INBOX.Archive": "x" * 300}})  # longer than NAME_MAX
    result = run(path)
    assert not result.ok
    assert any(e.startswith("folder 'INBOX.Archive': cannot create folder") for e in
               result.errors), result.errors
    names = dict(EXPECTED_NAMES)
    del names["INBOX.Archive"]
    assert_copied(old_account, new_account, names)  # every other folder was copied
    store = Store(f"sqlite:///{path.parent / 'mailmigrate.db'}")
    (recorded,) = store.runs(store.find_job("alice"))
    store.close()
    assert recorded["outcome"] == "failed" and "cannot create folder" in recorded["error"]


def test_large_message_is_streamed_through(old_account, new_account, config, monkeypatch):
    """A message larger than a batch goes source → destination in partial FETCHes (here
    1 MB, one asked ahead): never whole in memory, hashed on the way, read back the same
    way."""
    monkeypatch.setattr(imap_copy, "STREAM_CHUNK", 1024 * 1024)  # 12 pieces, not 3
    body, mid = mailgen.make_message(random.Random(12), 1, size=12_000_000, attachment=True)
    msg = mailgen.TestMessage("INBOX.Archive", body, ("\\Seen", "$Label1"),
                              mailgen.realistic_mailbox(count=1)[0].date, mid)
    small = mailgen.realistic_mailbox(count=6, big=False, seed=13)
    mailgen.fill(old_account, [msg] + small)
    path = config()
    result, peak = run_measuring_memory(path)
    assert result.ok, result.errors
    assert result.counts["copied"] == 7
    assert peak < 9_000_000, f"peak Python allocations {peak / 1e6:.1f} MB for a 12 MB message"
    assert_copied(old_account, new_account)
    # state lost: the streamed duplicate check finds it instead of appending again
    for suffix in ("", "-wal", "-shm"):
        (path.parent / f"mailmigrate.db{suffix}").unlink(missing_ok=True)
    again = run(path)
    assert again.ok and again.counts["skipped"] == 7 and again.counts.get("copied", 0) == 0


def test_stream_given_up_early_leaves_the_connection_in_step(old_account):
    """stream_body asks for the next pieces before handing one on; a reader that stops
    early (an APPEND that failed) must not leave their answers for the next command."""
    body, _ = mailgen.make_message(random.Random(14), 1, size=300_000, attachment=True)
    client = mailgen.connect(old_account)
    client.append("INBOX", body)
    client.logout()
    raw = {"name": "s", "kind": "imap-copy", "source": old_account.endpoint_toml("imap"),
           "destination": old_account.endpoint_toml("imap")}
    endpoint = cfg.parse({"jobs": [raw]}, base_dir=old_account.server.base).jobs[0].source
    session = ImapSession.connect(endpoint)
    try:
        session.select("INBOX", readonly=True)
        pieces = session.stream_body(1, len(body), 50_000, ahead=3)
        assert next(pieces) == body[:50_000]
        pieces.close()  # three more FETCHes were on their way
        assert not session.dead
        assert session.fetch_part(1, 100_000, 7) == body[100_000:100_007]
        assert b"".join(session.stream_body(1, len(body), 64_000, ahead=2)) == body
        assert list(session.stream_body(1, len(body), 1 << 20)) == [body]  # one piece
    finally:
        session.logout()


def test_overlapping_run_of_the_same_job_does_nothing(filled, old_account, new_account,
                                                      config, tmp_path):
    path = config()
    store = Store(f"sqlite:///{tmp_path / 'mailmigrate.db'}")
    try:
        with store.job_lock("alice"):  # as if a cron run were still busy
            proc = run_cli("run", "-c", str(path), "--no-progress")
            assert proc.returncode == 3
            assert "job 'alice' is already running (pid" in proc.stderr
            assert "alice: already running elsewhere; nothing was done" in proc.stdout
            assert sum(len(v) for v in mailgen.snapshot(new_account).values()) == 0
            # a dry run is read-only and may look meanwhile
            assert run_cli("run", "-c", str(path), "--dry-run").returncode == 0
    finally:
        store.close()
    proc = run_cli("run", "-c", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert_copied(old_account, new_account)


def test_no_deletion_without_uidplus(filled, old_account, new_account, config):
    """Without UID EXPUNGE a bare EXPUNGE would also remove what others flagged
    \\Deleted: mailmigrate copies, verifies, and deletes nothing."""
    client = mailgen.connect(old_account)
    client.select_folder("INBOX")
    someone_elses = client.search("ALL")[:1]
    client.add_flags(someone_elses, ["\\Deleted"])  # flagged by another client
    client.logout()
    result = run(config(delete_after_verify=True),
                 ignore_capabilities=frozenset({"UIDPLUS"}))
    assert not result.ok
    assert any("lacks UIDPLUS" in e and "nothing was deleted" in e for e in result.errors)
    assert result.counts.get("deleted", 0) == 0
    assert sum(len(v) for v in mailgen.snapshot(old_account).values()) == len(filled)
    client = mailgen.connect(old_account)  # \\Deleted is never copied; compare the rest
    client.select_folder("INBOX")
    client.remove_flags(someone_elses, ["\\Deleted"])
    client.logout()
    assert_copied(old_account, new_account)  # the copy itself is complete


def test_copy_gone_from_destination_is_not_a_reason_to_delete(filled, old_account,
                                                              new_account, config):
    """Verified, then the destination lost two copies (a server bug, another client):
    the deletion run looks again, keeps those originals, and the next run re-copies."""
    assert run(config()).ok
    mailgen.expunge_first(new_account, "Archive/2019", 2)
    path = config(delete_after_verify=True)
    second = run(path)
    assert not second.ok
    assert any("folder 'INBOX.Archive.2019': 2 verified copies gone from 'Archive/2019'; "
               "their originals were NOT "
               "deleted" in e for e in second.errors), second.errors
    assert second.counts["deleted"] == len(filled) - 2
    left = mailgen.snapshot(old_account)
    assert len(left["INBOX.Archive.2019"]) == 2 and sum(len(v) for v in left.values()) == 2
    third = run(path)
    assert third.ok, third.errors
    assert third.counts["copied"] == 2 and third.counts["deleted"] == 2
    assert sum(len(v) for v in mailgen.snapshot(old_account).values()) == 0
    new = mailgen.snapshot(new_account)
    assert collections.Counter(m.sha256 for ms in new.values() for m in ms) == \
        collections.Counter(m.sha256 for m in filled)


def test_progress_bar_when_asked_and_silent_otherwise(filled, config, capfd):
    run(config(), progress=True)
    err = capfd.readouterr().err
    assert "alice:" in err and f"/{len(filled)} [" in err and "msg/s" in err  # total grew
    run(config())  # progress=False, as on a non-TTY (cron): nothing on stderr
    assert capfd.readouterr().err == ""
