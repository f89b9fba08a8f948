"""IMAP endpoint on top of imapclient: one ``ImapSession`` per connection.

imapclient does the protocol (TLS, modified UTF-7 folder names, literals); this module
adds what it lacks: APPENDUID parsing (RFC 4315), checking MULTIAPPEND's answer, and
mapping its exceptions onto our error scopes (AbortError/socket errors = connection lost,
Error = one command refused).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
import ssl
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError
from imapclient.datetime_util import datetime_to_INTERNALDATE
from imapclient.imapclient import seq_to_parenstr
from imapclient.imap_utf7 import decode as decode_utf7
from imapclient.response_parser import parse_fetch_response, parse_response
from imapclient.util import to_bytes

from ..config import Endpoint
from ..errors import ConnectionLost, FolderError, MailboxError, MessageError
from .backoff import bucket_for, imap_pushback, pushback
from .contact import first_contact_failure, greeting_wait
from .sasl import (OAUTH_MECHANISMS, choose_oauth_mechanism, login_advice, login_who,
                   login_with_token, plain_response)
from .tls import describe_tls_failure, server_aliases, ssl_context

SPECIAL_USE = ("\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive")
# Flags a client cannot or should not set on APPEND / STORE.
UNCOPYABLE_FLAGS = frozenset({"\\recent", "\\deleted"})

_APPENDUID_RE = re.compile(rb"\[APPENDUID (\d+) ([0-9:,]+)\]", re.IGNORECASE)
_MSGID_RE = re.compile(rb"<[^<>\s]+>")
_UID_RE = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_SCAN_START = re.compile(rb"\d+ \(")
_SCAN_UID = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_SCAN_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)
_SCAN_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)", re.IGNORECASE)
_BODY_RE = re.compile(rb"\bBODY\[\](?:<\d+>)? \{\d+\}$", re.IGNORECASE)
# UIDs per FETCH when listing a folder's messages (memory stays flat with folder size)
LIST_WINDOW = 2000
# STATUS commands sent before their answers are read (servers without LIST-STATUS)
STATUS_PIPELINE = 50


def parse_uid_set(text: str | bytes) -> list[int]:
    """'5:7,9' → [5, 6, 7, 9] (RFC 4315 uid-set, order preserved as the server sent it)."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    out: list[int] = []
    for part in text.split(","):
        if ":" in part:
            a, b = (int(x) for x in part.split(":"))
            step = 1 if b >= a else -1
            out.extend(range(a, b + step, step))
        else:
            out.append(int(part))
    return out


def uid_set_text(uids: Iterable[int]) -> str:
    """[1, 2, 3, 7] → '1:3,7': short command lines for long UID lists."""
    out = []
    run_start = prev = None
    for u in sorted(set(uids)):
        if prev is not None and u == prev + 1:
            prev = u
            continue
        if run_start is not None:
            out.append(f"{run_start}:{prev}" if prev != run_start else str(run_start))
        run_start = prev = u
    if run_start is not None:
        out.append(f"{run_start}:{prev}" if prev != run_start else str(run_start))
    return ",".join(out)


def parse_appenduid(response: bytes | str | Sequence) -> tuple[int, list[int]] | None:
    """Find ``[APPENDUID <uidvalidity> <uid-set>]`` in an APPEND response."""
    if isinstance(response, (list, tuple)):
        response = b" ".join(r if isinstance(r, bytes) else str(r).encode()
                             for r in response if r is not None)
    elif isinstance(response, str):
        response = response.encode()
    m = _APPENDUID_RE.search(response)
    if not m:
        return None
    return int(m.group(1)), parse_uid_set(m.group(2))


def parse_message_id(header_block: bytes | None) -> str | None:
    """The Message-ID from a 'Message-ID: <x@y>' header block, or None when absent."""
    if not header_block:
        return None
    # Unfold continuation lines before looking for the id.
    text = re.sub(rb"\r?\n[ \t]+", b" ", header_block)
    for line in text.splitlines():
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"message-id":
            m = _MSGID_RE.search(value)
            if m:
                return m.group(0).decode("utf-8", "replace")
            value = value.strip()
            return value.decode("utf-8", "replace") or None
    return None


def parse_body_fetch(data: Sequence) -> dict[int, bytes]:
    """UID → body from the raw untagged FETCH data of ``UID FETCH ... (BODY.PEEK[])``.

    imaplib hands literals over as (head, literal) tuples; the UID is in the head or in
    the bytes that follow the literal.  A direct parse: imapclient's general lexer walks
    every byte of the response in Python, which costs more than the TLS it arrives by.
    """
    out: dict[int, bytes] = {}
    waiting: bytes | None = None
    for item in data:
        if isinstance(item, tuple):
            head, literal = item
            if not _BODY_RE.search(head):
                waiting = None
                continue
            m = _UID_RE.search(head)
            if m:
                out[int(m.group(1))] = literal
                waiting = None
            else:
                waiting = literal
        elif waiting is not None and isinstance(item, bytes):
            m = _UID_RE.search(item)
            if m:
                out[int(m.group(1))] = waiting
            waiting = None
    return out


_PART_RE = re.compile(rb"\bBODY\[\](?:<(\d+)>)? \{\d+\}$", re.IGNORECASE)


def parse_part_fetch(data: Sequence, uid: int) -> dict[int | None, bytes]:
    """Origin octet → piece of message ``uid``, from the raw untagged FETCH data of
    partial ``BODY.PEEK[]<origin.length>`` fetches (key None: the answer did not say
    its origin).  With several partial FETCHes on their way, a server may answer a later
    one before the earlier one completes (Dovecot runs them in parallel), so a piece is
    known by its origin, never by its place."""
    out: dict[int | None, bytes] = {}
    waiting: tuple[int | None, bytes] | None = None
    for item in data:
        if isinstance(item, tuple):
            head, literal = item
            m = _PART_RE.search(head)
            if not m:
                waiting = None
                continue
            origin = int(m.group(1)) if m.group(1) is not None else None
            u = _UID_RE.search(head)
            if u:
                if int(u.group(1)) == uid:
                    out[origin] = literal
                waiting = None
            else:
                waiting = (origin, literal)
        elif waiting is not None and isinstance(item, bytes):
            u = _UID_RE.search(item)
            if u and int(u.group(1)) == uid:
                out[waiting[0]] = waiting[1]
            waiting = None
    return out


