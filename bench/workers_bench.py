"""Benchmark `mailmigrate worker`: M mailboxes × N messages through the PostgreSQL queue,
with 1, 2 and 3 worker processes (as on 1, 2 and 3 hosts).

    .venv/bin/python bench/workers_bench.py --mailboxes 60 --messages 200 --workers 1 2 3

Needs PostgreSQL (--pg, default postgresql://postgres@127.0.0.1:5432/test: a fresh
database is created per round and dropped).  One Dovecot pair on loopback TLS; every
round copies the same sources to fresh destination accounts.  Timed: from starting the
workers (their start-up included) until the queue has no job left, as seen by polling
the queue table; the enqueue before it is not timed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate.store import MAILBOX_TASK  # noqa: E402
from tests.rig import mailgen  # noqa: E402
from tests.rig.dovecot import DovecotServer  # noqa: E402
from tests.rig.jobs import write_config  # noqa: E402


def fill(account, count: int, rng: random.Random) -> int:
    bodies = [mailgen.make_message(rng, i, size=rng.choice((2000, 4000, 8000, 20000)))[0]
              for i in range(count)]
    client = mailgen.connect(account)
    try:
        for start in range(0, count, 100):
            client.multiappend("INBOX", bodies[start:start + 100])
    finally:
        client.logout()
    return sum(len(b) for b in bodies)


def queue_left(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE task_name = %s "
                            "AND status IN ('todo', 'doing')", (MAILBOX_TASK,)).fetchone()[0]


def one_round(args, old, new, sources, workers: int, work: Path) -> tuple[float, int]:
    name = f"mailmigrate_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = args.pg.rsplit("/", 1)[0]
    dsn = f"{base}/{name}"
    try:
        tag = uuid.uuid4().hex[:6]
        rows = []
        for i, src in enumerate(sources):
            dst = new.add_user(f"bench{i}-{tag}@new.test", f"pw-new-{i}")
            rows.append(f"{src.username},{dst.username},{src.password},{dst.password}\n")
        accounts = work / f"accounts-{tag}.csv"
        accounts.write_text("source_user,destination_user,source_password,"
                            "destination_password\n" + "".join(rows))
        os.chmod(accounts, 0o600)
        job = {"name": "bench", "kind": "imap-copy", "accounts": str(accounts),
               "source": {"host": "127.0.0.1", "port": old.ports["imaps"], "security": "ssl",
                          "ca_file": str(old.ca_file),
                          "max_connections": args.max_connections},
               "destination": {"host": "127.0.0.1", "port": new.ports["imaps"],
                               "security": "ssl", "ca_file": str(new.ca_file),
                               "max_connections": args.max_connections}}
        path = write_config(work / f"config-{tag}.toml", [job],
                            state_url=dsn.replace("postgresql://", "postgresql+psycopg://"))
        path.write_text("[workers]\nheartbeat_seconds = 1\nstalled_after_seconds = 30\n\n"
                        + path.read_text())
        mm = [sys.executable, "-m", "migrate"]
        subprocess.run([*mm, "db", "upgrade", "-c", str(path)], check=True,
                       capture_output=True)
        if workers < 0:  # the baseline: one `mailmigrate run --workers K` process
            t = time.monotonic()
            subprocess.run([*mm, "run", "-c", str(path), "--no-progress", "--workers",
                            str(-workers)], check=True, capture_output=True)
            elapsed = time.monotonic() - t
            with psycopg.connect(dsn) as conn:
                copied = conn.execute("SELECT coalesce(sum(copied), 0) FROM runs").fetchone()[0]
            return elapsed, int(copied)
        subprocess.run([*mm, "enqueue", "-c", str(path)], check=True, capture_output=True)
        t = time.monotonic()
        procs = [subprocess.Popen([*mm, "worker", "-c", str(path), "--concurrency",
                                   str(args.concurrency)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for _ in range(workers)]
        try:
            while queue_left(dsn):
                if any(p.poll() is not None for p in procs):
                    raise SystemExit("a worker ended early")
                time.sleep(0.1)
            elapsed = time.monotonic() - t
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=120)
        with psycopg.connect(dsn) as conn:
            copied = conn.execute("SELECT coalesce(sum(copied), 0) FROM runs").fetchone()[0]
        return elapsed, int(copied)
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mailboxes", type=int, default=60)
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--concurrency", type=int, default=2, help="jobs per worker process")
    ap.add_argument("--run-workers", type=int, nargs="*", default=[],
                    help="also time one `mailmigrate run --workers K` process (baseline)")
    ap.add_argument("--max-connections", type=int, default=16,
                    help="max_connections of each server (shared by all workers)")
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()

    ca = trustme.CA()
    old = DovecotServer("wbench-old", ".", ca, inbox_prefix=True)
    new = DovecotServer("wbench-new", "/", ca, inbox_prefix=False)
    try:
        old.start()
        new.start()
        rng = random.Random(1)
        t = time.monotonic()
        sources, total = [], 0
        for i in range(args.mailboxes):
            src = old.add_user(f"bench{i}@old.test", f"pw-old-{i}")
            total += fill(src, args.messages, rng)
            sources.append(src)
        count = args.mailboxes * args.messages
        print(f"filled {args.mailboxes} x {args.messages} messages, {total / 1e6:.1f} MB "
              f"({time.monotonic() - t:.1f} s); {os.cpu_count()} CPUs")
        work = Path(tempfile.mkdtemp(prefix="mailmigrate-wbench-"))
        for workers in [-k for k in args.run_workers] + args.workers:
            elapsed, copied = one_round(args, old, new, sources, workers, work)
            assert copied == count, f"copied {copied} of {count}"
            what = (f"mailmigrate run --workers {-workers}" if workers < 0 else
                    f"{workers} worker(s) × concurrency {args.concurrency}")
            print(f"{what}: {count} messages "
                  f"in {elapsed:.1f} s = {count / elapsed:.0f} msgs/s "
                  f"({total / 1e6 / elapsed:.2f} MB/s)", flush=True)
        return 0
    finally:
        old.cleanup()
        new.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
