"""Error classes, scoped by blast radius, each knowing its exit code.

The engine decides what to do from the class: a MessageError fails one message and the
run goes on; a FolderError skips one folder; a MailboxError ends the job; ConfigError and
SafetyError stop before anything touches a server.  ``transient`` marks errors worth a
reconnect-and-retry (a dropped connection), as opposed to answers that will not change.
"""

from __future__ import annotations

# Documented exit codes (README "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1  # the run finished but something failed (messages, folders, a job)
EXIT_REFUSED = 2  # bad configuration or refused for safety; nothing was touched
EXIT_LOCKED = 3  # another run of the same job is still going


class MigrateError(Exception):
    """Base class: an error with a message meant for the admin, not a traceback."""

    exit_code = EXIT_FAILED
    transient = False


class ConfigError(MigrateError):
    """The configuration is invalid. Carries every problem found, not just the first."""

    exit_code = EXIT_REFUSED

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            text = head + self.problems[0]
        else:
            text = head + f"{len(self.problems)} problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(text)


class SafetyError(MigrateError):
    """Refused because going on could lose mail (e.g. protocol binding)."""

    exit_code = EXIT_REFUSED


class StateError(MigrateError):
    """The state database cannot be used (newer schema, broken invariant)."""

    exit_code = EXIT_REFUSED


class MailboxError(MigrateError):
    """A whole mailbox is unusable: login failed, TLS failed, missing capability."""


class ConnectionLost(MailboxError):
    """The connection dropped; reconnecting may help."""

    transient = True


class FolderError(MigrateError):
    """One folder cannot be processed (cannot create, cannot select)."""


class MessageError(MigrateError):
    """One message failed (rejected by the destination, verification mismatch)."""


class JobLocked(MigrateError):
    """Another run of this job holds its lock (cron started it again too soon)."""

    exit_code = EXIT_LOCKED


class JobLockLost(MigrateError):
    """The run no longer holds its job's lock (the PostgreSQL session holding it ended)
    and could not safely take it again: the job stops before doing anything more."""
