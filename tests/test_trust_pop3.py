"""pop3-archive deletion safety against real Dovecot (issue #7 item 1, POP3 side): rows
left 'deleting' by an interrupted run are looked at again like verified ones."""

from __future__ import annotations

from tests.rig import mailgen
from tests.rig.jobs import run_cli, write_config


def test_interrupted_pop3_deletion_looks_at_the_archive_again(old_account, tmp_path):
    msgs = [m for m in mailgen.realistic_mailbox(count=30, big=False, seed=85)
            if m.folder == "INBOX"]
    mailgen.fill(old_account, msgs)
    archive = tmp_path / "arch"
    path = write_config(tmp_path / "c.toml", [{
        "name": "archive", "kind": "pop3-archive", "source": old_account.endpoint_toml("pop3"),
        "archive": {"path": str(archive)}, "delete_after_verify": True}])
    first = run_cli("run", "-c", str(path), "--no-progress",
                    env={"MAILMIGRATE_CRASH_AT": "before-quit:1"})
    assert first.returncode == -9, first.stderr  # DELE sent, QUIT never: nothing deleted
    assert len(mailgen.snapshot(old_account)["INBOX"]) == len(msgs)
    files = sorted(p for sub in ("new", "cur") for p in (archive / sub).iterdir())
    assert len(files) == len(msgs)
    files[0].unlink()  # removed by hand before the next run
    second = run_cli("run", "-c", str(path), "--no-progress")
    assert second.returncode == 1, second.stderr
    assert "1 verified copy gone from the archive" in second.stderr
    assert len(mailgen.snapshot(old_account)["INBOX"]) == 1  # that one was kept
    third = run_cli("run", "-c", str(path), "--no-progress")
    assert third.returncode == 0, third.stderr
    assert mailgen.snapshot(old_account)["INBOX"] == []
    assert len([p for sub in ("new", "cur") for p in (archive / sub).iterdir()]) == len(msgs)
