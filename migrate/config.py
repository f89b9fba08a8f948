"""TOML configuration → frozen dataclasses, validated before any connection.

Every problem is reported (not just the first), each naming the job, the key, what was
expected and what to do.  See config.example.toml for the documented layout.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import math
import re
import shlex
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .secrets import ADMIN_KINDS, TOKEN_COMMAND, PasswordSource
from .secrets import KINDS as PASSWORD_KINDS

IMAP_COPY = "imap-copy"
POP3_ARCHIVE = "pop3-archive"
JOB_KINDS = (IMAP_COPY, POP3_ARCHIVE)
SECURITY_MODES = ("ssl", "starttls", "none")
# "password": LOGIN / USER+PASS; "admin": SASL PLAIN as admin_user on behalf of username
# (a master user); "oauth2": OAUTHBEARER / XOAUTH2 with a token from oauth2_token_command.
AUTH_MODES = ("password", "admin", "oauth2")

# protocol -> {security: default port}
DEFAULT_PORTS = {
    "imap": {"ssl": 993, "starttls": 143, "none": 143},
    "pop3": {"ssl": 995, "starttls": 110, "none": 110},
}
PLAINTEXT_PORTS = {143: "IMAP", 110: "POP3"}
SMTP_PORTS = (25, 465, 587)

JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")
# Deliberately loose: a user part, an @, a domain with a dot.  Typos like a missing
# domain are what we want to catch, not RFC 5322 corner cases.
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

STATE_BACKENDS = ("sqlite", "postgresql")
MAX_TIMEOUT = 86400  # seconds; larger values overflow the socket layer
MAX_LEAVE_DAYS = 36500  # 100 years; far more would overflow date arithmetic
# Bytes that cannot appear in a mail protocol argument, a file name or an environment
# variable name; in a config they are a pasting accident.
CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")
LINE_BREAK_OR_NUL_RE = re.compile(r"[\x00\r\n]")


@dataclass(frozen=True)
class Endpoint:
    """One mail account on a server (source or destination)."""

    protocol: str  # "imap" | "pop3"
    host: str
    port: int
    security: str
    username: str
    # The secret sent at login: the mailbox's password (auth = "password"), the admin's
    # password (auth = "admin") or the command printing an access token (auth = "oauth2").
    password: PasswordSource
    ca_file: Path | None = None
    allow_insecure: bool = False
    timeout: float = 60.0
    max_connections: int = 4
    auth: str = "password"  # one of AUTH_MODES
    admin_user: str | None = None  # auth = "admin": who logs in on behalf of username
    # bytes per second read from (FETCH, RETR) plus written to (APPEND) this server by a
    # job, all its connections together (None: no limit)
    max_bytes_per_second: int | None = None

    @property
    def mailbox_key(self) -> tuple[str, str]:
        """Identity of the mailbox for protocol binding: host + username, case-folded."""
        return (self.host.lower(), self.username.lower())

    def label(self) -> str:
        return f"{self.username} at {self.host}:{self.port}"


@dataclass(frozen=True)
class Archive:
    path: Path
    format: str = "maildir"


@dataclass(frozen=True)
class Folders:
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    name: str
    kind: str
    source: Endpoint
    destination: Endpoint | None = None
    archive: Archive | None = None
    folders: Folders = field(default_factory=Folders)
    delete_after_verify: bool = False
    leave_on_server_days: int | None = None
    other_namespaces: bool = False
    # a cron expression: `mailmigrate worker` runs the job by itself at these times
    schedule: str | None = None


@dataclass(frozen=True)
class Refusal:
    """A job from an accounts file row that cannot run (a bad row): reported as refused
    (exit code 2) while the other rows of the file still run."""

    name: str
    kind: str
    message: str


@dataclass(frozen=True)
class WorkerSettings:
    """[workers]: how `mailmigrate worker` processes on every host keep track of each
    other (all hosts should use the same values)."""

    heartbeat_seconds: float = 10.0  # a worker says it is alive this often
    # a worker silent this long is dead: its mailbox is given to another worker
    stalled_after_seconds: float = 60.0
    retries: int = 2  # a failed mailbox job is tried again this many times (back-off)


@dataclass(frozen=True)
class Config:
    path: Path
    state_url: str
    jobs: tuple[Job, ...]
    refusals: tuple[Refusal, ...] = ()
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    # [[jobs]] entry with an accounts file → the names of its rows' jobs (refused ones
    # too), in file order: --job ENTRY selects them all
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def job(self, name: str) -> Job:
        for job in self.jobs:
            if job.name == name:
                return job
        names = ", ".join(j.name for j in self.jobs)
        raise ConfigError(f"no job named {name!r} in {self.path}; jobs defined: {names}")

    def select(self, names: Sequence[str] | None) -> list[Job | Refusal]:
        """The jobs and refusals to run, in config order: all of them, or those named
        (a job's name, a refused row's name, or an accounts entry's name for all its
        rows).  Raises ConfigError for a name that is none of these."""
        everything: list[Job | Refusal] = [*self.jobs, *self.refusals]
        order = {item.name: i for i, item in enumerate(_config_order(self, everything))}
        if not names:
            return sorted(everything, key=lambda item: order[item.name])
        wanted: set[str] = set()
        for name in names:
            if name in self.groups:
                wanted.update(self.groups[name])
            elif name in order:
                wanted.add(name)
            else:
                shown = ", ".join([j.name for j in self.jobs if not _grouped(self, j.name)]
                                  + sorted(self.groups))
                rows = " (an accounts entry's rows: ENTRY:SOURCE_USER)" if self.groups else ""
                raise ConfigError(f"no job named {name!r} in {self.path}; jobs defined: "
                                  f"{shown}{rows}")
        return sorted((item for item in everything if item.name in wanted),
                      key=lambda item: order[item.name])


def _grouped(config: Config, name: str) -> bool:
    return any(name in rows for rows in config.groups.values())


def _config_order(config: Config, items: list[Job | Refusal]) -> list[Job | Refusal]:
    """Jobs first, each accounts entry's rows in file order, refused rows among them."""
    by_name = {item.name: item for item in items}
    out: list[Job | Refusal] = []
    placed: set[str] = set()
    for job in config.jobs:
        if job.name in placed:
            continue
        group = next((rows for rows in config.groups.values() if job.name in rows), None)
        for name in group or (job.name,):
            if name in by_name and name not in placed:
                out.append(by_name[name])
                placed.add(name)
    out += [item for item in items if item.name not in placed]
    return out