_ESEARCH_ALL_RE = re.compile(rb"\bALL ([0-9:,]+)", re.IGNORECASE)


def parse_esearch_all(data: Iterable) -> list[int]:
    """UIDs from untagged ESEARCH answers ('(TAG "A5") UID ALL 1:3,7'); none: []."""
    out: list[int] = []
    for line in data:
        if isinstance(line, bytes):
            m = _ESEARCH_ALL_RE.search(line)
            if m:
                out.extend(parse_uid_set(m.group(1)))
    return out


def _responses(data: Iterable) -> Iterator[list]:
    """imaplib's untagged data → one list per response: a literal arrives as a
    (head, literal) tuple, and the rest of its line as the next bytes item."""
    current: list = []
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):
            if current and not isinstance(current[-1], tuple):
                yield current
                current = []
            current.append(item)
        elif current and isinstance(current[-1], tuple):
            current.append(item)
            yield current
            current = []
        else:
            if current:
                yield current
            current = [item]
    if current:
        yield current


def copyable_flags(flags: Iterable) -> frozenset[str]:
    out = set()
    for f in flags:
        s = f.decode("utf-8", "replace") if isinstance(f, bytes) else str(f)
        if s.lower() not in UNCOPYABLE_FLAGS:
            out.add(s)
    return frozenset(out)


@dataclass(frozen=True)
class FolderInfo:
    name: str
    delimiter: str | None
    flags: frozenset[str]
    personal: bool = True  # in the user's personal namespace (RFC 2342)

    @property
    def selectable(self) -> bool:
        lowered = {f.lower() for f in self.flags}
        return not ({"\\noselect", "\\nonexistent"} & lowered)

    @property
    def special_use(self) -> str | None:
        lowered = {f.lower(): f for f in self.flags}
        for flag in SPECIAL_USE:
            if flag.lower() in lowered:
                return flag
        return None


@dataclass
class SelectInfo:
    uidvalidity: int
    exists: int
    uidnext: int | None
    # PERMANENTFLAGS (None: not announced, assume every flag is kept)
    permanent_flags: frozenset[str] | None = None

    def storable(self, flags: Iterable[str], refused: Iterable[str] = ()) -> frozenset[str]:
        """The part of ``flags`` this folder can keep: PERMANENTFLAGS without ``\\*``
        keeps only the flags it lists; ``refused`` are keywords the server rejected."""
        refused_lower = {f.lower() for f in refused}
        out = set()
        for f in flags:
            if f.lower() in refused_lower:
                continue
            if self.permanent_flags is not None and "\\*" not in self.permanent_flags \
                    and f.lower() not in {p.lower() for p in self.permanent_flags}:
                continue
            out.add(f)
        return frozenset(out)


@dataclass(frozen=True)
class FolderStatus:
    """A folder's STATUS: what tells, without opening it, whether anything changed.
    highestmodseq is None where the server has no CONDSTORE (RFC 7162): then a flag
    change is visible only by listing the messages."""

    uidvalidity: int | None
    uidnext: int | None
    messages: int | None
    highestmodseq: int | None = None

    def as_tuple(self) -> tuple[int | None, ...]:
        return (self.uidvalidity, self.uidnext, self.messages, self.highestmodseq)


def parse_status_response(parts: Sequence) -> tuple[str, FolderStatus] | None:
    """One untagged STATUS answer as imaplib hands it over: [b'"INBOX.x" (MESSAGES 2
    UIDNEXT 3 ...)'], or, for a name sent as a literal, [(b'{5}', b'INBOX'), b' (...)']
    → (folder name, modified UTF-7 decoded; status)."""
    try:
        parsed = parse_response(list(parts))
    except IMAPClientError:
        return None
    if len(parsed) < 2 or not isinstance(parsed[-1], tuple):
        return None
    name = parsed[0]
    if isinstance(name, int):
        name = str(name)
    if isinstance(name, bytes):
        name = decode_utf7(name)
    items = parsed[-1]
    values = {str(items[i].decode() if isinstance(items[i], bytes) else items[i]).upper():
              items[i + 1] for i in range(0, len(items) - 1, 2)}

    def num(key):
        v = values.get(key)
        return int(v) if isinstance(v, int) or (isinstance(v, bytes) and v.isdigit()) else None
    return name, FolderStatus(num("UIDVALIDITY"), num("UIDNEXT"), num("MESSAGES"),
                              num("HIGHESTMODSEQ"))


@dataclass(frozen=True)
class CopyMeta:
    """What the destination says about a stored copy (read back after APPEND)."""

    size: int
    flags: frozenset[str]
    internaldate: dt.datetime | None


@dataclass(frozen=True)
class MessageMeta:
    uid: int
    size: int
    flags: frozenset[str]
    internaldate: dt.datetime | None
    message_id: str | None


@dataclass(frozen=True)
class AppendItem:
    body: bytes
    flags: frozenset[str]
    internaldate: dt.datetime | None


