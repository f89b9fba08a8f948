"""imap-copy against real Dovecot: deletion safety, namespaces, flags, binding identity,
colliding folder names, duplicate ownership (issue #7 items 1-7)."""

from __future__ import annotations

import collections
import random

import pytest

from migrate.states import State
from migrate.store import Store
from tests.rig import mailgen
from tests.rig.dovecot import DovecotServer, start_or_fail
from tests.rig.jobs import imap_job, run, run_cli, write_config


def hashes(account, folder=None):
    snap = mailgen.snapshot(account)
    return collections.Counter(m.sha256 for name, ms in snap.items()
                               if folder in (None, name) for m in ms)


def states(path, job="alice"):
    store = Store(f"sqlite:///{path.parent / 'mailmigrate.db'}")
    try:
        job_id = store.find_job(job)
        out = collections.Counter()
        for f in store.folders(job_id):
            out.update(r.state for r in store.messages(f.id).values())
        return out
    finally:
        store.close()


def small_mailbox(count=12, seed=70):
    return mailgen.realistic_mailbox(count=count, big=False, seed=seed)


# --- 1. every row about to be deleted is looked at again --------------------------------

def test_interrupted_deletion_looks_again_before_deleting(old_account, new_account, tmp_path):
    """A run killed between the deleting intent and the EXPUNGE; meanwhile copies vanish
    from the destination: the next run must not delete those originals."""
    msgs = [m for m in small_mailbox() if m.folder == "INBOX"]
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account,
                                                       delete_after_verify=True)])
    first = run_cli("run", "-c", str(path), "--no-progress",
                    env={"MAILMIGRATE_CRASH_AT": "before-delete:1"})
    assert first.returncode == -9, first.stderr
    assert states(path)[State.DELETING] == len(msgs)  # the intent was committed
    mailgen.expunge_first(new_account, "INBOX", 2)  # another client removes two copies
    second = run_cli("run", "-c", str(path), "--no-progress")
    assert second.returncode == 1
    assert "2 verified copies gone from 'INBOX'; their originals were NOT deleted" \
        in second.stderr
    assert len(mailgen.snapshot(old_account)["INBOX"]) == 2  # kept, not deleted
    third = run_cli("run", "-c", str(path), "--no-progress")
    assert third.returncode == 0, third.stderr
    assert mailgen.snapshot(old_account)["INBOX"] == []
    assert hashes(new_account, "INBOX") == collections.Counter(m.sha256 for m in msgs)


def test_source_without_uidplus_gets_no_deleting_intent(old_account, new_account, tmp_path):
    msgs = [m for m in small_mailbox() if m.folder == "INBOX"]
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account,
                                                       delete_after_verify=True)])
    result = run(path, ignore_capabilities=frozenset({"UIDPLUS"}))
    assert any("lacks UIDPLUS" in e and "nothing was deleted" in e for e in result.errors)
    assert states(path) == {State.VERIFIED: len(msgs)}  # no intent written
    assert len(mailgen.snapshot(old_account)["INBOX"]) == len(msgs)


# --- 2. only the personal namespace by default -------------------------------------------

@pytest.fixture(scope="module")
def public_host(test_ca):
    server = start_or_fail(DovecotServer("public", ".", test_ca, inbox_prefix=True,
                                  public_namespace=True))
    yield server
    server.cleanup()


def test_other_namespaces_are_not_copied_and_never_deleted(public_host, new_account,
                                                          tmp_path):
    alice = public_host.add_user("alice-ns@old.test", "pw-alice-ns")
    mine = [m for m in small_mailbox(seed=71) if m.folder == "INBOX"]
    theirs = [mailgen.TestMessage("Public.News", m.body, m.flags, m.date) for m in
              small_mailbox(count=4, seed=72)]
    mailgen.fill(alice, mine + theirs)
    job = imap_job("alice", alice, new_account, delete_after_verify=True)
    result = run(write_config(tmp_path / "c.toml", [job]))
    assert result.ok, result.errors
    left = mailgen.snapshot(alice)
    assert left["INBOX"] == [] and len(left["Public.News"]) == len(theirs)
    assert not any("News" in name for name in mailgen.snapshot(new_account))
    # on request other namespaces are copied - and still never deleted from
    job["other_namespaces"] = True
    result = run(write_config(tmp_path / "c2.toml", [job]))
    assert result.ok, result.errors
    assert len(mailgen.snapshot(alice)["Public.News"]) == len(theirs)
    copied = [ms for name, ms in mailgen.snapshot(new_account).items() if "News" in name]
    assert [len(ms) for ms in copied] == [len(theirs)]


# --- 3. flags are part of the copy --------------------------------------------------------

