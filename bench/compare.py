"""Side by side in one invocation: our jobs against mbsync and fetchmail, same data.

    .venv/bin/python bench/compare.py                      # 2,000 msgs / ~117 MB / 8 folders
    .venv/bin/python bench/compare.py --mode large         # one 50 MB message (peak RSS)
    .venv/bin/python bench/compare.py --mode mailboxes     # 100 mailboxes x 200, --workers 8

Sets up two Dovecot servers on loopback TLS (tests/rig/dovecot.py), fills the source
once (a realistic size mix, system flags and custom keywords, dates), then runs
round-robin repetitions (default 3, the starting tool rotates) of

- imap-copy (faithful: flags incl. keywords, dates; every copy read back and compared)
  against mbsync (isync), each into a fresh, empty destination account;
- pop3-archive (fsync'd Maildir, every file re-read and compared) against fetchmail
  (fetchall + keep, so the POP3 data is reused), twice: ``fetchmail`` delivers into a
  durable Maildir like ours, the way procmail/maildrop would (an MDA per message: write
  tmp/, fsync with coreutils ``sync FILE``, rename into new/); ``fetchmail-bsmtp``
  appends every message to one file, no process per message, no fsync - fetchmail's
  cheapest path, which does not give what we give (a Maildir that survives a crash).

Each tool runs as a child of /usr/bin/time: wall time, user+sys CPU of the tool and its
children, peak RSS (max resident set of the tool or any child).  The table shows medians
(peak RSS: the maximum) and our speed as a ratio to each peer; a JSON file gets the same
plus every single run and the machine (--json-out, default bench/results/latest.json).
isync and fetchmail are installed with apt-get when missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import fill_fast, sizes  # noqa: E402  (bench/bench.py, beside this file)
from tests.rig import mailgen  # noqa: E402

# Children run as an installed mailmigrate would: with cached bytecode (pip compiles it),
# not recompiling every module at every start as PYTHONDONTWRITEBYTECODE=1 makes them.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ.setdefault("PYTHONPYCACHEPREFIX", tempfile.mkdtemp(prefix="mailmigrate-pycache-"))
from tests.rig.dovecot import DOVECOT, DovecotServer  # noqa: E402
from tests.rig.jobs import imap_job, write_config  # noqa: E402

TIME = "/usr/bin/time"
PACKAGES = {"mbsync": "isync", "fetchmail": "fetchmail", TIME: "time"}
TOOLS = ("imap-copy", "mbsync", "pop3-archive", "fetchmail", "fetchmail-bsmtp")
FETCHMAIL_DELIVERY = {
    "fetchmail": "mda per message (sh: cat > tmp/, sync FILE, mv to new/): a durable "
                 "Maildir like ours, delivered the way procmail/maildrop would",
    "fetchmail-bsmtp": "bsmtp: every message appended to one file, no process per message, "
                       "no fsync (fetchmail's cheapest path; not a Maildir)"}
FLAG_MIX = ((2, "\\Seen"), (5, "\\Flagged"), (7, "\\Answered"), (3, "$Label1"),
            (11, "project-x"), (13, "$Forwarded"))


# --- set-up ------------------------------------------------------------------------

def ensure_tools(names: list[str]) -> None:
    missing = sorted({PACKAGES[n] for n in names if not shutil.which(n)})
    if missing:
        print(f"installing {' '.join(missing)} (Debian packages)")
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True,
                       stdout=subprocess.DEVNULL)


def flags_for(i: int) -> list[str]:
    return [f for every, f in FLAG_MIX if i % every == 0]


def make_mail(n: int, mb: float, folders: list[str], seed: int, start: int = 0
              ) -> list[tuple[str, bytes, list, object]]:
    rng = random.Random(seed)
    out = []
    for i, size in enumerate(sizes(n, int(mb * 1e6), rng)):
        body, _ = mailgen.make_message(rng, start + i, size=size, attachment=size > 20_000)
        date = mailgen.realistic_mailbox(count=1, seed=start + i, big=False)[0].date
        out.append((folders[i % len(folders)], body, flags_for(i), date))
    out.sort(key=lambda m: folders.index(m[0]))
    return out


def with_common_name(server: DovecotServer, ca: trustme.CA) -> None:
    """The rig's certificate names the host in subjectAltName only; mbsync and fetchmail
    also want a common name."""
    cert = ca.issue_cert("127.0.0.1", "localhost", common_name="localhost")
    pem = server.base / "cert.pem"
    pem.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(server.base / "key.pem"))


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    dovecot = subprocess.run([DOVECOT, "--version"], capture_output=True, text=True,
                             check=False).stdout.strip()
    versions = {}
    for tool, flag in (("mbsync", "--version"), ("fetchmail", "--version")):
        if shutil.which(tool):
            out = subprocess.run([tool, flag], capture_output=True, text=True, check=False)
            versions[tool] = next((ln for ln in (out.stdout + out.stderr).splitlines()
                                   if "isync" in ln or "release" in ln), "").strip()
    return {"cores": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "dovecot": dovecot, "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg(), **versions}


# --- measuring ---------------------------------------------------------------------

def timed(cmd: list[str], work: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time: wall, CPU (user+sys, incl. children), peak RSS.
    /usr/bin/time is a small process, so the child's peak RSS is its own (ru_maxrss
    carries the parent's size over exec(): measured from here it would be ours)."""
    out = work / "time.out"
    t = time.monotonic()
    proc = subprocess.run([TIME, "-o", str(out), "-f", "%U %S %M", *cmd], capture_output=True,
                          text=True, env=env, check=False)
    wall = time.monotonic() - t
    user, sys_, rss = out.read_text().strip().splitlines()[-1].split()
    return {"wall_s": round(wall, 3), "cpu_s": round(float(user) + float(sys_), 3),
            "peak_rss_mb": round(int(rss) / 1024, 1), "rc": proc.returncode,
            "stdout": proc.stdout, "stderr": proc.stderr}