def _guard(method):
    """Map imapclient/socket failures inside a command onto ConnectionLost."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (IMAPClientAbortError, OSError, EOFError) as exc:
            if isinstance(exc, IMAPClientAbortError) and imap_pushback(str(exc)):
                # "* BYE [UNAVAILABLE] ..." mid-session: the server asks us to come back
                raise pushback(self.endpoint, f"mid-session ({method.__name__.strip('_')})",
                               _server_text(exc)) from None
            raise ConnectionLost(
                f"connection to {self.endpoint.host}:{self.endpoint.port} lost: "
                f"{exc.__class__.__name__}: {exc}") from None
    return wrapper


class AppendRejected(MessageError):
    """The server refused this message (too large, quota, malformed)."""


class ImapSession:
    """One authenticated IMAP connection."""

    def __init__(self, endpoint: Endpoint, client: IMAPClient):
        self.endpoint = endpoint
        self.client = client
        self.capabilities = {c.decode().upper() if isinstance(c, bytes) else c.upper()
                             for c in client.capabilities()}
        # prefixes of other users' and shared namespaces: not this user's mail
        self.foreign_prefixes: tuple[str, ...] = ()
        self.delimiter, self.prefix = self._personal_namespace()
        self.selected: str | None = None
        self._last_uidnext: int | None = None  # UIDNEXT and EXISTS of the selected folder
        self._last_exists = 0
        self.uidless_fetches = 0  # FETCH responses without UID seen (see _fetch_range)
        self.dead = False
        self.fetch_refused: dict[int, str] = {}  # UID → why the server would not send it
        # keywords the server rejected ("BAD Unrecognized flag"): copied without them
        self.refused_keywords: set[str] = set()
        self.rate = bucket_for(endpoint)  # max_bytes_per_second, shared per server

    # --- connection --------------------------------------------------------------

    @classmethod
    def connect(cls, endpoint: Endpoint) -> ImapSession:
        """Connect, check what answered, log in.  Errors say what to change: a port of
        the other protocol, TLS spoken to a plaintext port and the reverse are named
        (see contact.py); a login refused "for now" is TemporarilyRefused (retried), any
        other refused login is final."""
        where = f"{endpoint.host}:{endpoint.port}"
        ctx = ssl_context(endpoint)
        try:
            # A short wait for the greeting (imapclient's "connect" timeout covers it): a
            # plaintext client on an implicit-TLS port would otherwise wait the full read
            # timeout for a greeting that never comes.
            client = IMAPClient(endpoint.host, port=endpoint.port,
                                ssl=endpoint.security == "ssl", ssl_context=ctx,
                                timeout=SocketTimeout(connect=greeting_wait(endpoint),
                                                      read=endpoint.timeout))
        except (OSError, EOFError, IMAPClientError) as exc:
            greeting_error = isinstance(exc, IMAPClientError)
            if greeting_error and imap_pushback(_server_text(exc)):
                raise pushback(endpoint, "the greeting", _server_text(exc)) from None
            raise first_contact_failure(endpoint, exc, greeting_error) from None
        try:
            client.normalise_times = False  # keep INTERNALDATE timezone-aware
            # imapclient sets imaplib's debug level to 5 to feed its logger; imaplib then
            # formats a repr of every response - message bodies included - whether or not
            # anything is logged (a third of our CPU), and at level 4 it would format the
            # LOGIN command with the password.  Off.
            client._imap.debug = 0
            if endpoint.security == "starttls":
                if not client.has_capability("STARTTLS"):
                    raise MailboxError(
                        f"IMAP server {where} does not offer STARTTLS; use security = \"ssl\" "
                        "on port 993")
                client.starttls(ctx)
        except ssl.SSLError as exc:
            _close_quietly(client)
            raise describe_tls_failure(endpoint, exc) from None
        except (OSError, EOFError, IMAPClientError) as exc:
            _close_quietly(client)
            raise ConnectionLost(f"connection to IMAP server {where} failed: {exc}") from None
        except BaseException:
            _close_quietly(client)
            raise
        try:
            _authenticate(client, endpoint)
        except LoginError as exc:
            _close_quietly(client)
            # imapclient turns *every* imaplib error during LOGIN into LoginError, a
            # dropped connection (imaplib.abort: "socket error: ...") included; a
            # "* BYE [UNAVAILABLE]" answer to LOGIN is push-back, not a drop.
            if _login_refused_for_now(exc):  # ServerBackoff: waited for, then retried
                raise pushback(endpoint, f"the login as {login_who(endpoint)}",
                               _server_text(exc)) from None
            if "socket error" in str(exc) or isinstance(exc.__context__, IMAPClientAbortError):
                raise ConnectionLost(f"connection to {where} dropped during login: {exc}") \
                    from None
            raise MailboxError(
                f"IMAP login as {login_who(endpoint)} at {where} failed: {_server_text(exc)}; "
                f"{login_advice(endpoint, exc)}") from None
        except (OSError, IMAPClientAbortError) as exc:
            _close_quietly(client)
            raise ConnectionLost(f"connection to {where} dropped during login: {exc}") \
                from None
        except BaseException:
            _close_quietly(client)
            raise
        try:
            return cls(endpoint, client)
        except (OSError, IMAPClientAbortError) as exc:
            _close_quietly(client)
            raise ConnectionLost(f"connection to {where} dropped after login: {exc}") \
                from None

    def logout(self) -> None:
        if self.dead:
            _close_quietly(self.client)
            return
        try:
            self.client.logout()
        except Exception:  # noqa: BLE001 - the connection may already be gone
            _close_quietly(self.client)

    def kill(self) -> None:
        """Close without another byte: in the middle of an APPEND literal, a LOGOUT would
        become message data (and could even complete a corrupt message)."""
        self.dead = True
        _close_quietly(self.client)

    @property
    def server_aliases(self) -> list[str]:
        return server_aliases(self.endpoint, self.client._imap.sock)

    @property
    def appendlimit(self) -> int | None:
        """The largest message the server accepts (APPENDLIMIT=n, RFC 7889), if it says."""
        for cap in self.capabilities:
            if cap.startswith("APPENDLIMIT="):
                try:
                    return int(cap.split("=", 1)[1])
                except ValueError:
                    return None
        return None

    def has(self, capability: str) -> bool:
        return capability.upper() in self.capabilities

    def _personal_namespace(self) -> tuple[str, str]:
        try:
            if self.has("NAMESPACE"):
                ns = self.client.namespace()
                self.foreign_prefixes = tuple(
                    p.decode() if isinstance(p, bytes) else p
                    for p, _d in (ns.other or ()) + (ns.shared or ()) if p)
                if ns.personal:
                    prefix, delim = ns.personal[0]
                    return (delim or "/"), (prefix or "")
            for _flags, delim, _name in self.client.list_folders("", ""):
                return (delim.decode() if isinstance(delim, bytes) else delim) or "/", ""
        except IMAPClientAbortError:
            raise
        except IMAPClientError:
            pass  # no NAMESPACE answer: assume no prefix
        return "/", ""

    # --- folders -----------------------------------------------------------------

    @_guard
    def list_folders(self) -> list[FolderInfo]:
        out = []
        for flags, delim, name in self.client.list_folders():
            d = delim.decode() if isinstance(delim, bytes) else delim
            fl = frozenset(f.decode() if isinstance(f, bytes) else str(f) for f in flags)
            foreign = any(name.startswith(p) or name + (d or "") == p
                          for p in self.foreign_prefixes)
            out.append(FolderInfo(name, d, fl, personal=not foreign))
        return out

    @_guard
    def create_folder(self, name: str) -> None:
        try:
            self.client.create_folder(name)
        except IMAPClientError as exc:
            if "ALREADYEXISTS" not in str(exc).upper() and not self.client.folder_exists(name):
                raise FolderError(f"cannot create folder {name!r}: {_server_text(exc)}") \
                    from None
        try:
            self.client.subscribe_folder(name)
        except IMAPClientError:
            pass  # subscription is a convenience; the folder exists

    @_guard
    def statuses(self, names: Iterable[str]) -> dict[str, FolderStatus]:
        """STATUS of these folders in one round trip: LIST-STATUS (RFC 5819) where
        offered, else one STATUS per folder, pipelined.  Folders the server would not
        answer for (missing, no access) are left out."""
        names = list(dict.fromkeys(names))
        if not names:
            return {}
        items = "MESSAGES UIDNEXT UIDVALIDITY" + (" HIGHESTMODSEQ" if self.has("CONDSTORE")
                                                  else "")
        imap = self.client._imap
        if self.has("LIST-STATUS"):
            rounds = [[imap._command("LIST", '""', '"*"', f"RETURN (STATUS ({items}))")]]
        else:
            # pipelined in groups: sending thousands of commands before reading could
            # fill both sides' socket buffers and stall
            rounds = ([imap._command("STATUS", self.client._normalise_folder(n), f"({items})")
                       for n in group] for group in _chunks(names, STATUS_PIPELINE))
        for tags in rounds:
            for tag in tags:
                try:
                    imap._command_complete("STATUS", tag)
                except IMAPClientAbortError:
                    raise
                except IMAPClientError:
                    pass  # BAD for one folder (a name it will not take): not answered
        imap.untagged_responses.pop("LIST", None)
        _typ, data = imap._untagged_response("OK", [None], "STATUS")
        wanted = set(names)
        out = {}
        for parts in _responses(data or ()):
            parsed = parse_status_response(parts)
            if parsed is not None and parsed[0] in wanted:
                out[parsed[0]] = parsed[1]
        return out

    @_guard
    def select(self, name: str, readonly: bool) -> SelectInfo:
        for attempt in (1, 2):
            try:
                info = self.client.select_folder(name, readonly=readonly)
                break
            except IMAPClientAbortError:
                raise
            except IMAPClientError as exc:
                # Dovecot auto-creates special-use folders on first access; two fresh
                # sessions racing for that make one SELECT fail with ALREADYEXISTS.
                if attempt == 1 and "ALREADYEXISTS" in str(exc).upper():
                    continue
                if imap_pushback(str(exc)):  # e.g. NO [LIMIT] too many sessions
                    raise pushback(self.endpoint, f"opening folder {name!r}",
                                   _server_text(exc)) from None
                raise FolderError(f"cannot open folder {name!r}: {_server_text(exc)}") \
                    from None
        self.selected = name
        self._last_uidnext = int(info[b"UIDNEXT"]) if b"UIDNEXT" in info else None
        self._last_exists = int(info.get(b"EXISTS", 0))
        permanent = info.get(b"PERMANENTFLAGS")
        return SelectInfo(
            uidvalidity=int(info[b"UIDVALIDITY"]), exists=int(info.get(b"EXISTS", 0)),
            uidnext=int(info[b"UIDNEXT"]) if b"UIDNEXT" in info else None,
            permanent_flags=None if permanent is None else frozenset(
                f.decode() if isinstance(f, bytes) else str(f) for f in permanent))

    # --- messages ----------------------------------------------------------------

    @_guard
    def list_messages(self, exists: int) -> list[MessageMeta]:
        """Metadata of every message in the selected folder (no bodies)."""
        if not exists:
            return []
        out = []
        for window in self.uid_windows():
            out.extend(self._list_range(window))
        out.sort(key=lambda m: m.uid)
        return out

    def uid_windows(self, first: int = 1, size: int | None = None) -> Iterator[str]:
        """UID ranges of ``size`` covering the selected folder from ``first`` on: the
        last is open-ended ('n:*'), so nothing that arrives meanwhile is missed.  A
        listing in windows keeps the server's answer, and our parse of it, small."""
        size = size or LIST_WINDOW
        uidnext = self._last_uidnext
        start = first
        if uidnext is not None and uidnext - first > 2 * self._last_exists + size:
            # sparse UIDs (years of expunges): windows of ``size`` real UIDs, not of
            # mostly empty ranges; they still cover every UID, gaps included
            uids = [u for u in self.uids_up_to(uidnext - 1) if u >= first]
            for i in range(size, len(uids), size):
                yield f"{start}:{uids[i] - 1}"
                start = uids[i]
            yield f"{start}:*"
            return
        while uidnext is not None and start + size < uidnext:
            yield f"{start}:{start + size - 1}"
            start += size
        yield f"{start}:*"

    @_guard
    def list_range(self, uid_set: str) -> list[MessageMeta]:
        """list_messages for one UID range (e.g. '5001:10000', '7:*')."""
        return self._list_range(uid_set)

    def _list_range(self, uid_set: str) -> list[MessageMeta]:
        data = self._fetch_range(
            uid_set, "(UID RFC822.SIZE FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        # 'n:*' always answers the last message, even one below n
        low = int(uid_set.split(":")[0]) if uid_set.endswith(":*") else 0
        out = []
        for uid, item in data.items():
            if int(uid) < low:
                continue
            # Courier names the field quoted: BODY[HEADER.FIELDS ("MESSAGE-ID")]
            header = next((v for k, v in item.items()
                           if isinstance(k, bytes) and k.startswith(b"BODY[HEADER.FIELDS")),
                          None)
            out.append(MessageMeta(
                uid=int(uid), size=int(item[b"RFC822.SIZE"]),
                flags=copyable_flags(item.get(b"FLAGS", ())),
                internaldate=item.get(b"INTERNALDATE"),
                message_id=parse_message_id(header)))
        return out

    @_guard
    def flags_changed_since(self, modseq: int, upto: int) -> dict[int, frozenset[str]] | None:
        """UID → FLAGS of the messages with UID <= upto whose flags changed after
        ``modseq`` (RFC 7162 CHANGEDSINCE; the server needs CONDSTORE).  None when the
        answer cannot be trusted to be complete (then list everything)."""
        if upto < 1:
            return {}
        for attempt in (1, 2):
            before = self.uidless_fetches
            data = self._fetch_range(f"1:{upto}", f"(UID FLAGS) (CHANGEDSINCE {modseq})")
            if self.uidless_fetches == before:
                return {int(u): copyable_flags(it.get(b"FLAGS", ())) for u, it in data.items()
                        if int(u) <= upto}
            # A change another session made was announced without its UID (Dovecot
            # then leaves it out of the answer): once more, after a NOOP took the news.
            if attempt == 1:
                self.client.noop()
        return None

    @_guard
    def uids_up_to(self, upto: int) -> list[int]:
        """The UIDs <= upto in the selected folder, ascending: with ESEARCH (RFC 4731)
        as a compressed set, else the plain SEARCH answer."""
        if upto < 1:
            return []
        imap = self.client._imap
        try:
            if self.has("ESEARCH"):
                tag = imap._command("UID", "SEARCH", "RETURN", "(ALL)", "UID", f"1:{upto}")
                typ, data = imap._command_complete("SEARCH", tag)
                self.client._checkok("search", typ, data)
                _typ, data = imap._untagged_response(typ, data, "ESEARCH")
                return sorted(u for u in parse_esearch_all(data or ()) if u <= upto)
            found = self.client.search(["UID", f"1:{upto}"])
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            raise FolderError(f"the server refused to search {self.selected!r}: "
                              f"{_server_text(exc)}") from None
        return sorted(int(u) for u in found if int(u) <= upto)

    def _fetch_range(self, uid_set: str, items: str) -> dict:
        """UID FETCH over a uid-set string such as '1:*'.  imapclient's fetch() filters
        its result by the ids it was given, which drops everything for ranges."""
        imap = self.client._imap
        tag = imap._command("UID", "FETCH", uid_set, items)
        try:
            typ, data = imap._command_complete("FETCH", tag)
            self.client._checkok("fetch", typ, data)
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            if imap_pushback(str(exc)):
                raise pushback(self.endpoint, "FETCH", _server_text(exc)) from None
            raise FolderError(f"the server refused to list messages of {self.selected!r}: "
                              f"{_server_text(exc)}") from None
        typ, data = imap._untagged_response(typ, data, "FETCH")
        # Keyed by the UID in each response.  A FETCH without one is the server telling
        # us of another session's change (RFC 3501 7.4.2, keyed by sequence number):
        # taken for a UID it would put one message's data on another; it is dropped,
        # and counted for callers that must not miss it (flags_changed_since).
        out: dict = {}
        for item in parse_fetch_response(data, self.client.normalise_times, False).values():
            uid = item.get(b"UID")
            if uid is None:
                self.uidless_fetches += 1
                continue
            out.setdefault(int(uid), {}).update(item)
        return out

    @_guard
    def fetch_bodies(self, uids: Sequence[int]) -> dict[int, bytes]:
        """Full raw bodies, without setting \\Seen (BODY.PEEK[]).  A message the server
        refuses to deliver (NO) is left out, its reason kept in ``fetch_refused``; the
        others are still returned."""
        try:
            return self._fetch_bodies(uids)
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            if imap_pushback(str(exc)):  # throttled: not these messages' fault
                raise pushback(self.endpoint, "FETCH", _server_text(exc)) from None
            if len(uids) == 1:
                self.fetch_refused[uids[0]] = _server_text(exc)
                return {}
        out = {}
        for uid in uids:  # find the message(s) it refuses; the others are fine
            out.update(self.fetch_bodies([uid]))
        return out

    def _fetch_bodies(self, uids: Sequence[int]) -> dict[int, bytes]:
        if not uids:
            return {}
        wanted = set(uids)
        imap = self.client._imap
        tag = imap._command("UID", "FETCH", uid_set_text(uids), "(BODY.PEEK[])")
        typ, data = imap._command_complete("FETCH", tag)
        self.client._checkok("fetch", typ, data)
        typ, data = imap._untagged_response(typ, data, "FETCH")
        bodies = {u: b for u, b in parse_body_fetch(data or ()).items() if u in wanted}
        self._pace(sum(len(b) for b in bodies.values()))
        return bodies

    def _pace(self, nbytes: int) -> None:
        """Hold this thread until ``nbytes`` more fit the server's byte-rate limit."""
        if self.rate is not None:
            self.rate.take(nbytes)

    @_guard
    def append(self, folder: str, items: Sequence[AppendItem]) -> list[int | None | Exception]:
        """See _append; afterwards the new copies are visible to this session."""
        outcome = self._append(folder, items)
        self.noop()
        return outcome

    def _append(self, folder: str, items: Sequence[AppendItem]) -> list[int | None | Exception]:
        """Append ``items``; per item the new UID (None if the server did not say), or the
        AppendRejected exception for a message the server refused.

        One MULTIAPPEND for the batch where offered; it is all-or-nothing, so on a NO the
        batch is retried one message at a time to find and isolate the culprit.
        """
        if not items:
            return []
        self._pace(sum(len(it.body) for it in items))
        if len(items) > 1 and self.has("MULTIAPPEND") and self.has("LITERAL+"):
            try:
                typ, data = self._multiappend_streamed(folder, items)
            except IMAPClientAbortError:
                raise
            except IMAPClientError:  # BAD: fall through to one message at a time
                typ, data = "BAD", None
            if typ == "OK":
                return self._uids_from(data, len(items))
        elif len(items) > 1 and self.has("MULTIAPPEND"):
            msgs = []
            for it in items:
                m = {"msg": it.body, "flags": sorted(it.flags)}
                if it.internaldate is not None:
                    m["date"] = it.internaldate
                msgs.append(m)
            typ, data = self.client.multiappend(folder, msgs)
            if typ == "OK":
                return self._uids_from(data, len(items))
            # NO/BAD: nothing was appended (RFC 3502); find the culprit one by one.
        return [self._append_one(folder, it) for it in items]

    def _multiappend_streamed(self, folder: str, items: Sequence[AppendItem]):
        """MULTIAPPEND with non-synchronising literals, each body sent as it is.

        imapclient's multiappend() copies every message twice before sending; with
        LITERAL+ nothing needs to wait for a continuation, so the bodies go straight to
        the socket and memory stays at one batch.
        """
        imap = self.client._imap
        tag = imap._new_tag()
        imap.send(tag + b" APPEND " + self.client._normalise_folder(folder))
        for it in items:
            head = b" " + to_bytes(seq_to_parenstr(sorted(it.flags)))
            if it.internaldate is not None:
                head += b' "' + to_bytes(datetime_to_INTERNALDATE(it.internaldate)) + b'"'
            imap.send(head + b" {" + str(len(it.body)).encode() + b"+}\r\n")
            imap.send(it.body)
        imap.send(b"\r\n")
        return imap._command_complete("APPEND", tag)

    def _append_one(self, folder: str, item: AppendItem) -> int | None | Exception:
        try:
            resp = self.client.append(folder, item.body, flags=sorted(item.flags),
                                      msg_time=item.internaldate)
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            keywords = {f for f in item.flags if not f.startswith("\\")}
            if keywords and "flag" in str(exc).lower():
                return self._append_without(folder, item, keywords)
            return AppendRejected(f"destination refused the message: {_server_text(exc)}")
        uids = self._uids_from(resp, 1)
        return uids[0]

    def _append_without(self, folder: str, item: AppendItem, keywords: set[str]
                        ) -> int | None | Exception:
        """The server rejected a keyword (e.g. "BAD Unrecognized flag"): append with the
        system flags only, then add the keywords one by one; those it rejects again are
        remembered in ``refused_keywords`` (reported, and left out of verification)."""
        uid = self._append_one(folder, AppendItem(item.body, item.flags - keywords,
                                                  item.internaldate))
        if not isinstance(uid, int):
            self.refused_keywords |= keywords
            return uid
        self.select(folder, readonly=False)
        for keyword in sorted(keywords):
            try:
                self.client.add_flags([uid], [keyword], silent=True)
            except IMAPClientAbortError:
                raise
            except IMAPClientError:
                self.refused_keywords.add(keyword)
        return uid

    @_guard
    def noop(self) -> None:
        """Some servers (Courier) show a session its own APPENDs only after a NOOP: every
        append is followed by one, so reading a copy back never depends on the server."""
        self.client.noop()

    @_guard
    def copy_meta(self, uids: Sequence[int]) -> dict[int, CopyMeta]:
        """RFC822.SIZE, FLAGS and INTERNALDATE of copies in the selected folder."""
        if not uids:
            return {}
        data = self._fetch_range(uid_set_text(uids), "(RFC822.SIZE FLAGS INTERNALDATE)")
        wanted = set(uids)
        return {int(u): CopyMeta(int(it[b"RFC822.SIZE"]),
                                 copyable_flags(it.get(b"FLAGS", ())),
                                 it.get(b"INTERNALDATE"))
                for u, it in data.items() if int(u) in wanted and b"RFC822.SIZE" in it}

    @_guard
    def source_flags(self, uids: Sequence[int]) -> dict[int, frozenset[str]]:
        """Current flags of these messages (looked at again right before deletion)."""
        if not uids:
            return {}
        data = self._fetch_range(uid_set_text(uids), "(FLAGS)")
        wanted = set(uids)
        return {int(u): copyable_flags(it.get(b"FLAGS", ())) for u, it in data.items()
                if int(u) in wanted}

    def _uids_from(self, response, count: int) -> list[int | None]:
        parsed = parse_appenduid(response)
        if parsed is None or len(parsed[1]) != count:
            return [None] * count
        return list(parsed[1])

    @_guard
    def find_by_content(self, min_uid: int, sha_by_size: dict[int, set[str]]
                        ) -> dict[str, list[int]]:
        """Fallback without APPENDUID: among UIDs >= min_uid find bodies by size + sha256.
        Returns sha256 → UIDs in ascending order (identical messages appear several times)."""
        found: dict[str, list[int]] = {}
        sizes = self._fetch_range(f"{min_uid}:*", "(RFC822.SIZE)")
        wanted = [u for u, it in sizes.items() if int(u) >= min_uid
                  and int(it[b"RFC822.SIZE"]) in sha_by_size]
        for uid, body in sorted(self.fetch_bodies(wanted).items()):
            digest = hashlib.sha256(body).hexdigest()
            if digest in sha_by_size.get(len(body), ()):
                found.setdefault(digest, []).append(uid)
        return found

    @_guard
    def fetch_part(self, uid: int, offset: int, length: int) -> bytes | None:
        """BODY.PEEK[]<offset.length> of one message (None if the message is gone)."""
        data = self._part_reply(self._ask_part(uid, offset, length))
        part = parse_body_fetch(data).get(uid)
        self._pace(len(part or b""))
        return part

    def _ask_part(self, uid: int, offset: int, length: int) -> bytes:
        """Send a partial FETCH without waiting for it; its tag, for _part_reply."""
        return self.client._imap._command("UID", "FETCH", str(uid),
                                          f"(BODY.PEEK[]<{offset}.{length}>)")

    def _part_reply(self, tag: bytes) -> list:
        """The untagged FETCH data read up to this tag's completion (it may include
        answers to FETCHes sent after it)."""
        imap = self.client._imap
        typ, data = imap._command_complete("FETCH", tag)
        self.client._checkok("fetch", typ, data)
        typ, data = imap._untagged_response(typ, data, "FETCH")
        return data or []

    def stream_body(self, uid: int, size: int, chunk: int, ahead: int = 1
                    ) -> Iterator[bytes]:
        """The body of a message in pieces of ``chunk`` bytes (partial FETCH), so a
        large message never sits in memory whole.  Once the server's answers say their
        origin, ``ahead`` more FETCHes are sent while a piece is handed on, so the server
        prepares the next piece instead of waiting for a round trip; their data waits in
        the socket or in ``arrived`` (at most ``ahead`` pieces)."""
        offsets = iter(range(0, size, chunk))
        asked: deque[tuple[bytes, int]] = deque()  # (tag, origin), oldest first
        arrived: dict[int | None, bytes] = {}

        @_guard
        def ask(_self) -> bool:
            offset = next(offsets, None)
            if offset is None:
                return False
            asked.append((self._ask_part(uid, offset, min(chunk, size - offset)), offset))
            return True

        @_guard
        def reply(_self) -> tuple[bytes | None, bool]:
            """The oldest asked piece, and whether the answer said its origin."""
            tag, offset = asked.popleft()
            arrived.update(parse_part_fetch(self._part_reply(tag), uid))
            if offset in arrived:
                return arrived.pop(offset), True
            if asked:  # others on their way, and this answer did not say its origin
                raise MessageError(f"{self.endpoint.host} answered partial FETCHes of "
                                   f"message UID {uid} without their origin")
            return arrived.pop(None, None), False

        try:
            ask(self)
            depth = 1  # one at a time until an answer shows its origin
            while asked:
                part, said_origin = reply(self)
                if part is None:
                    raise MessageError(f"message UID {uid} disappeared while being read")
                self._pace(len(part))
                if said_origin:
                    depth = 1 + ahead
                while len(asked) < depth and ask(self):
                    pass
                yield part
        finally:
            # given up early (the reader stopped, or a piece was missing): read the
            # answers still on their way, or the next command would get them
            while asked and not self.dead:
                try:
                    reply(self)
                except Exception:  # noqa: BLE001 - whatever it was, the session is unusable
                    self.kill()

    def exact_size(self, uid: int, size: int) -> bool:
        """Does the body really have ``size`` bytes?  RFC822.SIZE is exact on most servers
        but not promised; streaming an APPEND literal needs the exact length up front."""
        if size <= 0:
            return False
        tail = self.fetch_part(uid, size - 1, 2)
        return tail is not None and len(tail) == 1

    @_guard
    def append_streamed(self, folder: str, item_flags: Iterable[str],
                        internaldate: dt.datetime | None, size: int,
                        chunks: Iterator[bytes]) -> int | None | Exception:
        """APPEND one message whose body arrives in pieces (e.g. from stream_body on
        another connection).  If the pieces fail or do not add up to ``size``, this
        connection is killed, so the server discards the unfinished APPEND."""
        imap = self.client._imap
        tag = imap._new_tag()
        head = (tag + b" APPEND " + self.client._normalise_folder(folder) + b" "
                + to_bytes(seq_to_parenstr(sorted(item_flags))))
        if internaldate is not None:
            head += b' "' + to_bytes(datetime_to_INTERNALDATE(internaldate)) + b'"'
        literal_plus = self.has("LITERAL+")
        sent = 0
        try:
            imap.send(head + b" {" + str(size).encode() + (b"+}\r\n" if literal_plus
                                                           else b"}\r\n"))
            if not literal_plus:
                while imap._get_response():  # wait for the "+" continuation
                    if imap.tagged_commands.get(tag):
                        typ, data = imap.tagged_commands.pop(tag)
                        return AppendRejected(f"destination refused the message: "
                                              f"{_server_text(data[0])}")
            for piece in chunks:
                if sent + len(piece) > size:
                    raise MessageError("message is larger than its announced size")
                self._pace(len(piece))
                imap.send(piece)
                sent += len(piece)
            if sent != size:
                raise MessageError(f"message has {sent} bytes, {size} were announced")
            imap.send(b"\r\n")
        except BaseException:
            self.kill()
            raise
        try:
            typ, data = imap._command_complete("APPEND", tag)
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            return AppendRejected(f"destination refused the message: {_server_text(exc)}")
        if typ != "OK":
            return AppendRejected(f"destination refused the message: {_server_text(data)}")
        self.noop()
        return self._uids_from(data, 1)[0]

    @_guard
    def store_flags(self, uids: Sequence[int], add: Iterable[str], remove: Iterable[str]
                    ) -> None:
        """+FLAGS / -FLAGS.  Keywords the server rejects ("BAD Unrecognized flag") are
        left out and remembered in ``refused_keywords``, as on APPEND; any other refusal
        is this folder's error."""
        add = sorted(set(add) - self.refused_keywords)
        remove = sorted(remove)
        try:
            try:
                if add:
                    self.client.add_flags(list(uids), add, silent=True)
            except IMAPClientAbortError:
                raise
            except IMAPClientError:
                keywords = [f for f in add if not f.startswith("\\")]
                if not keywords:
                    raise
                system = [f for f in add if f.startswith("\\")]
                if system:
                    self.client.add_flags(list(uids), system, silent=True)
                for keyword in keywords:  # find the one(s) it will not take
                    try:
                        self.client.add_flags(list(uids), [keyword], silent=True)
                    except IMAPClientAbortError:
                        raise
                    except IMAPClientError:
                        self.refused_keywords.add(keyword)
            if remove:
                self.client.remove_flags(list(uids), remove, silent=True)
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            raise FolderError(f"{self.endpoint.host} refused to change flags in "
                              f"{self.selected!r}: {_server_text(exc)}") from None

    @_guard
    def delete(self, uids: Sequence[int]) -> None:
        """Flag \\Deleted and UID EXPUNGE exactly these UIDs; never a bare EXPUNGE."""
        if not self.has("UIDPLUS"):
            raise MailboxError(
                f"IMAP server {self.endpoint.host} lacks UIDPLUS (UID EXPUNGE); deleting "
                "would need a bare EXPUNGE, which also removes messages other clients "
                "flagged \\Deleted. Refused: nothing was deleted")
        try:
            self.client.add_flags(list(uids), ["\\Deleted"], silent=True)
            self.client.uid_expunge(list(uids))
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            try:  # do not leave \Deleted behind for another client's EXPUNGE
                self.client.remove_flags(list(uids), ["\\Deleted"], silent=True)
            except IMAPClientError:
                pass
            raise FolderError(f"{self.endpoint.host} refused to delete from "
                              f"{self.selected!r} ({_server_text(exc)}); check that the "
                              "account may delete there") from None

    @_guard
    def deleted_uids(self) -> set[int]:
        """UIDs flagged \\Deleted in the selected folder (UID SEARCH, changes nothing):
        messages the next EXPUNGE of any client removes."""
        try:
            return {int(u) for u in self.client.search(["DELETED"])}
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            raise FolderError(f"the server refused to search {self.selected!r}: "
                              f"{_server_text(exc)}") from None

    @_guard
    def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        """UID → RFC822.SIZE for those of ``uids`` that exist in the selected folder."""
        if not uids:
            return {}
        data = self._fetch_range(uid_set_text(uids), "(RFC822.SIZE)")
        wanted = set(uids)
        return {int(u): int(it[b"RFC822.SIZE"]) for u, it in data.items()
                if int(u) in wanted and b"RFC822.SIZE" in it}

    # --- the read-only report: metadata of big folders, fast ----------------------

    def scan_messages(self, exists: int, chunk: int = 5000
                      ) -> Iterator[tuple[int, int, frozenset[str], str | None]]:
        """(UID, RFC822.SIZE, flags, Message-ID) of every message in the selected folder,
        streamed in UID ranges of ``chunk`` messages.  No INTERNALDATE, and the responses
        are read with a few regular expressions instead of imapclient's general parser,
        which takes ten times as long on a 100,000-message folder."""
        if not exists:
            return
        uids = self._search_all()
        for i in range(0, len(uids), chunk):
            part = uids[i:i + chunk]
            yield from self._scan_range(f"{part[0]}:{part[-1]}", set(part))

    def _raw(self, what: str, *args: str) -> list:
        """One command through imaplib, its untagged ``what`` responses as imaplib keeps
        them (no parsing)."""
        imap = self.client._imap
        try:
            typ, data = imap._simple_command(*args)
            if typ != "OK":
                raise IMAPClientError(b" ".join(
                    d for d in data if isinstance(d, bytes)).decode("utf-8", "replace"))
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            if imap_pushback(str(exc)):
                raise pushback(self.endpoint, what, _server_text(exc)) from None
            raise FolderError(f"the server refused to list messages of {self.selected!r}: "
                              f"{_server_text(exc)}") from None
        return imap._untagged_response(typ, data, what)[1] or []

    @_guard
    def _search_all(self) -> list[int]:
        data = self._raw("SEARCH", "UID", "SEARCH", "ALL")
        return sorted(int(u) for line in data if line for u in line.split())

    @_guard
    def _scan_range(self, uid_range: str, wanted: set[int]
                    ) -> list[tuple[int, int, frozenset[str], str | None]]:
        data = self._raw("FETCH", "UID", "FETCH", uid_range,
                         "(UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        # imaplib gives each response as (text up to a literal, literal) and the text
        # after the literal as the next item; a response begins with "<seq> ("
        out = []
        text, header = b"", None
        flag_sets: dict[bytes, frozenset[str]] = {}  # few distinct flag lists: parse once

        def done() -> None:
            uid, size = _SCAN_UID.search(text), _SCAN_SIZE.search(text)
            if not (uid and size and int(uid.group(1)) in wanted):
                return
            found = _SCAN_FLAGS.search(text)
            raw = found.group(1) if found else b""
            flags = flag_sets.get(raw)
            if flags is None:
                flags = flag_sets[raw] = copyable_flags(raw.split())
            # the block holds the Message-ID field alone: unless folded, its <id> is it
            mid = _MSGID_RE.search(header) if header and b"\n " not in header \
                and b"\n\t" not in header else None
            out.append((int(uid.group(1)), int(size.group(1)), flags,
                        mid.group(0).decode("utf-8", "replace") if mid
                        else parse_message_id(header)))
        for item in data:
            part, literal = (item[0], item[1]) if isinstance(item, tuple) else (item, None)
            if part is None:
                continue
            if _SCAN_START.match(part):
                if text:
                    done()
                text, header = part, None
            else:
                text += part
            if literal is not None:
                header = literal
        if text:
            done()
        return out

def _authenticate(client: IMAPClient, endpoint: Endpoint) -> None:
    """Log in as endpoint.auth says: LOGIN with the mailbox's password; SASL PLAIN as
    admin_user with the mailbox as authorization identity (RFC 4616); or a bearer token
    (OAUTHBEARER preferred, else XOAUTH2)."""
    if endpoint.auth == "password":
        client.login(endpoint.username, endpoint.password.reveal())
        return
    offered = {c.decode() if isinstance(c, bytes) else c for c in client.capabilities()}
    offered = {c.upper()[5:] for c in offered if c.upper().startswith("AUTH=")}
    where = f"{endpoint.host}:{endpoint.port}"
    if endpoint.auth == "admin":
        if "PLAIN" not in offered:
            raise MailboxError(
                f"IMAP server {where} does not offer AUTH=PLAIN (it offers "
                f"{_listed(offered)}), which an admin login on behalf of "
                f"{endpoint.username} needs; use auth = \"password\" with the mailbox's "
                "own password") from None
        # imapclient's argument names: identity = who logs in, authorization_identity =
        # whose mailbox; sent through sasl_login so that the bytes are exactly RFC 4616.
        response = plain_response(endpoint.username, str(endpoint.admin_user),
                                  endpoint.password.reveal())
        client.sasl_login("PLAIN", lambda _challenge: response)
        return
    mechanism = choose_oauth_mechanism(offered)
    if mechanism is None:
        raise MailboxError(
            f"IMAP server {where} offers neither of {', '.join(OAUTH_MECHANISMS)} (it offers "
            f"{_listed(offered)}); it does not take OAuth2 access tokens: use "
            "auth = \"password\" or auth = \"admin\"")
    login_with_token(endpoint, mechanism,
                     lambda exchange: client.sasl_login(mechanism, exchange), LoginError)


def _listed(mechanisms: set[str]) -> str:
    return ", ".join(f"AUTH={m}" for m in sorted(mechanisms)) or "no AUTH= mechanism"


def _server_text(exc: BaseException) -> str:
    text = str(exc)
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return text


def _close_quietly(client: IMAPClient) -> None:
    try:
        client.shutdown()
    except Exception:  # noqa: BLE001
        pass


def _login_refused_for_now(exc: BaseException) -> bool:
    """A LOGIN refusal that will pass (RFC 5530 [UNAVAILABLE]: backend down, account being
    moved; [INUSE]: locked by another session; [THROTTLED], [LIMIT]: too many sessions or
    logins; a "Suggested Backoff Time"), unlike a wrong password.  See backoff.py."""
    return imap_pushback(str(exc))


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]
