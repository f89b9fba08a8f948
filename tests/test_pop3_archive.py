"""pop3-archive against the real Dovecot POP3 service."""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import mailbox
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from migrate import config as cfg
from migrate.engine import run_jobs
from migrate.runner import RunOptions
from migrate.states import State
from migrate.store import Store
from tests.rig import mailgen
from tests.rig.jobs import imap_job, run, run_cli, run_measuring_memory, write_config


def pop_job(account, archive: Path, name="archive", **extra) -> dict:
    job = {"name": name, "kind": "pop3-archive",
           "source": account.endpoint_toml("pop3"), "archive": {"path": str(archive)}}
    job.update(extra)
    return job


def inbox_messages(count=25, seed=11) -> list[mailgen.TestMessage]:
    msgs = mailgen.realistic_mailbox(count=count * 6, seed=seed, big=False)
    inbox = [m for m in msgs if m.folder == "INBOX"][:count]
    rng = random.Random(seed)
    big, _ = mailgen.make_message(rng, 10_000, size=4_000_000, attachment=True)
    dot, _ = mailgen.make_message(rng, 10_001, lone_dot=True, eight_bit=True)
    inbox.append(mailgen.TestMessage("INBOX", big, (), inbox[0].date))
    inbox.append(mailgen.TestMessage("INBOX", dot, ("\\Seen",), inbox[0].date))
    return inbox


def archive_files(root: Path) -> list[bytes]:
    return [p.read_bytes() for sub in ("new", "cur") for p in sorted((root / sub).iterdir())]


def server_bodies(account) -> collections.Counter:
    """What the server holds, read over IMAP: the reference for byte-identity."""
    return collections.Counter(m.sha256 for m in mailgen.snapshot(account).get("INBOX", []))


def hashes(blobs) -> collections.Counter:
    return collections.Counter(hashlib.sha256(b).hexdigest() for b in blobs)


@pytest.fixture
def filled(old_account):
    msgs = inbox_messages()
    mailgen.fill(old_account, msgs)
    return msgs


def test_archive_is_byte_identical_and_a_real_maildir(filled, old_account, tmp_path):
    reference = server_bodies(old_account)
    assert reference == collections.Counter(m.sha256 for m in filled)  # lone '.' kept
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, tmp_path / "arch")])
    result = run(path)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(filled)
    assert hashes(archive_files(tmp_path / "arch")) == reference
    md = mailbox.Maildir(tmp_path / "arch", create=False)
    assert len(md) == len(filled)
    subjects = {str(m["subject"]) for m in md}
    assert any("#10001" in s for s in subjects)
    # nothing outside the archive was written, and no temp files remain
    assert sorted(os.listdir(tmp_path / "arch")) == ["cur", "new", "tmp"]
    assert os.listdir(tmp_path / "arch" / "tmp") == []
    # keep-on-server is the default: the server still has everything
    assert server_bodies(old_account) == reference


def test_rerun_downloads_nothing_and_picks_up_new_mail(filled, old_account, tmp_path):
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, tmp_path / "arch")])
    run(path)
    again = run(path)
    assert again.ok and again.counts.get("copied", 0) == 0
    body, _ = mailgen.make_message(random.Random(3), 77)
    mailgen.fill(old_account, [mailgen.TestMessage("INBOX", body, (), filled[0].date)])
    third = run(path)
    assert third.counts["copied"] == 1
    assert len(archive_files(tmp_path / "arch")) == len(filled) + 1


def test_delete_after_verify_empties_the_server(filled, old_account, tmp_path):
    reference = server_bodies(old_account)
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, tmp_path / "arch",
                                                      delete_after_verify=True)])
    result = run(path)
    assert result.ok, result.errors
    assert result.counts["deleted"] == len(filled)
    assert server_bodies(old_account) == collections.Counter()
    assert hashes(archive_files(tmp_path / "arch")) == reference