def summarise(runs: list[dict], messages: int, nbytes: int) -> dict:
    wall = statistics.median(r["wall_s"] for r in runs)
    return {"median_wall_s": round(wall, 3), "msgs_per_s": round(messages / wall, 1),
            "mb_per_s": round(nbytes / 1e6 / wall, 2),
            "median_cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 3),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "runs": [{k: v for k, v in r.items() if k not in ("stdout", "stderr")}
                     for r in runs]}


# --- the tools ---------------------------------------------------------------------

class Bench:
    def __init__(self, args, work: Path, old: DovecotServer, new: DovecotServer):
        self.args = args
        self.work = work
        self.old = old
        self.new = new
        self.counter = 0

    def fresh_dir(self, name: str) -> Path:
        self.counter += 1
        path = self.work / f"{self.counter:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def fresh_destination(self, name: str):
        self.counter += 1
        return self.new.add_user(f"d{self.counter}-{name}@new.test", f"pw-{self.counter}")

    def drop_destination(self, account) -> None:
        shutil.rmtree(self.new.homes / account.username, ignore_errors=True)

    def destination_count(self, account) -> int:
        out = self.new.doveadm("-f", "tab", "mailbox", "status", "-u", account.username,
                               "messages", "*")
        return sum(int(x) for x in out.split()[1:] if x.isdigit())

    def ours(self, config: Path, *extra: str, name: str = "ours", root: Path = ROOT) -> dict:
        cmd = [sys.executable, "-m", "migrate", "run", "-c", str(config), "--no-progress",
               *extra]
        if self.args.profile:  # py-spy, idle samples too: waiting for a server shows
            self.args.profile.mkdir(parents=True, exist_ok=True)
            out = self.args.profile / f"{name}-{self.counter:03d}.txt"
            cmd = [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                   "record", *([] if self.args.profile_cpu else ["--idle"]), "--format",
                   "raw", "--rate", "200", "-o", str(out), "--", *cmd]
        return timed(cmd, self.work, env={**os.environ, "PYTHONPATH": str(root)})

    def imap_copy(self, src, expect: int, workers: int = 1, accounts=None,
                  root: Path = ROOT) -> dict:
        d = self.fresh_dir("imap-copy")
        dst = self.fresh_destination("ours")
        job = imap_job("bench", src, dst)
        if accounts is not None:
            job = self._with_accounts(job, d, accounts(dst))
        path = write_config(d / "config.toml", [job])
        r = self.ours(path, "--workers", str(workers), name="imap-copy", root=root)
        if accounts is None:
            r["delivered"] = self.destination_count(dst)
            self.drop_destination(dst)
        self._check(r, "imap-copy", expect)
        return r

    @staticmethod
    def _with_accounts(job: dict, d: Path, rows: list[tuple]) -> dict:
        csv = d / "accounts.csv"
        csv.write_text("source_user,destination_user,source_password,destination_password\n"
                       + "".join(f"{s.username},{t.username},{s.password},{t.password}\n"
                                 for s, t in rows))
        os.chmod(csv, 0o600)
        job["accounts"] = str(csv)
        for side in ("source", "destination"):
            job[side].pop("username")
            job[side].pop("password")
        return job

    def pop3_archive(self, src, expect: int, root: Path = ROOT) -> dict:
        d = self.fresh_dir("pop3-archive")
        job = {"name": "bench", "kind": "pop3-archive", "source": src.endpoint_toml("pop3"),
               "archive": {"path": str(d / "archive")}}
        r = self.ours(write_config(d / "config.toml", [job]), name="pop3-archive",
                      root=root)
        r["delivered"] = len(os.listdir(d / "archive" / "new"))
        shutil.rmtree(d / "archive")
        self._check(r, "pop3-archive", expect)
        return r

    def mbsync(self, src, expect: int) -> dict:
        d = self.fresh_dir("mbsync")
        dst = self.fresh_destination("mbsync")
        (d / "state").mkdir()
        stores = []
        for name, acc in (("far", src), ("near", dst)):
            stores.append(f"""IMAPAccount {name}
Host localhost
Port {acc.server.ports['imaps']}
User {acc.username}
Pass {acc.password}
SSLType IMAPS
CertificateFile {acc.server.ca_file}

IMAPStore {name}
Account {name}
""")
        rc = d / "mbsyncrc"
        rc.write_text("\n".join(stores) + f"""
Channel bench
Far :far:
Near :near:
Patterns *
Create Both
SyncState {d / 'state'}/
""")
        os.chmod(rc, 0o600)
        r = timed(["mbsync", "-q", "-c", str(rc), "-a"], self.work)
        r["delivered"] = self.destination_count(dst)
        self.drop_destination(dst)
        self._check(r, "mbsync", expect)
        return r

    def fetchmail(self, src, expect: int, delivery: str = "maildir") -> dict:
        d = self.fresh_dir("fetchmail")
        if delivery == "bsmtp":
            how = f'bsmtp "{d / "out.bsmtp"}"'
        else:
            for sub in ("tmp", "new", "cur"):
                (d / "Maildir" / sub).mkdir(parents=True)
            m = d / "Maildir"
            # procmail/maildrop-like: tmp/, fsync, rename into new/ ($$: unique per message)
            how = (f"mda \"/bin/sh -c 'f={m}/tmp/$$; cat > $f && sync $f && "
                   f"mv $f {m}/new/'\"")
        rc = d / "fetchmailrc"
        rc.write_text(
            f'poll localhost service {src.server.ports["pop3s"]} protocol pop3 no envelope\n'
            f'  user "{src.username}" there with password "{src.password}" is "bench" here\n'
            f'  options ssl sslcertck sslcertfile "{src.server.ca_file}" keep fetchall '
            f'{how}\n')
        os.chmod(rc, 0o600)
        env = {**os.environ, "FETCHMAILHOME": str(d), "HOME": str(d)}
        r = timed(["fetchmail", "--nosyslog", "--nodetach", "-f", str(rc)], self.work, env)
        if r["rc"] == 1:  # 1 = no mail; anything delivered gives 0
            r["rc"] = -1
        if r["rc"] != 0:
            self._check(r, "fetchmail", expect)
        if delivery == "bsmtp":
            text = (d / "out.bsmtp").read_bytes()
            r["delivered"] = text.count(b"\r\nDATA\r\n") + text.startswith(b"DATA\r\n") \
                if b"\r\nDATA\r\n" in text else text.count(b"\nDATA\n")
            (d / "out.bsmtp").unlink()
        else:
            r["delivered"] = len(os.listdir(d / "Maildir" / "new"))
            shutil.rmtree(d / "Maildir")
        self._check(r, "fetchmail", expect)
        return r

    @staticmethod
    def _check(r: dict, tool: str, expect: int) -> None:
        if r["rc"] != 0 or ("delivered" in r and r["delivered"] != expect):
            raise SystemExit(f"{tool} failed (exit {r['rc']}, delivered "
                             f"{r.get('delivered')} of {expect}):\n{r['stdout'][-2000:]}"
                             f"\n{r['stderr'][-3000:]}")