# --- loading -----------------------------------------------------------------------


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(path)!r} does not exist; copy config.example.toml and edit it"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        of = _line_of(raw.decode("utf-8", "replace"), line)
        raise ConfigError(
            f"is not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line}{of}; save the "
            "file as UTF-8", source=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        of = _line_of(text, int(found.group(1))) if found else ""
        raise ConfigError(f"is not valid TOML: {exc}{of}", source=str(path)) from None
    except RecursionError:
        # tomllib recurses once per level of nested arrays / inline tables.
        lines = text.split("\n")
        deepest = max(range(len(lines)), key=lambda i: lines[i].count("[") + lines[i].count("{"))
        raise ConfigError(
            "is not valid TOML for mailmigrate: arrays or tables nested too deeply on line "
            f"{deepest + 1}{_line_of(text, deepest + 1)}", source=str(path)) from None
    except ValueError:
        # Python refuses to convert integers of more than 4300 digits.
        found = re.search(r"[0-9_]{1000}", text)
        line = text.count("\n", 0, found.start()) + 1 if found else 0
        raise ConfigError(
            f"is not valid TOML for mailmigrate: a number is too long on line {line}"
            f"{_line_of(text, line)}", source=str(path)) from None
    return parse(data, base_dir=path.resolve().parent, path=path)


# A key or table header at the start of a TOML line, to say where a syntax error is.
# Never what follows the '=', which may be a password.
_LINE_KEY_RE = re.compile(r"""\s*([A-Za-z0-9_."' -]{1,80}?)\s*=""")
_LINE_TABLE_RE = re.compile(r"""\s*\[\[?\s*([A-Za-z0-9_."' -]{1,80}?)\s*(?:\]|$)""")


def _line_of(text: str, line: int) -> str:
    """", the line of key 'port'" for line number `line` of text, or ""."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return ""
    found = _LINE_TABLE_RE.match(lines[line - 1])
    if found:
        return f", the line of table [{found.group(1)}]"
    found = _LINE_KEY_RE.match(lines[line - 1])
    return f", the line of key {found.group(1)!r}" if found else ""


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, also when the URL does not parse
    (the password of a broken URL is still a password)."""
    scheme, sep, rest = url.partition("://")
    if sep:
        at = rest.rfind("@")
        if at >= 0:
            userinfo = rest[:at]
            if ":" in userinfo:
                rest = userinfo.split(":", 1)[0] + ":***" + rest[at:]
        else:
            # "user:secret/db" (host forgotten): the password sits where a port would.
            end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0] or [len(rest)])
            authority = rest[:end]
            host, colon, port = authority.rpartition(":")
            if colon and not port.isdigit() and not authority.endswith("]"):
                rest = authority.split(":", 1)[0] + ":***" + rest[end:]
        url = scheme + sep + rest
    # libpq also takes password=... among the query parameters.
    return re.sub(r"(?i)\b(pass(?:word|wd)?|pwd)(\s*=\s*)[^&#;\s]*", r"\1\2***", url)


def parse(data: dict[str, Any], base_dir: Path, path: Path | None = None) -> Config:
    v = _Validator()
    _check_keys(v, data, {"state", "jobs", "workers"}, "top level of the config")
    workers = _parse_workers(v, data.get("workers", {}))

    state = data.get("state", {})
    state_url = f"sqlite:///{base_dir / 'mailmigrate.db'}"
    if not isinstance(state, dict):
        v.error(f"[state]: state is {_type_name(state)}; it must be a table, e.g. "
                "[state] url = \"sqlite:///mailmigrate.db\"")
    else:
        _check_keys(v, state, {"url"}, "[state]")
        if "url" in state:
            url = state["url"]
            problem = _state_url_problem(url)
            if problem:
                v.error(f"[state] url{problem}; expected an SQLAlchemy URL starting with "
                        "'sqlite:///' (a file) or 'postgresql+psycopg://' (shared by several "
                        "hosts)")
            else:
                state_url = _resolve_sqlite_url(url, base_dir)

    jobs_raw = data.get("jobs")
    jobs: list[Job] = []
    refusals: list[Refusal] = []
    groups: dict[str, tuple[str, ...]] = {}
    if jobs_raw is None or jobs_raw == []:
        v.error("no jobs defined; add at least one [[jobs]] table (see config.example.toml)")
    elif not isinstance(jobs_raw, list) or not all(isinstance(j, dict) for j in jobs_raw):
        v.error("'jobs' must be written as [[jobs]] tables")
    else:
        seen_names: dict[str, int] = {}
        for index, job_raw in enumerate(jobs_raw, start=1):
            if "accounts" in job_raw:
                expanded = _parse_accounts_entry(v, job_raw, index, base_dir)
                if expanded is None:
                    continue
                entry, rows = expanded
                _claim_name(v, entry, index, seen_names)
                groups[entry] = tuple(item.name for item in rows)
                refusals += [item for item in rows if isinstance(item, Refusal)]
                row_jobs = [item for item in rows if isinstance(item, Job)]
            else:
                job = _parse_job(v, job_raw, index, base_dir)
                row_jobs = [] if job is None else [job]
            for job in row_jobs:
                _claim_name(v, job.name, index, seen_names)
                jobs.append(job)
        _check_protocol_conflicts(v, jobs)

    v.raise_if_any(str(path) if path else None)
    return Config(path=path or base_dir / "config.toml", state_url=state_url, jobs=tuple(jobs),
                  refusals=tuple(refusals), groups=groups, workers=workers)


