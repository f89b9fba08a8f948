"""A scriptable POP3 server on 127.0.0.1 (plaintext) for behaviours Dovecot will not
show: no UIDL, messages that disappear and come back, UIDLs reused for other messages,
RETR refused or answered by closing the connection, UTF8 (RFC 6856).  Only for tests."""

from __future__ import annotations

import socket
import threading


class FakePop3:
    def __init__(self, messages: dict[str, bytes] | None = None, uidl: bool = True,
                 utf8: bool = False, pipelining: bool = False):
        self.messages = dict(messages or {})  # UIDL → body (CRLF lines)
        self.hidden: set[str] = set()
        self.uidl = uidl
        self.utf8 = utf8  # CAPA offers "UTF8 USER"
        self.pipelining = pipelining
        self.refuse_retr: set[str] = set()  # UIDLs whose RETR gets -ERR
        self.drop_on_retr: set[str] = set()  # UIDLs whose RETR closes the connection
        self.list_sizes: dict[str, int] = {}  # UIDL → size LIST announces instead
        self.deleted: list[str] = []
        self.greeting_responses: list[bytes] = []  # each connection consumes one
        self.pass_responses: list[bytes] = []  # each PASS consumes one, e.g. b"-ERR [IN-USE]"
        self.capa_extra: list[bytes] = []  # more CAPA lines, e.g. b"LOGIN-DELAY 1"
        self._wire: dict[str, tuple[bytes, bytes]] = {}  # UIDL → (body, RETR answer)
        self.sessions: list[list[bytes]] = []  # the commands of each session, in order
        self._lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def job_source(self) -> dict:
        return {"host": "127.0.0.1", "port": self.port, "security": "none",
                "allow_insecure": True, "username": "old@legacy.test", "password": "pw"}

    def close(self) -> None:
        # shutdown first: close() alone leaves a thread blocked in accept() able to take
        # one more connection
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def warm(self) -> None:
        """Prepare every RETR answer now, so that a memory measurement of the client in
        this process does not count the server's copies of a large message."""
        for key in self.messages:
            self._answer(key)

    def _answer(self, key: str) -> bytes:
        body = self.messages[key]
        cached = self._wire.get(key)
        if cached is None or cached[0] is not body:
            cached = self._wire[key] = (body, b"".join(
                line + b"\r\n" for line in [b"+OK", *stuffed(body), b"."]))
        return cached[1]

    def retrieved(self, uidl: str) -> int:
        """How many RETR commands asked for the message with this UIDL (any session)."""
        with self._lock:
            return sum(1 for session in self.sessions for cmd in session
                       if cmd == f"RETR-OF {uidl}".encode())

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        f = conn.makefile("rwb")
        visible = [k for k in self.messages if k not in self.hidden]
        marked: set[str] = set()
        commands: list[bytes] = []
        with self._lock:
            self.sessions.append(commands)

        def send(*lines: bytes) -> None:
            f.write(b"".join(line + b"\r\n" for line in lines))
            f.flush()

        with self._lock:
            greeting = self.greeting_responses.pop(0) if self.greeting_responses else None
        send(greeting or b"+OK fake POP3 ready")
        if greeting and greeting.startswith(b"-ERR"):
            f.close()
            conn.close()
            return
        for raw in f:
            parts = raw.strip().split()
            cmd = parts[0].upper() if parts else b""
            with self._lock:
                commands.append(b" ".join(parts[:1] + (parts[1:] if cmd != b"PASS" else [])))
            if cmd == b"CAPA":
                send(b"+OK", b"USER", *([b"UIDL"] if self.uidl else []),
                     *([b"UTF8 USER"] if self.utf8 else []),
                     *([b"PIPELINING"] if self.pipelining else []), *self.capa_extra, b".")
            elif cmd == b"PASS" and self.pass_responses:
                with self._lock:
                    send(self.pass_responses.pop(0))
            elif cmd in (b"USER", b"PASS", b"NOOP"):
                send(b"+OK")
            elif cmd == b"UTF8" and self.utf8:
                send(b"+OK UTF8 enabled")
            elif cmd == b"UIDL" and self.uidl:
                send(b"+OK", *(f"{i} {k}".encode() for i, k in enumerate(visible, 1)), b".")
            elif cmd == b"LIST":
                send(b"+OK", *(f"{i} {self.list_sizes.get(k, len(self.messages[k]))}".encode()
                               for i, k in enumerate(visible, 1)), b".")
            elif cmd == b"RETR":
                key = visible[int(parts[1]) - 1]
                with self._lock:
                    commands.append(f"RETR-OF {key}".encode())
                if key in self.drop_on_retr:
                    break  # like a server process that crashes on this message
                if key in self.refuse_retr:
                    send(b"-ERR cannot read this message")
                    continue
                f.write(self._answer(key))
                f.flush()
            elif cmd == b"DELE":
                marked.add(visible[int(parts[1]) - 1])
                send(b"+OK")
            elif cmd == b"QUIT":
                for k in marked:
                    self.messages.pop(k, None)
                    self.deleted.append(k)
                send(b"+OK bye")
                break
            else:
                send(b"-ERR unknown command")
        try:
            f.close()
        except OSError:
            pass
        conn.close()


def stuffed(body: bytes) -> list[bytes]:
    """The lines of a RETR answer (RFC 1939): dot-stuffed; a body without a final line
    break gets one before the terminating dot, as real servers add it."""
    lines = body.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    return [(b"." + line) if line.startswith(b".") else line for line in lines]