def test_failed_write_keeps_the_message_on_the_server(filled, old_account, tmp_path):
    """A real write failure: the tool runs with a 1 MB file size limit (EFBIG), so only
    the 4 MB message cannot be stored."""
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, tmp_path / "arch",
                                                      delete_after_verify=True)])

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))

    proc = subprocess.run([sys.executable, "-m", "migrate", "run", "-c", str(path),
                           "--no-progress"], capture_output=True, text=True, timeout=120,
                          preexec_fn=limit, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "File too large" in proc.stderr and "it stays on the server" in proc.stderr
    assert "1 failed" in proc.stdout
    left = mailgen.snapshot(old_account)["INBOX"]
    assert len(left) == 1 and left[0].size > 3_000_000
    assert len(archive_files(tmp_path / "arch")) == len(filled) - 1
    assert os.listdir(tmp_path / "arch" / "tmp") == []
    # without the limit the next run archives it and deletes it
    again = run(path)
    assert again.ok and again.counts["copied"] == 1 and again.counts["deleted"] == 1
    assert server_bodies(old_account) == collections.Counter()


def test_cut_before_quit_deletes_nothing_and_next_run_completes(filled, old_account,
                                                                tmp_path):
    reference = server_bodies(old_account)
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, tmp_path / "arch",
                                                      delete_after_verify=True)])
    proc = run_cli("run", "-c", str(path), "--no-progress",
                   env={"MAILMIGRATE_CRASH_AT": "before-quit:1"})
    assert proc.returncode == -9  # killed after every DELE, before QUIT
    assert server_bodies(old_account) == reference  # POP3: no QUIT, nothing deleted
    store = Store(f"sqlite:///{tmp_path / 'mailmigrate.db'}")
    folder = store.folders(store.find_job("archive"))[0]
    assert {r.state for r in store.messages(folder.id).values()} == {State.DELETING}
    store.close()
    again = run(path)
    assert again.ok, again.errors
    assert again.counts.get("copied", 0) == 0  # DELE re-issued without re-downloading
    assert again.counts["deleted"] == len(filled)
    assert server_bodies(old_account) == collections.Counter()
    assert hashes(archive_files(tmp_path / "arch")) == reference


def test_leave_on_server_days(filled, old_account, tmp_path):
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, tmp_path / "arch",
                                                      leave_on_server_days=30)])
    config = cfg.load(path)
    now = dt.datetime.now(dt.timezone.utc)
    opts = RunOptions(progress=False, retry_wait=0.05)

    def run_at(when):
        store = Store(config.state_url, clock=lambda: when)
        try:
            (result,) = run_jobs(config, None, opts, store=store)
        finally:
            store.close()
        return result

    first = run_at(now - dt.timedelta(days=40))  # archived 40 days ago
    assert first.counts["copied"] == len(filled) and first.counts.get("deleted", 0) == 0
    body, _ = mailgen.make_message(random.Random(4), 555)
    mailgen.fill(old_account, [mailgen.TestMessage("INBOX", body, (), filled[0].date)])
    # 20 days later: the first batch is 20 days old, younger than 30: nothing goes
    second = run_at(now - dt.timedelta(days=20))
    assert second.counts["copied"] == 1 and second.counts.get("deleted", 0) == 0
    third = run_at(now)
    assert third.ok, third.errors
    assert third.counts["deleted"] == len(filled)  # archived 40 days ago: gone
    left = mailgen.snapshot(old_account)["INBOX"]
    # archived 20 days ago: stays
    assert [m.sha256 for m in left] == [hashlib.sha256(body).hexdigest()]
    assert len(archive_files(tmp_path / "arch")) == len(filled) + 1


@pytest.mark.parametrize("point", ["after-intent:1", "message-written:5",
                                   "files-synced:1", "archive-written:1"])
