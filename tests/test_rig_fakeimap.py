"""The scriptable fake IMAP server: each behaviour really happens on the wire, and the
tool copies a whole mailbox between two fakes in their default (well-behaved) mode."""

from __future__ import annotations

import datetime as dt
import imaplib
import socket
import ssl
import threading

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from tests.rig import mailgen
from tests.rig.fakeimap import FakeImapServer, tls_from_ca
from tests.rig.jobs import run, write_config

BODY = (b"From: a@test.example\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n"
        b"Message-ID: <one@test.example>\r\n\r\nHello\r\n")
DATE = dt.datetime(2012, 3, 4, 5, 6, 7, tzinfo=dt.timezone(dt.timedelta(hours=1)))


@pytest.fixture
def server():
    srv = FakeImapServer()
    yield srv
    srv.close()


def connect(srv: FakeImapServer, login: bool = True, **kwargs) -> IMAPClient:
    client = IMAPClient("127.0.0.1", port=srv.port, ssl=False, timeout=10, **kwargs)
    client.normalise_times = False
    client._imap.debug = 0
    if login:
        client.login("user@fake.test", "secret")
    return client


def exchange(srv: FakeImapServer, *chunks: bytes) -> list[bytes]:
    """Send each chunk on a fresh connection and read one line after it (first 40 bytes,
    so an OK's [CAPABILITY ...] does not matter)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        f = conn.makefile("rwb")
        f.readline()  # greeting
        out = []
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            line = f.readline().rstrip(b"\r\n")
            out.append(line.split(b" [", 1)[0][:60] if b"OK [" in line else line[:60])
        return out


def raw_fetch(client: IMAPClient, uid_set: str, items: str):
    """UID FETCH as the tool sends it (uid-set strings such as '1:*')."""
    return client._imap.uid("FETCH", uid_set, items)


# --- plain protocol ---------------------------------------------------------------------

def test_append_fetch_round_trip_with_appenduid_and_literal_plus(server):
    server.add_folder("Sent", "\\Sent")
    client = connect(server)
    assert {b"UIDPLUS", b"MULTIAPPEND", b"LITERAL+"} <= set(client.capabilities())
    assert ((b"\\HasNoChildren", b"\\Sent"), b"/", "Sent") in client.list_folders()
    response = client.append("Sent", BODY, flags=["\\Seen", "$Label1"], msg_time=DATE)
    info = client.select_folder("Sent")
    assert response == f"[APPENDUID {info[b'UIDVALIDITY']} 1] Append completed".encode()
    assert info[b"EXISTS"] == 1 and info[b"UIDNEXT"] == 2
    got = client.fetch([1], ["RFC822.SIZE", "FLAGS", "INTERNALDATE", "BODY.PEEK[]",
                             "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]", "BODY.PEEK[]<5.9>"])[1]
    assert got[b"BODY[]"] == BODY and got[b"RFC822.SIZE"] == len(BODY)
    assert set(got[b"FLAGS"]) == {b"\\Seen", b"$Label1"}
    assert got[b"INTERNALDATE"] == DATE and got[b"INTERNALDATE"].utcoffset() == \
        dt.timedelta(hours=1)
    assert got[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"] == b"Message-ID: <one@test.example>\r\n\r\n"
    assert got[b"BODY[]<5>"] == BODY[5:14]
    # MULTIAPPEND with LITERAL+: one command, no continuation, one APPENDUID range
    typ, data = client.multiappend("Sent", [b"a\r\n", {"msg": b"b\r\n", "flags": ["\\Seen"]}])
    assert typ == "OK" and data[0].startswith(b"[APPENDUID ") and b" 2:3]" in data[0]
    assert server.received("APPEND")[-1] == 'APPEND "Sent" {3+} (\\Seen) {3+}'
    assert [u for u, *_ in server.messages("Sent")] == [1, 2, 3]
    assert client.search(["HEADER", "Message-ID", "one@test"]) == [1]
    client.logout()


def test_uid_range_star_returns_the_last_message_and_expunge_is_by_uid(server):
    for n in range(3):
        server.add_message("INBOX", b"m%d\r\n" % n, ["\\Deleted"] if n < 2 else [])
    client = connect(server)
    client.select_folder("INBOX")
    typ, data = raw_fetch(client, "100:*", "(RFC822.SIZE)")
    assert typ == "OK" and b"UID 3" in data[0]  # '*' is the largest UID (RFC 3501)
    client.uid_expunge([1])
    assert [u for u, *_ in server.messages("INBOX")] == [2, 3]  # UID 2 (\Deleted) kept
    client.logout()
    assert "EXPUNGE" not in server.received("EXPUNGE")


def test_tls_and_authenticate_plain_and_sessions_share_the_store(test_ca):
    with FakeImapServer(users={"user@fake.test": "secret"}, **tls_from_ca(test_ca)) as srv:
        ctx = ssl.create_default_context(cafile=srv.job_endpoint()["ca_file"])
        clients = [IMAPClient("127.0.0.1", port=srv.port, ssl_context=ctx, timeout=10)
                   for _ in range(2)]
        for c in clients:
            c.plain_login("user@fake.test", "secret")
        with pytest.raises(LoginError):
            IMAPClient("127.0.0.1", port=srv.port, ssl_context=ctx).login("user@fake.test", "x")
        reader, writer = clients
        reader.select_folder("INBOX")
        threads = [threading.Thread(target=writer.append, args=("INBOX", b"x%d\r\n" % i))
                   for i in range(1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert reader.noop()[1] == [(1, b"EXISTS")]  # the other session's append shows
        assert reader.search("ALL") == [1]
        assert srv.job_endpoint() == {
            "host": "127.0.0.1", "port": srv.port, "username": "user@fake.test",
            "password": "secret", "security": "ssl", "ca_file": srv.ca_file.as_posix()}
        for c in clients:
            c.logout()


# --- scriptable behaviours --------------------------------------------------------------

def test_capabilities_are_editable_and_enforced(server):
    server.capabilities -= {"UIDPLUS", "MULTIAPPEND", "LITERAL+"}
    server.capabilities.add("CONDSTORE")
    client = connect(server)
    caps = set(client.capabilities())
    assert b"CONDSTORE" in caps and not caps & {b"UIDPLUS", b"MULTIAPPEND", b"LITERAL+"}
    assert client.append("INBOX", BODY) == b"Append completed"  # no APPENDUID
    assert server.received("APPEND")[-1].endswith("{%d}" % len(BODY))  # synchronising
    client.select_folder("INBOX")
    with pytest.raises(imaplib.IMAP4.error, match="Unknown command UID EXPUNGE"):
        client._imap.uid("EXPUNGE", "1")  # imapclient itself would refuse to send it
    client.logout()
    # what imapclient would refuse to send, on a raw connection
    assert exchange(server, b"a1 LOGIN u p\r\n", b"a2 APPEND INBOX {1}\r\n", b"a {1}\r\n",
                    b"b\r\n", b"a3 APPEND INBOX {1+}\r\nx\r\n") == [
        b"a1 OK", b"+ Ready for literal data", b"+ Ready for literal data",
        b"a2 BAD Several messages in one APPEND without MULTIAPPEND",
        b"a3 BAD Non-synchronizing literal without LITERAL+"]
    assert len(server.messages("INBOX")) == 1


def test_inexact_size(server):
    server.add_message("INBOX", BODY)
    server.inexact_size = 7
    client = connect(server)
    client.select_folder("INBOX", readonly=True)
    got = client.fetch([1], ["RFC822.SIZE", "BODY.PEEK[]"])[1]
    assert got[b"RFC822.SIZE"] == len(BODY) + 7 and len(got[b"BODY[]"]) == len(BODY)
    client.logout()


def test_alter_on_append_rewrites_8bit_headers(server):
    def munge8bit(body: bytes) -> bytes:
        head, sep, rest = body.partition(b"\r\n\r\n")
        return bytes(c if c < 128 else 63 for c in head) + sep + rest

    server.alter_on_append = munge8bit
    client = connect(server)
    client.append("INBOX", BODY)
    client.logout()
    (_uid, stored, _f, _d), = server.messages("INBOX")
    assert stored == BODY.replace("Grüße".encode(), b"Gr????e") and stored != BODY


def test_bye_and_no_on_fetch_of_chosen_uids(server):
    server.add_folder("Other")
    for n in range(3):
        server.add_message("INBOX", b"Subject: %d\r\n\r\nm\r\n" % n)
        server.add_message("Other", b"Subject: %d\r\n\r\nm\r\n" % n)
    server.no_on_fetch_uids = {2}  # in every folder
    server.bye_on_fetch_uids = {("INBOX", 3)}  # in this folder only
    client = connect(server)
    client.select_folder("Other", readonly=True)
    assert raw_fetch(client, "3", "(BODY.PEEK[])")[0] == "OK"
    assert raw_fetch(client, "2", "(BODY.PEEK[])")[0] == "NO"
    client.logout()
    client = connect(server)
    client.select_folder("INBOX", readonly=True)
    # metadata and headers of the broken messages still come
    assert raw_fetch(client, "1:*", "(RFC822.SIZE RFC822.HEADER)")[0] == "OK"
    typ, data = raw_fetch(client, "1:2", "(BODY.PEEK[])")
    assert typ == "NO" and b"could not be FETCHed" in data[0]
    delivered = client._imap.untagged_responses.pop("FETCH")
    assert [item[0] for item in delivered if isinstance(item, tuple)] == \
        [b"1 (UID 1 BODY[] {17}"]
    with pytest.raises(imaplib.IMAP4.abort, match="Internal error occurred"):
        raw_fetch(client, "3", "(BODY.PEEK[])")
    client.shutdown()


def test_reject_append_all_or_nothing(server):
    server.reject_append = lambda body, flags: "[LIMIT] too big" if len(body) > 10 else None
    client = connect(server)
    with pytest.raises(IMAPClientError, match=r"\[LIMIT\] too big"):
        client.append("INBOX", BODY)
    typ, data = client.multiappend("INBOX", [b"ok\r\n", BODY])
    assert typ == "NO" and data == [b"[LIMIT] too big"]
    assert server.messages("INBOX") == []  # MULTIAPPEND: the small one was not kept
    client.append("INBOX", b"ok\r\n")
    assert len(server.messages("INBOX")) == 1
    client.logout()


def test_rejected_keywords_and_permanentflags(server):
    server.rejected_keywords = {"$Label1"}
    server.add_message("INBOX", b"x\r\n")
    client = connect(server)
    info = client.select_folder("INBOX")
    assert b"\\*" not in info[b"PERMANENTFLAGS"] and b"\\Seen" in info[b"PERMANENTFLAGS"]
    with pytest.raises(IMAPClientError, match="Unrecognized flag"):
        client.append("INBOX", BODY, flags=["\\Seen", "$label1"])
    with pytest.raises(IMAPClientError, match="Unrecognized flag"):
        client.add_flags([1], ["$Label1"])
    client.add_flags([1], ["project-x"])  # other keywords are fine
    # an explicit PERMANENTFLAGS without \* allows only the keywords it lists
    server.permanentflags = ["\\Seen", "\\Flagged", "$Work"]
    assert client.select_folder("INBOX")[b"PERMANENTFLAGS"] == (b"\\Seen", b"\\Flagged",
                                                                b"$Work")
    client.add_flags([1], ["$Work"])
    with pytest.raises(IMAPClientError, match="Unrecognized flag"):
        client.add_flags([1], ["other"])
    client.logout()
    assert server.messages("INBOX")[0][2] == {"project-x", "$Work"}


def test_drop_flags_and_dates_on_append(server):
    server.drop_flags_and_dates_on_append = True
    client = connect(server)
    client.append("INBOX", BODY, flags=["\\Seen", "$Label1"], msg_time=DATE)
    client.logout()
    (_uid, body, flags, date), = server.messages("INBOX")
    assert body == BODY and flags == frozenset()
    assert abs(date - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=1)


def test_append_invisible_until_noop(server):
    server.append_invisible_until_noop = True
    server.add_message("INBOX", b"old\r\n")
    client = connect(server)
    client.select_folder("INBOX")
    client.append("INBOX", BODY)
    assert len(server.messages("INBOX")) == 2  # stored, but this session cannot see it
    assert client.search("ALL") == [1]
    assert raw_fetch(client, "2", "(BODY.PEEK[])") == ("OK", [None])
    assert client.noop()[1] == [(2, b"EXISTS")]
    assert client.search("ALL") == [1, 2]
    client.logout()


def test_quote_header_field_names(server):
    server.quote_header_field_names = True
    server.add_message("INBOX", BODY)
    client = connect(server)
    client.select_folder("INBOX", readonly=True)
    _typ, data = raw_fetch(client, "1:*", "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    assert data[0][0] == b'1 (UID 1 BODY[HEADER.FIELDS ("MESSAGE-ID")] {34}'
    client.logout()


def test_login_and_greeting_responses(server):
    server.greeting_responses = ["BYE [UNAVAILABLE] Suggested Backoff Time: 5 seconds"]
    with pytest.raises(imaplib.IMAP4.error, match="Suggested Backoff Time: 5 seconds"):
        connect(server, login=False)
    server.login_responses = ["NO [UNAVAILABLE] Try later", "NO [INUSE] Mailbox in use"]
    for expected in ("UNAVAILABLE", "INUSE"):
        client = connect(server, login=False)
        with pytest.raises(LoginError, match=rf"\[{expected}\]"):
            client.login("user@fake.test", "secret")
        client.shutdown()
    connect(server).logout()  # the script is used up: a normal login
    assert len(server.received("LOGIN")) == 3


def test_on_command_hook_and_command_log(server):
    seen = []

    def hook(session, tag, command, args):
        seen.append((session.id, command, args))
        if command == "SELECT" and args == ["Trap"]:
            return ["* OK [ALERT] scripted", "NO [SERVERBUG] scripted failure"]
        if command == "NOOP":
            return "* BYE going away"
        return None

    server.on_command = hook
    server.add_folder("Trap")
    client = connect(server)
    with pytest.raises(IMAPClientError, match="scripted failure"):
        client.select_folder("Trap")
    client.select_folder("INBOX")
    client.append("INBOX", BODY, flags=["\\Seen"])
    client.add_flags([1], ["\\Flagged"])
    with pytest.raises(IMAPClientAbortError):
        client.noop()
    assert client._imap.untagged_responses["BYE"] == [b"going away"]
    assert ("LOGIN", ["user@fake.test", "secret"]) in [(c, a) for _s, c, a in seen]
    assert server.received("UID STORE") == ["UID STORE 1 +FLAGS (\\Flagged)"]
    assert server.received("APPEND") == [f'APPEND "INBOX" (\\Seen) {{{len(BODY)}}}']  # imaplib: synchronising
    assert {sid for sid, _line in server.log} == {1}
    assert not server.received("EXPUNGE")


# --- the tool against two fakes ---------------------------------------------------------

@pytest.mark.parametrize("batch_bytes", [4 * 1024 * 1024, 3_000], ids=["batched", "streamed"])
def test_tool_copies_between_two_fakes_identically_and_rerun_adds_nothing(batch_bytes, test_ca,
                                                                          tmp_path):
    msgs = mailgen.realistic_mailbox(separator="/", prefix="", count=10, big=False)
    with FakeImapServer(**tls_from_ca(test_ca)) as source, FakeImapServer() as destination:
        source.add_folder("Sent Messages", "\\Sent")
        destination.add_folder("Sent", "\\Sent")
        for m in msgs:
            source.add_folder(m.folder)
            source.add_message(m.folder, m.body, m.flags, m.date)
        path = write_config(tmp_path / "config.toml", [{
            "name": "fake", "kind": "imap-copy", "source": source.job_endpoint(),
            "destination": destination.job_endpoint()}])
        result = run(path, batch_bytes=batch_bytes)
        assert result.ok, result.errors
        assert result.counts["copied"] == len(msgs) == 10
        # batches went as MULTIAPPEND with LITERAL+ (several {n+} literals in one APPEND);
        # larger messages one by one, read in partial FETCHes
        streamed = batch_bytes == 3_000
        appends = destination.received("APPEND")
        assert any(line.count("+}") > 1 for line in appends) != streamed, appends
        partial = [line for line in source.received("UID FETCH") if "BODY.PEEK[]<" in line]
        assert bool(partial) == streamed

        def content(srv, name):
            return sorted((body, flags, date) for _uid, body, flags, date in srv.messages(name))

        names = {n: ("Sent" if n == "Sent Messages" else n) for n in source.folder_names()}
        assert set(names.values()) == set(destination.folder_names())
        for src_name, dst_name in names.items():
            copied = content(destination, dst_name)
            assert copied == content(source, src_name), src_name
            assert all(d.utcoffset() is not None for _b, _f, d in copied)
        flags = set().union(*(f for n in names.values() for _b, f, _d in content(destination, n)))
        assert {"\\Seen", "\\Flagged", "\\Answered", "project-x"} <= flags
        before = {n: destination.messages(n) for n in names.values()}

        again = run(path, batch_bytes=batch_bytes)
        assert again.ok, again.errors
        assert again.counts.get("copied", 0) == 0
        assert {n: destination.messages(n) for n in names.values()} == before
        assert not destination.received("EXPUNGE") and not source.received("UID STORE")
