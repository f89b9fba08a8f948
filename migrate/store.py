"""The state database: the only module that knows SQLAlchemy.

SQLite by default (WAL, busy timeout, ``BEGIN IMMEDIATE`` so concurrent writers queue
instead of failing), PostgreSQL when several hosts share one migration; the same code
serves both.  Each public method is one transaction, so the engine commits one batch at a
time.  State changes are compare-and-set: an UPDATE that names the states it may come
from, and fails loudly when a row was not in one of them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import threading
import time
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger, Boolean, Column, DateTime, ForeignKey, Index, Integer, MetaData, String,
    Table, Text, TypeDecorator, UniqueConstraint, bindparam, create_engine, event,
    func, insert, or_, select, update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.exc import NoSuchModuleError

from .config import redact_url
from .errors import ConfigError, JobLocked, JobLockLost, SafetyError, StateError
from .states import State, sources_of

SCHEMA_VERSION = 4

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in Python, the same instant in every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the state store")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


metadata = MetaData()

meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# A mailbox on a source server, bound to the first protocol that touched it.  ``host`` is
# only a label ("host:port" as first configured); the server is recognised by its aliases.
mailboxes = Table(
    "mailboxes", metadata,
    Column("id", Integer, primary_key=True),
    Column("host", String(255), nullable=False),
    Column("username", String(320), nullable=False),
    Column("protocol", String(8), nullable=False),
    Column("bound_by_job", String(200), nullable=False),
    Column("bound_at", UTCDateTime, nullable=False),
    UniqueConstraint("host", "username", name="uq_mailbox"),
)

# What identifies the server of a mailbox, whatever name reached it: "cert:<sha256>" of
# its TLS certificate, "ip:<address>" and "name:<host>" of public addresses.  One mailbox
# has several; a job whose server shares any of them with a binding is the same mailbox.
mailbox_aliases = Table(
    "mailbox_aliases", metadata,
    Column("id", Integer, primary_key=True),
    Column("mailbox_id", ForeignKey("mailboxes.id", ondelete="CASCADE"), nullable=False),
    Column("username", String(320), nullable=False),
    Column("alias", String(300), nullable=False),
    UniqueConstraint("username", "alias", name="uq_mailbox_alias"),
)

jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("kind", String(32), nullable=False),
    Column("mailbox_id", ForeignKey("mailboxes.id"), nullable=True),
    # does this job delete from its source mailbox (checked against other readers)
    Column("deletes", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime, nullable=False),
)

runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", ForeignKey("jobs.id"), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("ended_at", UTCDateTime),
    Column("outcome", String(16), nullable=False),  # running | ok | failed | aborted
    Column("dry_run", Boolean, nullable=False, default=False),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("folders", Integer, nullable=False, default=0),
    Column("copied", Integer, nullable=False, default=0),
    Column("skipped", Integer, nullable=False, default=0),
    Column("flags_updated", Integer, nullable=False, default=0),
    Column("deleted", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("vanished", Integer, nullable=False, default=0),
    Column("quarantined", Integer, nullable=False, default=0),
    Column("bytes", BigInteger, nullable=False, default=0),
    Column("error", Text),
)

# For pop3-archive jobs a single pseudo-folder "INBOX" holds the messages.
folders = Table(
    "folders", metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", ForeignKey("jobs.id"), nullable=False),
    Column("source_name", Text, nullable=False),
    Column("destination_name", Text, nullable=False),
    Column("uidvalidity", BigInteger),
    Column("destination_uidvalidity", BigInteger),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("job_id", "source_name", name="uq_folder"),
)

messages = Table(
    "messages", metadata,
    Column("id", Integer, primary_key=True),
    Column("folder_id", ForeignKey("folders.id"), nullable=False),
    # IMAP: "<uidvalidity>:<uid>"; POP3: the UIDL.
    Column("source_key", String(512), nullable=False),
    Column("source_uidvalidity", BigInteger),
    Column("source_uid", BigInteger),
    Column("size", BigInteger, nullable=False),
    Column("message_id", Text),
    Column("sha256", String(64)),
    Column("flags", Text, nullable=False, default=""),  # source flags at last sync
    Column("internaldate", UTCDateTime),
    # IMAP: destination UIDVALIDITY + UID; archive: path relative to the archive root.
    Column("destination_uidvalidity", BigInteger),
    Column("destination_uid", BigInteger),
    Column("destination_path", Text),
    # RFC822.SIZE the destination reported for the verified copy (sources may miscount)
    Column("destination_size", BigInteger),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("verified_at", UTCDateTime),
    Column("deleted_at", UTCDateTime),
    UniqueConstraint("folder_id", "source_key", name="uq_message"),
    # size too: `mailmigrate status` sums messages and bytes by state from the index
    # alone, without reading the table (schema 3; it replaced (folder_id, state))
    Index("ix_messages_folder_state_size", "folder_id", "state", "size"),
    # imap-copy reads a folder's rows by source UID window (schema 4)
    Index("ix_messages_folder_uid", "folder_id", "source_uid"),
)

# imap-copy's folder-skipping shortcut (schema 4): both sides' STATUS as a run that
# finished the folder cleanly last saw it.  A folder whose source and destination still
# answer the same (HIGHESTMODSEQ included) and that holds no unfinished messages is not
# opened at all.  Removed when a sync of the folder starts, written when it ends.
folder_status = Table(
    "folder_status", metadata,
    Column("folder_id", ForeignKey("folders.id"), primary_key=True),
    Column("source_uidvalidity", BigInteger),
    Column("source_uidnext", BigInteger),
    Column("source_messages", BigInteger),
    Column("source_highestmodseq", BigInteger),
    Column("destination_uidvalidity", BigInteger),
    Column("destination_uidnext", BigInteger),
    Column("destination_messages", BigInteger),
    Column("destination_highestmodseq", BigInteger),
    # nothing pending, failed or deleting in the folder when the status was saved
    Column("settled", Boolean, nullable=False, default=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# The four STATUS items of each side, in folder_status column order.
STATUS_FIELDS = ("uidvalidity", "uidnext", "messages", "highestmodseq")


@dataclass(frozen=True)
class Binding:
    host: str
    username: str
    protocol: str
    bound_by_job: str
    bound_at: dt.datetime


@dataclass(frozen=True)
class FolderRow:
    id: int
    source_name: str
    destination_name: str
    uidvalidity: int | None
    destination_uidvalidity: int | None


@dataclass
class MessageRow:
    id: int
    source_key: str
    source_uid: int | None
    size: int
    message_id: str | None
    sha256: str | None
    flags: frozenset[str]
    state: State
    destination_uidvalidity: int | None
    destination_uid: int | None
    destination_path: str | None
    verified_at: dt.datetime | None
    attempts: int
    first_seen_at: dt.datetime | None = None
    destination_size: int | None = None
    internaldate: dt.datetime | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class SavedStatus:
    """folder_status of one folder: each side's (uidvalidity, uidnext, messages,
    highestmodseq) as last seen, and whether the folder was settled then."""

    folder_id: int
    destination_name: str
    source: tuple[int | None, ...]
    destination: tuple[int | None, ...]
    settled: bool


RUN_COUNTERS = ("folders", "copied", "skipped", "flags_updated", "deleted", "failed",
                "vanished", "quarantined", "bytes")

# Columns added after schema version 1: (table, column DDL).
_ADDED_IN_V2 = (("jobs", "deletes BOOLEAN NOT NULL DEFAULT FALSE"),
                ("runs", "quarantined INTEGER NOT NULL DEFAULT 0"),
                ("messages", "destination_size BIGINT"))


def flags_to_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


def flags_from_text(text: str | None) -> frozenset[str]:
    return frozenset(text.split()) if text else frozenset()


class Store:
    def __init__(self, url: str, clock: Clock = utc_now, *, _create: bool = True):
        self.url = url
        self.clock = clock
        self.engine = _make_engine(url)
        # SQLite has one writer at a time. Threads of this process queue on a lock
        # instead of in SQLite's busy handler, which sleeps in steps of up to 100 ms.
        self._write_lock = threading.Lock() if self.engine.dialect.name == "sqlite" \
            else contextlib.nullcontext()
        if _create:
            self._open()

    @classmethod
    def open_existing(cls, url: str) -> Store | None:
        """For the read-only commands (status, failed): the state database as it is, or
        None when there is none yet.  Creates nothing, upgrades nothing, writes nothing."""
        database = sqlite_file(url)
        if database is not None and not os.path.exists(database):
            return None  # connecting would create the file
        store = cls(url, _create=False)
        try:
            with store.engine.connect() as conn:
                if not store.engine.dialect.has_table(conn, "meta"):
                    store.close()
                    return None
                row = conn.execute(
                    select(meta.c.value).where(meta.c.key == "schema_version")).first()
        except DBAPIError as exc:
            store.close()
            raise StateError(f"cannot read state database {store.safe_url}: {exc.orig}") \
                from None
        version = int(row[0]) if row else SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            store.close()
            raise StateError(
                f"state database {store.safe_url} has schema version {version}, but this "
                f"mailmigrate understands up to {SCHEMA_VERSION}; upgrade mailmigrate")
        if version < 2:
            store.close()
            raise StateError(
                f"state database {store.safe_url} has schema version {version} (an older "
                "mailmigrate); the next `mailmigrate run` upgrades it")
        return store

    @contextlib.contextmanager
    def _write(self):
        """One write transaction (BEGIN IMMEDIATE on SQLite)."""
        with self._write_lock, self.engine.connect() as conn:
            conn.execution_options(mm_write=True)
            with conn.begin():
                yield conn

    # --- schema ------------------------------------------------------------------

    def _open(self) -> None:
        try:
            with self._write() as conn:
                if self.engine.dialect.name == "postgresql":
                    # several hosts starting at once: one creates the schema, the others
                    # wait here and then find it
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7270431)")
                version = None
                if self.engine.dialect.has_table(conn, "meta"):
                    row = conn.execute(
                        select(meta.c.value).where(meta.c.key == "schema_version")
                    ).first()
                    version = int(row[0]) if row else None
                if version is not None and version > SCHEMA_VERSION:
                    raise StateError(
                        f"state database {self.safe_url} has schema version {version}, "
                        f"but this mailmigrate understands up to {SCHEMA_VERSION}; upgrade "
                        "mailmigrate (it was written by a newer release), or point [state] "
                        "url at another database"
                    )
                metadata.create_all(conn)
                if version is None:
                    conn.execute(insert(meta).values(key="schema_version",
                                                     value=str(SCHEMA_VERSION)))
                elif version < SCHEMA_VERSION:
                    _upgrade(conn, version)
        except DBAPIError as exc:
            raise StateError(
                f"cannot open state database {self.safe_url}: {exc.orig}; check [state] url "
                "and that the directory is writable / the server is running"
            ) from None

    @contextlib.contextmanager
    def job_lock(self, job_name: str):
        """Hold this job for one run, so that overlapping cron runs cannot both copy the
        same messages.  SQLite: an flock beside the database; PostgreSQL: a session-level
        advisory lock on a connection of its own, held for the run.  Either dies with
        the process (even kill -9), so a crashed run never blocks the next one.

        Yields a ``JobLockHold``: the run asks its ``check()`` at batch boundaries and
        right before deleting, because a PostgreSQL session can end while the process
        lives on (terminated, a database restart, a network cut), and the lock with it."""
        if self.engine.dialect.name == "postgresql":
            with self._pg_job_lock(job_name) as hold:
                yield hold
            return
        database = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        if not database or database == ":memory:":
            yield JobLockHold()
            return
        path = f"{database}.{job_name}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot create lock file {path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                raise _locked(job_name, holder) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_text().encode(), 0)
            yield JobLockHold()  # an flock lives as long as the process: nothing to check
        finally:
            os.close(fd)  # releases the flock

    def _job_lock_session(self):
        # Autocommit: the lock belongs to the session, and the connection must not sit
        # "idle in transaction" for the whole run.
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            # who holds it, for the message the loser prints
            conn.exec_driver_sql("SELECT set_config('application_name', %s, false)",
                                 (f"mailmigrate {_holder_text()}"[:63],))
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _pg_job_lock(self, job_name: str):
        key = _advisory_key(job_name)
        conn = self._job_lock_session()
        try:
            got = conn.exec_driver_sql("SELECT pg_try_advisory_lock(%s)", (key,)).scalar()
            if not got:
                raise _locked(job_name, _lock_holder(conn, key))
        except BaseException:
            conn.close()
            raise
        hold = _PgJobLockHold(self, key, conn)
        try:
            yield hold
        finally:
            conn = hold.conn  # a new session if the lock was taken again
            try:
                conn.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (key,))
            except Exception:  # noqa: BLE001 - closing the session releases it too
                pass
            conn.close()

    def _run_is_running(self, run_id: int) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(runs.c.outcome).where(runs.c.id == run_id)
                                ).scalar() == "running"

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(
                select(meta.c.value).where(meta.c.key == "schema_version")).scalar_one())

    def close(self) -> None:
        self.engine.dispose()

    # --- protocol binding --------------------------------------------------------

    def bind_mailbox(self, aliases: Sequence[str], label: str, username: str, protocol: str,
                     job_name: str, *, deletes: bool = False, check_only: bool = False
                     ) -> Binding | None:
        """Bind the mailbox ``username`` on the server known by ``aliases`` to ``protocol``,
        unless already bound; refuse the other protocol, and refuse a second job on a
        mailbox that one of them deletes from.  ``check_only`` (dry run) writes nothing."""
        username = username.lower()
        aliases = sorted(set(aliases))
        for _ in range(3):  # again after losing an insert race to another host
            existing = self._binding_by_alias(aliases, username)
            if existing is not None:
                mailbox_id, binding = existing
                self._refuse_conflicts(mailbox_id, binding, protocol, job_name, deletes)
                if check_only:
                    return binding
                try:
                    with self._write() as conn:
                        _attach(conn, mailbox_id, username, aliases, job_name, deletes)
                except IntegrityError:
                    continue
                return binding
            if check_only:
                return None
            try:
                with self._write() as conn:
                    mailbox_id = conn.execute(insert(mailboxes).values(
                        host=label.lower(), username=username, protocol=protocol,
                        bound_by_job=job_name, bound_at=self.clock())).inserted_primary_key[0]
                    _attach(conn, mailbox_id, username, aliases, job_name, deletes)
            except IntegrityError:
                continue
        found = self._binding_by_alias(aliases, username)
        if found is None:
            raise StateError(f"cannot record the protocol binding of {username} at {label}")
        return found[1]

    def _binding_by_alias(self, aliases: Sequence[str], username: str
                          ) -> tuple[int, Binding] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(mailboxes).join(mailbox_aliases,
                                       mailbox_aliases.c.mailbox_id == mailboxes.c.id)
                .where(mailbox_aliases.c.username == username,
                       mailbox_aliases.c.alias.in_(list(aliases)))
                .order_by(mailboxes.c.id)).first()
        if row is None:
            return None
        return row.id, Binding(row.host, row.username, row.protocol, row.bound_by_job,
                               row.bound_at)

    def _refuse_conflicts(self, mailbox_id: int, binding: Binding, protocol: str,
                          job_name: str, deletes: bool) -> None:
        unbind = f"mailmigrate unbind {binding.username} --host {binding.host}"
        if binding.protocol != protocol:
            raise SafetyError(
                f"job {job_name!r} would use {protocol.upper()} on mailbox "
                f"{binding.username} at {binding.host}, but that mailbox is bound to "
                f"{binding.protocol.upper()} by job {binding.bound_by_job!r} since "
                f"{binding.bound_at:%Y-%m-%d %H:%M} UTC (the same server, recognised by its "
                "certificate or address, whatever name reaches it). Refused: a POP3 client "
                "deletes mail from the server that IMAP clients still expect, so mail seems "
                "to vanish. Use one protocol per mailbox; if the earlier job is finished, "
                f"release it with: {unbind}")
        with self.engine.connect() as conn:
            others = conn.execute(select(jobs.c.name, jobs.c.deletes).where(
                jobs.c.mailbox_id == mailbox_id, jobs.c.name != job_name)).all()
        clash = [o for o in others if o.deletes or deletes]
        if clash:
            other = clash[0]
            deleter = job_name if deletes else other.name
            raise SafetyError(
                f"jobs {job_name!r} and {other.name!r} both read mailbox {binding.username} "
                f"at {binding.host}, and {deleter!r} deletes from it: the other job would "
                "silently miss every message deleted before it copied it. Refused: let one "
                "job read each mailbox (give it several destinations in turn, or turn "
                f"deletion off in {deleter!r}); if {other.name!r} is gone for good, release "
                f"the mailbox with: {unbind}")

    def bindings(self, username: str | None = None) -> list[Binding]:
        q = select(mailboxes).order_by(mailboxes.c.host, mailboxes.c.username)
        if username is not None:
            q = q.where(mailboxes.c.username == username.lower())
        with self.engine.connect() as conn:
            return [Binding(r.host, r.username, r.protocol, r.bound_by_job, r.bound_at)
                    for r in conn.execute(q)]

    def unbind(self, username: str, host: str) -> bool:
        """Release a binding; ``host`` is its label ("host:port") or just the host part."""
        host = host.lower()
        with self._write() as conn:
            ids = [r.id for r in conn.execute(select(mailboxes.c.id, mailboxes.c.host).where(
                mailboxes.c.username == username.lower()))
                if r.host == host or r.host.rsplit(":", 1)[0] == host]
            if not ids:
                return False
            conn.execute(update(jobs).where(jobs.c.mailbox_id.in_(ids)).values(mailbox_id=None))
            conn.execute(mailbox_aliases.delete().where(mailbox_aliases.c.mailbox_id.in_(ids)))
            conn.execute(mailboxes.delete().where(mailboxes.c.id.in_(ids)))
            return True

    # --- jobs and runs -----------------------------------------------------------

    def ensure_job(self, name: str, kind: str) -> int:
        with self._write() as conn:
            row = conn.execute(select(jobs.c.id, jobs.c.kind).where(jobs.c.name == name)).first()
            if row is not None:
                if row.kind != kind:
                    raise StateError(
                        f"job {name!r} is recorded in the state database as {row.kind}, but "
                        f"the config now says {kind}; give the new job a new name")
                return row.id
        try:
            with self._write() as conn:
                return conn.execute(insert(jobs).values(
                    name=name, kind=kind, deletes=False, created_at=self.clock())
                ).inserted_primary_key[0]
        except IntegrityError:
            return self.ensure_job(name, kind)

    def find_job(self, name: str) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(jobs.c.id).where(jobs.c.name == name)).scalar()

    def start_run(self, job_id: int, dry_run: bool) -> int:
        with self._write() as conn:
            return conn.execute(insert(runs).values(
                job_id=job_id, started_at=self.clock(), outcome="running", dry_run=dry_run,
                hostname=socket.gethostname(), pid=os.getpid(),
                **{c: 0 for c in RUN_COUNTERS})).inserted_primary_key[0]

    def finish_run(self, run_id: int, outcome: str, counts: dict[str, int],
                   error: str | None = None) -> None:
        values = {k: int(counts.get(k, 0)) for k in RUN_COUNTERS}
        with self._write() as conn:
            conn.execute(update(runs).where(runs.c.id == run_id).values(
                ended_at=self.clock(), outcome=outcome, error=error, **values))

    def abort_stale_runs(self, job_id: int) -> int:
        """Runs of this job still marked ``running``: called by the holder of the job's
        lock, so their processes are gone (kill -9, power loss) - they were aborted."""
        with self._write() as conn:
            return conn.execute(update(runs).where(
                runs.c.job_id == job_id, runs.c.outcome == "running").values(
                outcome="aborted", ended_at=self.clock(),
                error="the process ended before the run finished (killed?)")).rowcount

    def runs(self, job_id: int) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(runs).where(runs.c.job_id == job_id).order_by(runs.c.id))]

    # --- read-only views (status, failed) ----------------------------------------

    def job_overview(self, name: str) -> dict | None:
        """A job as recorded: id, kind, and the mailbox it is bound to (or None)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(jobs.c.id, jobs.c.kind, jobs.c.deletes, mailboxes.c.host,
                       mailboxes.c.username, mailboxes.c.protocol)
                .select_from(jobs.outerjoin(mailboxes, mailboxes.c.id == jobs.c.mailbox_id))
                .where(jobs.c.name == name)).first()
        if row is None:
            return None
        binding = None if row.protocol is None else {
            "protocol": row.protocol, "server": row.host, "username": row.username}
        return {"id": row.id, "kind": row.kind, "deletes": bool(row.deletes),
                "binding": binding}

    def last_runs(self, job_id: int) -> tuple[dict | None, dict | None]:
        """The newest run of a job, and the newest one still marked ``running``."""
        with self.engine.connect() as conn:
            last = conn.execute(select(runs).where(runs.c.job_id == job_id)
                                .order_by(runs.c.id.desc()).limit(1)).first()
            running = conn.execute(select(runs).where(runs.c.job_id == job_id,
                                                      runs.c.outcome == "running")
                                   .order_by(runs.c.id.desc()).limit(1)).first()
        return (dict(last._mapping) if last else None,
                dict(running._mapping) if running else None)

    def state_totals(self, job_id: int) -> dict[str, tuple[int, int]]:
        """state → (messages, bytes) over all folders of a job: one aggregate query that
        the (folder_id, state, size) index answers without reading the table."""
        folder_ids = select(folders.c.id).where(folders.c.job_id == job_id)
        totals: dict[str, tuple[int, int]] = {}
        with self.engine.connect() as conn:
            for state, n, size in conn.execute(
                    select(messages.c.state, func.count(), func.coalesce(
                        func.sum(messages.c.size), 0))
                    .where(messages.c.folder_id.in_(folder_ids))
                    .group_by(messages.c.folder_id, messages.c.state)):
                count, total = totals.get(state, (0, 0))
                totals[state] = (count + int(n), total + int(size))
        return totals

    def error_texts(self, job_id: int, limit: int = 500) -> list[tuple[str, int]]:
        """The last errors of this job's failed and quarantined messages, each distinct
        text with how many messages have it, most frequent first."""
        folder_ids = select(folders.c.id).where(folders.c.job_id == job_id)
        n = func.count().label("n")
        with self.engine.connect() as conn:
            return [(text or "(no error recorded)", int(count)) for text, count in conn.execute(
                select(messages.c.last_error, n)
                .where(messages.c.folder_id.in_(folder_ids),
                       messages.c.state.in_([str(State.FAILED), str(State.QUARANTINED)]))
                .group_by(messages.c.last_error).order_by(n.desc()).limit(limit))]

    def problem_messages(self, job_names: Sequence[str]) -> Iterable[dict]:
        """Every failed or quarantined message of these jobs, by job, folder and source
        key, one row at a time (there may be many)."""
        q = (select(jobs.c.name.label("job"), folders.c.source_name.label("folder"),
                    messages.c.source_key, messages.c.source_uid, messages.c.size,
                    messages.c.message_id, messages.c.attempts, messages.c.state,
                    messages.c.last_error, messages.c.updated_at)
             .select_from(messages.join(folders, folders.c.id == messages.c.folder_id)
                          .join(jobs, jobs.c.id == folders.c.job_id))
             .where(jobs.c.name.in_(list(job_names)),
                    messages.c.state.in_([str(State.FAILED), str(State.QUARANTINED)]))
             .order_by(jobs.c.name, folders.c.source_name, messages.c.source_uid,
                       messages.c.source_key))
        with self.engine.connect() as conn:
            for row in conn.execution_options(stream_results=True).execute(q):
                yield dict(row._mapping)

    def job_is_running(self, job_name: str) -> bool:
        """Does a run hold this job's lock right now?  Looked up without taking the lock:
        even a moment's hold could make a run starting then exit with "already running"."""
        if self.engine.dialect.name == "postgresql":
            key = _advisory_key(job_name)
            with self.engine.connect() as conn:
                return bool(conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database()) "
                    "AND classid::bigint = %s AND objid::bigint = %s",
                    (key >> 32, key & 0xFFFFFFFF)).scalar())
        database = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        if not database or database == ":memory:":
            return False
        return flock_held(f"{database}.{job_name}.lock")

    # --- folders -----------------------------------------------------------------

    def folder(self, job_id: int, source_name: str) -> FolderRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(folders).where(
                folders.c.job_id == job_id, folders.c.source_name == source_name)).first()
        return _folder_row(row) if row else None

    def folders(self, job_id: int) -> list[FolderRow]:
        with self.engine.connect() as conn:
            return [_folder_row(r) for r in conn.execute(
                select(folders).where(folders.c.job_id == job_id).order_by(folders.c.id))]

    def upsert_folder(self, job_id: int, source_name: str, destination_name: str,
                      uidvalidity: int | None,
                      destination_uidvalidity: int | None = None) -> FolderRow:
        now = self.clock()
        for _ in range(2):
            existing = self.folder(job_id, source_name)
            try:
                with self._write() as conn:
                    if existing is None:
                        conn.execute(insert(folders).values(
                            job_id=job_id, source_name=source_name,
                            destination_name=destination_name, uidvalidity=uidvalidity,
                            destination_uidvalidity=destination_uidvalidity, updated_at=now))
                    else:
                        conn.execute(update(folders).where(folders.c.id == existing.id).values(
                            destination_name=destination_name, uidvalidity=uidvalidity,
                            destination_uidvalidity=destination_uidvalidity, updated_at=now))
                break
            except IntegrityError:
                continue
        row = self.folder(job_id, source_name)
        assert row is not None
        return row

    # --- folder status (imap-copy's folder-skipping shortcut) -----------------------

    def saved_statuses(self, job_id: int) -> dict[str, SavedStatus]:
        """source folder name → its saved folder_status, for the folders that have one."""
        src = [folder_status.c[f"source_{f}"] for f in STATUS_FIELDS]
        dst = [folder_status.c[f"destination_{f}"] for f in STATUS_FIELDS]
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(folders.c.source_name, folder_status.c.folder_id,
                       folders.c.destination_name, folder_status.c.settled, *src, *dst)
                .join(folders, folders.c.id == folder_status.c.folder_id)
                .where(folders.c.job_id == job_id)).all()
        n = len(STATUS_FIELDS)
        return {r[0]: SavedStatus(r[1], r[2], tuple(r[4:4 + n]), tuple(r[4 + n:4 + 2 * n]),
                                  bool(r[3])) for r in rows}

    def unsettled_folders(self, job_id: int, states: Iterable[State]) -> set[int]:
        """Folders of this job with a message of the folder's current source UIDVALIDITY
        in one of ``states`` (work left, e.g. pending, failed, deleting)."""
        with self.engine.connect() as conn:
            return set(conn.execute(
                select(messages.c.folder_id).distinct()
                .join(folders, folders.c.id == messages.c.folder_id)
                .where(folders.c.job_id == job_id,
                       messages.c.state.in_([str(s) for s in states]),
                       messages.c.source_uidvalidity == folders.c.uidvalidity)).scalars())

    def forget_folder_status(self, folder_id: int) -> None:
        """The folder is being synced: until that ends cleanly it is never skipped."""
        with self._write() as conn:
            conn.execute(folder_status.delete().where(folder_status.c.folder_id == folder_id))

    def save_folder_status(self, folder_id: int, source: Sequence[int | None],
                           destination: Sequence[int | None], settled: bool) -> None:
        """Both sides' (uidvalidity, uidnext, messages, highestmodseq) after a clean sync."""
        values = {"settled": settled, "updated_at": self.clock()}
        values.update({f"source_{f}": v for f, v in zip(STATUS_FIELDS, source, strict=True)})
        values.update({f"destination_{f}": v
                       for f, v in zip(STATUS_FIELDS, destination, strict=True)})
        with self._write() as conn:
            conn.execute(folder_status.delete().where(folder_status.c.folder_id == folder_id))
            conn.execute(insert(folder_status).values(folder_id=folder_id, **values))

    # --- messages ----------------------------------------------------------------

    def messages(self, folder_id: int, states: Iterable[State] | None = None
                 ) -> dict[str, MessageRow]:
        q = select(messages).where(messages.c.folder_id == folder_id)
        if states is not None:
            q = q.where(messages.c.state.in_([str(s) for s in states]))
        with self.engine.connect() as conn:
            return {r.source_key: _message_row(r) for r in conn.execute(q)}

    def messages_in_uid_range(self, folder_id: int, uidvalidity: int, low: int,
                              high: int | None) -> dict[str, MessageRow]:
        """The messages of one source UIDVALIDITY with low <= UID <= high (no upper
        bound for None): a large folder is worked through in such windows."""
        q = select(messages).where(messages.c.folder_id == folder_id,
                                   messages.c.source_uidvalidity == uidvalidity,
                                   messages.c.source_uid >= low)
        if high is not None:
            q = q.where(messages.c.source_uid <= high)
        with self.engine.connect() as conn:
            return {r.source_key: _message_row(r) for r in conn.execute(q)}

    def add_messages(self, folder_id: int, rows: Sequence[dict]) -> dict[str, int]:
        """Insert newly discovered messages in state ``seen``; returns source_key → id.

        ``rows`` hold source_key, size and optionally source_uidvalidity, source_uid,
        message_id, flags (iterable), internaldate.  Keys already present are left alone.
        """
        if not rows:
            return {}
        now = self.clock()
        values = []
        for r in rows:
            values.append({
                "folder_id": folder_id, "source_key": r["source_key"],
                "source_uidvalidity": r.get("source_uidvalidity"),
                "source_uid": r.get("source_uid"), "size": r["size"],
                "message_id": r.get("message_id"),
                "flags": flags_to_text(r.get("flags", ())),
                "internaldate": r.get("internaldate"), "state": str(State.SEEN),
                "attempts": 0, "first_seen_at": now, "updated_at": now,
            })
        keys = [v["source_key"] for v in values]
        with self._write() as conn:
            present = set()
            for chunk in _chunks(keys, 500):
                present.update(conn.execute(select(messages.c.source_key).where(
                    messages.c.folder_id == folder_id,
                    messages.c.source_key.in_(chunk))).scalars())
            fresh = [v for v in values if v["source_key"] not in present]
            if fresh:
                conn.execute(insert(messages), fresh)
            out = {}
            for chunk in _chunks(keys, 500):
                out.update((k, i) for k, i in conn.execute(
                    select(messages.c.source_key, messages.c.id).where(
                        messages.c.folder_id == folder_id, messages.c.source_key.in_(chunk))))
            return out

    def transition(self, to: State, changes: Sequence[dict], *, bump_attempts: bool = False
                   ) -> None:
        """Move messages to state ``to`` in one transaction, compare-and-set.

        Each item of ``changes`` is {"id": ..., other columns...}; all items must carry the
        same keys.  Raises StateError if any message was not in a state from which ``to``
        may be entered (someone else moved it, or the engine has a bug).
        """
        self.apply([(to, changes, bump_attempts)])

    def apply(self, steps: Sequence[tuple[State, Sequence[dict], bool]]) -> None:
        """Several transitions, in order, in ONE transaction (e.g. appending → copied →
        verified for a batch): either all are committed or none."""
        steps = [s for s in steps if s[1]]
        if not steps:
            return
        with self._write() as conn:
            for to, changes, bump in steps:
                self._transition(conn, to, changes, bump)

    def _transition(self, conn, to: State, changes: Sequence[dict], bump: bool) -> None:
        allowed = [str(s) for s in sources_of(to)]
        now = self.clock()
        cols = sorted(k for k in changes[0] if k != "id")
        values = {c: bindparam(f"v_{c}") for c in cols}
        values.update(state=str(to), updated_at=now)
        if to == State.VERIFIED:
            values["verified_at"] = now
        elif to == State.DELETED:
            values["deleted_at"] = now
        if bump:
            values["attempts"] = messages.c.attempts + 1
        # or_ of equalities, not IN: an expanding IN cannot be used with executemany.
        stmt = (update(messages)
                .where(messages.c.id == bindparam("m_id"),
                       or_(*(messages.c.state == s for s in allowed)))
                .values(**values))
        params = [{"m_id": ch["id"], **{f"v_{c}": ch[c] for c in cols}} for ch in changes]
        result = conn.execute(stmt, params)
        if (self.engine.dialect.supports_sane_multi_rowcount
                and result.rowcount != len(params)):
            raise StateError(
                f"state conflict: expected to move {len(params)} messages to {to}, moved "
                f"{result.rowcount}; another run may be working on this job")

    def claimed_destination_uids(self, job_id: int, destination_name: str,
                                 destination_uidvalidity: int, folder_id: int,
                                 source_uidvalidity: int) -> set[int]:
        """Destination UIDs that belong to some message of this job (any state, any source
        folder): a duplicate check must never take one of them for another message.
        Rows of ``folder_id`` from an older source UIDVALIDITY do not count: the same
        messages under new UIDs are about to find those copies again."""
        stale = (messages.c.folder_id == folder_id) & (
            messages.c.source_uidvalidity != source_uidvalidity)
        with self.engine.connect() as conn:
            return set(conn.execute(
                select(messages.c.destination_uid).join(
                    folders, folders.c.id == messages.c.folder_id)
                .where(folders.c.job_id == job_id,
                       folders.c.destination_name == destination_name,
                       messages.c.destination_uidvalidity == destination_uidvalidity,
                       messages.c.destination_uid.is_not(None), ~stale)).scalars())

    def release_quarantine(self, job_id: int) -> int:
        """run --retry-failed: quarantined messages of this job are tried again."""
        folder_ids = select(folders.c.id).where(folders.c.job_id == job_id)
        with self._write() as conn:
            return conn.execute(
                update(messages).where(messages.c.folder_id.in_(folder_ids),
                                       messages.c.state == str(State.QUARANTINED))
                .values(state=str(State.FAILED), attempts=0, updated_at=self.clock())
            ).rowcount

    def update_flags(self, changes: Sequence[dict]) -> None:
        """Record the source flags last synced, for [{"id", "flags"}]; no state change."""
        if not changes:
            return
        stmt = (update(messages).where(messages.c.id == bindparam("m_id"))
                .values(flags=bindparam("v_flags"), updated_at=self.clock()))
        with self._write() as conn:
            conn.execute(stmt, [{"m_id": c["id"], "v_flags": flags_to_text(c["flags"])}
                                for c in changes])

    # --- multi-host workers: meta values, upgrade lock, slots, the task queue ---

    def slot_locks(self) -> SlotLocks:
        """A session of its own holding this process's connection slots (PostgreSQL)."""
        return SlotLocks(self.engine)

    @contextlib.contextmanager
    def upgrade_lock(self):
        """Held while `mailmigrate db upgrade` creates or upgrades both schemas: a second
        host starting at the same time waits here, then finds everything done."""
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            conn.exec_driver_sql("SELECT pg_advisory_lock(%s)", (UPGRADE_LOCK_KEY,))
            try:
                yield
            finally:
                conn.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (UPGRADE_LOCK_KEY,))
        finally:
            conn.close()

    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as conn:
            if conn.execute(update(meta).where(meta.c.key == key)
                            .values(value=value)).rowcount == 0:
                conn.execute(insert(meta).values(key=key, value=value))

    def has_table(self, name: str) -> bool:
        with self.engine.connect() as conn:
            return self.engine.dialect.has_table(conn, name)

    def queue_overview(self, job_names: Sequence[str]) -> dict | None:
        """The task queue as `status` shows it: jobs of the mailbox task by state, the
        newest queue entry of each named job, and the registered workers; None without a
        queue (SQLite, or `mailmigrate db upgrade` never ran)."""
        if self.engine.dialect.name != "postgresql" or not self.has_table("procrastinate_jobs"):
            return None
        with self.engine.connect() as conn:
            counts = {status: int(n) for status, n in conn.exec_driver_sql(
                "SELECT status::text, count(*) FROM procrastinate_jobs WHERE task_name = %s "
                "GROUP BY status", (MAILBOX_TASK,))}
            latest = {row.job: dict(row._mapping) for row in conn.exec_driver_sql(
                "SELECT DISTINCT ON (args->>'job') args->>'job' AS job, id, status::text "
                "AS status, attempts, scheduled_at, worker_id FROM procrastinate_jobs "
                "WHERE task_name = %s AND args->>'job' = ANY(%s) "
                "ORDER BY args->>'job', id DESC", (MAILBOX_TASK, list(job_names)))}
            # silence measured by the database's clock: hosts' clocks may differ
            workers = [dict(row._mapping) for row in conn.exec_driver_sql(
                "SELECT id, last_heartbeat, extract(epoch FROM now() - last_heartbeat) "
                "AS silent_seconds FROM procrastinate_workers ORDER BY id")]
        return {"counts": counts, "latest": latest, "workers": workers}