def test_kill_9_mid_pull_then_rerun_archives_each_once(point, filled, old_account,
                                                       tmp_path):
    reference = server_bodies(old_account)
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, tmp_path / "arch")])
    proc = run_cli("run", "-c", str(path), "--no-progress", "--batch-messages", "10",
                   env={"MAILMIGRATE_CRASH_AT": point})
    assert proc.returncode == -9
    proc = run_cli("run", "-c", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert hashes(archive_files(tmp_path / "arch")) == reference
    assert os.listdir(tmp_path / "arch" / "tmp") == []


def test_dry_run_lists_and_touches_nothing(filled, old_account, tmp_path):
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, tmp_path / "arch",
                                                      delete_after_verify=True)])
    proc = run_cli("run", "-c", str(path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert (f"INBOX → {tmp_path / 'arch'} (archive, POP3 mailbox): {len(filled)} messages "
            in proc.stdout), proc.stdout
    assert f"0 already there, {len(filled)} to copy" in proc.stdout
    assert "delete_after_verify: " in proc.stdout
    assert not (tmp_path / "arch").exists()
    assert len(mailgen.snapshot(old_account)["INBOX"]) == len(filled)


def test_protocol_binding_refuses_the_other_protocol(filled, old_account, new_account,
                                                     tmp_path):
    state = f"sqlite:///{tmp_path / 'shared.db'}"
    imap_cfg = write_config(tmp_path / "imap.toml",
                            [imap_job("alice-imap", old_account, new_account)], state)
    pop_cfg = write_config(tmp_path / "pop.toml",
                           [pop_job(old_account, tmp_path / "arch", name="alice-pop")], state)
    assert run_cli("run", "-c", str(imap_cfg), "--no-progress").returncode == 0
    proc = run_cli("run", "-c", str(pop_cfg), "--no-progress")
    assert proc.returncode == 2
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    imaps = old_account.server.ports["imaps"]
    assert (f"job 'alice-pop' would use POP3 on mailbox {old_account.username} at "
            f"127.0.0.1:{imaps}, "
            f"but that mailbox is bound to IMAP by job 'alice-imap' since {today}") \
        in proc.stderr
    assert "a POP3 client deletes mail from the server that IMAP clients still expect" \
        in proc.stderr
    assert not (tmp_path / "arch").exists()  # refused before connecting
    # a dry run is refused as well
    assert run_cli("run", "-c", str(pop_cfg), "--dry-run").returncode == 2
    # deliberately released, the POP3 job may run
    proc = run_cli("unbind", old_account.username, "-c", str(pop_cfg))
    assert proc.returncode == 0 and "was bound to IMAP by job 'alice-imap'" in proc.stdout
    proc = run_cli("run", "-c", str(pop_cfg), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    # and now the IMAP job is the one refused
    proc = run_cli("run", "-c", str(imap_cfg), "--no-progress")
    assert proc.returncode == 2 and "bound to POP3 by job 'alice-pop'" in proc.stderr


def test_vanished_pop3_messages_are_reported(filled, old_account, tmp_path):
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, tmp_path / "arch")])
    run(path)
    mailgen.expunge_first(old_account, "INBOX", 3)
    result = run(path)
    assert result.counts["vanished"] == 3
    assert any("3 messages vanished from the server" in w for w in result.warnings)


@pytest.mark.parametrize("cut_after", [300, 3_000, 1_000_000],
                         ids=["tls-handshake", "login", "retr"])
def test_connection_cut_reconnects_and_finishes(cut_after, filled, old_account, tmp_path):
    from tests.rig.proxy import CuttingProxy

    reference = server_bodies(old_account)
    proxy = CuttingProxy(old_account.server.ports["pop3s"], cut_after, "down", cuts=2)
    try:
        job = pop_job(old_account, tmp_path / "arch", delete_after_verify=True)
        job["source"]["port"] = proxy.port
        result = run(write_config(tmp_path / "c.toml", [job]))
        assert proxy.cuts_done == 2, "the proxy never cut: the test exercised nothing"
    finally:
        proxy.close()
    assert result.ok, result.errors
    assert hashes(archive_files(tmp_path / "arch")) == reference
    assert server_bodies(old_account) == collections.Counter()


def test_large_message_is_streamed_not_buffered(old_account, tmp_path):
    body, _ = mailgen.make_message(random.Random(50), 1, size=20_000_000, attachment=True)
    mailgen.fill(old_account, [mailgen.TestMessage("INBOX", body, (),
                                                   mailgen.realistic_mailbox(count=1)[0].date)])
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, tmp_path / "arch")])
    result, peak = run_measuring_memory(path)
    assert result.ok, result.errors
    assert archive_files(tmp_path / "arch") == [body]
    assert peak < 8_000_000, f"peak Python allocations {peak / 1e6:.1f} MB for a 20 MB message"


