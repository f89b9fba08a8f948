"""Each command imports only what it needs: start-up time is paid by every cron run.

The CLI runs in a child process exactly like ``python -m migrate``; the child then
prints which modules it imported."""

from __future__ import annotations

import datetime as dt
import json
import random
import subprocess
import sys

from tests.rig import mailgen
from tests.rig.jobs import imap_job, write_config

PROBE = """import json, runpy, sys
sys.argv = ['mailmigrate'] + sys.argv[1:]
try:
    runpy.run_module('migrate', run_name='__main__')
finally:
    print('MODULES ' + json.dumps(sorted(sys.modules)), flush=True)
"""

# what no run needs: the planner, the diagnosis, verify, status, the task queue, and a
# progress bar when stderr is not a terminal
NOT_IN_A_RUN = {"migrate.report", "migrate.report.plan", "migrate.check", "migrate.verify",
                "migrate.status", "migrate.workers", "procrastinate", "psycopg", "tqdm"}


def cli_modules(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                          text=True, timeout=300, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MODULES ")]
    assert lines, proc.stderr[-2000:]
    return proc, set(json.loads(lines[-1][len("MODULES "):]))


def fill_inbox(account, count: int = 3) -> None:
    rng = random.Random(5)
    date = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    mailgen.fill(account, [mailgen.TestMessage("INBOX", mailgen.make_message(rng, i)[0], (),
                                               date) for i in range(count)])


def test_help_imports_neither_sqlalchemy_nor_a_protocol():
    proc, modules = cli_modules("--help")
    assert proc.returncode == 0, proc.stderr
    assert "migrate.cli" in modules
    assert not modules & {"sqlalchemy", "imapclient", "poplib", "tenacity", "migrate.engine",
                          "migrate.store"}


def test_an_imap_run_and_status_import_only_what_they_use(old_account, new_account,
                                                          tmp_path):
    fill_inbox(old_account)
    config = write_config(tmp_path / "c.toml", [imap_job("alice", old_account, new_account)],
                          state_url=f"sqlite:///{tmp_path / 'state.db'}")
    proc, modules = cli_modules("run", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "3 copied" in proc.stdout  # it really ran the job
    assert {"migrate.engine", "migrate.imap_copy", "imapclient"} <= modules
    assert not modules & NOT_IN_A_RUN
    assert not modules & {"migrate.pop3_archive", "migrate.endpoints.pop3", "poplib",
                          "migrate.endpoints.maildir"}

    proc, modules = cli_modules("status", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "alice" in proc.stdout
    assert {"migrate.status", "migrate.store"} <= modules
    assert not modules & {"migrate.engine", "migrate.runner", "migrate.imap_copy",
                          "imapclient", "poplib", "tenacity", "migrate.report", "tqdm"}


def test_a_pop3_run_does_not_import_imap(old_account, tmp_path):
    fill_inbox(old_account)
    job = {"name": "archive", "kind": "pop3-archive",
           "source": old_account.endpoint_toml("pop3"),
           "archive": {"path": str(tmp_path / "arch")}}
    config = write_config(tmp_path / "c.toml", [job],
                          state_url=f"sqlite:///{tmp_path / 'state.db'}")
    proc, modules = cli_modules("run", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "3 archived" in proc.stdout
    assert {"migrate.pop3_archive", "poplib"} <= modules
    assert not modules & NOT_IN_A_RUN
    assert not modules & {"migrate.imap_copy", "migrate.endpoints.imap", "imapclient"}
