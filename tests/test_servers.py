"""Smoke tests of the real-server rig through the product's own connection code."""

from __future__ import annotations

import poplib
import socket
import ssl

import pytest

from migrate import config as cfg
from migrate.endpoints.imap import ImapSession
from migrate.errors import ConfigError, MailboxError
from tests.rig.jobs import imap_job, run_cli, write_config


def endpoint(account, protocol="imap", security="ssl", **extra):
    raw = {"name": "x", "kind": "imap-copy" if protocol == "imap" else "pop3-archive",
           "source": account.endpoint_toml(protocol, security, **extra)}
    if protocol == "imap":
        raw["destination"] = account.endpoint_toml("imap")
    else:
        raw["archive"] = {"path": "/tmp/unused"}
    return cfg.parse({"jobs": [raw]}, base_dir=account.server.base).jobs[0].source


def test_imaps_login_with_certificate_verification(old_account, new_account):
    for account in (old_account, new_account):
        session = ImapSession.connect(endpoint(account))
        try:
            assert "UIDPLUS" in session.capabilities and "MULTIAPPEND" in session.capabilities
            # the two hosts differ like real ones: '.' + "INBOX." vs '/' + no prefix
            if account is old_account:
                assert (session.delimiter, session.prefix) == (".", "INBOX.")
            else:
                assert (session.delimiter, session.prefix) == ("/", "")
            sock = session.client._imap.sock
            assert isinstance(sock, ssl.SSLSocket)
            assert sock.context.verify_mode == ssl.CERT_REQUIRED
        finally:
            session.logout()


def test_imap_starttls_login(old_account):
    session = ImapSession.connect(endpoint(old_account, security="starttls"))
    assert isinstance(session.client._imap.sock, ssl.SSLSocket)
    session.logout()


def test_pop3s_login_with_certificate_verification(old_account):
    ep = endpoint(old_account, protocol="pop3")
    ctx = ssl.create_default_context(cafile=str(ep.ca_file))
    pop = poplib.POP3_SSL(ep.host, ep.port, context=ctx, timeout=10)
    assert "UIDL" in pop.capa()
    pop.user(ep.username)
    assert pop.pass_(ep.password.reveal()).startswith(b"+OK")
    assert pop.stat() == (0, 0)
    pop.quit()


def test_pop3_starttls_login(old_account):
    ep = endpoint(old_account, protocol="pop3", security="starttls")
    assert ep.port == old_account.server.ports["pop3"]
    pop = poplib.POP3(ep.host, ep.port, timeout=10)
    pop.stls(ssl.create_default_context(cafile=str(ep.ca_file)))
    pop.user(ep.username)
    assert pop.pass_(ep.password.reveal()).startswith(b"+OK")
    pop.quit()


def test_untrusted_certificate_is_refused(old_account):
    ep = endpoint(old_account)
    without_ca = type(ep)(**{**ep.__dict__, "ca_file": None})
    with pytest.raises(MailboxError, match="is not trusted .* set ca_file"):
        ImapSession.connect(without_ca)


def test_plaintext_port_config_is_refused(old_account, tmp_path):
    # security = "none" is refused at config time, before any connection
    job = imap_job("plain", old_account, old_account)
    job["source"].update(security="none", port=old_account.server.ports["imap"])
    path = write_config(tmp_path / "c.toml", [job])
    proc = run_cli("run", "-c", str(path))
    assert proc.returncode == 2
    assert "security = \"none\" sends the password and all mail unencrypted" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_implicit_tls_against_plaintext_listener_is_explained(old_account):
    # Misconfigured port: TLS spoken to the plaintext listener gives advice, not a trace.
    ep = endpoint(old_account)
    wrong = type(ep)(**{**ep.__dict__, "port": old_account.server.ports["imap"]})
    with pytest.raises(MailboxError, match="plaintext port"):
        ImapSession.connect(wrong)


def test_server_refuses_plaintext_login(old_account):
    # disable_plaintext_auth: the server itself will not take a password without TLS
    with socket.create_connection(("127.0.0.1", old_account.server.ports["imap"]), 5) as s:
        f = s.makefile("rwb")
        assert f.readline().startswith(b"* OK")
        f.write(b"a LOGIN " + old_account.username.encode() + b" x\r\n")
        f.flush()
        line = f.readline()
        assert line.startswith(b"* BAD") or line.startswith(b"a NO")


def test_wrong_password_is_a_clear_error(old_account):
    ep = endpoint(old_account)
    bad = type(ep)(**{**ep.__dict__, "password": type(ep.password)("password", "nope", "")})
    with pytest.raises(MailboxError) as info:
        ImapSession.connect(bad)
    assert "IMAP login as" in str(info.value) and "check the username" in str(info.value)
    assert "nope" not in str(info.value)


def test_missing_password_env_fails_before_connecting(old_account, tmp_path):
    job = imap_job("env", old_account, old_account)
    job["source"].pop("password")
    job["source"]["password_env"] = "MM_TEST_UNSET_VARIABLE"
    path = write_config(tmp_path / "c.toml", [job])
    proc = run_cli("run", "-c", str(path), env={"MM_TEST_UNSET_VARIABLE": ""})
    assert proc.returncode == 2
    assert "password_env = 'MM_TEST_UNSET_VARIABLE' but that environment variable" in proc.stderr
    with pytest.raises(ConfigError):
        cfg.load(path).jobs[0].source.password.reveal()


def test_dovecot_pop3_offers_what_the_archive_relies_on(old_account):
    from migrate.endpoints.pop3 import Pop3Session

    session = Pop3Session.connect(endpoint(old_account, protocol="pop3"))
    try:
        session.require_uidl()
        assert session.pipelining  # the pipelined RETR path is the one exercised
    finally:
        session.close()
