"""Start-up cost of the CLI: what a command spends importing, and its peak RSS.

    .venv/bin/python bench/startup.py --code /tmp/before --code . --repeat 7

For each checkout (--code, default this one), on the same small mailbox (a Dovecot pair
on loopback TLS, copied once before measuring):

* ``--help``: the import time of ``migrate.cli`` (``python -X importtime``);
* ``status`` and an unchanged ``run``: the wall time and peak RSS of the whole process
  (``/usr/bin/time -v``), and the time spent importing (the sum of ``-X importtime``'s
  self times, from a separate process), and how many modules were imported.

The checkouts take turns in every round, so machine load hits them alike; the median and
the minimum (the least disturbed by other processes) are printed.  Absolute times depend on the machine; the ratios are the point.

Bytecode: an installed mailmigrate has its .pyc files (pip compiles them); a checkout run
with PYTHONDONTWRITEBYTECODE=1 compiles every module it imports at every start.  By
default the children cache bytecode under a temporary PYTHONPYCACHEPREFIX (as installed);
``--no-bytecode-cache`` measures the compile-every-time case.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from big_folder import fill  # noqa: E402 - this script's own directory
from tests.rig.dovecot import DovecotServer  # noqa: E402
from tests.rig.jobs import imap_job, write_config  # noqa: E402

# runs the CLI like `python -m migrate`, then says how many modules it imported
COUNT = ("import runpy, sys; sys.argv = ['mailmigrate'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('migrate', run_name='__main__')\n"
         "except SystemExit:\n    pass\n"
         "finally:\n    print('modules', len(sys.modules), file=sys.stderr)")


ENV = dict(os.environ)


def child(code: Path, args: list[str], *, importtime: bool = False, timed: bool = False
          ) -> subprocess.CompletedProcess:
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + ["-c", COUNT]
    if timed:
        cmd = ["/usr/bin/time", "-v"] + cmd
    proc = subprocess.run(cmd + args, capture_output=True, text=True, check=False,
                          env={**ENV, "PYTHONPATH": str(code)}, cwd=str(code))
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"mailmigrate {' '.join(args)} failed (exit {proc.returncode})")
    return proc


def import_ms(stderr: str, module: str | None = None) -> float:
    """-X importtime output: the cumulative time of ``module``, or the sum of all self
    times (everything imported), in ms."""
    total = 0
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if not m:
            continue
        if module is None:
            total += int(m.group(1))
        elif m.group(4) == module:
            return int(m.group(2)) / 1000
    return total / 1000


def time_v(stderr: str) -> tuple[float, float]:
    """/usr/bin/time -v: wall seconds and peak RSS in MB."""
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return seconds, int(rss.group(1)) / 1024


def modules(stderr: str) -> int:
    return int(re.search(r"^modules (\d+)$", stderr, re.MULTILINE).group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--folders", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--code", action="append", type=Path,
                    help="checkout(s) whose migrate/ to run (default: this one)")
    ap.add_argument("--json", type=Path, help="write the numbers here too")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="compile the modules at every start (PYTHONDONTWRITEBYTECODE=1)")
    args = ap.parse_args()
    if args.no_bytecode_cache:
        ENV["PYTHONDONTWRITEBYTECODE"] = "1"
        ENV.pop("PYTHONPYCACHEPREFIX", None)
    else:
        ENV.pop("PYTHONDONTWRITEBYTECODE", None)
        ENV["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="mailmigrate-pycache-")
    codes = [c.resolve() for c in args.code or [ROOT]]

    ca = trustme.CA()
    old = DovecotServer("start-old", ".", ca, inbox_prefix=True)
    new = DovecotServer("start-new", "/", ca, inbox_prefix=False)
    samples: dict[str, dict[str, list[float]]] = {str(c): {} for c in codes}
    try:
        old.start()
        new.start()
        src = old.add_user("start@old.test", "pw-old-start")
        fill(src, ["INBOX"] + [f"INBOX.Folder{i}" for i in range(1, args.folders)],
             args.messages)
        work = Path(tempfile.mkdtemp(prefix="mailmigrate-startup-"))
        configs = {}
        for k, code in enumerate(codes):
            dst = new.add_user(f"start{k}@new.test", f"pw-new-{k}")
            configs[code] = write_config(work / f"config{k}.toml",
                                         [imap_job("start", src, dst)],
                                         state_url=f"sqlite:///{work}/state{k}.db")
            child(code, ["run", "-c", str(configs[code]), "--no-progress"])  # the copy
            child(code, ["status", "-c", str(configs[code])])  # bytecode for status too
        for _ in range(args.repeat):
            for code in codes:
                s = samples[str(code)]
                config = str(configs[code])
                help_run = child(code, ["--help"], importtime=True)
                s.setdefault("help_import_cli_ms", []).append(
                    import_ms(help_run.stderr, "migrate.cli"))
                for name, cmd in (("status", ["status", "-c", config]),
                                  ("run", ["run", "-c", config, "--no-progress"])):
                    wall, rss = time_v(child(code, cmd, timed=True).stderr)
                    traced = child(code, cmd, importtime=True).stderr
                    s.setdefault(f"{name}_wall_s", []).append(wall)
                    s.setdefault(f"{name}_peak_rss_mb", []).append(rss)
                    s.setdefault(f"{name}_import_ms", []).append(import_ms(traced))
                    s.setdefault(f"{name}_modules", []).append(modules(traced))
        out = {"messages": args.messages, "folders": args.folders, "repeat": args.repeat,
               "bytecode_cache": not args.no_bytecode_cache,
               "median": {c: {k: round(statistics.median(v), 3) for k, v in s.items()}
                          for c, s in samples.items()},
               "min": {c: {k: round(min(v), 3) for k, v in s.items()}
                       for c, s in samples.items()}}
        for code in out["median"]:
            print(f"[{code}]  median / min")
            for key, value in out["median"][code].items():
                print(f"  {key:22} {value:9} {out['min'][code][key]:9}")
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return 0
    finally:
        old.cleanup()
        new.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
