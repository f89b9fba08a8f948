"""imap-copy: folders, messages, flags and dates from one IMAP account to another.

Per folder:  list source metadata → reconcile with the state database (new, vanished,
changed flags) → for pending messages, look for an identical copy already at the
destination (Message-ID + size, confirmed by sha256) → fetch in size-bounded batches →
write an ``appending`` intent → (MULTI)APPEND → read the copies back and compare sha256
→ commit ``verified``.  Deletion from the source is a separate phase over verified
messages only.  Folders run in parallel, one connection pair per worker.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field

from . import deletion, faults
from .config import Job
from .deletion import LookedAgain
from .endpoints.imap import (AppendItem, FolderStatus, ImapSession, MessageMeta, SelectInfo,
                             uid_set_text)
from .limits import SlotWaitStopped
from .results import plural
from .runner import BackoffAccount, JobRunner, Progress, RunOptions, over_quota, retrying
from .errors import ConnectionLost, FolderError, MigrateError
from .folders import FolderPlan, plan_folders
from .states import PENDING, State
from .store import MessageRow, flags_to_text

log = logging.getLogger("migrate.imap_copy")


# partial FETCH size for messages larger than a batch: fewer round trips and fewer, larger
# reads and writes; with one FETCH ahead a few chunks are in memory at once, not more
STREAM_CHUNK = 4 * 1024 * 1024


def source_key(uidvalidity: int, uid: int) -> str:
    return f"{uidvalidity}:{uid}"


@dataclass
class FolderRun:
    """What one folder's sync learned, kept for the deletion phase."""

    plan: FolderPlan
    folder_id: int | None = None
    uidvalidity: int | None = None
    error: str | None = None
    # source UIDs of a batch whose FETCH broke the connection (read alone after the
    # reconnect), and those that broke it on their own (skipped)
    suspects: set[int] = field(default_factory=set)
    poisoned: set[int] = field(default_factory=set)
    # both sides' STATUS when the run planned (before anything was listed), and whether
    # it matches the saved one of a settled folder: then the folder is not opened at all
    source_status: FolderStatus | None = None
    destination_status: FolderStatus | None = None
    unchanged: bool = False


@dataclass
class _FolderCopy:
    """One folder's copy on one connection pair: what every batch needs."""

    src: ImapSession | None
    dst: ImapSession
    fr: FolderRun
    dsel: SelectInfo
    by_uid: dict[int, MessageMeta]
    dest_index: dict
    claimed: set[int] | UidBits


class UidBits:
    """A set of UIDs as bits, 64 Ki UIDs per 8 KiB block: a folder's claimed copies
    cost kilobytes instead of megabytes (a set of 200,000 ints: ~12 MB), and UIDs far
    apart cost only their blocks.  Supports what the copy path uses: in, add, update."""

    _BLOCK = 1 << 16

    def __init__(self, uids: Iterable[int] = ()):
        self._blocks: dict[int, bytearray] = {}
        self.update(uids)

    def add(self, uid: int) -> None:
        block, bit = divmod(uid, self._BLOCK)
        bits = self._blocks.get(block)
        if bits is None:
            bits = self._blocks[block] = bytearray(self._BLOCK // 8)
        bits[bit >> 3] |= 1 << (bit & 7)

    def update(self, uids: Iterable[int]) -> None:
        for uid in uids:
            self.add(uid)

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, int):
            return False
        block, bit = divmod(uid, self._BLOCK)
        bits = self._blocks.get(block)
        return bits is not None and bool(bits[bit >> 3] & (1 << (bit & 7)))


@dataclass
class _Changes:
    """A changed folder seen through CONDSTORE (see ImapCopy._changes_since)."""

    uidnext: int  # the last clean sync's UIDNEXT: from here on, everything is listed
    present: list[int]  # UIDs below it still at the source, ascending
    flags: dict[int, frozenset[str]]  # UID → flags changed since that sync


@dataclass
class _FolderTally:
    """One folder's sync summed over its UID windows."""

    listed: int = 0
    pending: int = 0
    vanished: int = 0
    quarantined: int = 0
    quarantined_example: MessageRow | None = None
    touched: bool = False  # the destination was changed (appends, flags)
    unsettled: bool = False  # work left for the next run
    copy_context: _FolderCopy | None = None


class _Stopped(MigrateError):
    """The run is being stopped: no new batch is started."""


def duplicate_key(message_id: str | None, size: int) -> tuple[str | None, int | None]:
    """Duplicate candidates: by Message-ID where there is one (sizes may be reported
    inexactly), by size only for messages without."""
    return (message_id, None) if message_id else (None, size)




