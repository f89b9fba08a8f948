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
from tests.rig import mailgen
from tests.rig.jobs import imap_job, run, run_cli, write_config
from tests.rig.untouched import untouched

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
