"""Many mailboxes from one list: an accounts CSV per [[jobs]] entry, --workers, and the
per-server connection limit shared by every job of a run."""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import uuid
from pathlib import Path

import pytest

from migrate import config as cfg
from migrate.config import Refusal
from migrate.errors import ConfigError
from tests.rig import mailgen
from tests.rig.countingproxy import CountingProxy
from tests.rig.jobs import run_cli, write_config


def _entry(kind="imap-copy", **extra) -> dict:
    job = {"name": "staff", "kind": kind, "accounts": "accounts.csv",
           "source": {"host": "mail.old.example", "port": 1993, "max_connections": 2,
                      "password_env": "OLD_PW"}}
    if kind == "imap-copy":
        job["destination"] = {"host": "mail.new.example", "password_env": "NEW_PW"}
    else:
        job["archive"] = {"path": "archive"}
    job.update(extra)
    return job


def _write(tmp_path: Path, csv_text: str, jobs: list[dict], mode: int = 0o600) -> Path:
    accounts = tmp_path / "accounts.csv"
    accounts.write_text(csv_text, encoding="utf-8")
    os.chmod(accounts, mode)
    return write_config(tmp_path / "config.toml", jobs)


def test_each_row_is_a_job_sharing_the_entry_settings(tmp_path):
    path = _write(tmp_path, "source_user,destination_user,source_password\n"
                  "alice@old.example,,\n"
                  "bob@old.example,robert@new.example,s3cret\n", [_entry()])
    c = cfg.load(path)
    assert [j.name for j in c.jobs] == ["staff:alice@old.example", "staff:bob@old.example"]
    alice, bob = c.jobs
    assert (alice.source.host, alice.source.port, alice.source.max_connections) == \
        ("mail.old.example", 1993, 2)
    assert alice.source.username == "alice@old.example"
    assert alice.destination.username == "alice@old.example"  # default: the same
    assert alice.source.password.kind == "password_env"  # the entry's source
    assert bob.destination.username == "robert@new.example"
    assert bob.source.password.kind == "password"
    assert bob.source.password.reveal() == "s3cret"
    assert bob.destination.password.kind == "password_env"
    assert c.refusals == ()
    assert c.groups == {"staff": ("staff:alice@old.example", "staff:bob@old.example")}


def test_pop3_rows_get_one_maildir_each_below_the_entry_archive(tmp_path):
    path = _write(tmp_path, "source_user,archive\nann@old.example,\nben@old.example,keep/ben\n",
                  [_entry("pop3-archive")])
    ann, ben = cfg.load(path).jobs
    assert ann.archive.path == tmp_path / "archive" / "ann@old.example"
    assert ben.archive.path == tmp_path / "keep" / "ben"


def test_job_selects_an_entry_or_one_row(tmp_path):
    alone = {"name": "solo", "kind": "imap-copy",
             "source": {"host": "a.example", "username": "s@a.example", "password": "x"},
             "destination": {"host": "b.example", "username": "s@b.example", "password": "y"}}
    path = _write(tmp_path, "source_user\na@old.example\nb@old.example\n",
                  [alone, _entry()])
    c = cfg.load(path)
    assert [j.name for j in c.select(["staff"])] == ["staff:a@old.example",
                                                     "staff:b@old.example"]
    assert [j.name for j in c.select(["staff:b@old.example"])] == ["staff:b@old.example"]
    assert [j.name for j in c.select(None)] == ["solo", "staff:a@old.example",
                                                "staff:b@old.example"]
    with pytest.raises(ConfigError, match=r"no job named .staf.*accounts entry.s rows"):
        c.select(["staf"])


def test_passwords_in_a_file_others_can_read_are_refused_with_the_fix(tmp_path):
    path = _write(tmp_path, "source_user,source_password\na@old.example,pw\n", [_entry()],
                  mode=0o644)
    with pytest.raises(ConfigError) as err:
        cfg.load(path)
    assert f"run: chmod 600 {tmp_path / 'accounts.csv'}" in str(err.value)
    os.chmod(tmp_path / "accounts.csv", 0o600)
    assert len(cfg.load(path).jobs) == 1
    # no passwords in it: readable is fine
    _write(tmp_path, "source_user\na@old.example\n", [_entry()], mode=0o644)
    assert len(cfg.load(path).jobs) == 1


def test_bad_rows_are_refused_alone(tmp_path):
    path = _write(tmp_path, "source_user,destination_user\n"
                  "good@old.example,\n"
                  ",nobody@new.example\n"
                  "not-an-address,\n"
                  "good@old.example,other@new.example\n"
                  "also-good@old.example,\n", [_entry()])
    c = cfg.load(path)
    assert [j.name for j in c.jobs] == ["staff:good@old.example",
                                        "staff:also-good@old.example"]
    by_name = {r.name: r.message for r in c.refusals}
    assert set(by_name) == {"staff:line-3", "staff:not-an-address", "staff:line-5"}
    assert "line 3: source_user is empty" in by_name["staff:line-3"]
    assert "'not-an-address' is not a full email address" in by_name["staff:not-an-address"]
    assert "listed again (first on line 2)" in by_name["staff:line-5"]
    # the refused rows stay in file order among the entry's jobs
    assert [i.name for i in c.select(["staff"])] == [
        "staff:good@old.example", "staff:line-3", "staff:not-an-address", "staff:line-5",
        "staff:also-good@old.example"]
    assert all(isinstance(i, Refusal) for i in c.select(["staff:not-an-address"]))


