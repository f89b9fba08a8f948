"""A scriptable IMAP4rev1 server on 127.0.0.1 (plaintext or TLS), only for tests.

Real servers in the rig (Dovecot) behave well; this one can be told to misbehave on
demand, the way other servers do in the wild: inexact RFC822.SIZE, bodies rewritten on
APPEND, messages it cannot deliver, refused APPENDs, refused keywords, lost flags and
dates, appends invisible until NOOP, quoted HEADER.FIELDS names, login throttling.
Every behaviour is an attribute, off by default, and may be changed while it runs.

It implements what migrate.endpoints.imap (imapclient plus some raw commands) sends:
CAPABILITY, LOGIN, AUTHENTICATE PLAIN, NAMESPACE, LIST/LSUB, CREATE, (UN)SUBSCRIBE,
SELECT/EXAMINE, STATUS, (UID) FETCH/SEARCH/STORE, APPEND (MULTIAPPEND, LITERAL+,
APPENDUID), (UID) EXPUNGE, NOOP, CHECK, CLOSE, UNSELECT, LOGOUT.  Capabilities that a
test removes are enforced where that is cheap (no MULTIAPPEND → several messages in
one APPEND is BAD; no LITERAL+ → ``{n+}`` is BAD; no UIDPLUS → UID EXPUNGE is BAD and
APPEND has no APPENDUID), so a client that ignores them is caught.

Folder names in the store are wire names (modified UTF-7); the helpers take Unicode.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import itertools
import os
import re
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from imapclient.imap_utf7 import decode as utf7_decode
from imapclient.imap_utf7 import encode as utf7_encode

DEFAULT_CAPABILITIES = ("IMAP4rev1", "LITERAL+", "UIDPLUS", "MULTIAPPEND", "NAMESPACE",
                        "SPECIAL-USE", "AUTH=PLAIN")
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_SYSTEM_BY_LOWER = {f.lower(): f for f in SYSTEM_FLAGS}
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_LITERAL_AT_END = re.compile(rb"\{(\d+)(\+?)\}\r?\n$")
# whitespace | ( | ) | "quoted" | {literal} | atom (with [...] and <...> parts)
_TOKEN_RE = re.compile(rb'\s+|(\()|(\))|"((?:[^"\\]|\\.)*)"|\{(\d+)\+?\}\r\n|'
                       rb'((?:[^\s()\[<"]|\[[^\]]*\]|<[^>]*>|[\[<])+)')
_SECTION_RE = re.compile(r"^(BODY\.PEEK|BODY)\[([^\]]*)\](?:<(\d+)(?:\.(\d+))?>)?$",
                         re.IGNORECASE)


class Bye(Exception):
    """Send these lines, then close the connection (``* BYE`` scripted or on LOGOUT)."""


class Literal(bytes):
    """A literal ``{n}`` argument (as opposed to an atom or a quoted string)."""


@dataclass
class Message:
    uid: int
    body: bytes
    flags: list[str]
    internaldate: dt.datetime


@dataclass
class Folder:
    name: str  # wire name
    uidvalidity: int
    uidnext: int = 1
    messages: list[Message] = field(default_factory=list)  # ascending UID
    special_use: str | None = None
    subscribed: bool = True


# --- formatting and parsing helpers --------------------------------------------------

def format_internaldate(when: dt.datetime) -> str:
    """'04-Mar-2012 05:06:07 +0100' (no locale: month names are fixed in RFC 3501)."""
    off = int(when.utcoffset().total_seconds() // 60)
    sign = "-" if off < 0 else "+"
    return (f"{when.day:02d}-{MONTHS[when.month - 1]}-{when.year:04d} "
            f"{when:%H:%M:%S} {sign}{abs(off) // 60:02d}{abs(off) % 60:02d}")


def parse_internaldate(text: str) -> dt.datetime:
    m = re.fullmatch(r" ?(\d{1,2})-(\w{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)",
                     text)
    if not m or m.group(2).title() not in MONTHS:
        raise ValueError(f"bad date-time {text!r}")
    d, mon, y, hh, mm, ss, sign, oh, om = m.groups()
    offset = dt.timedelta(hours=int(oh), minutes=int(om)) * (-1 if sign == "-" else 1)
    return dt.datetime(int(y), MONTHS.index(mon.title()) + 1, int(d), int(hh), int(mm),
                       int(ss), tzinfo=dt.timezone(offset))


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def tokenize(data: bytes) -> list:
    """One command (literals inline as ``{n}\\r\\n<n bytes>``) → nested lists of str
    (atoms, quoted strings) and Literal (bytes).  An atom keeps ``[...]`` and ``<...>``
    with their spaces and parentheses, so ``BODY.PEEK[HEADER.FIELDS (X)]<0.9>`` is one."""
    stack: list[list] = [[]]
    pos = 0
    while pos < len(data):
        m = _TOKEN_RE.match(data, pos)
        if not m:
            raise ValueError(f"cannot parse {data[pos:pos + 20]!r}")
        pos = m.end()
        opening, closing, quoted, size, atom = m.groups()
        if opening:
            stack.append([])
        elif closing:
            if len(stack) == 1:
                raise ValueError("unbalanced ')'")
            stack[-2].append(stack.pop())
        elif quoted is not None:
            stack[-1].append(re.sub(rb"\\(.)", rb"\1", quoted).decode("utf-8", "replace"))
        elif size is not None:
            stack[-1].append(Literal(data[pos:pos + int(size)]))
            pos += int(size)
        elif atom:
            stack[-1].append(atom.decode("utf-8", "replace"))
    if len(stack) != 1:
        raise ValueError("unbalanced '('")
    return stack[0]


def text(token) -> str:
    if isinstance(token, list):
        raise ValueError("a string was expected, not a list")
    return token.decode("utf-8", "replace") if isinstance(token, bytes) else token


def parse_set(spec: str, largest: int) -> Callable[[int], bool]:
    """A sequence/uid set ('1:3,7,9:*') as a membership test.  '*' is the largest number
    in use, so 'n:*' always includes the last message even when n is beyond it
    (RFC 3501 6.4.8: ``UID FETCH 100:*`` returns the last message when its UID < 100)."""
    ranges = []
    for part in spec.split(","):
        ends = [largest if x == "*" else int(x) for x in part.split(":")]
        if len(ends) > 2 or min(ends) < 1 and "*" not in part:
            raise ValueError(f"bad set {spec!r}")
        ranges.append((min(ends), max(ends)))
    return lambda n: any(a <= n <= b for a, b in ranges)


def header_block(body: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = body.find(sep)
        if i >= 0:
            return body[:i + len(sep)]
    return body


def header_fields(body: bytes, names: Iterable[str], negate: bool = False) -> bytes:
    """The header lines (with continuations) whose names are (not) in ``names``."""
    wanted = {n.lower() for n in names}
    out, keep = [], False
    for line in header_block(body).splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] not in (b" ", b"\t"):
            name = line.split(b":", 1)[0].strip().decode("latin-1").lower()
            keep = (name in wanted) != negate
        if keep:
            out.append(line)
    return b"".join(out) + b"\r\n"


def canonical_flag(flag: str) -> str:
    return _SYSTEM_BY_LOWER.get(flag.lower(), flag)


# --- the server -----------------------------------------------------------------------

class FakeImapServer:
    """Threads on 127.0.0.1:<free port>; one thread per connection; a shared store."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None,
                 ca_pem: bytes | None = None, delimiter: str = "/",
                 namespace_prefix: str = "", users: dict[str, str] | None = None,
                 capabilities: Iterable[str] = DEFAULT_CAPABILITIES):
        self.ssl_context = ssl_context
        self.ca_file: Path | None = None  # ca_pem written out for job_endpoint()
        if ca_pem:
            fd, path = tempfile.mkstemp(prefix="fakeimap-ca-", suffix=".pem")
            os.write(fd, ca_pem)
            os.close(fd)
            self.ca_file = Path(path)
        self.delimiter = delimiter
        self.namespace_prefix = namespace_prefix
        self.users = users  # None: any username/password logs in
        self.capabilities: set[str] = set(capabilities)
        # --- scriptable behaviours, all off by default ---
        self.inexact_size = 0  # RFC822.SIZE = real size + this
        self.alter_on_append: Callable[[bytes], bytes] | None = None
        # body FETCH of these UIDs (in any folder) or (folder, UID) pairs:
        self.bye_on_fetch_uids: set[int | tuple[str, int]] = set()  # * BYE, then close
        self.no_on_fetch_uids: set[int | tuple[str, int]] = set()  # others sent, then NO
        self.reject_append: Callable[[bytes, list[str]], str | None] | None = None
        self.rejected_keywords: set[str] = set()  # case-insensitive; BAD on APPEND/STORE
        self.permanentflags: list[str] | None = None  # None: system flags (+ \* if allowed)
        self.drop_flags_and_dates_on_append = False
        self.append_invisible_until_noop = False
        self.quote_header_field_names = False
        self.login_responses: list[str] = []  # each LOGIN/AUTHENTICATE consumes one
        self.greeting_responses: list[str] = []  # each connection consumes one
        self.on_command: Callable[[Session, str, str, list], object] | None = None
        # --- observation ---
        self.log: list[tuple[int, str]] = []  # (session id, command line without tag)
        self.lock = threading.RLock()
        self.folders: dict[str, Folder] = {}
        self._uidvalidity = itertools.count(int(dt.datetime.now().timestamp()) % 10**9)
        self.add_folder("INBOX")
        self._sessions: list[Session] = []
        self._session_ids = itertools.count(1)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="fakeimap-accept").start()

    # --- test helpers --------------------------------------------------------------

    def add_folder(self, name: str, special_use: str | None = None) -> None:
        """Add a folder (and its parents), or give an existing one a special-use flag."""
        wire = utf7_encode(name).decode("ascii")
        parts = wire.split(self.delimiter)
        with self.lock:
            for i in range(1, len(parts) + 1):
                path = self.delimiter.join(parts[:i])
                if path not in self.folders:
                    self.folders[path] = Folder(path, next(self._uidvalidity))
            if special_use:
                self.folders[wire].special_use = special_use

    def add_message(self, folder: str, body: bytes, flags: Iterable[str] = (),
                    date: dt.datetime | None = None) -> int:
        with self.lock:
            f = self._folder(folder)
            date = date or dt.datetime.now().replace(microsecond=0)
            msg = Message(f.uidnext, bytes(body), _unique(canonical_flag(x) for x in flags),
                          date if date.tzinfo else date.astimezone())
            f.messages.append(msg)
            f.uidnext += 1
            return msg.uid

    def messages(self, folder: str) -> list[tuple[int, bytes, frozenset[str], dt.datetime]]:
        with self.lock:
            return [(m.uid, m.body, frozenset(m.flags), m.internaldate)
                    for m in self._folder(folder).messages]

    def folder_names(self) -> list[str]:
        with self.lock:
            return [utf7_decode(n.encode("ascii")) for n in self.folders]

    def set_uidvalidity(self, folder: str, value: int) -> None:
        with self.lock:
            self._folder(folder).uidvalidity = value

    def received(self, prefix: str = "") -> list[str]:
        """Logged command lines (without tag) starting with ``prefix``, any case."""
        with self.lock:
            return [line for _sid, line in self.log if line.upper().startswith(prefix.upper())]

    def job_endpoint(self, username: str = "user@fake.test", password: str = "secret") -> dict:
        """The [jobs.source]/[jobs.destination] table for this server."""
        table = {"host": "127.0.0.1", "port": self.port, "username": username,
                 "password": password}
        if self.ssl_context:
            table.update(security="ssl", ca_file=str(self.ca_file))
        else:
            table.update(security="none", allow_insecure=True)
        return table

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            sessions = list(self._sessions)
        for s in sessions:
            s.shutdown()
        if self.ca_file:
            self.ca_file.unlink(missing_ok=True)

    def __enter__(self) -> FakeImapServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------

    def _folder(self, name: str) -> Folder:
        wire = utf7_encode(name).decode("ascii")
        return self.folders[wire if wire.upper() != "INBOX" else "INBOX"]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="fakeimap-session").start()

    def _serve(self, conn: socket.socket) -> None:
        if self.ssl_context:
            try:
                conn = self.ssl_context.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                conn.close()
                return
        session = Session(self, conn)
        with self.lock:
            self._sessions.append(session)
        try:
            session.run()
        except (OSError, ValueError):
            pass  # client went away (ValueError: I/O on a file closed by close())
        finally:
            session.close()
            with self.lock:
                self._sessions.remove(session)

    def flag_allowed(self, flag: str) -> bool:
        """May this flag be stored?  \\Recent and unknown system flags never."""
        if flag.startswith("\\"):
            return flag.lower() in _SYSTEM_BY_LOWER
        if flag.lower() in {k.lower() for k in self.rejected_keywords}:
            return False
        if self.permanentflags is not None and "\\*" not in self.permanentflags:
            return flag.lower() in {p.lower() for p in self.permanentflags}
        return True

    def permanent_flags(self) -> list[str]:
        if self.permanentflags is not None:
            return list(self.permanentflags)
        return [*SYSTEM_FLAGS, *([] if self.rejected_keywords else ["\\*"])]


