"""Logins real migrations need: an admin (master user) logging in on behalf of each mailbox,
and OAuth2 bearer tokens from a command (OAUTHBEARER / XOAUTH2), against a real Dovecot
with a master passdb and an oauth2 passdb asking a local token introspection server."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from pathlib import Path

import pytest

from migrate import config as cfg
from migrate.endpoints.imap import ImapSession
from migrate.endpoints.pop3 import Pop3Session
from migrate.errors import ConfigError, MailboxError
from tests.rig import mailgen
from tests.rig.dovecot import DovecotServer, start_or_fail
from tests.rig.jobs import run, run_cli, write_config
from tests.rig.oauth_idp import TokenIssuer

ADMIN = "admin@old.test"
ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex[:12]


# --- config ------------------------------------------------------------------------


def source_of(**source) -> cfg.Endpoint:
    table = {"host": "mail.old.example", "username": "alice@old.example", **source}
    job = {"name": "alice", "kind": "imap-copy", "source": table,
           "destination": {"host": "mail.new.example", "username": "alice@new.example",
                           "password": "x"}}
    return cfg.parse({"jobs": [job]}, base_dir=Path("/tmp")).jobs[0].source


def test_admin_login_config(monkeypatch):
    monkeypatch.setenv("MM_ADMIN", "admin-secret")
    ep = source_of(auth="admin", admin_user=ADMIN, admin_password_env="MM_ADMIN")
    assert (ep.auth, ep.admin_user, ep.username) == ("admin", ADMIN, "alice@old.example")
    assert ep.password.reveal() == "admin-secret"
    assert "admin-secret" not in repr(ep) and "admin_password_env" in str(ep.password)
    plain = source_of(password="pw")
    assert (plain.auth, plain.admin_user) == ("password", None)
    token = source_of(oauth2_token_command=["printf", "tok%s", "en"])
    assert token.auth == "oauth2" and token.password.reveal() == "token"


@pytest.mark.parametrize(("source", "expected"), [
    ({"auth": "admin", "admin_password": "x"}, "auth = \"admin\" needs admin_user"),
    ({"auth": "admin", "admin_user": ADMIN}, "no admin password source"),
    ({"auth": "admin", "admin_user": ADMIN, "admin_password": "x", "password": "y"},
     "password (the mailbox's own password) must go"),
    ({"auth": "admin", "admin_user": ADMIN, "admin_password": "x",
      "admin_password_env": "X"}, "admin_password_env and admin_password are all set"),
    ({"admin_user": ADMIN, "admin_password": "x", "password": "y"},
     "admin_user and admin_password set but auth = 'password'; set auth = \"admin\""),
    ({"auth": "admin", "admin_user": "", "admin_password": "x"}, "admin_user = ''"),
    ({"auth": "root", "password": "y"}, "auth = 'root'; expected \"password\""),
    ({"auth": "oauth2"}, "auth = \"oauth2\" needs oauth2_token_command"),
    ({"oauth2_token_command": ["t"], "password_env": "X"},
     "password_env and oauth2_token_command are both set"),
    ({"auth": "password", "oauth2_token_command": ["t"]},
     "oauth2_token_command is set but auth = 'password'"),
    ({"oauth2_token_command": "get-token"}, "oauth2_token_command must be a non-empty list"),
    ({"auth": "admin", "admin_user": ADMIN, "admin_password": "x",
      "oauth2_token_command": ["t"]}, "oauth2_token_command is set but auth = 'admin'"),
    ({}, "or oauth2_token_command for an OAuth2 login"),
])
def test_login_combinations_that_cannot_work_are_named(source, expected):
    with pytest.raises(ConfigError) as caught:
        source_of(**source)
    assert expected in str(caught.value)


def test_failing_token_command_is_named_and_its_output_not_shown(tmp_path):
    script = tmp_path / "token.sh"
    script.write_text("#!/bin/sh\necho tok-visible-1\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(ConfigError) as caught:
        source_of(oauth2_token_command=[str(script)]).password.reveal()
    text = str(caught.value)
    assert "oauth2_token_command" in text and "exited with status 3" in text
    assert "tok-visible-1" not in text
    empty = source_of(oauth2_token_command=["true"])
    with pytest.raises(ConfigError, match="must print the access token"):
        empty.password.reveal()


# --- servers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer():
    token_issuer = TokenIssuer().start()
    yield token_issuer
    token_issuer.stop()


@pytest.fixture(scope="module")
def login_host(test_ca, issuer):
    """Offers PLAIN with master users, and both OAUTHBEARER and XOAUTH2."""
    server = start_or_fail(DovecotServer("logins", ".", test_ca, inbox_prefix=True,
                                    master_users={ADMIN: ADMIN_PASSWORD},
                                    oauth2_introspection_url=issuer.introspection_url))
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def xoauth2_host(test_ca, issuer):
    """Offers XOAUTH2 only (no OAUTHBEARER)."""
    server = start_or_fail(DovecotServer("xoauth2", "/", test_ca, inbox_prefix=False,
                                    oauth2_introspection_url=issuer.introspection_url,
                                    oauth2_mechanisms=("xoauth2",)))
    yield server
    server.cleanup()


@pytest.fixture
def single_use_tokens(issuer):
    """Every token expires after its first login."""
    issuer.max_uses = 1
    yield issuer
    issuer.max_uses = None


def mailbox(server: DovecotServer, count: int = 6):
    """A user whose password mailmigrate is never given, with ``count`` INBOX messages."""
    account = server.add_user(f"user-{uuid.uuid4().hex[:10]}@old.test",
                              "unknown-" + uuid.uuid4().hex)
    rng = random.Random(count)
    msgs = []
    for i in range(count):
        body, _mid = mailgen.make_message(rng, i)
        msgs.append(mailgen.TestMessage("INBOX", body, ("\\Seen",) if i % 2 else (),
                                        dt.datetime(2020, 1, 1 + i, tzinfo=dt.timezone.utc)))
    mailgen.fill(account, msgs)
    return account, msgs


def admin_source(account, protocol="imap", password=ADMIN_PASSWORD) -> dict:
    table = account.endpoint_toml(protocol, auth="admin", admin_user=ADMIN,
                                  admin_password=password)
    del table["password"]
    return table


def token_source(account, command, protocol="imap") -> dict:
    table = account.endpoint_toml(protocol, oauth2_token_command=command)
    del table["password"]
    return table


def copy_job(source, new_account) -> dict:
    return {"name": "login", "kind": "imap-copy", "source": source,
            "destination": new_account.endpoint_toml("imap")}


def archive_job(source, archive: Path) -> dict:
    return {"name": "login", "kind": "pop3-archive", "source": source,
            "archive": {"path": str(archive)}}


def archived(archive: Path) -> list[Path]:
    return [p for sub in ("new", "cur") for p in (archive / sub).iterdir()]


def logins_in_log(server: DovecotServer, username: str) -> list[str]:
    """The SASL mechanism of each successful login of username, from Dovecot's log."""
    marker = f"Login: user=<{username}>, method="
    return [line.split(marker, 1)[1].split(",", 1)[0]
            for line in server.log.read_text(errors="replace").splitlines() if marker in line]


