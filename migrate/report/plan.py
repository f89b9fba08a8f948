"""What a run would do now, per job and per folder — read-only.

Connects to every endpoint of a job, reads folder listings and per message only size,
flags and Message-ID (EXAMINE / BODY.PEEK; POP3 UIDL + LIST, RSET before QUIT), the
state database opened as it is (never created), and computes per folder: where it goes
and why, what is at the source, what is already at the destination by our duplicate
rules, what is left to copy, flags to update, what would be deleted, what failed
earlier, what the destination will refuse, and an estimate of the duration measured on
a small sample of bodies (the only bodies read).  The result is one plain document
(dicts and lists, schema ``mailmigrate.report/1``, see docs/report.schema.json) that the
text, JSON and HTML renderings share, so their numbers cannot differ.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import heapq
import logging
import os
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .. import deletion
from ..config import IMAP_COPY, Config, Job, Refusal, redact_url
from ..endpoints.imap import FolderInfo, ImapSession
from ..endpoints.maildir import MaildirArchive
from ..endpoints.pop3 import Pop3Session
from ..errors import MigrateError, SafetyError
from ..folders import FolderPlan, plan_folders
from ..imap_copy import duplicate_key
from ..pop3_archive import FOLDER as POP3_FOLDER
from ..pop3_archive import row_key as pop3_row_key
from ..results import plural, size_text
from ..states import State
from ..store import MessageRow, Store, sqlite_file

log = logging.getLogger("migrate.report")

SCHEMA = "mailmigrate.report/1"
LARGEST = 5  # the largest messages listed per job
# the timing sample: at most this many bodies / bytes, messages up to SAMPLE_MAX_ONE each
SAMPLE_MESSAGES = 20
SAMPLE_BYTES = 512 * 1024
SAMPLE_MAX_ONE = 256 * 1024
# A copy reads each message at the source, writes it to the destination and reads it
# back to verify it: three transfers of what the sample measured one of.
IMAP_TRANSFERS = 3
CERT_WARN_DAYS = 30

# states in which the message is at the destination (a run leaves it alone, but for flags)
_THERE = frozenset({State.VERIFIED, State.DELETING})
# rows missing from the source listing that someone else deleted (cf. runner.settle_missing)
_VANISHING = frozenset({State.SEEN, State.APPENDING, State.COPIED, State.VERIFIED,
                        State.FAILED, State.QUARANTINED})


@dataclass
class PlanOptions:
    max_delete: int | None = None  # report the deletion a run would refuse (--max-delete)
    sample: bool = True  # measure the timing sample (bodies); off: no estimate


def folder_order(name: str) -> tuple[int, str]:
    """INBOX first, then by source name."""
    return (0, "") if name.upper() == "INBOX" else (1, name)


def now_text() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _totals(folders: Sequence[dict]) -> dict:
    keys = ("source_messages", "source_bytes", "to_copy", "to_copy_bytes", "already_there",
            "already_there_bytes", "flags_to_update", "to_delete", "failed", "quarantined",
            "vanished")
    return {k: sum(f[k] for f in folders) for k in keys}


def _folder_doc(source: str, destination: str, action: str, why: str) -> dict:
    return {"source": source, "destination": destination, "action": action, "why": why,
            "source_messages": 0, "source_bytes": 0, "already_there": 0,
            "already_there_bytes": 0, "to_copy": 0, "to_copy_bytes": 0,
            "flags_to_update": 0, "to_delete": 0, "failed": 0, "quarantined": 0,
            "vanished": 0, "error": None}


def _endpoint_text(e) -> str:
    return f"{e.username} at {e.host}:{e.port} ({e.protocol.upper()}, {e.security})"


class _JobPlan:
    """One job's document, filled in as its endpoints are read."""

    def __init__(self, job: Job | Refusal):
        self.doc: dict = {
            "name": job.name, "kind": job.kind, "planned": False, "error": None,
            "refused": None, "source": None, "destination": None, "deletion": None,
            "totals": None, "folders": [], "excluded": [], "largest": [],
            "destination_refuses": [], "quota": None, "estimate": None,
            "warnings": []}
        self._largest: list[tuple[int, str, str]] = []  # a heap: (size, folder, id)
        self.sample: list[tuple[str, int, int]] = []  # (folder, uid or number, size)

    def warn(self, text: str) -> None:
        self.doc["warnings"].append(text)

    def consider(self, folder: str, ident: str, size: int) -> None:
        item = (size, folder, ident)
        if len(self._largest) < LARGEST:
            heapq.heappush(self._largest, item)
        elif item > self._largest[0]:
            heapq.heapreplace(self._largest, item)

    def want_sample(self, folder: str, ident: int, size: int) -> None:
        if (len(self.sample) < SAMPLE_MESSAGES and 0 < size <= SAMPLE_MAX_ONE
                and sum(s for _f, _i, s in self.sample) < SAMPLE_BYTES
                and (not self.sample or self.sample[0][0] == folder)):
            self.sample.append((folder, ident, size))

    def finish(self) -> dict:
        d = self.doc
        d["folders"].sort(key=lambda f: folder_order(f["source"]))
        d["excluded"].sort(key=lambda f: folder_order(f["source"]))
        d["largest"] = [{"folder": f, "id": i, "size": s}
                        for s, f, i in sorted(self._largest, reverse=True)]
        d["totals"] = _totals(d["folders"])
        d["totals"]["folders"] = len(d["folders"])
        return d


