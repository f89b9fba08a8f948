"""`mailmigrate report` and `run --dry-run`: numbers, renderings, read-only, exit codes.

Against the real Dovecot servers of conftest (old host: '.' + "INBOX." prefix; new
host: '/' with special-use folders).  The HTML page is checked in headless Chromium.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from migrate import config as cfg
from migrate.report import build_report, render
from migrate.results import size_text
from tests.rig import mailgen
from tests.rig.courier import courier_account, courier_host  # noqa: F401
from tests.rig.cyrus import cyrus_account, cyrus_host  # noqa: F401
from tests.rig.jobs import imap_job, run, run_cli, write_config
from tests.rig.untouched import pop3_listing, untouched

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "docs" / "report.schema.json"
CHROMIUM = "/usr/bin/chromium"


def report(path: Path, *names: str) -> dict:
    return build_report(cfg.load(path), list(names) or None)


def folders(doc: dict, job: str = "alice") -> dict[str, dict]:
    (j,) = [j for j in doc["jobs"] if j["name"] == job]
    return {f["source"]: f for f in j["folders"]}


def job_of(doc: dict, name: str = "alice") -> dict:
    (j,) = [j for j in doc["jobs"] if j["name"] == name]
    return j


def state_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mailmigrate.db'}"


@pytest.fixture
def filled(old_account):
    msgs = mailgen.realistic_mailbox(count=30, big=False, seed=91)
    mailgen.fill(old_account, msgs)
    return msgs


def test_numbers_before_any_run(filled, old_account, new_account, tmp_path):
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    doc = report(path)
    assert doc["schema"] == "mailmigrate.report/1" and not doc["database_exists"]
    j = job_of(doc)
    assert j["planned"] and j["error"] is None, j
    by = folders(doc)
    expected: dict[str, list] = {}
    for m in filled:
        expected.setdefault(m.folder, []).append(m)
    assert set(by) == set(expected)
    for name, msgs in expected.items():
        f = by[name]
        assert f["source_messages"] == len(msgs)
        assert f["source_bytes"] == sum(len(m.body) for m in msgs)
        assert f["to_copy"] == len(msgs) and f["already_there"] == 0
        assert f["to_copy_bytes"] == f["source_bytes"]
    # where each goes, and why
    assert (by["INBOX"]["destination"], by["INBOX"]["action"]) == ("INBOX", "existing")
    assert (by["INBOX.Sent Messages"]["destination"], by["INBOX.Sent Messages"]["why"]) == \
        ("Sent", "special-use \\Sent")
    assert by["INBOX.Archive.2019"]["destination"] == "Archive/2019"
    assert by["INBOX.Archive.2019"]["action"] == "create"
    t = j["totals"]
    assert t["source_messages"] == t["to_copy"] == len(filled)
    assert t["to_copy_bytes"] == sum(len(m.body) for m in filled)
    assert doc["totals"]["to_copy"] == len(filled)
    # the estimate: measured, labelled as one
    assert j["estimate"]["seconds"] > 0 and j["estimate"]["sample_messages"] >= 1
    assert "estimate" in j["estimate"]["method"]
    assert [m["size"] for m in j["largest"]] == sorted(
        (len(m.body) for m in filled), reverse=True)[:5]


def test_after_a_partial_run_with_duplicates_and_changed_flags(filled, old_account,
                                                               new_account, tmp_path):
    inbox = [m for m in filled if m.folder == "INBOX"]
    # two INBOX messages are at the destination already (another tool copied them)
    mailgen.fill(new_account, [mailgen.TestMessage("INBOX", m.body, m.flags, m.date)
                               for m in inbox[:2] if m.message_id])
    path = write_config(tmp_path / "c.toml", [imap_job(
        "alice", old_account, new_account, folders={"include": ["INBOX.Archive*"]})])
    assert run(path).ok  # the archive folders are copied
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    client = mailgen.connect(old_account)
    client.select_folder("INBOX.Archive")
    client.add_flags(client.search("ALL")[:1], ["\\Flagged"])
    client.logout()
    doc = report(path)
    by = folders(doc)
    archive = [m for m in filled if m.folder == "INBOX.Archive"]
    assert by["INBOX.Archive"]["already_there"] == len(archive)
    assert by["INBOX.Archive"]["to_copy"] == 0 and by["INBOX.Archive"]["flags_to_update"] == 1
    dupes = sum(1 for m in inbox[:2] if m.message_id)
    assert dupes and by["INBOX"]["already_there"] == dupes
    assert by["INBOX"]["to_copy"] == len(inbox) - dupes
    assert by["INBOX"]["to_copy_bytes"] == sum(len(m.body) for m in inbox) - sum(
        len(m.body) for m in inbox[:2] if m.message_id)
    t = job_of(doc)["totals"]
    assert t["already_there"] + t["to_copy"] == t["source_messages"] == len(filled)
    # what the report promised is what the run does
    result = run(path)
    assert result.ok, result.errors
    assert result.counts.get("copied", 0) == t["to_copy"]
    assert result.counts.get("flags_updated", 0) == 1


def test_excluded_folders_say_which_rule(old_account, new_account, tmp_path):
    msgs = [mailgen.TestMessage(f, mailgen.make_message(__import__("random").Random(i), i)[0],
                                (), dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc))
            for i, f in enumerate(["INBOX", "INBOX.Spam", "INBOX.Work", "INBOX.work",
                                   "INBOX.Keep"])]
    mailgen.fill(old_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job(
        "alice", old_account, new_account,
        folders={"include": ["INBOX", "INBOX.Spam", "INBOX.Work", "INBOX.work"],
                 "exclude": ["INBOX.Spam"]})])
    doc = report(path)
    j = job_of(doc)
    rules = {e["source"]: e["rule"] for e in j["excluded"]}
    assert rules["INBOX.Spam"] == "exclude 'INBOX.Spam'"
    assert rules["INBOX.Keep"].startswith("not matched by include")
    for name in ("INBOX.Work", "INBOX.work"):
        assert rules[name].startswith("refused: folders ") and "would all be copied into" \
            in rules[name]
    assert set(folders(doc)) == {"INBOX"}
    assert any("refusing to merge them silently" in w for w in j["warnings"])
    out = render(doc, "text")
    assert "INBOX.Spam: exclude 'INBOX.Spam'" in out


def test_quarantined_and_vanished_from_earlier_runs(filled, old_account, new_account,
                                                    tmp_path):
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    assert run(path).ok
    engine = create_engine(state_url(tmp_path))
    with engine.begin() as conn:
        conn.execute(text(
            "UPDATE messages SET state = 'quarantined', last_error = 'the destination "
            "alters it' WHERE id = (SELECT m.id FROM messages m JOIN folders f ON "
            "m.folder_id = f.id WHERE f.source_name = 'INBOX' ORDER BY m.source_uid LIMIT 1)"))
        conn.execute(text(
            "UPDATE messages SET state = 'failed', last_error = 'x' WHERE id = (SELECT m.id "
            "FROM messages m JOIN folders f ON m.folder_id = f.id WHERE f.source_name = "
            "'INBOX' ORDER BY m.source_uid LIMIT 1 OFFSET 1)"))
    engine.dispose()
    mailgen.expunge_first(old_account, "INBOX.Archive", 2)
    doc = report(path)
    by = folders(doc)
    inbox = by["INBOX"]
    assert inbox["quarantined"] == 1 and inbox["failed"] == 1
    # the failed one's copy is still at the destination: a run checks it, copies nothing
    assert inbox["already_there"] == inbox["source_messages"] - 1 and inbox["to_copy"] == 0
    assert by["INBOX.Archive"]["vanished"] == 2
    warnings = job_of(doc)["warnings"]
    assert any("1 message quarantined by earlier runs" in w and "the destination alters it"
               in w for w in warnings), warnings
    assert any("2 messages vanished from the source" in w for w in warnings), warnings
    t = doc["totals"]
    assert (t["quarantined"], t["failed"], t["vanished"]) == (1, 1, 2)


def test_destination_quota_too_small_is_a_warning(filled, old_account, new_host, tmp_path):
    small = new_host.add_user(f"report-quota-{os.getpid()}@new.test", "pw-q",
                              quota_rule="*:storage=20K")
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, small)])
    j = job_of(report(path))
    assert j["quota"]["limit_bytes"] == 20 * 1024
    assert any("the destination is short of room" in w for w in j["warnings"]), j["warnings"]
    assert any("over quota" in r["reason"] for r in j["destination_refuses"])


def pop_job(account, archive: Path, **extra) -> dict:
    job = {"name": "alice", "kind": "pop3-archive", "source": account.endpoint_toml("pop3"),
           "archive": {"path": str(archive)}}
    job.update(extra)
    return job


def test_pop3_archive_with_leave_on_server_days(filled, old_account, tmp_path):
    inbox = [m for m in filled if m.folder == "INBOX"]
    path = write_config(tmp_path / "c.toml", [pop_job(old_account, tmp_path / "arch",
                                                      leave_on_server_days=7)])
    before = job_of(report(path))
    (f,) = before["folders"]
    assert (f["source_messages"], f["to_copy"], f["to_delete"]) == (len(inbox), len(inbox), 0)
    assert f["source_bytes"] == sum(len(m.body) for m in inbox)
    assert before["estimate"]["seconds"] > 0
    assert run(path).ok
    # three messages were archived ten days ago, the others today
    engine = create_engine(state_url(tmp_path))
    old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(text("UPDATE messages SET verified_at = :t WHERE id IN (SELECT id FROM "
                          "messages ORDER BY id LIMIT 3)"), {"t": old})
    engine.dispose()
    mailgen.fill(old_account, [mailgen.TestMessage("INBOX", m.body, (), m.date)
                               for m in filled[1:3]])
    after = job_of(report(path))
    (f,) = after["folders"]
    assert f["already_there"] == len(inbox) and f["to_copy"] == 2
    assert f["to_delete"] == 3 and after["totals"]["to_delete"] == 3
    assert "leave_on_server_days = 7: 3 messages" in render({"jobs": [after], **_wrap()},
                                                          "text")


def _wrap() -> dict:
    return {"schema": "mailmigrate.report/1", "generated_at": "x", "config": "c",
            "state_database": "s", "database_exists": True,
            "totals": {"jobs": 1, "jobs_not_planned": 0, "estimated_seconds": None,
                       **{k: 0 for k in ("source_messages", "source_bytes", "to_copy",
                                         "to_copy_bytes", "already_there", "flags_to_update",
                                         "to_delete", "failed", "quarantined")}}}


def test_report_and_dry_run_are_read_only(filled, old_account, new_account, tmp_path):
    pop_arch = tmp_path / "arch"
    shared = f"sqlite:///{tmp_path / 'imap.db'}"
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account,
                                                       delete_after_verify=True)], shared)
    # a first run of the IMAP job, INBOX only, so there is state to read (and a binding)
    half = write_config(tmp_path / "half.toml", [imap_job(
        "alice", old_account, new_account, folders={"include": ["INBOX"]})], shared)
    assert run(half).ok
    # a POP3 job on the mailbox bound to IMAP: a run would be refused
    bound = write_config(tmp_path / "bound.toml", [pop_job(old_account, pop_arch)], shared)
    pop_path = write_config(tmp_path / "pop.toml", [pop_job(old_account, pop_arch,
                                                            leave_on_server_days=0)],
                            state_url=f"sqlite:///{tmp_path / 'pop.db'}")
    assert run(pop_path).ok
    mailgen.fill(old_account, [mailgen.TestMessage("INBOX", m.body, (), m.date)
                               for m in filled[:2]])  # new, unread: \Recent, no \Seen
    with untouched(imap=[old_account, new_account], state_url=shared, paths=[pop_arch]):
        for fmt in ("text", "json", "html"):
            proc = run_cli("report", "-c", str(path), "--format", fmt)
            assert proc.returncode == 0, proc.stderr
        assert run_cli("run", "-c", str(path), "--dry-run").returncode == 0
    # Dovecot clears \Recent when a POP3 session opens the mailbox - any POP3 client's,
    # the witness's own too; once cleared, the listings must stay the same
    pop3_listing(old_account)
    for state, config_path in ((shared, bound), (f"sqlite:///{tmp_path / 'pop.db'}",
                                                 pop_path)):
        with untouched(imap=[old_account], pop3=[old_account], state_url=state,
                       paths=[pop_arch]):
            proc = run_cli("report", "-c", str(config_path))
            assert proc.returncode == 0, proc.stderr  # the report says so; it is not refused
            dry = run_cli("run", "-c", str(config_path), "--dry-run")
        if config_path == bound:
            assert "warning: a run would be refused: job 'alice' would use POP3" in proc.stdout
            assert dry.returncode == 2 and "bound to IMAP" in dry.stdout
        else:
            assert "to delete" in proc.stdout and dry.returncode == 0, dry.stderr


def test_text_is_stable_inbox_first_and_dry_run_prints_it(filled, old_account, new_account,
                                                          tmp_path):
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    first = run_cli("report", "-c", str(path), "--no-sample")
    assert first.returncode == 0, first.stderr
    lines = [ln.strip() for ln in first.stdout.splitlines()
             if " → " in ln and not ln.strip().startswith("folders")]
    assert lines[0].startswith("INBOX → INBOX (existing, same name)")
    assert lines[1:] == sorted(lines[1:]) and len(lines) == 6
    again = run_cli("report", "-c", str(path), "--no-sample")
    dry = run_cli("run", "-c", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr

    def body(out: str) -> list[str]:  # all but the time stamp and the measured estimate
        return [ln for ln in out.splitlines()[1:] if "estimated duration" not in ln]
    assert body(again.stdout) == body(first.stdout)
    assert body(dry.stdout) == body(first.stdout)
    assert "estimated duration: " in dry.stdout and "(measured: read " in dry.stdout
    assert list(tmp_path.glob("mailmigrate.db*")) == []  # no state database created


def test_output_file_and_exit_codes(filled, old_account, new_account, tmp_path):
    path = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)])
    out = tmp_path / "r.json"
    proc = run_cli("report", "-c", str(path), "--format", "json", "-o", str(out))
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr  # work to do: still 0
    assert json.loads(out.read_text())["totals"]["to_copy"] == len(filled)
    # a bad config: 2, no traceback
    bad = tmp_path / "bad.toml"
    bad.write_text("[[jobs]]\nname = 1\n")
    proc = run_cli("report", "-c", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert run_cli("report", "-c", str(tmp_path / "missing.toml")).returncode == 2
    # a job that cannot be planned (wrong password): 1, the error in the report, the
    # other job planned all the same
    wrong = dict(imap_job("bob", old_account, new_account))
    wrong["source"] = {**wrong["source"], "password": "wrong"}
    path2 = write_config(tmp_path / "two.toml", [imap_job("alice", old_account, new_account),
                                                 wrong])
    proc = run_cli("report", "-c", str(path2), "--format", "json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    bob = job_of(doc, "bob")
    assert not bob["planned"] and "login" in bob["error"] and "failed" in bob["error"]
    assert job_of(doc, "alice")["planned"] and doc["totals"]["jobs_not_planned"] == 1
    assert "mailmigrate: error: bob: " in proc.stderr
    text_proc = run_cli("report", "-c", str(path2))
    text_out = text_proc.stdout
    assert "NOT PLANNED: IMAP login as" in text_out
    assert "mailmigrate: error" not in text_proc.stderr  # said once, in the text
    assert "overall: 2 jobs, 1 of them NOT PLANNED (see above, not counted here); the " \
           "others: " in text_out, text_out
    html_out = run_cli("report", "-c", str(path2), "--format", "html", "--no-sample").stdout
    assert "1 of 2 jobs NOT PLANNED (see above): not counted in these totals" in html_out
    assert '<td class="bad">NOT PLANNED</td>' in html_out
    unwritable = run_cli("report", "-c", str(path), "-o", str(tmp_path / "no" / "dir.txt"))
    assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr


# --- the JSON schema ------------------------------------------------------------------
# A small validator for the part of JSON Schema that docs/report.schema.json uses (type,
# const, enum, properties, required, additionalProperties, items, minimum): the project
# needs no jsonschema dependency for one test, and this fails on exactly what matters.

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}


def schema_errors(value, schema: dict, where: str = "$") -> list[str]:
    errors = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(isinstance(value, _TYPES[t]) and not (
            t in ("integer", "number") and isinstance(value, bool)) for t in types)
        if not ok:
            return [f"{where}: {value!r} is not of type {types}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        errors.append(f"{where}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: {key!r} is missing")
        for key, item in value.items():
            if key in props:
                errors += schema_errors(item, props[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: {key!r} is not in the schema")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


def test_the_validator_catches_what_it_should():
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema_errors({"schema": "mailmigrate.report/2"}, schema)
    doc = json.loads(render(_wrap() | {"jobs": [], "totals": _wrap()["totals"]}, "json"))
    assert any("'already_there_bytes' is missing" in e for e in schema_errors(doc, schema))


def test_json_documents_match_the_schema(filled, old_account, new_account, old_host,
                                         tmp_path):
    schema = json.loads(SCHEMA_FILE.read_text())
    carol = old_host.add_user(f"report-carol-{os.getpid()}@old.test", "pw-carol")
    mailgen.fill(carol, filled[:3])
    wrong = dict(imap_job("bob", carol, new_account))
    wrong["source"] = {**wrong["source"], "username": f"nobody-{os.getpid()}@old.test"}
    path = write_config(tmp_path / "c.toml", [
        imap_job("alice", old_account, new_account, delete_after_verify=True),
        pop_job(carol, tmp_path / "arch", name="carol-pop"), wrong])
    proc = run_cli("report", "-c", str(path), "--format", "json")
    assert proc.returncode == 1, proc.stderr  # bob cannot log in
    doc = json.loads(proc.stdout)
    assert schema_errors(doc, schema) == []
    assert [j["kind"] for j in doc["jobs"]] == ["imap-copy", "pop3-archive", "imap-copy"]
    # run --dry-run --json prints the same document
    dry = json.loads(run_cli("run", "-c", str(path), "--dry-run", "--json").stdout)
    assert schema_errors(dry, schema) == []
    assert [j["totals"] for j in dry["jobs"]] == [j["totals"] for j in doc["jobs"]]


# --- the HTML page in a real browser --------------------------------------------------


class _Cells(HTMLParser):
    """Number cells (data-key) in document order, and where the warnings and the first
    table are."""

    def __init__(self):
        super().__init__()
        self.cells: list[tuple[dict, str]] = []
        self.order: list[str] = []
        self._open: dict | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id") in ("warnings", "errors"):
            self.order.append(a["id"])
        if tag == "table":
            self.order.append("table")
        if tag == "td" and "data-key" in a:
            self._open, self._text = a, ""

    def handle_data(self, data):
        if self._open is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "td" and self._open is not None:
            self.cells.append((self._open, self._text.strip()))
            self._open = None


def chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: scripts/test installs chromium"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=180, check=False)


def test_html_page_in_headless_chromium(filled, old_account, new_account, tmp_path):
    path = write_config(tmp_path / "c.toml", [
        imap_job("alice", old_account, new_account, folders={"include": ["INBOX*"],
                                                              "exclude": ["INBOX.Entw*"]})])
    assert run(write_config(tmp_path / "half.toml", [imap_job(
        "alice", old_account, new_account, folders={"include": ["INBOX.Archive*"]})])).ok
    mailgen.expunge_first(old_account, "INBOX.Archive", 1)  # a warning to show
    page = tmp_path / "report.html"
    proc = run_cli("report", "-c", str(path), "--format", "html", "-o", str(page))
    assert proc.returncode == 0, proc.stderr
    html_text = page.read_text()
    # self-contained: nothing to fetch, nothing to run
    assert not re.search(r"<script|<link|src=|url\(|@import", html_text, re.I)
    doc = json.loads(run_cli("report", "-c", str(path), "--format", "json",
                             "--no-sample").stdout)
    dom = chromium("--dump-dom", page.as_uri(), tmp_path=tmp_path)
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-2000:]
    cells = _Cells()
    cells.feed(dom.stdout)
    # warnings before any table
    assert cells.order[0] == "warnings" and "table" in cells.order, cells.order
    assert "1 message vanished from the source" in dom.stdout
    # every number on the page is the JSON's: exact in data-value, for people in the text
    # (sizes as "3.7 MB" with the exact bytes in the tooltip, counts as "1,234")
    j = job_of(doc)
    by = folders(doc)
    seen_folders = set()
    byte_cells = 0
    for attrs, value in cells.cells:
        key, exact = attrs["data-key"], int(attrs["data-value"])
        if key == "jobs":
            assert exact == doc["totals"]["jobs"]
        elif attrs.get("data-folder"):
            seen_folders.add(attrs["data-folder"])
            assert exact == by[attrs["data-folder"]][key], (attrs, value)
        elif attrs.get("data-job"):
            assert exact == j["totals"][key], (attrs, value)
        else:
            assert exact == doc["totals"][key], (attrs, value)
        if key.endswith("_bytes"):
            byte_cells += 1
            assert value == (size_text(exact) if exact else "0"), (attrs, value)
            assert attrs["title"] == f"{exact:,} bytes", attrs
        else:
            assert value == f"{exact:,}", (attrs, value)
    assert byte_cells >= 2 * (2 + len(by))  # totals, the job and every folder: both sizes
    assert size_text(doc["totals"]["source_bytes"]) in dom.stdout
    assert not re.search(r">\d{5,}<", dom.stdout)  # no raw byte counts left on the page
    # columns that are 0 for every folder of the job are left out, and said to be
    assert "0 in every folder, so not shown: flag updates, to delete, failed earlier, " \
           "quarantined</small>" in dom.stdout
    assert "nothing to copy</small>" in dom.stdout and " % there</small>" in dom.stdout
    assert seen_folders == set(by) and len(by) == 5
    assert by["INBOX.Archive"]["already_there"] > 0 and by["INBOX"]["to_copy"] > 0
    # and it renders: a screenshot of the page
    shot = tmp_path / "report.png"
    proc = chromium(f"--screenshot={shot}", "--window-size=1100,900", page.as_uri(),
                    tmp_path=tmp_path)
    assert proc.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stderr
    assert shot.stat().st_size > 10_000


def test_courier_to_cyrus_before_and_after_a_run(courier_account, cyrus_account,  # noqa: F811
                                                 tmp_path):
    """Both listings parsed from other servers' answers (Courier quotes the header field
    name, Cyrus orders the items its own way): the same numbers."""
    msgs = [m for m in mailgen.realistic_mailbox(count=24, big=False, seed=93)
            if m.body.split(b"\r\n\r\n", 1)[0].isascii()]  # Cyrus munges 8-bit headers
    mailgen.fill(courier_account, msgs)
    path = write_config(tmp_path / "c.toml", [imap_job("v", courier_account, cyrus_account)])
    before = job_of(report(path), "v")
    assert before["planned"], before["error"]
    t = before["totals"]
    assert (t["source_messages"], t["to_copy"], t["already_there"]) == (len(msgs), len(msgs), 0)
    assert t["source_bytes"] == sum(len(m.body) for m in msgs)
    assert run(path).ok
    after = job_of(report(path), "v")["totals"]
    assert (after["already_there"], after["to_copy"]) == (len(msgs), 0)
    # without the state database, by the duplicate rules alone
    for f in tmp_path.glob("mailmigrate.db*"):
        f.unlink()
    found = job_of(report(path), "v")["totals"]
    assert (found["already_there"], found["to_copy"]) == (len(msgs), 0)


def test_plaintext_endpoint_is_a_warning(old_account, new_account, tmp_path):
    job = imap_job("alice", old_account, new_account)
    job["destination"] = new_account.endpoint_toml("imap", security="none",
                                                   allow_insecure=True)
    path = write_config(tmp_path / "c.toml", [job])
    j = job_of(report(path))
    assert j["planned"], j["error"]
    assert any(w.startswith(f"{new_account.username} at 127.0.0.1:") and
               "without encryption" in w for w in j["warnings"]), j["warnings"]
    assert not any("without encryption" in w and old_account.username in w
                   for w in j["warnings"])


def test_appendlimit_and_quoted_header_fields(tmp_path):
    """The destination announces APPENDLIMIT (Dovecot does not; the fake does, as other
    servers do); the source quotes the header field name in its FETCH answers (Courier).
    Only EXAMINE and read commands reach either server."""
    from tests.rig.fakeimap import DEFAULT_CAPABILITIES, FakeImapServer

    rng = __import__("random").Random(95)
    bodies = [mailgen.make_message(rng, i, size=size)[0]
              for i, size in enumerate((1_000, 2_000, 9_000, 30_000))]
    with FakeImapServer() as source, FakeImapServer(
            capabilities=(*DEFAULT_CAPABILITIES, "APPENDLIMIT=8000")) as destination:
        source.quote_header_field_names = True
        for body in bodies:
            source.add_message("INBOX", body, ["\\Seen"])
        destination.add_message("INBOX", bodies[0])  # already there (same Message-ID)
        path = write_config(tmp_path / "c.toml", [{
            "name": "fake", "kind": "imap-copy", "source": source.job_endpoint(),
            "destination": destination.job_endpoint()}])
        j = job_of(report(path), "fake")
        assert j["planned"], j["error"]
        (inbox,) = j["folders"]
        assert (inbox["source_messages"], inbox["already_there"], inbox["to_copy"]) == (4, 1, 3)
        refused = sorted((r["id"], r["size"]) for r in j["destination_refuses"])
        assert refused == [("UID 3", len(bodies[2])), ("UID 4", len(bodies[3]))]
        assert all("APPENDLIMIT of 8000 bytes" in r["reason"] for r in j["destination_refuses"])
        for server in (source, destination):
            commands = {line.upper().removeprefix("UID ").split()[0]
                        for _sid, line in server.log}
            assert not commands & {"SELECT", "APPEND", "STORE", "EXPUNGE", "CREATE",
                                   "DELETE", "RENAME", "SUBSCRIBE"}, commands
            assert "FETCH" in commands
        assert source.received("EXAMINE") and destination.received("EXAMINE")
