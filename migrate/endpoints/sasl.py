"""SASL messages shared by the IMAP and POP3 logins: PLAIN with an authorization identity
(an admin logging in on behalf of a mailbox, RFC 4616) and OAuth2 bearer tokens
(OAUTHBEARER, RFC 7628, and the older XOAUTH2).

The token and the admin's password pass through here and must go nowhere else: no
repr, log line or error message shows them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

from ..config import Endpoint

log = logging.getLogger("migrate.login")

# Preference order: OAUTHBEARER is the standard, XOAUTH2 its widespread predecessor.
OAUTH_MECHANISMS = ("OAUTHBEARER", "XOAUTH2")
# What of a server's OAuth error status is shown: a short token-free word.
_STATUS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


def plain_response(authzid: str, authcid: str, password: str) -> bytes:
    """RFC 4616: authzid NUL authcid NUL passwd."""
    return f"{authzid}\0{authcid}\0{password}".encode()


def choose_oauth_mechanism(offered: set[str]) -> str | None:
    for mechanism in OAUTH_MECHANISMS:
        if mechanism in offered:
            return mechanism
    return None


class OAuthExchange:
    """One bearer-token authentication, as the callable a SASL loop asks for each
    response: the first (to the empty challenge) carries the token; a later challenge is
    the server's JSON error (RFC 7628 3.2.2), answered with the dummy response that
    ends the exchange."""

    def __init__(self, mechanism: str, username: str, token: str):
        self.mechanism = mechanism
        self._initial = _bearer_response(mechanism, username, token)
        self.sent = False
        self.error_status: str | None = None  # the server refused the token, saying this

    def __repr__(self) -> str:  # never the token
        return f"<OAuthExchange {self.mechanism} error={self.error_status!r}>"

    def initial(self) -> bytes:
        self.sent = True
        return self._initial

    def __call__(self, challenge: bytes) -> bytes:
        if not self.sent:
            return self.initial()
        self.error_status = _error_status(challenge)
        # RFC 7628 3.2.3: OAUTHBEARER ends a failed exchange with %x01; XOAUTH2 with an
        # empty response.
        return b"\x01" if self.mechanism == "OAUTHBEARER" else b""


def _bearer_response(mechanism: str, username: str, token: str) -> bytes:
    if mechanism == "OAUTHBEARER":
        # gs2 header with the authorization identity (RFC 5801 saslname escaping)
        name = username.replace("=", "=3D").replace(",", "=2C")
        return f"n,a={name},\x01auth=Bearer {token}\x01\x01".encode()
    return f"user={username}\x01auth=Bearer {token}\x01\x01".encode()


def _error_status(challenge: bytes) -> str:
    try:
        status = json.loads(challenge.decode("utf-8")).get("status", "")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return "unreadable error"
    status = str(status)
    return status if _STATUS_RE.fullmatch(status) else "error"


def login_with_token(endpoint: Endpoint, mechanism: str,
                     authenticate: Callable[[OAuthExchange], None],
                     refused: type[BaseException] | tuple[type[BaseException], ...]
                     ) -> OAuthExchange:
    """Run oauth2_token_command and authenticate with its token; when the server refuses
    the token with an OAuth error (expired, revoked), run the command once more and try
    again on the same connection: a token helper hands out a fresh token once the old
    one has expired.  Nothing is cached: every connection runs the command."""
    for attempt in (1, 2):
        exchange = OAuthExchange(mechanism, endpoint.username, endpoint.password.reveal())
        try:
            authenticate(exchange)
            return exchange
        except refused as exc:
            # the server's OAuth status, for the error (login_advice)
            exc.oauth_status = exchange.error_status  # type: ignore[union-attr]
            if attempt == 2 or exchange.error_status is None:
                raise
            log.info("%s at %s refused the access token (%s); running %s again",
                     mechanism, endpoint.host, exchange.error_status, endpoint.password.name)
    raise AssertionError("unreachable")


def login_advice(endpoint: Endpoint, exc: BaseException | None = None) -> str:
    """What to check after a refused login, by kind of login (never the secret)."""
    if endpoint.auth == "admin":
        return (f"check admin_user ({endpoint.admin_user}) and its password "
                f"({endpoint.password.name}), that the server lets {endpoint.admin_user} "
                f"log in on behalf of other users (a master user), and the username")
    if endpoint.auth == "oauth2":
        status = getattr(exc, "oauth_status", None)
        said = f" (OAuth status {status})" if status else ""
        return (f"the access token from {endpoint.password.name} was refused{said}, also "
                "after running the command again; check that the token is for username and "
                "the mail scope, and that the command prints a current token")
    return "check the username (usually the full email address) and the password"


def login_who(endpoint: Endpoint) -> str:
    """"alice@x" or "alice@x (as admin root@x)" for a login error."""
    if endpoint.auth == "admin":
        return f"{endpoint.username} (as admin {endpoint.admin_user})"
    return endpoint.username
