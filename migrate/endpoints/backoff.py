"""Servers that push back: answers asking us to come back later, and a byte-rate limit.

A provider that is overloaded or limits sessions says so in its answer: IMAP response
codes [UNAVAILABLE], [INUSE], [THROTTLED] and [LIMIT] (RFC 5530 and common use) at login
or SELECT, a ``* BYE`` carrying one of them (at the greeting or mid-session), Microsoft's
"Suggested Backoff Time: N milliseconds" in any NO/BYE text, POP3's -ERR [IN-USE],
[LOGIN-DELAY] (RFC 2449, with the delay from CAPA) and [SYS/TEMP] (RFC 3206).  Those
become ``ServerBackoff``: a transient error carrying how long the server asked us to wait
(``retry_after``, None when it did not say); the retry loop (runner.RetryLoop) waits at
least that long, within the job's back-off budget.

An APPEND refused with [LIMIT] or [TOOBIG] is not one of them: that message is too large
for the destination, and waiting will not change it (imap.AppendRejected).
"""

from __future__ import annotations

import re
import threading
import time

from ..config import Endpoint
from .contact import TemporarilyRefused

# IMAP response codes (and POP3 extended codes) that mean "not now", not "never".
_IMAP_CODES = re.compile(r"\[(UNAVAILABLE|INUSE|THROTTLED|LIMIT)\b[^\]]*\]", re.IGNORECASE)
_POP3_CODES = re.compile(r"^-ERR \[(IN-USE|LOGIN-DELAY|SYS/TEMP)\]", re.IGNORECASE)
# Microsoft 365 / Exchange Online: "Suggested Backoff Time: 300 milliseconds" (also seen
# with "seconds"); the unit defaults to milliseconds as in Microsoft's own texts.
_SUGGESTED = re.compile(
    r"Suggested\s+Back-?off\s+Time\s*[:=]?\s*(\d+(?:\.\d+)?)\s*"
    r"(milliseconds?|msecs?|ms|seconds?|secs?|s)?\b", re.IGNORECASE)
_LOGIN_DELAY_CAPA = re.compile(r"^LOGIN-DELAY\s+(\d+)", re.IGNORECASE)


class ServerBackoff(TemporarilyRefused):
    """The server asked us to come back later.  ``retry_after``: the seconds it asked
    for (None: it did not say); ``reason``: its own words, for the report."""

    def __init__(self, text: str, *, server: str, reason: str,
                 retry_after: float | None = None):
        super().__init__(text)
        self.server = server
        self.reason = reason
        self.retry_after = retry_after


def suggested_wait(text: str) -> float | None:
    """Seconds from a "Suggested Backoff Time: N milliseconds|seconds" text, or None."""
    m = _SUGGESTED.search(text)
    if not m:
        return None
    value = float(m.group(1))
    unit = (m.group(2) or "ms").lower()
    return value if unit.startswith("s") else value / 1000.0


def imap_pushback(text: str) -> bool:
    """Does an IMAP NO/BYE text ask us to come back later?"""
    return bool(_IMAP_CODES.search(text)) or suggested_wait(text) is not None


def pop3_pushback(text: str) -> bool:
    """Does a POP3 -ERR text ask us to come back later?"""
    return bool(_POP3_CODES.search(text.strip())) or suggested_wait(text) is not None


def is_login_delay(text: str) -> bool:
    return text.strip().upper().startswith("-ERR [LOGIN-DELAY]")


def login_delay_from_capa(capabilities: dict) -> float | None:
    """RFC 2449 LOGIN-DELAY n from poplib's capa() result ({name: [args]})."""
    for name, args in capabilities.items():
        m = _LOGIN_DELAY_CAPA.match(" ".join([name, *args]))
        if m:
            return float(m.group(1))
    return None


def pushback(endpoint: Endpoint, what: str, text: str,
             retry_after: float | None = None) -> ServerBackoff:
    """The ServerBackoff for a push-back answer ``text`` to ``what`` (e.g. "the login")."""
    where = f"{endpoint.host}:{endpoint.port}"
    reason = " ".join(text.split())
    hint = retry_after if retry_after is not None else suggested_wait(text)
    asked = f"; it asked for {hint:g} s" if hint is not None else ""
    return ServerBackoff(
        f"{endpoint.protocol.upper()} server {where} pushed back at {what} for now "
        f"({reason}){asked}", server=where, reason=reason, retry_after=hint)


# --- byte rate -------------------------------------------------------------------------


class TokenBucket:
    """At most ``rate`` bytes per second on average, bursts up to one second's worth
    once it has been idle (it starts empty: no burst at the start of a job).

    ``take(n)`` blocks until the bytes are covered; a piece larger than the burst is
    let through and paid for afterwards (the bucket goes negative), so any size passes.
    Shared by every connection of a job to one server (``bucket_for``)."""

    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep):
        self.rate = float(rate)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._last = clock()

    def take(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
        if debt > 0:
            self._sleep(debt / self.rate)


_buckets: dict[tuple, TokenBucket] = {}
_buckets_lock = threading.Lock()


def bucket_for(endpoint: Endpoint) -> TokenBucket | None:
    """The byte-rate limiter of this endpoint's server (None without
    ``max_bytes_per_second``): one per host, port, account and rate, shared by all its
    connections in this process."""
    rate = getattr(endpoint, "max_bytes_per_second", None)
    if not rate:
        return None
    key = (endpoint.host.lower(), endpoint.port, endpoint.username.lower(), rate)
    with _buckets_lock:
        bucket = _buckets.get(key)
        if bucket is None:
            bucket = _buckets[key] = TokenBucket(rate)
        return bucket