# Errors of the state database itself (file not writable, server down, disk full), for
# the engine to report as a job error instead of a traceback.
DATABASE_ERRORS = (SQLAlchemyError,)


def database_error_text(exc: BaseException, safe_url: str) -> str:
    detail = getattr(exc, "orig", None) or exc
    text = " ".join(str(detail).split())[:300]
    return (f"state database error ({safe_url}): {text}; check that the database file and "
            "its directory are writable, or that the database server is running")


def sqlite_file(url: str) -> str | None:
    """The file of a SQLite state URL, None for other databases or in-memory ones."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


def flock_held(path: str) -> bool:
    """Is an flock held on this file?  Linux lists every lock in /proc/locks (read, not
    taken); elsewhere a shared lock is tried for a moment and released."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False  # no run of this job ever took its lock here
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            return any(len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == ident
                       for fields in (line.split() for line in f))
    except OSError:
        pass
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _locked(job_name: str, holder: str) -> JobLocked:
    return JobLocked(
        f"job {job_name!r} is already running ({holder or 'another process'}); "
        "this run did nothing. If it is a cron job, let runs finish before the "
        "next starts (e.g. flock -n in the crontab)")


def _lock_holder(conn, key: int) -> str:
    """Who holds the job lock ``key`` right now ("pid N on HOST"), or ""."""
    holder = conn.exec_driver_sql(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
        "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database()) "
        "AND l.classid::bigint = %s AND l.objid::bigint = %s LIMIT 1",
        (key >> 32, key & 0xFFFFFFFF)).scalar()
    return (holder or "").removeprefix("mailmigrate ").strip()


