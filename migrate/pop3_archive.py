"""pop3-archive: every message of a POP3 mailbox into a local Maildir, verified.

A run: CAPA (UIDL required, UTF8 switched on when offered) → UIDL + LIST → reconcile
with the state database → per batch of new messages: ``appending`` intents → RETR
(pipelined where offered) streamed into tmp/ → one durability barrier for the batch
(every file fsynced at once) → link into new/ → fsync new/ → re-read and compare sha256
+ size → ``verified`` →
then, if configured, DELE the messages that are due and QUIT; ``deleted`` is recorded
only after QUIT succeeded.  File names come from a hash of job + UIDL + content, so a
message written again (after a crash, with a lost state database) is recognised instead
of duplicated, and a reused UIDL never overwrites or hides anything.

One bad message never blocks the rest: a refused RETR, a size mismatch or a failed
write fail that message only; a message during which the server drops the connection
is retried alone after the others, and fails once it dropped the connection again.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor

from . import deletion, faults
from .config import Job
from .endpoints.maildir import ArchiveWriteError, MaildirArchive, MessageWriter
from .endpoints.pop3 import Pop3Message, Pop3Session
from .limits import SlotWaitStopped
from .results import JobResult
from .runner import Counters, JobRunner, Progress, RunOptions
from .errors import ConnectionLost, MessageError
from .deletion import LookedAgain
from .states import State
from .store import JobLockHold, MessageRow, Store

log = logging.getLogger("migrate.pop3_archive")
FOLDER = "INBOX"  # POP3 has one mailbox; its rows live in one pseudo-folder
# A message during which the connection dropped this often in one run (in its batch,
# then alone after the others, then once more to tell it from a flaky network) fails
# for this run; the others go on.
DROPS_PER_MESSAGE = 3


def generation_key(key: str, generation: int) -> str:
    """The row key of a message under a UIDL the server used before for another one.
    A UIDL never contains a space (RFC 1939: 0x21-0x7E), so no UIDL looks like this."""
    return key if generation == 1 else f"{key} ({generation})"


def row_key(m: Pop3Message, known: dict[str, MessageRow]) -> str:
    """The row of a listed message.  A UIDL may come back for a different message
    (the server reused it after the original was deleted, or renumbered): the row of
    its latest use is deleted, or the size differs from what LIST said then.  Such a
    message gets a row of its own, so a deleted or verified row never hides it."""
    generation = 1
    while generation_key(m.key, generation + 1) in known:
        generation += 1
    latest = known.get(generation_key(m.key, generation))
    if latest is not None and (latest.state == State.DELETED
                               or (m.listed and latest.size != m.size)):
        generation += 1
    return generation_key(m.key, generation)


class Pop3Archive(JobRunner):
    def __init__(self, job: Job, store: Store, job_id: int, options: RunOptions,
                 counters: Counters, result: JobResult, job_lock: JobLockHold | None = None):
        super().__init__(job, store, job_id, options, counters, result, job_lock)
        self.archive = MaildirArchive(job.archive.path)
        self.folder_id: int | None = None  # set by run()
        self.drops: dict[str, int] = {}  # source key → connection drops during its RETR
        # failed in this run (refused, mismatch, dropped the connection every time): a
        # reconnect within the run does not try them again, the next run does
        self.failed_keys: set[str] = set()
        # the previous batch being made durable, verified and recorded while the next
        # one is retrieved (see _archive_batch)
        self._settling: Future | None = None

    def run(self) -> None:
        self.folder_id = self.store.upsert_folder(
            self.job_id, FOLDER, str(self.job.archive.path), None).id
        progress = Progress(self.job.name, self.options.progress)
        try:
            reached = False
            while True:
                before = sum(self.drops.values())
                try:
                    # A dropped connection restarts from the listing: what is verified is
                    # skipped.
                    # One connection at a time, its slot of the server (shared with
                    # the other jobs of the run) held across reconnects: waiting for a
                    # slot must not use up the retry deadline.
                    with self.connection_slot(self.job.source):
                        self.retrying(reached=reached)(self._pass, progress)
                    return
                except SlotWaitStopped:  # interrupted before it had a connection
                    return
                except ConnectionLost:
                    # Retries used up, but drops were pinned on messages that are now
                    # retried alone or failed: that is progress, go on (bounded: each
                    # message can take DROPS_PER_MESSAGE drops).  Drops that pin nothing
                    # (a server down, a network gone) end the job.
                    if sum(self.drops.values()) == before:
                        raise
                    reached = True
        finally:
            progress.close()

    def _pass(self, progress: Progress) -> None:
        session = Pop3Session.connect(self.job.source)
        settler = ThreadPoolExecutor(1, thread_name_prefix=f"mm-{self.job.name}-settle")
        try:
            self.bind_source(session.server_aliases)
            self.archive.ensure()
            self.archive.remove_leftovers(self.job.name)
            session.require_uidl()
            listing = session.list_messages()
            listing, rows = self._reconcile(listing)
            by_key = {m.key: m for m in listing}
            pending = [rows[m.key] for m in listing
                       if rows[m.key].state in (State.SEEN, State.APPENDING, State.FAILED)
                       and m.key not in self.failed_keys]
            progress.grow(len(pending))
            # Messages that dropped the connection go last, one at a time, so that the
            # others are archived first and a drop is pinned on the right message.
            normal = [r for r in pending if r.source_key not in self.drops]
            suspects = [r for r in pending if r.source_key in self.drops]
            # twice the IMAP batch: the bodies stream to disk, only a commit is per batch
            for batch in self.batches(normal, self.options.batch_bytes * 2):
                if not self.holding_lock():  # lost: halted, so no deletion below
                    break
                self._archive_batch(session, by_key, batch, progress, settler)
            for row in suspects:
                if self.stopping() or not self.holding_lock():
                    break
                self._archive_batch(session, by_key, [row], progress, settler)
            self._settled()
            if self.stopping():  # interrupted or halted: no deletion; QUIT deletes nothing
                session.quit()
                return
            self._delete(session, by_key)
        except BaseException:
            session.close()  # never QUIT on an error path: no half-done deletion commits
            try:  # what was retrieved is still archived; the first error is the one raised
                self._settled()
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: while stopping: %s", self.job.name, exc)
            raise
        finally:
            settler.shutdown()

    # --- listing vs. state ---------------------------------------------------------

    def _reconcile(self, listing: list[Pop3Message]
                   ) -> tuple[list[Pop3Message], dict[str, MessageRow]]:
        known = self.store.messages(self.folder_id)
        listing = [dataclasses.replace(m, key=row_key(m, known)) for m in listing]
        self.store.add_messages(self.folder_id, [
            {"source_key": m.key, "size": m.size} for m in listing])
        rows = self.store.messages(self.folder_id)
        present = {m.key for m in listing}
        self.revive([r for k, r in rows.items() if k in present])
        vanished = self.settle_missing([r for k, r in rows.items() if k not in present])
        if vanished:
            self.warn(
                f"{vanished} messages vanished from the server since the last run without "
                "mailmigrate deleting them; another client is deleting mail from this "
                "mailbox (use one protocol and one client per mailbox)")
        return listing, rows

    # --- archiving ---------------------------------------------------------------

    def _archive_batch(self, session: Pop3Session, by_key: dict[str, Pop3Message],
                       rows: list[MessageRow], progress: Progress,
                       settler: ThreadPoolExecutor) -> None:
        """One transaction for the intents, one for the outcomes, one durability barrier:
        per message only the RETR and the file.  The batch is settled (made durable,
        verified, recorded) by ``settler`` while the next batch is retrieved: the server
        never waits for our disk, and one batch at most is in between."""
        self.store.transition(State.APPENDING, [
            {"id": r.id} for r in rows if r.state != State.APPENDING])
        for r in rows:
            r.state = State.APPENDING
        faults.checkpoint("after-intent")
        stored: list[tuple[MessageRow, MessageWriter]] = []
        failed: list[dict] = []
        by_number = {by_key[r.source_key].number: r for r in rows}
        writers: dict[int, object] = {}

        def sink_for(number: int):
            row = by_number[number]
            writer = self.archive.writer(self.job.name, row.source_key,
                                         by_key[row.source_key].uidl or row.source_key,
                                         known=row.destination_path)
            writers[number] = writer
            return writer.write

        lost: ConnectionLost | None = None
        try:
            for number, outcome in session.retrieve_many(sorted(by_number), sink_for):
                row = by_number[number]
                msg = by_key[row.source_key]
                try:
                    finished = self._store_file(writers.pop(number, None), msg, outcome)
                    stored.append((row, finished))
                    faults.checkpoint("message-written")
                except MessageError as exc:  # this message only; the session is in step
                    failed.append({"id": row.id, "last_error": str(exc)})
                    self.failed_keys.add(row.source_key)
                    self.error(f"message {row.source_key} ({msg.size} bytes): {exc}; it "
                               "stays on the server")
                progress.advance(1)
        except ConnectionLost as exc:
            lost = exc  # what was stored so far is kept; the rest waits for a reconnect
        finally:
            for writer in writers.values():  # the connection dropped mid-message
                writer.abort()
        self._settled()  # the previous batch: one at a time, in order
        if lost is not None:
            self._settle(stored, failed)
            self._dropped_during(by_number.get(getattr(lost, "message_number", None)))
            raise lost
        self._settling = settler.submit(self._settle, stored, failed)

    def _settled(self) -> None:
        """Wait for the batch being settled; its error (a directory that cannot be
        fsynced, the state database) is raised here."""
        pending, self._settling = self._settling, None
        if pending is not None:
            pending.result()

    def _settle(self, stored: list[tuple[MessageRow, MessageWriter]], failed: list[dict]
                ) -> None:
        """Make the batch's files durable (all fsynced at once), link them into new/,
        make the links durable, re-read them and record the outcomes."""
        broken = dict((id(w), exc) for w, exc in
                      self.archive.make_durable([w for _, w in stored]))
        faults.checkpoint("files-synced")
        placed = []
        for row, writer in stored:
            try:
                if id(writer) in broken:
                    raise broken[id(writer)]
                placed.append((row, writer.place()))
            except MessageError as exc:
                failed.append({"id": row.id, "last_error": str(exc)})
                self.failed_keys.add(row.source_key)
                self.error(f"message {row.source_key}: {exc}; it stays on the server")
        if placed:
            self.archive.sync()
        faults.checkpoint("archive-written")
        verified = []
        for row, written in placed:
            try:
                self.archive.verify(written.relpath, written.size, written.sha256)
                verified.append((row, written))
            except MessageError as exc:
                self.archive.discard(written)  # new/ holds verified mail only
                failed.append({"id": row.id, "last_error": str(exc)})
                self.failed_keys.add(row.source_key)
                self.error(f"message {row.source_key}: {exc}; it stays on the server")
        self.store.apply([
            (State.COPIED, [{"id": r.id, "sha256": w.sha256, "destination_path": w.relpath,
                             "last_error": None} for r, w in verified], False),
            (State.VERIFIED, [{"id": r.id} for r, _ in verified], False),
            (State.FAILED, failed, True),
        ])
        for row, _ in verified:
            row.state = State.VERIFIED
        new = [w for _, w in verified if w.created]
        self.counters.add("copied", len(new))
        self.counters.add("skipped", len(verified) - len(new))  # already in the archive
        self.counters.add("bytes", sum(w.size for w in new))
        self.counters.add("failed", len(failed))
        for row, written in verified:
            if written.size == 0:
                self.warn(f"message {row.source_key} is empty on the server (0 bytes); "
                          "archived as an empty file")

    def _dropped_during(self, row: MessageRow | None) -> None:
        """The connection dropped while ``row``'s RETR was answered.  Once may be the
        network; a message that drops it again when retrieved alone fails (for this run)
        so that the others are not held up by it."""
        if row is None:
            return
        drops = self.drops[row.source_key] = self.drops.get(row.source_key, 0) + 1
        if drops < DROPS_PER_MESSAGE:
            log.warning("%s: connection dropped during message %s; it is retried alone "
                        "after the others", self.job.name, row.source_key)
            return
        reason = (f"the server dropped the connection each time this message was "
                  f"retrieved ({drops} attempts); it stays on the server and is tried "
                  "again by the next run")
        self.store.transition(State.FAILED, [{"id": row.id, "last_error": reason}],
                              bump_attempts=True)
        row.state = State.FAILED
        self.failed_keys.add(row.source_key)
        self.counters.add("failed")
        self.error(f"message {row.source_key} ({row.size} bytes): {reason}")

    @staticmethod
    def _store_file(writer, msg: Pop3Message, outcome) -> MessageWriter:
        """Finish one retrieved message: check its size, then finish its file in tmp/
        (made durable and placed in new/ with its batch).  Nothing that did not match
        reaches new/."""
        if isinstance(outcome, BaseException):
            if writer is not None:
                writer.abort()
            if isinstance(outcome, MessageError):
                raise outcome
            raise ArchiveWriteError(f"storing the message failed: {outcome}")
        if outcome != writer.size:
            writer.abort()
            raise ArchiveWriteError(f"received {outcome} bytes but stored {writer.size}")
        drop_crlf = False
        if msg.listed and writer.size != msg.size:
            # A message without a final line break: POP3 needs CRLF before the closing
            # dot, so the server adds one (Dovecot does), and exactly LIST + 2 bytes
            # ending in CRLF arrive.  Those two bytes are the server's, not the
            # message's: without them the file is the message as stored (as IMAP BODY[]
            # returns it) and matches LIST.  Any other difference is a mismatch.
            drop_crlf = writer.size == msg.size + 2 and writer.tail == b"\r\n"
            if not drop_crlf:
                writer.abort()
                raise ArchiveWriteError(
                    f"server announced {msg.size} bytes (LIST) but sent {writer.size}; the "
                    "download is incomplete or the server miscounts; not verified")
        writer.finish(drop_final_crlf=drop_crlf)
        return writer

    # --- deletion ----------------------------------------------------------------

    def _delete(self, session: Pop3Session, by_key: dict[str, Pop3Message]) -> None:
        if not (self.job.delete_after_verify or self.job.leave_on_server_days is not None):
            # DELETING left over from a run with deletion enabled: those are not deleted.
            rows = self.store.messages(self.folder_id, [State.DELETING])
            self.store.transition(State.VERIFIED, [{"id": r.id} for r in rows.values()])
            session.quit()
            return
        rows = [r for r in self.store.messages(
            self.folder_id, [State.VERIFIED, State.DELETING]).values() if r.source_key in by_key]
        due = deletion.candidates(rows, self.store.clock(), self.job.delete_after_verify,
                                  self.job.leave_on_server_days)
        unit = _Pop3Mailbox(self.archive, session, by_key)
        deletion.delete_all(self, [(unit, due)],
                            lambda u, rows: deletion.delete_unit(self, u, rows))
        if not unit.quit_sent:
            session.quit()


class _Pop3Mailbox:
    """The POP3 side of the deletion choke point: DELE marks, QUIT deletes."""

    label = "POP3 mailbox"
    batch = None  # one QUIT commits them all

    def __init__(self, archive: MaildirArchive, session: Pop3Session,
                 by_key: dict[str, Pop3Message]):
        self.archive = archive
        self.session = session
        self.by_key = by_key
        self.quit_sent = False
        self.destination = f"the archive {archive.root}"

    def refusal(self) -> str | None:
        return None

    def look_again(self, rows: list[MessageRow]) -> LookedAgain:
        # A file that is gone (removed by hand, a broken disk) is no reason to delete.
        return LookedAgain(gone={
            r.id: "the archived file is gone; not deleted, it will be archived again"
            for r in rows if self.archive.size_of(r.destination_path or "") != r.size})

    def delete(self, rows: list[MessageRow]) -> None:
        for r in rows:
            self.session.mark_deleted(self.by_key[r.source_key].number)
        faults.checkpoint("before-quit")
        self.quit_sent = True
        self.session.quit()
