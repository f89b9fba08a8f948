"""Connection errors: permanent ones fail at once with advice, transient ones are retried
in one layer only, bounded in attempts and time.

Mix-ups (wrong port, wrong security mode, another protocol's port) are run through the
CLI against the real Dovecot listeners: each must end within seconds, exit with 1 (a
problem found by connecting, like any other TLS or login failure), print no traceback,
and say what answered."""

from __future__ import annotations

import time

import pytest
import trustme

from migrate.endpoints.contact import ServerUnreachable, TemporarilyRefused
from migrate.runner import RunOptions, retrying
from migrate.errors import ConnectionLost, MailboxError
from tests.rig.dovecot import free_port
from tests.rig.greeter import Greeter, imap_answers, pop3_answers
from tests.rig.jobs import imap_job, run, run_cli, write_config

FAST = 4.0  # seconds: what "at once" means for a CLI run (interpreter start included)


def pop3_job(name, account, archive, **source) -> dict:
    return {"name": name, "kind": "pop3-archive",
            "source": {**account.endpoint_toml("pop3"), **source},
            "archive": {"path": str(archive)}}


def run_timed(tmp_path, job) -> tuple[float, int, str]:
    path = write_config(tmp_path / "c.toml", [job])
    started = time.monotonic()
    proc = run_cli("run", "-c", str(path), "--no-progress", timeout=120)
    elapsed = time.monotonic() - started
    assert "Traceback" not in proc.stderr, proc.stderr
    return elapsed, proc.returncode, proc.stderr


# --- fail fast: nothing listening --------------------------------------------------------

def test_closed_port_fails_at_once_naming_host_port_and_refused(old_account, new_account,
                                                               tmp_path):
    port = free_port()
    job = imap_job("closed", old_account, new_account)
    job["source"]["port"] = port
    elapsed, code, err = run_timed(tmp_path, job)
    assert code == 1
    assert f"127.0.0.1:{port}" in err and "refused" in err, err
    assert elapsed < 3, f"took {elapsed:.1f} s"


def test_closed_pop3_port_fails_at_once(old_account, tmp_path):
    port = free_port()
    job = pop3_job("closed", old_account, tmp_path / "arch", port=port)
    elapsed, code, err = run_timed(tmp_path, job)
    assert code == 1
    assert f"127.0.0.1:{port}" in err and "refused" in err, err
    assert elapsed < 3, f"took {elapsed:.1f} s"


# --- the retry loop ---------------------------------------------------------------------

class Script:
    """work() that raises the given errors in turn, then returns "done"."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


OPTS = RunOptions(retries=4, retry_wait=0.01)


def test_unreachable_on_first_contact_is_not_retried():
    work = Script(ServerUnreachable("refused"))
    with pytest.raises(ServerUnreachable) as info:
        retrying(OPTS)(work)
    assert work.calls == 1 and info.value.transient is False


def test_unreachable_after_the_server_had_answered_is_retried():
    # a drop (the server was there), then a refusal while it restarts, then back
    work = Script(ConnectionLost("dropped"), ServerUnreachable("refused"))
    assert retrying(OPTS)(work) == "done" and work.calls == 3
    # the pool says so for a reconnect after a pair had worked
    work = Script(ServerUnreachable("refused"))
    assert retrying(OPTS, reached=True)(work) == "done" and work.calls == 2


def test_permanent_errors_pass_at_once_and_transient_ones_are_bounded():
    work = Script(MailboxError("login failed"))
    with pytest.raises(MailboxError):
        retrying(OPTS)(work)
    assert work.calls == 1
    work = Script(*[TemporarilyRefused("[UNAVAILABLE]")] * 10)
    with pytest.raises(TemporarilyRefused):
        retrying(OPTS)(work)
    assert work.calls == 4


def test_retry_loop_stops_at_its_deadline():
    opts = RunOptions(retries=1000, retry_wait=0.02, retry_deadline=0.5)
    work = Script(*[ConnectionLost("dropped")] * 1000)
    started = time.monotonic()
    with pytest.raises(ConnectionLost):
        retrying(opts)(work)
    assert time.monotonic() - started < 1.0
    assert 3 <= work.calls < 1000


def test_nested_retry_loops_do_not_multiply():
    inner_work = Script(*[ConnectionLost("dropped")] * 100)

    def outer_work():
        return retrying(OPTS)(inner_work)

    with pytest.raises(ConnectionLost):
        retrying(OPTS)(outer_work)
    assert inner_work.calls == 4  # not 4 × 4


# --- LOGIN refused: for now, or for good -------------------------------------------------

@pytest.fixture
def tls_server_context(test_ca, tmp_path):
    """(server SSLContext for 127.0.0.1, CA file) from the rig's CA."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    test_ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    test_ca.cert_pem.write_to_path(str(ca_file))
    return ctx, ca_file


