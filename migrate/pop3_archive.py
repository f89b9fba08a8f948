"""pop3-archive: every message of a POP3 mailbox into a local Maildir, verified.

A run: CAPA (UIDL required) → UIDL + LIST → reconcile with the state database →
for each new message: ``appending`` intent → RETR streamed into tmp/ → fsync → rename
into new/ → re-read and compare sha256 + size → ``verified`` → then, if configured,
DELE the messages that are due and QUIT; ``deleted`` is recorded only after QUIT
succeeded.  File names come from a hash of job + UIDL, so a message written again after
a crash replaces its own copy instead of duplicating it.
"""

from __future__ import annotations

import logging

from . import deletion, faults
from .config import Job
from .endpoints.maildir import ArchiveWriteError, MaildirArchive
from .endpoints.pop3 import Pop3Message, Pop3Session
from .engine import Counters, JobResult, JobRunner, Progress, RunOptions, retrying
from .errors import MessageError, SafetyError
from .deletion import LookedAgain
from .states import State
from .store import MessageRow, Store

log = logging.getLogger("migrate.pop3_archive")
FOLDER = "INBOX"  # POP3 has one mailbox; its rows live in one pseudo-folder


class Pop3Archive(JobRunner):
    def __init__(self, job: Job, store: Store, job_id: int | None, options: RunOptions,
                 counters: Counters, result: JobResult):
        super().__init__(job, store, job_id, options, counters, result)
        self.archive = MaildirArchive(job.archive.path)
        self.folder_id: int | None = None

    def run(self) -> None:
        if not self.dry:
            self.folder_id = self.store.upsert_folder(
                self.job_id, FOLDER, str(self.job.archive.path), None).id
        elif self.job_id is not None:
            row = self.store.folder(self.job_id, FOLDER)
            self.folder_id = row.id if row else None
        progress = Progress(self.job.name, self.options.progress)
        try:
            # A dropped connection restarts from the listing: what is verified is skipped.
            retrying(self.options)(self._pass, progress)
        finally:
            progress.close()

    def _pass(self, progress: Progress) -> None:
        session = Pop3Session.connect(self.job.source)
        try:
            self.bind_source(session.server_aliases)
            if not self.dry:
                self.archive.ensure()
            session.require_uidl()
            listing = session.list_messages()
            rows = self._reconcile(listing)
            by_key = {m.key: m for m in listing}
            pending = [rows[m.key] for m in listing
                       if rows[m.key].state in (State.SEEN, State.APPENDING, State.FAILED)]
            if self.dry:
                self._dry_report(listing, rows, pending)
                session.close()
                return
            progress.grow(len(pending))
            # twice the IMAP batch: the bodies stream to disk, only a commit is per batch
            for batch in self.batches(pending, self.options.batch_bytes * 2):
                self._archive_batch(session, by_key, batch, progress)
            if self.stopping():  # interrupted or halted: no deletion; QUIT deletes nothing
                session.quit()
                return
            self._delete(session, by_key)
        except BaseException:
            session.close()  # never QUIT on an error path: no half-done deletion commits
            raise

    # --- listing vs. state ---------------------------------------------------------

    def _reconcile(self, listing: list[Pop3Message]) -> dict[str, MessageRow]:
        if not self.dry:
            self.store.add_messages(self.folder_id, [
                {"source_key": m.key, "size": m.size} for m in listing])
        rows = self.store.messages(self.folder_id) if self.folder_id else {}
        present = {m.key for m in listing}
        for m in listing:  # dry run: messages no earlier run has seen
            rows.setdefault(m.key, MessageRow(
                id=-m.number, source_key=m.key, source_uid=None, size=m.size,
                message_id=None, sha256=None, flags=frozenset(), state=State.SEEN,
                destination_uidvalidity=None, destination_uid=None, destination_path=None,
                verified_at=None, attempts=0))
        self.revive([r for k, r in rows.items() if k in present])
        vanished = self.settle_missing([r for k, r in rows.items() if k not in present])
        if vanished:
            self.warn(
                f"{vanished} messages vanished from the server since the last run without "
                "mailmigrate deleting them; another client is deleting mail from this "
                "mailbox (use one protocol and one client per mailbox)")
        return rows

    # --- archiving ---------------------------------------------------------------

    def _archive_batch(self, session: Pop3Session, by_key: dict[str, Pop3Message],
                       rows: list[MessageRow], progress: Progress) -> None:
        """One transaction for the intents, one for the outcomes: per message only the
        RETR, the file and its fsync."""
        names = {}
        for row in rows:
            epoch = int((row.first_seen_at or self.store.clock()).timestamp())
            names[row.id] = self.archive.name_for(self.job.name, row.source_key, epoch)
        self.store.transition(State.APPENDING, [
            {"id": r.id, "destination_path": f"new/{names[r.id]}"} for r in rows
            if r.state != State.APPENDING])
        faults.checkpoint("after-intent")
        stored, failed = [], []
        by_number = {by_key[r.source_key].number: r for r in rows}
        writers: dict[int, object] = {}

        def sink_for(number: int):
            writer = self.archive.writer(names[by_number[number].id])
            writers[number] = writer
            return writer.write

        try:
            for number, outcome in session.retrieve_many(sorted(by_number), sink_for):
                row = by_number[number]
                msg = by_key[row.source_key]
                try:
                    written = self._store_file(writers.pop(number, None), msg, outcome)
                    stored.append((row, written))
                    faults.checkpoint("message-written")
                except MessageError as exc:  # this message only; the session is in step
                    failed.append({"id": row.id, "last_error": str(exc)})
                    self.error(f"message {row.source_key} ({msg.size} bytes): {exc}; it "
                               "stays on the server")
                progress.advance(1)
        finally:
            for writer in writers.values():  # the connection dropped mid-batch
                writer.abort()
        self.archive.sync()
        faults.checkpoint("archive-written")
        verified = []
        for row, written in stored:
            try:
                self.archive.verify(written.relpath, written.size, written.sha256)
                verified.append((row, written))
            except MessageError as exc:
                failed.append({"id": row.id, "last_error": str(exc)})
                self.result.errors.append(f"message {row.source_key}: {exc}; it stays on "
                                          "the server")
        self.store.apply([
            (State.COPIED, [{"id": r.id, "sha256": w.sha256, "destination_path": w.relpath,
                             "last_error": None} for r, w in verified], False),
            (State.VERIFIED, [{"id": r.id} for r, _ in verified], False),
            (State.FAILED, failed, True),
        ])
        self.counters.add("copied", len(verified))
        self.counters.add("bytes", sum(w.size for _, w in verified))
        self.counters.add("failed", len(failed))

    @staticmethod
    def _store_file(writer, msg: Pop3Message, outcome):
        """Finish one retrieved message: commit its file and check its size."""
        if isinstance(outcome, BaseException):
            if writer is not None:
                writer.abort()
            if isinstance(outcome, MessageError):
                raise outcome
            raise ArchiveWriteError(f"storing the message failed: {outcome}")
        written = writer.commit(sync_dir=False)
        if outcome != written.size:
            raise ArchiveWriteError(f"received {outcome} bytes but stored {written.size}")
        if msg.size and written.size != msg.size:
            raise ArchiveWriteError(
                f"server announced {msg.size} bytes (LIST) but sent {written.size}; the "
                "download is incomplete or the server miscounts; not verified")
        return written

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

    # --- dry run -----------------------------------------------------------------

    def _dry_report(self, listing, rows, pending) -> None:
        size = sum(r.size for r in pending)
        present = [rows[m.key] for m in listing]
        due = deletion.candidates(present, self.store.clock(), self.job.delete_after_verify,
                         self.job.leave_on_server_days)
        self.counters.add("would_copy", len(pending))
        self.counters.add("would_copy_bytes", size)
        self.counters.add("would_delete", len(due))
        line = (f"folder 'INBOX' (POP3): {len(listing)} messages on the server "
                f"({sum(m.size for m in listing) / 1e6:.1f} MB), {len(pending)} to archive "
                f"({size / 1e6:.1f} MB)")
        if self.job.delete_after_verify:
            line += f", {len(due)} verified to delete (+{len(pending)} once archived)"
        elif self.job.leave_on_server_days is not None:
            line += (f", {len(due)} archived more than {self.job.leave_on_server_days} days "
                     "ago to delete")
        else:
            line += ", nothing will be deleted (mail stays on the server)"
        self.result.plan.append(line)
        try:
            deletion.check_cap(self.job.name, len(due) + (len(pending) if
                             self.job.delete_after_verify else 0), self.options.max_delete)
        except SafetyError as exc:
            self.result.plan.append(f"deletion would be refused: {exc}")



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
