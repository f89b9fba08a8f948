"""pop3-archive: placeholder until the POP3 pull lands (issue 4)."""

from __future__ import annotations

from .errors import MailboxError


class Pop3Archive:
    def __init__(self, job, store, job_id, options, counters, result):
        self.job = job

    def run(self) -> None:
        raise MailboxError(f"job {self.job.name!r}: pop3-archive is not available yet")
