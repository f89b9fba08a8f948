"""`mailmigrate check`: each diagnosis against real servers (Dovecot, Courier; the fakes
only for what no real server does on demand: no UIDL, an announced APPENDLIMIT), the
exit codes, the JSON document, ASCII marks, and that it changes nothing anywhere."""

from __future__ import annotations

import datetime as dt
import json
import random
import socket
import ssl
import uuid

import pytest

from tests.rig import mailgen
from tests.rig.courier import courier_account, courier_host  # noqa: F401
from tests.rig.dovecot import DovecotServer, start_or_fail
from tests.rig.fakeimap import DEFAULT_CAPABILITIES, FakeImapServer
from tests.rig.fakepop import FakePop3
from migrate import check as check_mod
from migrate import config as config_mod
from tests.rig.jobs import imap_job, run, run_cli, write_config
from tests.rig.untouched import untouched

UTF8 = {"PYTHONIOENCODING": "utf-8"}
MISNAMED = ("mail.example.test", "imap.example.test")


@pytest.fixture(scope="module")
def misnamed_host(test_ca):
    """A Dovecot whose certificate is issued for other names than 127.0.0.1."""
    server = start_or_fail(DovecotServer("misnamed", "/", test_ca, inbox_prefix=False,
                                         cert_names=MISNAMED))
    yield server
    server.cleanup()


def fill(account, sizes: list[int], folder: str = "INBOX") -> None:
    rng = random.Random(len(sizes))
    msgs = []
    for i, size in enumerate(sizes):
        body, mid = mailgen.make_message(rng, i, size=size)
        msgs.append(mailgen.TestMessage(folder, body, ("\\Seen",) if i % 2 else (),
                                        dt.datetime(2020, 1, 2, tzinfo=dt.timezone.utc), mid))
    mailgen.fill(account, msgs)


