"""A real Dovecot server for tests: its own config, ports, CA-signed certificate, users.

No systemd and nothing from /etc/dovecot: every dovecot/doveadm call gets ``-c CONF``.
Listens on 127.0.0.1 only, on ports chosen at run time, so the suite runs beside any
other mail server.  As root, the master runs as root with Debian's ``dovecot`` and
``dovenull`` service users and mail is owned by ``nobody``; as a normal user, everything
runs as that user.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"


class DovecotUnavailable(RuntimeError):
    pass


@dataclass
class Account:
    """Connection facts for one test mailbox."""

    server: "DovecotServer"
    username: str
    password: str

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def endpoint_toml(self, protocol: str = "imap", security: str = "ssl",
                      password_env: str | None = None, **extra) -> dict:
        """The [jobs.source]/[jobs.destination] table for this account."""
        port = self.server.ports[f"{protocol}{'s' if security == 'ssl' else ''}"]
        table = {"host": self.host, "port": port, "security": security,
                 "username": self.username, "ca_file": str(self.server.ca_file)}
        if password_env:
            table["password_env"] = password_env
        else:
            table["password"] = self.password
        table.update(extra)
        return table


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_or_fail(server, vendor: str = "Dovecot"):
    """server.start(), or fail the test (never skip) with the reason, cleaning up what
    was started: a green run must mean the behaviour was exercised."""
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001
        server.cleanup()
        pytest.fail(f"the {server.name} {vendor} server could not start: {exc}",
                    pytrace=False)
    return server


def wait_for_greeting(port: int, timeout: float,
                      exited: Callable[[], int | None] | None = None) -> str | None:
    """Poll 127.0.0.1:``port`` until an IMAP server greets ("* OK"), so a test never races
    a server's start.  None when it greeted, else what went wrong (for the error)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        code = exited() if exited else None
        if code is not None:
            return f"exited with {code}"
        try:
            with socket.create_connection(("127.0.0.1", port), 2) as s:
                if s.recv(64).startswith(b"* OK"):
                    return None
        except OSError as exc:
            last_error = exc
        time.sleep(0.05)
    return f"did not greet on port {port}: {last_error}"