def _unique(flags: Iterable[str]) -> list[str]:
    out: list[str] = []
    for f in flags:
        if f.lower() not in {x.lower() for x in out}:
            out.append(f)
    return out


def tls_from_ca(ca, hosts: Iterable[str] = ("127.0.0.1", "localhost")) -> dict:
    """FakeImapServer(**tls_from_ca(test_ca)): a server context with a certificate from
    the trustme ``ca`` for 127.0.0.1/localhost, and the CA for the job's ca_file."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*hosts).configure_cert(ctx)
    return {"ssl_context": ctx, "ca_pem": ca.cert_pem.bytes()}


# --- one connection -------------------------------------------------------------------

class Session:
    """One client connection: state, selected folder and its view of the messages."""

    def __init__(self, server: FakeImapServer, conn: socket.socket):
        self.server = server
        self.conn = conn
        self.id = next(server._session_ids)
        self.rfile = conn.makefile("rb")
        self.authenticated = False
        self.selected: Folder | None = None
        self.readonly = False
        self.view: list[int] = []  # UIDs by sequence number (index + 1)
        self.hidden: set[int] = set()  # own appends not yet visible (Courier-like)
        self.out: list[bytes] = []

    # --- I/O -------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def untagged(self, line: str | bytes) -> None:
        self.out.append(b"* " + (line.encode() if isinstance(line, str) else line) + b"\r\n")

    def shutdown(self) -> None:
        """Wake the session's thread from a blocking read (it then closes the rest)."""
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        for thing in (self.rfile, self.conn):
            try:
                thing.close()
            except OSError:
                pass

    def read_command(self) -> tuple[bytes, str, bool] | None:
        """One whole command with its literals, its log form (literals as {n}) and
        whether it used a non-synchronising literal."""
        data, shown, literal_plus = bytearray(), [], False
        while True:
            line = self.rfile.readline()
            if not line:
                return None
            data += line
            shown.append(line.rstrip(b"\r\n").decode("utf-8", "replace"))
            m = _LITERAL_AT_END.search(line)
            if not m:
                return bytes(data), "".join(shown), literal_plus
            literal_plus |= bool(m.group(2))
            if not m.group(2):
                self.send(b"+ Ready for literal data\r\n")
            size = int(m.group(1))
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                return None
            data += chunk

    def run(self) -> None:
        srv = self.server
        with srv.lock:
            greeting = srv.greeting_responses.pop(0) if srv.greeting_responses else None
        if greeting:
            self.send(b"* " + greeting.encode() + b"\r\n")
            if greeting.upper().startswith("BYE"):
                return
        else:
            self.send(b"* OK fake IMAP4rev1 server ready\r\n")
        while True:
            got = self.read_command()
            if got is None:
                return
            data, shown, literal_plus = got
            tag, _, rest = shown.partition(" ")
            with srv.lock:
                srv.log.append((self.id, rest))
            self.out = []
            try:
                tokens = tokenize(data)
                tag = text(tokens[0])
                command = text(tokens[1]).upper()
                args = tokens[2:]
                if command == "UID" and args:
                    command = "UID " + text(args[0]).upper()
                    args = args[1:]
                if literal_plus and "LITERAL+" not in srv.capabilities:
                    raise BadCommand("Non-synchronizing literal without LITERAL+")
                if command == "AUTHENTICATE" and len(args) == 1:  # no SASL-IR: ask for it
                    self.send(b"+ \r\n")
                    args.append(self.rfile.readline().strip().decode("ascii", "replace"))
                with srv.lock:
                    # New messages show at every command; expunges never during FETCH,
                    # STORE or SEARCH (RFC 3501 7.4.1).
                    quiet = command.split()[-1] in ("FETCH", "STORE", "SEARCH")
                    self._sync(expunges=False)
                    status = self.dispatch(tag, command, args)
                    self._sync(expunges=not quiet)
            except Bye as bye:
                self.send(b"".join(self.out) + b"".join(
                    (line if line.startswith("* ") else f"{tag} {line}").encode() + b"\r\n"
                    for line in bye.args))
                return
            except BadCommand as exc:
                status = f"BAD {exc}"
            except (ValueError, IndexError) as exc:
                status = f"BAD Syntax error: {exc}"
            except NoCommand as exc:
                status = f"NO {exc}"
            self.send(b"".join(self.out) + f"{tag} {status}\r\n".encode())

    # --- commands ----------------------------------------------------------------------

    def dispatch(self, tag: str, command: str, args: list) -> str:
        srv = self.server
        if srv.on_command:
            canned = srv.on_command(self, tag, command, args)
            if canned is not None:
                return self._canned(canned)
        if command in ("CAPABILITY", "NOOP", "LOGOUT", "CHECK"):
            return getattr(self, "cmd_" + command.lower())(args)
        if not self.authenticated:
            if command in ("LOGIN", "AUTHENTICATE"):
                return getattr(self, "cmd_" + command.lower())(args)
            raise BadCommand(f"{command} needs authentication first")
        handler = getattr(self, "cmd_" + command.lower().replace(" ", "_"), None)
        if handler is None or command in ("LOGIN", "AUTHENTICATE"):
            raise BadCommand(f"Unknown command {command}")
        needs_folder = command.startswith("UID ") or command in (
            "FETCH", "STORE", "SEARCH", "EXPUNGE", "CLOSE", "UNSELECT")
        if needs_folder and self.selected is None:
            raise BadCommand("No mailbox selected")
        return handler(args)

    def _canned(self, canned) -> str:
        """on_command returned lines: '* ...' untagged, the last one is the tagged status;
        any '* BYE' closes the connection after sending."""
        lines = [canned] if isinstance(canned, str) else list(canned)
        if any(line.upper().startswith("* BYE") for line in lines):
            raise Bye(*lines)
        for line in lines[:-1]:
            self.out.append(line.encode() + b"\r\n")
        return lines[-1]

    def cmd_capability(self, args) -> str:
        self.untagged("CAPABILITY " + " ".join(self._capabilities()))
        return "OK Capability completed"

    def _capabilities(self) -> list[str]:
        caps = sorted(self.server.capabilities, key=lambda c: c != "IMAP4rev1")
        return [c for c in caps if not (self.authenticated and c.upper().startswith("AUTH="))]

    # NOOP and CHECK do nothing but the sync every command gets (see run()).
    def cmd_noop(self, args) -> str:
        self.hidden.clear()  # Courier-like: now this session sees its own appends
        return "OK NOOP completed"

    def cmd_check(self, args) -> str:
        return "OK CHECK completed"

    def cmd_logout(self, args) -> str:
        raise Bye("* BYE Logging out", "OK Logout completed")

    def _login_script(self) -> str | None:
        """The next scripted LOGIN answer, if any ('NO [UNAVAILABLE] ...', 'BYE ...')."""
        if not self.server.login_responses:
            return None
        answer = self.server.login_responses.pop(0)
        if answer.upper().startswith("BYE"):
            raise Bye("* " + answer)
        return answer

    def _logged_in(self, username: str, password: str) -> str:
        users = self.server.users
        if users is not None and users.get(username) != password:
            raise NoCommand("[AUTHENTICATIONFAILED] Authentication failed.")
        self.authenticated = True
        return f"OK [CAPABILITY {' '.join(self._capabilities())}] Logged in"

    def cmd_login(self, args) -> str:
        return self._login_script() or self._logged_in(text(args[0]), text(args[1]))

    def cmd_authenticate(self, args) -> str:
        if text(args[0]).upper() != "PLAIN" or "AUTH=PLAIN" not in self.server.capabilities:
            raise NoCommand("[CANNOT] Unsupported authentication mechanism")
        response = text(args[1]).encode()  # SASL-IR or the continuation's answer (run())
        if response == b"*":
            raise BadCommand("Authentication aborted")
        try:
            _authz, user, password = base64.b64decode(response).decode().split("\0")
        except ValueError as exc:
            raise BadCommand("Invalid PLAIN response") from exc
        return self._login_script() or self._logged_in(user, password)

    def cmd_namespace(self, args) -> str:
        srv = self.server
        self.untagged(f"NAMESPACE (({quote(srv.namespace_prefix)} {quote(srv.delimiter)}))"
                      " NIL NIL")
        return "OK Namespace completed"

    def _list(self, args, command: str) -> str:
        reference, pattern = text(args[0]), text(args[1])
        if pattern == "":
            self.untagged(f'{command} (\\Noselect) {quote(self.server.delimiter)} ""')
            return f"OK {command} completed"
        d = self.server.delimiter
        regex = re.compile("".join(".*" if c == "*" else f"[^{re.escape(d)}]*" if c == "%"
                                   else re.escape(c) for c in reference + pattern) + "$")
        names = list(self.server.folders)
        for name in names:
            folder = self.server.folders[name]
            if not regex.match(name) or (command == "LSUB" and not folder.subscribed):
                continue
            children = any(n.startswith(name + d) for n in names)
            flags = ["\\HasChildren" if children else "\\HasNoChildren"]
            if folder.special_use:
                flags.append(folder.special_use)
            if command == "LSUB":
                flags = []
            self.untagged(f"{command} ({' '.join(flags)}) {quote(d)} {quote(name)}")
        return f"OK {command} completed"

    cmd_list = functools.partialmethod(_list, command="LIST")
    cmd_lsub = functools.partialmethod(_list, command="LSUB")

    def _folder_arg(self, token) -> Folder:
        name = text(token)
        name = "INBOX" if name.upper() == "INBOX" else name
        if name not in self.server.folders:
            raise NoCommand("[TRYCREATE] Mailbox does not exist")
        return self.server.folders[name]

    def cmd_create(self, args) -> str:
        name = text(args[0]).rstrip(self.server.delimiter)
        if name.upper() == "INBOX" or name in self.server.folders:
            raise NoCommand("[ALREADYEXISTS] Mailbox already exists")
        parts = name.split(self.server.delimiter)
        for i in range(1, len(parts) + 1):  # parents too, as Dovecot does
            path = self.server.delimiter.join(parts[:i])
            if path not in self.server.folders:
                self.server.folders[path] = Folder(path, next(self.server._uidvalidity),
                                                   subscribed=False)
        return "OK Create completed"

    def cmd_subscribe(self, args) -> str:
        self._folder_arg(args[0]).subscribed = True
        return "OK Subscribe completed"

    def cmd_unsubscribe(self, args) -> str:
        self._folder_arg(args[0]).subscribed = False
        return "OK Unsubscribe completed"

    def _select(self, args, readonly: bool) -> str:
        self.selected = None
        folder = self._folder_arg(args[0])
        self.selected, self.readonly, self.hidden = folder, readonly, set()
        self.view = [m.uid for m in folder.messages]
        srv = self.server
        keywords = _unique(f for m in folder.messages for f in m.flags if f[0] != "\\")
        self.untagged(f"FLAGS ({' '.join([*SYSTEM_FLAGS, *keywords])})")
        self.untagged(f"OK [PERMANENTFLAGS ({' '.join(srv.permanent_flags())})] Flags permitted")
        self.untagged(f"{len(self.view)} EXISTS")
        self.untagged("0 RECENT")
        self.untagged(f"OK [UIDVALIDITY {folder.uidvalidity}] UIDs valid")
        self.untagged(f"OK [UIDNEXT {folder.uidnext}] Predicted next UID")
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        return f"OK [{mode}] {'EXAMINE' if readonly else 'SELECT'} completed"

    cmd_select = functools.partialmethod(_select, readonly=False)
    cmd_examine = functools.partialmethod(_select, readonly=True)

    def cmd_status(self, args) -> str:
        folder = self._folder_arg(args[0])
        values = {"MESSAGES": len(folder.messages), "RECENT": 0, "UIDNEXT": folder.uidnext,
                  "UIDVALIDITY": folder.uidvalidity,
                  "UNSEEN": sum("\\Seen" not in m.flags for m in folder.messages)}
        items = " ".join(f"{text(i).upper()} {values[text(i).upper()]}" for i in args[1])
        self.untagged(f"STATUS {quote(folder.name)} ({items})")
        return "OK Status completed"

    def cmd_close(self, args) -> str:
        if not self.readonly:
            self._expunge(None)
        self.selected = None
        return "OK Close completed"

    def cmd_unselect(self, args) -> str:
        self.selected = None
        return "OK Unselect completed"

    # --- the selected folder's view -------------------------------------------------------

    def _visible(self) -> list[Message]:
        return [m for m in self.selected.messages if m.uid not in self.hidden]

    def _sync(self, expunges: bool) -> None:
        """Report messages that appeared (EXISTS) and, where allowed, vanished (EXPUNGE)."""
        if self.selected is None:
            return
        current = {m.uid for m in self._visible()}
        if expunges:
            for seq in range(len(self.view), 0, -1):
                if self.view[seq - 1] not in current:
                    del self.view[seq - 1]
                    self.untagged(f"{seq} EXPUNGE")
        known = set(self.view)
        new = sorted(u for u in current if u not in known)
        if new:
            self.view.extend(new)
            self.untagged(f"{len(self.view)} EXISTS")

    def _matching(self, spec: str, uid: bool) -> list[tuple[int, Message]]:
        """(sequence number, message) for a sequence or uid set, in view order."""
        by_uid = {m.uid: m for m in self.selected.messages}
        pairs = [(seq, by_uid[u]) for seq, u in enumerate(self.view, 1) if u in by_uid]
        if not pairs:
            parse_set(spec, 1)  # still reject a malformed set
            return []
        test = parse_set(spec, max(m.uid for _, m in pairs) if uid else len(self.view))
        return [(seq, m) for seq, m in pairs if test(m.uid if uid else seq)]

    # --- FETCH ------------------------------------------------------------------------------

    def cmd_fetch(self, args, uid: bool = False) -> str:
        items = args[1] if isinstance(args[1], list) else [args[1]]
        items = [text(i) for i in items]
        if uid and not any(i.upper() == "UID" for i in items):
            items.insert(0, "UID")
        wants_body = any(self._is_body_item(i) for i in items)
        failed = False
        for seq, msg in self._matching(text(args[0]), uid):
            chosen = (msg.uid, (utf7_decode(self.selected.name.encode()), msg.uid))
            if wants_body and any(c in self.server.bye_on_fetch_uids for c in chosen):
                raise Bye("* BYE [SERVERBUG] Internal error occurred reading the message")
            if wants_body and any(c in self.server.no_on_fetch_uids for c in chosen):
                failed = True
                continue
            parts = []
            seen_before = "\\Seen" in msg.flags
            for item in items:
                parts.append(self._fetch_item(msg, item))
            if not seen_before and "\\Seen" in msg.flags and not any(
                    i.upper() == "FLAGS" for i in items):
                parts.append(self._fetch_item(msg, "FLAGS"))
            self.untagged(b"%d FETCH (" % seq + b" ".join(parts) + b")")
        if failed:
            raise NoCommand("[SERVERBUG] Some messages could not be FETCHed")
        return "OK Fetch completed"

    @staticmethod
    def _is_body_item(item: str) -> bool:
        """Does this item need the message text (not just the header or metadata)?"""
        m = _SECTION_RE.match(item)
        return item.upper() == "RFC822" or bool(m and m.group(2).upper() in ("", "TEXT"))

    def _fetch_item(self, msg: Message, item: str) -> bytes:
        up = item.upper()
        if up == "UID":
            return b"UID %d" % msg.uid
        if up == "FLAGS":
            return f"FLAGS ({' '.join(msg.flags)})".encode()
        if up == "INTERNALDATE":
            return f'INTERNALDATE "{format_internaldate(msg.internaldate)}"'.encode()
        if up == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % max(0, len(msg.body) + self.server.inexact_size)
        if up == "RFC822":
            self._mark_seen(msg)
            return b"RFC822 " + literal(msg.body)
        if up == "RFC822.HEADER":
            return b"RFC822.HEADER " + literal(header_block(msg.body))
        m = _SECTION_RE.match(item)
        if not m:
            raise BadCommand(f"Unsupported FETCH item {item}")
        kind, section, offset, length = m.groups()
        if not kind.upper().endswith(".PEEK"):
            self._mark_seen(msg)
        sec = section.upper()
        if sec == "":
            data = msg.body
        elif sec == "HEADER":
            data = header_block(msg.body)
        elif sec == "TEXT":
            data = msg.body[len(header_block(msg.body)):]
        elif sec.startswith("HEADER.FIELDS"):
            names = [text(n) for n in tokenize(section.split(None, 1)[1].encode())[0]]
            data = header_fields(msg.body, names, negate=sec.startswith("HEADER.FIELDS.NOT"))
            if self.server.quote_header_field_names:  # Courier: ("MESSAGE-ID")
                section = f"{section.split(None, 1)[0]} ({' '.join(map(quote, names))})"
        else:
            raise BadCommand(f"Unsupported section [{section}]")
        name = f"BODY[{section}]"
        if offset is not None:
            start = int(offset)
            data = data[start:start + int(length)] if length is not None else data[start:]
            name += f"<{start}>"
        return name.encode() + b" " + literal(data)

    def _mark_seen(self, msg: Message) -> None:
        if not self.readonly and "\\Seen" not in msg.flags:
            msg.flags.append("\\Seen")

    # --- SEARCH -----------------------------------------------------------------------------

    def cmd_search(self, args, uid: bool = False) -> str:
        if args and text(args[0]).upper() == "CHARSET":
            args = args[2:]
        found = [(seq, m) for seq, m in self._matching("1:*", uid=False)
                 if self._search_match(list(args), seq, m)]
        numbers = " ".join(str(m.uid if uid else seq) for seq, m in found)
        self.untagged(f"SEARCH {numbers}".rstrip())
        return "OK Search completed"

    def _search_match(self, keys: list, seq: int, msg: Message) -> bool:
        """All of ``keys`` (consumed left to right) match; a subset of RFC 3501 6.4.4."""
        ok = True
        while keys:
            ok &= self._search_key(keys, seq, msg)
        return ok

    def _search_key(self, keys: list, seq: int, msg: Message) -> bool:
        key = keys.pop(0)
        if isinstance(key, list):
            return self._search_match(list(key), seq, msg)
        up = text(key).upper()
        flags = {f.lower() for f in msg.flags}
        simple = {"ALL": True, "DELETED": "\\deleted" in flags,
                  "UNDELETED": "\\deleted" not in flags, "SEEN": "\\seen" in flags,
                  "UNSEEN": "\\seen" not in flags}
        if up in simple:
            return simple[up]
        if up == "NOT":
            return not self._search_key(keys, seq, msg)
        if up == "OR":
            a = self._search_key(keys, seq, msg)
            return self._search_key(keys, seq, msg) or a
        if up == "UID":
            return parse_set(text(keys.pop(0)), self.selected.uidnext - 1)(msg.uid)
        if up in ("KEYWORD", "UNKEYWORD"):
            return (text(keys.pop(0)).lower() in flags) == (up == "KEYWORD")
        if up == "HEADER":  # substring of the field's value, any case
            name, value = text(keys.pop(0)), text(keys.pop(0)).lower().encode()
            lines = header_fields(msg.body, [name]).split(b"\r\n")
            return any(value in line.split(b":", 1)[-1].lower() for line in lines if line)
        if re.fullmatch(r"[\d:,*]+", up):
            return parse_set(up, len(self.view))(seq)
        raise BadCommand(f"Unsupported SEARCH key {up}")

    # --- STORE / EXPUNGE ------------------------------------------------------------------------

    def _check_flags(self, flags: list[str]) -> list[str]:
        for f in flags:
            if not self.server.flag_allowed(f):
                raise BadCommand("Unrecognized flag")
        return _unique(canonical_flag(f) for f in flags)

    def cmd_store(self, args, uid: bool = False) -> str:
        if self.readonly:
            raise NoCommand("Mailbox is read-only")
        action = text(args[1]).upper()
        flags = args[2] if isinstance(args[2], list) else args[2:]
        flags = self._check_flags([text(f) for f in flags])
        lowered = {f.lower() for f in flags}
        for seq, msg in self._matching(text(args[0]), uid):
            if action.startswith("+FLAGS"):
                msg.flags = _unique(msg.flags + flags)
            elif action.startswith("-FLAGS"):
                msg.flags = [f for f in msg.flags if f.lower() not in lowered]
            elif action.startswith("FLAGS"):
                msg.flags = list(flags)
            else:
                raise BadCommand(f"Bad STORE action {action}")
            if not action.endswith(".SILENT"):
                uid_part = f"UID {msg.uid} " if uid else ""
                self.untagged(f"{seq} FETCH ({uid_part}FLAGS ({' '.join(msg.flags)}))")
        return "OK Store completed"

    def _expunge(self, uids: Callable[[int], bool] | None) -> None:
        """Remove \\Deleted messages (of ``uids``); run() then reports the EXPUNGEs."""
        self.selected.messages = [m for m in self.selected.messages if not (
            "\\Deleted" in m.flags and (uids is None or uids(m.uid)))]

    def cmd_expunge(self, args) -> str:
        if self.readonly:
            raise NoCommand("Mailbox is read-only")
        self._expunge(None)
        return "OK Expunge completed"

    def cmd_uid_expunge(self, args) -> str:
        if "UIDPLUS" not in self.server.capabilities:
            raise BadCommand("Unknown command UID EXPUNGE")
        if self.readonly:
            raise NoCommand("Mailbox is read-only")
        self._expunge(parse_set(text(args[0]), self.selected.uidnext - 1))
        return "OK Expunge completed"

    cmd_uid_fetch = functools.partialmethod(cmd_fetch, uid=True)
    cmd_uid_search = functools.partialmethod(cmd_search, uid=True)
    cmd_uid_store = functools.partialmethod(cmd_store, uid=True)

    # --- APPEND -------------------------------------------------------------------------------

    def cmd_append(self, args) -> str:
        srv = self.server
        folder = self._folder_arg(args[0])
        items, rest = [], list(args[1:])
        while rest:  # one or more: [flags] [date] literal
            flags = [text(f) for f in rest.pop(0)] if isinstance(rest[0], list) else []
            date = None
            if rest and isinstance(rest[0], str):
                date = parse_internaldate(rest.pop(0))
            if not rest or not isinstance(rest[0], Literal):
                raise BadCommand("APPEND needs a literal message")
            items.append((bytes(rest.pop(0)), self._check_flags(flags), date))
        if not items:
            raise BadCommand("APPEND needs a message")
        if len(items) > 1 and "MULTIAPPEND" not in srv.capabilities:
            raise BadCommand("Several messages in one APPEND without MULTIAPPEND")
        for body, flags, _date in items:  # all or nothing (RFC 3502)
            refusal = srv.reject_append(body, flags) if srv.reject_append else None
            if refusal:
                raise NoCommand(refusal)
        uids = []
        for body, flags, date in items:
            if srv.alter_on_append:
                body = srv.alter_on_append(body)
            if srv.drop_flags_and_dates_on_append:
                flags, date = [], None
            now = dt.datetime.now().astimezone().replace(microsecond=0)
            msg = Message(folder.uidnext, body, flags, date or now)
            folder.uidnext += 1
            folder.messages.append(msg)
            uids.append(msg.uid)
            if srv.append_invisible_until_noop and folder is self.selected:
                self.hidden.add(msg.uid)
        if "UIDPLUS" in srv.capabilities:
            uid_set = f"{uids[0]}:{uids[-1]}" if len(uids) > 1 else str(uids[0])
            return f"OK [APPENDUID {folder.uidvalidity} {uid_set}] Append completed"
        return "OK Append completed"


class BadCommand(Exception):
    """Answer BAD with this text."""


class NoCommand(Exception):
    """Answer NO with this text."""
