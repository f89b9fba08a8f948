"""Fifty mailboxes from one CSV, logged in as an admin (no user passwords), eight jobs at
once, the per-server connection limit held across all of them - against real Dovecot
servers with master users (issue 8, "Many mailboxes" + "Admin login")."""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import uuid

import pytest

from tests.rig import mailgen
from tests.rig.countingproxy import CountingProxy
from tests.rig.dovecot import DovecotServer, start_or_fail
from tests.rig.jobs import run_cli, write_config

ADMIN = "migration-admin@old.test"
ADMIN_PASSWORD = "adm-" + uuid.uuid4().hex
MAILBOXES = 50
PER_MAILBOX = 4
LIMIT = 3


@pytest.fixture(scope="module")
def admin_pair(test_ca):
    old = start_or_fail(DovecotServer("many-old", ".", test_ca, inbox_prefix=True,
                                 master_users={ADMIN: ADMIN_PASSWORD}))
    new = start_or_fail(DovecotServer("many-new", "/", test_ca, inbox_prefix=False,
                                 master_users={ADMIN: ADMIN_PASSWORD}))
    yield old, new
    old.cleanup()
    new.cleanup()


def test_fifty_mailboxes_admin_login_eight_workers(admin_pair, tmp_path):
    old, new = admin_pair
    rng = random.Random(50)
    rows, expected = [], {}
    for i in range(MAILBOXES):
        # passwords nobody tells mailmigrate: the admin logs in for them
        src = old.add_user(f"user{i}@old.test", "secret-" + uuid.uuid4().hex)
        dst = new.add_user(f"user{i}@new.test", "secret-" + uuid.uuid4().hex)
        msgs = [mailgen.TestMessage(
            "INBOX" if n % 2 else "INBOX.Work", mailgen.make_message(rng, i * 100 + n)[0],
            ("\\Seen",) if n % 3 == 0 else (),
            dt.datetime(2023, 2, 1 + n, tzinfo=dt.timezone.utc)) for n in range(PER_MAILBOX)]
        mailgen.fill(src, msgs)
        rows.append(f"{src.username},{dst.username}\n")
        expected[dst.username] = (dst, sorted(m.sha256 for m in msgs))
    (tmp_path / "accounts.csv").write_text("source_user,destination_user\n" + "".join(rows))
    proxy = CountingProxy(old.ports["imaps"])
    try:
        admin = {"auth": "admin", "admin_user": ADMIN, "admin_password_env": "MM_ADMIN"}
        job = {"name": "all", "kind": "imap-copy", "accounts": "accounts.csv",
               "source": {"host": "127.0.0.1", "port": proxy.port, "security": "ssl",
                          "ca_file": str(old.ca_file), "max_connections": LIMIT, **admin},
               "destination": {"host": "127.0.0.1", "port": new.ports["imaps"],
                               "security": "ssl", "ca_file": str(new.ca_file), **admin}}
        path = write_config(tmp_path / "config.toml", [job])
        proc = run_cli("run", "-c", str(path), "--workers", "8", "--no-progress",
                       env={"MM_ADMIN": ADMIN_PASSWORD, **os.environ})
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr
    assert ADMIN_PASSWORD not in proc.stdout + proc.stderr
    # the limit is one of the server's, across all eight workers' jobs
    assert 1 < proxy.peak <= LIMIT, f"peak {proxy.peak} concurrent source connections"
    assert proxy.connections >= MAILBOXES
    for dst, hashes in expected.values():
        got = sorted(m.sha256 for ms in mailgen.snapshot(dst).values() for m in ms)
        assert got == hashes, dst.username  # every message exactly once
    lines = proc.stdout.strip().splitlines()
    summaries = [line for line in lines if line.startswith("all:")]
    assert len(summaries) == MAILBOXES
    assert all(int(re.search(r"(\d+) copied", line).group(1)) == PER_MAILBOX
               for line in summaries)
    assert lines[-1].startswith(f"total: {MAILBOXES} jobs: ")
    assert f", {MAILBOXES * PER_MAILBOX} copied or archived," in lines[-1]