class DovecotServer:
    def __init__(self, name: str, separator: str, ca, *, inbox_prefix: bool,
                 special_use: dict[str, str] | None = None, public_namespace: bool = False,
                 master_users: dict[str, str] | None = None,
                 oauth2_introspection_url: str | None = None,
                 oauth2_mechanisms: tuple[str, ...] = ("oauthbearer", "xoauth2"),
                 cert_names: tuple[str, ...] = ("127.0.0.1", "localhost"),
                 extra_config: str = ""):
        self.name = name
        # the names the server's certificate covers (others: a certificate issued for
        # another name than the one the client connects with)
        self.cert_names = cert_names
        # appended to dovecot.conf, e.g. an imap_capability without CONDSTORE
        self.extra_config = extra_config
        # admin (master) users: name -> password; they log in on behalf of any user with
        # SASL PLAIN's authorization identity (off unless given)
        self.master_users = master_users or {}
        # an oauth2 passdb asking this RFC 7662 introspection URL about bearer tokens,
        # offering these SASL mechanisms (off unless a URL is given)
        self.oauth2_introspection_url = oauth2_introspection_url
        self.oauth2_mechanisms = oauth2_mechanisms
        # a public namespace "Public<sep>" shared by every user (not their own mail)
        self.public_namespace = public_namespace
        self.separator = separator
        self.inbox_prefix = inbox_prefix
        self.special_use = special_use or {}
        self.base = Path(tempfile.mkdtemp(prefix=f"mailmigrate-{name}-"))
        # mail processes run as an unprivileged user and must reach their home dirs
        os.chmod(self.base, 0o755)
        self.ports = {k: free_port() for k in ("imap", "imaps", "pop3", "pop3s")}
        self.conf = self.base / "dovecot.conf"
        # One passwd-file per user: Dovecot re-reads a changed passwd-file at most once a
        # second, but opens a file it has not seen before at once.
        self.users_dir = self.base / "users"
        self.homes = self.base / "homes"
        self.log = self.base / "dovecot.log"
        self.ca_file = self.base / "ca.pem"
        self._users: list[str] = []
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert = ca.issue_cert(*cert_names)
        cert.cert_chain_pems[0].write_to_path(str(self.base / "cert.pem"))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(self.base / "cert.pem"), append=True)
        cert.private_key_pem.write_to_path(str(self.base / "key.pem"))
        self.mail_uid, self.mail_gid = self._mail_ids()
        self.homes.mkdir()
        os.chown(self.homes, self.mail_uid, self.mail_gid)
        self.users_dir.mkdir()
        os.chmod(self.users_dir, 0o755)
        if self.master_users:
            masters = self.base / "master-users"
            masters.write_text("".join(f"{user}:{{PLAIN}}{password}\n"
                                       for user, password in self.master_users.items()))
            os.chmod(masters, 0o644)
        if self.oauth2_introspection_url:
            oauth2 = self.base / "dovecot-oauth2.conf.ext"
            oauth2.write_text(f"""introspection_mode = post
introspection_url = {self.oauth2_introspection_url}
username_attribute = username
active_attribute = active
active_value = true
""")
            os.chmod(oauth2, 0o644)
        self.conf.write_text(self._config())

    def _mail_ids(self) -> tuple[int, int]:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            return nobody.pw_uid, nobody.pw_gid
        return os.getuid(), os.getgid()

    def _config(self) -> str:
        root = os.geteuid() == 0
        me = pwd.getpwuid(os.getuid()).pw_name
        internal_user = "dovecot" if root else me
        login_user = "dovenull" if root else me
        internal_group = "dovecot" if root else grp.getgrgid(os.getgid()).gr_name
        if self.inbox_prefix:
            ns = (f"  separator = {self.separator}\n  prefix = INBOX{self.separator}\n"
                  "  inbox = yes\n")
            location = "maildir:~/Maildir"
        else:
            ns = f"  separator = {self.separator}\n  prefix =\n  inbox = yes\n"
            location = "maildir:~/Maildir:LAYOUT=fs"
        for mailbox, flag in self.special_use.items():
            ns += f'  mailbox "{mailbox}" {{\n    special_use = {flag}\n    auto = create\n  }}\n'
        public = ""
        if self.public_namespace:
            (self.base / "public").mkdir(exist_ok=True)
            os.chown(self.base / "public", self.mail_uid, self.mail_gid)
            layout = "" if self.inbox_prefix else ":LAYOUT=fs"
            public = (f"namespace public {{\n  type = public\n  separator = {self.separator}\n"
                      f"  prefix = Public{self.separator}\n"
                      f"  location = maildir:{self.base}/public{layout}\n"
                      "  list = yes\n}\n")
        p = self.ports
        mechanisms = "plain login"
        passdbs = ""
        if self.master_users:
            # pass = yes: the user logged in on behalf of must still exist in the passdb
            passdbs += ("passdb {\n  driver = passwd-file\n  master = yes\n  pass = yes\n"
                        f"  args = scheme=PLAIN {self.base}/master-users\n}}\n")
        if self.oauth2_introspection_url:
            oauth2 = " ".join(self.oauth2_mechanisms)
            mechanisms += " " + oauth2
            passdbs += ("passdb {\n  driver = oauth2\n"
                        f"  mechanisms = {oauth2}\n"
                        f"  args = {self.base}/dovecot-oauth2.conf.ext\n}}\n")
        return public + f"""# generated by the mailmigrate test rig
instance_name = mailmigrate-{self.name}-{os.getpid()}
base_dir = {self.base}/run
state_dir = {self.base}/state
log_path = {self.log}
info_log_path = {self.log}
protocols = imap pop3
listen = 127.0.0.1
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = {min(self.mail_uid, 1000) if not root else 100}
first_valid_gid = 1
ssl = yes
ssl_cert = <{self.base}/cert.pem
ssl_key = <{self.base}/key.pem
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
mail_location = {location}
mail_max_userip_connections = 100
pop3_uidl_format = %08Xu%08Xv
mail_plugins = quota
protocol imap {{
  mail_plugins = $mail_plugins imap_quota
}}
plugin {{
  quota = count:User quota
  quota_vsizes = yes
  quota_rule = *:storage=10G
}}
{passdbs}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_dir}/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.users_dir}/%u
}}
namespace inbox {{
{ns}}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {p['imap']}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {p['imaps']}
    ssl = yes
  }}
}}
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {p['pop3']}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {p['pop3s']}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service imap-urlauth-login {{
  chroot =
}}
service submission-login {{
  chroot =
}}
service managesieve-login {{
  chroot =
}}
{self.extra_config}
"""

    # --- lifecycle ---------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        if not Path(DOVECOT).exists():
            raise DovecotUnavailable(
                "dovecot is not installed; run scripts/test (installs Debian packages "
                "dovecot-imapd and dovecot-pop3d)")
        # Not capture_output: the daemonised master would keep the pipes open forever.
        errors = self.base / "start.err"
        with errors.open("wb") as err:
            proc = subprocess.run([DOVECOT, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                  stdout=err, stderr=err, check=False)
        if proc.returncode != 0:
            raise DovecotUnavailable(
                f"dovecot ({self.name}) failed to start: {errors.read_text().strip()}\n"
                f"{self.log_tail()}")
        # Readiness: the master daemonises after binding, but wait for a greeting so a
        # test never races the login processes.
        problem = wait_for_greeting(self.ports["imap"], timeout)
        if problem:
            raise DovecotUnavailable(f"dovecot ({self.name}) {problem}\n{self.log_tail()}")

    def stop(self) -> None:
        subprocess.run([DOVECOT, "-c", str(self.conf), "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def kill(self) -> None:
        """Kill the master and every process it started (they share its session)."""
        try:
            pid = int((self.base / "run" / "master.pid").read_text().strip())
            os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError):
            self.stop()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no dovecot log)"

    # --- accounts ----------------------------------------------------------------

    def add_user(self, username: str, password: str, **userdb_fields: str) -> Account:
        """Add a user (its own passwd-file, readable by the auth process)."""
        home = self.homes / username
        extra = " ".join(f"userdb_{k}={v}" for k, v in userdb_fields.items())
        line = (f"{username}:{{PLAIN}}{password}:{self.mail_uid}:{self.mail_gid}::"
                f"{home}::{extra}\n")
        path = self.users_dir / username
        path.write_text(line)
        os.chmod(path, 0o644)
        self._users.append(username)
        return Account(self, username, password)

    def doveadm(self, *args: str) -> str:
        proc = subprocess.run([DOVEADM, "-c", str(self.conf), *args], capture_output=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)} failed: "
                               f"{proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode("utf-8", "replace")
