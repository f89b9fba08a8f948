"""Randomised fault loops: kill -9, cut connections and a destination restart at seeded
random points of real runs against real Dovecot, with another client changing the source
in between.  After every iteration: each message that was ever at the source is at the
destination exactly once, in its folder, with the source's flags; nothing left the source
without a verified copy; no temp files in the archive.

Every iteration has its own seed (in the test id and in every assertion message), so a
failure is reproduced with ``pytest tests/test_fault_loops.py -k <seed>``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from migrate import config as cfg
from migrate.engine import run_jobs
from migrate.runner import RunOptions
from tests.rig import mailgen
from tests.rig.dovecot import DovecotServer, start_or_fail
from tests.rig.jobs import imap_job, run_cli, write_config
from tests.rig.proxy import CuttingProxy

SEED = 20261130
KILL_ITERATIONS_IMAP = 12
KILL_ITERATIONS_POP3 = 10
CUT_ITERATIONS = 20

# Checkpoint → how often one run passes it here: 6 folders (imap-copy), or batches of 5
# and one deletion chunk (pop3-archive; "n" stands for the message count).
IMAP_POINTS = {"after-intent": 6, "after-append": 6, "before-delete": 6, "after-delete": 6,
               "before-expunge": 6, "after-expunge": 6}
POP3_POINTS = {"after-intent": "n/5", "message-written": "n", "files-synced": "n/5",
               "archive-written": "n/5",
               "before-delete": 1, "after-delete": 1, "before-quit": 1}

# old host name → new host name ('.' + "INBOX." → '/', special-use \Sent → Sent)
DESTINATION_NAMES = {
    "INBOX": "INBOX",
    "INBOX.Sent Messages": "Sent",
    "INBOX.Archive": "Archive",
    "INBOX.Archive.2019": "Archive/2019",
    "INBOX.Entwürfe": "Entwürfe",
    "INBOX.Projekte.Überblick": "Projekte/Überblick",
}
TOGGLED_FLAGS = ("\\Flagged", "\\Seen", "\\Answered", "$Label1", "project-x")

COUNTS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def count_line(request):
    yield
    line = ("fault loops: " + ", ".join(
        f"{key} {COUNTS[key]}" for key in ("runs", "kills", "cuts", "restarts", "lost",
                                           "duplicated")))
    # shown without -s too: CI logs should carry the count line
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)
    else:
        print(line)


# --- what was ever at the source ----------------------------------------------------


@dataclasses.dataclass
class Expected:
    """sha256 → source folder and the flags it last had at the source."""

    seed: int
    folder: dict[str, str] = dataclasses.field(default_factory=dict)
    flags: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)

    def add(self, msg: mailgen.TestMessage) -> None:
        assert msg.sha256 not in self.folder, f"seed {self.seed}: generated a duplicate"
        self.folder[msg.sha256] = msg.folder
        self.flags[msg.sha256] = frozenset(msg.flags)


def fresh_accounts(old_host, new_host, tag: str):
    unique = uuid.uuid4().hex[:10]
    return (old_host.add_user(f"loop-{tag}-{unique}@old.test", "old-" + unique),
            new_host.add_user(f"loop-{tag}-{unique}@new.test", "new-" + unique))


def source_messages(rng: random.Random, seed: int, pop3: bool) -> list[mailgen.TestMessage]:
    msgs = mailgen.realistic_mailbox(count=rng.randint(20, 30), big=False, seed=seed)
    if pop3:  # POP3 sees the INBOX only
        msgs = [dataclasses.replace(m, folder="INBOX") for m in msgs]
    return msgs


def pop_job(account, archive: Path, **extra) -> dict:
    job = {"name": "loop", "kind": "pop3-archive", "source": account.endpoint_toml("pop3"),
           "archive": {"path": str(archive)}}
    job.update(extra)
    return job


def fill(account, msgs: list[mailgen.TestMessage]) -> None:
    """mailgen.fill with one MULTIAPPEND per folder: one commit (fsync) per folder instead
    of one per message, which is most of an iteration's set-up time."""
    client = mailgen.connect(account)
    try:
        existing = {name for _f, _d, name in client.list_folders()}
        by_folder: dict[str, list] = {}
        for m in msgs:
            by_folder.setdefault(m.folder, []).append(
                {"msg": m.body, "flags": m.flags, "date": m.date})
        for folder, items in by_folder.items():
            if folder not in existing:
                client.create_folder(folder)
                client.subscribe_folder(folder)
            client.multiappend(folder, items)
    finally:
        client.logout()


