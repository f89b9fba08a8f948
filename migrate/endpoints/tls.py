"""TLS settings shared by every protocol: verify the certificate and the host name."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl

from ..config import Endpoint
from ..errors import ConnectionLost, MailboxError


def ssl_context(endpoint: Endpoint) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        cafile=str(endpoint.ca_file) if endpoint.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # create_default_context already sets CERT_REQUIRED + check_hostname; state it so a
    # later edit cannot silently drop it.
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def describe_tls_failure(endpoint: Endpoint, exc: BaseException) -> MailboxError:
    # ConnectionLost is a MailboxError too: callers raise whatever comes back
    """Turn an SSL error into advice an admin can act on."""
    text = str(exc)
    where = f"{endpoint.host}:{endpoint.port}"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        # the connection went away during the handshake: retry, don't blame the TLS setup
        return ConnectionLost(f"connection to {where} closed during the TLS handshake")
    if isinstance(exc, ssl.SSLCertVerificationError):
        if "match" in text or "mismatch" in text:
            names = certificate_names(endpoint)
            if names:
                advice = ("it covers " + ", ".join(repr(n) for n in names[:8])
                          + (f" and {len(names) - 8} more" if len(names) > 8 else "")
                          + "; set host to one of them (a name that resolves to this server)")
            else:
                advice = ("connect using the exact host name the certificate was issued for "
                          "(often mail.<domain>)")
            return MailboxError(
                f"TLS certificate of {where} does not cover the host name {endpoint.host!r} "
                f"({exc.verify_message}); {advice}")
        return MailboxError(
            f"TLS certificate of {where} is not trusted ({exc.verify_message}); if the "
            "server uses a private CA, set ca_file to that CA's PEM file")
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text or "wrong version" in text:
        return MailboxError(
            f"{where} did not answer with TLS ({text}); this looks like a plaintext port: "
            "use the SSL/TLS port (IMAP 993, POP3 995), or security = \"starttls\"")
    return MailboxError(f"TLS handshake with {where} failed: {text}")


def server_aliases(endpoint: Endpoint, sock) -> list[str]:
    """What identifies the server behind ``endpoint``, whatever name reached it (protocol
    binding): the TLS certificate's fingerprint, and for public addresses the host name
    and every address it resolves to.  A loopback address says nothing on its own - SSH
    tunnels to different servers all listen there - so there only the certificate (or,
    without TLS, address + port) counts."""
    aliases = []
    der = None
    if isinstance(sock, ssl.SSLSocket):
        try:
            der = sock.getpeercert(binary_form=True)
        except (ValueError, OSError):
            der = None
    if der:
        aliases.append("cert:" + hashlib.sha256(der).hexdigest())
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, proto=socket.IPPROTO_TCP)
        addresses = sorted({info[4][0] for info in infos})
    except OSError:
        addresses = []
    public = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if public:
        aliases.append(f"name:{endpoint.host.lower().rstrip('.')}")
        aliases.extend(f"ip:{a}" for a in public)
    elif not der:
        aliases.extend(f"ip:{a}:{endpoint.port}" for a in addresses or [endpoint.host.lower()])
    return aliases


def certificate_names(endpoint: Endpoint) -> list[str]:
    """The names the server's certificate covers (subjectAltName, else the subject CN),
    read in a second handshake that still verifies the chain but not the host name.
    Empty when that fails too.  For STARTTLS the upgrade is done by hand: greeting,
    STARTTLS/STLS, then the handshake; nothing else is sent."""
    ctx = ssl_context(endpoint)
    ctx.check_hostname = False
    wait = min(endpoint.timeout, 5.0)  # a second look, not the job's own wait
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=wait) as raw:
            if endpoint.security != "ssl" and not _upgrade(endpoint, raw):
                return []
            with ctx.wrap_socket(raw, server_hostname=endpoint.host) as tls:
                cert = tls.getpeercert() or {}
    except (OSError, ValueError):
        return []
    names = [value for kind, value in cert.get("subjectAltName", ())
             if kind in ("DNS", "IP Address")]
    if not names:
        names = [value for rdn in cert.get("subject", ()) for key, value in rdn
                 if key == "commonName"]
    return names


def _upgrade(endpoint: Endpoint, sock: socket.socket) -> bool:
    """STARTTLS (IMAP) or STLS (POP3) on a fresh plaintext connection; byte by byte
    reads, so no TLS byte is swallowed into a buffer."""
    def line() -> bytes:
        out = b""
        while not out.endswith(b"\n") and len(out) < 4096:
            c = sock.recv(1)
            if not c:
                break
            out += c
        return out

    line()  # greeting
    if endpoint.protocol == "imap":
        sock.sendall(b"m1 STARTTLS\r\n")
        answer = line()
        while answer.startswith(b"*"):
            answer = line()
        return answer.upper().startswith(b"M1 OK")
    sock.sendall(b"STLS\r\n")
    return line().startswith(b"+OK")


class StartTlsRefused(OSError):
    """The server did not agree to STARTTLS / STLS on a plaintext connection."""


def tls_connect(endpoint: Endpoint, ctx: ssl.SSLContext, wait: float) -> ssl.SSLSocket:
    """A TLS connection to ``endpoint`` the way a job makes it (implicit TLS, or STARTTLS /
    STLS first), with ``ctx`` deciding what is verified; nothing else is sent, no login.
    Raises OSError (ssl.SSLError, StartTlsRefused); the caller closes the socket."""
    raw = socket.create_connection((endpoint.host, endpoint.port), timeout=wait)
    try:
        if endpoint.security != "ssl" and not _upgrade(endpoint, raw):
            raise StartTlsRefused(
                f"{endpoint.host}:{endpoint.port} refused "
                f"{'STARTTLS' if endpoint.protocol == 'imap' else 'STLS'}")
        return ctx.wrap_socket(raw, server_hostname=endpoint.host)
    except BaseException:
        raw.close()
        raise
