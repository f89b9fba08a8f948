"""``mailmigrate check``: every endpoint of every job looked at step by step, the way a
support engineer would on the phone - name resolution, port, what answers, TLS, login,
capabilities, space - each step one line with what was seen and what to do about it.

Strictly read-only: nothing is appended, stored, expunged or created; IMAP folders are
only EXAMINEd; a POP3 session ends with RSET before QUIT so nothing is committed; the
state database is opened as it is (never created or written).  Diagnoses reuse the
code a run uses (contact.py, tls.py, the endpoint sessions, the store's binding check),
so ``check`` and ``run`` say the same thing about the same problem.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import poplib
import shutil
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imapclient.exceptions import IMAPClientError

from .config import DEFAULT_PORTS, IMAP_COPY, Config, Endpoint, Job
from .endpoints.contact import explain, identify, probe, probe_wait, shown
from .endpoints.imap import ImapSession
from .endpoints.pop3 import Pop3Session
from .endpoints.sasl import login_who
from .endpoints.tls import StartTlsRefused, describe_tls_failure, ssl_context, tls_connect
from .errors import FolderError, MailboxError, MigrateError, SafetyError
from .report.plan import imap_job_numbers
from .results import size_text
from .states import State
from .store import Store, sqlite_file

SCHEMA = "mailmigrate.check/1"
ERROR, WARNING, INFO = "error", "warning", "info"
EXPIRY_WARNING_DAYS = 14
# the usual ports of the quick scan → spoken to over TLS?
SCAN_PORTS = {993: True, 143: False, 995: True, 110: False}
SCAN_WAIT = 2.0  # per port of the quick scan: a look, not a connection attempt
# the copy of a message in these states is at the destination (or in the archive)
DONE_STATES = (State.COPIED, State.VERIFIED, State.DELETING)
PLAINTEXT_ADVICE = (
    "most providers disable the plaintext ports 143 (IMAP) and 110 (POP3) for clients; "
    "use 993 (IMAP) or 995 (POP3) with security = \"ssl\", or STARTTLS "
    "(security = \"starttls\") where the server offers it")


@dataclass
class Check:
    name: str
    ok: bool
    severity: str  # ERROR: a run cannot work; WARNING: it works, but look; INFO: a fact
    detail: str
    hint: str | None = None

    @property
    def blocks(self) -> bool:
        return not self.ok and self.severity == ERROR


@dataclass
class EndpointReport:
    role: str  # "source", "destination", "archive"
    host: str | None
    port: int | None
    protocol: str  # "imap", "pop3", "maildir"
    label: str
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str, hint: str | None = None,
            severity: str | None = None) -> Check:
        check = Check(name, ok, severity or (INFO if ok else ERROR), detail, hint)
        self.checks.append(check)
        return check

    @property
    def ok(self) -> bool:
        return not any(c.blocks for c in self.checks)


@dataclass
class JobReport:
    name: str
    kind: str
    endpoints: list[EndpointReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.endpoints)


def passed(reports: Sequence[JobReport]) -> bool:
    return all(r.ok for r in reports)


# --- the whole check ---------------------------------------------------------------

def check_jobs(cfg: Config, jobs: Sequence[Job]) -> list[JobReport]:
    store = Store.open_existing(cfg.state_url)
    database = sqlite_file(cfg.state_url) or "the state database"
    try:
        return [_check_job(job, store, database) for job in jobs]
    finally:
        if store is not None:
            store.close()


def _check_job(job: Job, store: Store | None, database: str) -> JobReport:
    report = JobReport(job.name, job.kind)
    source_rep = _endpoint_report("source", job.source)
    report.endpoints.append(source_rep)
    source = _check_server(source_rep, job.source, "source", job)
    try:
        if source is not None:
            _guarded(source_rep, _binding, source_rep, source, job, store, database)
        if job.kind == IMAP_COPY:
            assert job.destination is not None
            dest_rep = _endpoint_report("destination", job.destination)
            report.endpoints.append(dest_rep)
            dest = _check_server(dest_rep, job.destination, "destination", job)
            try:
                if isinstance(source, ImapSession) and isinstance(dest, ImapSession):
                    _guarded(source_rep, _space, source_rep, dest_rep, source, dest, job,
                             store)
            finally:
                _close(dest)
        else:
            archive_rep = EndpointReport("archive", None, None, "maildir",
                                         str(job.archive.path) if job.archive else "")
            report.endpoints.append(archive_rep)
            _guarded(archive_rep, _archive, archive_rep,
                     source if isinstance(source, Pop3Session) else None, job, store)
    finally:
        _close(source)
    return report


def _guarded(rep: EndpointReport, step, *args) -> None:
    """A connection lost (or a server answering nonsense) in the middle of a step is a
    failed check, not a traceback; the state database's own errors still stop check."""
    try:
        step(*args)
    except (MailboxError, FolderError, OSError, EOFError, poplib.error_proto,
            IMAPClientError) as exc:
        rep.add("connection", False, f"lost during the check: {exc}")


