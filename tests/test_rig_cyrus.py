"""The Cyrus rig itself, exercised with imapclient/poplib directly (not mailmigrate).

Run with -s to see what this Cyrus announces (CAPABILITY, NAMESPACE, LIST, ...).
"""

from __future__ import annotations

# The Cyrus fixtures are imported by name, so test parameters "redefine" them.
# ruff: noqa: F811

import datetime as dt
import imaplib
import poplib
import random
import ssl

import pytest
from imapclient import IMAPClient

from tests.rig import mailgen
from tests.rig.cyrus import CyrusServer, start_or_fail
from tests.rig.cyrus import cyrus_account, cyrus_host  # noqa: F401

SUBJECT_8BIT = "Grüße aus Köln #2 — €uro".encode()
# munge8bit: every byte >= 0x80 in a header becomes 'X' (ü = 2 bytes, — = 3 bytes)
SUBJECT_MUNGED = b"GrXXXXe aus KXXln #2 XXX XXXuro"


@pytest.fixture(scope="module")
def legacy_cyrus(test_ca):
    """Cyrus 2 style: '.' separator, folders below "INBOX.", and munge8bit off."""
    server = start_or_fail(CyrusServer("cyrus-legacy", test_ca, unixhierarchysep=False,
                                munge8bit=False))
    yield server
    server.cleanup()


def tls_context(account, **kwargs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(account.server.ca_file))
    for name, value in kwargs.items():
        setattr(ctx, name, value)
    return ctx


def header(body: bytes, name: bytes) -> bytes:
    (line,) = [h for h in body.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
               if h.startswith(name + b": ")]
    return line[len(name) + 2:]


def test_imaps_login_capability_namespace_list(cyrus_account):
    client = mailgen.connect(cyrus_account)
    try:
        caps = {c.decode() for c in client.capabilities()}
        namespace = client.namespace()
        client.create_folder("Archive/2019")
        listing = client.list_folders()
        tls = client._imap.sock.version()
    finally:
        client.logout()
    print(f"\nCAPABILITY {' '.join(sorted(caps))}\nNAMESPACE {namespace}\nLIST {listing}")
    assert {"UIDPLUS", "MULTIAPPEND", "LITERAL+", "NAMESPACE", "SPECIAL-USE",
            "CONDSTORE"} <= caps
    assert tls in ("TLSv1.2", "TLSv1.3")
    assert namespace.personal == (("", "/"),)
    assert {name for _f, _d, name in listing} == {"INBOX", "Archive", "Archive/2019"}
    assert {d for _f, d, _n in listing} == {b"/"}


def test_tls12_is_accepted_and_plaintext_login_refused(cyrus_account):
    ctx = tls_context(cyrus_account, maximum_version=ssl.TLSVersion.TLSv1_2)
    client = IMAPClient("127.0.0.1", port=cyrus_account.server.ports["imaps"],
                        ssl_context=ctx, timeout=30)
    client.login(cyrus_account.username, cyrus_account.password)
    assert client._imap.sock.version() == "TLSv1.2"
    client.logout()
    plain = IMAPClient("127.0.0.1", port=cyrus_account.server.ports["imap"], ssl=False,
                       timeout=30)
    assert b"LOGINDISABLED" in plain.capabilities()
    with pytest.raises(imaplib.IMAP4.error):
        plain.login(cyrus_account.username, cyrus_account.password)
    plain.starttls(tls_context(cyrus_account))  # PLAIN/LOGIN after STARTTLS
    plain.login(cyrus_account.username, cyrus_account.password)
    plain.logout()