def test_duplicate_already_at_destination_gets_the_source_flags(old_account, new_account,
                                                                tmp_path):
    msgs = [m for m in small_mailbox(seed=73) if m.folder == "INBOX"][:4]
    flagged = [mailgen.TestMessage("INBOX", m.body, ("\\Seen", "\\Flagged", "project-x"),
                                   m.date, m.message_id) for m in msgs]
    mailgen.fill(old_account, flagged)
    mailgen.fill(new_account, [mailgen.TestMessage("INBOX", m.body, (), m.date)
                               for m in msgs])  # same messages, no flags
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account,
                                                       delete_after_verify=True)])
    result = run(path)
    assert result.ok, result.errors
    assert result.counts["skipped"] == len(msgs) and result.counts.get("copied", 0) == 0
    copies = mailgen.snapshot(new_account)["INBOX"]
    assert len(copies) == len(msgs)
    assert {c.flags for c in copies} == {frozenset({"\\Seen", "\\Flagged", "project-x"})}


def test_flags_changed_before_deletion_reach_the_copy(old_account, new_account, tmp_path,
                                                      monkeypatch):
    from migrate import imap_copy

    msgs = [m for m in small_mailbox(seed=74) if m.folder == "INBOX"]
    mailgen.fill(old_account, msgs)
    original = imap_copy.ImapCopy._delete_phase

    def flag_meanwhile(self, pool, runs):
        client = mailgen.connect(old_account)  # another client, after the folder's sync
        client.select_folder("INBOX")
        client.add_flags(client.search("ALL"), ["\\Answered", "$Later"])
        client.logout()
        return original(self, pool, runs)

    monkeypatch.setattr(imap_copy.ImapCopy, "_delete_phase", flag_meanwhile)
    result = run(write_config(tmp_path / "c.toml", [imap_job(
        "alice", old_account, new_account, delete_after_verify=True)]))
    assert result.ok, result.errors
    assert mailgen.snapshot(old_account)["INBOX"] == []
    copies = mailgen.snapshot(new_account)["INBOX"]
    assert len(copies) == len(msgs)
    assert all({"\\Answered", "$Later"} <= c.flags for c in copies)


# --- 4. two jobs reading one mailbox, one deleting ----------------------------------------

def test_second_job_on_a_mailbox_another_job_deletes_from_is_refused(old_account,
                                                                    new_account, tmp_path):
    """Two configs sharing one state database (the config check cannot see both)."""
    mailgen.fill(old_account, [m for m in small_mailbox(seed=75) if m.folder == "INBOX"])
    other = new_account.server.add_user("second-" + new_account.username, "pw-second")
    state = f"sqlite:///{tmp_path / 'state.db'}"
    keep = write_config(tmp_path / "keep.toml", [imap_job("keep", old_account, new_account)],
                        state)
    assert run_cli("run", "-c", str(keep), "--no-progress").returncode == 0
    path = write_config(tmp_path / "move.toml", [
        imap_job("move", old_account, other, delete_after_verify=True)], state)
    proc = run_cli("run", "-c", str(path), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "jobs 'move' and 'keep' both read mailbox" in proc.stderr
    assert "'move' deletes from it" in proc.stderr
    assert len(mailgen.snapshot(old_account)["INBOX"]) > 0  # nothing deleted
    assert mailgen.snapshot(other).get("INBOX", []) == []


# --- 5. one mailbox = one binding, whatever name reaches it -------------------------------

def test_binding_follows_the_server_not_the_host_name(old_account, new_account, tmp_path):
    mailgen.fill(old_account, [m for m in small_mailbox(seed=76) if m.folder == "INBOX"])
    state = f"sqlite:///{tmp_path / 'state.db'}"
    imap_cfg = write_config(tmp_path / "imap.toml",
                            [imap_job("by-ip", old_account, new_account)], state)
    assert run_cli("run", "-c", str(imap_cfg), "--no-progress").returncode == 0
    pop = {"name": "by-name", "kind": "pop3-archive",
           "source": old_account.endpoint_toml("pop3", host="localhost"),
           "archive": {"path": str(tmp_path / "arch")}, "delete_after_verify": True}
    proc = run_cli("run", "-c", str(write_config(tmp_path / "pop.toml", [pop], state)),
                   "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "bound to IMAP by job 'by-ip'" in proc.stderr
    assert len(mailgen.snapshot(old_account)["INBOX"]) > 0


def test_two_servers_on_one_loopback_address_are_two_mailboxes(old_account, new_account,
                                                               tmp_path):
    """SSH tunnels: different servers on 127.0.0.1, different ports, same username."""
    twin = new_account.server.add_user(old_account.username, "pw-twin")
    mailgen.fill(twin, [m for m in small_mailbox(seed=77) if m.folder == "INBOX"])
    mailgen.fill(old_account, [m for m in small_mailbox(seed=78) if m.folder == "INBOX"])
    state = f"sqlite:///{tmp_path / 'state.db'}"
    dest = old_account.server.add_user("dest-" + old_account.username, "pw-dest")
    imap_cfg = write_config(tmp_path / "imap.toml", [imap_job("imap", old_account, dest)],
                            state)
    assert run_cli("run", "-c", str(imap_cfg), "--no-progress").returncode == 0
    pop = {"name": "pop", "kind": "pop3-archive", "source": twin.endpoint_toml("pop3"),
           "archive": {"path": str(tmp_path / "arch")}}
    proc = run_cli("run", "-c", str(write_config(tmp_path / "pop.toml", [pop], state)),
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr


# --- 6. folder-name collisions ------------------------------------------------------------

def test_folders_that_would_merge_are_refused(old_account, new_account, tmp_path):
    rng = random.Random(79)
    date = small_mailbox(count=1)[0].date
    body, mid = mailgen.make_message(rng, 1)
    mailgen.fill(old_account, [mailgen.TestMessage("INBOX.Work", body, (), date, mid),
                               mailgen.TestMessage("INBOX.work", body, (), date, mid),
                               mailgen.TestMessage("INBOX", body, (), date, mid)])
    result = run(write_config(tmp_path / "c.toml", [imap_job(
        "alice", old_account, new_account, delete_after_verify=True)]))
    assert not result.ok
    refused = [e for e in result.errors if "refusing to merge them silently" in e]
    assert len(refused) == 2
    assert all("'INBOX.Work'" in e and "'INBOX.work'" in e for e in refused)
    left = mailgen.snapshot(old_account)
    assert len(left["INBOX.Work"]) == 1 and len(left["INBOX.work"]) == 1  # never deleted
    assert not any(n.lower() == "work" for n in mailgen.snapshot(new_account))


# --- 7. duplicate matching never takes another row's copy ---------------------------------

def test_identical_message_arriving_after_its_twin_was_moved_gets_its_own_copy(
        old_account, new_account, tmp_path):
    msg = [m for m in small_mailbox(seed=80) if m.folder == "INBOX"][0]
    mailgen.fill(old_account, [msg])
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account,
                                                       delete_after_verify=True)])
    assert run(path).counts["deleted"] == 1
    mailgen.fill(old_account, [msg])  # the very same message arrives again
    second = run(path)
    assert second.ok, second.errors
    assert second.counts["copied"] == 1 and second.counts["deleted"] == 1
    assert hashes(new_account, "INBOX") == collections.Counter({msg.sha256: 2})