def print_table(title: str, results: dict, pairs: list[tuple[str, str]]) -> dict:
    print(f"\n{title}")
    print(f"{'tool':<18}{'wall s':>8}{'msgs/s':>9}{'MB/s':>8}{'CPU s':>8}{'RSS MB':>8}"
          f"  runs (wall s)")
    for tool, s in results.items():
        walls = " ".join(f"{r['wall_s']:.2f}" for r in s["runs"])
        print(f"{tool:<18}{s['median_wall_s']:>8.2f}{s['msgs_per_s']:>9.0f}"
              f"{s['mb_per_s']:>8.1f}{s['median_cpu_s']:>8.2f}{s['peak_rss_mb']:>8.0f}  "
              f"{walls}")
    ratios = {}
    for ours, peer in pairs:
        if ours in results and peer in results:
            ratio = results[ours]["msgs_per_s"] / results[peer]["msgs_per_s"]
            ratios[f"{ours}/{peer}"] = round(ratio, 2)
            print(f"{ours} is {ratio:.2f}x {peer} (msgs/s, median wall)")
    return ratios


# --- modes -------------------------------------------------------------------------

def mode_compare(b: Bench, args) -> dict:
    folders = ["INBOX"] + [f"INBOX.Folder{i}" for i in range(1, args.folders)]
    mail = make_mail(args.messages, args.mb, folders, args.seed)
    nbytes = sum(len(m[1]) for m in mail)
    src = b.old.add_user("imap@old.test", "pw-imap")
    pop = b.old.add_user("pop@old.test", "pw-pop")
    t = time.monotonic()
    fill_fast(src, folders, mail)
    fill_fast(pop, ["INBOX"], [("INBOX", *m[1:]) for m in mail])
    print(f"filled {args.messages} messages, {nbytes / 1e6:.1f} MB in {len(folders)} "
          f"folders (and once more in one POP3 INBOX) in {time.monotonic() - t:.0f} s")
    tools = {"imap-copy": lambda: b.imap_copy(src, args.messages),
             "mbsync": lambda: b.mbsync(src, args.messages),
             "pop3-archive": lambda: b.pop3_archive(pop, args.messages),
             "fetchmail": lambda: b.fetchmail(pop, args.messages),
             "fetchmail-bsmtp": lambda: b.fetchmail(pop, args.messages, "bsmtp")}
    tools = {k: v for k, v in tools.items() if k in args.tools}
    if args.baseline:  # another checkout of mailmigrate, e.g. main, in the same rounds
        if "imap-copy" in tools:
            tools["imap-copy@base"] = lambda: b.imap_copy(src, args.messages,
                                                          root=args.baseline)
        if "pop3-archive" in tools:
            tools["pop3-archive@base"] = lambda: b.pop3_archive(pop, args.messages,
                                                                root=args.baseline)
    runs: dict[str, list] = {k: [] for k in tools}
    names = list(tools)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            r = tools[name]()
            runs[name].append(r)
            print(f"  rep {rep + 1} {name:<13} {r['wall_s']:6.2f} s  CPU {r['cpu_s']:5.2f} s"
                  f"  RSS {r['peak_rss_mb']:4.0f} MB")
    results = {k: summarise(v, args.messages, nbytes) for k, v in runs.items()}
    ratios = print_table(f"{args.messages} messages, {nbytes / 1e6:.1f} MB, {len(folders)} "
                         f"folders; median of {args.reps}", results,
                         [("imap-copy", "mbsync"), ("pop3-archive", "fetchmail"),
                          ("pop3-archive", "fetchmail-bsmtp"), ("imap-copy@base", "mbsync"),
                          ("pop3-archive@base", "fetchmail"),
                          ("imap-copy", "imap-copy@base"),
                          ("pop3-archive", "pop3-archive@base")])
    return {"data": {"messages": args.messages, "bytes": nbytes, "folders": len(folders),
                     "flags": [f for _, f in FLAG_MIX]},
            "fetchmail_delivery": FETCHMAIL_DELIVERY, "results": results,
            "ratios": ratios,
            "targets": {"imap-copy/mbsync": 1.5, "pop3-archive/fetchmail": 4.0}}