def fake_source(server: Greeter, ca_file, **extra) -> dict:
    return {"host": "127.0.0.1", "port": server.port, "security": "ssl",
            "username": "old@legacy.test", "password": "pw", "ca_file": str(ca_file),
            "timeout": 5, **extra}


@pytest.mark.parametrize("reply,transient", [
    (b"NO [UNAVAILABLE] Backend down, try later", True),
    (b"NO [INUSE] Mailbox in use by another session", True),
    (b"NO [AUTHENTICATIONFAILED] Authentication failed.", False),
])
def test_imap_login_refusal_is_retried_only_when_temporary(reply, transient,
                                                           tls_server_context, new_account,
                                                           tmp_path):
    ctx, ca_file = tls_server_context
    server = Greeter(b"* OK fake ready", imap_answers(reply), tls=ctx)
    try:
        job = {"name": "login", "kind": "imap-copy", "source": fake_source(server, ca_file),
               "destination": new_account.endpoint_toml("imap")}
        started = time.monotonic()
        # push-back is bounded by the back-off budget, not the attempts: waits of 0.05 s
        # and 0.1 s fit 0.2 s, the third (0.2 s) does not - 3 logins
        result = run(write_config(tmp_path / "c.toml", [job]), retries=3,
                     backoff_default=0.05, backoff_budget=0.2)
        elapsed = time.monotonic() - started
        logins = server.count(b" LOGIN ")
    finally:
        server.close()
    assert not result.ok
    text = " ".join(result.errors)
    assert reply.split(b" ", 1)[1].decode() in text, text
    if transient:
        # plan loop around the pool's connect loop: once 3 attempts, not 3 × 3
        assert logins == 3, logins
        assert "for now" in text and "back-off budget of 0.2 s" in text
    else:
        assert logins == 1, logins
        assert "check the username" in text
    assert elapsed < 5


@pytest.mark.parametrize("reply,transient", [
    (b"-ERR [IN-USE] Mailbox locked by another session", True),
    (b"-ERR [SYS/TEMP] Try later", True),
    (b"-ERR [AUTH] Authentication failed.", False),
])
def test_pop3_login_refusal_is_retried_only_when_temporary(reply, transient,
                                                           tls_server_context, tmp_path):
    ctx, ca_file = tls_server_context
    server = Greeter(b"+OK fake ready", pop3_answers(reply), tls=ctx)
    try:
        job = {"name": "login", "kind": "pop3-archive", "source": fake_source(server, ca_file),
               "archive": {"path": str(tmp_path / "arch")}}
        result = run(write_config(tmp_path / "c.toml", [job]), retries=3,
                     backoff_default=0.05, backoff_budget=0.2)  # 3 logins, as above
        passes = server.count(b"PASS ")
    finally:
        server.close()
    assert not result.ok
    assert reply.decode() in " ".join(result.errors)
    assert passes == (3 if transient else 1), passes


# --- what answered: wrong port, wrong security, wrong protocol ----------------------------

IMAP_MIXUPS = [
    # (security, listener, words the error must contain)
    ("starttls", "imaps", ["no greeting from", "implicit-TLS port", 'security = "ssl"']),
    ("ssl", "imap", ["plaintext port", "answered in plaintext (* OK", 'security = "starttls"']),
    ("ssl", "pop3s", ["answered over TLS like a POP3 server (+OK", "endpoint is IMAP",
                      "use port 993"]),
    ("ssl", "pop3", ["answered in plaintext like a POP3 server (+OK", "use port 993"]),
    ("starttls", "pop3", ["answered in plaintext like a POP3 server (+OK", "use port 143"]),
    ("starttls", "pop3s", ["answered over TLS like a POP3 server (+OK", "use port 143",
                           'or 993 with security = "ssl"']),
]
POP3_MIXUPS = [
    ("starttls", "pop3s", ["no greeting from", "implicit-TLS port", 'security = "ssl"']),
    ("ssl", "pop3", ["plaintext port", "answered in plaintext (+OK", 'security = "starttls"']),
    ("ssl", "imaps", ["answered over TLS like an IMAP server (* OK", "endpoint is POP3",
                      "use port 995"]),
    ("ssl", "imap", ["answered in plaintext like an IMAP server (* OK", "use port 995"]),
    ("starttls", "imap", ["answered in plaintext like an IMAP server (* OK", "use port 110"]),
    ("starttls", "imaps", ["answered over TLS like an IMAP server (* OK", "use port 110"]),
]


@pytest.mark.parametrize("security,listener,words", IMAP_MIXUPS)
def test_imap_endpoint_on_the_wrong_port_says_what_answered(security, listener, words,
                                                            old_account, new_account,
                                                            tmp_path):
    job = imap_job("mixup", old_account, new_account)
    job["source"].update(security=security, port=old_account.server.ports[listener],
                         timeout=2)
    elapsed, code, err = run_timed(tmp_path, job)
    assert code == 1, err
    for w in words:
        assert w in err, f"{w!r} not in {err}"
    assert elapsed < FAST, f"took {elapsed:.1f} s"


