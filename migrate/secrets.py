"""Password sources, read lazily and never shown.

A ``PasswordSource`` describes *where* a password comes from.  Its repr and str name the
source kind only, so a config object can be logged or put in an exception safely.  The
same sources hold an admin's password (``admin_password_env`` ...) and the command that
prints an OAuth2 access token (``oauth2_token_command``); ``key`` names the config key.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

KINDS = ("password_env", "password_file", "password_command", "password")
ADMIN_KINDS = tuple(f"admin_{kind}" for kind in KINDS)
TOKEN_COMMAND = "oauth2_token_command"
PASSWORD_COMMAND_TIMEOUT = 60.0  # seconds; a prompt nobody answers must not hang cron


@dataclass(frozen=True)
class PasswordSource:
    kind: str  # one of KINDS
    # The env var name, file path, command, or the literal password.  Excluded from
    # repr/compare so that it cannot leak through logging or tracebacks.
    value: object = field(repr=False, compare=False)
    where: str = ""  # "job 'alice', [jobs.source]" for error messages
    # The config key when it is not `kind` itself: "admin_password_env",
    # "oauth2_token_command" (a password_command whose output is an access token).
    key: str = ""

    @property
    def name(self) -> str:
        return self.key or self.kind

    @property
    def noun(self) -> str:
        return "access token" if self.name == TOKEN_COMMAND else "password"

    def __str__(self) -> str:
        return f"<{self.noun} from {self.name}>"

    def describe(self) -> str:
        if self.kind == "password_env":
            return f"environment variable {self.value}"
        if self.kind == "password_file":
            return f"file {self.value}"
        if self.kind == "password_command":
            return f"command {self.value[0]!r}"  # type: ignore[index]
        return "inline password in the config"

    def reveal(self) -> str:
        """Read the password now.  Raises ConfigError naming the source, never the secret."""
        if self.kind == "password":
            return str(self.value)
        if self.kind == "password_env":
            name = str(self.value)
            secret = os.environ.get(name)
            if not secret:
                other = self.name.replace("_env", "")
                raise ConfigError(
                    f"{self.where}: {self.name} = {name!r} but that environment variable "
                    f"is not set or empty; export it before running, or use {other}_file / "
                    f"{other}_command"
                )
            return secret
        if self.kind == "password_file":
            path = Path(str(self.value))
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"{self.where}: {self.name} {str(path)!r} cannot be read "
                    f"({exc.strerror}); check the path and its permissions"
                ) from None
            except UnicodeDecodeError:
                raise ConfigError(
                    f"{self.where}: {self.name} {str(path)!r} is not UTF-8 text; save "
                    "the password in it as UTF-8"
                ) from None
            secret = text.rstrip("\r\n")
            if not secret:
                raise ConfigError(f"{self.where}: {self.name} {str(path)!r} is empty")
            return secret
        if self.kind == "password_command":
            return self._run_command()
        raise AssertionError(self.kind)

    def _run_command(self) -> str:
        argv = list(self.value)  # type: ignore[call-overload]
        what = f"{self.where}: {self.name} {argv[0]!r}"
        try:
            # A session of its own: on timeout the whole process group goes, including
            # whatever the command started (an agent, a prompt, `sleep &`).
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except FileNotFoundError:
            raise ConfigError(f"{what} does not exist; check the program name, or give "
                              "its full path") from None
        except OSError as exc:
            raise ConfigError(f"{what} cannot be started ({exc.strerror}); check that it "
                              "is an executable program") from None
        try:
            stdout, _ = proc.communicate(timeout=PASSWORD_COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise ConfigError(
                f"{what} did not finish within {PASSWORD_COMMAND_TIMEOUT:g} seconds and was "
                "stopped with every process it started; run it by hand: it probably waits "
                "for input (a passphrase prompt, a locked keyring) or keeps its output open "
                "from a background process"
            ) from None
        if proc.returncode != 0:
            # stdout/stderr are not shown: they may contain the secret.
            raise ConfigError(
                f"{what} exited with status {proc.returncode}; run it by hand to see why"
            )
        try:
            text = stdout.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{what} printed something that is not UTF-8 text; it must "
                              "print the password on its first line") from None
        secret = text.splitlines()[0] if text else ""
        if not secret:
            raise ConfigError(
                f"{what} printed nothing; it must print the {self.noun} on its first line"
            )
        return secret


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group and reap the command.  Its pipes are closed,
    not read: a process that left the group may hold them open for ever."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already gone
        pass
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
