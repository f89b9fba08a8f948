"""A real Courier IMAP/POP3 server (Debian's Courier 5.0) for tests, beside Dovecot.

scripts/install-courier unpacks the Debian packages into a private root (they conflict
with dovecot-imapd).  Courier's binaries have /etc/courier, /run/courier and
/usr/lib/courier-authlib compiled in, so the servers run in a private mount and PID
namespace (``unshare``, root only) where this rig's own directories are mounted over those
paths: nothing on the host changes, and every Courier process dies with the namespace.

Authentication is courier-authlib's authuserdb; the userdb is rebuilt with Courier's own
``makedatprog`` for every new user.  Mailboxes are Maildir++ ('.' separator, "INBOX."
prefix), owned by ``nobody``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import re
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from .dovecot import Account, free_port, start_or_fail, wait_for_greeting

RIG_DIR = Path(os.environ.get("MAILMIGRATE_RIG_DIR", "/var/tmp/mailmigrate-rig"))
ROOT = RIG_DIR / "courier"
INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-courier"

# What Debian's /etc/courier/imapd and pop3d set, minus the automatic Trash purge
# (IMAP_EMPTYTRASH would delete old test mail at logout).
IMAP_ENV = {
    "IMAP_CAPABILITY": "IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT "
                       "THREAD=REFERENCES SORT QUOTA IDLE",
    "IMAP_KEYWORDS": "1",
    "IMAP_ACL": "1",
    "IMAP_PROXY": "0",
    "IMAP_IDLE_TIMEOUT": "60",
    "IMAP_MAILBOX_SANITY_CHECK": "1",
    "IMAP_DISABLETHREADSORT": "0",
    "IMAP_CHECK_ALL_FOLDERS": "0",
    "IMAP_OBSOLETE_CLIENT": "0",
    "IMAP_UMASK": "022",
    "IMAP_USELOCKS": "1",
    "IMAP_SHAREDINDEXFILE": "/etc/courier/shared/index",
    "IMAP_ENHANCEDIDLE": "0",
    "IMAP_TRASHFOLDERNAME": "Trash",
    "IMAP_EMPTYTRASH": "",
    "IMAP_MOVE_EXPUNGE_TO_TRASH": "0",
    "IMAP_TLS_REQUIRED": "0",
    "HEADERFROM": "X-IMAP-Sender",
    "POP3AUTH": "",
    "POP3AUTH_TLS": "",
    "POP3_PROXY": "0",
    "POP3_TLS_REQUIRED": "0",
    "MIME_UNICODE_MESSAGE_TYPE": "message/global",
}
IMAP_ENV["IMAP_CAPABILITY_TLS"] = IMAP_ENV["IMAP_CAPABILITY"] + " AUTH=PLAIN"


class CourierUnavailable(RuntimeError):
    pass


def _sh_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


class CourierServer:
    separator = "."
    inbox_prefix = True

    def __init__(self, name: str, ca):
        if os.geteuid() != 0:
            raise CourierUnavailable("the Courier rig needs root (a private mount namespace "
                                     "and mail owned by nobody)")
        self.name = name
        self.root = ROOT
        self.base = Path(tempfile.mkdtemp(prefix=f"mailmigrate-{name}-"))
        # mail processes run as nobody and must reach their home dirs
        os.chmod(self.base, 0o755)
        self.ports = {k: free_port() for k in ("imap", "imaps", "pop3", "pop3s")}
        self.etc = self.base / "etc"
        self.run_dir = self.base / "run"
        self.homes = self.base / "homes"
        self.log = self.base / "courier.log"
        self.ca_file = self.base / "ca.pem"
        self._proc: subprocess.Popen | None = None
        self._users: dict[str, str] = {}
        for d in (self.etc, self.run_dir / "authdaemon", self.homes, self.base / "ns"):
            d.mkdir(parents=True)
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert = ca.issue_cert("127.0.0.1", "localhost")
        # couriertls wants key and chain in one file, readable only by its owner
        pem = self.etc / "server.pem"
        cert.private_key_pem.write_to_path(str(pem))
        for blob in cert.cert_chain_pems:
            blob.write_to_path(str(pem), append=True)
        nobody = pwd.getpwnam("nobody")
        self.mail_uid, self.mail_gid = nobody.pw_uid, nobody.pw_gid
        # for STARTTLS, imaplogin/courierpop3login run couriertls as the "courier" user
        # (nobody's ids in the namespace), as Debian's postinst makes it own imapd.pem
        os.chmod(pem, 0o600)
        os.chown(pem, self.mail_uid, self.mail_gid)
        os.chown(self.homes, self.mail_uid, self.mail_gid)
        (self.etc / "authdaemonrc").write_text(
            'authmodulelist="authuserdb"\nauthmodulelistorig="authuserdb"\ndaemons=3\n'
            "authdaemonvar=/run/courier/authdaemon\nDEBUG_LOGIN=0\n"
            'DEFAULTOPTIONS=""\nLOGGEROPTS=""\n')
        self._write_userdb()
        self.launcher = self.base / "start.sh"
        self.launcher.write_text(self._launcher())

    # --- configuration -----------------------------------------------------------

    def _launcher(self) -> str:
        r, b = str(self.root), str(self.base)
        p = self.ports
        env = dict(IMAP_ENV, COURIERTLS=f"{r}/usr/bin/couriertls",
                   TLS_CERTFILE="/etc/courier/server.pem", TLS_VERIFYPEER="NONE",
                   
                   LD_LIBRARY_PATH=f"{r}/usr/lib", PATH="/usr/bin:/bin:/usr/sbin:/sbin")
        exports = "\n".join(f"export {k}={_sh_quote(v)}" for k, v in env.items())
        tcpd = f"{r}/usr/sbin/couriertcpd -address=127.0.0.1 -maxprocs=100 -maxperip=100 " \
               "-nodnslookup -noidentlookup"
        tls = f"{r}/usr/bin/couriertls -server -tcpd"
        imap = f"{r}/usr/lib/courier/courier/imaplogin {r}/usr/bin/imapd Maildir"
        pop3 = (f"{r}/usr/lib/courier/courier/courierpop3login "
                f"{r}/usr/lib/courier/courier/courierpop3d Maildir")
        return f"""#!/bin/sh
