"""`mailmigrate verify`: source and destination compared message by message, read-only.

Real Dovecot on both sides (Cyrus for one test); the copy is made by the real tool, then
the destination is damaged the way cutover mistakes and broken servers do it.
"""

from __future__ import annotations

# The Cyrus fixtures are imported by name, so test parameters "redefine" them.
# ruff: noqa: F811

import datetime as dt
import json
import random
import tracemalloc
from pathlib import Path

import pytest

from migrate import config as cfg
from migrate import verify
from tests.rig import mailgen
from tests.rig.courier import courier_account, courier_host  # noqa: F401
from tests.rig.cyrus import cyrus_account, cyrus_host  # noqa: F401
from tests.rig.jobs import imap_job, run, run_cli, write_config
from tests.rig.untouched import listing, untouched


def copied(old_account, new_account, tmp_path, msgs, **job_extra) -> tuple[Path, str]:
    """Fill the source, copy it with the real tool; the config and its state URL."""
    mailgen.fill(old_account, msgs)
    url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(tmp_path / "c.toml",
                        [imap_job("mig", old_account, new_account, **job_extra)], url)
    result = run(path)
    assert result.ok, (result.errors, result.warnings)
    return path, url


def verify_cli(path: Path, *args: str):
    proc = run_cli("verify", "-c", str(path), *args)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def verify_json(path: Path, *args: str) -> tuple[int, dict]:
    proc = verify_cli(path, "--json", *args)
    doc = json.loads(proc.stdout)
    return proc.returncode, doc


def problems(doc: dict, bucket: str) -> list[dict]:
    return [p for j in doc["jobs"] for p in j["problems"] if p["bucket"] == bucket]


def inbox(msgs):
    return [m for m in msgs if m.folder == "INBOX"]


def destination_uid(account, folder: str, body: bytes) -> int:
    client = mailgen.connect(account)
    try:
        client.select_folder(folder, readonly=True)
        data = client.fetch(client.search("ALL"), ["BODY.PEEK[]"])
        (uid,) = [u for u, item in data.items() if item[b"BODY[]"] == body]
        return uid
    finally:
        client.logout()


def replace_at(account, folder: str, uid: int, body: bytes, flags, date) -> None:
    """Expunge a message and append another in its place, as a broken copy would be."""
    client = mailgen.connect(account)
    try:
        client.select_folder(folder)
        client.delete_messages([uid])
        client.uid_expunge([uid])
        client.append(folder, body, flags=flags, msg_time=date)
    finally:
        client.logout()


def set_flags(account, folder: str, uid: int, flags) -> None:
    client = mailgen.connect(account)
    try:
        client.select_folder(folder)
        client.set_flags([uid], flags)
    finally:
        client.logout()


# --- IMAP -> IMAP ----------------------------------------------------------------------


