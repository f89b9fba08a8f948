"""verify: the sign-off before cutover - is every source message at the destination?

Compares the two sides themselves, never the state database (which it neither reads nor
creates): a copy the database believes verified but that was removed, altered or
re-flagged since is found all the same.  Read-only: EXAMINE and BODY.PEEK on both IMAP
sides; a POP3 session ends with RSET before QUIT (nothing deleted, nothing marked seen).

Per folder pair (the mapping ``run`` uses) the messages fall into rclone check's buckets:
equal / missing (at the source, not at the destination) / differ (content, flags or
INTERNALDATE) / extra (at the destination only) / error (could not be read).

Matching is by content: the multiset of sha256 digests of the raw messages (BODY.PEEK[]
in size-bounded batches, large messages hashed in chunks by partial FETCH, so memory does
not grow with message size), so two identical source messages need two copies.  Pairs of
equal content then compare flags (those the destination can store) and INTERNALDATE (to
the second).  ``quick`` reads no bodies: Message-ID + size (size + INTERNALDATE without a
Message-ID); it catches an altered copy only when its size changed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import IMAP_COPY, Config, Folders, Job, Refusal
from .endpoints.imap import ImapSession, MessageMeta, SelectInfo
from .endpoints.maildir import file_name
from .endpoints.pop3 import Pop3Message, Pop3Session
from .errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, ConnectionLost, MigrateError
from .folders import FolderPlan, included, plan_folders
from .results import plural

log = logging.getLogger("migrate.verify")

SCHEMA = "mailmigrate.verify/1"
BUCKETS = ("equal", "missing", "differ", "extra", "error")
# Bodies are fetched in batches of at most this many bytes / messages; a message larger
# than CHUNK is hashed piece by piece (partial FETCH), never held whole.
BATCH_BYTES = 2 * 1024 * 1024
BATCH_MESSAGES = 200
CHUNK = 1024 * 1024
POP3_BATCH = 100  # RETRs per pipelined round (each message is hashed as it streams)
TEXT_PROBLEMS = 20  # problems listed in the text output; --json lists them all


# --- results -------------------------------------------------------------------------


@dataclass
class Problem:
    bucket: str  # missing | differ | extra | error
    folder: str | None  # the source folder (for extras: the first one mapped there)
    destination: str | None  # destination folder, or the archive path
    source_uid: int | str | None = None  # IMAP UID, or the POP3 UIDL
    destination_uid: int | str | None = None  # IMAP UID, or the archive file
    message_id: str | None = None
    size: int | None = None
    what: list[str] = field(default_factory=list)  # differ: content / flags / internaldate
    detail: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def text(self) -> str:
        head = self.bucket if self.bucket != "differ" else f"differs ({', '.join(self.what)})"
        pop3 = isinstance(self.source_uid, str) or isinstance(self.destination_uid, str)
        if pop3:  # the source is a POP3 mailbox, the destination an archive file
            where = f"UIDL {self.source_uid}" if self.source_uid is not None else "archive"
            if self.destination_uid is not None:
                where += f" → {self.destination_uid}"
        elif self.bucket == "extra":
            where = (f"{self.destination!r} UID {self.destination_uid} (the destination "
                     f"of {self.folder!r})")
        else:
            where = f"folder {self.folder!r}"
            if self.source_uid is not None:
                where += f" UID {self.source_uid}"
            if self.destination_uid is not None:
                where += f" → {self.destination!r} UID {self.destination_uid}"
        about = [] if pop3 else [self.message_id or "no Message-ID"]
        if self.size is not None:
            about.append(f"{self.size} bytes")
        return f"{head}: {where}" + (f", {', '.join(about)}" if about else "") + \
            (f": {self.detail}" if self.detail else "")


@dataclass
class FolderVerdict:
    source: str
    destination: str
    reason: str  # why it goes there: map, special-use, name
    source_messages: int = 0
    destination_messages: int = 0
    equal: int = 0
    missing: int = 0
    differ: int = 0
    extra: int = 0
    error: int = 0
    # archived files no longer on the POP3 server (deleted after archiving): fine
    archived_not_on_server: int | None = None
    note: str | None = None  # e.g. the folder could not be read at all
    # false: the destination folder is not there (never created, or deleted since), so
    # every source message is missing; said once here, not on each missing message
    destination_exists: bool = True

    @property
    def ok(self) -> bool:
        return not (self.missing or self.differ or self.error or self.note)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["archived_not_on_server"] is None:
            del d["archived_not_on_server"]
        d["ok"] = self.ok
        return d


@dataclass
class JobVerdict:
    name: str
    kind: str
    folders: list[FolderVerdict] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)  # {"folder", "why"}
    problems: list[Problem] = field(default_factory=list)
    error: str | None = None  # the job could not be verified (login, connection)
    refused: bool = False  # a refused accounts row: a configuration problem

    def count(self, name: str) -> int:
        return sum(getattr(f, name) or 0 for f in self.folders)

    @property
    def ok(self) -> bool:
        return self.error is None and all(f.ok for f in self.folders)

    def totals(self) -> dict:
        out = {k: self.count(k) for k in ("source_messages", "destination_messages",
                                          *BUCKETS)}
        if self.kind != IMAP_COPY:
            out["archived_not_on_server"] = self.count("archived_not_on_server")
        return out

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "ok": self.ok, "error": self.error,
                "totals": self.totals(), "folders": [f.as_dict() for f in self.folders],
                "excluded": self.excluded, "problems": [p.as_dict() for p in self.problems]}


# --- entry points ----------------------------------------------------------------------


def verify_jobs(cfg: Config, names: Sequence[str] | None, quick: bool = False,
                on_job: Callable[[JobVerdict], None] | None = None) -> list[JobVerdict]:
    """Verify the selected jobs one after the other (unknown names: ConfigError)."""
    out = []
    for item in cfg.select(names):
        if isinstance(item, Refusal):
            verdict = JobVerdict(item.name, item.kind, error=item.message, refused=True)
        else:
            verdict = verify_job(item, quick)
        out.append(verdict)
        if on_job is not None:
            on_job(verdict)
    return out


def verify_job(job: Job, quick: bool = False) -> JobVerdict:
    verdict = JobVerdict(job.name, job.kind)
    try:
        if job.kind == IMAP_COPY:
            _ImapVerify(job, quick, verdict).run()
        else:
            _Pop3Verify(job, quick, verdict).run()
    except MigrateError as exc:
        verdict.error = str(exc)
    return verdict


def exit_code(verdicts: Iterable[JobVerdict]) -> int:
    verdicts = list(verdicts)
    if any(v.refused for v in verdicts):
        return EXIT_REFUSED
    return EXIT_OK if all(v.ok for v in verdicts) else EXIT_FAILED


def verify_document(verdicts: Sequence[JobVerdict], quick: bool, generated_at: str) -> dict:
    totals = {k: sum(v.totals()[k] for v in verdicts)
              for k in ("source_messages", "destination_messages", *BUCKETS)}
    return {"schema": SCHEMA, "generated_at": generated_at,
            "mode": "quick" if quick else "content",
            "ok": all(v.ok for v in verdicts), "exit_code": exit_code(verdicts),
            "totals": totals, "jobs": [v.as_dict() for v in verdicts]}


def verify_text(v: JobVerdict, limit: int = TEXT_PROBLEMS) -> list[str]:
    """One job: a line per folder, the excluded folders, a total line, the problems."""
    lines = []
    for f in v.folders:
        lines.append(f"{v.name}: {_folder_label(v, f)}: {_judgement(f)}")
    for ex in v.excluded:
        lines.append(f"{v.name}: folder {ex['folder']!r}: excluded ({ex['why']})")
    if v.error is not None:
        lines.append(f"{v.name}: NOT VERIFIED: {v.error}")
    else:
        t = v.totals()
        total = FolderVerdict("", "", "", **{k: t[k] for k in (
            "source_messages", "destination_messages", *BUCKETS)})
        text = _judgement(total)
        unread = sum(1 for f in v.folders if f.note)
        if unread:
            text += f"; {plural(unread, 'folder')} NOT VERIFIED (see above)"
        lines.append(f"{v.name}: total ({plural(len(v.folders), 'folder')}): {text}")
    # Extra messages are not a failure (the destination may hold mail of its own, or copies
    # whose originals were deleted after verification): counted above, listed by --json.
    # Nor is each message of a folder missing at the destination: its folder line says so.
    absent = {(f.source, f.destination) for f in v.folders if not f.destination_exists}
    shown = [p for p in v.problems if p.bucket != "extra"
             and (p.folder, p.destination) not in absent]
    for p in shown[:limit]:
        lines.append(f"{v.name}:   {p.text()}")
    if len(shown) > limit:
        lines.append(f"{v.name}:   … and {len(shown) - limit} more (--json lists all)")
    return lines


def summary_line(verdicts: Sequence[JobVerdict]) -> str | None:
    """The last line when several jobs were verified: which need a look."""
    if len(verdicts) < 2:
        return None
    bad = [v.name for v in verdicts if not v.ok]
    if not bad:
        return (f"verify: all {len(verdicts)} jobs: every source message is at the "
                "destination and identical")
    return (f"verify: {len(verdicts) - len(bad)} of {len(verdicts)} jobs complete; NOT "
            f"complete: {', '.join(bad)} (see above)")


def _folder_label(v: JobVerdict, f: FolderVerdict) -> str:
    if v.kind == IMAP_COPY:
        return f"folder {f.source!r} → {f.destination!r}"
    return f"POP3 mailbox → archive {f.destination}"


def _judgement(f: FolderVerdict) -> str:
    n = f.source_messages
    if f.note:
        return f"NOT VERIFIED: {f.note}"
    if f.ok:
        text = (f"all {n} source messages are at the destination" if n != 1 else
                "the 1 source message is at the destination")
        if not n:
            text = "no source messages"
    else:
        text = f"{f.equal} of {plural(n, 'source message')} at the destination and identical; " \
            + ", ".join(f"{count} {word}" for count, word in (
                (f.missing, "missing"), (f.differ, "differ"),
                (f.error, "unreadable")) if count)
    if not f.destination_exists and f.missing:
        text += f" (the destination folder {f.destination!r} does not exist)"
    if f.extra:
        text += f"; {f.extra} extra at the destination"
    if f.archived_not_on_server:
        text += f"; {f.archived_not_on_server} archived, no longer on the server"
    return text


# --- IMAP -> IMAP ------------------------------------------------------------------------


@dataclass
class _Msg:
    """One message on one side, with its content hash once read."""

    folder: str
    meta: MessageMeta
    digest: str | None = None
    unreadable: str | None = None  # why it could not be read
    marked_deleted: bool = False  # flagged \\Deleted: the next EXPUNGE removes it


class _ImapVerify:
    def __init__(self, job: Job, quick: bool, verdict: JobVerdict):
        self.job, self.quick, self.verdict = job, quick, verdict
        self.src: ImapSession | None = None
        self.dst: ImapSession | None = None

    def run(self) -> None:
        try:
            self._connect()
            plans, refused, excluded = self._plan()
            self.verdict.excluded = excluded
            for name, why in refused:  # never copied by run: nothing of it can be there
                self.verdict.folders.append(FolderVerdict(name, "", "refused", note=why))
            # several source folders mapped into one destination folder on purpose: their
            # messages are matched against that folder together
            groups: dict[str, list[FolderPlan]] = {}
            for p in plans:
                groups.setdefault(p.destination, []).append(p)
            for destination, group in groups.items():
                self._group_with_retry(destination, group)
            # a stable order, whatever order the server listed the folders in
            self.verdict.folders.sort(key=lambda f: (f.source.upper() != "INBOX", f.source))
        finally:
            for s in (self.src, self.dst):
                if s is not None:
                    s.logout()

    def _connect(self) -> None:
        for s in (self.src, self.dst):
            if s is not None:
                s.kill()
        self.src = self.dst = None
        self.src = ImapSession.connect(self.job.source)
        self.dst = ImapSession.connect(self.job.destination)

    def _plan(self):
        src, dst = self.src, self.dst
        source_folders = src.list_folders()
        plans, refused = plan_folders(
            source_folders, src.delimiter, src.prefix, dst.list_folders(), dst.delimiter,
            dst.prefix, self.job.folders, other_namespaces=self.job.other_namespaces)
        planned = {p.source for p in plans} | {name for name, _ in refused}
        excluded = [{"folder": f.name, "why": _why_excluded(f.name, f.personal,
                                                            self.job.folders)}
                    for f in source_folders if f.selectable and f.name not in planned]
        return plans, refused, excluded

    def _group_with_retry(self, destination: str, group: list[FolderPlan]) -> None:
        for attempt in (1, 2):
            try:
                self._verify_group(destination, group)
                return
            except ConnectionLost as exc:
                if attempt == 2:
                    raise
                log.warning("%s: %s; reconnecting", self.job.name, exc)
                self._connect()
            except MigrateError as exc:  # this folder could not be read; the others go on
                for p in group:
                    self.verdict.folders.append(FolderVerdict(
                        p.source, p.destination, p.reason, note=str(exc)))
                return

    def _verify_group(self, destination: str, group: list[FolderPlan]) -> None:
        src, dst = self.src, self.dst
        verdicts = {p.source: FolderVerdict(p.source, p.destination, p.reason)
                    for p in group}
        log.info("%s: verifying %s → %r%s", self.job.name,
                 " + ".join(repr(p.source) for p in group), destination,
                 " (Message-ID, size, flags, date)" if self.quick else " (content)")
        sources: list[_Msg] = []
        for p in group:
            sel = src.select(p.source, readonly=True)  # EXAMINE
            metas = src.list_messages(sel.exists)
            verdicts[p.source].source_messages = len(metas)
            msgs = [_Msg(p.source, m) for m in metas]
            if not self.quick and not group[0].create:  # nothing to compare them with
                self._hash(src, msgs)
            sources.extend(msgs)
        if group[0].create:  # the destination folder does not exist (yet)
            dsel, targets = None, []
        else:
            dsel = dst.select(destination, readonly=True)
            if not dsel.permanent_flags:
                # EXAMINE: servers answer PERMANENTFLAGS () ("nothing can be changed in
                # this session"), which says nothing about what the folder keeps
                dsel = dataclasses.replace(dsel, permanent_flags=None)
            targets = [_Msg(destination, m) for m in dst.list_messages(dsel.exists)]
            if targets:
                deleted = dst.deleted_uids()
                for t in targets:
                    t.marked_deleted = t.meta.uid in deleted
            if not self.quick:
                self._hash(dst, targets)
        verdicts[group[0].source].destination_messages = len(targets)
        problems = _match(sources, targets, destination, dsel, self.quick, verdicts,
                          group[0].source)
        if dsel is None:
            for v in verdicts.values():
                v.destination_exists = False
        self.verdict.folders.extend(verdicts.values())
        self.verdict.problems.extend(problems)

    @staticmethod
    def _hash(session: ImapSession, msgs: list[_Msg]) -> None:
        """sha256 of every message: small ones in batches, large ones streamed."""
        batch: list[_Msg] = []
        size = 0
        for m in msgs + [None]:
            if m is not None and m.meta.size <= CHUNK and size + m.meta.size <= BATCH_BYTES \
                    and len(batch) < BATCH_MESSAGES:
                batch.append(m)
                size += m.meta.size
                continue
            if batch:
                bodies = session.fetch_bodies([b.meta.uid for b in batch])
                for b in batch:
                    body = bodies.get(b.meta.uid)
                    if body is None:
                        b.unreadable = session.fetch_refused.get(
                            b.meta.uid, "the server did not send it (expunged meanwhile?)")
                    else:
                        b.digest = hashlib.sha256(body).hexdigest()
                del bodies
                batch, size = [], 0
            if m is None:
                break
            if m.meta.size > CHUNK:
                m.digest, m.unreadable = stream_digest(session, m.meta.uid, m.meta.size)
            else:
                batch, size = [m], m.meta.size


def stream_digest(session: ImapSession, uid: int, size: int, chunk: int = CHUNK
                  ) -> tuple[str | None, str | None]:
    """(sha256, None) of one message read in pieces by partial FETCH, or (None, why).
    Reads until a short piece, so an RFC822.SIZE that is not exact does no harm."""
    h = hashlib.sha256()
    offset = 0
    while True:
        part = session.fetch_part(uid, offset, chunk)
        if part is None:
            if offset and offset >= size:
                break  # past the end: some servers answer "" instead of a literal
            return None, "the server did not send it (expunged meanwhile?)"
        h.update(part)
        offset += len(part)
        if len(part) < chunk:
            break
    return h.hexdigest(), None


def _why_excluded(name: str, personal: bool, rules: Folders) -> str:
    if not personal:
        return "another user's or a shared folder; other_namespaces is off"
    if not any(fnmatch.fnmatchcase(name, p) for p in rules.include):
        return f"matches no include pattern ({', '.join(rules.include)})"
    matched = next((p for p in rules.exclude if fnmatch.fnmatchcase(name, p)), None)
    if matched is not None:
        return f"matches exclude {matched!r}"
    return "not copied" if included(name, rules) else "excluded"


def _same_second(a: dt.datetime | None, b: dt.datetime | None) -> bool:
    if a is None or b is None:
        return a is None or b is None  # a side that does not say: nothing to compare
    return abs((a - b).total_seconds()) < 1


def _flags_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(flags)) or "none"


def _match(sources: list[_Msg], targets: list[_Msg], destination: str,
           dsel: SelectInfo | None, quick: bool, verdicts: dict[str, FolderVerdict],
           extras_folder: str) -> list[Problem]:
    """Pair source and destination messages and sort them into the buckets."""
    problems: list[Problem] = []

    def key(m: _Msg):
        if not quick:
            return m.digest
        if m.meta.message_id:
            return ("id", m.meta.message_id, m.meta.size)
        date = m.meta.internaldate
        return ("size+date", m.meta.size,
                int(date.timestamp()) if date is not None else None)

    def wanted(m: _Msg) -> frozenset[str]:
        # what the destination can keep of the source flags (PERMANENTFLAGS)
        return dsel.storable(m.meta.flags) if dsel is not None else m.meta.flags

    def problem(bucket, s: _Msg | None, t: _Msg | None, what=(), detail="") -> Problem:
        m = s or t
        return Problem(bucket, s.folder if s else extras_folder, destination,
                       s.meta.uid if s else None, t.meta.uid if t else None,
                       m.meta.message_id, m.meta.size, list(what), detail)

    pool: dict[object, list[_Msg]] = {}
    for t in targets:
        if t.unreadable is not None:
            verdicts[extras_folder].error += 1
            problems.append(problem("error", None, t, detail=f"destination message could "
                                                            f"not be read: {t.unreadable}"))
            continue
        pool.setdefault(key(t), []).append(t)
    unmatched: list[_Msg] = []
    for s in sources:
        v = verdicts[s.folder]
        if s.unreadable is not None:
            v.error += 1
            problems.append(problem("error", s, None,
                                    detail=f"source message could not be read: "
                                           f"{s.unreadable}"))
            continue
        candidates = pool.get(key(s))
        if not candidates:
            unmatched.append(s)
            continue
        want = wanted(s)
        # among identical copies, the one that also carries these flags and this date
        best = next((t for t in candidates if t.meta.flags == want and
                     not t.marked_deleted and
                     _same_second(s.meta.internaldate, t.meta.internaldate)), candidates[0])
        candidates.remove(best)
        what, details = [], []
        if best.meta.flags != want or best.marked_deleted:
            what.append("flags")
            details.append(f"flags: source {_flags_text(want)}, destination "
                           f"{_flags_text(best.meta.flags)}")
        if best.marked_deleted:
            details[-1] += (" and \\Deleted (the next EXPUNGE by any client removes "
                            "the copy)")
        if not _same_second(s.meta.internaldate, best.meta.internaldate):
            what.append("internaldate")
            details.append(f"INTERNALDATE: source {s.meta.internaldate}, destination "
                           f"{best.meta.internaldate}")
        if what:
            v.differ += 1
            problems.append(problem("differ", s, best, what, "; ".join(details)))
        else:
            v.equal += 1
    leftovers = [t for ts in pool.values() for t in ts]
    for s in unmatched:
        v = verdicts[s.folder]
        # a destination message left over that claims to be this one: an altered copy
        twin = next((t for t in leftovers if _claims_same(s, t)), None)
        if twin is not None:
            leftovers.remove(twin)
            v.differ += 1
            detail = (f"content: {s.meta.size} bytes at the source, {twin.meta.size} at "
                      "the destination" if quick else
                      f"content: sha256 {s.digest[:12]}… at the source, {twin.digest[:12]}… "
                      f"at the destination ({s.meta.size} / {twin.meta.size} bytes)")
            problems.append(problem("differ", s, twin, ["content"], detail))
        else:
            v.missing += 1
            problems.append(problem("missing", s, None))
    for t in sorted(leftovers, key=lambda t: t.meta.uid):
        verdicts[extras_folder].extra += 1
        problems.append(problem("extra", None, t))
    return problems


def _claims_same(s: _Msg, t: _Msg) -> bool:
    """The same message by its identity (Message-ID; without one, INTERNALDATE)."""
    if s.meta.message_id or t.meta.message_id:
        return s.meta.message_id == t.meta.message_id
    return (s.meta.internaldate is not None and t.meta.internaldate is not None
            and _same_second(s.meta.internaldate, t.meta.internaldate))


# --- POP3 -> Maildir archive -------------------------------------------------------------


class _Hasher:
    """A RETR sink that hashes the message as it streams; the last two bytes are held
    back, so a CRLF the server added (see Pop3Archive._store_file) can be left out."""

    def __init__(self):
        self.hash = hashlib.sha256()
        self.tail = b""
        self.size = 0

    def write(self, data: bytes) -> None:
        both = self.tail + data if len(data) < 2 else None
        if both is None:
            self.hash.update(self.tail)
            self.hash.update(memoryview(data)[:-2])
            self.tail = data[-2:]
        else:
            self.hash.update(both[:-2])
            self.tail = both[-2:]
        self.size += len(data)

    def digest(self, listed: int | None) -> tuple[int, str]:
        """(size, sha256) of the message as the archive stores it."""
        if listed is not None and self.size == listed + 2 and self.tail == b"\r\n":
            return listed, self.hash.hexdigest()
        h = self.hash.copy()
        h.update(self.tail)
        return self.size, h.hexdigest()


class _Pop3Verify:
    def __init__(self, job: Job, quick: bool, verdict: JobVerdict):
        self.job, self.quick, self.verdict = job, quick, verdict
        self.root = Path(job.archive.path)

    def run(self) -> None:
        folder = FolderVerdict("INBOX", str(self.root), "pop3-archive",
                               archived_not_on_server=0)
        files = self._archive_files()
        folder.destination_messages = len(files)
        session = Pop3Session.connect(self.job.source)
        try:
            session.require_uidl()
            listing = session.list_messages()
            folder.source_messages = len(listing)
            digests = self._server_digests(session, listing)
            session.reset_and_quit()
        except BaseException:
            session.close()
            raise
        by_digest: dict[str, list[Path]] = {}
        for path, digest in files.items():
            by_digest.setdefault(digest, []).append(path)
        # a mail client that read a file moved it to cur/ as "<name>:2,<flags>"
        by_name = {p.name.split(":2,", 1)[0]: p for p in files}
        claimed: set[Path] = set()
        for m in listing:
            got = digests.get(m.number)
            if isinstance(got, str):
                folder.error += 1
                self.verdict.problems.append(Problem(
                    "error", "INBOX", str(self.root), m.uidl, None, None, m.size,
                    detail=f"could not be read from the server: {got}"))
                continue
            size, digest = got
            if by_digest.get(digest):
                claimed.add(by_digest[digest].pop(0))
                folder.equal += 1
                continue
            # the file this message was archived under (its name comes from job, UIDL
            # and content), with other content now: altered
            named = self._named_file(m, digest, by_name)
            if named is not None:
                claimed.add(named)
                folder.differ += 1
                self.verdict.problems.append(Problem(
                    "differ", "INBOX", str(self.root), m.uidl, str(named.relative_to(
                        self.root)), None, size, ["content"],
                    f"content: sha256 {digest[:12]}… on the server, {files[named][:12]}… "
                    f"in the archive file"))
            else:
                folder.missing += 1
                self.verdict.problems.append(Problem(
                    "missing", "INBOX", str(self.root), m.uidl, None, None, size,
                    detail="on the server, not in the archive"))
        folder.archived_not_on_server = len(files) - len(claimed)
        self.verdict.folders.append(folder)

    def _archive_files(self) -> dict[Path, str]:
        """Every message file of the Maildir (new/ and cur/) → its sha256."""
        if not self.root.is_dir():
            raise MigrateError(f"the archive {self.root} does not exist; nothing has been "
                               "archived there yet (check [jobs.archive] path)")
        out: dict[Path, str] = {}
        for sub in ("new", "cur"):
            try:
                entries = sorted(os.scandir(self.root / sub), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    out[Path(entry.path)] = _file_digest(Path(entry.path))
        return out

    def _named_file(self, m: Pop3Message, digest: str, by_name: dict[str, Path]
                    ) -> Path | None:
        for n in range(4):
            path = by_name.get(file_name(self.job.name, m.uidl or m.key, digest, n))
            if path is not None:
                return path
        return None

    def _server_digests(self, session: Pop3Session, listing: list[Pop3Message]
                        ) -> dict[int, tuple[int, str] | str]:
        """Message number → (size, sha256) as archived, or why it could not be read."""
        out: dict[int, tuple[int, str] | str] = {}
        listed = {m.number: m for m in listing}
        numbers = sorted(listed)
        hashers: dict[int, _Hasher] = {}  # the messages of the round being read

        def sink_for(number: int):
            hashers[number] = _Hasher()
            return hashers[number].write

        for i in range(0, len(numbers), POP3_BATCH):
            for number, outcome in session.retrieve_many(numbers[i:i + POP3_BATCH],
                                                         sink_for):
                if isinstance(outcome, BaseException):
                    hashers.pop(number, None)
                    out[number] = str(outcome)
                else:
                    m = listed[number]
                    out[number] = hashers.pop(number).digest(m.size if m.listed else None)
        return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
