"""Providers that push back (issue #8): back-off hints at the greeting, at login, at SELECT
and mid-session are waited for - as long as the server asks, within the job's back-off
budget - and the run then completes by itself; an APPEND too large for the destination
stays that message's failure; max_bytes_per_second holds a job to a byte rate."""

from __future__ import annotations

import datetime as dt
import random
import time

import pytest

from migrate import config as cfg
from migrate.endpoints.backoff import (TokenBucket, imap_pushback, pop3_pushback,
                                       suggested_wait)
from migrate.errors import ConfigError
from migrate.results import JobResult
from tests.rig import mailgen
from tests.rig.fakeimap import FakeImapServer
from tests.rig.fakepop import FakePop3
from tests.rig.jobs import run, write_config

DATE = dt.datetime(2021, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
SMALL = {"backoff_budget": 10.0, "backoff_default": 0.1}  # run() waits from 0.05 s


@pytest.fixture
def pair():
    with FakeImapServer() as source, FakeImapServer() as destination:
        yield source, destination


def fill(server, count=5, seed=8, size=None):
    rng = random.Random(seed)
    bodies = [mailgen.make_message(rng, i, size=size)[0] for i in range(count)]
    for b in bodies:
        server.add_message("INBOX", b, ("\\Seen",), DATE)
    return bodies


def imap_config(tmp_path, source, destination, source_extra=None):
    job = {"name": "push", "kind": "imap-copy",
           "source": {**source.job_endpoint(), **(source_extra or {})},
           "destination": destination.job_endpoint()}
    return write_config(tmp_path / "c.toml", [job])


def bodies_at(server):
    return sorted(b for _u, b, _f, _d in server.messages("INBOX"))


def pushback_warnings(result):
    return [w for w in result.warnings if "pushed back" in w]


def assert_completed(result, source, destination, bodies):
    assert result.ok, result.errors
    assert result.counts["copied"] == len(bodies)
    assert bodies_at(destination) == sorted(bodies)


# --- parsing ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [
    ("NO [UNAVAILABLE] Suggested Backoff Time: 300 milliseconds", 0.3),
    ("* BYE [UNAVAILABLE] Suggested Backoff Time: 5 seconds", 5.0),
    ("NO Server busy. Suggested Backoff Time: 1500 ms", 1.5),
    ("NO Server busy. Suggested Backoff Time: 2000", 2.0),  # Microsoft's unit: ms
    ("NO [UNAVAILABLE] Backend down", None),
])
def test_suggested_backoff_time(text, seconds):
    assert suggested_wait(text) == seconds


def test_which_answers_are_push_back():
    for text in ("NO [UNAVAILABLE] x", "NO [INUSE] x", "NO [THROTTLED] x", "NO [LIMIT] x",
                 "BYE Suggested Backoff Time: 20 milliseconds"):
        assert imap_pushback(text), text
    for text in ("NO [AUTHENTICATIONFAILED] x", "NO [TOOBIG] x", "NO [OVERQUOTA] x",
                 "NO no such folder"):
        assert not imap_pushback(text), text
    for text in ("-ERR [IN-USE] locked", "-ERR [LOGIN-DELAY] too soon", "-ERR [SYS/TEMP] x"):
        assert pop3_pushback(text), text
    for text in ("-ERR [AUTH] bad password", "-ERR [SYS/PERM] x", "-ERR no such message"):
        assert not pop3_pushback(text), text


def test_summary_line_shows_the_wait():
    result = JobResult("j", "imap-copy", False, counts={"copied": 1, "waited_seconds": 0.4})
    assert ", waited 0.4 s for the server" in result.summary_line()
    result.counts["waited_seconds"] = 0
    assert "waited" not in result.summary_line()


# --- IMAP: greeting, login, SELECT, mid-session -------------------------------------------