# generated by the mailmigrate test rig; PID 1 of a private mount+PID namespace
set -eu
R={_sh_quote(r)}
B={_sh_quote(b)}
# A throw-away writable layer over DIR: changes live in a tmpfs, the host's tree stays
# untouched.
overlay() {{
  tag=$(echo "$1" | tr / _)
  mkdir -p "$B/ns/$tag.upper" "$B/ns/$tag.work"
  mount -t overlay mailmigrate-courier \\
    -o "lowerdir=$1,upperdir=$B/ns/$tag.upper,workdir=$B/ns/$tag.work" "$1"
}}
# Mount SOURCE over TARGET, creating a missing TARGET in an overlay of its parent.
graft() {{
  target=$1; source=$2
  if [ ! -d "$target" ]; then
    overlay "$(dirname "$target")"
    mkdir "$target"
  fi
  mount --bind "$source" "$target"
}}
mount -t tmpfs mailmigrate-courier "$B/ns"
# imaplogin and couriertls look up the "courier" user (STARTTLS) that courier-base's
# postinst would create: create it in the namespace only.
overlay /etc
if ! getent passwd courier >/dev/null; then
  echo "courier:x:{self.mail_uid}:{self.mail_gid}:Courier rig:/nonexistent:/usr/sbin/nologin" \\
    >>/etc/passwd
fi
getent group courier >/dev/null || echo "courier:x:{self.mail_gid}:" >>/etc/group
graft /etc/courier "$B/etc"
graft /run/courier "$B/run"
graft /usr/lib/courier-authlib "$R/usr/lib/courier-authlib"
{exports}
umask 022
"$R/usr/lib/courier/courier-authlib/authdaemond" &
i=0
while [ ! -S /run/courier/authdaemon/socket ]; do
  i=$((i + 1)); [ $i -lt 200 ] || {{ echo "authdaemond did not create its socket" >&2; exit 1; }}
  sleep 0.05
