"""imap-copy fetches the next batch from the source while the destination appends and
reads back the current one (real Dovecot on both sides; the sessions are only watched)."""

from __future__ import annotations

import dataclasses
import threading

from migrate.endpoints.imap import ImapSession
from tests.rig import mailgen
from tests.rig.jobs import imap_job, run, write_config

BATCH = 5


class Watch:
    """Counts source FETCHes begun and holds each destination APPEND until the source
    FETCH of the following batch has begun (or a generous time passed: then the
    overlap is missing and the test fails, it does not hang)."""

    def __init__(self, source_port: int, batches: int):
        self.source_port = source_port
        self.batches = batches
        self.fetches = 0
        self.appends = 0
        self.overlapped = 0
        self.cond = threading.Condition()

    def is_source(self, session: ImapSession) -> bool:
        return session.endpoint.port == self.source_port


def test_next_batch_is_fetched_while_the_current_one_is_appended(
        old_account, new_account, tmp_path, monkeypatch):
    msgs = [dataclasses.replace(m, folder="INBOX")
            for m in mailgen.realistic_mailbox(count=20, big=False, seed=7)]
    mailgen.fill(old_account, msgs)
    batches = -(-len(msgs) // BATCH)
    watch = Watch(old_account.server.ports["imaps"], batches)
    fetch, append = ImapSession.fetch_bodies, ImapSession.append

    def watched_fetch(self, uids):
        if watch.is_source(self):
            with watch.cond:
                watch.fetches += 1
                watch.cond.notify_all()
        return fetch(self, uids)

    def watched_append(self, folder, items):
        with watch.cond:
            watch.appends += 1
            n = watch.appends
            if n < watch.batches and watch.cond.wait_for(
                    lambda: watch.fetches >= n + 1, timeout=60):
                watch.overlapped += 1
        return append(self, folder, items)

    monkeypatch.setattr(ImapSession, "fetch_bodies", watched_fetch)
    monkeypatch.setattr(ImapSession, "append", watched_append)
    path = write_config(tmp_path / "c.toml", [imap_job("overlap", old_account, new_account)])
    result = run(path, batch_messages=BATCH)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(msgs)
    assert watch.appends == batches
    # every append but the last found the next batch's FETCH already under way
    assert watch.overlapped == batches - 1
    copied = mailgen.snapshot(new_account)["INBOX"]
    assert sorted(m.sha256 for m in copied) == sorted(m.sha256 for m in msgs)