def _endpoint_report(role: str, endpoint: Endpoint) -> EndpointReport:
    return EndpointReport(role, endpoint.host, endpoint.port, endpoint.protocol,
                          f"{endpoint.username} at {endpoint.host}:{endpoint.port}, "
                          f"security = \"{endpoint.security}\"")


def _close(session) -> None:
    if isinstance(session, ImapSession):
        session.logout()
    elif isinstance(session, Pop3Session):
        # RSET first: whatever happened, QUIT must not commit anything
        try:
            session.reset_and_quit()
        except (MigrateError, poplib.error_proto, OSError, EOFError):
            session.close()


def _check_server(rep: EndpointReport, endpoint: Endpoint, role: str, job: Job):
    """Network, greeting, TLS, login, capabilities: the session (logged in) when all a
    run needs to get that far passed, else None."""
    if not _reachable(rep, endpoint) or not _greeting(rep, endpoint):
        return None
    if endpoint.security == "none":
        rep.add("encryption", False,
                "security = \"none\": the password and all mail cross the network "
                "unencrypted (allowed by allow_insecure = true)",
                hint=PLAINTEXT_ADVICE, severity=WARNING)
    elif not _tls(rep, endpoint):
        return None
    session = _login(rep, endpoint)
    if session is None:
        return None
    if isinstance(session, ImapSession):
        _guarded(rep, _imap_capabilities, rep, session, role, job)
    else:
        _guarded(rep, _pop3_capabilities, rep, session)
    return session


# --- network -----------------------------------------------------------------------

def _reachable(rep: EndpointReport, endpoint: Endpoint) -> bool:
    host, port = endpoint.host, endpoint.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        rep.add("dns", False, f"cannot resolve {host!r}: {getattr(exc, 'strerror', exc)}",
                hint="check the host name for typos; the server is usually mail.<domain> "
                     "or imap.<domain> (ask the provider)")
        return False
    addresses = sorted({info[4][0] for info in infos})
    shown_addresses = ", ".join(addresses[:4]) + (" ..." if len(addresses) > 4 else "")
    rep.add("dns", True, f"{host} resolves to {shown_addresses}")
    wait = probe_wait(endpoint)
    problem, hint = None, None
    try:
        socket.create_connection((host, port), timeout=wait).close()
    except ConnectionRefusedError:
        problem = (f"port {port} of {host} is closed (connection refused: nothing listens "
                   "there, or a firewall rejects it)")
    except TimeoutError:
        problem = (f"port {port} of {host} did not answer within {wait:g} s (a firewall "
                   "drops the connection, or the host is down)")
    except OSError as exc:
        problem = f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    scan = _scan(endpoint)
    if scan:
        rep.add("ports", True, "mail ports on this host: " + "; ".join(
            f"{p} {what}" for p, what in scan.items()))
    if problem is None:
        rep.add("tcp", True, f"port {port} is open")
        return True
    proto = endpoint.protocol.upper()
    tls_port = DEFAULT_PORTS[endpoint.protocol]["ssl"]
    answering = [p for p, what in scan.items() if what.startswith(proto)]
    if port in (143, 110) or endpoint.security != "ssl":
        hint = PLAINTEXT_ADVICE
    if answering:
        hint = (f"{proto} answers on port {answering[0]} ({scan[answering[0]]}); use "
                f"port = {answering[0]} with security = "
                f"\"{'ssl' if SCAN_PORTS[answering[0]] else 'starttls'}\""
                + (f" ({PLAINTEXT_ADVICE})" if hint else ""))
    rep.add("tcp", False, problem, hint=hint or f"check host and port ({proto} over TLS: "
                                                f"{tls_port})")
    return False


