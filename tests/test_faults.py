"""Dropped connections in the middle of a copy: reconnect, continue, exactly once."""

from __future__ import annotations

import collections

import pytest

from tests.rig import mailgen
from tests.rig.jobs import imap_job, run, write_config
from tests.rig.proxy import CuttingProxy


def all_hashes(account):
    return collections.Counter(m.sha256 for ms in mailgen.snapshot(account).values()
                               for m in ms)


@pytest.mark.parametrize("side,direction,cut_after", [
    ("source", "down", 300),           # in the TLS handshake
    ("destination", "down", 2_500),    # around LOGIN
    ("source", "down", 120_000),       # while fetching bodies
    ("destination", "up", 120_000),    # in the middle of a MULTIAPPEND
    ("destination", "down", 100_000),  # while reading copies back to verify
])
def test_connection_cut_mid_copy_reconnects_and_finishes(side, direction, cut_after,
                                                         old_account, new_account, tmp_path):
    msgs = mailgen.realistic_mailbox(count=40, big=False, seed=8)
    mailgen.fill(old_account, msgs)
    target = old_account if side == "source" else new_account
    proxy = CuttingProxy(target.server.ports["imaps"], cut_after, direction, cuts=2)
    try:
        job = imap_job("alice", old_account, new_account)
        job[side]["port"] = proxy.port
        job[side]["max_connections"] = 1
        path = write_config(tmp_path / "c.toml", [job])
        result = run(path)
        assert proxy.cuts_done == 2, "the proxy never cut: the test exercised nothing"
        assert proxy.connections >= 3  # reconnected after each cut
        assert result.ok, result.errors
    finally:
        proxy.close()
    assert all_hashes(new_account) == collections.Counter(m.sha256 for m in msgs)


def test_connection_that_keeps_failing_is_reported_not_hung(old_account, new_account,
                                                            tmp_path):
    mailgen.fill(old_account, mailgen.realistic_mailbox(count=12, big=False, seed=9))
    proxy = CuttingProxy(old_account.server.ports["imaps"], 100_000, "down", cuts=1000)
    try:
        job = imap_job("alice", old_account, new_account)
        job["source"]["port"] = proxy.port
        path = write_config(tmp_path / "c.toml", [job])
        result = run(path, retries=2)
    finally:
        proxy.close()
    assert not result.ok
    assert any("connection to 127.0.0.1" in e and "lost" in e for e in result.errors)


@pytest.mark.parametrize("side,direction", [("source", "down"), ("destination", "up")])
def test_connection_cut_inside_a_streamed_append_leaves_no_partial_copy(
        side, direction, old_account, new_account, tmp_path):
    import random

    body, mid = mailgen.make_message(random.Random(30), 1, size=6_000_000, attachment=True)
    date = mailgen.realistic_mailbox(count=1)[0].date
    mailgen.fill(old_account, [mailgen.TestMessage("INBOX", body, (), date, mid)])
    target = old_account if side == "source" else new_account
    proxy = CuttingProxy(target.server.ports["imaps"], 3_000_000, direction, cuts=1)
    try:
        job = imap_job("alice", old_account, new_account)
        job[side]["port"] = proxy.port
        result = run(write_config(tmp_path / "c.toml", [job]))
        assert proxy.cuts_done == 1, "the proxy never cut: the test exercised nothing"
    finally:
        proxy.close()
    assert result.ok, result.errors
    assert all_hashes(new_account) == collections.Counter([mailgen.TestMessage(
        "INBOX", body, (), date).sha256])  # exactly one, complete copy
