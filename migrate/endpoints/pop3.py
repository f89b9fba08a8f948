"""POP3 source on top of stdlib poplib: TLS, CAPA/UIDL/UTF8, streamed RETR, DELE + QUIT.

RETR is streamed block by block into a sink (the archive writer), undoing dot-stuffing
on the way, so neither a 50 MB message nor a 50 MB line ever sits in memory.  Deletion
follows RFC 1939: DELE only marks; the server removes the messages when QUIT succeeds.
A dropped connection before QUIT deletes nothing.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import poplib
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..config import Endpoint
from ..errors import ConnectionLost, MailboxError, MessageError
from .backoff import (bucket_for, is_login_delay, login_delay_from_capa, pop3_pushback,
                      pushback)
from .contact import first_contact_failure, greeting_wait
from .sasl import (OAUTH_MECHANISMS, choose_oauth_mechanism, login_advice, login_who,
                   login_with_token, plain_response)
from .tls import describe_tls_failure, server_aliases, ssl_context

log = logging.getLogger("migrate.pop3")

# Data without a line break is passed on once this much has gathered (a line of any
# length streams; only a few bytes of look-behind are kept).
LONG_LINE = 64 * 1024


@dataclass(frozen=True)
class Pop3Message:
    number: int  # message number, valid for this session only
    key: str  # the UIDL, made unique within the listing (and across reuse, by the job)
    size: int  # octets as announced by LIST (0 when LIST did not mention it)
    uidl: str = ""  # exactly as the server sent it
    listed: bool = True  # LIST gave a size for it


def listing_keys(uidls: list[tuple[int, str]]) -> dict[int, str]:
    """Message number → stable key.  Some servers repeat a UIDL; the repeats get a '#n'
    suffix so that each message still has its own row."""
    seen: dict[str, int] = {}
    out = {}
    for number, uidl in sorted(uidls):
        n = seen.get(uidl, 0)
        seen[uidl] = n + 1
        out[number] = uidl if n == 0 else f"{uidl}#{n}"
    return out


class Pop3Session:
    def __init__(self, endpoint: Endpoint, client: poplib.POP3):
        self.endpoint = endpoint
        self.client = client
        self.pipelining = False  # learnt from CAPA
        self.utf8 = False  # RFC 6856 UTF8 mode is on
        self.rate = bucket_for(endpoint)  # max_bytes_per_second, shared per server

    @classmethod
    def connect(cls, endpoint: Endpoint) -> Pop3Session:
        """Connect, check what answered, log in; errors as in ImapSession.connect."""
        where = f"{endpoint.host}:{endpoint.port}"
        ctx = ssl_context(endpoint)
        # A short wait for the greeting (see contact.py), the full timeout afterwards.
        wait = greeting_wait(endpoint)
        try:
            if endpoint.security == "ssl":
                client = poplib.POP3_SSL(endpoint.host, endpoint.port, context=ctx,
                                         timeout=wait)
            else:
                client = poplib.POP3(endpoint.host, endpoint.port, timeout=wait)
        except (OSError, EOFError, poplib.error_proto) as exc:
            greeting_error = isinstance(exc, poplib.error_proto)
            if greeting_error and pop3_pushback(_text(exc)):  # "-ERR [IN-USE] ..." greeting
                raise pushback(endpoint, "the greeting", _text(exc)) from None
            raise first_contact_failure(endpoint, exc, greeting_error) from None
        try:
            client.sock.settimeout(endpoint.timeout)
            if endpoint.security == "starttls":
                try:
                    client.stls(ctx)
                except poplib.error_proto as exc:
                    if _dropped(exc):
                        raise ConnectionLost(f"connection to {where} dropped before TLS") \
                            from None
                    raise MailboxError(
                        f"POP3 server {where} refused STLS ({_text(exc)}); use "
                        "security = \"ssl\" on port 995") from None
        except ssl.SSLError as exc:
            _close_quietly(client)
            raise describe_tls_failure(endpoint, exc) from None
        except (OSError, EOFError) as exc:
            _close_quietly(client)
            raise ConnectionLost(f"connection to POP3 server {where} failed: {exc}") from None
        except BaseException:
            _close_quietly(client)
            raise
        try:
            _authenticate(client, endpoint)
        except poplib.error_proto as exc:
            # -ERR [LOGIN-DELAY]: how long to wait is in CAPA (RFC 2449), asked now
            delay = _login_delay(client) if is_login_delay(_text(exc)) else None
            _close_quietly(client)
            if _dropped(exc):
                raise ConnectionLost(f"connection to {where} dropped during login") from None
            if _login_refused_for_now(exc):  # ServerBackoff: waited for, then retried
                raise pushback(endpoint, f"the login as {login_who(endpoint)}", _text(exc),
                               delay) from None
            raise MailboxError(
                f"POP3 login as {login_who(endpoint)} at {where} failed: {_text(exc)}; "
                f"{login_advice(endpoint, exc)}") from None
        except OSError as exc:
            _close_quietly(client)
            raise ConnectionLost(f"connection to {where} dropped during login: {exc}") \
                from None
        except BaseException:
            _close_quietly(client)
            raise
        return cls(endpoint, client)

    @property
    def server_aliases(self) -> list[str]:
        return server_aliases(self.endpoint, self.client.sock)

    @contextlib.contextmanager
    def _command(self, refused: Callable[[str], Exception]):
        """Map poplib's failures: a closed connection (which poplib reports like a -ERR)
        becomes ConnectionLost, a real -ERR answer becomes ``refused(server text)``."""
        try:
            yield
        except poplib.error_proto as exc:
            if _dropped(exc):
                raise self._lost(exc) from None
            raise refused(_text(exc)) from None
        except (OSError, EOFError) as exc:
            raise self._lost(exc) from None

    def _lost(self, exc: BaseException) -> ConnectionLost:
        return ConnectionLost(f"connection to POP3 server {self.endpoint.host}:"
                              f"{self.endpoint.port} lost: {exc.__class__.__name__}: {exc}")

    def require_uidl(self) -> None:
        try:
            caps = self.client.capa()
        except poplib.error_proto as exc:
            if _dropped(exc):
                raise self._lost(exc) from None
            caps = {}  # no CAPA: try UIDL itself below
        except OSError as exc:
            raise self._lost(exc) from None
        self.pipelining = "PIPELINING" in caps
        if "UTF8" in caps:
            self._enable_utf8()
        if "UIDL" in caps:
            return
        try:
            self.client.uidl()
        except poplib.error_proto as exc:
            if _dropped(exc):
                raise self._lost(exc) from None
            raise MailboxError(
                f"POP3 server {self.endpoint.host} does not support UIDL: without stable "
                "message ids a resumable archive is impossible (every run would download "
                "everything again, and deletion could hit the wrong message). Use IMAP "
                "(an imap-copy job) for this mailbox if the server offers it") from None
        except OSError as exc:
            raise self._lost(exc) from None

    def _enable_utf8(self) -> None:
        """RFC 6856 UTF8, sent after login (Courier accepts it there: "+OK UTF8
        enabled").  Without it Courier replaces a message with 8-bit headers by a
        generated "Cannot display Unicode content" notice, larger than LIST announced.
        A refusal is no reason to stop: such messages then fail on their own."""
        try:
            with self._command(MessageError):
                self.client._shortcmd("UTF8")
            self.utf8 = True
        except MessageError as exc:
            log.warning("POP3 server %s offers UTF8 but refused it: %s",
                        self.endpoint.host, exc)

    def list_messages(self) -> list[Pop3Message]:
        with self._command(lambda t: MailboxError(f"POP3 UIDL/LIST failed: {t}")):
            _resp, uidl_lines, _ = self.client.uidl()
            _resp, size_lines, _ = self.client.list()
        uidls = []
        for line in uidl_lines:
            num, _, uidl = line.decode("ascii", "replace").partition(" ")
            uidls.append((int(num), uidl.strip()))
        sizes = {}
        for line in size_lines:
            num, _, size = line.decode("ascii", "replace").partition(" ")
            sizes[int(num)] = int(size.split()[0])
        keys = listing_keys(uidls)
        raw = dict(uidls)
        return [Pop3Message(n, keys[n], sizes.get(n, 0), raw[n], n in sizes)
                for n in sorted(keys)]

    def retrieve(self, number: int, write: Callable[[bytes], object]) -> int:
        """RETR ``number``, passing the message bytes (CRLF lines, dot-unstuffed) to
        ``write`` as they arrive.  Returns the number of bytes passed on."""
        ((_, outcome),) = self.retrieve_many([number], lambda _n: write)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def retrieve_many(self, numbers: Sequence[int],
                      sink_for: Callable[[int], Callable[[bytes], object]]
                      ) -> Iterator[tuple[int, int | BaseException]]:
        """RETR several messages; yields (number, bytes passed on) or (number, the
        MessageError of that message).  Where the server offers PIPELINING (RFC 2449)
        all RETR commands go out at once, so the server never waits for the next one.

        ``sink_for(number)`` gives the function that receives the message's bytes.  If
        it (or the sink) fails, the message is still read to its end so the connection
        stays in step; the failure is what is yielded for that message.
        """
        c = self.client
        pipelined = self.pipelining and len(numbers) > 1
        current = None
        try:
            with self._command(lambda t: MessageError(f"POP3 RETR failed: {t}")):
                if pipelined:
                    c.sock.sendall(b"".join(f"RETR {n}\r\n".encode() for n in numbers))
                for number in numbers:
                    current = number
                    if not pipelined:
                        c._putcmd(f"RETR {number}")
                    try:
                        c._getresp()
                    except poplib.error_proto as exc:
                        if _dropped(exc):
                            raise
                        yield number, MessageError(
                            f"POP3 RETR {number} refused: {_text(exc)}")
                        continue
                    sink = _Guarded(sink_for, number)
                    count = _read_multiline(c.file, self._paced(sink))
                    yield number, sink.failure if sink.failure is not None else count
        except ConnectionLost as exc:
            exc.message_number = current  # whose response was awaited when it dropped
            raise

    def _paced(self, deliver: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """``deliver``, holding the reader to the server's byte-rate limit, if any."""
        if self.rate is None:
            return deliver
        rate = self.rate

        def paced(block: bytes) -> None:
            rate.take(len(block))
            deliver(block)
        return paced

    def mark_deleted(self, number: int) -> None:
        with self._command(lambda t: MailboxError(f"POP3 DELE {number} refused: {t}")):
            self.client.dele(number)

    def quit(self) -> None:
        """QUIT: commits DELEs.  Raises ConnectionLost if the server did not confirm."""
        with self._command(lambda t: MailboxError(
                f"POP3 QUIT failed, deletions not committed: {t}")):
            resp = self.client.quit()
        if not resp.startswith(b"+OK"):
            raise MailboxError(f"POP3 QUIT not confirmed: {_text(resp)}")

    def reset_and_quit(self) -> None:
        """End a read-only session: RSET first (undoes any DELE and, on servers that
        mark retrieved mail seen at QUIT such as Dovecot, that too), then QUIT."""
        with self._command(lambda t: MailboxError(f"POP3 RSET refused: {t}")):
            self.client.rset()
        self.quit()

    def close(self) -> None:
        """Drop the connection WITHOUT QUIT: nothing marked with DELE is deleted."""
        try:
            self.client.close()
        except OSError:
            pass


class _Guarded:
    """Passes bytes on to a message's sink until the sink fails; after that it only
    remembers the failure, so the rest of the message is still read off the wire."""

    def __init__(self, sink_for: Callable[[int], Callable[[bytes], object]], number: int):
        self.failure: BaseException | None = None
        self.write: Callable[[bytes], object] | None = None
        try:
            self.write = sink_for(number)
        except Exception as exc:  # noqa: BLE001 - reported for this message
            self.failure = exc

    def __call__(self, chunk: bytes) -> None:
        if self.failure is None:
            try:
                self.write(chunk)
            except Exception as exc:  # noqa: BLE001 - reported for this message
                self.failure = exc


def _read_multiline(f, deliver: Callable[[bytes], None]) -> int:
    """Read a dot-terminated POP3 response body from buffered reader ``f``, undoing
    byte-stuffing, and hand it to ``deliver`` in large pieces.  Returns the byte count.

    Works on blocks instead of lines (a 50 MB message has ~700,000 lines).  Both patterns
    that matter start with CRLF: CRLF ".." (stuffed) and CRLF "." CRLF (the end).  So a
    block is cut at its last CRLF; the rest (``pending``) starts there, every pattern lies
    wholly inside one block, and ``replace(CRLF '..', CRLF '.')`` unstuffs them all at
    once.  A line without CRLF (a 9 MB base64 blob without line breaks) is passed on as
    it arrives once LONG_LINE bytes gathered: with no CRLF after its start, only a final
    CR can begin a pattern, and that one byte is kept back.  peek() lets us consume exactly
    up to the terminator and not a byte of the next response.
    """
    pending = b"\r\n"  # a virtual CRLF before the first line
    first = True
    total = 0
    while True:
        chunk = f.peek(1 << 16)
        if not chunk:
            raise EOFError("connection closed in the middle of a message")
        data = pending + chunk
        end = data.find(b"\r\n.\r\n")
        if end >= 0:
            f.read(end + 5 - len(pending))
            block = data[:end + 2].replace(b"\r\n..", b"\r\n.")
        else:
            f.read(len(chunk))
            cut = data.rfind(b"\r\n")
            if cut <= 0:  # inside one line
                if len(data) < LONG_LINE:
                    pending = data
                    continue
                cut = len(data) - 1 if data.endswith(b"\r") else len(data)
            block, pending = data[:cut].replace(b"\r\n..", b"\r\n."), data[cut:]
        if first:
            block, first = block[2:], False
        if block:
            deliver(block)
            total += len(block)
        if end >= 0:
            return total


def _dropped(exc: poplib.error_proto) -> bool:
    """poplib reports a closed connection as error_proto('-ERR EOF'), like a refusal."""
    return bool(exc.args) and exc.args[0] in (b"-ERR EOF", "-ERR EOF")


def _text(value) -> str:
    if isinstance(value, BaseException) and value.args:
        value = value.args[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _login_refused_for_now(exc: poplib.error_proto) -> bool:
    """-ERR [IN-USE] (mailbox locked by another session), [LOGIN-DELAY] (logged in too
    soon) and [SYS/TEMP] will pass (RFC 2449, 3206); [AUTH], [SYS/PERM] and plain -ERR
    will not.  See backoff.py."""
    return pop3_pushback(_text(exc))


def _login_delay(client: poplib.POP3) -> float | None:
    """LOGIN-DELAY n from CAPA, asked after a [LOGIN-DELAY] refusal (still allowed in
    the AUTHORIZATION state); None when the server does not say."""
    try:
        return login_delay_from_capa(client.capa())
    except (poplib.error_proto, OSError, EOFError):
        return None


def _authenticate(client: poplib.POP3, endpoint: Endpoint) -> None:
    """Log in as endpoint.auth says: USER/PASS with the mailbox's password; AUTH PLAIN as
    admin_user with the mailbox as authorization identity (RFC 5034, RFC 4616); or AUTH
    with a bearer token (OAUTHBEARER preferred, else XOAUTH2, as CAPA's SASL offers)."""
    if endpoint.auth == "password":
        client.user(endpoint.username)
        client.pass_(endpoint.password.reveal())
        return
    if endpoint.auth == "admin":
        response = plain_response(endpoint.username, str(endpoint.admin_user),
                                  endpoint.password.reveal())
        _sasl(client, "PLAIN", lambda _challenge: response)
        return
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        offered = {m.upper() for m in client.capa().get("SASL", [])}
    except poplib.error_proto as exc:
        if _dropped(exc):
            raise
        offered = set()  # no CAPA: nothing tells us a mechanism the server takes
    mechanism = choose_oauth_mechanism(offered)
    if mechanism is None:
        raise MailboxError(
            f"POP3 server {where} offers neither of {', '.join(OAUTH_MECHANISMS)} in CAPA's "
            f"SASL line (it offers {', '.join(sorted(offered)) or 'none'}); it does not take "
            "OAuth2 access tokens: use auth = \"password\" or auth = \"admin\"")
    login_with_token(endpoint, mechanism, lambda exchange: _sasl(client, mechanism, exchange),
                     poplib.error_proto)


# RFC 5034 4: an AUTH command with its initial response must fit in 255 octets; a longer
# response (a long access token) follows the server's empty challenge instead.
AUTH_LINE_LIMIT = 255


def _sasl(client: poplib.POP3, mechanism: str, respond: Callable[[bytes], bytes]) -> None:
    """AUTH ``mechanism``: ``respond`` gets each challenge (the first one empty) and
    returns the response.  -ERR raises poplib.error_proto like any command."""
    first = base64.b64encode(respond(b"")).decode("ascii")
    command = f"AUTH {mechanism} {first or '='}"
    if len(command) <= AUTH_LINE_LIMIT:
        resp = client._shortcmd(command)
    else:
        resp = client._shortcmd(f"AUTH {mechanism}")
        if _is_challenge(resp):
            resp = client._shortcmd(first)
    while _is_challenge(resp):
        reply = respond(base64.b64decode(resp[1:].strip() or b""))
        resp = client._shortcmd(base64.b64encode(reply).decode("ascii"))


def _is_challenge(resp: bytes) -> bool:
    """"+ <base64>" (a SASL challenge), not "+OK"."""
    return resp.startswith(b"+") and not resp.startswith(b"+OK")


def _close_quietly(client: poplib.POP3) -> None:
    """close() on a connection a failed STLS left half-wrapped raises EBADF."""
    try:
        client.close()
    except OSError:
        pass
