"""A scripted line server on 127.0.0.1 for connection-error tests: it greets (in plaintext
or over TLS), answers each command line through a callback, and counts commands.  Stands
in for what Dovecot will not do on demand: an SMTP greeting, a certificate for another
name, a LOGIN refused with [UNAVAILABLE]."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable

# answer(line) → reply lines (without CRLF); "STARTTLS" in the reply list switches the
# connection to TLS after sending the replies before it; None closes the connection.
Answer = Callable[[bytes], list[bytes] | None]


class Greeter:
    def __init__(self, greeting: bytes, answer: Answer | None = None,
                 tls: ssl.SSLContext | None = None, starttls: ssl.SSLContext | None = None):
        self.greeting = greeting
        self.answer = answer or (lambda line: None)
        self.tls = tls
        self.starttls = starttls
        self.commands: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def count(self, word: bytes) -> int:
        with self._lock:
            return sum(1 for c in self.commands if word.upper() in c.upper())

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            conn.sendall(self.greeting + b"\r\n")
            buf = b""
            while True:
                while b"\n" not in buf:
                    data = conn.recv(4096)
                    if not data:
                        return
                    buf += data
                line, buf = buf.split(b"\n", 1)
                line = line.rstrip(b"\r")
                with self._lock:
                    self.commands.append(line)
                replies = self.answer(line)
                if replies is None:
                    return
                for reply in replies:
                    if reply == b"STARTTLS":
                        conn = self.starttls.wrap_socket(conn, server_side=True)
                    else:
                        conn.sendall(reply + b"\r\n")
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()


def imap_answers(login_reply: bytes = b"OK done", starttls: bool = False) -> Answer:
    """A minimal IMAP dialogue up to LOGIN: CAPABILITY, STARTTLS, LOGIN, LOGOUT."""
    caps = b"* CAPABILITY IMAP4rev1 AUTH=PLAIN" + (b" STARTTLS" if starttls else b"")

    def answer(line: bytes) -> list[bytes] | None:
        tag, _, rest = line.partition(b" ")
        command = rest.split(b" ", 1)[0].upper()
        if command == b"CAPABILITY":
            return [caps, tag + b" OK done"]
        if command == b"STARTTLS":
            return [tag + b" OK begin TLS", b"STARTTLS"]
        if command == b"LOGIN":
            return [tag + b" " + login_reply]
        if command == b"LOGOUT":
            return [b"* BYE bye", tag + b" OK bye"]
        return [tag + b" BAD unknown"]
    return answer


def pop3_answers(pass_reply: bytes = b"+OK") -> Answer:
    def answer(line: bytes) -> list[bytes] | None:
        command = line.split(b" ", 1)[0].upper()
        if command == b"USER":
            return [b"+OK"]
        if command == b"PASS":
            return [pass_reply]
        if command == b"QUIT":
            return [b"+OK bye"]
        return [b"-ERR unknown"]
    return answer