def another_client(rng: random.Random, account, expected: Expected, pop3: bool) -> str:
    """Maybe add a message at the source, maybe toggle a flag there, like a mail client
    working on the old mailbox between runs.  Returns what it did, for messages."""
    done = []
    if rng.random() < 0.5:
        body, mid = mailgen.make_message(rng, 100_000 + rng.randrange(10**6),
                                         size=rng.choice((1_000, 3_000, 9_000)),
                                         message_id=rng.random() < 0.8)
        folder = "INBOX" if pop3 else rng.choice(sorted(DESTINATION_NAMES))
        flags = tuple(rng.sample(TOGGLED_FLAGS, rng.randint(0, 2)))
        msg = mailgen.TestMessage(folder, body, flags,
                                  mailgen.realistic_mailbox(count=1)[0].date, mid)
        mailgen.fill(account, [msg])
        expected.add(msg)
        done.append(f"added {msg.sha256[:8]} to {folder}")
    if not pop3 and rng.random() < 0.5:
        present = [m for ms in mailgen.snapshot(account).values() for m in ms]
        if present:
            target = rng.choice(present)
            flag = rng.choice(TOGGLED_FLAGS)
            client = mailgen.connect(account)
            try:
                client.select_folder(target.folder)
                if flag in target.flags:
                    client.remove_flags([target.uid], [flag])
                else:
                    client.add_flags([target.uid], [flag])
                (item,) = client.fetch([target.uid], ["FLAGS"]).values()
            finally:
                client.logout()
            expected.flags[target.sha256] = frozenset(
                f.decode() if isinstance(f, bytes) else f for f in item[b"FLAGS"]
            ) - {"\\Recent"}
            done.append(f"toggled {flag} on {target.sha256[:8]} in {target.folder}")
    return "; ".join(done) or "nothing"


# --- invariants ---------------------------------------------------------------------


def archive_hashes(archive: Path) -> collections.Counter:
    out = collections.Counter()
    for sub in ("new", "cur"):
        if (archive / sub).is_dir():
            for p in (archive / sub).iterdir():
                out[hashlib.sha256(p.read_bytes()).hexdigest()] += 1
    return out


def destination_listing(new_account, archive: Path | None) -> list[tuple[str, str, frozenset]]:
    """[(folder, sha256, flags)] at the destination (folder/flags None for an archive)."""
    if archive is not None:
        return [(None, sha, None) for sha, n in archive_hashes(archive).items()
                for _ in range(n)]
    return [(m.folder, m.sha256, m.flags) for ms in mailgen.snapshot(new_account).values()
            for m in ms]


def assert_nothing_lost(expected: Expected, old_account, new_account, archive, context):
    """Mid-way (after a kill or a cut): every message is still at the source or already
    at the destination; nothing unknown appeared at the source."""
    source = {m.sha256 for ms in mailgen.snapshot(old_account).values() for m in ms}
    dest = {sha for _f, sha, _fl in destination_listing(new_account, archive)}
    missing = [sha[:8] for sha in expected.folder if sha not in source | dest]
    COUNTS["lost"] += len(missing)
    assert not missing, (f"seed {expected.seed}: {context}: deleted from the source without "
                         f"a copy at the destination: {missing}")
    assert source <= set(expected.folder), f"seed {expected.seed}: unknown source message"