def _scan(endpoint: Endpoint) -> dict[int, str]:
    """What answers on the usual IMAP/POP3 ports of the configured host (a quick look
    each; the configured port itself has its own steps)."""
    out = {}
    for port, tls in SCAN_PORTS.items():
        if port == endpoint.port:
            continue
        seen = probe(dataclasses.replace(endpoint, port=port, timeout=SCAN_WAIT), tls=tls)
        if not seen.connected:
            out[port] = "closed"
        elif seen.greeting is None:
            out[port] = "open, no greeting" + (" (no TLS)" if tls and not seen.handshake_ok
                                               else "")
        else:
            what = identify(seen.greeting) or "unknown"
            out[port] = f"{what} {'over TLS' if tls else 'plaintext'}"
    return out


def _greeting(rep: EndpointReport, endpoint: Endpoint) -> bool:
    """What answers on the configured port, spoken to the configured way."""
    proto = endpoint.protocol.upper()
    wants_tls = endpoint.security == "ssl"
    seen = probe(endpoint, tls=wants_tls)
    if seen.greeting is not None and identify(seen.greeting) == proto:
        rep.add("greeting", True, f"{_an(proto)} server answers "
                f"{'over TLS' if wants_tls else 'in plaintext'}: {shown(seen.greeting)}")
        if (endpoint.security == "none" and proto == "IMAP"
                and b"LOGINDISABLED" in seen.greeting.upper()):
            rep.add("plaintext login", False, "the server refuses logins in plaintext on "
                    "this port (LOGINDISABLED)", hint=PLAINTEXT_ADVICE)
            return False
        return True
    problem = explain(endpoint, seen) if seen.greeting is not None else None
    other = probe(endpoint, tls=not wants_tls)
    lead = ""
    if problem is None and other.greeting is not None:
        problem = explain(endpoint, other)
        if identify(other.greeting) == proto:
            lead = ("TLS client on a plaintext port: " if wants_tls else
                    "plaintext client on a TLS port: ")
    if problem is None:
        wait = probe_wait(endpoint)
        problem = (f"{endpoint.host}:{endpoint.port} accepted the connection but no "
                   f"{proto} greeting came within {wait:g} s, neither in plaintext nor over "
                   f"TLS; check that port {endpoint.port} is an {proto} port")
    rep.add("greeting", False, lead + str(problem))
    return False


def _an(proto: str) -> str:
    return f"a {proto}" if proto == "POP3" else f"an {proto}"


# --- TLS ---------------------------------------------------------------------------