def test_changed_destination_uidvalidity_refinds_copies_without_errors(old_account,
                                                                       new_account, tmp_path):
    msgs = [m for m in small_mailbox(seed=81) if m.folder == "INBOX"]
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    assert run(path).ok
    new_account.server.doveadm("mailbox", "update", "-u", new_account.username,
                               "--uid-validity", "777", "INBOX")
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account,
                                                       delete_after_verify=True)])
    result = run(path)
    assert result.ok, result.errors
    assert any("has a new UIDVALIDITY" in w for w in result.warnings)
    assert result.counts.get("copied", 0) == 0 and result.counts["skipped"] == len(msgs)
    assert result.counts["deleted"] == len(msgs)
    assert hashes(new_account, "INBOX") == collections.Counter(m.sha256 for m in msgs)


def test_messages_another_client_expunged_are_not_counted_as_deleted(
        old_account, new_account, tmp_path, monkeypatch):
    from migrate import imap_copy

    msgs = [m for m in small_mailbox(count=36, seed=82) if m.folder == "INBOX"]
    mailgen.fill(old_account, msgs)
    original = imap_copy.ImapCopy._delete_phase

    def expunge_meanwhile(self, pool, runs):
        mailgen.expunge_first(old_account, "INBOX", 2)  # after the sync, before deletion
        return original(self, pool, runs)

    monkeypatch.setattr(imap_copy.ImapCopy, "_delete_phase", expunge_meanwhile)
    result = run(write_config(tmp_path / "c.toml", [imap_job(
        "alice", old_account, new_account, delete_after_verify=True)]))
    assert result.ok, result.errors
    assert result.counts.get("deleted") == len(msgs) - 2, (result.counts, result.warnings)
    assert result.counts["vanished"] == 2
    assert hashes(new_account, "INBOX") == collections.Counter(m.sha256 for m in msgs)


def test_unverified_copies_in_a_recreated_destination_folder_are_found_again(
        old_account, new_account, tmp_path):
    """Rows left 'copied' (a run stopped between APPEND and verification) whose destination
    folder got a new UIDVALIDITY since: no state conflict, no second copy."""
    import sqlite3

    msgs = [m for m in small_mailbox(count=36, seed=83) if m.folder == "INBOX"]
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    assert run(path).ok
    db = sqlite3.connect(tmp_path / "mailmigrate.db")
    with db:
        db.execute("UPDATE messages SET state = 'copied'")
    db.close()
    new_account.server.doveadm("mailbox", "update", "-u", new_account.username,
                               "--uid-validity", "888", "INBOX")
    result = run(path)
    assert result.ok, result.errors
    assert result.counts.get("copied", 0) == 0 and result.counts["skipped"] == len(msgs)
    assert hashes(new_account, "INBOX") == collections.Counter(m.sha256 for m in msgs)