done
env IMAP_STARTTLS=YES {tcpd} {p['imap']} {imap} &
env IMAP_TLS=1 IMAP_STARTTLS=NO {tcpd} {p['imaps']} {tls} {imap} &
env POP3_STARTTLS=YES {tcpd} {p['pop3']} {pop3} &
env POP3_TLS=1 POP3_STARTTLS=NO {tcpd} {p['pop3s']} {tls} {pop3} &
wait
"""

    def _write_userdb(self) -> None:
        """userdb.dat / userdbshadow.dat from the users so far, as makeuserdb builds them."""
        makedat = self.root / "usr/lib/courier/courier-authlib/makedatprog"
        records = {"userdb": [], "userdbshadow": []}
        for username, password in self._users.items():
            home = self.homes / username
            records["userdb"].append(
                f"{username}\tuid={self.mail_uid}|gid={self.mail_gid}|home={home}"
                f"|mail={home}/Maildir|_=")
            digest = base64.b64encode(hashlib.sha256(password.encode()).digest()).decode()
            records["userdbshadow"].append(f"{username}\tsystempw={{SHA256}}{digest}")
        if not makedat.exists():
            return  # start() reports the missing installation
        for name, lines in records.items():
            data = "".join(line + "\n" for line in lines) + ".\n"
            proc = subprocess.run([str(makedat), "-", str(self.etc / f"{name}.tmp"),
                                   str(self.etc / f"{name}.dat")], input=data.encode(),
                                  capture_output=True, check=False,
                                  env={**os.environ, "LD_LIBRARY_PATH": f"{self.root}/usr/lib"})
            if proc.returncode != 0:
                raise CourierUnavailable(f"makedatprog {name} failed: "
                                         f"{proc.stderr.decode(errors='replace')}")
        os.chmod(self.etc / "userdbshadow.dat", 0o600)

    # --- lifecycle ---------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        if not (self.root / ".installed").exists():
            raise CourierUnavailable(f"Courier is not installed in {self.root}; run "
                                     f"{INSTALL_SCRIPT} (as root)")
        unshare = shutil.which("unshare") or "/usr/bin/unshare"
        with self.log.open("ab") as log:
            # --kill-child: if unshare dies, the namespace's PID 1 and so all of Courier die
            self._proc = subprocess.Popen(
                [unshare, "--mount", "--propagation", "private", "--pid", "--fork",
                 "--kill-child", "/bin/sh", str(self.launcher)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        problem = wait_for_greeting(self.ports["imap"], timeout, self._proc.poll)
        if problem:
            self.kill()
            raise CourierUnavailable(f"courier ({self.name}) {problem}:\n{self.log_tail()}")

    def _signal(self, sig: int) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to unshare: its --kill-child then ends the namespace and all of Courier
        (couriertcpd runs in process groups of its own, but inside the namespace)."""
        self._signal(signal.SIGTERM)
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no courier log)"

    # --- accounts ----------------------------------------------------------------

    def add_user(self, username: str, password: str) -> Account:
        """A userdb entry and an empty Maildir owned by the mail user."""
        home = self.homes / username
        for sub in ("", "Maildir", "Maildir/cur", "Maildir/new", "Maildir/tmp"):
            path = home / sub
            path.mkdir(mode=0o700, exist_ok=True)
            os.chown(path, self.mail_uid, self.mail_gid)
        self._users[username] = password
        self._write_userdb()
        return Account(self, username, password)


# --- fixtures ----------------------------------------------------------------------

_user_numbers = itertools.count(1)


def ensure_installed() -> None:
    """Run scripts/install-courier (silent and quick once installed), as scripts/test
    installs Dovecot."""
    if (ROOT / ".installed").exists():
        return
    proc = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CourierUnavailable(f"{INSTALL_SCRIPT} failed: {proc.stderr.strip()}")


@pytest.fixture(scope="session")
def courier_host(test_ca):
    try:
        ensure_installed()
        server = CourierServer("courier", test_ca)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Courier is not available: {exc}", pytrace=False)
    start_or_fail(server, "Courier")
    yield server
    server.cleanup()


@pytest.fixture
def courier_account(courier_host, request):
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return courier_host.add_user(f"{name}-{next(_user_numbers)}@courier.test",
                                 "courier-" + uuid.uuid4().hex[:12])