class JobLockHold:
    """A run's hold on its job's lock.  This one (SQLite's flock, or no lock at all)
    cannot be lost while the process lives: ``check`` has nothing to do."""

    def bind_run(self, run_id: int) -> None:
        """The run record of the run holding the lock (see _PgJobLockHold.check)."""

    def check(self) -> str | None:
        """Still held?  None when it is; a note for the admin when it was lost and taken
        again; raises JobLockLost when it is lost for good (the job must stop)."""
        return None


_LOCK_LOST = ("lost the job lock: the state database connection that held it ended{why}; "
              "stopped so that no other run works on this mailbox at the same time; "
              "run again")


class _PgJobLockHold(JobLockHold):
    """The PostgreSQL advisory lock: gone when its session ends.  ``check`` asks the
    session (one round trip, on its own connection); a lost lock is taken again once
    when nobody else has it and no other run started meanwhile (every run that takes
    the lock marks the runs still "running" aborted first, so our run record tells);
    anything else is JobLockLost, for good."""

    def __init__(self, store: Store, key: int, conn):
        self._store = store
        self._key = key
        self.conn = conn
        self._mutex = threading.Lock()  # the job's threads share the one session
        self._run_id: int | None = None
        self._lost: str | None = None

    def bind_run(self, run_id: int) -> None:
        self._run_id = run_id

    def check(self) -> str | None:
        with self._mutex:
            if self._lost is not None:
                raise JobLockLost(self._lost)
            try:
                held = bool(self.conn.exec_driver_sql(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() "
                    "AND locktype = 'advisory' AND granted AND classid::bigint = %s "
                    "AND objid::bigint = %s)",
                    (self._key >> 32, self._key & 0xFFFFFFFF)).scalar())
            except SQLAlchemyError:  # the session ended (or is unusable): so did the lock
                held = False
            if held:
                return None
            try:
                return self._take_again()
            except JobLockLost as exc:
                self._lost = str(exc)
                raise

    def _take_again(self) -> str:
        with contextlib.suppress(Exception):
            self.conn.close()
        try:
            conn = self._store._job_lock_session()
        except DBAPIError as exc:
            raise JobLockLost(_LOCK_LOST.format(
                why=f" and no new one could be opened ({exc.orig})")) from None
        self.conn = conn  # released (or closed) when the run ends, like the first one
        try:
            got = conn.exec_driver_sql("SELECT pg_try_advisory_lock(%s)",
                                       (self._key,)).scalar()
            holder = "" if got else _lock_holder(conn, self._key)
            ours = self._run_id is None or self._store._run_is_running(self._run_id)
        except DBAPIError as exc:
            raise JobLockLost(_LOCK_LOST.format(
                why=f" and taking it again failed ({exc.orig})")) from None
        if not got:
            raise JobLockLost(_LOCK_LOST.format(
                why=f"; another run holds it now ({holder or 'another process'})"))
        if not ours:
            # held now, but another run had it in between and worked on this job
            raise JobLockLost(_LOCK_LOST.format(
                why="; another run took the job meanwhile"))
        return ("the state database connection holding the job lock ended; the lock was "
                "taken again (no other run had taken the job meanwhile)")