def assert_exactly_once(expected: Expected, old_account, new_account, archive, deleted: bool,
                        context: str) -> None:
    listing = destination_listing(new_account, archive)
    got = collections.Counter(sha for _f, sha, _fl in listing)
    lost = [(expected.folder[sha], sha[:8]) for sha in expected.folder if not got[sha]]
    duplicated = [(sha[:8], n) for sha, n in got.items() if n > 1]
    unknown = [sha[:8] for sha in got if sha not in expected.folder]
    COUNTS["lost"] += len(lost)
    COUNTS["duplicated"] += sum(n - 1 for _s, n in duplicated)
    assert not lost and not duplicated and not unknown, (
        f"seed {expected.seed}: {context}: lost {lost}, duplicated {duplicated}, "
        f"unknown {unknown}")
    if archive is None:
        for folder, sha, flags in listing:
            want_folder = DESTINATION_NAMES[expected.folder[sha]]
            assert folder == want_folder, (
                f"seed {expected.seed}: {context}: {sha[:8]} in {folder!r}, not {want_folder!r}")
            assert flags == expected.flags[sha], (
                f"seed {expected.seed}: {context}: {sha[:8]} in {folder!r} has flags "
                f"{sorted(flags)}, the source had {sorted(expected.flags[sha])}")
    else:
        leftovers = os.listdir(archive / "tmp")
        assert leftovers == [], f"seed {expected.seed}: {context}: archive tmp/ {leftovers}"
    source = mailgen.snapshot(old_account)
    if deleted:
        left = {f: len(ms) for f, ms in source.items() if ms}
        assert not left, f"seed {expected.seed}: {context}: still at the source: {left}"
    else:
        assert_nothing_lost(expected, old_account, new_account, archive, context)


# --- 1. kill -9 at random checkpoints, during copy and deletion -------------------------