def _tls(rep: EndpointReport, endpoint: Endpoint) -> bool:
    wait = probe_wait(endpoint)
    anything = ssl_context(endpoint)
    anything.check_hostname = False
    anything.verify_mode = ssl.CERT_NONE
    try:
        with tls_connect(endpoint, anything, wait) as sock:
            version, cipher = sock.version(), (sock.cipher() or ("?",))[0]
    except StartTlsRefused as exc:
        rep.add("tls handshake", False, f"{exc}: the upgrade to TLS is not offered on this "
                "port", hint=f"use port {DEFAULT_PORTS[endpoint.protocol]['ssl']} with "
                             "security = \"ssl\"")
        return False
    except (ssl.SSLError, OSError) as exc:
        rep.add("tls handshake", False, str(describe_tls_failure(endpoint, exc)))
        return False
    how = "STARTTLS, then " if endpoint.security == "starttls" else ""
    rep.add("tls handshake", True, f"{how}{version} ({cipher})")

    chain = ssl_context(endpoint)
    chain.check_hostname = False
    try:
        with tls_connect(endpoint, chain, wait) as sock:
            cert = sock.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        rep.add("certificate chain", False,
                f"the certificate of {endpoint.host}:{endpoint.port} is not trusted "
                f"({exc.verify_message})",
                hint="if the server uses a private CA, set ca_file to that CA's PEM file"
                     if endpoint.ca_file is None else
                     f"ca_file ({endpoint.ca_file}) is not the CA that signed this "
                     "certificate; give the right CA's PEM file")
        return False
    except (ssl.SSLError, OSError) as exc:
        rep.add("certificate chain", False, str(describe_tls_failure(endpoint, exc)))
        return False
    issuer = _name_of(cert.get("issuer", ()))
    rep.add("certificate chain", True, f"trusted (issued by {issuer or 'an unnamed CA'}"
            + (f", checked against ca_file {endpoint.ca_file}" if endpoint.ca_file else "")
            + ")")

    if "notAfter" in cert:
        expires = ssl.cert_time_to_seconds(cert["notAfter"])
        days = int((expires - time.time()) // 86400)
        when = dt.datetime.fromtimestamp(expires, dt.timezone.utc).strftime("%Y-%m-%d")
        if days < EXPIRY_WARNING_DAYS:
            rep.add("certificate expiry", False, f"expires in {days} days ({when})",
                    hint="a migration can take days: renew the certificate first, or runs "
                         "will fail once it has expired", severity=WARNING)
        else:
            rep.add("certificate expiry", True, f"valid until {when} ({days} days left)")

    try:
        with tls_connect(endpoint, ssl_context(endpoint), wait):
            pass
    except ssl.SSLCertVerificationError as exc:
        # describe_tls_failure: the very words a run fails with, naming the names
        rep.add("certificate name", False, str(describe_tls_failure(endpoint, exc)))
        return False
    except (ssl.SSLError, OSError) as exc:
        rep.add("certificate name", False, str(describe_tls_failure(endpoint, exc)))
        return False
    rep.add("certificate name", True, f"the certificate covers {endpoint.host!r}")
    return True


def _name_of(rdns) -> str:
    names = dict(item for rdn in rdns for item in rdn)
    return names.get("commonName") or names.get("organizationName") or ""


# --- login and capabilities ----------------------------------------------------------

def _login(rep: EndpointReport, endpoint: Endpoint) -> ImapSession | Pop3Session | None:
    kind = {"password": "password", "admin": f"admin login as {endpoint.admin_user}",
            "oauth2": "OAuth2 access token"}[endpoint.auth]
    try:
        if endpoint.protocol == "imap":
            session: ImapSession | Pop3Session = ImapSession.connect(endpoint)
        else:
            session = Pop3Session.connect(endpoint)
    except MigrateError as exc:
        hint = None
        if "@" not in endpoint.username:
            hint = (f"the username {endpoint.username!r} has no '@': the login is usually "
                    "the full email address (e.g. name@example.com)")
        rep.add("login", False, str(exc), hint=hint)
        return None
    secret = endpoint.password
    where = "the config file" if secret.kind == "password" else secret.describe()
    rep.add("login", True, f"logged in as {login_who(endpoint)} ({kind} from {where})")
    return session


def _imap_capabilities(rep: EndpointReport, session: ImapSession, role: str,
                       job: Job) -> None:
    has = session.has
    if role == "source":
        if has("UIDPLUS"):
            rep.add("UIDPLUS", True, "offered: deletion after verification removes exactly "
                    "the copied messages (UID EXPUNGE)" if job.delete_after_verify else
                    "offered (needed only to delete from the source; this job does not)")
        elif job.delete_after_verify:
            rep.add("UIDPLUS", False,
                    "not offered, but delete_after_verify = true: without UID EXPUNGE "
                    "deleting would need a bare EXPUNGE, which also removes messages other "
                    "clients flagged \\Deleted; runs will copy but refuse to delete",
                    hint="set delete_after_verify = false and clean up the source by hand "
                         "after the cutover")
        else:
            rep.add("UIDPLUS", False, "not offered; not needed: this job does not delete "
                    "from the source", severity=INFO)
        _offered(rep, has("SPECIAL-USE"), "SPECIAL-USE",
                 "Sent, Drafts, Trash ... are recognised by their role, whatever their names",
                 "folders are matched by name; map differing names in [jobs.folders] map")
        _offered(rep, has("CONDSTORE") or has("QRESYNC"), "CONDSTORE/QRESYNC",
                 "offered; mailmigrate compares flags itself, so it does not depend on it",
                 "not offered; not needed: mailmigrate compares flags itself")
        return
    _offered(rep, has("UIDPLUS"), "UIDPLUS",
             "APPEND answers with the new message's UID: each copy is verified directly",
             "copies are found by Message-ID and size after APPEND (slower)")
    _offered(rep, has("MULTIAPPEND"), "MULTIAPPEND",
             "several messages per APPEND command (fewer round trips)",
             "one APPEND per message (slower on a distant server)")
    _offered(rep, has("LITERAL+"), "LITERAL+",
             "message bodies are sent without waiting for the server's go-ahead",
             "one more round trip per message")
    _offered(rep, has("SPECIAL-USE"), "SPECIAL-USE",
             "Sent, Drafts, Trash ... of the source go to the folders with the same role",
             "folders are matched by name; map differing names in [jobs.folders] map")
    _offered(rep, has("CONDSTORE") or has("QRESYNC"), "CONDSTORE/QRESYNC",
             "offered; not needed", "not offered; not needed")
    _offered(rep, has("QUOTA"), "QUOTA", "the destination reports its quota (checked below)",
             "the destination does not report quota: free space cannot be checked in "
             "advance", severity=WARNING)
    limit = session.appendlimit
    _offered(rep, limit is not None, "APPENDLIMIT",
             f"the largest message the destination accepts: {size_text(limit or 0)}",
             "no APPENDLIMIT announced: a size limit, if any, shows only when a message "
             "is refused")


def _offered(rep: EndpointReport, ok: bool, name: str, yes: str, no: str,
             severity: str = INFO) -> None:
    rep.add(name, ok, yes if ok else no, severity=INFO if ok else severity)


def _pop3_capabilities(rep: EndpointReport, session: Pop3Session) -> None:
    client = session.client
    try:
        caps = client.capa()
    except poplib.error_proto:
        caps = {}  # no CAPA: UIDL itself tells below
    if "UIDL" in caps:
        rep.add("UIDL", True, "offered: every message has a stable id, so runs resume and "
                "never fetch a message twice")
    else:
        try:
            client.uidl()
            rep.add("UIDL", True, "works (though CAPA does not list it)")
        except poplib.error_proto:
            rep.add("UIDL", False,
                    "not supported: without stable message ids a resumable archive is "
                    "impossible (every run would download everything again, and deletion "
                    "could hit the wrong message)",
                    hint="use IMAP (an imap-copy job) for this mailbox if the server offers it")
    _offered(rep, "PIPELINING" in caps, "PIPELINING",
             "several RETR commands in flight (faster)", "one RETR at a time")
    _offered(rep, "UTF8" in caps, "UTF8",
             "messages with 8-bit headers are sent unchanged",
             "not offered; fine unless the server rewrites 8-bit headers")
    _offered(rep, "STLS" in caps or session.endpoint.security != "none", "STLS",
             "the connection is encrypted" if session.endpoint.security != "none" else
             "offered: use security = \"starttls\" on this port",
             "not offered: this port stays plaintext", severity=WARNING)
    try:
        count, size = client.stat()
        rep.add("mailbox", True, f"{count} messages, {size_text(size)} on the server")
    except poplib.error_proto as exc:
        rep.add("mailbox", False, f"STAT refused: {exc}", severity=WARNING)


# --- protocol binding, space ---------------------------------------------------------

def _binding(rep: EndpointReport, session, job: Job, store: Store | None,
             database: str) -> None:
    src = job.source
    proto = src.protocol.upper()
    if store is None:
        rep.add("protocol binding", True, f"no state database yet ({database}): the first "
                f"run binds this mailbox to {proto}")
        return
    if store.job_is_running(job.name):
        rep.add("running", False, f"a run of job {job.name!r} is going on right now",
                hint="a second run would exit with code 3 until it ends", severity=WARNING)
    try:
        binding = store.bind_mailbox(
            session.server_aliases, f"{src.host}:{src.port}", src.username, src.protocol,
            job.name, deletes=job.delete_after_verify or job.leave_on_server_days is not None,
            check_only=True)
    except SafetyError as exc:
        rep.add("protocol binding", False, str(exc))
        return
    if binding is None:
        rep.add("protocol binding", True, f"not bound yet: the first run binds it to {proto}")
    else:
        rep.add("protocol binding", True,
                f"bound to {binding.protocol.upper()} by job {binding.bound_by_job!r} since "
                f"{binding.bound_at:%Y-%m-%d %H:%M} UTC")


def _space(source_rep: EndpointReport, dest_rep: EndpointReport, src: ImapSession,
           dst: ImapSession, job: Job, store: Store | None) -> None:
    """What is still to copy, counted exactly as ``report`` counts it (the planner's
    folders: the state database, then the duplicate rules against a read-only listing of
    the destination; EXAMINE, sizes, flags and Message-IDs only), against the
    destination's quota and APPENDLIMIT."""
    try:
        numbers = imap_job_numbers(job, src, dst, store)
    except MigrateError as exc:
        source_rep.add("folders", False, f"cannot list the folders: {exc}")
        return
    for excluded in numbers["excluded"]:
        if excluded["refused"]:  # a run refuses it (e.g. two folders that would merge)
            source_rep.add("folders", False, f"folder {excluded['source']!r}: "
                           f"{excluded['rule'].removeprefix('refused: ')}")
    unreadable = {f["source"] for f in numbers["folders"] if f["error"]}
    for f in numbers["folders"]:
        if f["error"]:
            source_rep.add("folders", False, f"cannot read folder {f['source']!r}: "
                           f"{f['error']}")
    # what else the planner noticed (mail vanishing under another client, quarantined
    # messages, a changed UIDVALIDITY): a run goes ahead, but look
    said = tuple(f"folder {name!r} " for name in unreadable) + tuple(
        f"folder {x['source']!r} is not copied" for x in numbers["excluded"])
    for warning in numbers["warnings"]:
        if not warning.startswith(said):
            source_rep.add("folders", False, warning, severity=WARNING)
    t = numbers["totals"]
    source_rep.add("to copy", True,
                   f"{_count(t['folders'], 'folder')}, {_count(t['source_messages'], 'message')}"
                   f" ({size_text(t['source_bytes'])}); {t['already_there']} already at the "
                   f"destination; {_count(t['to_copy'], 'message')} "
                   f"({size_text(t['to_copy_bytes'])}) to copy (counted as "
                   "`mailmigrate report` counts)")
    limit = dst.appendlimit
    too_big = [r for r in numbers["destination_refuses"] if r["folder"] is not None]
    if limit is not None:
        if too_big:
            largest = max(too_big, key=lambda r: r["size"])
            dest_rep.add("message size", False,
                         f"{_count(len(too_big), 'message')} larger than the destination's "
                         f"APPENDLIMIT of {size_text(limit)} will be refused; the largest: "
                         f"{size_text(largest['size'])} ({largest['id']} in "
                         f"{largest['folder']!r})",
                         hint="ask for a higher limit at the destination, or exclude or "
                              "move those messages before the run")
        else:
            dest_rep.add("message size", True,
                         f"every message to copy fits the APPENDLIMIT of {size_text(limit)}")
    if dst.has("QUOTA"):
        _quota(dest_rep, dst, t["to_copy"], t["to_copy_bytes"])


def _quota(rep: EndpointReport, dst: ImapSession, count: int, need: int) -> None:
    try:
        _roots, quotas = dst.client.get_quota_root("INBOX")
    except IMAPClientError as exc:
        rep.add("quota", False, f"GETQUOTAROOT INBOX refused: {exc}", severity=WARNING)
        return
    limits = {q.resource.upper(): q for q in quotas}
    storage, messages = limits.get("STORAGE"), limits.get("MESSAGE")
    if storage is None and messages is None:
        rep.add("quota", True, "no storage limit on INBOX's quota root")
        return
    problems, facts = [], []
    if storage is not None:
        free = max(0, (storage.limit - storage.usage) * 1024)  # RFC 2087: units of 1024
        facts.append(f"{size_text(free)} free of {size_text(storage.limit * 1024)}")
        if need > free:
            problems.append(f"{size_text(need)} to copy but only {size_text(free)} free "
                            f"({size_text(storage.usage * 1024)} used of "
                            f"{size_text(storage.limit * 1024)})")
    if messages is not None:
        left = max(0, messages.limit - messages.usage)
        facts.append(f"room for {left} more messages")
        if count > left:
            problems.append(f"{count} messages to copy but room for only {left}")
    if problems:
        rep.add("quota", False, "destination over quota: " + "; ".join(problems),
                hint="raise the mailbox's quota at the destination before the run, or "
                     "exclude folders; the run would fail once the quota is full")
    else:
        rep.add("quota", True, "enough room: " + ", ".join(facts))


def _archive(rep: EndpointReport, pop: Pop3Session | None, job: Job,
             store: Store | None) -> None:
    assert job.archive is not None
    path = Path(job.archive.path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if path.exists() and not path.is_dir():
        rep.add("archive path", False, f"{path} exists but is not a directory",
                hint="give archive path a directory (a Maildir is one)")
        return
    if not os.access(existing, os.W_OK | os.X_OK):
        rep.add("archive path", False, f"{existing} is not writable by this user",
                hint="run as the user owning the archive, or fix the permissions")
        return
    rep.add("archive path", True, f"{path} exists and is writable" if path.exists() else
            f"{path} does not exist yet; the first run creates it in {existing} (writable)")
    free = shutil.disk_usage(existing).free
    if pop is None:
        rep.add("free space", True, f"{size_text(free)} free", severity=INFO)
        return
    try:
        _count, on_server = pop.client.stat()
    except (poplib.error_proto, OSError):
        return
    archived = 0
    job_id = store.find_job(job.name) if store is not None else None
    if store is not None and job_id is not None:
        totals = store.state_totals(job_id)
        archived = sum(totals.get(str(s), (0, 0))[1] for s in DONE_STATES)
    need = max(0, on_server - archived)
    if need > free:
        rep.add("free space", False, f"{size_text(need)} to archive but only {size_text(free)} free "
                f"on the archive's file system", hint="free space or archive elsewhere")
    else:
        rep.add("free space", True, f"{size_text(free)} free; at most {size_text(need)} to archive")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --- output ------------------------------------------------------------------------

def check_document(reports: Sequence[JobReport], generated_at: str) -> dict:
    """The ``--json`` document (schema mailmigrate.check/1, see the README)."""
    return {
        "schema": SCHEMA, "generated_at": generated_at, "ok": passed(reports),
        "jobs": [{"name": r.name, "kind": r.kind, "ok": r.ok, "endpoints": [
            {"role": e.role, "host": e.host, "port": e.port, "protocol": e.protocol,
             "ok": e.ok, "checks": [dataclasses.asdict(c) for c in e.checks]}
            for e in r.endpoints]} for r in reports]}


UNICODE_MARKS = {"ok": "✓", ERROR: "✗", WARNING: "!", INFO: "-"}
ASCII_MARKS = {"ok": "ok  ", ERROR: "FAIL", WARNING: "WARN", INFO: "--  "}


def unicode_terminal(stream) -> bool:
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
    return encoding.startswith("utf")


def check_text(reports: Sequence[JobReport], unicode: bool = True) -> list[str]:
    marks = UNICODE_MARKS if unicode else ASCII_MARKS
    arrow = "→" if unicode else "->"
    lines = []
    for r in reports:
        lines.append(f"job {r.name} ({r.kind})")
        for e in r.endpoints:
            lines.append(f"  {e.role}: {e.protocol.upper()} {e.label}")
            for c in e.checks:
                mark = marks["ok" if c.ok else c.severity]
                lines.append(f"    {mark} {c.name}: {c.detail}")
                if c.hint and not c.ok:
                    lines.append(f"        {arrow} {c.hint}")
        problems = [c for e in r.endpoints for c in e.checks if c.blocks]
        warnings = [c for e in r.endpoints for c in e.checks
                    if not c.ok and c.severity == WARNING]
        lines.append(f"  {r.name}: " + (
            f"{_count(len(problems), 'problem')} a run cannot get past" if problems else
            "ready to run") + (f", {_count(len(warnings), 'warning')}" if warnings else ""))
    if len(reports) > 1:
        blocked = [r.name for r in reports if not r.ok]
        lines.append(f"check: all {len(reports)} jobs ready to run" if not blocked else
                     f"check: {len(reports) - len(blocked)} of {len(reports)} jobs ready to "
                     f"run; NOT ready: {', '.join(blocked)} (see above)")
    if not unicode:
        lines = [line.encode("ascii", "replace").decode("ascii") for line in lines]
    return lines
