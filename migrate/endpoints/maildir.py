"""Crash-safe Maildir archive: tmp/ → fsync → link into new/ → fsync directory.

For a batch the steps run once per batch, not per message: every file is written into
tmp/, then one durability barrier fsyncs them all at once (make_durable), then they are
linked into new/, then new/ is fsynced once (sync).  A message is recorded verified only
after all of that, so the guarantee is the one of a per-file fsync, for far fewer waits.

A file's name is derived from a hash of the job, the message's UIDL and the sha256 of
its content — never from anything else a server sends, so a hostile server cannot steer
names outside the archive.  The same message downloaded again (after a crash, with a
lost state database, on another host) gets the same name and is recognised instead of
stored twice; a different message under a reused UIDL gets a different name.  Files
are linked into place, never renamed over: an existing file is never replaced.  The
result is a standard Maildir (Python's mailbox.Maildir, mutt, Dovecot).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import MailboxError, MessageError

SUFFIX = ".mailmigrate"
# fsyncs in flight at once at a batch's durability barrier: the file system commits
# concurrent fsyncs together (ext4, XFS), so N files cost a few journal commits, not N
SYNC_THREADS = 8


@dataclass(frozen=True)
class Written:
    relpath: str  # "new/<name>", relative to the archive root
    size: int
    sha256: str
    created: bool = True  # False: an identical file was already there (same message)


class ArchiveWriteError(MessageError):
    """Writing or re-reading one message failed (disk full, permissions, I/O error)."""


def file_name(job: str, uidl: str, sha256: str, n: int = 0) -> str:
    """The archive name of a message: the same message always gets the same name.
    ``n`` > 0 picks an alternative when a different file already holds the name."""
    digest = hashlib.sha256(f"{job}\0{uidl}\0{sha256}".encode()).hexdigest()[:40]
    return f"{digest}{f'-{n}' if n else ''}{SUFFIX}"


class MaildirArchive:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._cur_names: dict[str, str] | None = None  # base name → name in cur/

    def ensure(self) -> None:
        try:
            for sub in ("tmp", "new", "cur"):
                (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise MailboxError(
                f"archive {self.root} cannot be created: {exc.strerror}; check [jobs.archive] "
                "path and permissions") from None

    def remove_leftovers(self, job: str) -> None:
        """Temporary files of this job left by a killed run (the job lock keeps a second
        run of the same job out, and other jobs' files have other names)."""
        prefix = _tmp_prefix(job)
        try:
            for entry in os.scandir(self.root / "tmp"):
                if entry.name.startswith(prefix):
                    os.unlink(entry.path)
        except OSError:
            pass  # a leftover costs disk space, nothing else

    def locate(self, relpath: str) -> Path | None:
        """Where a stored message is now, also after a mail client moved it from new/ to
        cur/ (adding ':2,<flags>' to its name); None if it is gone."""
        name = Path(relpath).name
        for path in (self.root / "new" / name, self.root / "cur" / name):
            if path.is_file():
                return path
        for path in (self.root / "cur").glob(f"{glob.escape(name)}:2,*"):
            if path.is_file():
                return path
        return None

    def size_of(self, relpath: str) -> int | None:
        """Size of a stored message wherever it is now (see locate); None if gone."""
        path = self.locate(relpath)
        try:
            return path.stat().st_size if path is not None else None
        except OSError:
            return None

    def writer(self, job: str, source_key: str, uidl: str, known: str | None = None
               ) -> MessageWriter:
        """A writer for one message.  ``known``: where an earlier run stored it (under
        any naming scheme); an identical file there is recognised, not stored again."""
        return MessageWriter(self, job, source_key, uidl, known)

    def make_durable(self, writers: Sequence[MessageWriter]
                     ) -> list[tuple[MessageWriter, ArchiveWriteError]]:
        """The durability barrier of a batch: fsync every finished file in tmp/, all at
        once (see SYNC_THREADS).  Returns the writers whose fsync failed (aborted) with
        their error; the others are durable and may be placed."""
        def one(writer: MessageWriter) -> ArchiveWriteError | None:
            try:
                writer.sync()
                return None
            except ArchiveWriteError as exc:
                return exc
        if len(writers) <= 1:
            outcomes = [one(w) for w in writers]
        else:
            with ThreadPoolExecutor(min(SYNC_THREADS, len(writers)),
                                    thread_name_prefix="mm-fsync") as pool:
                outcomes = list(pool.map(one, writers))
        return [(w, e) for w, e in zip(writers, outcomes, strict=True) if e is not None]

    def sync(self) -> None:
        """Make links into new/ durable (one directory fsync for a batch)."""
        try:
            _fsync_dir(self.root / "new")
        except OSError as exc:
            raise MailboxError(f"cannot fsync {self.root / 'new'}: {exc.strerror}") from None

    def verify(self, relpath: str, size: int, sha256: str) -> None:
        """Re-read the stored file and compare it with what was received."""
        path = self.root / relpath
        if not path.is_file():  # already read by a mail client: moved to cur/
            path = self.locate(relpath) or path
        try:
            n, digest = _digest(path)
        except OSError as exc:
            raise ArchiveWriteError(f"cannot re-read {path}: {exc.strerror}") from None
        if n != size or digest != sha256:
            raise ArchiveWriteError(
                f"archive file {path} does not match what was received ({n} bytes, sha256 "
                f"{digest[:12]}…; expected {size} bytes, {sha256[:12]}…)")

    def discard(self, written: Written) -> None:
        """Remove a file that did not verify, if this run created it: new/ holds only
        verified mail (a file that was already there is someone else's to judge)."""
        if written.created:
            try:
                (self.root / written.relpath).unlink(missing_ok=True)
            except OSError:
                pass

    def _in_cur(self, name: str) -> Path | None:
        """The file a mail client moved to cur/ for ``name``.  cur/ is listed once per
        run (looking it up per message would be quadratic in a large archive)."""
        if self._cur_names is None:
            self._cur_names = {}
            try:
                for entry in os.scandir(self.root / "cur"):
                    self._cur_names[entry.name.split(":2,", 1)[0]] = entry.name
            except OSError:
                pass
        found = self._cur_names.get(name)
        return self.root / "cur" / found if found else None


class MessageWriter:
    """Receives a message in pieces; ``commit`` makes it appear in new/ atomically.

    The last two bytes received are hashed only at commit: the caller may then drop a
    final CRLF that the server added (see Pop3Archive) without reading the file again.
    """

    def __init__(self, archive: MaildirArchive, job: str, source_key: str, uidl: str,
                 known: str | None = None):
        self.archive = archive
        self.job = job
        self.uidl = uidl
        self.known = known
        key = hashlib.sha256(f"{job}\0{source_key}".encode()).hexdigest()[:32]
        self.tmp = archive.root / "tmp" / f"{_tmp_prefix(job)}{key}"
        self.hash = hashlib.sha256()
        self.tail = b""  # received, written, not yet hashed
        self.size = 0
        self.file = None
        self.sha256 = ""  # set by finish()
        try:
            self.tmp.unlink(missing_ok=True)  # a leftover of a crashed run
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        except OSError as exc:
            raise ArchiveWriteError(f"cannot write to {self.tmp.parent}: {exc.strerror}") \
                from None

    def write(self, data: bytes) -> None:
        if len(data) >= 2:
            self.hash.update(self.tail)
            self.hash.update(memoryview(data)[:-2])
            self.tail = data[-2:]
        else:
            both = self.tail + data
            self.hash.update(both[:-2])
            self.tail = both[-2:]
        self.size += len(data)
        try:
            self.file.write(data)
        except OSError as exc:
            self.abort()
            raise ArchiveWriteError(f"writing {self.tmp} failed: {exc.strerror}") from None

    def commit(self, sync_dir: bool = True, drop_final_crlf: bool = False) -> Written:
        """One message on its own: finish, sync, place (see those), then fsync new/.
        drop_final_crlf: the last two bytes received are a CRLF that is not part of the
        message."""
        self.finish(drop_final_crlf)
        self.sync()
        written = self.place()
        if sync_dir and written.created:
            try:
                _fsync_dir(self.archive.root / "new")
            except OSError as exc:
                raise ArchiveWriteError(f"cannot fsync {self.archive.root / 'new'}: "
                                        f"{exc.strerror}") from None
        return written

    def finish(self, drop_final_crlf: bool = False) -> None:
        """The message is complete: flush and close its file in tmp/ and hash it.  Not
        yet durable (sync) nor in new/ (place)."""
        try:
            self.file.flush()
            if drop_final_crlf:
                if self.tail != b"\r\n":
                    self.abort()
                    raise ArchiveWriteError("the message does not end with the CRLF to drop")
                self.size -= 2
                self.file.truncate(self.size)
            else:
                self.hash.update(self.tail)
            self.tail = b""
            self.file.close()
        except OSError as exc:
            self.abort()
            raise ArchiveWriteError(f"storing {self.tmp.name} failed: {exc.strerror}") \
                from None
        self.sha256 = self.hash.hexdigest()

    def sync(self) -> None:
        """fsync the finished file in tmp/ (reopened: the writing handle is closed, so a
        batch does not hold one descriptor per message)."""
        try:
            fd = os.open(self.tmp, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.abort()
            raise ArchiveWriteError(f"storing {self.tmp.name} failed: {exc.strerror}") \
                from None

    def place(self) -> Written:
        """Link the durable file into new/ under its content-derived name; the same
        message already there is recognised, a different file is never replaced.  The
        caller fsyncs new/ (MaildirArchive.sync) before relying on it."""
        try:
            return self._place(self.sha256)
        except OSError as exc:
            self.abort()
            raise ArchiveWriteError(f"storing {self.tmp.name} failed: {exc.strerror}") \
                from None

    def _place(self, sha256: str) -> Written:
        if self.known:
            path = self.archive.locate(self.known)
            if path is not None and self._same_content(path, sha256):
                self.tmp.unlink(missing_ok=True)
                return Written(self.known, self.size, sha256, created=False)
        for n in range(100):
            name = file_name(self.job, self.uidl, sha256, n)
            same = self._same_message_at(name, sha256)
            if same is not None:
                if same:
                    self.tmp.unlink(missing_ok=True)
                    return Written(f"new/{name}", self.size, sha256, created=False)
                continue  # a different file holds this name: never replace it
            try:
                os.link(self.tmp, self.archive.root / "new" / name)
            except FileExistsError:
                continue  # appeared meanwhile: look at it on the next round
            self.tmp.unlink()
            return Written(f"new/{name}", self.size, sha256)
        raise OSError(errno.EEXIST, "no free file name")

    def _same_message_at(self, name: str, sha256: str) -> bool | None:
        """None: nothing is stored under ``name``; True: this very message is (in new/
        or, read by a mail client, in cur/); False: a different file is."""
        path = self.archive.root / "new" / name
        if not os.path.lexists(path):
            path = self.archive._in_cur(name)
            if path is None or not os.path.lexists(path):
                return None
        return self._same_content(path, sha256)

    def _same_content(self, path: Path, sha256: str) -> bool:
        try:
            if path.is_symlink() or path.stat().st_size != self.size:
                return False
            return _digest(path) == (self.size, sha256)
        except OSError:
            return False

    def abort(self) -> None:
        try:
            if self.file is not None:
                self.file.close()
        except OSError:
            pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _tmp_prefix(job: str) -> str:
    return "mm-" + hashlib.sha256(job.encode()).hexdigest()[:12] + "."


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