# --- the whole report -----------------------------------------------------------------


def build_report(config: Config, names: Sequence[str] | None = None,
                 options: PlanOptions | None = None) -> dict:
    """The report document for the selected jobs (all by default).  Never raises for a
    job's own trouble (a refused login, a certificate): that job carries ``error`` and
    ``planned`` false; the other jobs are planned all the same."""
    options = options or PlanOptions()
    selected = config.select(names)
    database = sqlite_file(config.state_url) or redact_url(config.state_url)
    store = Store.open_existing(config.state_url)
    try:
        jobs = [plan_job(item, store, options) for item in selected]
    finally:
        if store is not None:
            store.close()
    totals = {k: sum(j["totals"][k] for j in jobs) for k in
              ("source_messages", "source_bytes", "to_copy", "to_copy_bytes", "already_there",
               "already_there_bytes", "flags_to_update", "to_delete", "failed",
               "quarantined", "vanished", "folders")}
    estimates = [j["estimate"]["seconds"] for j in jobs if j["estimate"]]
    totals["jobs"] = len(jobs)
    totals["jobs_not_planned"] = sum(1 for j in jobs if not j["planned"])
    # jobs run one after the other by default (--workers 1): their durations add up
    totals["estimated_seconds"] = round(sum(estimates), 3) if estimates else None
    return {"schema": SCHEMA, "generated_at": now_text(), "config": str(config.path),
            "state_database": database, "database_exists": store is not None,
            "totals": totals, "jobs": jobs}


def plan_job(item: Job | Refusal, store: Store | None, options: PlanOptions) -> dict:
    plan = _JobPlan(item)
    if isinstance(item, Refusal):
        plan.doc["error"] = item.message
        plan.doc["refused"] = item.message
        return plan.finish()
    job = item
    plan.doc["source"] = _endpoint_text(job.source)
    plan.doc["destination"] = (_endpoint_text(job.destination) if job.destination
                               else f"Maildir archive {job.archive.path}")
    plan.doc["deletion"] = {
        "delete_after_verify": job.delete_after_verify,
        "leave_on_server_days": job.leave_on_server_days,
        "refused": None}
    for e in (job.source, job.destination):
        if e is not None and e.security == "none":
            plan.warn(f"{e.label()} is reached without encryption (security = \"none\", "
                      "allow_insecure = true): the password and the mail cross the network "
                      "in clear text")
    job_id = store.find_job(job.name) if store is not None else None
    try:
        if job.kind == IMAP_COPY:
            _plan_imap(plan, job, store, job_id, options)
        else:
            _plan_pop3(plan, job, store, job_id, options)
        plan.doc["planned"] = True
    except MigrateError as exc:
        plan.doc["error"] = str(exc)
    return plan.finish()


