"""imap-copy against servers that behave differently (the scriptable fake IMAP server, for
what no real server in the rig does on demand): issue #7 items 3, 8, 9, 11, 12."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from tests.rig import mailgen
from tests.rig.fakeimap import FakeImapServer
from tests.rig.jobs import run, write_config

DATE = dt.datetime(2019, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))


@pytest.fixture
def pair():
    with FakeImapServer() as source, FakeImapServer() as destination:
        yield source, destination


def fill(source, count=8, seed=90, flags=("\\Seen", "project-x")):
    rng = random.Random(seed)
    bodies = [mailgen.make_message(rng, i, eight_bit=(i == 1))[0] for i in range(count)]
    for b in bodies:
        source.add_message("INBOX", b, flags, DATE)
    return bodies


def config(tmp_path, source, destination, name="c.toml", **extra):
    job = {"name": "odd", "kind": "imap-copy", "source": source.job_endpoint(),
           "destination": destination.job_endpoint(), **extra}
    return write_config(tmp_path / name, [job])


def bodies_at(server, folder="INBOX"):
    return sorted(b for _u, b, _f, _d in server.messages(folder))


# --- 3c. verification covers flags and INTERNALDATE ----------------------------------------

def test_destination_that_drops_flags_and_dates_is_not_reported_as_success(pair, tmp_path):
    source, destination = pair
    destination.drop_flags_and_dates_on_append = True  # like GNU Mailutils imap4d
    bodies = fill(source)
    path = config(tmp_path, source, destination, delete_after_verify=True)
    result = run(path)
    assert not result.ok and result.counts.get("quarantined") == len(bodies)
    assert all("did not keep the date" in e for e in result.errors if "quarantined" in e)
    assert bodies_at(source) == sorted(bodies)  # nothing deleted from the source
    again = run(path)
    assert again.counts.get("copied", 0) == 0
    assert bodies_at(destination) == sorted(bodies)  # one copy each, never a second


def test_refused_keyword_is_left_out_and_reported(pair, tmp_path):
    source, destination = pair
    destination.rejected_keywords = {"project-x"}  # "BAD Unrecognized flag"
    bodies = fill(source)
    result = run(config(tmp_path, source, destination))
    assert result.ok, result.errors
    assert result.counts["copied"] == len(bodies)
    assert any("cannot keep these flags" in w and "project-x" in w for w in result.warnings)
    assert {f for _u, _b, f, _d in destination.messages("INBOX")} == {frozenset({"\\Seen"})}


def test_permanentflags_without_keywords(pair, tmp_path):
    source, destination = pair
    destination.permanentflags = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted",
                                  "\\Draft"]
    bodies = fill(source)
    result = run(config(tmp_path, source, destination))
    assert result.ok, result.errors
    assert result.counts["copied"] == len(bodies)
    assert any("project-x" in w for w in result.warnings)


# --- 8. Courier: appends invisible until NOOP, quoted HEADER.FIELDS -------------------------

def test_courier_like_destination_and_lost_state_database(pair, tmp_path):
    source, destination = pair
    for server in pair:
        server.append_invisible_until_noop = True
        server.quote_header_field_names = True
    bodies = fill(source)
    path = config(tmp_path, source, destination)
    result = run(path)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(bodies)
    (tmp_path / "mailmigrate.db").unlink()  # the state database is lost
    again = run(path)
    assert again.ok, again.errors
    assert again.counts.get("copied", 0) == 0 and again.counts["skipped"] == len(bodies)
    assert bodies_at(destination) == sorted(bodies)


# --- 9. inexact sizes, altering destinations ------------------------------------------------

def test_source_with_inexact_sizes_copies_once_and_deletes(pair, tmp_path):
    source, destination = pair
    source.inexact_size = 3
    bodies = fill(source)
    path = config(tmp_path, source, destination)
    assert run(path).counts["copied"] == len(bodies)
    (tmp_path / "mailmigrate.db").unlink()
    again = run(config(tmp_path, source, destination, delete_after_verify=True))
    assert again.ok, again.errors
    assert again.counts.get("copied", 0) == 0 and again.counts["deleted"] == len(bodies)
    assert bodies_at(destination) == sorted(bodies) and source.messages("INBOX") == []


def test_destination_that_alters_messages_gets_one_copy_and_a_quarantine(pair, tmp_path):
    source, destination = pair
    destination.alter_on_append = lambda body: body.replace(b"Subject:", b"Subject: [ext]")
    bodies = fill(source)
    path = config(tmp_path, source, destination, delete_after_verify=True)
    for _ in range(3):
        result = run(path)
        assert not result.ok or result.counts.get("copied", 0) == 0
    assert len(destination.messages("INBOX")) == len(bodies)  # at most one copy each
    assert bodies_at(source) == sorted(bodies)
    assert any("quarantined by earlier runs" in w for w in result.warnings)


# --- 11. one bad message never blocks the rest ---------------------------------------------

@pytest.mark.parametrize("misbehaviour", ["bye", "no", "refused", "empty"])
def test_one_bad_message_is_isolated(misbehaviour, pair, tmp_path):
    source, destination = pair
    bodies = fill(source)
    bad_uid = 3
    if misbehaviour == "bye":
        source.bye_on_fetch_uids = {bad_uid}
    elif misbehaviour == "no":
        source.no_on_fetch_uids = {bad_uid}
    elif misbehaviour == "refused":
        bad_body = bodies[bad_uid - 1]
        destination.reject_append = lambda body, flags: (
            "[TOOBIG] Message too large" if body == bad_body else None)
    else:
        bad_uid = source.add_message("INBOX", b"", (), DATE)
    result = run(config(tmp_path, source, destination))
    good = [b for i, b in enumerate(bodies, 1) if i != bad_uid]
    assert set(good) <= set(bodies_at(destination))
    assert result.counts["copied"] >= len(good)
    if misbehaviour != "empty":
        assert not result.ok
        assert any(f"message UID {bad_uid} " in e for e in result.errors), result.errors


# --- 12. servers refusing STORE / EXPUNGE ------------------------------------------------------

def test_refused_store_and_expunge_are_errors_not_tracebacks(pair, tmp_path):
    source, destination = pair
    bodies = fill(source)
    path = config(tmp_path, source, destination, delete_after_verify=True)

    def refuse(session, tag, command, args):
        if command.upper() in ("UID STORE", "UID EXPUNGE", "STORE", "EXPUNGE"):
            return "NO [NOPERM] Permission denied"
        return None

    source.on_command = refuse
    result = run(path)
    assert not result.ok
    assert any("refused to delete" in e for e in result.errors), result.errors
    assert bodies_at(source) == sorted(bodies)  # kept
    source.on_command = None
    again = run(path)
    assert again.ok, again.errors
    assert again.counts["deleted"] == len(bodies) and source.messages("INBOX") == []
    assert bodies_at(destination) == sorted(bodies)


def test_refused_keyword_does_not_block_deletion_in_a_later_run(pair, tmp_path):
    """A new run's sessions do not know the keyword was refused: the STORE before
    deleting learns it again instead of failing the folder."""
    source, destination = pair
    destination.rejected_keywords = {"project-x"}
    bodies = fill(source)
    assert run(config(tmp_path, source, destination)).ok
    result = run(config(tmp_path, source, destination, "d.toml", delete_after_verify=True))
    assert result.ok, result.errors
    assert result.counts["deleted"] == len(bodies) and source.messages("INBOX") == []
    assert bodies_at(destination) == sorted(bodies)


def test_over_quota_runs_do_not_quarantine_messages(pair, tmp_path):
    """Cron keeps running while the destination is full: once the quota is raised, every
    message is copied - none was quarantined for the destination's fault."""
    source, destination = pair
    destination.reject_append = lambda body, flags: "[OVERQUOTA] Quota exceeded"
    bodies = fill(source)
    path = config(tmp_path, source, destination)
    for _ in range(4):
        result = run(path)
        assert not result.ok and not result.counts.get("quarantined")
    destination.reject_append = None
    result = run(path)
    assert result.ok, result.errors
    assert result.counts["copied"] == len(bodies)
    assert bodies_at(destination) == sorted(bodies)
