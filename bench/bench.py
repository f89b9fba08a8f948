"""Benchmark a job: a Dovecot pair on loopback TLS, a filled source, one timed run.

    .venv/bin/python bench/bench.py --messages 2000 --mb 115 --folders 8
    .venv/bin/python bench/bench.py --kind pop3-archive --folders 1
    .venv/bin/python bench/bench.py --mailboxes 20 --messages 200 --mb 11.5 --workers 4

Prints messages/s, MB/s and the peak RSS of the mailmigrate process (the copy runs as a
child process so the filling does not count), then a second, unchanged re-run's time.
With --mailboxes M: M mailboxes of --messages messages (--mb MB) each, one config entry
with an accounts CSV, run with --workers N.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.rig import mailgen  # noqa: E402

# Children run as an installed mailmigrate would: with cached bytecode (pip compiles it),
# not recompiling every module at every start as PYTHONDONTWRITEBYTECODE=1 makes them.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ.setdefault("PYTHONPYCACHEPREFIX", tempfile.mkdtemp(prefix="mailmigrate-pycache-"))
from tests.rig.dovecot import DovecotServer  # noqa: E402
from tests.rig.jobs import imap_job, write_config  # noqa: E402


def sizes(n: int, total: int, rng: random.Random) -> list[int]:
    """A mail-like size mix: mostly small, a few large, scaled to ``total`` bytes."""
    raw = [rng.choice((3, 6, 10, 20, 40)) * 1000 if rng.random() < 0.9
           else rng.choice((200, 500, 1500)) * 1000 for _ in range(n)]
    scale = total / sum(raw)
    return [max(1000, int(s * scale)) for s in raw]


def fill_fast(account, folders: list[str], bodies: list[tuple[str, bytes, list, object]]):
    client = mailgen.connect(account)
    try:
        for f in folders:
            if f != "INBOX":
                client.create_folder(f)
        batch: list[dict] = []
        current = None
        size = 0
        for folder, body, flags, date in bodies + [(None, b"", [], None)]:
            if batch and (folder != current or size > 8_000_000 or len(batch) >= 100):
                client.multiappend(current, batch)
                batch, size = [], 0
            if folder is None:
                break
            current = folder
            item = {"msg": body, "flags": flags}
            if date is not None:
                item["date"] = date
            batch.append(item)
            size += len(body)
    finally:
        client.logout()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--mb", type=float, default=115)
    ap.add_argument("--folders", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kind", default="imap-copy", choices=("imap-copy", "pop3-archive"))
    ap.add_argument("--extra", default="", help="extra arguments for mailmigrate run")
    ap.add_argument("--mailboxes", type=int, default=0,
                    help="M mailboxes (each --messages, --mb), listed in an accounts CSV")
    ap.add_argument("--workers", type=int, default=1, help="mailmigrate run --workers N")
    args = ap.parse_args()

    ca = trustme.CA()
    old = DovecotServer("bench-old", ".", ca, inbox_prefix=True)
    new = DovecotServer("bench-new", "/", ca, inbox_prefix=False)
    try:
        old.start()
        new.start()
        boxes = max(1, args.mailboxes)
        pairs = [(old.add_user(f"bench{i}@old.test", f"pw-old-{i}"),
                  new.add_user(f"bench{i}@new.test", f"pw-new-{i}")) for i in range(boxes)]
        rng = random.Random(args.seed)
        folders = ["INBOX"] + [f"INBOX.Folder{i}" for i in range(1, args.folders)]
        total = count = 0
        t = time.monotonic()
        for src, _dst in pairs:
            msgs = []
            for i, size in enumerate(sizes(args.messages, int(args.mb * 1e6), rng)):
                body, _ = mailgen.make_message(rng, count + i, size=size,
                                               attachment=size > 20_000)
                msgs.append((folders[i % len(folders)], body,
                             ["\\Seen"] if i % 2 else [], mailgen.realistic_mailbox(
                                 count=1, seed=i, big=False)[0].date))
            msgs.sort(key=lambda m: folders.index(m[0]))
            total += sum(len(m[1]) for m in msgs)
            count += len(msgs)
            fill_fast(src, folders, msgs)
        print(f"filled {boxes} x {args.messages} messages, {total / 1e6:.1f} MB in "
              f"{len(folders)} folders each ({time.monotonic() - t:.1f} s)")

        work = Path(tempfile.mkdtemp(prefix="mailmigrate-bench-"))
        src, dst = pairs[0]
        if args.kind == "imap-copy":
            job = imap_job("bench", src, dst)
        else:
            job = {"name": "bench", "kind": "pop3-archive", "source": src.endpoint_toml("pop3"),
                   "archive": {"path": str(work / "archive")}}
        if args.mailboxes:
            accounts = work / "accounts.csv"
            accounts.write_text("source_user,destination_user,source_password,"
                                "destination_password\n" + "".join(
                                    f"{s.username},{d.username},{s.password},{d.password}\n"
                                    for s, d in pairs))
            os.chmod(accounts, 0o600)
            job["accounts"] = str(accounts)
            for side in ("source", "destination"):
                if side in job:
                    job[side].pop("username")
                    job[side].pop("password")
        path = write_config(work / "config.toml", [job])
        cmd = [sys.executable, "-m", "migrate", "run", "-c", str(path), "--no-progress",
               "--workers", str(args.workers), *args.extra.split()]
        # Peak RSS measured inside the child from VmHWM: ru_maxrss survives exec() on
        # Linux and would report this (large) benchmark process instead.
        probe = ("import runpy, sys; sys.argv = ['mailmigrate'] + sys.argv[1:]\n"
                 "try:\n    runpy.run_module('migrate', run_name='__main__')\n"
                 "finally:\n    hwm = [l for l in open('/proc/self/status') "
                 "if l.startswith('VmHWM')][0].split()[1]\n"
                 "    print('peak_rss_kb', hwm, file=sys.stderr)")
        cmd = [sys.executable, "-c", probe, *cmd[3:]]
        if os.environ.get("BENCH_CHILD"):  # e.g. a profiling wrapper
            cmd = [sys.executable, os.environ["BENCH_CHILD"], *cmd[3:]]
        t = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        elapsed = time.monotonic() - t
        if os.environ.get("BENCH_CHILD"):
            print(proc.stderr)
        peak_kb = int(proc.stderr.split("peak_rss_kb")[-1].split()[0]) \
            if "peak_rss_kb" in proc.stderr else 0
        out = proc.stdout.strip().splitlines()
        print("\n".join(out if len(out) <= 3 else out[:2] + ["..."] + out[-1:]))
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        print(f"{args.kind} with verification, {boxes} mailboxes, --workers {args.workers}: "
              f"{count / elapsed:.0f} msgs/s, "
              f"{total / 1e6 / elapsed:.1f} MB/s, {elapsed:.2f} s wall (process incl. "
              f"start-up), peak RSS {peak_kb / 1024:.0f} MB")
        t = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        print(f"unchanged re-run: {time.monotonic() - t:.2f} s "
              f"({proc.stdout.strip().splitlines()[-1]})")
        return 0
    finally:
        old.cleanup()
        new.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