@pytest.mark.parametrize("security,listener,words", POP3_MIXUPS)
def test_pop3_endpoint_on_the_wrong_port_says_what_answered(security, listener, words,
                                                            old_account, tmp_path):
    job = pop3_job("mixup", old_account, tmp_path / "arch", security=security,
                   port=old_account.server.ports[listener], timeout=2)
    elapsed, code, err = run_timed(tmp_path, job)
    assert code == 1, err
    for w in words:
        assert w in err, f"{w!r} not in {err}"
    assert elapsed < FAST, f"took {elapsed:.1f} s"


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_smtp_port_is_recognised(protocol, security, old_account, new_account, tmp_path):
    smtp = Greeter(b"220 mail.example.test ESMTP ready")
    try:
        if protocol == "imap":
            job = imap_job("smtp", old_account, new_account)
        else:
            job = pop3_job("smtp", old_account, tmp_path / "arch")
        job["source"].update(security=security, port=smtp.port, timeout=2)
        elapsed, code, err = run_timed(tmp_path, job)
    finally:
        smtp.close()
    assert code == 1, err
    assert f"port {smtp.port} of 127.0.0.1 answered like an SMTP server" in err, err
    assert "220 mail.example.test ESMTP ready" in err
    assert f"endpoint is {protocol.upper()}" in err
    assert elapsed < FAST, f"took {elapsed:.1f} s"


# --- certificates -------------------------------------------------------------------------

@pytest.fixture
def other_name_cert(tmp_path):
    """A CA and a server certificate for mail.example.test only (not 127.0.0.1)."""
    import ssl

    ca = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("mail.example.test", "imap.example.test").configure_cert(ctx)
    ca_file = tmp_path / "other-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ctx, ca_file


def test_host_name_mismatch_names_what_the_certificate_covers(other_name_cert, tmp_path):
    from migrate.endpoints.imap import ImapSession
    from migrate import config as cfg

    ctx, ca_file = other_name_cert
    server = Greeter(b"* OK fake ready", imap_answers(), tls=ctx)
    try:
        job = {"name": "cert", "kind": "imap-copy", "source": fake_source(server, ca_file),
               "destination": fake_source(server, ca_file)}
        endpoint = cfg.parse({"jobs": [job]}, base_dir=tmp_path).jobs[0].source
        started = time.monotonic()
        with pytest.raises(MailboxError) as info:
            ImapSession.connect(endpoint)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    text = str(info.value)
    assert "does not cover the host name '127.0.0.1'" in text, text
    assert "'mail.example.test', 'imap.example.test'" in text, text
    assert "set host to one of them" in text
    assert not info.value.transient
    assert elapsed < 3


def test_host_name_mismatch_behind_starttls_names_what_the_certificate_covers(
        other_name_cert, tmp_path):
    from migrate.endpoints.pop3 import Pop3Session
    from migrate import config as cfg

    ctx, ca_file = other_name_cert

    def answers(line: bytes):
        if line.upper() == b"CAPA":
            return [b"+OK", b"STLS", b"UIDL", b"."]
        if line.upper() == b"STLS":
            return [b"+OK begin TLS", b"STARTTLS"]
        return pop3_answers()(line)

    server = Greeter(b"+OK fake ready", answers, starttls=ctx)
    try:
        job = {"name": "cert", "kind": "pop3-archive",
               "source": fake_source(server, ca_file, security="starttls"),
               "archive": {"path": str(tmp_path / "arch")}}
        endpoint = cfg.parse({"jobs": [job]}, base_dir=tmp_path).jobs[0].source
        with pytest.raises(MailboxError) as info:
            Pop3Session.connect(endpoint)
    finally:
        server.close()
    assert "'mail.example.test', 'imap.example.test'" in str(info.value), str(info.value)


def test_untrusted_certificate_keeps_the_ca_file_advice(other_name_cert, tls_server_context,
                                                        tmp_path):
    from migrate.endpoints.imap import ImapSession
    from migrate import config as cfg

    ctx, _rig_ca = tls_server_context  # signed by the rig's CA ...
    _other_ctx, other_ca = other_name_cert  # ... but we trust another one
    server = Greeter(b"* OK fake ready", imap_answers(), tls=ctx)
    try:
        job = {"name": "cert", "kind": "imap-copy", "source": fake_source(server, other_ca),
               "destination": fake_source(server, other_ca)}
        endpoint = cfg.parse({"jobs": [job]}, base_dir=tmp_path).jobs[0].source
        with pytest.raises(MailboxError, match="is not trusted .* set ca_file"):
            ImapSession.connect(endpoint)
    finally:
        server.close()