def _check_binding(plan: _JobPlan, job: Job, store: Store | None, aliases) -> None:
    if store is None:
        return  # no run yet: nothing bound
    src = job.source
    try:
        store.bind_mailbox(aliases, f"{src.host}:{src.port}", src.username, src.protocol,
                           job.name, deletes=job.delete_after_verify
                           or job.leave_on_server_days is not None, check_only=True)
    except SafetyError as exc:
        plan.doc["refused"] = str(exc)
        plan.warn(f"a run would be refused: {exc}")


def _check_certificate(plan: _JobPlan, endpoint, sock) -> None:
    """A certificate that expires soon: the cutover week is no time to find out."""
    try:
        cert = sock.getpeercert() if hasattr(sock, "getpeercert") else None
    except (OSError, ValueError):
        cert = None
    if not cert or "notAfter" not in cert:
        return
    expires = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]),
                                        dt.timezone.utc)
    left = expires - dt.datetime.now(dt.timezone.utc)
    if left < dt.timedelta(days=CERT_WARN_DAYS):
        plan.warn(f"the certificate of {endpoint.host}:{endpoint.port} expires "
                  f"{expires:%Y-%m-%d} ({max(0, left.days)} days from now)")


# --- imap-copy ------------------------------------------------------------------------


def _why_excluded(folder: FolderInfo, job: Job) -> str | None:
    rules = job.folders
    if not folder.selectable:
        return "not selectable (\\Noselect: holds no messages)"
    if not any(fnmatch.fnmatchcase(folder.name, p) for p in rules.include):
        return f"not matched by include {list(rules.include)}"
    for p in rules.exclude:
        if fnmatch.fnmatchcase(folder.name, p):
            return f"exclude {p!r}"
    if not folder.personal and not job.other_namespaces:
        return ("another user's or a shared folder (other_namespaces = false)")
    return None


def _quota_free(plan: _JobPlan, dst: ImapSession) -> int | None:
    """Bytes the destination still accepts (QUOTA, RFC 2087), or None when unlimited."""
    if not dst.has("QUOTA"):
        return None
    try:
        _roots, quotas = dst.client.get_quota_root("INBOX")
    except Exception as exc:  # noqa: BLE001 - a quota we cannot read is no quota to report
        log.debug("GETQUOTAROOT failed: %s", exc)
        return None
    for q in quotas:
        if str(q.resource).upper() == "STORAGE":
            used, limit = int(q.usage) * 1024, int(q.limit) * 1024
            plan.doc["quota"] = {"root": q.quota_root, "used_bytes": used,
                                 "limit_bytes": limit}
            return max(0, limit - used)
    return None


def _plan_imap(plan: _JobPlan, job: Job, store: Store | None, job_id: int | None,
               options: PlanOptions) -> None:
    src = ImapSession.connect(job.source)
    try:
        dst = ImapSession.connect(job.destination)
    except BaseException:
        src.logout()
        raise
    try:
        for endpoint, session in ((job.source, src), (job.destination, dst)):
            _check_certificate(plan, endpoint, session.client._imap.sock)
        _check_binding(plan, job, store, src.server_aliases)
        plan_imap_folders(plan, job, src, dst, store, job_id)
        free = _quota_free(plan, dst)
        _imap_deletion(plan, job, src, options)
        _quota_check(plan, free)
        if options.sample:
            _imap_estimate(plan, src)
    finally:
        src.logout()
        dst.logout()


def plan_imap_folders(plan: _JobPlan, job: Job, src: ImapSession, dst: ImapSession,
                      store: Store | None, job_id: int | None) -> None:
    """The folders of an imap-copy job on sessions already open: where each goes, what is
    at the source, already at the destination (state database and the duplicate rules),
    to copy, and what the destination's APPENDLIMIT refuses.  ``check`` uses it too, so
    its "to copy" is the report's."""
    source_folders = src.list_folders()
    plans, refused = plan_folders(
        source_folders, src.delimiter, src.prefix, dst.list_folders(), dst.delimiter,
        dst.prefix, job.folders, other_namespaces=job.other_namespaces)
    planned = {p.source for p in plans}
    for name, why in refused:
        plan.doc["excluded"].append({"source": name, "rule": f"refused: {why}",
                                     "refused": True})
        plan.warn(f"folder {name!r} is not copied: {why}")
    refused_names = {n for n, _ in refused}
    for f in source_folders:
        if f.name in planned or f.name in refused_names:
            continue
        plan.doc["excluded"].append(
            {"source": f.name, "rule": _why_excluded(f, job) or "not copied",
             "refused": False})
    limit = dst.appendlimit
    for p in sorted(plans, key=lambda p: folder_order(p.source)):
        plan.doc["folders"].append(
            _plan_imap_folder(plan, job, p, src, dst, store, job_id, limit))


