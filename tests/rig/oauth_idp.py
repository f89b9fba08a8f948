"""A tiny OAuth2 authorization server for tests, on 127.0.0.1 at a port chosen at run time.

It issues bearer tokens (POST /token with username=...) and answers Dovecot's token
introspection (RFC 7662: POST /introspect with token=...; {"active": true, "username":
...} or {"active": false}).  A token lives ``lifetime`` seconds and, with ``max_uses``,
is valid for that many introspections only; the test can revoke tokens.

``token_command(dir, username)`` writes the program mailmigrate runs as
oauth2_token_command: it prints the first line of its queue file when there is one
(a stale token a test planted, as a token helper's cache would hand out), else a token
freshly issued here.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs


@dataclass
class Grant:
    username: str
    expires: float  # time.monotonic()
    uses: int = 0
    revoked: bool = False


class TokenIssuer:
    def __init__(self, lifetime: float = 300.0, max_uses: int | None = None):
        self.lifetime = lifetime
        self.max_uses = max_uses
        self.token_bytes = 24  # random bytes in a token (hex-encoded: twice as many chars)
        self.grants: dict[str, Grant] = {}
        self.introspections: list[tuple[str, bool]] = []  # (username or "", active)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def introspection_url(self) -> str:
        return self.url + "/introspect"

    def start(self) -> TokenIssuer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- tokens ----------------------------------------------------------------------

    def issue(self, username: str) -> str:
        token = "tok" + secrets.token_hex(self.token_bytes)
        with self._lock:
            self.grants[token] = Grant(username, time.monotonic() + self.lifetime)
        return token

    def revoke(self, token: str) -> None:
        with self._lock:
            self.grants[token].revoked = True

    def introspect(self, token: str) -> dict:
        with self._lock:
            grant = self.grants.get(token)
            active = (grant is not None and not grant.revoked
                      and time.monotonic() < grant.expires
                      and (self.max_uses is None or grant.uses < self.max_uses))
            if active:
                grant.uses += 1
            self.introspections.append((grant.username if grant else "", active))
        return {"active": True, "username": grant.username} if active else {"active": False}

    @property
    def tokens(self) -> list[str]:
        with self._lock:
            return list(self.grants)

    def token_command(self, directory: Path, username: str) -> tuple[list[str], Path]:
        """(argv of a token command for username, its queue file)."""
        queue = directory / "token-queue"
        script = directory / "token-command.py"
        script.write_text(f"""import sys, urllib.parse, urllib.request
from pathlib import Path
queue = Path({str(queue)!r})
lines = queue.read_text().splitlines() if queue.exists() else []
if lines:
    queue.write_text("".join(line + "\\n" for line in lines[1:]))
    print(lines[0])
    sys.exit(0)
body = urllib.parse.urlencode({{"username": {username!r}}}).encode()
with urllib.request.urlopen({self.url + "/token"!r}, body, timeout=10) as answer:
    print(answer.read().decode())
""")
        return [sys.executable, str(script)], queue

    # --- HTTP --------------------------------------------------------------------------

    def _handler(self):
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode("utf-8"))
                if self.path == "/token" and form.get("username"):
                    self._answer("text/plain", issuer.issue(form["username"][0]).encode())
                elif self.path == "/introspect":
                    answer = issuer.introspect(form.get("token", [""])[0])
                    self._answer("application/json", json.dumps(answer).encode())
                else:
                    self.send_error(404)

            def _answer(self, kind: str, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # quiet: pytest shows stderr
                pass

        return Handler