def test_all_equal_after_a_run_exits_0_and_touches_nothing(old_account, new_account,
                                                           tmp_path):
    msgs = mailgen.realistic_mailbox(count=36, seed=41)
    path, url = copied(old_account, new_account, tmp_path, msgs,
                       folders={"exclude": ["INBOX.Entwürfe"]})
    expected = len([m for m in msgs if m.folder != "INBOX.Entwürfe"])
    with untouched(imap=[old_account, new_account], state_url=url):
        proc = verify_cli(path)
        code, doc = verify_json(path)
        quick = verify_cli(path, "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"mig: total (5 folders): all {expected} source messages are at the destination" \
        in proc.stdout
    assert "mig: folder 'INBOX.Sent Messages' → 'Sent': all" in proc.stdout  # special-use
    assert "folder 'INBOX.Entwürfe': excluded (matches exclude 'INBOX.Entwürfe')" \
        in proc.stdout
    assert quick.returncode == 0 and f"all {expected} source messages" in quick.stdout
    assert code == 0 and doc["schema"] == "mailmigrate.verify/1" and doc["ok"] is True
    assert doc["mode"] == "content" and doc["exit_code"] == 0
    assert doc["totals"] == {"source_messages": expected, "destination_messages": expected,
                             "equal": expected, "missing": 0, "differ": 0, "extra": 0,
                             "error": 0}
    (job,) = doc["jobs"]
    assert set(job) == {"name", "kind", "ok", "error", "totals", "folders", "excluded",
                        "problems"}
    assert job["excluded"] == [{"folder": "INBOX.Entwürfe",
                                "why": "matches exclude 'INBOX.Entwürfe'"}]
    assert {(f["source"], f["destination"]) for f in job["folders"]} == {
        ("INBOX", "INBOX"), ("INBOX.Sent Messages", "Sent"), ("INBOX.Archive", "Archive"),
        ("INBOX.Archive.2019", "Archive/2019"),
        ("INBOX.Projekte.Überblick", "Projekte/Überblick")}
    for f in job["folders"]:
        assert set(f) == {"source", "destination", "reason", "source_messages",
                          "destination_messages", "equal", "missing", "differ", "extra",
                          "error", "note", "destination_exists", "ok"}
        assert f["destination_exists"] is True


def test_without_a_state_database_it_is_neither_needed_nor_created(old_account, new_account,
                                                                   tmp_path):
    msgs = mailgen.realistic_mailbox(count=8, seed=42, big=False)
    copied(old_account, new_account, tmp_path, msgs)
    missing_db = tmp_path / "elsewhere" / "never.db"
    path = write_config(tmp_path / "other.toml", [imap_job("mig", old_account, new_account)],
                        f"sqlite:///{missing_db}")
    proc = verify_cli(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 8 source messages are at the destination" in proc.stdout
    assert not missing_db.exists() and not missing_db.parent.exists()


def test_message_removed_at_the_destination_is_missing(old_account, new_account, tmp_path):
    msgs = mailgen.realistic_mailbox(count=24, seed=43, big=False)
    path, url = copied(old_account, new_account, tmp_path, msgs)
    gone = inbox(msgs)[1]
    uid = destination_uid(new_account, "INBOX", gone.body)
    client = mailgen.connect(new_account)
    client.select_folder("INBOX")
    client.delete_messages([uid])
    client.uid_expunge([uid])
    client.logout()
    with untouched(imap=[old_account, new_account], state_url=url):
        proc = verify_cli(path)
        code, doc = verify_json(path)
        quick, quick_doc = verify_json(path, "--quick")
    assert proc.returncode == 1
    assert "mig: folder 'INBOX' → 'INBOX': 3 of 4 source messages at the destination " \
           "and identical; 1 missing" in proc.stdout
    assert "mig: total (6 folders): 23 of 24 source messages" in proc.stdout
    assert "missing: folder 'INBOX' UID" in proc.stdout and gone.message_id in proc.stdout
    assert code == 1 and doc["totals"]["missing"] == 1 and doc["totals"]["equal"] == 23
    (p,) = problems(doc, "missing")
    assert p["folder"] == "INBOX" and p["message_id"] == gone.message_id
    assert p["size"] == len(gone.body) and p["destination_uid"] is None
    assert quick == 1 and quick_doc["totals"]["missing"] == 1


def test_destination_folder_deleted_all_its_messages_are_missing(old_account, new_account,
                                                                  tmp_path):
    msgs = mailgen.realistic_mailbox(count=12, seed=52, big=False)
    path, url = copied(old_account, new_account, tmp_path, msgs)
    client = mailgen.connect(new_account)
    client.delete_folder("Archive/2019")
    client.logout()
    with untouched(imap=[old_account, new_account], state_url=url):
        proc = verify_cli(path)
    assert proc.returncode == 1
    assert "folder 'INBOX.Archive.2019' → 'Archive/2019': 0 of 2 source messages at " \
           "the destination and identical; 2 missing (the destination folder " \
           "'Archive/2019' does not exist)" in proc.stdout
    # said once, on the folder's line; the messages are listed by --json only
    assert proc.stdout.count("does not exist") == 1, proc.stdout
    assert "missing: folder 'INBOX.Archive.2019'" not in proc.stdout
    doc = json.loads(verify_cli(path, "--json").stdout)
    (folder,) = [f for f in doc["jobs"][0]["folders"] if f["source"] == "INBOX.Archive.2019"]
    assert not folder["destination_exists"] and not folder["ok"]
    assert sorted(p["source_uid"] for p in doc["jobs"][0]["problems"]
                  if p["folder"] == "INBOX.Archive.2019") == [1, 2]
    client = mailgen.connect(new_account)
    names = {n for _f, _d, n in client.list_folders()}
    client.logout()
    assert "Archive/2019" not in names and "Archive" in names  # not re-created by looking


def test_changed_flag_at_the_destination_differs_in_flags(old_account, new_account,
                                                          tmp_path):
    msgs = mailgen.realistic_mailbox(count=12, seed=44, big=False)
    path, url = copied(old_account, new_account, tmp_path, msgs)
    target = next(m for m in inbox(msgs) if "\\Flagged" not in m.flags)
    uid = destination_uid(new_account, "INBOX", target.body)
    set_flags(new_account, "INBOX", uid, list(target.flags) + ["\\Flagged", "$Changed"])
    with untouched(imap=[old_account, new_account], state_url=url):
        proc = verify_cli(path)
        code, doc = verify_json(path)
        quick, quick_doc = verify_json(path, "--quick")
    assert proc.returncode == 1 and "differs (flags): folder 'INBOX' UID" in proc.stdout
    (p,) = problems(doc, "differ")
    assert p["what"] == ["flags"] and p["destination_uid"] == uid
    source_side, destination_side = p["detail"].split(", destination ")
    assert "\\Flagged" not in source_side and "$Changed" not in source_side
    assert "\\Flagged" in destination_side and "$Changed" in destination_side
    assert code == 1 and doc["totals"]["differ"] == 1 and doc["totals"]["missing"] == 0
    assert quick == 1 and [p["what"] for p in problems(quick_doc, "differ")] == [["flags"]]


def test_copy_flagged_deleted_at_the_destination_differs(old_account, new_account, tmp_path):
    """A copy flagged \\Deleted is still there, but the next EXPUNGE removes it."""
    msgs = mailgen.realistic_mailbox(count=6, seed=44, big=False)
    path, url = copied(old_account, new_account, tmp_path, msgs)
    target = inbox(msgs)[0]
    uid = destination_uid(new_account, "INBOX", target.body)
    set_flags(new_account, "INBOX", uid, list(target.flags) + ["\\Deleted"])
    with untouched(imap=[old_account, new_account], state_url=url):
        code, doc = verify_json(path)
    assert code == 1
    (p,) = problems(doc, "differ")
    assert p["what"] == ["flags"] and p["destination_uid"] == uid
    assert "\\Deleted (the next EXPUNGE by any client removes the copy)" in p["detail"]


def test_altered_copy_differs_in_content(old_account, new_account, tmp_path):
    """Two copies replaced by altered ones with the same flags and date: one of the same
    size (one byte changed), one longer.  The full check finds both; --quick, reading no
    bodies, finds only the one whose size changed."""
    msgs = mailgen.realistic_mailbox(count=12, seed=45, big=False)
    path, url = copied(old_account, new_account, tmp_path, msgs)
    same_size, longer = [m for m in inbox(msgs) if m.message_id][:2]
    for m, altered in ((same_size, same_size.body.replace(b"alpha", b"ALPHA", 1)),
                       (longer, longer.body + b"appended line\r\n")):
        assert altered != m.body
        replace_at(new_account, "INBOX", destination_uid(new_account, "INBOX", m.body),
                   altered, m.flags, m.date)
    with untouched(imap=[old_account, new_account], state_url=url):
        proc = verify_cli(path)
        code, doc = verify_json(path)
        quick, quick_doc = verify_json(path, "--quick")
    assert proc.returncode == 1 and proc.stdout.count("differs (content)") == 2
    assert code == 1 and doc["totals"]["differ"] == 2 and doc["totals"]["extra"] == 0
    assert {p["message_id"] for p in problems(doc, "differ")} == {same_size.message_id,
                                                                   longer.message_id}
    assert all(p["what"] == ["content"] and "sha256" in p["detail"]
               for p in problems(doc, "differ"))
    assert quick == 1
    (p,) = problems(quick_doc, "differ")
    assert p["message_id"] == longer.message_id and p["what"] == ["content"]
    assert quick_doc["totals"]["equal"] == len(msgs) - 1


def test_changed_internaldate_differs(old_account, new_account, tmp_path):
    msgs = mailgen.realistic_mailbox(count=12, seed=46, big=False)
    path, url = copied(old_account, new_account, tmp_path, msgs)
    m = next(m for m in inbox(msgs) if m.message_id is None) if any(
        x.message_id is None for x in inbox(msgs)) else inbox(msgs)[0]
    replace_at(new_account, "INBOX", destination_uid(new_account, "INBOX", m.body), m.body,
               m.flags, m.date + dt.timedelta(hours=3))
    with untouched(imap=[old_account, new_account], state_url=url):
        code, doc = verify_json(path)
    assert code == 1
    (p,) = problems(doc, "differ")
    assert p["what"] == ["internaldate"] and "INTERNALDATE" in p["detail"]
    assert doc["totals"]["missing"] == 0 and doc["totals"]["extra"] == 0


def test_extra_message_at_the_destination_is_listed_but_not_a_failure(
        old_account, new_account, tmp_path):
    msgs = mailgen.realistic_mailbox(count=12, seed=47, big=False)
    path, url = copied(old_account, new_account, tmp_path, msgs)
    body, mid = mailgen.make_message(random.Random(1), 999)
    mailgen.fill(new_account, [mailgen.TestMessage("Archive", body, (), msgs[0].date, mid)])
    with untouched(imap=[old_account, new_account], state_url=url):
        proc = verify_cli(path)
        code, doc = verify_json(path)
    assert proc.returncode == 0, proc.stdout
    assert "all 12 source messages are at the destination; 1 extra at the destination" \
        in proc.stdout
    assert mid not in proc.stdout  # text counts extras; --json lists them
    folder_lines = [line for line in proc.stdout.splitlines() if ": folder '" in line]
    sources = [line.split("folder '")[1].split("'")[0] for line in folder_lines]
    assert sources[0] == "INBOX" and sources[1:] == sorted(sources[1:])  # stable order
    (p,) = problems(doc, "extra")
    assert p["destination"] == "Archive" and p["message_id"] == mid
    assert p["source_uid"] is None and p["folder"] == "INBOX.Archive"
    assert code == 0 and doc["totals"]["extra"] == 1


def test_duplicates_in_the_source_need_as_many_copies(old_account, new_account, tmp_path):
    msgs = mailgen.realistic_mailbox(count=6, seed=48, big=False)
    twice = inbox(msgs)[0]
    msgs.append(mailgen.TestMessage("INBOX", twice.body, twice.flags, twice.date,
                                    twice.message_id))
    path, url = copied(old_account, new_account, tmp_path, msgs)
    code, doc = verify_json(path)
    assert code == 0 and doc["totals"]["equal"] == 7, doc
    # one of the two identical copies goes: the other one does not count twice
    client = mailgen.connect(new_account)
    client.select_folder("INBOX")
    data = client.fetch(client.search("ALL"), ["BODY.PEEK[]"])
    dup_uids = sorted(u for u, item in data.items() if item[b"BODY[]"] == twice.body)
    assert len(dup_uids) == 2
    client.delete_messages(dup_uids[:1])
    client.uid_expunge(dup_uids[:1])
    client.logout()
    code, doc = verify_json(path)
    assert code == 1 and doc["totals"]["missing"] == 1 and doc["totals"]["equal"] == 6
    assert problems(doc, "missing")[0]["message_id"] == twice.message_id
    quick, quick_doc = verify_json(path, "--quick")
    assert quick == 1 and quick_doc["totals"]["missing"] == 1


def test_folders_mapped_into_one_are_compared_together(old_account, new_account, tmp_path):
    rng = random.Random(51)
    date = dt.datetime(2021, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
    msgs = []
    for i, folder in enumerate(["INBOX.A", "INBOX.A", "INBOX.B", "INBOX.B"]):
        body, mid = mailgen.make_message(rng, i)
        msgs.append(mailgen.TestMessage(folder, body, ("\\Seen",), date, mid))
    path, url = copied(old_account, new_account, tmp_path, msgs,
                       folders={"map": {"INBOX.A": "Merged", "INBOX.B": "Merged"}})
    code, doc = verify_json(path)
    assert code == 0 and doc["totals"]["equal"] == 4 and doc["totals"]["extra"] == 0, doc
    merged = {f["source"]: f for f in doc["jobs"][0]["folders"] if f["destination"] == "Merged"}
    assert {k: (f["source_messages"], f["equal"], f["reason"]) for k, f in merged.items()} \
        == {"INBOX.A": (2, 2, "map"), "INBOX.B": (2, 2, "map")}
    uid = destination_uid(new_account, "Merged", msgs[3].body)
    client = mailgen.connect(new_account)
    client.select_folder("Merged")
    client.delete_messages([uid])
    client.uid_expunge([uid])
    client.logout()
    code, doc = verify_json(path)
    assert code == 1
    (p,) = problems(doc, "missing")
    assert p["folder"] == "INBOX.B" and p["destination"] == "Merged"


def test_bad_config_and_unknown_job_exit_2(tmp_path, old_account, new_account):
    proc = verify_cli(tmp_path / "nope.toml")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    path = write_config(tmp_path / "c.toml", [imap_job("mig", old_account, new_account)])
    proc = verify_cli(path, "--job", "other")
    assert proc.returncode == 2 and "no job named 'other'" in proc.stderr
    assert "accounts entry" not in proc.stderr  # the config has none: no hint about them


def test_unreachable_destination_is_not_verified(old_account, tmp_path):
    job = imap_job("mig", old_account, old_account)
    job["destination"] = dict(job["destination"], port=1)
    path = write_config(tmp_path / "c.toml", [job])
    proc = verify_cli(path)
    assert proc.returncode == 1 and "mig: NOT VERIFIED:" in proc.stdout


# --- a large message: hashed in pieces ---------------------------------------------------


def test_large_message_is_hashed_with_bounded_memory(old_account, new_account, tmp_path):
    size = 20_000_000
    body, mid = mailgen.make_message(random.Random(5), 1, size=size, attachment=True)
    assert len(body) > size * 0.9
    date = dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    msg = mailgen.TestMessage("INBOX", body, ("\\Seen",), date, mid)
    mailgen.fill(old_account, [msg])
    altered = body[:-100] + b"X" + body[-99:]
    mailgen.fill(new_account, [mailgen.TestMessage("INBOX", altered, ("\\Seen",), date, mid)])
    del body, altered, msg
    path = write_config(tmp_path / "c.toml", [imap_job("mig", old_account, new_account)])
    config = cfg.load(path)
    tracemalloc.start()
    try:
        (verdict,) = verify.verify_jobs(config, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    inbox_verdict = next(f for f in verdict.folders if f.source == "INBOX")
    assert inbox_verdict.differ == 1, verify.verify_text(verdict)  # the last chunk differs
    assert verdict.problems[0].what == ["content"]
    assert peak < 6_000_000, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB message"


# --- Cyrus -------------------------------------------------------------------------------


def test_dovecot_to_cyrus(old_account, cyrus_account, tmp_path):
    # munge8bit (Cyrus' default) rewrites 8-bit headers: such copies really differ
    msgs = [m for m in mailgen.realistic_mailbox(count=24, seed=49, big=False)
            if m.body.split(b"\r\n\r\n", 1)[0].isascii()]
    path, url = copied(old_account, cyrus_account, tmp_path, msgs)
    with untouched(imap=[old_account, cyrus_account], state_url=url):
        proc = verify_cli(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"all {len(msgs)} source messages are at the destination" in proc.stdout
    target = next(m for m in inbox(msgs) if "\\Flagged" not in m.flags)
    set_flags(cyrus_account, "INBOX", destination_uid(cyrus_account, "INBOX", target.body),
              list(target.flags) + ["\\Flagged"])
    code, doc = verify_json(path)
    assert code == 1 and [p["what"] for p in problems(doc, "differ")] == [["flags"]]


def test_dovecot_to_courier_with_a_large_message(old_account, courier_account, tmp_path):
    """Courier: the 3 MB message is hashed by partial FETCH on both sides."""
    msgs = mailgen.realistic_mailbox(count=18, seed=53)
    assert max(len(m.body) for m in msgs) > verify.CHUNK
    path, url = copied(old_account, courier_account, tmp_path, msgs)
    with untouched(imap=[old_account, courier_account], state_url=url):
        proc = verify_cli(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"all {len(msgs)} source messages are at the destination" in proc.stdout
    big = max(msgs, key=lambda m: len(m.body))
    uid = destination_uid(courier_account, big.folder, big.body)
    replace_at(courier_account, big.folder, uid, big.body[:-3] + b"!\r\n", big.flags,
               big.date)
    code, doc = verify_json(path)
    assert code == 1
    (p,) = problems(doc, "differ")
    assert p["what"] == ["content"] and p["message_id"] == big.message_id


# --- POP3 -> Maildir ---------------------------------------------------------------------


def pop_job(account, archive: Path, name="archive") -> dict:
    return {"name": name, "kind": "pop3-archive", "source": account.endpoint_toml("pop3"),
            "archive": {"path": str(archive)}}


@pytest.fixture
def archived(old_account, tmp_path):
    msgs = inbox(mailgen.realistic_mailbox(count=60, seed=50, big=False))
    rng = random.Random(50)
    big, _ = mailgen.make_message(rng, 500, size=3_000_000, attachment=True)
    dot, _ = mailgen.make_message(rng, 501, lone_dot=True, eight_bit=True)
    msgs += [mailgen.TestMessage("INBOX", big, (), msgs[0].date),
             mailgen.TestMessage("INBOX", dot, (), msgs[0].date),
             mailgen.TestMessage("INBOX", msgs[0].body, (), msgs[0].date)]  # a duplicate
    mailgen.fill(old_account, msgs)
    archive = tmp_path / "arch"
    url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(tmp_path / "pop.toml", [pop_job(old_account, archive)], url)
    result = run(path)
    assert result.ok, result.errors
    return path, url, archive, msgs


def archive_files(archive: Path) -> list[Path]:
    return sorted(p for sub in ("new", "cur") for p in (archive / sub).iterdir())


def test_pop3_archive_complete(archived, old_account):
    path, url, archive, msgs = archived
    with untouched(imap=[old_account], pop3=[old_account], state_url=url, paths=[archive]):
        proc = verify_cli(path)
        code, doc = verify_json(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"archive: POP3 mailbox → archive {archive}: all {len(msgs)} source messages " \
           "are at the destination" in proc.stdout
    assert code == 0 and doc["jobs"][0]["totals"]["equal"] == len(msgs)
    assert doc["jobs"][0]["totals"]["archived_not_on_server"] == 0


def test_pop3_archive_file_removed_altered_and_mail_deleted_from_server(archived,
                                                                        old_account):
    path, url, archive, msgs = archived
    first = msgs[0].body  # on the server twice; the first of them is deleted below
    removed, altered = [p for p in archive_files(archive) if p.read_bytes() != first][:2]
    removed_size = removed.stat().st_size
    removed.unlink()
    altered.write_bytes(altered.read_bytes().replace(b"Subject:", b"Subject: [x]", 1))
    mailgen.expunge_first(old_account, "INBOX", 1)  # deleted on the server after archiving
    with untouched(imap=[old_account], pop3=[old_account], state_url=url, paths=[archive]):
        proc = verify_cli(path)
        code, doc = verify_json(path)
    assert proc.returncode == 1, proc.stdout
    assert code == 1 and doc["jobs"][0]["totals"] == {
        "source_messages": len(msgs) - 1, "destination_messages": len(msgs) - 1,
        "equal": len(msgs) - 3, "missing": 1, "differ": 1, "extra": 0, "error": 0,
        "archived_not_on_server": 1}
    (p,) = problems(doc, "differ")
    assert p["what"] == ["content"] and p["destination_uid"] == f"new/{altered.name}"
    (p,) = problems(doc, "missing")
    assert p["source_uid"] and p["size"] == removed_size  # its UIDL and size
    assert "1 missing, 1 differ; 1 archived, no longer on the server" in proc.stdout



# --- output --------------------------------------------------------------------------------


def test_text_lists_at_most_20_problems_and_json_all():
    folder = verify.FolderVerdict("INBOX", "INBOX", "name", source_messages=30,
                                  destination_messages=5, equal=5, missing=25)
    job = verify.JobVerdict("mig", "imap-copy", folders=[folder], problems=[
        verify.Problem("missing", "INBOX", "INBOX", uid, None, f"<m{uid}@x>", 100)
        for uid in range(1, 26)])
    lines = verify.verify_text(job)
    assert lines[0] == ("mig: folder 'INBOX' → 'INBOX': 5 of 30 source messages at the "
                        "destination and identical; 25 missing")
    assert lines[1].startswith("mig: total (1 folder): 5 of 30")
    assert sum("missing: folder 'INBOX' UID" in line for line in lines) == 20
    assert lines[-1] == "mig:   … and 5 more (--json lists all)"
    doc = verify.verify_document([job], False, "2026-01-01T00:00:00+00:00")
    assert len(doc["jobs"][0]["problems"]) == 25 and doc["exit_code"] == 1
    assert doc["totals"]["missing"] == 25 and doc["ok"] is False


def test_pop3_archive_from_courier_with_8bit_headers(courier_account, tmp_path):
    """Courier's POP3 sends 8-bit headers as stored only in UTF8 mode, which verify
    switches on like run does: the archive still compares equal."""
    rng = random.Random(54)
    date = dt.datetime(2019, 4, 5, 6, 7, 8, tzinfo=dt.timezone.utc)
    msgs = []
    for i, kwargs in enumerate([{"eight_bit": True, "lone_dot": True}, {},
                                {"size": 2_500_000, "attachment": True}]):
        body, mid = mailgen.make_message(rng, i, **kwargs)
        msgs.append(mailgen.TestMessage("INBOX", body, (), date, mid))
    mailgen.fill(courier_account, msgs)
    archive = tmp_path / "arch"
    url = f"sqlite:///{tmp_path / 'state.db'}"
    path = write_config(tmp_path / "pop.toml", [pop_job(courier_account, archive)], url)
    assert run(path).ok
    with untouched(imap=[courier_account], pop3=[courier_account], state_url=url,
                   paths=[archive]):
        proc = verify_cli(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 3 source messages are at the destination" in proc.stdout


def test_check_report_verify_with_cyrus_on_either_side(old_account, new_account,  # noqa: F811
                                                       cyrus_host, cyrus_account, tmp_path):
    """Dovecot → Cyrus and Cyrus → Dovecot, half copied, plus one message another tool put
    at the destination: the three read-only commands change nothing on either server or
    in the state database, and agree with each other (report's "already there" is
    verify's "equal", its "to copy" verify's "missing", check's "to copy" report's)."""
    msgs = [m for m in mailgen.realistic_mailbox(count=16, big=False, seed=57)
            if m.body.split(b"\r\n\r\n", 1)[0].isascii()]  # Cyrus munges 8-bit headers
    cyrus_source = cyrus_host.add_user(f"src-{cyrus_account.username}", "cy-source")
    mailgen.fill(old_account, msgs)
    mailgen.fill(cyrus_source, mailgen.realistic_mailbox(separator="/", prefix="",
                                                         count=10, big=False, seed=58))
    url = f"sqlite:///{tmp_path / 'state.db'}"
    jobs = [imap_job("to-cyrus", old_account, cyrus_account),
            imap_job("from-cyrus", cyrus_source, new_account)]
    config = write_config(tmp_path / "c.toml", jobs, url)
    for job in jobs:  # the archive folders copied, the rest not yet
        assert run(write_config(tmp_path / f"{job['name']}.toml", [
            {**job, "folders": {"include": ["*Archive*"]}}], url)).ok
    inbox = next(m for m in msgs if m.folder == "INBOX" and m.message_id)
    mailgen.fill(cyrus_account, [mailgen.TestMessage("INBOX", inbox.body, (), inbox.date)])
    accounts = [old_account, cyrus_account, cyrus_source, new_account]
    # Right after the run created 'Archive/2019' and 'Archive' on Dovecot, its first LIST
    # shows 'Archive' as \Noselect, the next one as it is (Dovecot's mailbox list index
    # catching up; seen with two listings in a row and no command between them): one
    # listing first, so the witness compares what the commands did, not that.
    listing(imap=accounts)
    with untouched(imap=accounts, state_url=url):
        checked = run_cli("check", "-c", str(config), "--json")
        reported = run_cli("report", "-c", str(config), "--format", "json", "--no-sample")
        verified = verify_cli(config, "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert reported.returncode == 0, reported.stderr
    assert verified.returncode == 1  # the rest is still to copy
    report = {j["name"]: j for j in json.loads(reported.stdout)["jobs"]}
    verdict = {j["name"]: j for j in json.loads(verified.stdout)["jobs"]}
    for job in json.loads(checked.stdout)["jobs"]:
        t = report[job["name"]]["totals"]
        v = verdict[job["name"]]["totals"]
        assert t["already_there"] > 0 and t["to_copy"] > 0, (job["name"], t)
        assert (v["equal"], v["missing"], v["differ"]) == \
            (t["already_there"], t["to_copy"], 0), (job["name"], t, v)
        (source,) = [e for e in job["endpoints"] if e["role"] == "source"]
        (to_copy,) = [c for c in source["checks"] if c["name"] == "to copy"]
        assert f"{t['already_there']} already at the destination; {t['to_copy']} messages" \
            in to_copy["detail"], (to_copy, t)
    assert report["to-cyrus"]["folders"][0]["source"] == "INBOX"
    assert report["to-cyrus"]["folders"][0]["already_there"] == 1  # by Message-ID
    # several jobs: the text ends with which of them need a look
    assert verify_cli(config).stdout.splitlines()[-1] == \
        "verify: 0 of 2 jobs complete; NOT complete: to-cyrus, from-cyrus (see above)"
    assert run_cli("check", "-c", str(config)).stdout.splitlines()[-1] == \
        "check: all 2 jobs ready to run"
