"""imap-copy: folders, messages, flags and dates from one IMAP account to another.

Per folder:  list source metadata → reconcile with the state database (new, vanished,
changed flags) → for pending messages, look for an identical copy already at the
destination (Message-ID + size, confirmed by sha256) → fetch in size-bounded batches →
write an ``appending`` intent → (MULTI)APPEND → read the copies back and compare sha256
→ commit ``verified``.  Deletion from the source is a separate phase over verified
messages only.  Folders run in parallel, one connection pair per worker.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import deletion, faults
from .config import Job
from .deletion import LookedAgain
from .endpoints.imap import AppendItem, ImapSession, MessageMeta, SelectInfo
from .engine import JobRunner, Progress, RunOptions, retrying
from .errors import ConnectionLost, FolderError, MigrateError, SafetyError
from .folders import FolderPlan, plan_folders
from .states import State
from .store import MessageRow

log = logging.getLogger("migrate.imap_copy")


STREAM_CHUNK = 1024 * 1024  # partial FETCH size for messages larger than a batch


def source_key(uidvalidity: int, uid: int) -> str:
    return f"{uidvalidity}:{uid}"


@dataclass
class FolderRun:
    """What one folder's sync learned, kept for the deletion phase."""

    plan: FolderPlan
    folder_id: int | None = None
    uidvalidity: int | None = None
    present: set[int] = field(default_factory=set)
    error: str | None = None


class SessionPool:
    """Connection pairs (source, destination) handed to worker threads."""

    def __init__(self, job: Job, options: RunOptions):
        self.job = job
        self.options = options
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._all: list[ImapSession] = []
        self._lock = threading.Lock()

    def _connect(self) -> tuple[ImapSession, ImapSession]:
        def attempt():
            src = ImapSession.connect(self.job.source)
            try:
                dst = ImapSession.connect(self.job.destination)
            except BaseException:
                src.logout()
                raise
            for session in (src, dst):
                session.capabilities -= self.options.ignore_capabilities
            return src, dst
        pair = retrying(self.options)(attempt)
        with self._lock:
            self._all.extend(pair)
        return pair

    def take(self) -> tuple[ImapSession, ImapSession]:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self._connect()

    def give_back(self, pair) -> None:
        self._idle.put(pair)

    def discard(self, pair) -> None:
        for s in pair:
            s.logout()

    def close(self) -> None:
        while True:
            try:
                pair = self._idle.get_nowait()
            except queue.Empty:
                break
            self.discard(pair)