def _advisory_key(job_name: str) -> int:
    """A stable non-negative 63-bit key for the job's advisory lock (not hashtext(),
    whose values may change between PostgreSQL major versions)."""
    digest = hashlib.sha256(f"mailmigrate job lock:{job_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _attach(conn, mailbox_id: int, username: str, aliases: Sequence[str], job_name: str,
            deletes: bool) -> None:
    """Remember every alias of the mailbox's server (a renewed certificate, another name
    that reaches it) and which job reads the mailbox, and whether it deletes."""
    known = set(conn.execute(select(mailbox_aliases.c.alias).where(
        mailbox_aliases.c.mailbox_id == mailbox_id)).scalars())
    fresh = [a for a in aliases if a not in known]
    if fresh:
        conn.execute(insert(mailbox_aliases), [
            {"mailbox_id": mailbox_id, "username": username, "alias": a} for a in fresh])
    conn.execute(update(jobs).where(jobs.c.name == job_name)
                 .values(mailbox_id=mailbox_id, deletes=deletes))


def _upgrade(conn, version: int) -> None:
    """Bring an older schema up to date, in the caller's transaction."""
    if version < 2:
        for table, ddl in _ADDED_IN_V2:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {ddl}")
        # version 1 bound mailboxes by the configured host name
        for row in conn.execute(select(mailboxes.c.id, mailboxes.c.host,
                                       mailboxes.c.username)).all():
            conn.execute(insert(mailbox_aliases).values(
                mailbox_id=row.id, username=row.username, alias=f"name:{row.host}"))
    if version < 3:
        conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_messages_folder_state_size "
                             "ON messages (folder_id, state, size)")
        conn.exec_driver_sql("DROP INDEX IF EXISTS ix_messages_folder_state")
    if version < 4:
        # folder_status is a new table, made by create_all() before this runs.  Every
        # folder starts without a saved status: the first run after the upgrade lists
        # every folder, as before.
        conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_messages_folder_uid "
                             "ON messages (folder_id, source_uid)")
    conn.execute(update(meta).where(meta.c.key == "schema_version")
                 .values(value=str(SCHEMA_VERSION)))


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _folder_row(r) -> FolderRow:
    return FolderRow(r.id, r.source_name, r.destination_name, r.uidvalidity,
                     r.destination_uidvalidity)