def test_server_without_uidl_is_refused_clearly(tmp_path):
    from tests.rig.fakepop import FakePop3

    server = FakePop3({"a": b"Subject: x\r\n\r\nbody\r\n"}, uidl=False)
    job = {"name": "legacy", "kind": "pop3-archive", "source": server.job_source(),
           "archive": {"path": str(tmp_path / "arch")}}
    proc = run_cli("run", "-c", str(write_config(tmp_path / "c.toml", [job])))
    server.close()
    assert proc.returncode == 1
    assert "does not support UIDL: without stable message ids a resumable archive is " \
           "impossible" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_message_that_vanishes_and_comes_back_is_archived_once(tmp_path):
    from tests.rig.fakepop import FakePop3

    bodies = {k: f"Subject: {k}\r\nMessage-ID: <{k}@x>\r\n\r\n.dotted\r\n".encode()
              for k in ("uid-a", "uid-b", "uid-c")}
    server = FakePop3(bodies)
    job = {"name": "legacy", "kind": "pop3-archive", "source": server.job_source(),
           "archive": {"path": str(tmp_path / "arch")}, "delete_after_verify": False}
    path = write_config(tmp_path / "c.toml", [job])
    try:
        server.hidden = {"uid-b"}  # hidden before it was ever archived
        first = run(path)
        assert first.counts["copied"] == 2
        server.hidden = {"uid-c"}  # b appears, c (archived) hides
        second = run(path)
        assert second.counts["copied"] == 1 and second.counts["vanished"] == 1
        server.hidden = set()  # c is back: checked again, still one file in the archive
        third = run(path)
        assert third.ok, third.errors
        # downloaded and re-verified: the identical file is recognised, not stored twice
        assert third.counts.get("copied", 0) == 0 and third.counts["skipped"] == 1
    finally:
        server.close()
    assert hashes(archive_files(tmp_path / "arch")) == hashes(bodies.values())


def test_refused_job_does_not_stop_the_others(filled, old_account, new_account, tmp_path):
    state = f"sqlite:///{tmp_path / 'shared.db'}"
    imap_cfg = write_config(tmp_path / "imap.toml",
                            [imap_job("alice-imap", old_account, new_account)], state)
    assert run_cli("run", "-c", str(imap_cfg), "--no-progress").returncode == 0
    both = write_config(tmp_path / "both.toml", [
        pop_job(old_account, tmp_path / "arch", name="alice-pop"),
        pop_job(new_account, tmp_path / "arch2", name="bob-pop")], state)
    proc = run_cli("run", "-c", str(both), "--no-progress")
    assert proc.returncode == 2
    assert "alice-pop: refused; nothing was done" in proc.stdout
    # the other job ran: it archived what the IMAP job had copied to new_account
    assert f"bob-pop: {len(filled)} archived" in proc.stdout
    assert (tmp_path / "arch2" / "new").is_dir()


def test_archive_file_gone_before_deletion_keeps_the_message(filled, old_account, tmp_path):
    arch = tmp_path / "arch"
    assert run(write_config(tmp_path / "c.toml", [pop_job(old_account, arch)])).ok
    files = sorted((arch / "new").iterdir())
    files[0].unlink()  # lost from the archive
    read = files[1]  # read by a mail client: moved to cur/ with flags
    read.rename(arch / "cur" / (read.name + ":2,S"))
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, arch,
                                                      delete_after_verify=True)])
    second = run(path)
    assert not second.ok
    assert any(f"POP3 mailbox: 1 verified copy gone from the archive {arch}" in e
               for e in second.errors), second.errors
    assert second.counts["deleted"] == len(filled) - 1  # the moved file still counts
    assert len(mailgen.snapshot(old_account)["INBOX"]) == 1
    third = run(path)
    assert third.ok, third.errors
    assert third.counts["copied"] == 1 and third.counts["deleted"] == 1
    assert server_bodies(old_account) == collections.Counter()
    assert hashes(archive_files(arch)) == collections.Counter(m.sha256 for m in filled)
