"""Password sources, read lazily and never shown.

A ``PasswordSource`` describes *where* a password comes from.  Its repr and str name the
source kind only, so a config object can be logged or put in an exception safely.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

KINDS = ("password_env", "password_file", "password_command", "password")


@dataclass(frozen=True)
class PasswordSource:
    kind: str  # one of KINDS
    # The env var name, file path, command, or the literal password.  Excluded from
    # repr/compare so that it cannot leak through logging or tracebacks.
    value: object = field(repr=False, compare=False)
    where: str = ""  # "job 'alice', [jobs.source]" for error messages

    def __str__(self) -> str:
        return f"<password from {self.kind}>"

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
                raise ConfigError(
                    f"{self.where}: password_env = {name!r} but that environment variable "
                    "is not set or empty; export it before running, or use password_file / "
                    "password_command"
                )
            return secret
        if self.kind == "password_file":
            path = Path(str(self.value))
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"{self.where}: password_file {str(path)!r} cannot be read "
                    f"({exc.strerror}); check the path and its permissions"
                ) from None
            secret = text.rstrip("\r\n")
            if not secret:
                raise ConfigError(f"{self.where}: password_file {str(path)!r} is empty")
            return secret
        if self.kind == "password_command":
            argv = list(self.value)  # type: ignore[call-overload]
            try:
                proc = subprocess.run(
                    argv, capture_output=True, text=True, timeout=60, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ConfigError(
                    f"{self.where}: password_command {argv[0]!r} could not run "
                    f"({type(exc).__name__}); check that the program exists"
                ) from None
            if proc.returncode != 0:
                # stdout/stderr are not shown: they may contain the secret.
                raise ConfigError(
                    f"{self.where}: password_command {argv[0]!r} exited with status "
                    f"{proc.returncode}; run it by hand to see why"
                )
            secret = proc.stdout.splitlines()[0] if proc.stdout else ""
            if not secret:
                raise ConfigError(
                    f"{self.where}: password_command {argv[0]!r} printed nothing; "
                    "it must print the password on its first line"
                )
            return secret
        raise AssertionError(self.kind)