def mode_large(b: Bench, args) -> dict:
    size = int(args.large_mb * 1e6)
    body, _ = mailgen.make_message(random.Random(args.seed), 0, size=size, attachment=True)
    src = b.old.add_user("large@old.test", "pw-large")
    fill_fast(src, ["INBOX"], [("INBOX", body, ["\\Seen", "$Label1"], None)])
    print(f"filled one message of {len(body) / 1e6:.1f} MB")
    tools = {"imap-copy": lambda: b.imap_copy(src, 1),
             "pop3-archive": lambda: b.pop3_archive(src, 1),
             "mbsync": lambda: b.mbsync(src, 1),
             "fetchmail": lambda: b.fetchmail(src, 1),
             "fetchmail-bsmtp": lambda: b.fetchmail(src, 1, "bsmtp")}
    tools = {k: v for k, v in tools.items() if k in args.tools}
    if args.baseline:  # another checkout in the same rounds, as in mode_compare
        if "imap-copy" in tools:
            tools["imap-copy@base"] = lambda: b.imap_copy(src, 1, root=args.baseline)
        if "pop3-archive" in tools:
            tools["pop3-archive@base"] = lambda: b.pop3_archive(src, 1, root=args.baseline)
    # Each code root once, untimed: its first run compiles every module into the fresh
    # PYTHONPYCACHEPREFIX (about 0.9 s of CPU), which an installed copy never pays.
    for name in [n for n in tools if n.startswith(("imap-copy", "pop3-archive"))]:
        tools[name]()
    runs = {k: [] for k in tools}
    names = list(tools)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            r = tools[name]()
            runs[name].append(r)
            print(f"  rep {rep + 1} {name:<17} {r['wall_s']:6.2f} s  CPU {r['cpu_s']:5.2f} s"
                  f"  RSS {r['peak_rss_mb']:4.0f} MB")
    results = {k: summarise(v, 1, len(body)) for k, v in runs.items()}
    ratios = print_table(f"one message of {len(body) / 1e6:.1f} MB; median of {args.reps}",
                         results, [("imap-copy", "mbsync"), ("pop3-archive", "fetchmail"),
                                   ("imap-copy@base", "mbsync"),
                                   ("imap-copy", "imap-copy@base"),
                                   ("pop3-archive", "pop3-archive@base")])
    limit = 80
    verdict = {k: results[k]["peak_rss_mb"] <= limit for k in
               ("imap-copy", "pop3-archive", "imap-copy@base", "pop3-archive@base")
               if k in results}
    for k, ok in verdict.items():
        print(f"{k}: peak RSS {results[k]['peak_rss_mb']:.0f} MB "
              f"{'<=' if ok else '>'} {limit} MB")
    return {"data": {"messages": 1, "bytes": len(body)}, "results": results,
            "ratios": ratios, "peak_rss_limit_mb": limit, "within_limit": verdict}