@pytest.mark.parametrize("csv_text,expected", [
    (None, "does not exist"),
    ("", "has no header row"),
    ("user,destination_user\na@old.example,\n", "unknown column(s) 'user'"),
    ("destination_user\na@new.example\n", "has no source_user column"),
])
def test_an_unusable_accounts_file_is_a_config_error_naming_it(tmp_path, csv_text, expected):
    path = _write(tmp_path, csv_text or "", [_entry()])
    if csv_text is None:
        (tmp_path / "accounts.csv").unlink()
    with pytest.raises(ConfigError) as err:
        cfg.load(path)
    assert expected in str(err.value)
    assert str(tmp_path / "accounts.csv") in str(err.value)


def test_username_in_the_entry_tables_is_refused(tmp_path):
    job = _entry()
    job["source"]["username"] = "x@old.example"
    path = _write(tmp_path, "source_user\na@old.example\n", [job])
    with pytest.raises(ConfigError, match="each row gives it"):
        cfg.load(path)


# --- with real servers ---------------------------------------------------------------


def _mailboxes(old_host, new_host, count: int, per_box: int) -> list[tuple]:
    """count source/destination account pairs, each source with per_box messages."""
    tag = uuid.uuid4().hex[:6]
    rng = random.Random(7)
    pairs = []
    for i in range(count):
        src = old_host.add_user(f"many{i}-{tag}@old.test", f"o-{uuid.uuid4().hex[:10]}")
        dst = new_host.add_user(f"many{i}-{tag}@new.test", f"n-{uuid.uuid4().hex[:10]}")
        msgs = []
        for n in range(per_box):
            body, mid = mailgen.make_message(rng, i * 1000 + n)
            folder = "INBOX" if n % 2 else "INBOX.Work"
            msgs.append(mailgen.TestMessage(folder, body, (), dt.datetime(
                2024, 1, 1 + n, tzinfo=dt.timezone.utc), mid))
        mailgen.fill(src, msgs)
        pairs.append((src, dst, sorted(m.sha256 for m in msgs)))
    return pairs


def _accounts_entry(tmp_path, old_host, new_host, pairs, source_port, extra_rows=""):
    (tmp_path / "accounts.csv").write_text(
        "source_user,destination_user,source_password,destination_password\n"
        + "".join(f"{s.username},{d.username},{s.password},{d.password}\n"
                  for s, d, _ in pairs) + extra_rows)
    os.chmod(tmp_path / "accounts.csv", 0o600)
    return {"name": "many", "kind": "imap-copy", "accounts": "accounts.csv",
            "source": {"host": "127.0.0.1", "port": source_port, "security": "ssl",
                       "ca_file": str(old_host.ca_file), "max_connections": 2},
            "destination": {"host": "127.0.0.1", "port": new_host.ports["imaps"],
                            "security": "ssl", "ca_file": str(new_host.ca_file)}}


def _hashes(account) -> list[str]:
    return sorted(m.sha256 for rows in mailgen.snapshot(account).values() for m in rows)


def test_twelve_mailboxes_six_workers_never_more_connections_than_the_limit(
        old_host, new_host, tmp_path):
    pairs = _mailboxes(old_host, new_host, 12, 6)
    proxy = CountingProxy(old_host.ports["imaps"])
    try:
        job = _accounts_entry(tmp_path, old_host, new_host, pairs, proxy.port)
        path = write_config(tmp_path / "config.toml", [job])
        proc = run_cli("run", "-c", str(path), "--workers", "6", "--no-progress")
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr
    assert proxy.peak == 2, f"peak {proxy.peak} concurrent source connections"
    assert proxy.connections >= 12  # every job connected through the proxy
    for _src, dst, expected in pairs:
        assert _hashes(dst) == expected  # every message exactly once
    lines = proc.stdout.strip().splitlines()
    summaries = [line for line in lines if line.startswith("many:")]
    assert len(summaries) == 12
    copied = [int(re.search(r"(\d+) copied", line).group(1)) for line in summaries]
    assert copied == [6] * 12
    assert lines[-1].startswith("total: 12 jobs: ")
    assert ", 72 copied or archived," in lines[-1]


def test_a_bad_row_fails_alone_and_the_run_exits_2(old_host, new_host, tmp_path):
    pairs = _mailboxes(old_host, new_host, 2, 3)
    job = _accounts_entry(tmp_path, old_host, new_host, pairs, old_host.ports["imaps"],
                          extra_rows="no-domain,,x,y\n")
    path = write_config(tmp_path / "config.toml", [job])
    proc = run_cli("run", "-c", str(path), "--workers", "2", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "many:no-domain: refused; nothing was done" in proc.stdout
    assert "is not a full email address" in proc.stderr
    for _src, dst, expected in pairs:
        assert _hashes(dst) == expected
    assert proc.stdout.count("3 copied") == 2
    # --job with one row's name runs that row only
    src, dst, _ = pairs[0]
    proc = run_cli("run", "-c", str(path), "--job", f"many:{src.username}", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        line for line in proc.stdout.strip().splitlines() if line.startswith(
            f"many:{src.username}: ")]


def test_admin_and_oauth2_entries_need_no_row_passwords(tmp_path):
    admin = {"auth": "admin", "admin_user": "admin@old.example",
             "admin_password_env": "ADMIN"}
    job = _entry()
    for side in ("source", "destination"):
        for key in ("password_env", "password"):
            job[side].pop(key, None)
    job["source"].update(admin)
    job["destination"]["oauth2_token_command"] = ["get-token"]
    path = _write(tmp_path, "source_user\na@old.example\nb@old.example\n", [job])
    jobs = cfg.load(path).jobs
    assert [j.source.auth for j in jobs] == ["admin", "admin"]
    assert [j.destination.auth for j in jobs] == ["oauth2", "oauth2"]
