"""SIGTERM/SIGINT: stop after the batch in flight, summarise, record the run as aborted;
a second signal stops at once; the next run completes with every message exactly once."""

from __future__ import annotations

import signal
import subprocess
import time

from migrate.store import Store
from tests.rig.interrupt import (
    StallingProxy, count_in, fill_many, hashes_at, hashes_of, start_cli, wait_for_copies,
)
from tests.rig.jobs import imap_job, run_cli, write_config

MESSAGES = 3000


def outcomes(tmp_path) -> list[str]:
    store = Store(f"sqlite:///{tmp_path / 'mailmigrate.db'}")
    try:
        return [r["outcome"] for r in store.runs(store.find_job("alice"))]
    finally:
        store.close()


def test_sigterm_finishes_the_batch_prints_the_summary_and_records_aborted(
        old_account, new_account, tmp_path):
    bodies = fill_many(old_account, MESSAGES)
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    proc = start_cli("run", "-c", str(path), "--no-progress", "--batch-messages", "5")
    wait_for_copies(proc, new_account)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("still copying 20 s after SIGTERM") from None
    took = time.monotonic() - sent
    assert took < 5, f"took {took:.1f} s to stop"
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert "SIGTERM: stopping after the batch in flight" in err
    assert "Traceback" not in err
    (summary,) = [line for line in out.splitlines() if line.startswith("alice:")]
    assert summary.startswith("alice: INTERRUPTED — 2 folders, "), summary
    copied = count_in(new_account)
    assert 0 < copied < MESSAGES  # really stopped early, not at the end
    assert outcomes(tmp_path) == ["aborted"]
    again = run_cli("run", "-c", str(path), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert f"alice: 2 folders, {MESSAGES - copied} copied" in again.stdout
    assert hashes_at(new_account) == hashes_of(bodies)  # each message exactly once
    assert outcomes(tmp_path) == ["aborted", "ok"]


def test_second_sigint_stops_at_once_and_the_next_run_recovers(old_account, new_account,
                                                                tmp_path):
    """The destination hangs mid-batch: the first Ctrl-C waits for the batch in flight,
    the second one stops at once."""
    bodies = fill_many(old_account, MESSAGES, seed=6)
    proxy = StallingProxy(new_account.server.ports["imaps"])
    try:
        hanging = imap_job("alice", old_account, new_account)
        hanging["destination"]["port"] = proxy.port
        path = write_config(tmp_path / "c.toml", [hanging])
        proc = start_cli("run", "-c", str(path), "--no-progress", "--batch-messages", "5")
        wait_for_copies(proc, new_account)
        proxy.stall.set()
        proc.send_signal(signal.SIGINT)
        first = proc.stderr.readline()  # the handler ran
        assert "SIGINT: stopping after the batch in flight" in first
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("a second Ctrl-C did not stop at once") from None
    finally:
        proxy.close()
    assert proc.returncode == 128 + signal.SIGINT, (proc.returncode, err)
    assert "SIGINT again: stopping now" in err
    assert "Traceback" not in err
    assert count_in(new_account) < MESSAGES
    assert outcomes(tmp_path) == ["running"]  # no time to record anything
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    again = run_cli("run", "-c", str(path), "--no-progress")
    assert again.returncode == 0, again.stderr
    # the run the killed process left "running" is seen to have been aborted
    assert outcomes(tmp_path) == ["aborted", "ok"]
    assert hashes_at(new_account) == hashes_of(bodies)
