"""mailmigrate: resumable, verified mailbox migration (IMAP copy, POP3 archive)."""

__version__ = "0.1.0"