def _claim_name(v: _Validator, name: str, index: int, seen_names: dict[str, int]) -> None:
    if name in seen_names:
        v.error(
            f"job {name!r} is defined twice (jobs #{seen_names[name]} and "
            f"#{index}); the name of each job must be unique because it selects the "
            "job on the command line and keys its state"
        )
    else:
        seen_names[name] = index


def _state_url_problem(url: object) -> str | None:
    """What is wrong with a [state] url (to follow "[state] url"), or None.
    Never shows a password: the URL is shown redacted."""
    if not isinstance(url, str):
        return f" is {_type_name(url)}"
    shown = _show(redact_url(url))
    if CONTROL_CHARS_RE.search(url):
        return f" = {shown} contains a control character"
    from sqlalchemy.engine import make_url  # only here: check-config, verify need no SQL
    from sqlalchemy.exc import ArgumentError

    try:
        backend = make_url(url).get_backend_name()
    except (ArgumentError, ValueError):
        return f" = {shown} is not a valid database URL"
    if backend not in STATE_BACKENDS:
        return f" = {shown}: database {backend!r} is not supported"
    return None


def _resolve_sqlite_url(url: str, base_dir: Path) -> str:
    """A relative SQLite path is relative to the config file, not the working directory:
    cron runs from / and would otherwise start a fresh, empty state database."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        rest = url[len(prefix):]
        if rest and not rest.startswith(":memory:"):
            return prefix + str(base_dir / rest)
    return url


class _Validator:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def error(self, text: str) -> None:
        self.problems.append(text)

    def raise_if_any(self, source: str | None) -> None:
        if self.problems:
            raise ConfigError(self.problems, source=source)


def _show(value: object, limit: int = 80) -> str:
    """repr() for an error message, cut short: a pasted blob should not flood the log."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return "a very long integer"
    return text if len(text) <= limit else text[:limit - 4] + "..." + text[-1]


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {str: "a string", int: "an integer", float: "a number with a fraction",
            list: "a list", dict: "a table"}.get(type(value), "a date/time")