def _message_row(r) -> MessageRow:
    return MessageRow(
        id=r.id, source_key=r.source_key, source_uid=r.source_uid, size=r.size,
        message_id=r.message_id, sha256=r.sha256, flags=flags_from_text(r.flags),
        state=State(r.state), destination_uidvalidity=r.destination_uidvalidity,
        destination_uid=r.destination_uid,
        destination_path=r.destination_path, verified_at=r.verified_at, attempts=r.attempts,
        first_seen_at=r.first_seen_at, destination_size=r.destination_size,
        internaldate=r.internaldate, last_error=r.last_error)


def _make_engine(url: str) -> Engine:
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False,
                                                      "timeout": 30})
            _tune_sqlite(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except NoSuchModuleError:
        raise ConfigError(
            f"[state] url uses a database driver that is not installed ({url.split(':')[0]}); "
            "for PostgreSQL install the extra: pip install 'mailmigrate[postgres]' and use "
            "postgresql+psycopg://") from None
    except (ArgumentError, ValueError):
        # not {exc}: a mistyped URL's error text can contain its password
        raise ConfigError(f"[state] url = {redact_url(url)!r} is not a valid database URL; "
                          "expected sqlite:///FILE or postgresql+psycopg://USER@HOST/DB") \
            from None
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"[state] url needs the Python module {exc.name!r}; for PostgreSQL install "
            "the extra: pip install 'mailmigrate[postgres]'") from None
    return engine


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Take over transaction control from pysqlite so BEGIN IMMEDIATE can be used.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        # FULL: a committed "verified" must survive power loss before a DELE relies on it.
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # Writers take the lock up front: a deferred transaction that later needs to
        # write can fail with "database is locked" without waiting for busy_timeout.
        # Readers stay deferred, so WAL lets them run beside a writer.
        if conn.get_execution_options().get("mm_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


# --- multi-host workers (migrate/workers.py) -------------------------------------------
# Only what needs SQL lives here: the procrastinate engine itself talks to PostgreSQL
# through its own connector.

# The procrastinate task that runs one mailbox job; status reads the queue by this name.
MAILBOX_TASK = "mailmigrate.run_mailbox_job"
# `mailmigrate db upgrade` on several hosts at once: one at a time (session lock)
UPGRADE_LOCK_KEY = 7270432


def is_postgresql(url: str) -> bool:
    try:
        return make_url(url).get_backend_name() == "postgresql"
    except ArgumentError:
        return False


def libpq_url(url: str) -> str:
    """The [state] URL (SQLAlchemy's postgresql+psycopg://...) as libpq takes it, for
    the task engine's own connections.  Holds the password: never log it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class SlotsLost(StateError):
    """Both sessions holding this process's connection slots ended (the database server
    restarted, the network dropped): the slots may be someone else's by now."""


