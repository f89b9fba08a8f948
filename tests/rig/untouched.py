"""Witness that a command changed nothing: servers' listings and the state database.

    with untouched(imap=[old_account, new_account], pop3=[acct], state_url=url,
                   paths=[archive_dir]):
        run_cli("report", "-c", str(config))

takes a listing before and after and fails the test on any difference.  An IMAP listing
is every folder with UIDVALIDITY, UIDNEXT and every message's UID, flags (incl. \\Recent:
a SELECT that is not read-only would clear it) and size; a POP3 listing is UIDL + LIST;
the state database is every row of every table; a path is every file's name and size.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import ssl
from pathlib import Path

from imapclient import IMAPClient
from sqlalchemy import MetaData, create_engine, select


def imap_listing(account) -> dict:
    ctx = ssl.create_default_context(cafile=str(account.server.ca_file))
    client = IMAPClient(account.host, port=account.server.ports["imaps"], ssl_context=ctx,
                        timeout=30)
    out: dict = {}
    try:
        client.login(account.username, account.password)
        for flags, _d, name in client.list_folders():
            if b"\\Noselect" in flags or b"\\NonExistent" in flags:
                out[name] = "noselect"
                continue
            # STATUS, not SELECT: a witness must not clear \Recent itself.
            st = client.folder_status(name, ["MESSAGES", "UIDNEXT", "UIDVALIDITY"])
            info = client.select_folder(name, readonly=True)
            msgs = {}
            if info[b"EXISTS"]:
                for uid, item in client.fetch(client.search("ALL"), ["FLAGS", "RFC822.SIZE"]).items():
                    msgs[uid] = (
                        tuple(sorted(f.decode() if isinstance(f, bytes) else str(f)
                                     for f in item[b"FLAGS"])),
                        item[b"RFC822.SIZE"])
            out[name] = (st[b"UIDVALIDITY"], st[b"UIDNEXT"], st[b"MESSAGES"], msgs)
    finally:
        with contextlib.suppress(Exception):
            client.logout()
    return out


def pop3_listing(account) -> list:
    ctx = ssl.create_default_context(cafile=str(account.server.ca_file))
    pop = poplib.POP3_SSL(account.host, account.server.ports["pop3s"], context=ctx,
                          timeout=30)
    try:
        pop.user(account.username)
        pop.pass_(account.password)
        uidl = pop.uidl()[1]
        sizes = pop.list()[1]
        return sorted(zip(uidl, sizes, strict=True))
    finally:
        # RSET first: QUIT commits DELEs, and a witness must not commit anything.
        with contextlib.suppress(Exception):
            pop.rset()
        with contextlib.suppress(Exception):
            pop.quit()


def database_listing(url: str) -> dict:
    engine = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return {name: sorted(tuple(map(repr, row)) for row in conn.execute(select(table)))
                    for name, table in meta.tables.items()}
    finally:
        engine.dispose()


def path_listing(root: Path) -> list:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out.append((str(p.relative_to(root)), p.stat().st_size))
    return sorted(out)


def listing(imap=(), pop3=(), state_url: str | None = None, paths=()) -> dict:
    return {
        "imap": {a.username: imap_listing(a) for a in imap},
        "pop3": {a.username: pop3_listing(a) for a in pop3},
        "state": database_listing(state_url) if state_url else None,
        "paths": {str(p): path_listing(Path(p)) for p in paths},
    }


@contextlib.contextmanager
def untouched(imap=(), pop3=(), state_url: str | None = None, paths=()):
    before = listing(imap, pop3, state_url, paths)
    yield before
    after = listing(imap, pop3, state_url, paths)
    for part in before:
        assert after[part] == before[part], f"{part} changed by a read-only command"