def imap_job_numbers(job: Job, src: ImapSession, dst: ImapSession, store: Store | None
                     ) -> dict:
    """The report's job document reduced to its folders (``plan_imap_folders``) and
    their totals, for sessions a caller already holds: what ``check`` weighs against the
    destination's quota and APPENDLIMIT."""
    plan = _JobPlan(job)
    job_id = store.find_job(job.name) if store is not None else None
    plan_imap_folders(plan, job, src, dst, store, job_id)
    return plan.finish()


def _why(p: FolderPlan) -> str:
    if p.reason == "map":
        return "mapped"
    if p.reason.startswith("special-use"):
        return p.reason
    return "same name"


def _plan_imap_folder(plan: _JobPlan, job: Job, p: FolderPlan, src: ImapSession,
                      dst: ImapSession, store: Store | None, job_id: int | None,
                      appendlimit: int | None) -> dict:
    doc = _folder_doc(p.source, p.destination, "create" if p.create else "existing", _why(p))
    doc["personal"] = p.personal
    try:
        sel = src.select(p.source, readonly=True)  # EXAMINE
        frow = store.folder(job_id, p.source) if store is not None and job_id else None
        rows: dict[str, MessageRow] = store.messages(frow.id) if frow else {}
        if frow and frow.uidvalidity not in (None, sel.uidvalidity):
            plan.warn(f"folder {p.source!r}: UIDVALIDITY changed ({frow.uidvalidity} → "
                      f"{sel.uidvalidity}); a run reconciles by Message-ID, size and content "
                      "hash instead of copying again")
        prefix = f"{sel.uidvalidity}:"
        by_uid = {r.source_uid: r for k, r in rows.items() if k.startswith(prefix)}
        # the destination as it is: copies of earlier runs, and what our duplicate rules
        # would find there (Message-ID, or size for messages without one)
        dest_keys: Counter = Counter()
        dest_uids: set[int] = set()
        dsel = None
        if not p.create:
            dsel = dst.select(p.destination, readonly=True)  # EXAMINE
            claimed = {r.destination_uid for r in by_uid.values()
                       if r.destination_uid and r.destination_uidvalidity == dsel.uidvalidity
                       and r.state in _THERE | {State.COPIED, State.FAILED}}
            for uid, size, _flags, message_id in dst.scan_messages(dsel.exists):
                dest_uids.add(uid)
                if uid not in claimed:
                    dest_keys[duplicate_key(message_id, size)] += 1
        present: set[int] = set()
        quarantined_example = None
        for uid, size, flags, message_id in src.scan_messages(sel.exists):
            present.add(uid)
            doc["source_messages"] += 1
            doc["source_bytes"] += size
            plan.consider(p.source, f"UID {uid}", size)
            r = by_uid.get(uid)
            state = r.state if r is not None else State.SEEN
            if state in _THERE:
                doc["already_there"] += 1
                doc["already_there_bytes"] += size
                if flags != r.flags:
                    doc["flags_to_update"] += 1
                continue
            if state == State.QUARANTINED:
                doc["quarantined"] += 1
                if quarantined_example is None:
                    quarantined_example = r
                continue
            if state == State.FAILED:
                doc["failed"] += 1
            if (r is not None and r.destination_uid and dsel is not None
                    and r.destination_uidvalidity == dsel.uidvalidity
                    and r.destination_uid in dest_uids):
                # copied by an earlier run, not yet verified: a run checks that copy
                doc["already_there"] += 1
                doc["already_there_bytes"] += size
                continue
            key = duplicate_key(message_id, size)
            if dest_keys[key] > 0:
                dest_keys[key] -= 1
                doc["already_there"] += 1
                doc["already_there_bytes"] += size
                continue
            doc["to_copy"] += 1
            doc["to_copy_bytes"] += size
            plan.want_sample(p.source, uid, size)
            if appendlimit is not None and size > appendlimit:
                plan.doc["destination_refuses"].append({
                    "folder": p.source, "id": f"UID {uid}", "size": size,
                    "reason": f"larger than the destination's APPENDLIMIT of "
                              f"{appendlimit} bytes"})
        vanished = sum(1 for r in by_uid.values()
                       if r.source_uid not in present and r.state in _VANISHING)
        if vanished:
            doc["vanished"] = vanished
            plan.warn(f"folder {p.source!r}: {plural(vanished, 'message')} vanished from "
                      "the source since the last run without mailmigrate deleting them; "
                      "another client (often a POP3 client) is deleting mail from this "
                      "mailbox")
        if quarantined_example is not None:
            plan.warn(f"folder {p.source!r}: {plural(doc['quarantined'], 'message')} "
                      "quarantined by earlier runs (not retried by themselves; `mailmigrate "
                      "run --retry-failed` tries again), e.g. UID "
                      f"{quarantined_example.source_uid}: {quarantined_example.last_error}")
        if job.delete_after_verify and p.personal:
            # a run deletes what is verified, and what it verifies in this run
            doc["to_delete"] = doc["already_there"] + doc["to_copy"]
    except MigrateError as exc:
        doc["error"] = str(exc)
        plan.warn(f"folder {p.source!r} could not be read: {exc}")
    return doc


