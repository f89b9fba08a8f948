"""Crash-safe Maildir archive: tmp/ → fsync → rename into new/ → fsync directory.

File names are derived from a hash of the job and the message's source key, never from
anything a server sends, so a hostile server cannot steer them outside the archive, and a
message written again after a crash replaces its own earlier copy instead of adding a
second one.  The result is a standard Maildir (Python's mailbox.Maildir, mutt, Dovecot).
"""

from __future__ import annotations

import glob
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import MailboxError, MessageError

_HOST = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"


@dataclass(frozen=True)
class Written:
    relpath: str  # "new/<name>", relative to the archive root
    size: int
    sha256: str


class ArchiveWriteError(MessageError):
    """Writing or re-reading one message failed (disk full, permissions, I/O error)."""


class MaildirArchive:
    def __init__(self, root: Path):
        self.root = Path(root)

    def ensure(self) -> None:
        try:
            for sub in ("tmp", "new", "cur"):
                (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise MailboxError(
                f"archive {self.root} cannot be created: {exc.strerror}; check [jobs.archive] "
                "path and permissions") from None

    def name_for(self, job: str, source_key: str, first_seen_epoch: int) -> str:
        digest = hashlib.sha256(f"{job}\0{source_key}".encode()).hexdigest()[:32]
        return f"{first_seen_epoch}.M{digest}.{_HOST}"

    def size_of(self, relpath: str) -> int | None:
        """Size of a stored message, also after a mail client moved it from new/ to cur/
        (adding ':2,<flags>' to its name); None if it is gone."""
        name = Path(relpath).name
        candidates = [self.root / "new" / name, self.root / "cur" / name,
                      *(self.root / "cur").glob(f"{glob.escape(name)}:2,*")]
        for path in candidates:
            try:
                return path.stat().st_size
            except OSError:
                continue
        return None

    def writer(self, name: str) -> _MessageWriter:
        return _MessageWriter(self.root, name)

    def sync(self) -> None:
        """Make renames into new/ durable (one directory fsync for a batch)."""
        try:
            _fsync_dir(self.root / "new")
        except OSError as exc:
            raise MailboxError(f"cannot fsync {self.root / 'new'}: {exc.strerror}") from None

    def verify(self, relpath: str, size: int, sha256: str) -> None:
        """Re-read the stored file and compare it with what was received."""
        path = self.root / relpath
        h = hashlib.sha256()
        n = 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
        except OSError as exc:
            raise ArchiveWriteError(f"cannot re-read {path}: {exc.strerror}") from None
        if n != size or h.hexdigest() != sha256:
            raise ArchiveWriteError(
                f"archive file {path} does not match what was received ({n} bytes, sha256 "
                f"{h.hexdigest()[:12]}…; expected {size} bytes, {sha256[:12]}…)")


class _MessageWriter:
    """Receives a message in pieces; ``commit`` makes it appear in new/ atomically."""

    def __init__(self, root: Path, name: str):
        if "/" in name or name.startswith(".") or ":" in name:
            raise ValueError(f"unsafe maildir name {name!r}")
        self.root = root
        self.name = name
        self.tmp = root / "tmp" / name
        self.hash = hashlib.sha256()
        self.size = 0
        try:
            self.tmp.unlink(missing_ok=True)  # a leftover of a crashed run
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        except OSError as exc:
            raise ArchiveWriteError(f"cannot write to {self.tmp.parent}: {exc.strerror}") \
                from None

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        try:
            self.file.write(data)
        except OSError as exc:
            self.abort()
            raise ArchiveWriteError(f"writing {self.tmp} failed: {exc.strerror}") from None

    def commit(self, sync_dir: bool = True) -> Written:
        """fsync the file and rename it into new/.  With sync_dir=False the caller
        fsyncs new/ once for a batch (MaildirArchive.sync) before relying on it."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            final = self.root / "new" / self.name
            os.replace(self.tmp, final)
            if sync_dir:
                _fsync_dir(final.parent)
        except OSError as exc:
            self.abort()
            raise ArchiveWriteError(f"storing {self.name} failed: {exc.strerror}") from None
        return Written(f"new/{self.name}", self.size, self.hash.hexdigest())

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