def crash_spec(rng: random.Random, points: dict, count: int) -> str:
    point = rng.choice(sorted(points))
    most = points[point]
    if most == "n":
        most = count
    elif most == "n/5":
        most = -(-count // 5)
    return f"{point}:{rng.randint(1, most)}"


def cli(path: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    COUNTS["runs"] += 1
    env = {"MAILMIGRATE_CRASH_AT": crash} if crash else {"MAILMIGRATE_CRASH_AT": ""}
    proc = run_cli("run", "-c", str(path), "--no-progress", "--batch-messages", "5",
                   env=env, timeout=120)
    if proc.returncode == -9:
        COUNTS["kills"] += 1
    return proc


def run_in_process(path: Path, **options):
    COUNTS["runs"] += 1
    options.setdefault("progress", False)
    (result,) = run_jobs(cfg.load(path), None, RunOptions(retry_wait=0.01, **options))
    return result


def kill_loop(seed: int, pop3: bool, old_host, new_host, tmp_path: Path) -> None:
    rng = random.Random(seed)
    old_account, new_account = fresh_accounts(old_host, new_host, f"k{seed}")
    msgs = source_messages(rng, seed, pop3)
    expected = Expected(seed)
    for m in msgs:
        expected.add(m)
    fill(old_account, msgs)
    archive = tmp_path / "archive" if pop3 else None
    job = (pop_job(old_account, archive, delete_after_verify=True) if pop3 else
           imap_job("loop", old_account, new_account, delete_after_verify=True))
    path = write_config(tmp_path / "c.toml", [job])
    points = POP3_POINTS if pop3 else IMAP_POINTS
    history = []

    first = crash_spec(rng, points, len(msgs))
    proc = cli(path, first)
    history.append(f"crash at {first} → {proc.returncode}")
    # the hit count is within what one run passes: the kill must have happened
    assert proc.returncode == -9, f"seed {seed}: {history}: {proc.stdout}{proc.stderr}"
    assert_nothing_lost(expected, old_account, new_account, archive, history)
    history.append(f"other client: {another_client(rng, old_account, expected, pop3)}")

    if rng.random() < 0.5:
        second = crash_spec(rng, points, len(msgs))
        proc = cli(path, second)
        history.append(f"crash at {second} → {proc.returncode}")
        # less is left to do after the first kill: the point may not be reached again
        assert proc.returncode in (-9, 0), (
            f"seed {seed}: {history}: {proc.stdout}{proc.stderr}")
        assert_nothing_lost(expected, old_account, new_account, archive, history)
        history.append(f"other client: {another_client(rng, old_account, expected, pop3)}")

    # the clean re-run in-process: the kills above needed a process of their own, this
    # does not (and saves a second of interpreter start-up per iteration)
    result = run_in_process(path, batch_messages=5)
    history.append(f"clean run → ok={result.ok} {result.errors[:3]}")
    assert result.ok, f"seed {seed}: {history}"
    assert_exactly_once(expected, old_account, new_account, archive, True, str(history))


@pytest.mark.parametrize("seed", [SEED + i for i in range(KILL_ITERATIONS_IMAP)])
def test_kill_9_loop_imap_copy_with_deletion(seed, old_host, new_host, tmp_path):
    kill_loop(seed, False, old_host, new_host, tmp_path)


@pytest.mark.parametrize("seed", [SEED + 100 + i for i in range(KILL_ITERATIONS_POP3)])
def test_kill_9_loop_pop3_archive_with_deletion(seed, old_host, new_host, tmp_path):
    kill_loop(seed, True, old_host, new_host, tmp_path)


# --- 2. connections cut at random byte offsets ----------------------------------------


@pytest.mark.parametrize("seed", [SEED + 200 + i for i in range(CUT_ITERATIONS)])
def test_connection_cut_loop(seed, old_host, new_host, tmp_path):
    rng = random.Random(seed)
    pop3 = rng.random() < 0.3
    old_account, new_account = fresh_accounts(old_host, new_host, f"c{seed}")
    msgs = source_messages(rng, seed, pop3)
    expected = Expected(seed)
    for m in msgs:
        expected.add(m)
    fill(old_account, msgs)
    delete = rng.random() < 0.6
    archive = tmp_path / "archive" if pop3 else None
    if pop3:
        side, port = "source", "pop3s"
        job = pop_job(old_account, archive, delete_after_verify=delete)
    else:
        side, port = rng.choice(["source", "destination"]), "imaps"
        job = imap_job("loop", old_account, new_account, delete_after_verify=delete)
        job[side]["max_connections"] = rng.randint(1, 2)
    direction = rng.choice(["down", "up"])
    # up: commands and APPENDed bodies; down: greetings, TLS, FETCHed bodies
    cut_after = int(10 ** rng.uniform(2.3, 5.3 if direction == "down" or side != "source"
                                      else 3.2))
    cuts = rng.randint(1, 3)
    retries = rng.randint(1, 4)
    target = old_account if side == "source" else new_account
    context = (f"{'pop3-archive' if pop3 else 'imap-copy'} delete={delete} cut {side} "
               f"{direction} after {cut_after} bytes x{cuts}, retries {retries}")
    proxy = CuttingProxy(target.server.ports[port], cut_after, direction, cuts=cuts)
    try:
        job[side]["port"] = proxy.port
        path = write_config(tmp_path / "c.toml", [job])
        result = run_in_process(path, batch_messages=rng.choice((5, 200)), retries=retries)
    finally:
        proxy.close()
    COUNTS["cuts"] += proxy.cuts_done
    assert proxy.cuts_done >= 1, f"seed {seed}: {context}: the proxy never cut"
    context += f" ({proxy.cuts_done} cut) → ok={result.ok} {result.errors[:3]}"
    assert_nothing_lost(expected, old_account, new_account, archive, context)
    job[side]["port"] = target.server.ports[port]
    path = write_config(tmp_path / "c.toml", [job])
    for attempt in range(3):
        if result.ok:
            break
        result = run_in_process(path)
        context += f"; re-run {attempt + 1} → ok={result.ok} {result.errors[:3]}"
    assert result.ok, f"seed {seed}: {context}"
    assert_exactly_once(expected, old_account, new_account, archive, delete, context)


# --- 3. the destination server killed and restarted in the middle of a run --------------


def maildir_files(server: DovecotServer) -> int:
    """Messages the server has stored, counted on its disk (cheap enough to poll)."""
    return sum(len(files) for root, _dirs, files in os.walk(server.homes)
               if os.path.basename(root) in ("cur", "new"))


def stop_and_wait(server: DovecotServer) -> None:
    """Stop the whole server (as a package upgrade or an admin's restart does: every
    session is cut) and wait until its master is gone (or a zombie nobody reaps yet):
    Dovecot refuses to start while the PID in master.pid still exists.  Not kill -9:
    mail processes killed that way leave lock files that stall a restarted Dovecot for
    about two minutes - the tool waits that out, but CI should not."""
    pid_file = server.base / "run" / "master.pid"
    pid = int(pid_file.read_text().strip())
    server.stop()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            break
        if state == "Z":
            break
        time.sleep(0.01)
    else:
        pytest.fail(f"the {server.name} Dovecot master {pid} did not stop")
    pid_file.unlink(missing_ok=True)


def test_destination_restart_mid_run(test_ca, tmp_path):
    seed = SEED + 300
    rng = random.Random(seed)
    old = DovecotServer("old-restart", ".", test_ca, inbox_prefix=True,
                        special_use={"Sent Messages": "\\Sent"})
    new = DovecotServer("new-restart", "/", test_ca, inbox_prefix=False,
                        special_use={"Sent": "\\Sent"})
    try:
        start_or_fail(old)
        start_or_fail(new)
        old_account = old.add_user("restart@old.test", "old-" + uuid.uuid4().hex[:10])
        new_account = new.add_user("restart@new.test", "new-" + uuid.uuid4().hex[:10])
        folders = sorted(DESTINATION_NAMES)
        msgs = []
        for i in range(240):
            body, mid = mailgen.make_message(rng, i, size=rng.choice((20_000, 60_000)),
                                             message_id=i % 9 != 4, attachment=i % 3 == 0)
            msgs.append(mailgen.TestMessage(folders[i % len(folders)], body,
                                            tuple(rng.sample(TOGGLED_FLAGS, i % 3)),
                                            mailgen.realistic_mailbox(count=1)[0].date, mid))
        expected = Expected(seed)
        for m in msgs:
            expected.add(m)
        fill(old_account, msgs)
        path = write_config(tmp_path / "c.toml", [imap_job(
            "restart", old_account, new_account, delete_after_verify=True)])

        COUNTS["runs"] += 1
        proc = subprocess.Popen(
            [sys.executable, "-m", "migrate", "run", "-c", str(path), "--no-progress",
             "--batch-messages", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "MAILMIGRATE_CRASH_AT": ""})
        deadline = time.monotonic() + 60
        while maildir_files(new) < 20 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        running = proc.poll() is None
        stored_before = maildir_files(new)
        stop_and_wait(new)
        start_or_fail(new)
        COUNTS["restarts"] += 1
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"seed {seed}: the run hung after the destination restart: {err}")
        context = (f"destination restarted after {stored_before} messages stored; "
                   f"run → {proc.returncode}: {out}{err[-2000:]}")
        print(f"seed {seed}: {context}")
        assert running, f"seed {seed}: the run ended before the restart: {context}"
        # recovered by retrying, or failed cleanly (exit 1, errors reported, no traceback)
        assert proc.returncode in (0, 1) and "Traceback" not in err, f"seed {seed}: {context}"
        assert_nothing_lost(expected, old_account, new_account, None, context)
        again = cli(path)
        context += f"; re-run → {again.returncode}: {again.stdout}{again.stderr[-2000:]}"
        assert again.returncode == 0, f"seed {seed}: {context}"
        assert_exactly_once(expected, old_account, new_account, None, True, context)
    finally:
        old.cleanup()
        new.cleanup()
