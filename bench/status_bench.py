"""How fast is `mailmigrate status` on a big state database?

    .venv/bin/python bench/status_bench.py --messages 10000000 --dir /tmp/status-bench

builds a SQLite state database with that many messages in one job (20 folders; mostly
verified, some deleted and seen, 0.1 % failed with a handful of error texts) with
INSERT … SELECT from a recursive CTE, then times `mailmigrate status` and
`mailmigrate status --json` (each run as its own process, like cron would).  An existing
database of the same size in --dir is reused (--rebuild to start again).
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate.store import Store  # noqa: E402

FOLDERS = 20
CONFIG = """[state]
url = "sqlite:///state.db"

[[jobs]]
name = "bench"
kind = "imap-copy"
[jobs.source]
host = "old.example"
username = "bench@old.example"
password = "unused"
[jobs.destination]
host = "new.example"
username = "bench@new.example"
password = "unused"
"""


def build(db: Path, messages: int) -> None:
    Store(f"sqlite:///{db}").close()  # the schema, as mailmigrate creates it
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")  # one huge transaction: no 10 GB WAL
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-500000")
    now = "2026-11-30 00:00:00.000000"
    conn.execute("BEGIN")
    conn.execute("INSERT INTO jobs (id, name, kind, deletes, created_at) "
                 "VALUES (1, 'bench', 'imap-copy', 0, ?)", (now,))
    conn.executemany(
        "INSERT INTO folders (id, job_id, source_name, destination_name, uidvalidity, "
        "updated_at) VALUES (?, 1, ?, ?, 1, ?)",
        [(f, f"Folder{f}", f"Folder{f}", now) for f in range(1, FOLDERS + 1)])
    per_folder = messages // FOLDERS
    # folder by folder, UIDs ascending: the unique index grows at its end (fast)
    for f in range(1, FOLDERS + 1):
        conn.execute(f"""
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
            INSERT INTO messages (folder_id, source_key, source_uidvalidity, source_uid,
                                  size, message_id, flags, state, attempts, last_error,
                                  first_seen_at, updated_at)
            SELECT {f}, '1:' || i, 1, i, 2000 + (i * 7919) % 60000,
                   '<' || i || '.{f}@bench.example>', '\\Seen',
                   CASE WHEN i % 1000 = 0 THEN 'failed'
                        WHEN i % 1000 = 500 THEN 'quarantined'
                        WHEN i % 10 = 1 THEN 'deleted'
                        WHEN i % 97 = 3 THEN 'seen'
                        ELSE 'verified' END,
                   CASE WHEN i % 500 = 0 THEN 3 ELSE 0 END,
                   CASE WHEN i % 500 = 0 THEN
                        'message UID ' || i || ' (' || (2000 + i % 60000) || ' bytes): ' ||
                        CASE i % 3000 WHEN 0 THEN 'destination refused the message: '
                                                  || '[OVERQUOTA] Quota exceeded'
                                      WHEN 1000 THEN 'connection lost during APPEND'
                                      ELSE 'copy differs from the source (sha256)' END
                   END, ?, ?
            FROM n""", (per_folder, now, now))
        print(f"  folder {f}/{FOLDERS}", file=sys.stderr, flush=True)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


def timed(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "migrate", *args], capture_output=True,
                          text=True, check=True)
    return time.perf_counter() - started, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=10_000_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp/mailmigrate-status-bench"))
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    db, config = args.dir / "state.db", args.dir / "config.toml"
    config.write_text(CONFIG)
    stamp = args.dir / f"built-{args.messages}"
    if args.rebuild or not stamp.exists():
        for old in args.dir.glob("state.db*"):
            old.unlink()
        stamp.unlink(missing_ok=True)
        started = time.perf_counter()
        build(db, args.messages)
        stamp.touch()
        print(f"built {args.messages:,} messages in {time.perf_counter() - started:.1f} s "
              f"({db.stat().st_size / 1e9:.2f} GB)")
    for command in (("status",), ("status", "--json"), ("failed", "--json")):
        times = []
        for _ in range(args.repeat):
            seconds, out = timed(*command, "-c", str(config))
            times.append(seconds)
        print(f"mailmigrate {' '.join(command)}: " + ", ".join(f"{t:.2f} s" for t in times)
              + f" (output {len(out):,} bytes)")
    print(timed("status", "-c", str(config))[1])


if __name__ == "__main__":
    main()