def test_append_flags_keyword_internaldate_read_back(cyrus_account):
    body, _ = mailgen.make_message(random.Random(1), 1, attachment=True)
    date = dt.datetime(2014, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    client = mailgen.connect(cyrus_account)
    try:
        client.create_folder("Projekte/Überblick")
        response = client.append("Projekte/Überblick", body,
                                 flags=["\\Seen", "\\Flagged", "$Label1", "project-x"],
                                 msg_time=date)
        assert response.startswith(b"[APPENDUID ")
        info = client.select_folder("Projekte/Überblick")
        print(f"\nPERMANENTFLAGS {info[b'PERMANENTFLAGS']}")
        assert b"\\*" in info[b"PERMANENTFLAGS"]  # new keywords may be created
        (item,) = client.fetch(client.search("ALL"),
                               ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]).values()
    finally:
        client.logout()
    assert item[b"BODY[]"] == body
    assert set(item[b"FLAGS"]) - {b"\\Recent"} == {b"\\Seen", b"\\Flagged", b"$Label1",
                                                   b"project-x"}
    assert item[b"INTERNALDATE"] == date  # the same instant (Cyrus answers in UTC)


def test_many_simultaneous_connections(cyrus_account):
    clients = [mailgen.connect(cyrus_account) for _ in range(25)]
    try:
        assert all(c.select_folder("INBOX")[b"EXISTS"] == 0 for c in clients)
    finally:
        for c in clients:
            c.logout()


def test_pop3s_uidl_and_retr_return_the_appended_message(cyrus_account):
    body, _ = mailgen.make_message(random.Random(2), 2, lone_dot=True)
    mailgen.fill(cyrus_account, [mailgen.TestMessage("INBOX", body, (), dt.datetime(
        2016, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))])
    pop = poplib.POP3_SSL("127.0.0.1", cyrus_account.server.ports["pop3s"],
                          context=tls_context(cyrus_account), timeout=30)
    try:
        print(f"\nPOP3 greeting {pop.getwelcome()!r}\nCAPA {pop.capa()}")
        pop.user(cyrus_account.username)
        pop.pass_(cyrus_account.password)
        _resp, uidls, _ = pop.uidl()
        _resp, lines, octets = pop.retr(1)
    finally:
        pop.quit()
    print(f"UIDL {uidls}")
    assert len(uidls) == 1 and uidls[0].startswith(b"1 ")
    assert b"\r\n".join(lines) + b"\r\n" == body
    assert octets == len(body)


def test_munge8bit_turns_8bit_header_bytes_into_x(cyrus_account):
    body, _ = mailgen.make_message(random.Random(3), 2, eight_bit=True)
    assert header(body, b"Subject") == SUBJECT_8BIT
    client = mailgen.connect(cyrus_account)
    try:
        response = client.append("INBOX", body)  # accepted without a word
        client.select_folder("INBOX")
        (item,) = client.fetch(client.search("ALL"), ["BODY.PEEK[]"]).values()
    finally:
        client.logout()
    stored = item[b"BODY[]"]
    print(f"\nAPPEND of an 8-bit Subject: {response!r}\nstored Subject: "
          f"{header(stored, b'Subject')!r}")
    assert response.endswith(b"] Completed")
    assert header(stored, b"Subject") == SUBJECT_MUNGED
    # only the header is changed: same length, 8-bit body text kept
    assert len(stored) == len(body) and stored != body
    assert stored.split(b"\r\n\r\n", 1)[1] == body.split(b"\r\n\r\n", 1)[1]


def test_legacy_layout_and_munge8bit_off(legacy_cyrus):
    account = legacy_cyrus.add_user("legacy-1@old.test", "pw-legacy")
    body, _ = mailgen.make_message(random.Random(4), 2, eight_bit=True)
    client = mailgen.connect(account)
    try:
        namespace = client.namespace()
        client.create_folder("INBOX.Archive.2019")
        listing = client.list_folders()
        client.append("INBOX.Archive.2019", body, flags=["$Forwarded"])
        client.select_folder("INBOX.Archive.2019")
        (item,) = client.fetch(client.search("ALL"), ["BODY.PEEK[]", "FLAGS"]).values()
    finally:
        client.logout()
    print(f"\nNAMESPACE {namespace}\nLIST {listing}")
    assert namespace.personal == (("INBOX.", "."),)
    assert {name for _f, _d, name in listing} == {"INBOX", "INBOX.Archive",
                                                  "INBOX.Archive.2019"}
    assert item[b"BODY[]"] == body
    assert b"$Forwarded" in item[b"FLAGS"]
