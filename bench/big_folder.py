"""Re-run cost and memory at size: a Dovecot pair on loopback TLS, imap-copy as a child.

    .venv/bin/python bench/big_folder.py rerun --messages 50000 --folders 20
    .venv/bin/python bench/big_folder.py rss --messages 200000 --folders 1

``rerun``: copy once, then time unchanged re-runs (median of --repeat), wall time of the
whole ``mailmigrate run`` process, and of ``python -c 'import migrate.cli'`` for scale.
``rss``: the peak RSS of the copying process (VmHWM read inside the child, since ru_maxrss
survives exec) for the first copy and for a re-run.
``--code DIR`` runs another checkout's ``migrate`` (e.g. the code before a change), so
before/after are measured on the same data in one invocation.  Messages are small (about
1 KB, unique Message-IDs): the subject is per-message cost, not bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.rig import mailgen  # noqa: E402

# Children run as an installed mailmigrate would: with cached bytecode (pip compiles it),
# not recompiling every module at every start as PYTHONDONTWRITEBYTECODE=1 makes them.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ.setdefault("PYTHONPYCACHEPREFIX", tempfile.mkdtemp(prefix="mailmigrate-pycache-"))
from tests.rig.dovecot import DovecotServer  # noqa: E402
from tests.rig.jobs import imap_job, write_config  # noqa: E402

PROBE = ("import runpy, sys; sys.argv = ['mailmigrate'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('migrate', run_name='__main__')\n"
         "finally:\n    hwm = [l for l in open('/proc/self/status') "
         "if l.startswith('VmHWM')][0].split()[1]\n"
         "    print('peak_rss_kb', hwm, file=sys.stderr)")


def body(i: int) -> bytes:
    return (f"From: bench{i % 97}@old.test\r\nTo: someone@new.test\r\n"
            f"Subject: message {i}\r\nMessage-ID: <bench-{i}@old.test>\r\n"
            f"Date: Mon, 2 Feb 2026 10:00:00 +0000\r\n\r\n" + f"line {i} " * 100 + "\r\n"
            ).encode()


def fill(account, folders: list[str], n: int) -> None:
    """n messages spread over folders, 500 per MULTIAPPEND."""
    client = mailgen.connect(account)
    try:
        for f in folders:
            if f != "INBOX":
                client.create_folder(f)
        per = [n // len(folders) + (1 if k < n % len(folders) else 0)
               for k in range(len(folders))]
        i = 0
        for folder, count in zip(folders, per, strict=True):
            for start in range(0, count, 500):
                batch = [{"msg": body(i + j), "flags": ["\\Seen"] if (i + j) % 2 else []}
                         for j in range(min(500, count - start))]
                client.multiappend(folder, batch)
                i += len(batch)
    finally:
        client.logout()


def run_child(config: Path, code: Path) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-c", PROBE, "run", "-c", str(config), "--no-progress"]
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                          cwd=str(code))
    elapsed = time.monotonic() - t
    peak = int(proc.stderr.split("peak_rss_kb")[-1].split()[0]) \
        if "peak_rss_kb" in proc.stderr else 0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"mailmigrate run failed (exit {proc.returncode})")
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return elapsed, peak, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("rerun", "rss"))
    ap.add_argument("--messages", type=int)
    ap.add_argument("--folders", type=int)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--code", action="append", type=Path,
                    help="checkout(s) whose migrate/ to run (default: this one); "
                         "several: each gets its own destination account, same source")
    ap.add_argument("--json", type=Path, help="write the numbers here too")
    args = ap.parse_args()
    messages = args.messages or (50_000 if args.mode == "rerun" else 200_000)
    nfolders = args.folders or (20 if args.mode == "rerun" else 1)
    codes = args.code or [ROOT]

    ca = trustme.CA()
    old = DovecotServer("big-old", ".", ca, inbox_prefix=True)
    new = DovecotServer("big-new", "/", ca, inbox_prefix=False)
    out: dict = {"mode": args.mode, "messages": messages, "folders": nfolders, "runs": []}
    try:
        old.start()
        new.start()
        src = old.add_user("big@old.test", "pw-old-big")
        folders = ["INBOX"] + [f"INBOX.Folder{i}" for i in range(1, nfolders)]
        t = time.monotonic()
        fill(src, folders, messages)
        print(f"filled {messages} messages in {nfolders} folders "
              f"({time.monotonic() - t:.1f} s)", flush=True)
        work = Path(tempfile.mkdtemp(prefix="mailmigrate-big-"))
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", "import migrate.cli"], check=True,
                       cwd=str(codes[0]), env={**os.environ, "PYTHONPATH": str(codes[0])})
        out["import_s"] = round(time.monotonic() - t, 3)
        print(f"python -c 'import migrate.cli': {out['import_s']:.2f} s", flush=True)
        for k, code in enumerate(codes):
            dst = new.add_user(f"big{k}@new.test", f"pw-new-{k}")
            config = write_config(work / f"config{k}.toml", [imap_job("big", src, dst)],
                                  state_url=f"sqlite:///{work}/state{k}.db")
            first, first_rss, line = run_child(config, code)
            print(f"[{code}] first copy: {first:.1f} s, peak RSS {first_rss / 1024:.0f} MB"
                  f" ({line})", flush=True)
            reruns, rss = [], []
            for _ in range(args.repeat):
                s, peak, line = run_child(config, code)
                reruns.append(s)
                rss.append(peak)
            print(f"[{code}] unchanged re-run: median {statistics.median(reruns):.2f} s "
                  f"of {', '.join(f'{s:.2f}' for s in reruns)}; peak RSS "
                  f"{max(rss) / 1024:.0f} MB ({line})", flush=True)
            out["runs"].append({"code": str(code), "first_s": round(first, 2),
                                "first_peak_rss_mb": round(first_rss / 1024, 1),
                                "rerun_s": [round(s, 3) for s in reruns],
                                "rerun_median_s": round(statistics.median(reruns), 3),
                                "rerun_peak_rss_mb": round(max(rss) / 1024, 1)})
        print(json.dumps(out))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return 0
    finally:
        old.cleanup()
        new.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
