"""A scriptable POP3 server on 127.0.0.1 (plaintext) for behaviours Dovecot will not
show: no UIDL, messages that disappear and come back.  Only for tests."""

from __future__ import annotations

import socket
import threading


class FakePop3:
    def __init__(self, messages: dict[str, bytes] | None = None, uidl: bool = True):
        self.messages = dict(messages or {})  # UIDL → body (CRLF lines)
        self.hidden: set[str] = set()
        self.uidl = uidl
        self.deleted: list[str] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def job_source(self) -> dict:
        return {"host": "127.0.0.1", "port": self.port, "security": "none",
                "allow_insecure": True, "username": "old@legacy.test", "password": "pw"}

    def close(self) -> None:
        self.listener.close()

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

        def send(*lines: bytes) -> None:
            f.write(b"".join(line + b"\r\n" for line in lines))
            f.flush()

        send(b"+OK fake POP3 ready")
        for raw in f:
            parts = raw.strip().split()
            cmd = parts[0].upper() if parts else b""
            if cmd == b"CAPA":
                send(b"+OK", b"USER", *([b"UIDL"] if self.uidl else []), b".")
            elif cmd in (b"USER", b"PASS", b"NOOP"):
                send(b"+OK")
            elif cmd == b"UIDL" and self.uidl:
                send(b"+OK", *(f"{i} {k}".encode() for i, k in enumerate(visible, 1)), b".")
            elif cmd == b"LIST":
                send(b"+OK", *(f"{i} {len(self.messages[k])}".encode()
                               for i, k in enumerate(visible, 1)), b".")
            elif cmd == b"RETR":
                body = self.messages[visible[int(parts[1]) - 1]]
                lines = body.split(b"\r\n")[:-1]
                send(b"+OK", *((b"." + line) if line.startswith(b".") else line
                               for line in lines), b".")
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
        conn.close()