def mode_mailboxes(b: Bench, args) -> dict:
    folders = ["INBOX"] + [f"INBOX.Folder{i}" for i in range(1, 4)]
    pairs = []
    nbytes = 0
    t = time.monotonic()
    for i in range(args.mailboxes):
        src = b.old.add_user(f"box{i}@old.test", f"pw-box-{i}")
        mail = make_mail(args.messages, args.mb, folders, args.seed + i, start=i * 100_000)
        nbytes += sum(len(m[1]) for m in mail)
        fill_fast(src, folders, mail)
        pairs.append(src)
    total = args.mailboxes * args.messages
    print(f"filled {args.mailboxes} mailboxes x {args.messages} messages, "
          f"{nbytes / 1e6:.1f} MB in {time.monotonic() - t:.0f} s")
    runs = {f"imap-copy --workers {w}": [] for w in args.workers}
    for _ in range(args.reps):
        for w in args.workers:
            def accounts(_dst):
                return [(s, b.fresh_destination(f"box{i}")) for i, s in enumerate(pairs)]
            r = b.imap_copy(pairs[0], total, workers=w, accounts=accounts)
            runs[f"imap-copy --workers {w}"].append(r)
            print(f"  --workers {w}: {r['wall_s']:.1f} s, RSS {r['peak_rss_mb']:.0f} MB")
    results = {k: summarise(v, total, nbytes) for k, v in runs.items()}
    print_table(f"{args.mailboxes} mailboxes x {args.messages} messages "
                f"({nbytes / 1e6:.0f} MB); median of {args.reps}", results, [])
    return {"data": {"mailboxes": args.mailboxes, "messages": total, "bytes": nbytes},
            "results": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("compare", "large", "mailboxes"), default="compare")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (round robin)")
    ap.add_argument("--messages", type=int, help="default 2000 (mailboxes: 200 each)")
    ap.add_argument("--mb", type=float, help="default 117 (mailboxes: 11.7 each)")
    ap.add_argument("--folders", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--large-mb", type=float, default=50)
    ap.add_argument("--mailboxes", type=int, default=100)
    ap.add_argument("--workers", type=int, nargs="+", default=[8])
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                    help="also run imap-copy and pop3-archive from this checkout of "
                         "mailmigrate (e.g. a git worktree of main) in the same rounds, "
                         "as imap-copy@base and pop3-archive@base")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="run our jobs under py-spy (raw folded stacks into DIR); the "
                         "timings are then not comparable")
    ap.add_argument("--profile-cpu", action="store_true",
                    help="with --profile: only samples on the CPU (no waiting)")
    ap.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = ap.parse_args()
    mailboxes = args.mode == "mailboxes"
    args.messages = args.messages or (200 if mailboxes else 2000)
    args.mb = args.mb or (11.7 if mailboxes else 117)
    ensure_tools([t.split("-")[0] for t in args.tools if t.startswith(("mbsync", "fetchmail"))]
                 + [TIME])

    ca = trustme.CA()
    old = DovecotServer("cmp-old", ".", ca, inbox_prefix=True)
    new = DovecotServer("cmp-new", "/", ca, inbox_prefix=False)
    work = Path(tempfile.mkdtemp(prefix="mailmigrate-compare-"))
    try:
        for server in (old, new):
            with_common_name(server, ca)
        old.start()
        new.start()
        b = Bench(args, work, old, new)
        report = {"mode": args.mode,
                  "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine(), "repetitions": args.reps}
        report.update({"compare": mode_compare, "large": mode_large,
                       "mailboxes": mode_mailboxes}[args.mode](b, args))
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwritten: {args.json_out}")
        return 0
    finally:
        old.cleanup()
        new.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