# the guard's lock keys: the server's key with these bits flipped (stays a signed int32)
_GUARD_BITS = 0x2BAD5EED
# how long a lost session's slots are tried again while another process may be probing
# them (it holds one lock of the pair for a moment, then lets go)
_RETAKE_SECONDS = 5.0


class SlotLocks:
    """Connection slots of servers as PostgreSQL advisory locks ``(server, slot)``, held
    by this process: every process on every host sees the same slots, and a killed
    process's slots are free as soon as its sessions end.

    A slot is a pair of locks held by two sessions of this process, the "slots" session
    and its "guard": a taker needs both.  One session ending alone (terminated by an
    admin, a pooler dropping it) frees only half of each pair, so nobody else can take
    the slots while this process still has connections open on them; ``check`` notices
    the lost session and takes its half again on a new one.  Only when both end at once
    (the server restarted) are the slots lost: ``check`` raises SlotsLost and the caller
    must stop using its connections."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._lock = threading.Lock()
        self._held: set[tuple[int, int]] = set()
        self._sessions = [self._connect(0), self._connect(1)]
        self.retaken = 0  # sessions replaced (for tests and -v)

    def _connect(self, which: int):
        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        role = "slots" if which == 0 else "slots guard"
        conn.exec_driver_sql("SELECT set_config('application_name', %s, false)",
                             (f"mailmigrate {role} {_holder_text()}"[:63],))
        return conn

    @staticmethod
    def _key(which: int, server: int) -> int:
        return server if which == 0 else server ^ _GUARD_BITS

    def _try(self, which: int, server: int, slot: int) -> bool:
        return bool(self._sessions[which].exec_driver_sql(
            "SELECT pg_try_advisory_lock(%s, %s)", (self._key(which, server), slot)).scalar())

    def _unlock(self, which: int, server: int, slot: int) -> None:
        self._sessions[which].exec_driver_sql(
            "SELECT pg_advisory_unlock(%s, %s)", (self._key(which, server), slot))

    def try_take(self, server: int, slot: int) -> bool:
        with self._lock:
            self._check()
            try:
                if not self._try(0, server, slot):
                    return False
                if not self._try(1, server, slot):
                    self._unlock(0, server, slot)
                    return False
            except SQLAlchemyError:
                # a session ended just now: mend it; the half taken, if any, goes with it
                # or is let go, and the caller tries again
                for which in (0, 1):
                    with contextlib.suppress(SQLAlchemyError):
                        self._unlock(which, server, slot)
                self._check()
                return False
            self._held.add((server, slot))
            return True

    def release(self, server: int, slot: int) -> None:
        with self._lock:
            self._held.discard((server, slot))
            for which in (0, 1):
                try:
                    self._unlock(which, server, slot)
                except SQLAlchemyError:  # a lost session holds nothing; check() mends it
                    pass

    def check(self) -> None:
        """Both sessions alive, or the lost one replaced and its halves of the held slots
        taken again; SlotsLost when that is impossible."""
        with self._lock:
            self._check()

    def _check(self) -> None:
        alive = []
        for which in (0, 1):
            try:
                self._sessions[which].exec_driver_sql("SELECT 1")
                alive.append(True)
            except SQLAlchemyError:  # ended, or failed before and not usable any more
                alive.append(False)
        if all(alive):
            return
        if not any(alive) and self._held:
            raise SlotsLost("both database sessions holding this process's connection "
                            f"slots ended; {len(self._held)} slots may be taken by others")
        for which in (0, 1):
            if not alive[which]:
                self._retake(which)

    def _retake(self, which: int) -> None:
        with contextlib.suppress(Exception):
            self._sessions[which].close()
        try:
            self._sessions[which] = self._connect(which)
        except DBAPIError as exc:
            raise SlotsLost(f"a session holding connection slots ended and no new one "
                            f"could be opened: {exc.orig}") from None
        deadline = time.monotonic() + _RETAKE_SECONDS
        todo = set(self._held)
        while todo:
            # the other half of each pair is still ours: another process can only hold
            # this half for a moment (it lets go when the guard half fails)
            todo = {(server, slot) for server, slot in todo
                    if not self._try(which, server, slot)}
            if todo and time.monotonic() > deadline:
                raise SlotsLost(f"{len(todo)} connection slots could not be taken again")
            if todo:
                time.sleep(0.02)
        self.retaken += 1

    def close(self) -> None:
        with self._lock:
            for conn in self._sessions:
                with contextlib.suppress(Exception):
                    conn.close()