def test_admin_login_imap_copy(login_host, new_account, tmp_path):
    account, msgs = mailbox(login_host)
    config = write_config(tmp_path / "c.toml", [copy_job(admin_source(account), new_account)])
    result = run(config)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(msgs)
    copied = {m.sha256 for m in mailgen.snapshot(new_account)["INBOX"]}
    assert copied == {m.sha256 for m in msgs}
    assert set(logins_in_log(login_host, account.username)[1:]) == {"PLAIN"}


def test_admin_login_pop3_archive(login_host, tmp_path):
    account, msgs = mailbox(login_host)
    archive = tmp_path / "archive"
    config = write_config(tmp_path / "c.toml",
                          [archive_job(admin_source(account, "pop3"), archive)])
    result = run(config)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(msgs)
    assert len(archived(archive)) == len(msgs)
    session = Pop3Session.connect(cfg.load(config).jobs[0].source)
    try:  # the admin's session is the user's mailbox
        assert len(session.list_messages()) == len(msgs)
    finally:
        session.client.quit()


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_wrong_admin_password_names_admin_user(login_host, protocol, tmp_path):
    account, _msgs = mailbox(login_host, count=1)
    wrong = "wrong-" + uuid.uuid4().hex
    source = cfg.parse({"jobs": [archive_job(admin_source(account, protocol, wrong),
                                             tmp_path / "a")]}
                       if protocol == "pop3" else
                       {"jobs": [copy_job(admin_source(account, protocol, wrong),
                                          account)]},
                       base_dir=tmp_path).jobs[0].source
    connect = ImapSession.connect if protocol == "imap" else Pop3Session.connect
    with pytest.raises(MailboxError) as caught:
        connect(source)
    text = str(caught.value)
    assert f"login as {account.username} (as admin {ADMIN})" in text
    assert "check admin_user (admin@old.test) and its password (admin_password)" in text
    assert wrong not in text
    assert not caught.value.transient