def _imap_deletion(plan: _JobPlan, job: Job, src: ImapSession, options: PlanOptions
                   ) -> None:
    if not job.delete_after_verify:
        return
    total = sum(f["to_delete"] for f in plan.doc["folders"])
    refusal = None
    if total and not src.has("UIDPLUS"):
        refusal = (f"IMAP server {job.source.host} lacks UIDPLUS (UID EXPUNGE); deleting "
                   "would be refused")
    else:
        try:
            deletion.check_cap(job.name, total, options.max_delete)
        except SafetyError as exc:
            refusal = str(exc)
    if refusal:
        plan.doc["deletion"]["refused"] = refusal
        plan.warn(f"deletion would be refused: {refusal}")


def _quota_check(plan: _JobPlan, free: int | None) -> None:
    if free is None:
        return
    need = sum(f["to_copy_bytes"] for f in plan.doc["folders"])
    if need > free:
        plan.warn(f"the destination is short of room: {size_text(need)} to copy, "
                  f"{size_text(free)} left under its quota; a run stops when it is full")
        plan.doc["destination_refuses"].append({
            "folder": None, "id": None, "size": need - free,
            "reason": f"over quota by {size_text(need - free)}"})


def _estimate(plan: _JobPlan, seconds: float, nbytes: int, count: int, transfers: int,
              what: str) -> None:
    to_copy_bytes = sum(f["to_copy_bytes"] for f in plan.doc["folders"])
    rate = nbytes / seconds if seconds > 0 else None
    if not rate:
        return
    plan.doc["estimate"] = {
        "seconds": round(transfers * to_copy_bytes / rate, 3),
        "sample_messages": count, "sample_bytes": nbytes,
        "sample_seconds": round(seconds, 4),
        "bytes_per_second": int(rate),
        "method": f"{what}; " + (
            f"a copy moves each message {transfers} times (read, write, read back to "
            "verify)" if transfers > 1 else "a run reads each message once")
        + "; an estimate only: server load, network and throttling change it"}


def _imap_estimate(plan: _JobPlan, src: ImapSession) -> None:
    if not plan.sample:
        return
    folder = plan.sample[0][0]
    uids = [uid for _f, uid, _s in plan.sample]
    src.select(folder, readonly=True)  # EXAMINE; BODY.PEEK below: \Seen stays as it is
    started = time.perf_counter()
    bodies = src.fetch_bodies(uids)
    seconds = time.perf_counter() - started
    nbytes = sum(len(b) for b in bodies.values())
    _estimate(plan, seconds, nbytes, len(bodies), IMAP_TRANSFERS,
              f"read {plural(len(bodies), 'message')} ({size_text(nbytes)}) from the source "
              f"in {seconds:.3f} s")