def check(config, *args, env=None):
    proc = run_cli("check", "-c", str(config), *args, env={**UTF8, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def check_json(config, *args):
    proc = check(config, "--json", *args)
    return proc, json.loads(proc.stdout)


def checks_of(document, role: str) -> dict:
    (job,) = document["jobs"]
    (endpoint,) = [e for e in job["endpoints"] if e["role"] == role]
    return {c["name"]: c for c in endpoint["checks"]}


def state_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


# --- a healthy job, read-only ---------------------------------------------------------


def source_config(tmp_path, name: str, source: dict, new_account):
    """A config with one imap-copy job from ``source`` (an endpoint table, often altered
    to provoke a diagnosis) to ``new_account``."""
    return write_config(tmp_path / "c.toml", [{
        "name": name, "kind": "imap-copy", "source": source,
        "destination": new_account.endpoint_toml("imap")}], state_url(tmp_path))

def test_check_passes_and_changes_nothing(old_account, new_account, tmp_path):
    """A job that ran once, then got two more messages: every step passes, the sizes
    left to copy count only the new ones, and neither server nor the state database
    changes (read-only witness)."""
    fill(old_account, [2_000, 3_000, 4_000])
    url = state_url(tmp_path)
    assert run(write_config(tmp_path / "first.toml",
                            [imap_job("alice", old_account, new_account)], url)).ok
    fill(old_account, [5_000, 6_000])
    # the same job, now with deletion turned on: what check says about UIDPLUS
    config = write_config(tmp_path / "c.toml",
                          [imap_job("alice", old_account, new_account,
                                    delete_after_verify=True)], url)
    with untouched(imap=[old_account, new_account], state_url=url):
        proc = check(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in ("dns:", "tcp:", "greeting:", "tls handshake:", "certificate chain:",
                 "certificate expiry:", "certificate name:", "login:", "UIDPLUS:",
                 "MULTIAPPEND:", "QUOTA:", "protocol binding:", "quota:"):
        assert f"✓ {step}" in out, (step, out)
    assert "5 messages (21 KB); 3 already at the destination; 2 messages (12 KB) to copy" in out
    assert "bound to IMAP by job 'alice'" in out
    assert "deletion after verification removes exactly the copied messages" in out
    assert "✗" not in out
    assert "alice: ready to run" in out
    # the usual ports of the host were probed (closed on the test machine's loopback)
    assert "mail ports on this host: 993" in out


def test_check_pop3_archive_is_read_only(old_account, tmp_path):
    fill(old_account, [1_500, 2_500])
    archive = tmp_path / "archive"
    url = state_url(tmp_path)
    config = write_config(tmp_path / "c.toml", [{
        "name": "pull", "kind": "pop3-archive",
        "source": old_account.endpoint_toml("pop3"),
        "archive": {"path": str(archive)}}], url)
    assert run(config).ok
    with untouched(pop3=[old_account], state_url=url, paths=[archive]):
        proc, doc = check_json(config)
    assert proc.returncode == 0, proc.stdout
    source = checks_of(doc, "source")
    assert source["UIDL"]["ok"] and source["login"]["ok"]
    assert source["mailbox"]["detail"].startswith("2 messages")
    archive_checks = checks_of(doc, "archive")
    assert archive_checks["archive path"]["ok"]
    assert "exists and is writable" in archive_checks["archive path"]["detail"]
    assert "at most 0 KB to archive" in archive_checks["free space"]["detail"]


def test_check_creates_no_state_database(old_account, new_account, tmp_path):
    config = write_config(tmp_path / "c.toml", [imap_job("fresh", old_account, new_account)],
                          state_url(tmp_path))
    proc = check(config)
    assert proc.returncode == 0, proc.stdout
    assert "no state database yet" in proc.stdout
    assert not (tmp_path / "state.db").exists()


# --- TLS ---------------------------------------------------------------------------

def test_certificate_for_other_names_named_in_check_and_run(misnamed_host, new_account,
                                                             tmp_path):
    account = misnamed_host.add_user(f"misnamed-{uuid.uuid4().hex[:8]}@old.test", "pw-1")
    config = write_config(tmp_path / "c.toml", [imap_job("misnamed", account, new_account)],
                          state_url(tmp_path))
    proc, doc = check_json(config)
    assert proc.returncode == 1
    source = checks_of(doc, "source")
    assert source["certificate chain"]["ok"]  # the CA is right, only the name is not
    name = source["certificate name"]
    assert not name["ok"] and name["severity"] == "error"
    for covered in MISNAMED:
        assert repr(covered) in name["detail"], name
    assert "set host to one of them" in name["detail"]
    assert "login" not in source  # no login over a certificate that does not fit
    result = run(config)
    assert not result.ok
    errors = " ".join(result.errors)
    for covered in MISNAMED:
        assert repr(covered) in errors, errors
    # check and run say it in the same words
    assert name["detail"] in errors


def test_untrusted_chain_suggests_ca_file(old_account, new_account, tmp_path):
    source = old_account.endpoint_toml("imap")
    del source["ca_file"]
    config = source_config(tmp_path, "noca", source, new_account)
    proc, doc = check_json(config)
    assert proc.returncode == 1
    chain = checks_of(doc, "source")["certificate chain"]
    assert not chain["ok"] and "not trusted" in chain["detail"]
    assert "ca_file" in chain["hint"]


# --- ports and security --------------------------------------------------------------

def test_plaintext_port_gets_the_advice(old_account, new_account, tmp_path):
    """security = "none" (allowed): a warning with the advice to use 993/995 or
    STARTTLS; a run can still go ahead (exit 0)."""
    source = old_account.endpoint_toml("imap", security="none", allow_insecure=True)
    config = source_config(tmp_path, "plain", source, new_account)
    proc = check(config)
    assert proc.returncode == 0, proc.stdout
    assert "! encryption: security = \"none\"" in proc.stdout
    assert ("→ most providers disable the plaintext ports 143 (IMAP) and 110 (POP3)"
            in proc.stdout)
    assert "use 993 (IMAP) or 995 (POP3)" in proc.stdout and "STARTTLS" in proc.stdout
    assert "plain: ready to run, 1 warning" in proc.stdout


def test_tls_client_on_plaintext_port(old_account, new_account, tmp_path):
    source = old_account.endpoint_toml("imap")
    source["port"] = old_account.server.ports["imap"]  # the plaintext port, ssl kept
    config = source_config(tmp_path, "mixup", source, new_account)
    proc, doc = check_json(config)
    assert proc.returncode == 1
    greeting = checks_of(doc, "source")["greeting"]
    assert not greeting["ok"]
    assert greeting["detail"].startswith("TLS client on a plaintext port: ")
    assert "security = \"starttls\"" in greeting["detail"]


def test_plaintext_client_on_tls_port(old_account, new_account, tmp_path):
    source = old_account.endpoint_toml("imap", security="starttls", timeout=2)
    source["port"] = old_account.server.ports["imaps"]  # the TLS port, spoken to plainly
    config = source_config(tmp_path, "mixup", source, new_account)
    proc, doc = check_json(config)
    assert proc.returncode == 1
    greeting = checks_of(doc, "source")["greeting"]
    assert greeting["detail"].startswith("plaintext client on a TLS port: ")
    assert "use security = \"ssl\"" in greeting["detail"]


def closed_port() -> int:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_closed_port(old_account, new_account, tmp_path):
    closed = closed_port()
    source = old_account.endpoint_toml("imap")
    source["port"] = closed
    config = source_config(tmp_path, "closed", source, new_account)
    proc, doc = check_json(config)
    assert proc.returncode == 1
    tcp = checks_of(doc, "source")["tcp"]
    assert not tcp["ok"] and "connection refused" in tcp["detail"]


def test_closed_plaintext_port_gets_the_advice(old_account, new_account, tmp_path,
                                               monkeypatch):
    monkeypatch.setattr(check_mod, "SCAN_PORTS", {})  # only the configured port
    source = old_account.endpoint_toml("imap", security="starttls")
    source["port"] = closed_port()
    config = source_config(tmp_path, "plainclosed", source, new_account)
    cfg = config_mod.load(config)
    (report,) = check_mod.check_jobs(cfg, cfg.jobs)
    tcp = {c.name: c for c in report.endpoints[0].checks}["tcp"]
    assert not tcp.ok
    assert tcp.hint == check_mod.PLAINTEXT_ADVICE
    assert "143 (IMAP) and 110 (POP3)" in tcp.hint and "993" in tcp.hint


def test_starttls_endpoint_passes(old_account, new_account, tmp_path):
    source = old_account.endpoint_toml("imap", security="starttls")
    config = source_config(tmp_path, "starttls", source, new_account)
    proc, doc = check_json(config)
    assert proc.returncode == 0, proc.stdout
    checks = checks_of(doc, "source")
    assert checks["greeting"]["detail"].startswith("an IMAP server answers in plaintext")
    assert checks["tls handshake"]["detail"].startswith("STARTTLS, then TLSv1.")
    assert checks["certificate name"]["ok"] and checks["login"]["ok"]


def test_port_scan_says_what_answers_where(old_account, new_account, tmp_path,
                                           monkeypatch):
    """The quick look at the usual ports, pointed at Dovecot's (random) ports instead of
    993/143/995/110: each is named with what answers; the configured port being closed,
    the hint names the port where the protocol answers."""
    ports = old_account.server.ports
    monkeypatch.setattr(check_mod, "SCAN_PORTS", {
        ports["imaps"]: True, ports["imap"]: False, ports["pop3s"]: True,
        ports["pop3"]: False, closed_port(): True})
    source = old_account.endpoint_toml("imap")
    source["port"] = closed_port()
    config = source_config(tmp_path, "scan", source, new_account)
    (report,) = check_mod.check_jobs(config_mod.load(config), config_mod.load(config).jobs)
    checks = {c.name: c for c in report.endpoints[0].checks}
    scan = checks["ports"].detail
    assert f"{ports['imaps']} IMAP over TLS" in scan
    assert f"{ports['imap']} IMAP plaintext" in scan
    assert f"{ports['pop3s']} POP3 over TLS" in scan
    assert f"{ports['pop3']} POP3 plaintext" in scan
    assert "closed" in scan
    assert not checks["tcp"].ok
    assert checks["tcp"].hint.startswith(
        f"IMAP answers on port {ports['imaps']} (IMAP over TLS); use port = "
        f"{ports['imaps']} with security = \"ssl\"")
    assert not report.ok


def test_certificate_about_to_expire_is_a_warning(test_ca, new_account, tmp_path):
    """Warnings do not block: exit 0, the days left named."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("127.0.0.1", not_after=dt.datetime.now(dt.timezone.utc)
                       + dt.timedelta(days=5, hours=12)).configure_cert(ctx)
    fake = FakeImapServer(ssl_context=ctx, ca_pem=test_ca.cert_pem.bytes())
    try:
        config = source_config(tmp_path, "expiring", fake.job_endpoint(), new_account)
        proc, doc = check_json(config)
    finally:
        fake.close()
    assert proc.returncode == 0, proc.stdout
    assert doc["ok"] is True
    expiry = checks_of(doc, "source")["certificate expiry"]
    assert not expiry["ok"] and expiry["severity"] == "warning"
    assert expiry["detail"].startswith("expires in 5 days")
    assert "renew" in expiry["hint"]


# --- login -------------------------------------------------------------------------

def test_wrong_password(old_account, new_account, tmp_path):
    source = old_account.endpoint_toml("imap")
    source["password"] = "not-" + old_account.password
    config = source_config(tmp_path, "wrongpw", source, new_account)
    proc = check(config)
    assert proc.returncode == 1
    assert "✗ login: IMAP login as " in proc.stdout
    assert "usually the full email address" in proc.stdout
    assert source["password"] not in proc.stdout + proc.stderr
    # the destination was still checked: one problem, one place
    assert proc.stdout.count("✗") == 1


def test_short_username(old_account, new_account, tmp_path):
    short = old_account.username.split("@")[0]
    source = old_account.endpoint_toml("imap", allow_short_username=True)
    source["username"] = short
    config = source_config(tmp_path, "short", source, new_account)
    proc, doc = check_json(config)
    assert proc.returncode == 1
    login = checks_of(doc, "source")["login"]
    assert not login["ok"]
    assert f"the username {short!r} has no '@'" in login["hint"]
    assert "usually the full email address" in login["hint"]


def test_admin_login_as_configured(test_ca, new_account, tmp_path):
    server = start_or_fail(DovecotServer("check-admin", ".", test_ca, inbox_prefix=True,
                                         master_users={"root@admin.test": "admin-secret"}))
    try:
        user = server.add_user(f"u-{uuid.uuid4().hex[:8]}@old.test", "own-secret")
        source = user.endpoint_toml("imap", auth="admin", admin_user="root@admin.test",
                                    admin_password_env="MM_CHECK_ADMIN")
        del source["password"]
        config = source_config(tmp_path, "admin", source, new_account)
        proc = check(config, env={"MM_CHECK_ADMIN": "admin-secret"})
        assert proc.returncode == 0, proc.stdout
        assert (f"✓ login: logged in as {user.username} (as admin root@admin.test) (admin "
                "login as root@admin.test from environment variable MM_CHECK_ADMIN)"
                in proc.stdout)
        wrong = check(config, env={"MM_CHECK_ADMIN": "not-it"})
    finally:
        server.cleanup()
    assert wrong.returncode == 1
    assert "✗ login:" in wrong.stdout and "check admin_user (root@admin.test)" in wrong.stdout
    for out in (proc.stdout, wrong.stdout, proc.stderr, wrong.stderr):
        assert "admin-secret" not in out and "not-it" not in out


# --- POP3 ----------------------------------------------------------------------------

def test_missing_uidl(tmp_path):
    pop = FakePop3({"a": b"Subject: x\r\n\r\nhello\r\n"}, uidl=False)
    try:
        config = write_config(tmp_path / "c.toml", [{
            "name": "nouidl", "kind": "pop3-archive", "source": pop.job_source(),
            "archive": {"path": str(tmp_path / "archive")}}], state_url(tmp_path))
        proc, doc = check_json(config)
    finally:
        pop.close()
    assert proc.returncode == 1
    uidl = checks_of(doc, "source")["UIDL"]
    assert not uidl["ok"] and uidl["severity"] == "error"
    assert "resumable archive is impossible" in uidl["detail"]
    # nothing committed: the session ended with RSET and never deleted
    assert pop.deleted == []
    assert all(b"DELE" not in c and b"RETR" not in c for s in pop.sessions for c in s)
    # the fake does not know RSET: then no QUIT either (QUIT is what commits)
    last = [c.split()[0] for c in pop.sessions[-1]]
    assert last[-1] == b"RSET" and b"QUIT" not in last
    assert not (tmp_path / "archive").exists()


def test_deletion_without_uidplus_is_an_error(new_account, tmp_path):
    fake = FakeImapServer(capabilities=[c for c in DEFAULT_CAPABILITIES if c != "UIDPLUS"])
    try:
        config = write_config(tmp_path / "c.toml", [{
            "name": "nouidplus", "kind": "imap-copy", "source": fake.job_endpoint(),
            "destination": new_account.endpoint_toml("imap"), "delete_after_verify": True}],
            state_url(tmp_path))
        proc, doc = check_json(config)
        without_deletion = write_config(tmp_path / "keep.toml", [{
            "name": "keep", "kind": "imap-copy", "source": fake.job_endpoint(),
            "destination": new_account.endpoint_toml("imap")}], state_url(tmp_path))
        kept, kept_doc = check_json(without_deletion)
    finally:
        fake.close()
    assert proc.returncode == 1
    uidplus = checks_of(doc, "source")["UIDPLUS"]
    assert uidplus["severity"] == "error" and "delete_after_verify = true" in uidplus["detail"]
    assert kept.returncode == 0, kept.stdout
    assert checks_of(kept_doc, "source")["UIDPLUS"]["severity"] == "info"


# --- space ---------------------------------------------------------------------------

def test_destination_over_quota(old_account, new_host, tmp_path):
    fill(old_account, [12_000, 12_000, 12_000])  # ~36 KB
    small = new_host.add_user(f"small-{uuid.uuid4().hex[:8]}@new.test", "pw-small",
                              quota_rule="*:storage=20K")
    config = write_config(tmp_path / "c.toml", [imap_job("full", old_account, small)],
                          state_url(tmp_path))
    proc, doc = check_json(config)
    assert proc.returncode == 1
    quota = checks_of(doc, "destination")["quota"]
    assert not quota["ok"] and quota["detail"].startswith("destination over quota: ")
    assert "free (0 KB used of 20 KB)" in quota["detail"]
    assert "raise the mailbox's quota" in quota["hint"]


def test_messages_above_appendlimit(old_account, tmp_path):
    """Dovecot 2.3 enforces quota_max_mail_size but announces no APPENDLIMIT (checked:
    neither in CAPABILITY nor in STATUS), so the destination is the scriptable fake."""
    fill(old_account, [1_000, 9_000, 20_000])
    fake = FakeImapServer()
    fake.capabilities.add("APPENDLIMIT=8000")
    try:
        config = write_config(tmp_path / "c.toml", [{
            "name": "limit", "kind": "imap-copy",
            "source": old_account.endpoint_toml("imap"),
            "destination": fake.job_endpoint()}], state_url(tmp_path))
        proc, doc = check_json(config)
    finally:
        fake.close()
    assert proc.returncode == 1
    dest = checks_of(doc, "destination")
    assert dest["APPENDLIMIT"]["ok"] and "8 KB" in dest["APPENDLIMIT"]["detail"]
    size = dest["message size"]
    assert not size["ok"]
    assert size["detail"].startswith("2 messages larger than the destination's "
                                     "APPENDLIMIT of 8 KB will be refused")
    assert "the largest: 20 KB" in size["detail"] and "in 'INBOX'" in size["detail"]
    assert not [line for _sid, line in fake.log
                if line.split()[0].upper() in ("APPEND", "CREATE", "STORE", "EXPUNGE")]


def test_to_copy_is_the_reports_number(old_account, new_account, tmp_path):
    """Not an upper bound: what check counts as still to copy is what `report` counts,
    messages another tool already put at the destination (same Message-ID) included."""
    from migrate import config as cfg
    from migrate.report import build_report
    from migrate.results import size_text

    rng = random.Random(7)
    date = dt.datetime(2020, 1, 2, tzinfo=dt.timezone.utc)
    msgs = [mailgen.TestMessage("INBOX", mailgen.make_message(rng, i, size=size)[0], (), date)
            for i, size in enumerate((2_000, 3_000, 4_000, 5_000))]
    mailgen.fill(old_account, msgs)
    mailgen.fill(new_account, msgs[:2])  # another tool copied these two already
    config = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)],
                          state_url(tmp_path))
    with untouched(imap=[old_account, new_account]):
        proc, doc = check_json(config)
    assert proc.returncode == 0, proc.stdout
    totals = build_report(cfg.load(config), None)["jobs"][0]["totals"]
    assert (totals["already_there"], totals["to_copy"]) == (2, 2)
    detail = checks_of(doc, "source")["to copy"]["detail"]
    assert (f"{totals['already_there']} already at the destination; 2 messages "
            f"({size_text(totals['to_copy_bytes'])}) to copy") in detail, detail


def test_mail_vanishing_at_the_source_is_a_warning(old_account, new_account, tmp_path):
    """What the report warns about, check says too: a run goes ahead (exit 0), but
    another client is deleting mail from the mailbox."""
    fill(old_account, [2_000, 3_000, 4_000])
    config = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)],
                          state_url(tmp_path))
    assert run(config).ok
    mailgen.expunge_first(old_account, "INBOX", 1)
    proc, doc = check_json(config)
    assert proc.returncode == 0, proc.stdout
    (endpoint,) = [e for e in doc["jobs"][0]["endpoints"] if e["role"] == "source"]
    (warning,) = [c for c in endpoint["checks"] if c["name"] == "folders"]
    assert warning["severity"] == "warning" and not warning["ok"]
    assert warning["detail"].startswith("folder 'INBOX': 1 message vanished from the source")


# --- protocol binding ------------------------------------------------------------------

def test_binding_conflict_from_state_database(old_account, new_account, tmp_path):
    """The mailbox was archived over POP3 by another config's job: an IMAP job on it is
    refused, by check as by run."""
    url = state_url(tmp_path)
    pop_config = write_config(tmp_path / "pop.toml", [{
        "name": "pull", "kind": "pop3-archive", "source": old_account.endpoint_toml("pop3"),
        "archive": {"path": str(tmp_path / "archive")}}], url)
    assert run(pop_config).ok
    config = write_config(tmp_path / "c.toml", [imap_job("copy", old_account, new_account)],
                          url)
    with untouched(state_url=url):
        proc, doc = check_json(config)
    assert proc.returncode == 1
    binding = checks_of(doc, "source")["protocol binding"]
    assert not binding["ok"]
    assert "bound to POP3 by job 'pull'" in binding["detail"]
    assert "mailmigrate unbind" in binding["detail"]


def test_overlapping_jobs_in_config_exit_2(old_account, new_account, tmp_path):
    config = write_config(tmp_path / "c.toml", [
        imap_job("copy", old_account, new_account),
        {"name": "pull", "kind": "pop3-archive", "source": old_account.endpoint_toml("pop3"),
         "archive": {"path": str(tmp_path / "archive")}}], state_url(tmp_path))
    proc = check(config)
    assert proc.returncode == 2
    assert "use one protocol per mailbox" in proc.stderr


# --- another vendor ---------------------------------------------------------------------

def test_check_against_courier(courier_account, new_account, tmp_path):  # noqa: F811
    fill(courier_account, [2_000, 3_000])
    config = write_config(tmp_path / "c.toml",
                          [imap_job("courier", courier_account, new_account)],
                          state_url(tmp_path))
    with untouched(imap=[courier_account, new_account]):
        proc, doc = check_json(config)
    assert proc.returncode == 0, proc.stdout
    source = checks_of(doc, "source")
    assert source["login"]["ok"] and source["certificate name"]["ok"]
    assert source["greeting"]["ok"] and source["UIDPLUS"]["ok"]
    assert "2 messages" in source["to copy"]["detail"]


# --- exit codes, JSON, terminal ------------------------------------------------------------

def test_bad_config_exits_2(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[[jobs]]\nname = "x"\nkind = "imap-copy"\n')
    proc = check(config)
    assert proc.returncode == 2
    assert proc.stderr.startswith("mailmigrate: error:")
    proc = run_cli("check", "-c", str(config), "--job", "nope")
    assert proc.returncode == 2


def test_json_document_shape(old_account, new_account, tmp_path):
    config = write_config(tmp_path / "c.toml", [imap_job("shape", old_account, new_account)],
                          state_url(tmp_path))
    proc, doc = check_json(config, "--job", "shape")
    assert proc.returncode == 0
    assert set(doc) == {"schema", "generated_at", "ok", "jobs"}
    assert doc["schema"] == "mailmigrate.check/1" and doc["ok"] is True
    dt.datetime.fromisoformat(doc["generated_at"])
    (job,) = doc["jobs"]
    assert job["name"] == "shape" and job["kind"] == "imap-copy"
    assert [e["role"] for e in job["endpoints"]] == ["source", "destination"]
    for endpoint in job["endpoints"]:
        assert {"role", "host", "port", "protocol", "checks"} <= set(endpoint)
        assert endpoint["host"] == "127.0.0.1" and endpoint["protocol"] == "imap"
        assert isinstance(endpoint["port"], int)
        for c in endpoint["checks"]:
            assert set(c) == {"name", "ok", "severity", "detail", "hint"}
            assert isinstance(c["ok"], bool) and isinstance(c["detail"], str)
            assert c["severity"] in ("error", "warning", "info")
            assert c["hint"] is None or isinstance(c["hint"], str)
            assert new_account.password not in c["detail"]


def test_ascii_marks_when_terminal_is_not_utf8(old_account, new_account, tmp_path):
    source = old_account.endpoint_toml("imap")
    source["password"] = "wrong"
    config = write_config(tmp_path / "c.toml", [{
        "name": "ascii", "kind": "imap-copy", "source": source,
        "destination": new_account.endpoint_toml("imap", security="none",
                                                 allow_insecure=True)}],
        state_url(tmp_path))
    proc = check(config, env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 1
    assert "    ok   dns:" in proc.stdout
    assert "    FAIL login:" in proc.stdout
    assert "    WARN encryption:" in proc.stdout
    assert "        -> most providers disable the plaintext ports" in proc.stdout
    assert "✓" not in proc.stdout and "✗" not in proc.stdout
    proc.stdout.encode("ascii")  # nothing else either