def _check_keys(v: _Validator, table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, sorted(allowed), n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            v.error(
                f"{where}: unknown key {_show(key)}{suggestion} "
                f"(allowed: {', '.join(sorted(allowed))})"
            )


def _typed(v, table, key, typ, where, default=None, required=False):
    if key not in table:
        if required:
            v.error(f"{where}: missing required key {key!r}")
        return default
    value = table[key]
    # bool is an int in Python; don't accept `port = true`.
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        expected = {str: "a string", int: "an integer", bool: "true or false",
                    list: "a list", dict: "a table"}.get(typ, typ.__name__)
        v.error(f"{where}: {key} = {_show(value)} has the wrong type; expected {expected}")
        return default
    return value


def _parse_job(v: _Validator, raw: dict, index: int, base_dir: Path) -> Job | None:
    name = raw.get("name")
    if "name" not in raw:
        v.error(f"job #{index} of [[jobs]]: missing 'name' (a unique name such as \"alice\")")
        return None
    if not isinstance(name, str) or not name:
        v.error(f"job #{index} of [[jobs]]: name = {_show(name)}; expected a non-empty string such as "
                "\"alice\"")
        return None
    where = f"job {_show(name)}"
    if not JOB_NAME_RE.fullmatch(name):
        v.error(
            f"{where}: name may contain only letters, digits and . _ @ + - "
            "(it is used on the command line)"
        )
    _check_keys(
        v, raw,
        {"name", "kind", "delete_after_verify", "leave_on_server_days", "other_namespaces",
         "source", "destination", "archive", "folders", "accounts", "schedule"},
        f"{where}, [[jobs]]",
    )
    schedule = _typed(v, raw, "schedule", str, where)
    if schedule is not None:
        problem = cron_problem(schedule)
        if problem:
            v.error(f"{where}: schedule = {_show(schedule)}: {problem}; expected a cron "
                    "expression (minute hour day-of-month month day-of-week), e.g. "
                    "\"*/30 * * * *\" for every 30 minutes")
            schedule = None
    kind = raw.get("kind")
    if kind not in JOB_KINDS:
        v.error(f"{where}: kind = {_show(kind)}; expected \"imap-copy\" or \"pop3-archive\"")
        return None
    delete_after_verify = _typed(v, raw, "delete_after_verify", bool, where, default=False)
    other_namespaces = _typed(v, raw, "other_namespaces", bool, where, default=False)
    if other_namespaces and kind != IMAP_COPY:
        v.error(f"{where}: other_namespaces applies to imap-copy jobs only (kind = "
                f"{kind!r}; POP3 has no namespaces); remove it")
    leave_days = _typed(v, raw, "leave_on_server_days", int, where)
    if leave_days is not None:
        if kind != POP3_ARCHIVE:
            v.error(
                f"{where}: leave_on_server_days applies to pop3-archive jobs only; for "
                "imap-copy use delete_after_verify"
            )
        elif not 0 <= leave_days <= MAX_LEAVE_DAYS:
            v.error(f"{where}: leave_on_server_days = {_show(leave_days)}; expected 0 to "
                    f"{MAX_LEAVE_DAYS} days")
        if delete_after_verify:
            v.error(
                f"{where}: delete_after_verify = true and leave_on_server_days are both set; "
                "choose one: delete right after the archive copy is verified, or keep mail "
                f"on the server for {_show(leave_days)} days"
            )

    source_proto = "imap" if kind == IMAP_COPY else "pop3"
    source = _parse_endpoint(v, raw.get("source"), f"{where}, [jobs.source]", source_proto,
                             base_dir)
    destination = archive = None
    folders = Folders()
    if kind == IMAP_COPY:
        if "archive" in raw:
            v.error(f"{where}: [jobs.archive] is for pop3-archive jobs; with kind = "
                    "\"imap-copy\" the job writes to [jobs.destination]")
        destination = _parse_endpoint(v, raw.get("destination"),
                                      f"{where}, [jobs.destination]", "imap", base_dir)
        folders = _parse_folders(v, raw.get("folders", {}), f"{where}, [jobs.folders]")
    else:
        for key in ("destination", "folders"):
            if key in raw:
                v.error(f"{where}: [jobs.{key}] is for imap-copy jobs; with kind = "
                        "\"pop3-archive\" the job writes to [jobs.archive] and POP3 has no "
                        "folders")
        archive = _parse_archive(v, raw.get("archive"), f"{where}, [jobs.archive]", base_dir)
    if source is None:
        return None
    return Job(
        name=name, kind=kind, source=source, destination=destination, archive=archive,
        folders=folders, delete_after_verify=bool(delete_after_verify),
        leave_on_server_days=leave_days, other_namespaces=bool(other_namespaces),
        schedule=schedule,
    )


ACCOUNT_COLUMNS = ("source_user", "destination_user", "source_password",
                   "destination_password", "archive")
# stands in for the accounts file's users while the entry's shared settings are checked
_PLACEHOLDER_USER = "placeholder@accounts.invalid"


def _parse_accounts_entry(v: _Validator, raw: dict, index: int, base_dir: Path
                          ) -> tuple[str, list[Job | Refusal]] | None:
    """A [[jobs]] entry with ``accounts = "FILE.csv"``: one job per row, named
    ENTRY:SOURCE_USER, sharing the entry's settings.  Problems of the entry or the file
    are config errors; a bad row only refuses that row's job."""
    entry = {k: x for k, x in raw.items() if k != "accounts"}
    name = raw.get("name")
    where = f"job {_show(name)}"
    for side in ("source", "destination"):
        table = entry.get(side)
        if isinstance(table, dict) and "username" in table:
            v.error(f"{where}, [jobs.{side}]: username is set, but with accounts = ... each "
                    f"row gives it (column {side}_user); remove username")
            return None
    template = _with_account(entry, _PLACEHOLDER_USER, _PLACEHOLDER_USER, None, None, None,
                             placeholder=True)
    errors_before = len(v.problems)
    job = _parse_job(v, template, index, base_dir)
    accounts = _typed(v, raw, "accounts", str, where)
    if job is None or accounts is None or len(v.problems) > errors_before:
        return None
    path = _path_value(v, accounts, "accounts", where, base_dir)
    if path is None:
        return None
    table = _read_accounts(v, path, f"{where}: accounts = {_show(accounts)}")
    if table is None:
        return None
    items: list[Job | Refusal] = []
    seen: dict[str, int] = {}
    for line, row in table:
        user = row.get("source_user", "")
        problem = None
        if not user:
            problem = "source_user is empty"
        elif user.lower() in seen:
            problem = (f"source_user {user!r} is listed again (first on line "
                       f"{seen[user.lower()]}); list each mailbox once")
        elif "/" in user or user.startswith("."):
            problem = f"source_user {user!r} cannot name a mailbox (a '/' or a leading '.')"
        elif job.kind == IMAP_COPY and row.get("archive"):
            problem = "archive is for pop3-archive entries; leave the column empty"
        elif job.kind == POP3_ARCHIVE and (row.get("destination_user")
                                           or row.get("destination_password")):
            problem = ("destination_user/destination_password are for imap-copy entries; "
                       "leave those columns empty")
        row_name = f"{name}:{user}" if user and problem is None else f"{name}:line-{line}"
        if user and user.lower() not in seen:
            seen[user.lower()] = line
        if problem is None:
            archive = row.get("archive") or (str(job.archive.path / user)
                                              if job.archive else None)
            row_raw = _with_account(entry, user, row.get("destination_user") or user,
                                    row.get("source_password"),
                                    row.get("destination_password"), archive)
            sub = _Validator()
            row_job = _parse_job(sub, row_raw, index, base_dir)
            if row_job is not None and not sub.problems:
                items.append(dataclasses.replace(row_job, name=row_name))
                continue
            problem = "; ".join(sub.problems) or "invalid row"
        items.append(Refusal(row_name, job.kind,
                             f"{path} line {line}: {problem}; this mailbox was skipped, the "
                             "other rows run"))
    if not items:
        v.error(f"{where}: accounts = {_show(accounts)} has a header but no rows; add one "
                "row per mailbox")
        return None
    return name, items


def _with_account(entry: dict, source_user: str, destination_user: str,
                  source_password: str | None, destination_password: str | None,
                  archive: str | None, placeholder: bool = False) -> dict:
    """The entry's raw settings for one account: the row's username and (if given) its
    password in the source/destination tables, the row's archive path."""
    raw = copy.deepcopy(entry)
    for side, user, password in (("source", source_user, source_password),
                                 ("destination", destination_user, destination_password)):
        table = raw.get(side)
        if not isinstance(table, dict):
            continue
        table["username"] = user
        has_source = any(k in table for k in PASSWORD_KINDS)
        if password:
            for kind in PASSWORD_KINDS:
                table.pop(kind, None)
            table["password"] = password
        elif (placeholder and not has_source and table.get("auth", "password") == "password"
              and "oauth2_token_command" not in table):  # the rows may give it
            table["password"] = "placeholder"
    if archive is not None and isinstance(raw.get("archive"), dict):
        raw["archive"]["path"] = archive
    return raw


def _read_accounts(v: _Validator, path: Path, where: str
                   ) -> list[tuple[int, dict[str, str]]] | None:
    """(line number, row) for every row of an accounts CSV; None after reporting why
    the file cannot be used at all."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = [(h or "").strip() for h in (reader.fieldnames or [])]
            rows = []
            for row in reader:
                values = {(k or "").strip(): (x or "").strip() if isinstance(x, str) else ""
                          for k, x in row.items() if k is not None}
                if any(values.values()):
                    rows.append((reader.line_num, values))
    except FileNotFoundError:
        v.error(f"{where}: the file {str(path)!r} does not exist; give a CSV file with a "
                "header row and a source_user column")
        return None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        v.error(f"{where}: the file {str(path)!r} cannot be read: {exc}")
        return None
    if not header or not any(header):
        v.error(f"{where}: the file {str(path)!r} has no header row; its first line must "
                f"name the columns, e.g. source_user,destination_user")
        return None
    unknown = [h for h in header if h not in ACCOUNT_COLUMNS]
    if unknown:
        v.error(f"{where}: the file {str(path)!r} has unknown column(s) "
                f"{', '.join(_show(h) for h in unknown)} (allowed: {', '.join(ACCOUNT_COLUMNS)})")
        return None
    if "source_user" not in header:
        v.error(f"{where}: the file {str(path)!r} has no source_user column; its header row "
                "must name it")
        return None
    if any(r.get("source_password") or r.get("destination_password") for _, r in rows):
        mode = path.stat().st_mode
        if mode & 0o077:
            v.error(f"{where}: the file {str(path)!r} holds passwords but other users can "
                    f"read it (mode {mode & 0o777:o}); run: chmod 600 {shlex.quote(str(path))}")
            return None
    return rows


ENDPOINT_KEYS = {
    "host", "port", "security", "username", *PASSWORD_KINDS, "ca_file",
    "allow_insecure", "allow_short_username", "timeout", "max_connections",
    "auth", "admin_user", *ADMIN_KINDS, TOKEN_COMMAND,
    "max_bytes_per_second",
}


def _parse_endpoint(v, raw, where, protocol, base_dir) -> Endpoint | None:
    section = where.rsplit("[", 1)[-1].rstrip("]")
    if raw is None:
        v.error(f"{where}: missing; add a [{section}] table with host, username and a "
                "password source")
        return None
    if not isinstance(raw, dict):
        v.error(f"{where}: {section.split('.')[-1]} is {_type_name(raw)}; it must be a "
                f"table: [{section}] with host, username and a password source")
        return None
    _check_keys(v, raw, ENDPOINT_KEYS, where)
    host = _typed(v, raw, "host", str, where, required=True)
    if "username" not in raw:
        v.error(f"{where}: missing required key 'username' (or, for many mailboxes, give "
                "the job accounts = \"accounts.csv\": one username per row)")
    username = _typed(v, raw, "username", str, where)
    security = _typed(v, raw, "security", str, where, default="ssl")
    allow_insecure = _typed(v, raw, "allow_insecure", bool, where, default=False)
    allow_short = _typed(v, raw, "allow_short_username", bool, where, default=False)
    timeout = raw.get("timeout", 60)
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not 0 < timeout <= MAX_TIMEOUT or not math.isfinite(timeout)):
        v.error(f"{where}: timeout = {_show(timeout)}; expected a positive number of "
                f"seconds, at most {MAX_TIMEOUT}")
        timeout = 60
    max_conn = _typed(v, raw, "max_connections", int, where, default=4)
    if max_conn < 1 or max_conn > 64:
        v.error(f"{where}: max_connections = {_show(max_conn)}; expected 1 to 64 (servers "
                "limit connections per user, Dovecot to 10 by default)")
        max_conn = 4
    rate = _typed(v, raw, "max_bytes_per_second", int, where)
    if rate is not None and rate < 1024:
        v.error(f"{where}: max_bytes_per_second = {_show(rate)}; expected at least 1024 "
                "(bytes per second, e.g. 1_000_000 for 1 MB/s), or leave it out for no limit")
        rate = None

    if security not in SECURITY_MODES:
        v.error(f"{where}: security = {_show(security)}; expected \"ssl\" (implicit TLS, the "
                "default), \"starttls\" or \"none\"")
        security = "ssl"
    proto_name = protocol.upper()
    default_port = DEFAULT_PORTS[protocol][security]
    port = _typed(v, raw, "port", int, where, default=default_port)
    if not 1 <= port <= 65535:
        v.error(f"{where}: port = {_show(port)}; expected 1 to 65535")
    elif port in SMTP_PORTS:
        v.error(
            f"{where}: port = {port} is an SMTP port (sending mail), not {proto_name}; "
            f"{proto_name} uses {DEFAULT_PORTS[protocol]['ssl']} (SSL/TLS) or "
            f"{DEFAULT_PORTS[protocol]['starttls']} (STARTTLS)"
        )
    elif port in PLAINTEXT_PORTS and security == "ssl":
        tls_port = DEFAULT_PORTS[protocol]["ssl"]
        v.error(
            f"{where}: port = {port} is the plaintext/STARTTLS port but security = \"ssl\" "
            f"(implicit TLS); use port = {tls_port}, or security = \"starttls\" to upgrade "
            f"the connection on port {port}"
        )
    if security == "none" and not allow_insecure:
        v.error(
            f"{where}: security = \"none\" sends the password and all mail unencrypted; use "
            f"\"ssl\" (port {DEFAULT_PORTS[protocol]['ssl']}) or \"starttls\" (port "
            f"{DEFAULT_PORTS[protocol]['starttls']}); set allow_insecure = true only for a "
            "trusted private network"
        )

    if isinstance(host, str) and (not host or any(c.isspace() for c in host) or "://" in host
                                  or "/" in host or CONTROL_CHARS_RE.search(host)):
        v.error(f"{where}: host = {_show(host)}; expected a bare host name such as "
                "\"mail.example.com\" (no scheme, no path, no spaces)")
        host = None
    if isinstance(username, str) and (not username or CONTROL_CHARS_RE.search(username)):
        v.error(f"{where}: username = {_show(username)}; expected the account's login, "
                "usually the full email address, without control characters")
        username = None
    elif isinstance(username, str) and not EMAIL_RE.match(username) and not allow_short:
        v.error(
            f"{where}: username = {_show(username)} is not a full email address; mail "
            "servers almost always expect the full address (e.g. \"jane@example.com\"); set "
            "allow_short_username = true if this server really uses short names"
        )

    auth, admin_user, password = _parse_login(v, raw, where, base_dir)

    ca_file = None
    if "ca_file" in raw:
        ca_value = _typed(v, raw, "ca_file", str, where)
        if ca_value is not None:
            ca_file = _path_value(v, ca_value, "ca_file", where, base_dir)
            if ca_file is not None and not ca_file.is_file():
                v.error(f"{where}: ca_file = {_show(ca_value)} does not exist (resolved to "
                        f"{_show(str(ca_file))}); give the PEM file of the CA that signed the "
                        "server's certificate, or remove ca_file to use the system's CAs")

    if host is None or username is None or password is None:
        return None
    return Endpoint(
        protocol=protocol, host=host, port=port, security=security, username=username,
        password=password, ca_file=ca_file, allow_insecure=bool(allow_insecure),
        timeout=float(timeout), max_connections=max_conn, auth=auth, admin_user=admin_user,
        max_bytes_per_second=rate,
    )


def _parse_login(v, raw, where, base_dir) -> tuple[str, str | None, PasswordSource | None]:
    """(auth, admin_user, the secret to log in with) of an endpoint; each combination of
    auth and secret keys that cannot work is an error naming the keys."""
    user_keys = [k for k in PASSWORD_KINDS if k in raw]
    admin_keys = [k for k in ADMIN_KINDS if k in raw]
    token = TOKEN_COMMAND in raw
    auth = _typed(v, raw, "auth", str, where,
                  default="oauth2" if token and "auth" not in raw else "password")
    if auth not in AUTH_MODES:
        v.error(f"{where}: auth = {_show(auth)}; expected \"password\" (the default: the "
                "mailbox's own password), \"admin\" (admin_user logs in on behalf of "
                "username) or \"oauth2\" (oauth2_token_command)")
        return "password", None, None
    admin_user = None
    if auth == "admin":
        admin_user = _typed(v, raw, "admin_user", str, where)
        if "admin_user" not in raw:
            v.error(f"{where}: auth = \"admin\" needs admin_user, the admin (master user) "
                    "who logs in on behalf of username")
        elif isinstance(admin_user, str) and (not admin_user
                                              or CONTROL_CHARS_RE.search(admin_user)):
            v.error(f"{where}: admin_user = {_show(admin_user)}; expected the admin's login "
                    "name, without control characters")
            admin_user = None
    elif "admin_user" in raw or admin_keys:
        keys = " and ".join((["admin_user"] if "admin_user" in raw else []) + admin_keys)
        v.error(f"{where}: {keys} set but auth = {_show(auth)}; set auth = \"admin\" to log "
                "in as the admin on behalf of username, or remove them")
        return auth, None, None
    if auth != "oauth2" and token:
        v.error(f"{where}: {TOKEN_COMMAND} is set but auth = {_show(auth)}; an access token "
                "replaces the password: remove auth (or set auth = \"oauth2\"), or remove "
                f"{TOKEN_COMMAND}")
        return auth, None, None

    if auth == "admin":
        if user_keys:
            v.error(f"{where}: auth = \"admin\" logs in with the admin's password, so "
                    f"{' and '.join(user_keys)} (the mailbox's own password) must go; give "
                    "the admin's in admin_password_env, admin_password_file, "
                    "admin_password_command or admin_password")
            return auth, None, None
        secret = _parse_password_source(v, raw, where, base_dir, prefix="admin_")
        return auth, admin_user, None if admin_user is None else secret
    if auth == "oauth2":
        if user_keys:
            v.error(f"{where}: {' and '.join(user_keys)} and {TOKEN_COMMAND} are both set; an "
                    "OAuth2 login sends the access token instead of a password: keep one")
            return auth, None, None
        if not token:
            v.error(f"{where}: auth = \"oauth2\" needs {TOKEN_COMMAND}, the command that "
                    "prints an access token, e.g. [\"oauth2-token\", \"alice\"]")
            return auth, None, None
        command = _parse_command(v, raw[TOKEN_COMMAND], TOKEN_COMMAND, where,
                                 "[\"oauth2-token\", \"alice\"]")
        return auth, None, command and PasswordSource("password_command", command, where,
                                                      key=TOKEN_COMMAND)
    return auth, None, _parse_password_source(v, raw, where, base_dir)


def _parse_command(v, value, key, where, example) -> tuple[str, ...] | None:
    if (not isinstance(value, list) or not value
            or not all(isinstance(x, str) and x for x in value)):
        v.error(f"{where}: {key} must be a non-empty list of strings, e.g. {example}")
    elif any("\x00" in x for x in value):
        v.error(f"{where}: {key} contains a NUL character, which no command line can hold; "
                "remove it")
    else:
        return tuple(value)
    return None


def _parse_password_source(v, raw, where, base_dir, prefix: str = "") -> PasswordSource | None:
    """The one password source of an endpoint: password_* keys, or with prefix "admin_"
    the admin_password_* keys."""
    keys = [prefix + k for k in PASSWORD_KINDS]
    given = [k for k in keys if k in raw]
    if not given:
        also = "" if prefix else f" (or {TOKEN_COMMAND} for an OAuth2 login)"
        v.error(f"{where}: no {prefix.replace('_', ' ')}password source; set one of "
                f"{', '.join(keys[:-1])} or {keys[-1]}{also}")
        return None
    if len(given) > 1:
        v.error(f"{where}: {' and '.join(given)} are all set; keep exactly one password source")
        return None
    key = given[0]
    kind = key[len(prefix):]
    value = raw[key]
    if kind == "password_command":
        command = _parse_command(v, value, key, where, "[\"pass\", \"show\", \"mail/alice\"]")
        return command and PasswordSource(kind, command, where, key=key if prefix else "")
    # Never echo the value: it may be the password.
    if not isinstance(value, str) or not value:
        v.error(f"{where}: {key} must be a non-empty string")
    elif kind == "password_env" and ("=" in value or "\x00" in value):
        v.error(f"{where}: {key} must be the name of an environment variable, "
                "e.g. \"ALICE_PASSWORD\" (no '=' or NUL)")
    elif kind == "password" and LINE_BREAK_OR_NUL_RE.search(value):
        v.error(f"{where}: {key} contains a line break or NUL character, which mail "
                "protocols cannot send; check what was pasted")
    elif kind == "password_file":
        path = _path_value(v, value, key, where, base_dir)
        return None if path is None else PasswordSource(kind, str(path), where,
                                                        key=key if prefix else "")
    else:
        return PasswordSource(kind, value, where, key=key if prefix else "")
    return None


def _path_value(v, value: str, key: str, where: str, base_dir: Path) -> Path | None:
    """A path setting resolved against the config's directory, or None (reported)."""
    if not value or "\x00" in value:
        v.error(f"{where}: {key} = {_show(value)}; expected a file path (not empty, no NUL)")
        return None
    try:
        return _resolve_path(value, base_dir)
    except (RuntimeError, KeyError):
        user = value[1:].split("/", 1)[0]
        v.error(f"{where}: {key} = {_show(value)} starts with '~' but the home directory "
                f"of {_show(user) if user else 'the current user'} is unknown; write the "
                "full path")
        return None


def _resolve_path(value: str, base_dir: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _parse_archive(v, raw, where, base_dir) -> Archive | None:
    if raw is None:
        v.error(f"{where}: missing; a pop3-archive job needs [jobs.archive] with path = "
                "\"...\" (the local Maildir)")
        return None
    if not isinstance(raw, dict):
        v.error(f"{where}: archive is {_type_name(raw)}; it must be a table: "
                "[jobs.archive] with path = \"...\" (the local Maildir)")
        return None
    _check_keys(v, raw, {"path", "format"}, where)
    path = _typed(v, raw, "path", str, where, required=True)
    fmt = _typed(v, raw, "format", str, where, default="maildir")
    if fmt != "maildir":
        v.error(f"{where}: format = {_show(fmt)}; only \"maildir\" is supported")
    if path is None:
        return None
    resolved = _path_value(v, path, "path", where, base_dir)
    return None if resolved is None else Archive(path=resolved, format="maildir")


def _parse_folders(v, raw, where) -> Folders:
    if not isinstance(raw, dict):
        v.error(f"{where}: folders is {_type_name(raw)}; it must be a table: [jobs.folders] "
                "with include, exclude and map")
        return Folders()
    _check_keys(v, raw, {"include", "exclude", "map"}, where)
    out = {}
    for key, default in (("include", ["*"]), ("exclude", [])):
        value = raw.get(key, default)
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            v.error(f"{where}: {key} must be a list of folder name patterns, e.g. "
                    "[\"*\"] or [\"INBOX.Archive*\"]")
            value = default
        elif any(LINE_BREAK_OR_NUL_RE.search(x) for x in value):
            v.error(f"{where}: {key} has a pattern with a line break or NUL, which no folder "
                    "name contains")
            value = default
        out[key] = tuple(value)
    mapping = raw.get("map", {})
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(x, str) and x for k, x in mapping.items()
    ):
        v.error(f"{where}: map must be a table of source folder = destination folder, "
                "e.g. { \"INBOX.Sent Messages\" = \"Sent\" }")
        mapping = {}
    elif any(LINE_BREAK_OR_NUL_RE.search(k + x) for k, x in mapping.items()):
        v.error(f"{where}: map has a folder name with a line break or NUL, which IMAP "
                "cannot carry")
        mapping = {}
    return Folders(include=out["include"], exclude=out["exclude"], map=dict(mapping))


def _check_protocol_conflicts(v: _Validator, jobs: list[Job]) -> None:
    """One protocol per mailbox: a POP3 job on a mailbox an IMAP job also reads would
    delete mail the IMAP side still expects (mail "vanishes")."""
    by_mailbox: dict[tuple[str, str], Job] = {}
    for job in jobs:
        key = job.source.mailbox_key
        first = by_mailbox.setdefault(key, job)
        if first.source.protocol != job.source.protocol:
            v.error(
                f"jobs {first.name!r} ({first.source.protocol.upper()}) and {job.name!r} "
                f"({job.source.protocol.upper()}) both read mailbox {job.source.username} on "
                f"{job.source.host} (same [jobs.source] host and username); use one protocol "
                "per mailbox: a POP3 client deletes mail from the server that IMAP clients "
                "still expect, so it seems to vanish"
            )
        elif first is not job and (_deletes(first) or _deletes(job)):
            deleter = first if _deletes(first) else job
            v.error(
                f"jobs {first.name!r} and {job.name!r} both read mailbox "
                f"{job.source.username} on {job.source.host}, and {deleter.name!r} deletes "
                "from it (delete_after_verify / leave_on_server_days): the other job would "
                "silently miss every message deleted before it copied it. Let one job read "
                "each mailbox, or turn deletion off in that job")


def _deletes(job: Job) -> bool:
    return job.delete_after_verify or job.leave_on_server_days is not None


# --- [workers] and schedules ---------------------------------------------------------

WORKER_KEYS = {"heartbeat_seconds", "stalled_after_seconds", "retries"}


def _parse_workers(v: _Validator, raw: object) -> WorkerSettings:
    if not isinstance(raw, dict):
        v.error(f"[workers]: workers is {_type_name(raw)}; it must be a table, e.g. "
                "[workers] stalled_after_seconds = 60")
        return WorkerSettings()
    _check_keys(v, raw, WORKER_KEYS, "[workers]")
    values: dict[str, Any] = {}
    for key, low, high in (("heartbeat_seconds", 0.1, 3600.0),
                           ("stalled_after_seconds", 0.5, 86400.0)):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not low <= value <= high:
            v.error(f"[workers]: {key} = {_show(value)}; expected a number of seconds "
                    f"from {low:g} to {high:g}")
            continue
        values[key] = float(value)
    if "heartbeat_seconds" in values or "stalled_after_seconds" in values:
        beat = values.get("heartbeat_seconds", WorkerSettings.heartbeat_seconds)
        stalled = values.get("stalled_after_seconds", WorkerSettings.stalled_after_seconds)
        if stalled < 2 * beat:
            v.error(f"[workers]: stalled_after_seconds = {stalled:g} must be at least twice "
                    f"heartbeat_seconds = {beat:g}, or live workers would be taken for dead")
    retries = _typed(v, raw, "retries", int, "[workers]")
    if retries is not None:
        if 0 <= retries <= 100:
            values["retries"] = retries
        else:
            v.error(f"[workers]: retries = {_show(retries)}; expected 0 to 100")
    return WorkerSettings(**values)


# cron field ranges: minute hour day-of-month month day-of-week [second]
_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
                ("month", 1, 12), ("day of week", 0, 7), ("second", 0, 59))