def test_login_unavailable_twice_is_waited_for_then_completes(pair, tmp_path):
    source, destination = pair
    bodies = fill(source)
    source.login_responses = ["NO [UNAVAILABLE] Suggested Backoff Time: 200 milliseconds"] * 2
    result = run(imap_config(tmp_path, source, destination), **SMALL)
    assert_completed(result, source, destination, bodies)
    assert result.counts["waited_seconds"] >= 0.4
    (warning,) = pushback_warnings(result)  # once per job, with the server's words
    assert "[UNAVAILABLE] Suggested Backoff Time: 200 milliseconds" in warning
    assert "waited" in result.summary_line() and "for the server" in result.summary_line()
    assert len(source.received("LOGIN")) >= 3


def test_limit_at_select_for_a_while_is_waited_for_then_completes(pair, tmp_path):
    source, destination = pair
    bodies = fill(source)
    refusals = []

    def too_many_sessions(session, tag, command, args):
        if command in ("SELECT", "EXAMINE") and len(refusals) < 3:
            refusals.append(command)
            return "NO [LIMIT] Too many open sessions for this account"
        return None

    source.on_command = too_many_sessions
    result = run(imap_config(tmp_path, source, destination), **SMALL)
    assert_completed(result, source, destination, bodies)
    assert len(refusals) == 3
    assert result.counts["waited_seconds"] >= 3 * SMALL["backoff_default"]
    (warning,) = pushback_warnings(result)
    assert "[LIMIT] Too many open sessions" in warning


def test_bye_at_greeting_with_suggested_backoff_is_waited_for(pair, tmp_path):
    source, destination = pair
    bodies = fill(source)
    source.greeting_responses = ["BYE [UNAVAILABLE] Suggested Backoff Time: 300 milliseconds"]
    result = run(imap_config(tmp_path, source, destination), **SMALL)
    assert_completed(result, source, destination, bodies)
    assert result.counts["waited_seconds"] >= 0.3
    assert "Suggested Backoff Time: 300 milliseconds" in pushback_warnings(result)[0]


def test_bye_mid_session_with_backoff_is_waited_for(pair, tmp_path):
    source, destination = pair
    bodies = fill(source)
    byes = []

    def busy(session, tag, command, args):
        if command == "UID FETCH" and not byes:
            byes.append(session.id)
            return "* BYE [THROTTLED] Suggested Backoff Time: 250 milliseconds"
        return None

    source.on_command = busy
    result = run(imap_config(tmp_path, source, destination), **SMALL)
    assert_completed(result, source, destination, bodies)
    assert byes and result.counts["waited_seconds"] >= 0.25


def test_a_wait_longer_than_the_budget_fails_cleanly(pair, tmp_path):
    source, destination = pair
    fill(source)
    source.login_responses = ["NO [THROTTLED] Suggested Backoff Time: 30 seconds"] * 5
    started = time.monotonic()
    result = run(imap_config(tmp_path, source, destination), backoff_budget=2.0)
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not result.ok
    text = " ".join(result.errors)
    assert "[THROTTLED] Suggested Backoff Time: 30 seconds" in text, text
    assert "back-off budget of 2 s" in text, text
    assert len(source.received("LOGIN")) == 1  # nothing waited, nothing tried again
    assert not result.counts.get("waited_seconds")
    assert destination.messages("INBOX") == []


def test_budget_counts_every_wait_of_the_job(pair, tmp_path):
    source, destination = pair
    fill(source)
    # each wait 0.3 s; a budget of 1 s covers three of them, not four
    source.login_responses = ["NO [UNAVAILABLE] Suggested Backoff Time: 300 milliseconds"] * 9
    result = run(imap_config(tmp_path, source, destination), backoff_budget=1.0)
    assert not result.ok
    assert len(source.received("LOGIN")) == 4
    assert 0.9 <= result.counts["waited_seconds"] < 5
    assert "back-off budget of 1 s" in " ".join(result.errors)


# --- APPEND too large: that message's failure, no waiting ---------------------------------

