"""First contact with a server, for both protocols: how long to wait for a greeting, and
what to say when the thing at host:port is not the server the job expects.

A mistyped port or security mode is the most common first-run failure.  Left to the
protocol libraries it shows as a 60 s hang (plaintext client on an implicit-TLS port:
both sides wait for the other), ``imaplib.IMAP4.error: None`` (an IMAP client greeted
by ``+OK``) or an SSL "wrong version number".  When the first attempt fails like that, a
probe connection reads the greeting (sending nothing, so no credentials) and the error
says what answered and which setting to use.  All of these are permanent errors
(exit code 1, never retried): an answer of the wrong protocol does not change by waiting.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
from dataclasses import dataclass

from ..config import DEFAULT_PORTS, Endpoint
from ..errors import ConnectionLost, MailboxError
from .tls import describe_tls_failure

GREETING_WAIT_MAX = 15.0  # real servers greet within milliseconds; slow DNS checks ~5 s
PROBE_WAIT_MAX = 5.0
_UNREACHABLE_ERRNOS = (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL)


class ServerUnreachable(ConnectionLost):
    """Nothing usable at host:port: connection refused, no route, no answer in time.

    On first contact that is a wrong host or port, and waiting will not fix it; after a
    connection to the same server had worked it is a restart, worth retrying.  The retry
    loop (engine.retrying) tells the two apart; this class only marks the kind."""

    unreachable = True


class TemporarilyRefused(ConnectionLost):
    """The server answered but asked us to come back later (IMAP [UNAVAILABLE]/[INUSE],
    POP3 [IN-USE]/[SYS/TEMP]): retried like a dropped connection."""


def greeting_wait(endpoint: Endpoint) -> float:
    return min(endpoint.timeout, GREETING_WAIT_MAX)


def probe_wait(endpoint: Endpoint) -> float:
    return min(endpoint.timeout, PROBE_WAIT_MAX)


def where(endpoint: Endpoint) -> str:
    return f"{endpoint.host}:{endpoint.port}"


def identify(greeting: bytes) -> str | None:
    """Which protocol a first line belongs to: "IMAP", "POP3", "SMTP", "FTP" or None."""
    line = greeting.lstrip()
    if re.match(rb"\* (OK|PREAUTH|BYE)\b", line, re.IGNORECASE):
        return "IMAP"
    if re.match(rb"(\+OK|-ERR)\b", line, re.IGNORECASE):
        return "POP3"
    if re.match(rb"(220|421|554)[ -]", line):
        return "FTP" if b"FTP" in line.upper() else "SMTP"
    return None


def shown(greeting: bytes) -> str:
    text = greeting.decode("utf-8", "replace").strip()
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Probe:
    """What one look at host:port saw.  ``greeting`` is None when nothing came in time."""

    tls: bool
    connected: bool
    handshake_ok: bool = False
    greeting: bytes | None = None


def probe(endpoint: Endpoint, tls: bool) -> Probe:
    """Connect, optionally do a TLS handshake without verifying anything (nothing is sent
    but the ClientHello), and read the first line."""
    wait = probe_wait(endpoint)
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=wait)
    except OSError:
        return Probe(tls, connected=False)
    try:
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            try:
                sock = ctx.wrap_socket(sock, server_hostname=endpoint.host)
            except OSError:
                return Probe(tls, connected=True)
        return Probe(tls, connected=True, handshake_ok=tls, greeting=_read_line(sock))
    finally:
        sock.close()


def _read_line(sock: socket.socket) -> bytes | None:
    data = b""
    try:
        while b"\n" not in data and len(data) < 512:
            chunk = sock.recv(512)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data.split(b"\n", 1)[0] if data else None


def _a(protocol: str) -> str:
    return f"a {protocol}" if protocol == "POP3" else f"an {protocol}"


def _ports(endpoint: Endpoint) -> tuple[int, int]:
    ports = DEFAULT_PORTS[endpoint.protocol]
    return ports["ssl"], ports["starttls"]


def explain(endpoint: Endpoint, seen: Probe) -> MailboxError | None:
    """The mix-up ``seen`` reveals, as advice; None when it shows the expected server
    speaking the expected way (then the failure was something else, e.g. a drop)."""
    if seen.greeting is None:
        return None
    proto = endpoint.protocol.upper()
    tls_port, plain_port = _ports(endpoint)
    at = where(endpoint)
    other = identify(seen.greeting)
    text = shown(seen.greeting)
    how = "over TLS" if seen.tls else "in plaintext"
    if other in ("SMTP", "FTP"):
        purpose = " (a port for sending mail)" if other == "SMTP" else ""
        return MailboxError(
            f"port {endpoint.port} of {endpoint.host} answered like an {other} server{purpose}"
            f" ({text}); this endpoint is {proto}: use port {tls_port} with security = \"ssl\""
            f" or {plain_port} with security = \"starttls\"")
    if other is None:
        return MailboxError(
            f"{at} answered {how} with {text!r}, which is not an {proto} greeting; check the "
            f"port ({proto}: {tls_port} with security = \"ssl\", {plain_port} with "
            "security = \"starttls\")")
    wants_tls = endpoint.security == "ssl"
    if other != proto:
        other_ports = DEFAULT_PORTS[other.lower()]
        if seen.tls == wants_tls:
            fix = f"use port {tls_port if wants_tls else plain_port}"
        elif seen.tls:  # plaintext endpoint, implicit-TLS port of the other protocol
            fix = (f"use port {plain_port} for security = \"{endpoint.security}\", or "
                   f"{tls_port} with security = \"ssl\"")
        else:
            fix = f"use port {tls_port} (security = \"ssl\")"
        return MailboxError(
            f"port {endpoint.port} of {endpoint.host} answered {how} like {_a(other)} server "
            f"({text}; {other} uses {other_ports['ssl']}/{other_ports['starttls']}); this "
            f"endpoint is {proto}: {fix}")
    if seen.tls and not wants_tls:
        return MailboxError(
            f"no greeting from {at} within {greeting_wait(endpoint):g} s; this looks like an "
            f"implicit-TLS port ({proto} {tls_port}): it answered TLS and then {text!r}; use "
            "security = \"ssl\"")
    if wants_tls and not seen.tls:
        return MailboxError(
            f"{at} is a plaintext port: it answered in plaintext ({text}), not TLS; use "
            f"security = \"starttls\" on it ({proto} {plain_port}) or the TLS port {tls_port} "
            "with security = \"ssl\"")
    return None


def first_contact_failure(endpoint: Endpoint, exc: BaseException, greeting_error: bool
                          ) -> MailboxError:
    """Map what went wrong before login onto an error with advice.  ``greeting_error``:
    the protocol library did not like the greeting (IMAP4.error, poplib.error_proto)."""
    proto = endpoint.protocol.upper()
    at = where(endpoint)
    tls_first = endpoint.security == "ssl"
    if isinstance(exc, socket.gaierror):
        return MailboxError(f"cannot resolve {proto} host {endpoint.host!r}: {exc.strerror}")
    if isinstance(exc, ConnectionRefusedError):
        return ServerUnreachable(
            f"cannot connect to {proto} server {at}: connection refused (nothing listens on "
            "that port, or a firewall rejects it); check host and port")
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS:
        return ServerUnreachable(f"cannot reach {proto} server {at}: {exc.strerror}; check the "
                                 "host name and the network")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        # the connection went away during the handshake: retry, don't blame the TLS setup
        return ConnectionLost(f"connection to {at} closed during the TLS handshake")
    if isinstance(exc, ssl.SSLCertVerificationError):

        return describe_tls_failure(endpoint, exc)
    if isinstance(exc, ssl.SSLError):
        return explain(endpoint, probe(endpoint, tls=False)) or describe_tls_failure(
            endpoint, exc)
    if isinstance(exc, TimeoutError):
        # Either the TCP connect or the greeting timed out; a look the other way round
        # (TLS if we spoke plaintext) tells which, and whether the port is a TLS one.
        seen = probe(endpoint, tls=not tls_first)
        if not seen.connected:
            return ServerUnreachable(
                f"no answer from {proto} server {at} within {greeting_wait(endpoint):g} s "
                "(connection timed out); check host, port and firewall")
        return explain(endpoint, seen) or ServerUnreachable(
            f"no greeting from {at} within {greeting_wait(endpoint):g} s: it accepted the "
            f"connection but said nothing; check that port {endpoint.port} is an {proto} port")
    if greeting_error:
        return explain(endpoint, probe(endpoint, tls=tls_first)) or ConnectionLost(
            f"{at} did not greet like an {proto} server: {exc}")
    return ConnectionLost(f"connection to {proto} server {at} failed: "
                          f"{exc.__class__.__name__}: {exc}")