def all_output_and_state(result_texts: list[str], directory: Path) -> bytes:
    """Everything a run showed or wrote: its output (also --json) and every file of the
    config's directory (config, SQLite database with its -wal/-shm, archive, log file)."""
    blobs = [t.encode() for t in result_texts]
    blobs += [p.read_bytes() for p in directory.rglob("*") if p.is_file()]
    return b"\n".join(blobs)


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_oauthbearer_login_never_shows_the_token(login_host, issuer, new_account, protocol,
                                                 tmp_path):
    account, msgs = mailbox(login_host)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    command, _queue = issuer.token_command(tmp_path, account.username)
    before = set(issuer.tokens)
    source = token_source(account, command, protocol)
    job = (copy_job(source, new_account) if protocol == "imap"
           else archive_job(source, run_dir / "archive"))
    config = write_config(run_dir / "c.toml", [job])
    outputs = []
    # a first run, then an incremental one (several connections), as JSON with a log file
    for extra in ([], ["--json", "--log-file", str(run_dir / "run.log")]):
        proc = run_cli("run", "-c", str(config), "-vv", "--no-progress", *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs += [proc.stdout, proc.stderr]
    assert f"{len(msgs)} {'copied' if protocol == 'imap' else 'archived'}" in outputs[0]
    assert '"mailmigrate.run/1"' in outputs[2] and (run_dir / "run.log").stat().st_size
    # (the first login is the test's own, filling the mailbox)
    assert set(logins_in_log(login_host, account.username)[1:]) == {"OAUTHBEARER"}
    tokens = set(issuer.tokens) - before
    assert len(tokens) >= 2  # one per connection: every connection runs the command
    everything = all_output_and_state(outputs, run_dir)
    assert b"mailmigrate.db" in b" ".join(p.name.encode() for p in run_dir.iterdir())
    for token in tokens:
        assert token.encode() not in everything


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_xoauth2_login_where_only_xoauth2_is_offered(xoauth2_host, issuer, protocol,
                                                     tmp_path):
    account, msgs = mailbox(xoauth2_host)
    command, _queue = issuer.token_command(tmp_path, account.username)
    config = write_config(tmp_path / "c.toml", [archive_job(
        token_source(account, command, protocol), tmp_path / "archive")]
        if protocol == "pop3" else [copy_job(token_source(account, command), account)])
    source = cfg.load(config).jobs[0].source
    if protocol == "imap":
        session = ImapSession.connect(source)
        assert session.client.select_folder("INBOX")[b"EXISTS"] == len(msgs)
        session.logout()
    else:
        result = run(config)
        assert result.ok, result.errors
        assert len(archived(tmp_path / "archive")) == len(msgs)
    assert logins_in_log(xoauth2_host, account.username)[1:] == ["XOAUTH2"]


def test_token_too_long_for_the_pop3_auth_line(login_host, issuer, tmp_path):
    """RFC 5034: an initial response that would make AUTH longer than 255 octets is sent
    after the server's empty challenge instead (access tokens are often JWTs of 1 KB)."""
    account, msgs = mailbox(login_host, count=2)
    command, _queue = issuer.token_command(tmp_path, account.username)
    issuer.token_bytes = 600
    try:
        config = write_config(tmp_path / "c.toml", [archive_job(
            token_source(account, command, "pop3"), tmp_path / "archive")])
        result = run(config)
        imap_source = cfg.parse({"jobs": [copy_job(token_source(account, command), account)]},
                                base_dir=tmp_path).jobs[0].source
        ImapSession.connect(imap_source).logout()  # IMAP sends it as a continuation
    finally:
        issuer.token_bytes = 24
    assert result.ok, result.errors
    assert len(archived(tmp_path / "archive")) == len(msgs)
    assert max(len(t) for t in issuer.tokens) > 1000


def test_expired_token_is_fetched_again(login_host, single_use_tokens, new_account, tmp_path):
    issuer = single_use_tokens
    account, msgs = mailbox(login_host)
    command, queue = issuer.token_command(tmp_path, account.username)
    # The command first hands out a token that has expired at the server (used once),
    # as a token helper's cache would; mailmigrate must run it again and log in.
    stale = issuer.issue(account.username)
    assert issuer.introspect(stale)["active"]
    queue.write_text(stale + "\n")
    config = write_config(tmp_path / "c.toml",
                          [copy_job(token_source(account, command), new_account)])
    result = run(config)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(msgs)
    assert queue.read_text() == ""  # the stale token was used, then a fresh one
    mine = [active for user, active in issuer.introspections if user == account.username]
    assert mine[:3] == [True, False, True]  # our use above, refused stale, fresh
    # each token worked once: every further connection of the run got a new token
    result = run(config)
    assert result.ok, result.errors
    assert logins_in_log(login_host, account.username).count("OAUTHBEARER") >= 2
    assert all(grant.uses <= 1 for grant in issuer.grants.values())


def test_token_refused_after_rerun_is_a_clear_error(login_host, issuer, tmp_path):
    account, _msgs = mailbox(login_host, count=1)
    command, queue = issuer.token_command(tmp_path, account.username)
    revoked = [issuer.issue(account.username) for _ in range(2)]
    for token in revoked:
        issuer.revoke(token)
    queue.write_text("".join(t + "\n" for t in revoked))
    source = cfg.load(write_config(tmp_path / "c.toml", [archive_job(
        token_source(account, command, "pop3"), tmp_path / "a")])).jobs[0].source
    with pytest.raises(MailboxError) as caught:
        Pop3Session.connect(source)
    text = str(caught.value)
    assert f"POP3 login as {account.username}" in text
    assert ("the access token from oauth2_token_command was refused (OAuth status "
            "invalid_token), also after running the command again") in text
    assert queue.read_text() == ""  # both planted tokens were tried, no third run
    assert not any(token in text for token in revoked)


def test_server_without_oauth2_is_named(new_account, tmp_path):
    source = cfg.parse({"jobs": [copy_job(token_source(new_account, ["echo", "tok"]),
                                          new_account)]}, base_dir=tmp_path).jobs[0].source
    with pytest.raises(MailboxError, match="offers neither of OAUTHBEARER, XOAUTH2 \\(it "
                       "offers AUTH=LOGIN, AUTH=PLAIN\\)"):
        ImapSession.connect(source)