_CRON_NAMES = {
    3: {m: i + 1 for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul",
                                         "aug", "sep", "oct", "nov", "dec"))},
    4: {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))},
}
_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                "@hourly"}


def cron_problem(expression: str) -> str | None:
    """What is wrong with a cron expression, or None.  Five fields (minute hour
    day-of-month month day-of-week), or six with seconds last (the croniter order the
    workers use), or a macro such as @hourly."""
    text = expression.strip()
    if text.lower() in _CRON_MACROS:
        return None
    fields = text.split()
    if len(fields) not in (5, 6):
        return f"has {len(fields)} fields, not 5"
    for index, value in enumerate(fields):
        name, low, high = _CRON_FIELDS[index]
        for item in value.split(","):
            problem = _cron_item_problem(item.lower(), low, high, _CRON_NAMES.get(index, {}))
            if problem:
                return f"the {name} field {value!r} {problem} (allowed {low}-{high})"
    return None


def _cron_item_problem(item: str, low: int, high: int, names: dict[str, int]) -> str | None:
    base, slash, step = item.partition("/")
    if slash and not (step.isdigit() and 0 < int(step) <= high - low + 1):
        return "has a bad step"

    def number(text: str) -> int | None:
        if text in names:
            return names[text]
        return int(text) if text.isdigit() and low <= int(text) <= high else None

    if base == "*":
        return None
    first, dash, last = base.partition("-")
    start = number(first)
    end = number(last) if dash else start
    if start is None or end is None:
        return "is out of range"
    return None  # a range like 22-2 wraps around (as croniter, which runs it, reads it)