class ImapCopy(JobRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # rows whose streamed copy was abandoned (size not as announced): in-memory path
        self._stream_refused: set[int] = set()

    # --- the run -----------------------------------------------------------------

    def run(self) -> None:
        pool = SessionPool(self.job, self.options)
        progress = Progress(self.job.name, self.options.progress)
        try:
            plans = retrying(self.options)(self._with_pair, pool, self._plan)
            self.counters.add("folders", len(plans))
            workers = max(1, min(len(plans), self.job.source.max_connections,
                                 self.job.destination.max_connections))
            runs = [FolderRun(p) for p in plans]
            with ThreadPoolExecutor(workers, thread_name_prefix=f"mm-{self.job.name}") as ex:
                list(ex.map(lambda fr: self._folder_with_retry(pool, fr, progress), runs))
            if self.job.delete_after_verify:
                self._delete_phase(pool, runs)
        finally:
            progress.close()
            pool.close()

    def _plan(self, src: ImapSession, dst: ImapSession) -> list[FolderPlan]:
        self.bind_source(src.server_aliases)
        plans = plan_folders(src.list_folders(), src.delimiter, src.prefix,
                             dst.list_folders(), dst.delimiter, dst.prefix, self.job.folders)
        created: set[str] = set()
        failed: set[str] = set()
        for p in plans:
            if p.create and p.destination not in created | failed:
                if self.dry:
                    self.result.plan.append(f"would create folder {p.destination!r} "
                                            f"(from {p.source!r})")
                    created.add(p.destination)
                    continue
                try:
                    dst.create_folder(p.destination)
                except FolderError as exc:  # this folder is skipped, the others go on
                    failed.add(p.destination)
                    self.error(f"folder {p.source!r}: {exc}")
                    continue
                created.add(p.destination)
                log.info("%s: created folder %r", self.job.name, p.destination)
        plans = [p for p in plans if p.destination not in failed]
        if not self.dry:
            # Open each destination folder once, here, one at a time: servers that create
            # special-use folders on first access (Dovecot's auto = create) have been seen
            # to crash, and even lose mail, when parallel sessions do that at once.
            for name in dict.fromkeys(p.destination for p in plans):
                try:
                    dst.select(name, readonly=True)
                except FolderError:
                    pass  # reported by that folder's own sync
        return plans

    @staticmethod
    def _with_pair(pool: SessionPool, work, *args):
        """Run work(src, dst, *args) on a pooled connection pair; a pair whose
        connection died is dropped, so the retry gets a fresh one."""
        pair = pool.take()
        try:
            result = work(pair[0], pair[1], *args)
        except BaseException as exc:
            if getattr(exc, "transient", False) or pair[0].dead or pair[1].dead:
                pool.discard(pair)
            else:
                pool.give_back(pair)
            raise
        pool.give_back(pair)
        return result

    def _folder_with_retry(self, pool: SessionPool, fr: FolderRun, progress: Progress
                           ) -> None:
        try:
            retrying(self.options)(self._with_pair, pool, self._sync_folder, fr, progress)
        except MigrateError as exc:  # this folder failed; the others go on
            fr.error = str(exc)
            self.error(f"folder {fr.plan.source!r}: {exc}")

    # --- one folder --------------------------------------------------------------

    def _sync_folder(self, src: ImapSession, dst: ImapSession, fr: FolderRun,
                     progress: Progress) -> None:
        plan = fr.plan
        sel = src.select(plan.source, readonly=True)  # EXAMINE: never sets \Seen
        metas = src.list_messages(sel.exists)
        by_uid = {m.uid: m for m in metas}
        fr.uidvalidity = sel.uidvalidity
        fr.present = set(by_uid)

        dsel = self._select_destination(dst, plan)
        frow = self.store.folder(self.job_id, plan.source) if self.job_id else None
        if frow and frow.uidvalidity not in (None, sel.uidvalidity):
            self.warn(f"folder {plan.source!r}: UIDVALIDITY changed ({frow.uidvalidity} → "
                       f"{sel.uidvalidity}); reconciling by Message-ID, size and content "
                       "hash instead of copying again")
        if not self.dry:
            frow = self.store.upsert_folder(self.job_id, plan.source, plan.destination,
                                            sel.uidvalidity, dsel.uidvalidity if dsel else None)
            fr.folder_id = frow.id
            self.store.add_messages(frow.id, [
                {"source_key": source_key(sel.uidvalidity, m.uid),
                 "source_uidvalidity": sel.uidvalidity, "source_uid": m.uid,
                 "size": m.size, "message_id": m.message_id, "flags": m.flags,
                 "internaldate": m.internaldate} for m in metas])
        prefix = f"{sel.uidvalidity}:"
        rows = {k: r for k, r in (self.store.messages(frow.id) if frow else {}).items()
                if k.startswith(prefix)}
        if self.dry:  # rows for messages no earlier run has seen
            for m in metas:
                rows.setdefault(source_key(sel.uidvalidity, m.uid), _fresh_row(m))

        self._reconcile_vanished(plan, rows, by_uid)
        if not self.dry and not self.job.delete_after_verify:
            # left "deleting" by a run with deletion on; deletion is off now: keep them
            undo = [r for r in rows.values() if r.state == State.DELETING]
            self.store.transition(State.VERIFIED, [{"id": r.id} for r in undo])
            for r in undo:
                r.state = State.VERIFIED
        unverified = [r for r in rows.values() if r.source_uid in by_uid
                      and r.state == State.COPIED]
        if unverified and not self.dry:
            # appended by an earlier run that stopped before verifying; those that do
            # not check out become failed and are copied again below
            self._verify_copied(dst, dsel, unverified, progress)
        pending = sorted((r for r in rows.values() if r.source_uid in by_uid
                          and r.state in (State.SEEN, State.APPENDING, State.FAILED,
                                          State.COPIED)),
                         key=lambda r: r.source_uid)
        progress.grow(len(pending))

        if self.dry:
            self._dry_report(plan, pending, rows, by_uid, dst, dsel)
            return
        assert dsel is not None
        if pending:
            self._copy_pending(src, dst, plan, dsel, pending, by_uid, rows, progress)
        self._sync_flags(dst, plan, dsel, rows, by_uid)
        log.info("%s: folder %r → %r: %d messages at the source, %d pending this run",
                 self.job.name, plan.source, plan.destination, len(metas), len(pending))

    def _select_destination(self, dst: ImapSession, plan: FolderPlan) -> SelectInfo | None:
        if self.dry and plan.create:
            return None  # would be created; nothing there yet
        return dst.select(plan.destination, readonly=self.dry)

    def _reconcile_vanished(self, plan, rows: dict[str, MessageRow], by_uid) -> None:
        self.revive([r for r in rows.values() if r.source_uid in by_uid])
        vanished = self.settle_missing([r for r in rows.values() if r.source_uid not in by_uid])
        if vanished:
            self.warn(
                f"folder {plan.source!r}: {vanished} messages vanished from the source "
                "since the last run without mailmigrate deleting them; another client "
                "(often a POP3 client) is deleting mail from this mailbox")

    # --- copying -----------------------------------------------------------------

    def _copy_pending(self, src, dst, plan, dsel, pending, by_uid, rows, progress) -> None:
        # What the destination already holds, for duplicate detection: (Message-ID, size)
        # → UIDs, minus UIDs already accounted for by a verified row of this folder.
        dest_index: dict[tuple[str | None, int], list[int]] = defaultdict(list)
        for m in dst.list_messages(dsel.exists):
            dest_index[(m.message_id, m.size)].append(m.uid)
        claimed = {r.destination_uid for r in rows.values()
                   if r.state in (State.VERIFIED, State.DELETING)
                   and r.destination_uidvalidity == dsel.uidvalidity}

        large = [r for r in pending if r.size > self.options.batch_bytes
                 and r.id not in self._stream_refused]
        for row in large:
            self._copy_large(src, dst, plan, dsel, row, by_uid, dest_index, claimed)
            progress.advance(1)
        large_ids = {r.id for r in large}
        for batch in self.batches([r for r in pending if r.id not in large_ids],
                                  self.options.batch_bytes):
            self._copy_in_memory(src, dst, plan, dsel, batch, by_uid, dest_index, claimed)
            progress.advance(len(batch))

    def _copy_in_memory(self, src, dst, plan, dsel, batch, by_uid, dest_index, claimed
                        ) -> None:
        """One size-bounded batch: one FETCH, one MULTIAPPEND, one read-back FETCH."""
        bodies = src.fetch_bodies([r.source_uid for r in batch])
        batch = [r for r in batch if r.source_uid in bodies]  # expunged meanwhile
        digests = {r.id: hashlib.sha256(bodies[r.source_uid]).hexdigest() for r in batch}

        duplicates = self._find_duplicates(dst, batch, digests, dest_index, claimed)
        to_append = [r for r in batch if r.id not in duplicates]
        dup_changes = [{"id": r.id, "sha256": digests[r.id],
                        "destination_uidvalidity": dsel.uidvalidity,
                        "destination_uid": duplicates[r.id]} for r in batch
                       if r.id in duplicates]
        self.store.apply([
            # Intent first: after a crash these are looked up, not appended again.
            (State.APPENDING, [{"id": r.id, "sha256": digests[r.id]} for r in to_append
                               if r.state != State.APPENDING], False),
            (State.COPIED, dup_changes, False),
            (State.VERIFIED, [{"id": c["id"]} for c in dup_changes], False),
        ])
        for r in to_append:
            r.state = State.APPENDING
        self.counters.add("skipped", len(dup_changes))
        faults.checkpoint("after-intent")
        if to_append:
            self._append_and_verify(dst, plan, dsel, to_append, bodies, by_uid, digests)

    def _stream_digest(self, session: ImapSession, uid: int, size: int) -> str:
        h = hashlib.sha256()
        for piece in session.stream_body(uid, size, STREAM_CHUNK):
            h.update(piece)
        return h.hexdigest()

    def _copy_large(self, src, dst, plan, dsel, row, by_uid, dest_index, claimed) -> None:
        """One message larger than a batch, streamed: partial FETCHes from the source go
        straight into the APPEND literal and are hashed on the way; the copy is read back
        the same way.  Memory stays at a few chunks whatever the message size."""
        meta = by_uid[row.source_uid]
        if not src.exact_size(row.source_uid, row.size):
            # RFC822.SIZE is not the exact length here: use the in-memory path
            self._stream_refused.add(row.id)
            self._copy_in_memory(src, dst, plan, dsel, [row], by_uid, dest_index, claimed)
            return
        candidates = [u for u in dest_index.get((row.message_id, row.size), ())
                      if u not in claimed]
        if candidates:
            digest = self._stream_digest(src, row.source_uid, row.size)
            for u in candidates:
                if self._stream_digest(dst, u, row.size) == digest:
                    claimed.add(u)
                    self.store.apply([
                        (State.COPIED, [{"id": row.id, "sha256": digest,
                                         "destination_uidvalidity": dsel.uidvalidity,
                                         "destination_uid": u}], False),
                        (State.VERIFIED, [{"id": row.id}], False)])
                    self.counters.add("skipped")
                    return
        if row.state != State.APPENDING:
            self.store.transition(State.APPENDING, [{"id": row.id}])
            row.state = State.APPENDING
        faults.checkpoint("after-intent")
        h = hashlib.sha256()

        def pieces():
            for piece in src.stream_body(row.source_uid, row.size, STREAM_CHUNK):
                h.update(piece)
                yield piece

        uidnext_before = dsel.uidnext
        try:
            uid = dst.append_streamed(plan.destination, meta.flags, meta.internaldate,
                                      row.size, pieces())
        except MigrateError as exc:
            if dst.dead and not getattr(exc, "transient", False):
                # the message itself is the problem; next attempt takes the other path
                self._stream_refused.add(row.id)
                raise ConnectionLost(f"streamed append abandoned ({exc}); reconnecting") \
                    from None
            raise
        faults.checkpoint("after-append")
        digest = h.hexdigest()
        if isinstance(uid, Exception):
            self._fail(plan, [(row, str(uid))])
            return
        if uid is None:
            found = dst.find_by_content(uidnext_before or 1, {row.size: {digest}})
            uid = (found.get(digest) or [None])[0]
        if uid is None:
            self._fail(plan, [(row, "appended, but the copy could not be found at the "
                                    "destination to verify it")])
            return
        dsel.uidnext = max(dsel.uidnext or 0, uid + 1)
        back = self._stream_digest(dst, uid, row.size)
        copied = [{"id": row.id, "sha256": digest, "destination_uidvalidity": dsel.uidvalidity,
                   "destination_uid": uid}]
        if back != digest:
            self.store.transition(State.COPIED, copied)
            self._fail(plan, [(row, f"verification failed: destination UID {uid} differs "
                                    "from the source")])
            return
        self.store.apply([(State.COPIED, copied, False),
                          (State.VERIFIED, [{"id": row.id, "last_error": None}], False)])
        self.counters.add("copied")
        self.counters.add("bytes", row.size)

    def _fail(self, plan, failures) -> None:
        self.store.transition(State.FAILED, [{"id": r.id, "last_error": text}
                                             for r, text in failures], bump_attempts=True)
        self._report(plan, failures)

    def _report(self, plan, failures) -> None:
        """Count and report failed messages: [(row, why)]."""
        self.counters.add("failed", len(failures))
        for r, text in failures:
            self.error(f"folder {plan.source!r}: message UID {r.source_uid} ({r.size} bytes, "
                       f"{r.message_id or 'no Message-ID'}): {text}")

    def _find_duplicates(self, dst, batch, digests, dest_index, claimed) -> dict[int, int]:
        """row id → destination UID of an identical message already there."""
        candidates = {r.id: [u for u in dest_index.get((r.message_id, r.size), ())
                             if u not in claimed] for r in batch}
        wanted = sorted({u for us in candidates.values() for u in us})
        if not wanted:
            return {}
        dest_digests = {u: hashlib.sha256(b).hexdigest()
                        for u, b in dst.fetch_bodies(wanted).items()}
        found = {}
        for r in batch:
            for u in candidates[r.id]:
                if u not in claimed and dest_digests.get(u) == digests[r.id]:
                    found[r.id] = u
                    claimed.add(u)
                    break
        return found

    def _append_and_verify(self, dst, plan, dsel, rows, bodies, by_uid, digests) -> None:
        items = [AppendItem(bodies[r.source_uid], by_uid[r.source_uid].flags,
                            by_uid[r.source_uid].internaldate) for r in rows]
        uidnext_before = dsel.uidnext
        outcome = dst.append(plan.destination, items)
        faults.checkpoint("after-append")
        pairs = list(zip(rows, outcome, strict=True))
        appended = {r.id: u for r, u in pairs if not isinstance(u, Exception)}

        unknown = [r for r in rows if r.id in appended and appended[r.id] is None]
        if unknown:  # no APPENDUID: find the new copies by size + sha256 (search)
            by_size: dict[int, set[str]] = defaultdict(set)
            for r in unknown:
                by_size[len(bodies[r.source_uid])].add(digests[r.id])
            found = dst.find_by_content(uidnext_before or 1, by_size)
            for r in unknown:
                uids = found.get(digests[r.id])
                appended[r.id] = uids.pop(0) if uids else None

        with_uid = {r.id: appended[r.id] for r in rows if appended.get(r.id)}
        copied_back = {u: hashlib.sha256(b).hexdigest() for u, b in
                       dst.fetch_bodies(sorted(with_uid.values())).items()}
        # the folder grew; later UID searches must start past these
        if with_uid:
            dsel.uidnext = max(dsel.uidnext or 0, max(with_uid.values()) + 1)

        copied, verified, failures = [], [], []  # failures: (row, why)
        for r, result in pairs:
            uid = appended.get(r.id)
            if isinstance(result, Exception):
                failures.append((r, str(result)))
            elif uid is None:
                failures.append((r, "appended, but the copy could not be found at the "
                                    "destination to verify it"))
            else:
                copied.append({"id": r.id, "destination_uidvalidity": dsel.uidvalidity,
                               "destination_uid": uid})
                if copied_back.get(uid) == digests[r.id]:
                    verified.append(r)
                else:
                    failures.append((r, f"verification failed: destination UID {uid} differs "
                                        f"from the source (sha256 {digests[r.id][:12]}… "
                                        f"expected, {(copied_back.get(uid) or 'nothing')[:12]}… "
                                        "found)"))
        self.store.apply([
            (State.COPIED, copied, False),
            (State.VERIFIED, [{"id": r.id, "last_error": None} for r in verified], False),
            (State.FAILED, [{"id": r.id, "last_error": why} for r, why in failures], True),
        ])
        self._report(plan, failures)
        self.counters.add("copied", len(verified))
        self.counters.add("bytes", sum(r.size for r in verified))

    def _verify_copied(self, dst, dsel, rows: list[MessageRow], progress) -> None:
        """Messages appended by an earlier run that stopped before verifying them."""
        usable = [r for r in rows if r.destination_uid and r.sha256
                  and r.destination_uidvalidity == dsel.uidvalidity]
        got = {u: hashlib.sha256(b).hexdigest() for u, b in
               dst.fetch_bodies([r.destination_uid for r in usable]).items()}
        ok = [{"id": r.id} for r in usable if got.get(r.destination_uid) == r.sha256]
        ok_ids = {c["id"] for c in ok}
        bad = [{"id": r.id, "last_error": "copy at the destination is missing or differs; "
                                          "it will be copied again"}
               for r in rows if r.id not in ok_ids]
        self.store.apply([(State.VERIFIED, ok, False), (State.FAILED, bad, True)])
        self.counters.add("copied", len(ok))
        progress.grow(len(ok))
        progress.advance(len(ok))
        for r in rows:
            r.state = State.VERIFIED if r.id in ok_ids else State.FAILED

    # --- flags -------------------------------------------------------------------

    def _sync_flags(self, dst, plan, dsel, rows, by_uid) -> None:
        groups: dict[tuple[frozenset, frozenset], list[MessageRow]] = defaultdict(list)
        for r in rows.values():
            if r.state not in (State.VERIFIED, State.DELETING) or r.source_uid not in by_uid:
                continue
            new = by_uid[r.source_uid].flags
            if new == r.flags:
                continue
            if r.destination_uidvalidity != dsel.uidvalidity:
                continue  # destination folder was recreated; those UIDs mean nothing now
            groups[(new - r.flags, r.flags - new)].append(r)
        for (add, remove), members in groups.items():
            for chunk in _chunks(members, 500):
                dst.store_flags([r.destination_uid for r in chunk], add, remove)
                self.store.update_flags([{"id": r.id, "flags": by_uid[r.source_uid].flags}
                                         for r in chunk])
                self.counters.add("flags_updated", len(chunk))

    # --- dry run -----------------------------------------------------------------

    def _dry_report(self, plan, pending, rows, by_uid, dst, dsel) -> None:
        maybe_dupes = 0
        if pending and dsel is not None:
            index = {(m.message_id, m.size) for m in dst.list_messages(dsel.exists)}
            maybe_dupes = sum(1 for r in pending if (r.message_id, r.size) in index)
        flag_changes = sum(1 for r in rows.values()
                           if r.state in (State.VERIFIED, State.DELETING)
                           and r.source_uid in by_uid and by_uid[r.source_uid].flags != r.flags)
        size = sum(r.size for r in pending)
        deletable = 0
        if self.job.delete_after_verify:
            deletable = sum(1 for r in rows.values() if r.source_uid in by_uid
                            and r.state in deletion.DELETABLE)
            self.counters.add("would_delete", deletable)
        self.counters.add("would_copy", len(pending))
        self.counters.add("would_copy_bytes", size)
        self.counters.add("flags_updated", flag_changes)
        line = (f"folder {plan.source!r} → {plan.destination!r}: {len(pending)} to copy "
                f"({size / 1e6:.1f} MB)")
        if maybe_dupes:
            line += f", {maybe_dupes} of them possibly already there (same Message-ID + size)"
        line += f", {flag_changes} flag updates"
        if self.job.delete_after_verify:
            line += (f", {deletable} verified to delete from the source "
                     f"(+{len(pending)} once copied)")
        with self._lock:
            self.result.plan.append(line)

    # --- deletion ----------------------------------------------------------------

    def look_again(self, src: ImapSession, dst: ImapSession, fr: FolderRun,
                   rows: list[MessageRow]) -> LookedAgain:
        """Right before deleting originals: is each copy still at the destination (same
        UID and size), and does it carry the source's flags as they are now?  A copy
        that is gone is copied again, never a reason to delete."""
        seen = LookedAgain()
        dsel = dst.select(fr.plan.destination, readonly=False)
        mine = [r for r in rows if r.destination_uidvalidity == dsel.uidvalidity]
        for r in rows:
            if r.destination_uidvalidity != dsel.uidvalidity:
                seen.gone[r.id] = ("the destination folder was re-created (UIDVALIDITY "
                                   "changed); not deleted, it will be copied again")
        present = dst.sizes([r.destination_uid for r in mine])
        for r in mine:
            if present.get(r.destination_uid) not in (r.destination_size or r.size, r.size):
                seen.gone[r.id] = ("the verified copy is gone from the destination; not "
                                   "deleted, it will be copied again")
        return seen


    def _delete_phase(self, pool: SessionPool, runs: list[FolderRun]) -> None:
        if self.dry:
            # The cap is checked on what a real run would delete, so the dry run tells.
            would = self.counters.values.get("would_delete", 0) + \
                self.counters.values.get("would_copy", 0)
            try:
                deletion.check_cap(self.job.name, would, self.options.max_delete)
            except SafetyError as exc:
                self.result.plan.append(f"deletion would be refused: {exc}")
            return
        work = []
        for fr in runs:
            if fr.error or fr.uidvalidity is None or not fr.plan.personal:
                # never delete from a folder whose sync did not finish cleanly, nor from
                # another user's or a public folder
                continue
            rows = [r for k, r in self.store.messages(fr.folder_id).items()
                    if k.startswith(f"{fr.uidvalidity}:") and r.source_uid in fr.present]
            work.append((fr, deletion.candidates(rows, self.store.clock(), True, None)))

        def run_unit(fr: FolderRun, rows: list[MessageRow]) -> None:
            def on_pair(src, dst):
                deletion.delete_unit(self, _ImapFolder(self, src, dst, fr), rows)
            try:
                retrying(self.options)(self._with_pair, pool, on_pair)
            except MigrateError as exc:
                self.error(f"folder {fr.plan.source!r}: deletion: {exc}")

        deletion.delete_all(self, work, run_unit)


class _ImapFolder:
    """The IMAP side of the deletion choke point, for one folder on one connection pair."""

    batch = 500

    def __init__(self, job: ImapCopy, src: ImapSession, dst: ImapSession, fr: FolderRun):
        self.job, self.src, self.dst, self.fr = job, src, dst, fr
        self.label = f"folder {fr.plan.source!r}"
        self.destination = repr(fr.plan.destination)

    def refusal(self) -> str | None:
        if not self.src.has("UIDPLUS"):
            return (f"IMAP server {self.src.endpoint.host} lacks UIDPLUS (UID EXPUNGE); "
                    "deleting would need a bare EXPUNGE, which also removes messages other "
                    "clients flagged \\Deleted. Refused")
        sel = self.src.select(self.fr.plan.source, readonly=False)
        if sel.uidvalidity != self.fr.uidvalidity:
            return (f"UIDVALIDITY changed during the run ({self.fr.uidvalidity} → "
                    f"{sel.uidvalidity})")
        return None

    def look_again(self, rows: list[MessageRow]) -> LookedAgain:
        return self.job.look_again(self.src, self.dst, self.fr, rows)

    def delete(self, rows: list[MessageRow]) -> None:
        faults.checkpoint("before-expunge")
        self.src.delete([r.source_uid for r in rows])
        faults.checkpoint("after-expunge")


def _fresh_row(m: MessageMeta) -> MessageRow:
    return MessageRow(id=-m.uid, source_key="", source_uid=m.uid, size=m.size,
                      message_id=m.message_id, sha256=None, flags=m.flags, state=State.SEEN,
                      destination_uidvalidity=None, destination_uid=None,
                      destination_path=None, verified_at=None, attempts=0)


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]