@pytest.mark.parametrize("code", ["TOOBIG", "LIMIT"])
def test_append_too_big_fails_only_that_message_and_never_waits(code, pair, tmp_path):
    source, destination = pair
    bodies = fill(source)
    big = bodies[2]
    destination.reject_append = lambda body, flags: (
        f"[{code}] Message too large for this mailbox" if body == big else None)
    started = time.monotonic()
    result = run(imap_config(tmp_path, source, destination), **SMALL)
    assert time.monotonic() - started < 10
    assert result.counts["copied"] == len(bodies) - 1
    assert result.counts["failed"] == 1
    assert bodies_at(destination) == sorted(b for b in bodies if b != big)
    assert not result.counts.get("waited_seconds")
    assert not pushback_warnings(result)
    assert any(f"[{code}] Message too large" in e for e in result.errors), result.errors


# --- POP3 ---------------------------------------------------------------------------------

def pop_config(tmp_path, server):
    job = {"name": "pop", "kind": "pop3-archive", "source": server.job_source(),
           "archive": {"path": str(tmp_path / "archive")}}
    return write_config(tmp_path / "p.toml", [job])


POP_MESSAGES = {f"u{i}": f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode() for i in range(3)}


def test_pop3_in_use_then_ok(tmp_path):
    server = FakePop3(POP_MESSAGES)
    try:
        server.pass_responses = [b"-ERR [IN-USE] Mailbox locked by another session"]
        result = run(pop_config(tmp_path, server), **SMALL)
    finally:
        server.close()
    assert result.ok, result.errors
    assert result.counts["copied"] == len(POP_MESSAGES)
    assert result.counts["waited_seconds"] >= SMALL["backoff_default"]
    assert "[IN-USE] Mailbox locked" in pushback_warnings(result)[0]


def test_pop3_login_delay_waits_what_capa_says(tmp_path):
    server = FakePop3(POP_MESSAGES)
    try:
        server.capa_extra = [b"LOGIN-DELAY 1"]
        server.pass_responses = [b"-ERR [LOGIN-DELAY] Logged in too recently"]
        result = run(pop_config(tmp_path, server), **SMALL)
    finally:
        server.close()
    assert result.ok, result.errors
    assert result.counts["copied"] == len(POP_MESSAGES)
    assert result.counts["waited_seconds"] >= 1.0


def test_pop3_in_use_greeting_is_waited_for(tmp_path):
    server = FakePop3(POP_MESSAGES)
    try:
        server.greeting_responses = [b"-ERR [IN-USE] Suggested Backoff Time: 200 milliseconds"]
        result = run(pop_config(tmp_path, server), **SMALL)
    finally:
        server.close()
    assert result.ok, result.errors
    assert result.counts["waited_seconds"] >= 0.2


# --- max_bytes_per_second -----------------------------------------------------------------

def test_max_bytes_per_second_slows_a_copy_down(pair, tmp_path):
    source, destination = pair
    bodies = fill(source, count=4, size=512 * 1024)
    total = sum(len(b) for b in bodies)
    assert total >= 2_000_000
    path = imap_config(tmp_path, source, destination,
                       {"max_bytes_per_second": 1_000_000})
    started = time.monotonic()
    result = run(path)
    elapsed = time.monotonic() - started
    assert_completed(result, source, destination, bodies)
    assert elapsed >= 1.5, f"{total} bytes at 1 MB/s took only {elapsed:.2f} s"


def test_token_bucket_rate():
    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(1000, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        bucket.take(500)
    assert now[0] == pytest.approx(5.0)  # 5000 bytes at 1000/s, starting empty
    now[0] += 100  # idle: at most one second's worth is saved up
    start = now[0]
    bucket.take(3000)
    assert now[0] - start == pytest.approx(2.0)


def test_max_bytes_per_second_config(tmp_path):
    with FakeImapServer() as server:
        job = {"name": "j", "kind": "imap-copy",
               "source": {**server.job_endpoint(), "max_bytes_per_second": 2_000_000},
               "destination": server.job_endpoint()}
        loaded = cfg.load(write_config(tmp_path / "ok.toml", [job]))
        assert loaded.jobs[0].source.max_bytes_per_second == 2_000_000
        assert loaded.jobs[0].destination.max_bytes_per_second is None
        job["source"]["max_bytes_per_second"] = 10
        with pytest.raises(ConfigError, match="max_bytes_per_second = 10"):
            cfg.load(write_config(tmp_path / "bad.toml", [job]))
