"""Realistic test mail, generated deterministically, and helpers to fill and read mailboxes.

Messages vary in size (1 KB to a few MB), structure (plain, multipart with base64
attachments), headers (some 8-bit, some without Message-ID), flags (system flags and
custom keywords) and INTERNALDATE (years apart, several time zones).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import random
import ssl
from dataclasses import dataclass

from imapclient import IMAPClient

from .dovecot import Account

KEYWORDS = ("$Label1", "project-x", "$Forwarded")


@dataclass
class TestMessage:
    folder: str
    body: bytes
    flags: tuple[str, ...]
    date: dt.datetime
    message_id: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def make_message(rng: random.Random, index: int, *, size: int | None = None,
                 message_id: bool = True, eight_bit: bool = False,
                 attachment: bool = False, lone_dot: bool = False) -> tuple[bytes, str | None]:
    """One RFC 5322 message with CRLF line endings (what IMAP returns)."""
    mid = f"<m{index}.{rng.randrange(10**9)}@test.example>" if message_id else None
    subject = (f"Grüße aus Köln #{index} — €uro".encode("utf-8") if eight_bit
               else f"Test message #{index}".encode())
    date = dt.datetime(2015, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(
        minutes=rng.randrange(5_000_000))
    headers = [
        b"From: Sender " + str(index % 7).encode() + b" <sender@test.example>",
        b"To: recipient@test.example",
        b"Subject: " + subject,
        b"Date: " + date.strftime("%a, %d %b %Y %H:%M:%S +0000").encode(),
    ]
    if mid:
        headers.append(b"Message-ID: " + mid.encode())
    headers.append(b"MIME-Version: 1.0")
    text = []
    words = ("alpha", "beta", "gamma", "delta", "mail", "server", "archive", "folder")
    target = size or rng.choice((1_000, 2_000, 4_000, 12_000, 40_000))
    line_no = 0
    body_len = 0
    while body_len < (target if not attachment else min(target, 2_000)):
        line = " ".join(rng.choice(words) for _ in range(10)).encode()
        text.append(line)
        body_len += len(line) + 2
        line_no += 1
        if lone_dot and line_no == 3:
            text.append(b".")
            text.append(b".. a line starting with two dots")
    if attachment:
        boundary = f"b{index}x{rng.randrange(10**6)}".encode()
        headers.append(b'Content-Type: multipart/mixed; boundary="' + boundary + b'"')
        payload = rng.randbytes(max(target - 2_000, 500) * 3 // 4)
        b64 = base64.encodebytes(payload).replace(b"\n", b"\r\n").rstrip(b"\r\n")
        parts = [
            b"--" + boundary,
            b"Content-Type: text/plain; charset=utf-8",
            b"",
            *text,
            b"--" + boundary,
            b"Content-Type: application/octet-stream; name=\"data.bin\"",
            b"Content-Transfer-Encoding: base64",
            b"Content-Disposition: attachment; filename=\"data.bin\"",
            b"",
            b64,
            b"--" + boundary + b"--",
        ]
        body = b"\r\n".join(parts)
    else:
        headers.append(b"Content-Type: text/plain; charset=utf-8")
        if eight_bit:
            headers.append(b"Content-Transfer-Encoding: 8bit")
            text.append("Umlaute: äöü ß — 8-bit body".encode())
        body = b"\r\n".join(text)
    return b"\r\n".join(headers) + b"\r\n\r\n" + body + b"\r\n", mid


def realistic_mailbox(separator: str = ".", prefix: str = "INBOX.", seed: int = 1,
                      count: int = 60, big: bool = True) -> list[TestMessage]:
    """Messages spread over nested and non-ASCII folders, incl. a \\Sent folder."""
    rng = random.Random(seed)
    folders = ["INBOX", f"{prefix}Sent Messages", f"{prefix}Archive",
               f"{prefix}Archive{separator}2019", f"{prefix}Entwürfe",
               f"{prefix}Projekte{separator}Überblick"]
    out = []
    for i in range(count):
        folder = folders[i % len(folders)]
        kwargs = dict(message_id=(i % 11 != 5), eight_bit=(i % 9 == 2),
                      attachment=(i % 5 == 3), lone_dot=(i % 13 == 4))
        if big and i == 7:
            kwargs.update(size=3_000_000, attachment=True)
        body, mid = make_message(rng, i, **kwargs)
        flags = []
        if i % 2:
            flags.append("\\Seen")
        if i % 7 == 1:
            flags.append("\\Flagged")
        if i % 5 == 2:
            flags.append("\\Answered")
        if i % 4 == 3:
            flags.append(KEYWORDS[i % len(KEYWORDS)])
        tz = dt.timezone(dt.timedelta(hours=rng.choice((-5, 0, 1, 2, 9))))
        date = (dt.datetime(2012, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
                + dt.timedelta(seconds=rng.randrange(400_000_000))).astimezone(tz)
        out.append(TestMessage(folder, body, tuple(flags), date, mid))
    return out


def connect(account: Account) -> IMAPClient:
    ctx = ssl.create_default_context(cafile=str(account.server.ca_file))
    client = IMAPClient(account.host, port=account.server.ports["imaps"], ssl_context=ctx,
                        timeout=30)
    client.normalise_times = False
    client._imap.debug = 0  # see migrate.endpoints.imap: imaplib would repr every body
    client.login(account.username, account.password)
    return client


def fill(account: Account, msgs: list[TestMessage]) -> None:
    client = connect(account)
    try:
        existing = {name for _f, _d, name in client.list_folders()}
        for m in msgs:
            if m.folder not in existing:
                client.create_folder(m.folder)
                client.subscribe_folder(m.folder)
                existing.add(m.folder)
            client.append(m.folder, m.body, flags=m.flags, msg_time=m.date)
    finally:
        client.logout()


def expunge_first(account: Account, folder: str, count: int) -> None:
    """Remove the first ``count`` messages of ``folder``, as another client would."""
    client = connect(account)
    try:
        client.select_folder(folder)
        client.delete_messages(client.search("ALL")[:count])
        client.expunge()
    finally:
        client.logout()


@dataclass(frozen=True)
class Listed:
    """What a mailbox holds, for comparing before/after or source/destination."""

    folder: str
    uid: int
    sha256: str
    size: int
    flags: frozenset[str]
    internaldate: dt.datetime


def snapshot(account: Account) -> dict[str, list[Listed]]:
    """Every folder with every message: content hash, flags and INTERNALDATE."""
    client = connect(account)
    out: dict[str, list[Listed]] = {}
    try:
        for flags, _d, name in client.list_folders():
            if b"\\Noselect" in flags or b"\\NonExistent" in flags:
                continue
            info = client.select_folder(name, readonly=True)
            rows = []
            if info[b"EXISTS"]:
                uids = client.search("ALL")
                data = client.fetch(uids, ["BODY.PEEK[]", "FLAGS", "INTERNALDATE",
                                           "RFC822.SIZE"])
                for uid, item in sorted(data.items()):
                    body = item[b"BODY[]"]
                    rows.append(Listed(
                        name, uid, hashlib.sha256(body).hexdigest(), len(body),
                        frozenset(f.decode() if isinstance(f, bytes) else f
                                  for f in item[b"FLAGS"]) - {"\\Recent"},
                        item[b"INTERNALDATE"]))
            out[name] = rows
    finally:
        client.logout()
    return out
