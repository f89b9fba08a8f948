"""How fast is `mailmigrate report` on a big mailbox?

    .venv/bin/python bench/report_bench.py --messages 100000 --folders 4

fills a source mailbox on a Dovecot pair (loopback TLS) with small messages - written
straight into the Maildirs, which takes seconds where APPEND takes many minutes - and
the destination with the same messages in the folders they map to (so the duplicate
rules have a full destination listing to match: the harder case), lets Dovecot index
them once (a first `report`, shown as "cold"; a real server has its index), then times
`mailmigrate report` (text), `--format json` and `--format html`, each as its own process
like an admin would run it, with and without the timing sample.
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
from tests.rig.dovecot import DovecotServer  # noqa: E402
from tests.rig.jobs import imap_job, write_config  # noqa: E402


def write_maildir(account, folder_dirs: dict[str, str], msgs) -> None:
    """Messages as Maildir files, owned by the mail user; sizes in the file names (S=,
    W=) as Dovecot writes them, so it needs not read a file to know its size."""
    server = account.server
    root = server.homes / account.username / "Maildir"
    made = set()
    for n, (folder, body, flags, _date) in enumerate(msgs):
        d = root / folder_dirs[folder] if folder_dirs[folder] else root
        if d not in made:
            for sub in ("cur", "new", "tmp"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            if d != root:
                (d / "maildirfolder").touch()
            made.add(d)
        lf = body.replace(b"\r\n", b"\n")
        info = "S" if "\\Seen" in flags else ""
        (d / "cur" / f"{1700000000 + n}.M{n}P1.bench,S={len(lf)},W={len(body)}:2,{info}"
         ).write_bytes(lf)
    for dirpath, dirs, files in os.walk(server.homes / account.username):
        for name in dirs + files:
            os.chown(os.path.join(dirpath, name), server.mail_uid, server.mail_gid)
    os.chown(server.homes / account.username, server.mail_uid, server.mail_gid)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--folders", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-destination", action="store_true",
                    help="leave the destination empty (no duplicate matching)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one report in-process (cProfile, top 25)")
    args = ap.parse_args()

    ca = trustme.CA()
    old = DovecotServer("report-bench-old", ".", ca, inbox_prefix=True)
    new = DovecotServer("report-bench-new", "/", ca, inbox_prefix=False)
    try:
        old.start()
        new.start()
        src = old.add_user("bench@old.test", "pw-old")
        dst = new.add_user("bench@new.test", "pw-new")
        rng = random.Random(args.seed)
        folders = ["INBOX"] + [f"INBOX.Folder{i}" for i in range(1, args.folders)]
        date = mailgen.realistic_mailbox(count=1, big=False)[0].date
        msgs = []
        for i in range(args.messages):
            body, _ = mailgen.make_message(rng, i, size=rng.choice((600, 1_000, 2_000)))
            msgs.append((folders[i * len(folders) // args.messages], body,
                         ["\\Seen"] if i % 2 else [], date))
        total = sum(len(m[1]) for m in msgs)
        t = time.monotonic()
        # old host: Maildir++ ('.Folder1'); new host: LAYOUT=fs ('Folder1')
        write_maildir(src, {f: ("" if f == "INBOX" else "." + f[len("INBOX."):])
                            for f in folders}, msgs)
        if not args.no_destination:
            write_maildir(dst, {f: ("" if f == "INBOX" else f[len("INBOX."):])
                                for f in folders}, msgs)
        print(f"filled {args.messages} messages, {total / 1e6:.1f} MB in {len(folders)} "
              f"folders{'' if args.no_destination else ', and the same at the destination'}"
              f" ({time.monotonic() - t:.1f} s)")
        work = Path(tempfile.mkdtemp(prefix="mailmigrate-report-bench-"))
        path = write_config(work / "config.toml", [imap_job("bench", src, dst)])
        cold = True
        for extra in (["--no-sample"], ["--no-sample"], [], ["--format", "json"],
                      ["--format", "html", "-o", str(work / "r.html")]):
            cmd = [sys.executable, "-m", "migrate", "report", "-c", str(path), *extra]
            t = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            took = time.monotonic() - t
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-2000:])
                return 1
            overall = [ln for ln in proc.stdout.splitlines() if ln.startswith("overall:")]
            label = "cold (Dovecot indexes the new files)" if cold else ""
            cold = False
            print(f"report {' '.join(extra) or '(text)'} {label}: {took:.2f} s"
                  + (f"  [{overall[0]}]" if overall else ""))
        # check counts "to copy" with the report's planner: about the same time
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "migrate", "check", "-c", str(path)],
                              capture_output=True, text=True, check=False)
        took = time.monotonic() - t
        to_copy = [ln.strip() for ln in proc.stdout.splitlines() if "to copy:" in ln]
        print(f"check (exit {proc.returncode}): {took:.2f} s  {to_copy[:1]}")
        if args.profile:
            import cProfile
            import pstats

            from migrate import config as config_mod
            from migrate.report import PlanOptions, build_report

            loaded = config_mod.load(path)
            prof = cProfile.Profile()
            t = time.monotonic()
            prof.runcall(build_report, loaded, None, PlanOptions(sample=False))
            print(f"in-process report under cProfile: {time.monotonic() - t:.2f} s")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        return 0
    finally:
        old.cleanup()
        new.cleanup()


if __name__ == "__main__":
    sys.exit(main())