class SessionPool:
    """Connection pairs (source, destination) handed to worker threads.

    The one place where connecting is retried: the work-level retry loops around it
    (plan, folder, deletion) retry dropped connections, and get their fresh pair from
    here; an error this pool gave up on is final for them (see engine.RetryLoop).  Once
    it gave up, later requests for a new pair fail at once with the same error instead
    of each spending another retry deadline on a server that is gone."""

    def __init__(self, job: Job, options: RunOptions, backoff: BackoffAccount | None = None):
        self.job = job
        self.options = options
        self.backoff = backoff  # the job's budget for servers that push back
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._all: list[ImapSession] = []
        self._lock = threading.Lock()
        # a pair has connected: a server that refuses now is restarting, and is retried
        self._reached = False
        self._gave_up: MigrateError | None = None
        # slots per server shared with the other jobs of the run (runner.RunOptions)
        self._limits = options.connection_limits
        self._servers = (job.source, job.destination)

    @property
    def max_pairs(self) -> int:
        """How many pairs this job may hold at once: its own endpoints' max_connections,
        and never more than the run's limit of either server."""
        sizes = [self.job.source.max_connections, self.job.destination.max_connections]
        if self._limits is not None:
            sizes += [self._limits.size(e) for e in self._servers]
        return max(1, min(sizes))

    def _connect(self) -> tuple[ImapSession, ImapSession]:
        with self._lock:
            if self._gave_up is not None:
                raise copy.copy(self._gave_up)

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
        try:
            pair = retrying(self.options, reached=self._reached,
                            backoff=self.backoff)(attempt)
        except MigrateError as exc:
            with self._lock:
                self._gave_up = self._gave_up or exc
            raise
        with self._lock:
            self._reached = True
            self._all.extend(pair)
        return pair

    def _idle_pair(self):
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return None

    def take(self) -> tuple[ImapSession, ImapSession]:
        pair = self._idle_pair()
        if pair is not None:
            return pair
        if self._limits is None:
            return self._connect()
        # Wait for a slot at both servers, or for a pair of this job given back meanwhile
        # (it holds slots already: waiting on while it sits idle could wait forever).
        pair = self._limits.take(self._servers, self.options.stop, self._idle_pair)
        if pair is not None:
            return pair
        try:
            return self._connect()
        except BaseException:
            self._limits.give_back(self._servers)
            raise

    def give_back(self, pair) -> None:
        self._idle.put(pair)
        if self._limits is not None:
            self._limits.wake()

    def discard(self, pair) -> None:
        for s in pair:
            s.logout()
        if self._limits is not None:
            self._limits.give_back(self._servers)

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
        # flag → how many copies could not get it (PERMANENTFLAGS, rejected keyword)
        self._not_kept: dict[str, int] = {}

    # --- the run -----------------------------------------------------------------

    def run(self) -> None:
        pool = SessionPool(self.job, self.options, self.backoff)
        progress = Progress(self.job.name, self.options.progress)
        try:
            try:
                plans = self.retrying()(self._with_pair, pool, self._plan)
            except SlotWaitStopped:  # interrupted before it had a connection: not a failure
                return
            self.counters.add("folders", len(plans))
            runs = [FolderRun(p) for p in plans]
            self._find_unchanged(runs)
            workers = max(1, min(sum(1 for fr in runs if not fr.unchanged) or 1,
                                 pool.max_pairs))
            with ThreadPoolExecutor(workers, thread_name_prefix=f"mm-{self.job.name}") as ex:
                list(ex.map(lambda fr: self._folder_with_retry(pool, fr, progress), runs))
            if self.job.delete_after_verify and not self.stopping():
                self._delete_phase(pool, runs)
            if self._not_kept:
                self.warn("the destination cannot keep these flags, so copies were made "
                          "without them: " + ", ".join(
                              f"{f} ({plural(n, 'message')})"
                              for f, n in sorted(self._not_kept.items())))
        finally:
            progress.close()
            pool.close()

    def _plan(self, src: ImapSession, dst: ImapSession) -> list[FolderPlan]:
        self.bind_source(src.server_aliases)
        plans, refused = plan_folders(
            src.list_folders(), src.delimiter, src.prefix, dst.list_folders(),
            dst.delimiter, dst.prefix, self.job.folders,
            other_namespaces=self.job.other_namespaces)
        for name, why in refused:
            self.error(f"folder {name!r}: {why}")
            self.counters.add("failed_folders")
        created: set[str] = set()
        failed: set[str] = set()
        for p in plans:
            if p.create and p.destination not in created | failed:
                try:
                    dst.create_folder(p.destination)
                except FolderError as exc:  # this folder is skipped, the others go on
                    failed.add(p.destination)
                    self.counters.add("failed_folders")
                    self.error(f"folder {p.source!r}: {exc}")
                    continue
                created.add(p.destination)
                log.info("%s: created folder %r", self.job.name, p.destination)
        plans = [p for p in plans if p.destination not in failed]
        # Both sides' STATUS, one round trip each, taken before any folder is listed: a
        # change from now on shows in the next run's STATUS, never gets lost between.
        self._statuses = (src.statuses(p.source for p in plans),
                          dst.statuses(p.destination for p in plans))
        # Open each destination folder once, here, one at a time: servers that create
        # special-use folders on first access (Dovecot's auto = create) have been seen to
        # crash, and even lose mail, when parallel sessions do that at once.  One that
        # answered STATUS exists already.
        for name in dict.fromkeys(p.destination for p in plans
                                  if p.destination not in self._statuses[1]):
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

    # --- folders that did not change -------------------------------------------------

    def _unsettled_states(self) -> list[State]:
        """States that leave work for a folder's next sync: pending, deleting, and with
        deletion on, verified (to delete).  Quarantined too: every run reports them, and
        lists their folder (as before the shortcut)."""
        states = set(PENDING) | {State.DELETING, State.QUARANTINED}
        if self.job.delete_after_verify:
            states.add(State.VERIFIED)
        return sorted(states)

    def _find_unchanged(self, runs: list[FolderRun]) -> None:
        """Mark the folders that need no work: source and destination answer STATUS
        exactly as after the last clean sync, HIGHESTMODSEQ included (without CONDSTORE
        at the source a flag change shows only in a listing: never skipped), and the
        folder holds no unfinished or quarantined message."""
        seen_src, seen_dst = getattr(self, "_statuses", ({}, {}))
        for fr in runs:
            fr.source_status = seen_src.get(fr.plan.source)
            fr.destination_status = seen_dst.get(fr.plan.destination)
        if not any(fr.source_status and fr.source_status.highestmodseq is not None
                   for fr in runs):
            return
        saved = self.store.saved_statuses(self.job_id)
        if not saved:
            return
        unsettled = self.store.unsettled_folders(self.job_id, self._unsettled_states())
        # for _changes_since: a changed folder lists only what changed
        self._saved, self._unsettled = saved, unsettled
        for fr in runs:
            s = saved.get(fr.plan.source)
            src_now, dst_now = fr.source_status, fr.destination_status
            fr.unchanged = bool(
                s is not None and s.settled and s.folder_id not in unsettled
                and s.destination_name == fr.plan.destination
                and src_now is not None and src_now.highestmodseq is not None
                and None not in src_now.as_tuple()[:3] and src_now.as_tuple() == s.source
                and dst_now is not None and None not in dst_now.as_tuple()[:3]
                and dst_now.as_tuple() == s.destination)
            if fr.unchanged:
                log.info("%s: folder %r unchanged since the last run (STATUS); not opened",
                         self.job.name, fr.plan.source)

    def _save_status(self, dst: ImapSession, fr: FolderRun, unsettled: bool,
                     touched: bool) -> None:
        """After a clean sync: both sides' STATUS for the next run's comparison.  The
        source's is the one from before the listing (whatever arrived since makes the
        next run look again); the destination's is taken now if this sync changed it."""
        src_now = fr.source_status
        if fr.folder_id is None or src_now is None:
            return
        dst_now = fr.destination_status
        if touched or dst_now is None:
            dst_now = dst.statuses([fr.plan.destination]).get(fr.plan.destination)
        if dst_now is None:
            return
        self.store.save_folder_status(fr.folder_id, src_now.as_tuple(), dst_now.as_tuple(),
                                      not unsettled)

    def _folder_with_retry(self, pool: SessionPool, fr: FolderRun, progress: Progress
                           ) -> None:
        if self.stopping():  # interrupted, over quota, --max-errors: no new folder
            return
        if fr.unchanged:  # nothing to copy, update or delete there: not opened
            return
        if not self.holding_lock():  # lost: the job halted, no new folder
            return
        try:
            self.retrying()(self._with_pair, pool, self._sync_folder, fr, progress)
        except (_Stopped, SlotWaitStopped):
            # not a failure; but never delete from a folder left half done
            fr.error = "stopped"
        except MigrateError as exc:  # this folder failed; the others go on
            fr.error = str(exc)
            self.counters.add("failed_folders")
            self.error(f"folder {fr.plan.source!r}: {exc}")

    # --- one folder --------------------------------------------------------------

    def _sync_folder(self, src: ImapSession, dst: ImapSession, fr: FolderRun,
                     progress: Progress) -> None:
        """One folder, in windows of source UIDs (listing, state rows, copying and flags
        one window at a time), so that memory does not grow with the folder."""
        plan = fr.plan
        sel = src.select(plan.source, readonly=True)  # EXAMINE: never sets \Seen
        fr.uidvalidity = sel.uidvalidity

        dsel = dst.select(plan.destination, readonly=False)
        frow = self.store.folder(self.job_id, plan.source)
        if frow and frow.uidvalidity not in (None, sel.uidvalidity):
            self.warn(f"folder {plan.source!r}: UIDVALIDITY changed ({frow.uidvalidity} → "
                      f"{sel.uidvalidity}); reconciling by Message-ID, size and content "
                      "hash instead of copying again")
        frow = self.store.upsert_folder(self.job_id, plan.source, plan.destination,
                                        sel.uidvalidity, dsel.uidvalidity)
        fr.folder_id = frow.id
        self.store.forget_folder_status(frow.id)  # skipped again only after a clean sync
        tally = _FolderTally()
        changes = self._changes_since(src, fr, sel, dsel, frow)
        for window in src.uid_windows():
            metas = self._window_metas(src, sel, frow, window, changes)
            self._sync_window(src, dst, fr, sel, dsel, frow, window, metas, tally, progress)

        if tally.vanished:
            self.warn(
                f"folder {plan.source!r}: {plural(tally.vanished, 'message')} vanished from "
                "the source since the last run without mailmigrate deleting them; another "
                "client (often a POP3 client) is deleting mail from this mailbox")
        if tally.quarantined:
            example = tally.quarantined_example
            self.warn(f"folder {plan.source!r}: {plural(tally.quarantined, 'message')} "
                      "quarantined by earlier runs (not retried by themselves; "
                      "`mailmigrate run --retry-failed` tries again), e.g. UID "
                      f"{example.source_uid}: {example.last_error}")
        self._save_status(dst, fr, tally.unsettled, touched=tally.touched)
        log.info("%s: folder %r → %r: %d messages at the source, %d pending this run",
                 self.job.name, plan.source, plan.destination, tally.listed, tally.pending)

    def _changes_since(self, src: ImapSession, fr: FolderRun, sel: SelectInfo,
                       dsel: SelectInfo, frow) -> _Changes | None:
        """For a changed folder that was settled after the last clean sync, on both sides
        the same UIDVALIDITY as then and CONDSTORE at the source: which of the messages
        known then are still there (UID SEARCH), whose flags changed since that sync's
        HIGHESTMODSEQ (CHANGEDSINCE), and from which UID on messages are new.  None:
        list everything."""
        s = getattr(self, "_saved", {}).get(fr.plan.source)
        if (s is None or not s.settled or s.folder_id != frow.id
                or s.folder_id in getattr(self, "_unsettled", ())
                or s.destination_name != fr.plan.destination or not src.has("CONDSTORE")
                or s.source[0] != sel.uidvalidity or frow.uidvalidity != sel.uidvalidity
                or s.destination[0] != dsel.uidvalidity
                or s.source[1] is None or s.source[3] is None):
            return None
        uidnext, modseq = s.source[1], s.source[3]
        flags = src.flags_changed_since(modseq, uidnext - 1)
        if flags is None:
            return None
        present = src.uids_up_to(uidnext - 1)
        log.info("%s: folder %r: %d known messages, %d with flags changed since MODSEQ %d; "
                 "listing from UID %d on", self.job.name, fr.plan.source, len(present),
                 len(flags), modseq, uidnext)
        return _Changes(uidnext, present, flags)

    def _window_metas(self, src: ImapSession, sel: SelectInfo, frow, window: str,
                      changes: _Changes | None) -> list[MessageMeta]:
        """The source's messages in ``window``: listed, or - below the last sync's
        UIDNEXT, when ``changes`` says what changed - taken from the state rows of
        settled messages (size, date, Message-ID do not change; flags from CHANGEDSINCE)
        and listed only for the others."""
        if changes is None:
            return src.list_range(window)
        low_text, _, high_text = window.partition(":")
        low, high = int(low_text), None if high_text == "*" else int(high_text)
        metas: list[MessageMeta] = []
        if low < changes.uidnext:
            top = changes.uidnext - 1 if high is None else min(high, changes.uidnext - 1)
            present = changes.present[bisect.bisect_left(changes.present, low):
                                      bisect.bisect_right(changes.present, top)]
            rows = {r.source_uid: r for r in self.store.messages_in_uid_range(
                frow.id, sel.uidvalidity, low, top).values()}
            need = []
            for uid in present:
                r = rows.get(uid)
                if r is not None and r.state in (State.VERIFIED, State.DELETING):
                    metas.append(MessageMeta(uid, r.size, changes.flags.get(uid, r.flags),
                                             r.internaldate, r.message_id))
                else:  # unknown, or back after it vanished: its real metadata
                    need.append(uid)
            for chunk in _chunks(need, 500):
                metas.extend(src.list_range(uid_set_text(chunk)))
        if high is None or high >= changes.uidnext:
            start = max(low, changes.uidnext)
            metas.extend(src.list_range(f"{start}:{'*' if high is None else high}"))
        return metas

    def _sync_window(self, src: ImapSession, dst: ImapSession, fr: FolderRun,
                     sel: SelectInfo, dsel: SelectInfo, frow, window: str,
                     metas: list[MessageMeta], tally: _FolderTally, progress: Progress
                     ) -> None:
        """Source UIDs in ``window`` ('a:b', or 'a:*' for the last), ``metas`` the
        messages there: record the new ones, reconcile with their state rows, copy what
        is pending, follow flags."""
        plan = fr.plan
        by_uid = {m.uid: m for m in metas}
        tally.listed += len(metas)
        low, _, high = window.partition(":")
        self.store.add_messages(frow.id, [
            {"source_key": source_key(sel.uidvalidity, m.uid),
             "source_uidvalidity": sel.uidvalidity, "source_uid": m.uid,
             "size": m.size, "message_id": m.message_id, "flags": m.flags,
             "internaldate": m.internaldate} for m in metas])
        rows = self.store.messages_in_uid_range(
            frow.id, sel.uidvalidity, int(low), None if high == "*" else int(high))
        del metas

        tally.vanished += self._reconcile_vanished(plan, rows, by_uid)
        if not self.job.delete_after_verify:
            # left "deleting" by a run with deletion on; deletion is off now: keep them
            undo = [r for r in rows.values() if r.state == State.DELETING]
            self.store.transition(State.VERIFIED, [{"id": r.id} for r in undo])
            for r in undo:
                r.state = State.VERIFIED
        here = [r for r in rows.values() if r.source_uid in by_uid]
        known: list[MessageRow] = []
        self._refind_after_destination_reset(fr, dsel, here)
        self._quarantine_repeated_failures(fr, here)
        # A message whose copy is already at the destination (appended by a run that
        # stopped before verifying, or failed verification) is checked, never
        # appended a second time: at most one copy per source message.
        known = [r for r in here if r.state in (State.COPIED, State.FAILED)
                 and r.destination_uid and r.sha256
                 and r.destination_uidvalidity == dsel.uidvalidity]
        # 'copied' without a usable copy (the destination folder was re-created
        # since): copied again below, after the duplicate check finds what is there
        known_ids = {r.id for r in known}
        lost = [r for r in here if r.state == State.COPIED and r.id not in known_ids]
        self.store.transition(State.FAILED, [
            {"id": r.id, "destination_uid": None,
             "last_error": "the copy is unknown at the destination"} for r in lost])
        for r in lost:
            r.state, r.destination_uid = State.FAILED, None
        if known:
            self._check_known_copies(dst, dsel, fr, known, by_uid, progress)
        pending = sorted((r for r in here if r.state in (State.SEEN, State.APPENDING,
                                                         State.FAILED, State.COPIED)),
                         key=lambda r: r.source_uid)
        quarantined = [r for r in here if r.state == State.QUARANTINED]
        if quarantined:
            tally.quarantined += len(quarantined)
            tally.quarantined_example = tally.quarantined_example or quarantined[0]
        tally.pending += len(pending)
        progress.grow(len(pending))

        if pending:
            if tally.copy_context is None:
                tally.copy_context = self._copy_context(src, dst, fr, dsel, by_uid)
            tally.copy_context.by_uid = by_uid
            self._copy_pending(src, dst, fr, dsel, pending, by_uid, progress,
                               ctx=tally.copy_context)
        flags_changed = self._sync_flags(dst, plan, dsel, rows, by_uid)
        tally.touched = tally.touched or bool(pending or known or flags_changed)
        work = set(self._unsettled_states())
        tally.unsettled = tally.unsettled or any(r.state in work for r in rows.values())

    def _reconcile_vanished(self, plan, rows: dict[str, MessageRow], by_uid) -> int:
        """Rows back at the source are revived, rows gone from it settled; returns how
        many vanished (reported once per folder by the caller)."""
        self.revive([r for r in rows.values() if r.source_uid in by_uid])
        return self.settle_missing([r for r in rows.values() if r.source_uid not in by_uid])

    def _refind_after_destination_reset(self, fr: FolderRun, dsel: SelectInfo,
                                        rows: list[MessageRow]) -> None:
        """The destination folder's UIDVALIDITY changed (re-created, restored, migrated
        server-side): our copies may well still be there, under new UIDs.  Those rows go
        back through the duplicate check, which finds them by content - not an error."""
        stale = [r for r in rows if r.state in (State.VERIFIED, State.DELETING)
                 and r.destination_uidvalidity not in (None, dsel.uidvalidity)]
        if not stale:
            return
        self.warn(f"folder {fr.plan.source!r}: the destination folder {fr.plan.destination!r} "
                  f"has a new UIDVALIDITY; looking for {plural(len(stale), 'copy', 'copies')} there again "
                  "by content")
        self.store.apply([
            (State.VERIFIED, [{"id": r.id} for r in stale if r.state == State.DELETING],
             False),
            (State.FAILED, [{"id": r.id, "destination_uid": None,
                             "last_error": "destination UIDVALIDITY changed"} for r in stale],
             False)])
        for r in stale:
            r.state, r.destination_uid = State.FAILED, None

    def _quarantine_repeated_failures(self, fr: FolderRun, rows: list[MessageRow]) -> None:
        """A message that failed run after run will not copy by trying again: it is
        quarantined - reported by name, left alone until --retry-failed."""
        limit = self.options.quarantine_after
        stuck = [r for r in rows if r.state == State.FAILED and r.attempts >= limit]
        self._quarantine(fr, [(r, f"failed {r.attempts} times; last error: {r.last_error}")
                              for r in stuck])

    def _quarantine(self, fr: FolderRun, rows: list[tuple[MessageRow, str]]) -> None:
        if not rows:
            return
        self.store.transition(State.QUARANTINED, [{"id": r.id, "last_error": why}
                                                  for r, why in rows])
        for r, why in rows:
            r.state = State.QUARANTINED
            self.error(f"folder {fr.plan.source!r}: message UID {r.source_uid} "
                       f"({plural(r.size, 'byte')}, {r.message_id or 'no Message-ID'}) "
                       f"quarantined: {why}")
        self.counters.add("quarantined", len(rows))

    # --- copying -----------------------------------------------------------------

    def _copy_context(self, src, dst, fr, dsel, by_uid) -> _FolderCopy:
        """What every batch of a folder needs; made once per folder (the folder is
        synced in UID windows, the destination is listed once)."""
        # What the destination already holds, for duplicate detection: Message-ID (or,
        # without one, the size) → copies there.  Sizes come from the real bytes on our
        # side, so a source whose RFC822.SIZE is not exact still finds its copies.
        dest_index: dict[tuple[str | None, int | None], list[MessageMeta]] = defaultdict(list)
        if dsel.exists:
            for window in dst.uid_windows():
                for m in dst.list_range(window):
                    dest_index[duplicate_key(m.message_id, m.size)].append(m)
        # Copies that belong to a message of this job - any folder, any state - are
        # never taken as another message's duplicate.
        claimed = UidBits(self.store.claimed_destination_uids(
            self.job_id, fr.plan.destination, dsel.uidvalidity, fr.folder_id, fr.uidvalidity))
        return _FolderCopy(src, dst, fr, dsel, by_uid, dest_index, claimed)

    def _copy_pending(self, src, dst, fr, dsel, pending, by_uid, progress,
                      ctx: _FolderCopy | None = None) -> None:
        ctx = ctx or self._copy_context(src, dst, fr, dsel, by_uid)
        for row in [r for r in pending if r.source_uid in fr.poisoned]:
            self._fail(fr, [(row, "the source server dropped the connection every time this "
                                  "message was read; skipped, the other messages go on")])
            progress.advance(1)
        pending = [r for r in pending if r.source_uid not in fr.poisoned]
        large = [r for r in pending if r.size > self.options.batch_bytes
                 and r.id not in self._stream_refused]
        for row in large:
            self._stop_point()
            self._copy_large(ctx, row)
            progress.advance(1)
        large_ids = {r.id for r in large}
        small = [r for r in pending if r.id not in large_ids]
        # messages of a batch that broke the connection travel alone, to find the culprit
        suspects = [r for r in small if r.source_uid in fr.suspects]
        # The look-ahead holds two batches per pair (one appended, one fetched): each gets
        # half of batch_bytes, so a pair's memory stays what one batch needed before.
        batches = [[r] for r in suspects] + list(self.batches(
            [r for r in small if r.source_uid not in fr.suspects],
            max(1, self.options.batch_bytes // 2)))
        self._copy_batches(ctx, batches, progress)

    def _copy_batches(self, ctx: _FolderCopy, batches: list[list[MessageRow]],
                      progress: Progress) -> None:
        """The batches in order, the source one batch ahead: while a batch is appended
        and read back at the destination, the next one is fetched (and hashed) from the
        source on the same pair's source connection, idle otherwise.  The slower server
        sets the pace instead of the sum of both; memory holds two batches."""
        if not batches:
            return
        with ThreadPoolExecutor(1, thread_name_prefix=f"mm-{self.job.name}-ahead") as ahead:
            upcoming = ahead.submit(self._fetch_hashed, ctx, batches[0])
            for i, batch in enumerate(batches):
                self._stop_point()
                fetched = upcoming.result()  # ConnectionLost of that FETCH raises here
                upcoming = (ahead.submit(self._fetch_hashed, ctx, batches[i + 1])
                            if i + 1 < len(batches) and not self.stopping() else None)
                self._copy_in_memory(ctx, batch, fetched)
                progress.advance(len(batch))

    def _fetch_hashed(self, ctx: _FolderCopy, batch: list[MessageRow]
                      ) -> tuple[dict[int, bytes], dict[int, str]]:
        """The batch's bodies and their sha256 by source UID (hashing releases the GIL,
        so it overlaps the destination's work too)."""
        bodies = self._fetch(ctx, batch)
        return bodies, {u: hashlib.sha256(b).hexdigest() for u, b in bodies.items()}

    def _stop_point(self) -> None:
        """Between batches: stop here when the run is being stopped (signal, error cap)
        or no longer holds the job's lock."""
        faults.checkpoint("batch-boundary")
        if self.stopping() or not self.holding_lock():
            raise _Stopped()

    def _fetch(self, ctx: _FolderCopy, batch: list[MessageRow]) -> dict[int, bytes]:
        uids = [r.source_uid for r in batch]
        try:
            return ctx.src.fetch_bodies(uids)
        except ConnectionLost:
            # After the reconnect these are read one at a time; one that breaks the
            # connection on its own is skipped next time.
            if len(uids) == 1:
                ctx.fr.poisoned.add(uids[0])
            ctx.fr.suspects.update(uids)
            raise

    def _copy_in_memory(self, ctx: _FolderCopy, batch: list[MessageRow],
                        fetched: tuple[dict[int, bytes], dict[int, str]] | None = None
                        ) -> None:
        """One size-bounded batch: one FETCH (or ``fetched``: its bodies and sha256 by
        UID, from _fetch_hashed), one MULTIAPPEND, one read-back FETCH."""
        bodies, by_uid_digest = fetched if fetched is not None else (self._fetch(ctx, batch),
                                                                     {})
        missing = [r for r in batch if r.source_uid not in bodies]
        if missing:
            self._fail(ctx.fr, [(r, "the source did not send the message: " + ctx.src.
                                 fetch_refused.get(r.source_uid, "no content in its answer "
                                                   "(expunged meanwhile?)")) for r in missing])
        batch = [r for r in batch if r.source_uid in bodies]
        digests = {r.id: by_uid_digest.get(r.source_uid)
                   or hashlib.sha256(bodies[r.source_uid]).hexdigest() for r in batch}

        duplicates = self._find_duplicates(ctx, batch, bodies, digests)
        to_append = [r for r in batch if r.id not in duplicates]
        self.store.apply([
            # Intent first: after a crash these are looked up, not appended again.
            (State.APPENDING, [{"id": r.id, "sha256": digests[r.id]} for r in to_append
                               if r.state != State.APPENDING], False),
            (State.COPIED, [{"id": r.id, "sha256": digests[r.id],
                             "destination_uidvalidity": ctx.dsel.uidvalidity,
                             "destination_uid": duplicates[r.id]} for r in batch
                            if r.id in duplicates], False),
        ])
        for r in to_append:
            r.state = State.APPENDING
        for r in batch:
            if r.id in duplicates:
                r.state, r.destination_uid = State.COPIED, duplicates[r.id]
                r.destination_uidvalidity, r.sha256 = ctx.dsel.uidvalidity, digests[r.id]
        faults.checkpoint("after-intent")
        if duplicates:
            # already there, body confirmed by sha256: its flags still have to match
            dups = [r for r in batch if r.id in duplicates]
            self._verify_copies(ctx, {r.id: duplicates[r.id] for r in dups}, dups,
                                digests, bodies_checked=True, dates_checked=False)
            self.counters.add("skipped", sum(1 for r in dups if r.state == State.VERIFIED))
        if to_append:
            self._append_and_verify(ctx, to_append, bodies, digests)

    def _stream_digest(self, session: ImapSession, uid: int, size: int) -> str:
        h = hashlib.sha256()
        with closing(session.stream_body(uid, size, STREAM_CHUNK)) as pieces:
            for piece in pieces:
                h.update(piece)
        return h.hexdigest()

    def _copy_large(self, ctx: _FolderCopy, row: MessageRow) -> None:
        """One message larger than a batch, streamed: partial FETCHes from the source go
        straight into the APPEND literal and are hashed on the way; the copy is read back
        the same way.  Memory stays at a few chunks whatever the message size."""
        src, dst, dsel = ctx.src, ctx.dst, ctx.dsel
        meta = ctx.by_uid[row.source_uid]
        if not src.exact_size(row.source_uid, row.size):
            # RFC822.SIZE is not the exact length here: use the in-memory path
            self._stream_refused.add(row.id)
            self._copy_in_memory(ctx, [row])
            return
        candidates = [m.uid for m in ctx.dest_index.get(duplicate_key(row.message_id, row.size), ())
                      if m.uid not in ctx.claimed]
        if candidates:
            digest = self._stream_digest(src, row.source_uid, row.size)
            for u in candidates:
                if self._stream_digest(dst, u, row.size) == digest:
                    ctx.claimed.add(u)
                    self.store.transition(State.COPIED, [{
                        "id": row.id, "sha256": digest,
                        "destination_uidvalidity": dsel.uidvalidity, "destination_uid": u}])
                    row.state, row.sha256 = State.COPIED, digest
                    self._verify_copies(ctx, {row.id: u}, [row], {row.id: digest},
                                        bodies_checked=True, dates_checked=False)
                    if row.state == State.VERIFIED:
                        self.counters.add("skipped")
                    return
        if row.state != State.APPENDING:
            self.store.transition(State.APPENDING, [{"id": row.id}])
            row.state = State.APPENDING
        faults.checkpoint("after-intent")
        h = hashlib.sha256()

        source = src.stream_body(row.source_uid, row.size, STREAM_CHUNK)

        def pieces():
            for piece in source:
                h.update(piece)
                yield piece

        uidnext_before = dsel.uidnext
        flags = self._to_send(ctx, meta.flags)
        try:
            # closed right away if the APPEND gives up, so the source connection reads
            # the FETCH answers still on their way before it is used again
            with closing(source):
                uid = dst.append_streamed(ctx.fr.plan.destination, flags, meta.internaldate,
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
            self._fail(ctx.fr, [(row, str(uid))])
            return
        if uid is None:
            found = dst.find_by_content(uidnext_before or 1, {row.size: {digest}})
            uid = (found.get(digest) or [None])[0]
        if uid is None:
            self._fail(ctx.fr, [(row, "appended, but the copy could not be found at the "
                                      "destination to verify it")])
            return
        dsel.uidnext = max(dsel.uidnext or 0, uid + 1)
        ctx.claimed.add(uid)
        self.store.transition(State.COPIED, [{
            "id": row.id, "sha256": digest, "destination_uidvalidity": dsel.uidvalidity,
            "destination_uid": uid}])
        row.state, row.sha256, row.destination_uid = State.COPIED, digest, uid
        row.destination_uidvalidity = dsel.uidvalidity
        back = self._stream_digest(dst, uid, row.size)
        self._verify_copies(ctx, {row.id: uid}, [row], {row.id: digest},
                            bodies={uid: back}, dates_checked=True)
        if row.state == State.VERIFIED:
            self.counters.add("copied")
            self.counters.add("bytes", row.size)

    def _fail(self, fr: FolderRun, failures) -> None:
        """Messages that failed this time (no copy at the destination): retried by the
        next run, quarantined after repeated failures.  failures: [(row, why)]."""
        if not failures:
            return
        self.store.transition(State.FAILED, [{"id": r.id, "last_error": text}
                                             for r, text in failures], bump_attempts=True)
        for r, _ in failures:
            r.state = State.FAILED
        self._report(fr, failures)

    def _report(self, fr: FolderRun, failures) -> None:
        """Count and report failed messages: [(row, why)]."""
        self.counters.add("failed", len(failures))
        for r, text in failures:
            self.error(f"folder {fr.plan.source!r}: message UID {r.source_uid} "
                       f"({plural(r.size, 'byte')}, {r.message_id or 'no Message-ID'}): {text}")

    def _find_duplicates(self, ctx: _FolderCopy, batch, bodies, digests) -> dict[int, int]:
        """row id → destination UID of an identical message already there."""
        candidates = {r.id: [m.uid for m in ctx.dest_index.get(
            duplicate_key(r.message_id, len(bodies[r.source_uid])), ()) if m.uid not in ctx.claimed]
            for r in batch}
        wanted = sorted({u for us in candidates.values() for u in us})
        if not wanted:
            return {}
        dest_digests = {u: hashlib.sha256(b).hexdigest()
                        for u, b in ctx.dst.fetch_bodies(wanted).items()}
        found = {}
        for r in batch:
            for u in candidates[r.id]:
                if u not in ctx.claimed and dest_digests.get(u) == digests[r.id]:
                    found[r.id] = u
                    ctx.claimed.add(u)
                    break
        return found

    @staticmethod
    def _to_send(ctx: _FolderCopy, flags: frozenset[str]) -> frozenset[str]:
        """The flags to give the copy: what the destination folder can keep."""
        return ctx.dsel.storable(flags, ctx.dst.refused_keywords)

    def _append_and_verify(self, ctx: _FolderCopy, rows, bodies, digests) -> None:
        dst, dsel = ctx.dst, ctx.dsel
        items = [AppendItem(bodies[r.source_uid], self._to_send(ctx, ctx.by_uid[
            r.source_uid].flags), ctx.by_uid[r.source_uid].internaldate) for r in rows]
        uidnext_before = dsel.uidnext
        sizes = {r.id: len(bodies[r.source_uid]) for r in rows}
        outcome = dst.append(ctx.fr.plan.destination, items)
        # Sent: the bodies are not needed any more.  Dropping them before the read-back
        # keeps memory at two batches per pair while the next batch is being fetched.
        del items
        bodies.clear()
        faults.checkpoint("after-append")
        pairs = list(zip(rows, outcome, strict=True))
        appended = {r.id: u for r, u in pairs if not isinstance(u, Exception)}

        unknown = [r for r in rows if r.id in appended and appended[r.id] is None]
        if unknown:  # no APPENDUID: find the new copies by size + sha256 (search)
            by_size: dict[int, set[str]] = defaultdict(set)
            for r in unknown:
                by_size[sizes[r.id]].add(digests[r.id])
            found = dst.find_by_content(uidnext_before or 1, by_size)
            for r in unknown:
                uids = [u for u in found.get(digests[r.id], []) if u not in ctx.claimed]
                appended[r.id] = uids[0] if uids else None
                if uids:
                    ctx.claimed.add(uids[0])
        with_uid = {r.id: appended[r.id] for r in rows if appended.get(r.id)}
        ctx.claimed.update(with_uid.values())
        if with_uid:  # the folder grew; later UID searches must start past these
            dsel.uidnext = max(dsel.uidnext or 0, max(with_uid.values()) + 1)

        failures = []
        for r, result in pairs:
            if isinstance(result, Exception):
                failures.append((r, str(result)))
            elif r.id not in with_uid:
                failures.append((r, "appended, but the copy could not be found at the "
                                    "destination to verify it"))
        copied = [r for r in rows if r.id in with_uid]
        self.store.apply([
            (State.COPIED, [{"id": r.id, "destination_uidvalidity": dsel.uidvalidity,
                             "destination_uid": with_uid[r.id]} for r in copied], False),
            # a full destination is not the message's fault: it does not count towards
            # quarantine, or raising the quota would leave those messages behind
            (State.FAILED, [{"id": r.id, "last_error": why} for r, why in failures
                            if not over_quota(why)], True),
            (State.FAILED, [{"id": r.id, "last_error": why} for r, why in failures
                            if over_quota(why)], False),
        ])
        for r in copied:
            r.state, r.destination_uid = State.COPIED, with_uid[r.id]
            r.destination_uidvalidity, r.sha256 = dsel.uidvalidity, digests[r.id]
        for r, _ in failures:
            r.state = State.FAILED
        self._report(ctx.fr, failures)
        back = {u: hashlib.sha256(b).hexdigest()
                for u, b in dst.fetch_bodies(sorted(with_uid.values())).items()}
        self._verify_copies(ctx, with_uid, copied, digests, bodies=back, dates_checked=True)
        verified = [r for r in copied if r.state == State.VERIFIED]
        self.counters.add("copied", len(verified))
        self.counters.add("bytes", sum(r.size for r in verified))

    def _verify_copies(self, ctx: _FolderCopy, uids: dict[int, int], rows: list[MessageRow],
                       digests: dict[int, str], *, bodies: dict[int, str] | None = None,
                       bodies_checked: bool = False, dates_checked: bool = True,
                       missing_is_error: bool = True) -> None:
        """Rows in ``copied`` with a copy at destination UID uids[row.id]: compare the
        copy's body (sha256 in ``bodies``, unless already confirmed), FLAGS and
        INTERNALDATE with the source; bring flags up to date where they differ.  Each
        row ends ``verified``, ``failed`` (copy missing: copy again) or ``quarantined``
        (the copy exists but the destination will not keep it identical: appending it
        again would only add another altered copy)."""
        dst = ctx.dst
        if not rows:
            return
        meta = dst.copy_meta([uids[r.id] for r in rows])
        want = {r.id: self._to_send(ctx, ctx.by_uid[r.source_uid].flags)
                if r.source_uid in ctx.by_uid else r.flags for r in rows}
        fix = [r for r in rows if uids[r.id] in meta and meta[uids[r.id]].flags != want[r.id]]
        if fix:
            self._store_flags(dst, [(uids[r.id], meta[uids[r.id]].flags, want[r.id])
                                    for r in fix])
            meta.update(dst.copy_meta([uids[r.id] for r in fix]))
            # keywords the STORE was refused are reported, not a failed verification
            want = {r.id: self._to_send(ctx, ctx.by_uid[r.source_uid].flags)
                    if r.source_uid in ctx.by_uid else r.flags for r in rows}
        verified, missing, bad = [], [], []
        for r in rows:
            uid = uids[r.id]
            m = meta.get(uid)
            if m is None:
                missing.append((r, "the copy is not at the destination any more; it will "
                                   "be copied again"))
                continue
            source = ctx.by_uid.get(r.source_uid)
            if not bodies_checked and (bodies or {}).get(uid) != digests[r.id]:
                bad.append((r, f"the destination stored a different message as UID {uid} "
                               f"(sha256 {(bodies or {}).get(uid, 'none')[:12]}…, expected "
                               f"{digests[r.id][:12]}…). Servers that rewrite messages do "
                               "this, e.g. Cyrus with munge8bit rewrites 8-bit header "
                               "bytes (set munge8bit: no); the original stays at the "
                               "source and is not appended again"))
            elif m.flags != want[r.id]:
                bad.append((r, f"the destination does not keep the flags of the copy "
                               f"(UID {uid}: {' '.join(sorted(m.flags)) or 'none'}; "
                               f"expected {' '.join(sorted(want[r.id])) or 'none'})"))
            elif dates_checked and source is not None and source.internaldate is not None \
                    and (m.internaldate is None or abs(
                        (m.internaldate - source.internaldate).total_seconds()) >= 1):
                bad.append((r, f"the destination did not keep the date of the copy (UID "
                               f"{uid}: INTERNALDATE {m.internaldate}, expected "
                               f"{source.internaldate})"))
            else:
                verified.append((r, m))
        self.store.apply([
            (State.VERIFIED, [{"id": r.id, "last_error": None, "destination_size": m.size,
                               "flags": flags_to_text(ctx.by_uid[r.source_uid].flags
                                                      if r.source_uid in ctx.by_uid
                                                      else r.flags)}
                              for r, m in verified], False),
            (State.FAILED, [{"id": r.id, "last_error": why, "destination_uid": None}
                            for r, why in missing], True),
        ])
        for r, _ in verified:
            r.state = State.VERIFIED
            if r.source_uid in ctx.by_uid:
                r.flags = ctx.by_uid[r.source_uid].flags
            with self._lock:  # reported once per run: exactly what could not be kept
                for f in r.flags - want[r.id]:
                    self._not_kept[f] = self._not_kept.get(f, 0) + 1
        for r, _ in missing:
            r.state, r.destination_uid = State.FAILED, None
        if missing_is_error:
            self._report(ctx.fr, missing)
        self._quarantine(ctx.fr, bad)

    @staticmethod
    def _store_flags(dst: ImapSession, changes: list[tuple[int, frozenset, frozenset]]
                     ) -> None:
        """[(uid, flags now, flags wanted)] → as few STOREs as there are distinct diffs."""
        groups: dict[tuple[frozenset, frozenset], list[int]] = defaultdict(list)
        for uid, have, want in changes:
            groups[(want - have, have - want)].append(uid)
        for (add, remove), uids in groups.items():
            for chunk in _chunks(uids, 500):
                dst.store_flags(chunk, add, remove)

    def _check_known_copies(self, dst, dsel, fr, rows, by_uid, progress) -> None:
        """Rows with a copy at the destination from an earlier run (not yet verified, or
        verification failed): check that copy instead of appending another."""
        ctx = _FolderCopy(None, dst, fr, dsel, by_uid, {}, set())
        usable = rows
        moved = [{"id": r.id} for r in usable if r.state == State.FAILED]
        self.store.transition(State.COPIED, moved)
        for r in usable:
            r.state = State.COPIED
        for chunk in self.batches(usable, self.options.batch_bytes):
            uids = {r.id: r.destination_uid for r in chunk}
            if any(r.size > self.options.batch_bytes for r in chunk):
                back = {r.destination_uid: self._stream_digest(dst, r.destination_uid, r.size)
                        for r in chunk}
            else:
                back = {u: hashlib.sha256(b).hexdigest()
                        for u, b in dst.fetch_bodies(sorted(uids.values())).items()}
            # a copy that is gone is simply copied again below, in this run
            self._verify_copies(ctx, uids, chunk, {r.id: r.sha256 for r in chunk},
                                bodies=back, dates_checked=True, missing_is_error=False)
        ok = sum(1 for r in usable if r.state == State.VERIFIED)
        self.counters.add("copied", ok)
        progress.grow(ok)
        progress.advance(ok)

    # --- flags -------------------------------------------------------------------

    def _sync_flags(self, dst, plan, dsel, rows, by_uid) -> bool:
        """Flags changed at the source since the last sync: the copies follow.  Returns
        whether any copy's flags were changed."""
        changes, records = [], []
        for r in rows.values():
            if r.state not in (State.VERIFIED, State.DELETING) or r.source_uid not in by_uid:
                continue
            new = by_uid[r.source_uid].flags
            if new == r.flags:
                continue
            if r.destination_uidvalidity != dsel.uidvalidity:
                continue  # destination folder was recreated; those UIDs mean nothing now
            refused = dst.refused_keywords
            changes.append((r.destination_uid, dsel.storable(r.flags, refused),
                            dsel.storable(new, refused)))
            records.append({"id": r.id, "flags": new})
        if changes:
            self._store_flags(dst, changes)
            self.store.update_flags(records)
            self.counters.add("flags_updated", len(records))
        return bool(changes)

    # --- deletion ----------------------------------------------------------------

    def look_again(self, src: ImapSession, dst: ImapSession, fr: FolderRun,
                   rows: list[MessageRow]) -> LookedAgain:
        """Right before deleting originals: is each copy still at the destination (same
        UID and size), and does it carry the source's flags as they are now (flags may
        have changed since the folder was copied)?  A copy that is gone is copied again,
        never a reason to delete; one whose flags cannot be brought up to date is kept."""
        seen = LookedAgain()
        dsel = dst.select(fr.plan.destination, readonly=False)
        for r in rows:
            if r.destination_uidvalidity != dsel.uidvalidity:
                seen.gone[r.id] = ("the destination folder was re-created (UIDVALIDITY "
                                   "changed); not deleted, it will be copied again")
        mine = [r for r in rows if r.id not in seen.gone]
        copies = dst.copy_meta([r.destination_uid for r in mine])
        for r in mine:
            m = copies.get(r.destination_uid)
            if m is None or m.size not in (r.destination_size or r.size, r.size):
                seen.gone[r.id] = ("the verified copy is gone from the destination; not "
                                   "deleted, it will be copied again")
        mine = [r for r in mine if r.id not in seen.gone]
        now = src.source_flags([r.source_uid for r in mine])
        seen.not_at_source = {r.id for r in mine if r.source_uid not in now}
        mine = [r for r in mine if r.id not in seen.not_at_source]

        def wanted():
            return {r.id: dsel.storable(now.get(r.source_uid, r.flags), dst.refused_keywords)
                    for r in mine}

        want = wanted()
        stale = [r for r in mine if copies[r.destination_uid].flags != want[r.id]]
        if stale:
            self._store_flags(dst, [(r.destination_uid, copies[r.destination_uid].flags,
                                     want[r.id]) for r in stale])
            want = wanted()  # the STORE may have taught us keywords it will not keep
            again = dst.copy_meta([r.destination_uid for r in stale])
            for r in stale:
                have = again.get(r.destination_uid)
                if have is None:
                    seen.gone[r.id] = ("the verified copy is gone from the destination; "
                                       "not deleted, it will be copied again")
                elif have.flags != want[r.id]:
                    seen.held[r.id] = (
                        f"the flags of the copy could not be brought up to date (UID "
                        f"{r.destination_uid}: {' '.join(sorted(have.flags)) or 'none'}; "
                        f"the source has {' '.join(sorted(want[r.id])) or 'none'}); the "
                        "original is kept")
            self.counters.add("flags_updated", len(stale))
        changed = [{"id": r.id, "flags": now[r.source_uid]} for r in mine
                   if r.source_uid in now and now[r.source_uid] != r.flags]
        self.store.update_flags(changed)
        return seen

    def _delete_phase(self, pool: SessionPool, runs: list[FolderRun]) -> None:
        work = []
        for fr in runs:
            if fr.error or fr.uidvalidity is None or not fr.plan.personal:
                # never delete from a folder whose sync did not finish cleanly, nor from
                # another user's or a public folder
                continue
            # rows of messages gone from the source were settled (vanished, deleted)
            # by the sync; look_again checks the source once more before deleting
            rows = [r for k, r in self.store.messages(fr.folder_id, deletion.DELETABLE).items()
                    if k.startswith(f"{fr.uidvalidity}:")]
            work.append((fr, deletion.candidates(rows, self.store.clock(), True, None)))

        def run_unit(fr: FolderRun, rows: list[MessageRow]) -> None:
            def on_pair(src, dst):
                deletion.delete_unit(self, _ImapFolder(self, src, dst, fr), rows)
            try:
                self.retrying()(self._with_pair, pool, on_pair)
            except SlotWaitStopped:  # interrupted: the next run deletes
                pass
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


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]

