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
import os
import threading
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger, Boolean, Column, DateTime, ForeignKey, Index, Integer, MetaData, String,
    Table, Text, TypeDecorator, UniqueConstraint, bindparam, create_engine, event,
    insert, or_, select, update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.exc import NoSuchModuleError

from .errors import ConfigError, JobLocked, SafetyError, StateError
from .states import State, sources_of

SCHEMA_VERSION = 1

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

# A mailbox on a source server, bound to the first protocol that touched it.
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

jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("kind", String(32), nullable=False),
    Column("mailbox_id", ForeignKey("mailboxes.id"), nullable=True),
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
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("first_seen_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("verified_at", UTCDateTime),
    Column("deleted_at", UTCDateTime),
    UniqueConstraint("folder_id", "source_key", name="uq_message"),
    Index("ix_messages_folder_state", "folder_id", "state"),
)


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


RUN_COUNTERS = ("folders", "copied", "skipped", "flags_updated", "deleted", "failed",
                "vanished", "bytes")


def flags_to_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


def flags_from_text(text: str | None) -> frozenset[str]:
    return frozenset(text.split()) if text else frozenset()


class Store:
    def __init__(self, url: str, clock: Clock = utc_now):
        self.url = url
        self.clock = clock
        self.engine = _make_engine(url)
        # SQLite has one writer at a time. Threads of this process queue on a lock
        # instead of in SQLite's busy handler, which sleeps in steps of up to 100 ms.
        self._write_lock = threading.Lock() if self.engine.dialect.name == "sqlite" \
            else contextlib.nullcontext()
        self._open()

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
        except OperationalError as exc:
            raise StateError(
                f"cannot open state database {self.safe_url}: {exc.orig}; check [state] url "
                "and that the directory is writable / the server is running"
            ) from None

    @contextlib.contextmanager
    def job_lock(self, job_name: str):
        """Hold this job for one run, so that overlapping cron runs cannot both copy the
        same messages.  SQLite: an flock beside the database (the kernel drops it when
        the process dies, even by kill -9).  Other databases: not yet (a lease in the
        database is planned for several hosts)."""
        database = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        if not database or database == ":memory:":
            yield
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
                raise JobLocked(
                    f"job {job_name!r} is already running ({holder or 'another process'}); "
                    "this run did nothing. If it is a cron job, let runs finish before the "
                    "next starts (e.g. flock -n in the crontab)") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock

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

    def bind_mailbox(self, host: str, username: str, protocol: str, job_name: str) -> Binding:
        """Bind host+username to ``protocol`` unless already bound; refuse the other one."""
        host, username = host.lower(), username.lower()
        for _ in range(2):  # second pass after losing an insert race to another host
            existing = self.get_binding(host, username)
            if existing is not None:
                if existing.protocol != protocol:
                    raise SafetyError(
                        f"job {job_name!r} would use {protocol.upper()} on mailbox "
                        f"{username} at {host}, but that mailbox is bound to "
                        f"{existing.protocol.upper()} by job {existing.bound_by_job!r} since "
                        f"{existing.bound_at:%Y-%m-%d %H:%M} UTC. Refused: a POP3 client "
                        "deletes mail from the server that IMAP clients still expect, so "
                        "mail seems to vanish. Use one protocol per mailbox; if the earlier "
                        f"job is finished, release it with: mailmigrate unbind {username} "
                        f"--host {host}"
                    )
                return existing
            try:
                with self._write() as conn:
                    conn.execute(insert(mailboxes).values(
                        host=host, username=username, protocol=protocol,
                        bound_by_job=job_name, bound_at=self.clock()))
            except IntegrityError:
                continue
        binding = self.get_binding(host, username)
        assert binding is not None
        return binding

    def get_binding(self, host: str, username: str) -> Binding | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(mailboxes).where(
                mailboxes.c.host == host.lower(),
                mailboxes.c.username == username.lower())).first()
        if row is None:
            return None
        return Binding(row.host, row.username, row.protocol, row.bound_by_job, row.bound_at)

    def bindings(self, username: str | None = None) -> list[Binding]:
        q = select(mailboxes).order_by(mailboxes.c.host, mailboxes.c.username)
        if username is not None:
            q = q.where(mailboxes.c.username == username.lower())
        with self.engine.connect() as conn:
            return [Binding(r.host, r.username, r.protocol, r.bound_by_job, r.bound_at)
                    for r in conn.execute(q)]

    def unbind(self, username: str, host: str) -> bool:
        with self._write() as conn:
            ids = [r.id for r in conn.execute(select(mailboxes.c.id).where(
                mailboxes.c.username == username.lower(), mailboxes.c.host == host.lower()))]
            if not ids:
                return False
            conn.execute(update(jobs).where(jobs.c.mailbox_id.in_(ids)).values(mailbox_id=None))
            conn.execute(mailboxes.delete().where(mailboxes.c.id.in_(ids)))
            return True

    # --- jobs and runs -----------------------------------------------------------

    def ensure_job(self, name: str, kind: str, host: str | None = None,
                   username: str | None = None) -> int:
        with self._write() as conn:
            mailbox_id = None
            if host and username:
                mailbox_id = conn.execute(select(mailboxes.c.id).where(
                    mailboxes.c.host == host.lower(),
                    mailboxes.c.username == username.lower())).scalar()
            row = conn.execute(select(jobs.c.id, jobs.c.kind).where(jobs.c.name == name)).first()
            if row is not None:
                if row.kind != kind:
                    raise StateError(
                        f"job {name!r} is recorded in the state database as {row.kind}, but "
                        f"the config now says {kind}; give the new job a new name")
                conn.execute(update(jobs).where(jobs.c.id == row.id)
                             .values(mailbox_id=mailbox_id))
                return row.id
        try:
            with self._write() as conn:
                return conn.execute(insert(jobs).values(
                    name=name, kind=kind, mailbox_id=mailbox_id, created_at=self.clock())
                ).inserted_primary_key[0]
        except IntegrityError:
            return self.ensure_job(name, kind, host, username)

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

    def runs(self, job_id: int) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(runs).where(runs.c.job_id == job_id).order_by(runs.c.id))]

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

    # --- messages ----------------------------------------------------------------

    def messages(self, folder_id: int, states: Iterable[State] | None = None
                 ) -> dict[str, MessageRow]:
        q = select(messages).where(messages.c.folder_id == folder_id)
        if states is not None:
            q = q.where(messages.c.state.in_([str(s) for s in states]))
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

    def update_flags(self, changes: Sequence[dict]) -> None:
        """Record the source flags last synced, for [{"id", "flags"}]; no state change."""
        if not changes:
            return
        stmt = (update(messages).where(messages.c.id == bindparam("m_id"))
                .values(flags=bindparam("v_flags"), updated_at=self.clock()))
        with self._write() as conn:
            conn.execute(stmt, [{"m_id": c["id"], "v_flags": flags_to_text(c["flags"])}
                                for c in changes])


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
        first_seen_at=r.first_seen_at)


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
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"[state] url is not a valid database URL: {exc}") from None
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
