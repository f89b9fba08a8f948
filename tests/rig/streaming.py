"""One check shared by the vendor tests: large messages streamed into a server and out."""

from __future__ import annotations

import collections
import random

from migrate import imap_copy
from migrate.endpoints.imap import ImapSession

from . import mailgen
from .jobs import imap_job, run, write_config


def inbox_content(account) -> collections.Counter:
    """INBOX as a multiset of (sha256, flags, INTERNALDATE): what must survive a copy."""
    return collections.Counter((m.sha256, m.flags, m.internaldate)
                               for m in mailgen.snapshot(account)["INBOX"])


def large_messages_stream_through(middle, old_account, new_account, tmp_path,
                                  monkeypatch) -> None:
    """Messages larger than a batch travel in partial FETCHes (several on their way once
    the server's answers say their origin) and a streamed APPEND, old → middle → new;
    every copy is read back the same way and compared."""
    monkeypatch.setattr(imap_copy, "STREAM_CHUNK", 64 * 1024)  # 7-10 pieces a message
    streamed = []
    append_streamed = ImapSession.append_streamed
    monkeypatch.setattr(ImapSession, "append_streamed", lambda self, *args: (
        streamed.append(self.endpoint.host), append_streamed(self, *args))[1])
    rng = random.Random(26)
    date = mailgen.realistic_mailbox(count=1)[0].date
    msgs = []
    for i in range(3):
        body, mid = mailgen.make_message(rng, i, size=450_000 + 80_000 * i, attachment=True)
        msgs.append(mailgen.TestMessage("INBOX", body, ("\\Seen", "$Label1"), date, mid))
    mailgen.fill(old_account, msgs)
    hops = ((old_account, middle), (middle, new_account))
    for n, (source, destination) in enumerate(hops):
        path = write_config(tmp_path / f"c{n}.toml", [imap_job(f"large{n}", source,
                                                                  destination)])
        result = run(path, batch_bytes=100_000)
        assert result.ok, result.errors
        assert result.counts["copied"] == len(msgs)
    assert len(streamed) == 2 * len(msgs)  # every copy took the streamed path
    expected = inbox_content(old_account)
    assert inbox_content(middle) == expected
    assert inbox_content(new_account) == expected