# --- pop3-archive ---------------------------------------------------------------------


def _plan_pop3(plan: _JobPlan, job: Job, store: Store | None, job_id: int | None,
               options: PlanOptions) -> None:
    session = Pop3Session.connect(job.source)
    try:
        _check_certificate(plan, job.source, session.client.sock)
        _check_binding(plan, job, store, session.server_aliases)
        session.require_uidl()
        listing = session.list_messages()
        frow = store.folder(job_id, POP3_FOLDER) if store is not None and job_id else None
        known = store.messages(frow.id) if frow else {}
        keyed = [(pop3_row_key(m, known), m) for m in listing]
        archive = MaildirArchive(job.archive.path)
        doc = _folder_doc(POP3_FOLDER, str(job.archive.path), "archive", "POP3 mailbox")
        present = {k for k, _m in keyed}
        vanished = sum(1 for k, r in known.items()
                       if k not in present and r.state in _VANISHING)
        if vanished:
            doc["vanished"] = vanished
            plan.warn(f"{plural(vanished, 'message')} vanished from the server since the "
                      "last run without mailmigrate deleting them; another client is "
                      "deleting mail from this mailbox (use one protocol and one client per "
                      "mailbox)")
        here: list[MessageRow] = []
        missing_files = 0
        quarantined_example = None
        for key, m in keyed:
            doc["source_messages"] += 1
            doc["source_bytes"] += m.size
            plan.consider(POP3_FOLDER, f"UIDL {key}", m.size)
            r = known.get(key)
            state = r.state if r is not None else State.SEEN
            if state in _THERE:
                if os.path.isdir(job.archive.path) and \
                        archive.size_of(r.destination_path or "") != r.size:
                    missing_files += 1  # a run archives it again
                else:
                    doc["already_there"] += 1
                    doc["already_there_bytes"] += m.size
                    here.append(r)
                    continue
            elif state == State.QUARANTINED:
                doc["quarantined"] += 1
                quarantined_example = quarantined_example or r
                continue
            if state == State.FAILED:
                doc["failed"] += 1
            doc["to_copy"] += 1
            doc["to_copy_bytes"] += m.size
            plan.want_sample(POP3_FOLDER, m.number, m.size)
        if missing_files:
            plan.warn(f"{plural(missing_files, 'archived file')} of verified messages are "
                      f"missing from {job.archive.path}; a run archives them again")
        if quarantined_example is not None:
            plan.warn(f"{plural(doc['quarantined'], 'message')} quarantined by earlier "
                      f"runs, e.g. {quarantined_example.source_key}: "
                      f"{quarantined_example.last_error}")
        now = store.clock() if store is not None else dt.datetime.now(dt.timezone.utc)
        due = deletion.candidates(here, now, job.delete_after_verify,
                                  job.leave_on_server_days)
        doc["to_delete"] = len(due)
        if job.delete_after_verify or job.leave_on_server_days == 0:
            doc["to_delete"] += doc["to_copy"]  # deleted as soon as archived
        try:
            deletion.check_cap(job.name, doc["to_delete"], options.max_delete)
        except SafetyError as exc:
            plan.doc["deletion"]["refused"] = str(exc)
            plan.warn(f"deletion would be refused: {exc}")
        plan.doc["folders"].append(doc)
        if options.sample and plan.sample:
            started = time.perf_counter()
            nbytes = 0
            for _f, number, size in plan.sample:
                # TOP, not RETR: servers mark a message read on RETR (Dovecot's \Seen)
                _resp, lines, octets = session.client.top(number, max(1, size))
                nbytes += octets
            seconds = time.perf_counter() - started
            _estimate(plan, seconds, nbytes, len(plan.sample), 1,
                      f"read {plural(len(plan.sample), 'message')} ({size_text(nbytes)}) "
                      f"from the POP3 server in {seconds:.3f} s")
        session.reset_and_quit()  # nothing is marked; QUIT must commit nothing
    except BaseException:
        session.close()
        raise
