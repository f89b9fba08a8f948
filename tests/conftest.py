"""Fixtures: two real Dovecot servers ("old host", "new host"), accounts, PostgreSQL.

The two servers differ like real migrations do: the old one uses '.' as hierarchy
separator with an "INBOX." personal namespace prefix (Courier style), the new one '/'
with no prefix and its own special-use folders.  If Dovecot cannot start, the tests that
need it fail (never skip): a green run must mean the behaviour was exercised.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid

import pytest
import trustme

from tests.rig.dovecot import DovecotServer, start_or_fail

PG_ADMIN_URL = os.environ.get("MAILMIGRATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
_counter = itertools.count(1)


@pytest.fixture(scope="session")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def old_host(test_ca):
    server = start_or_fail(DovecotServer("old", ".", test_ca, inbox_prefix=True,
                                  special_use={"Sent Messages": "\\Sent"}))
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def new_host(test_ca):
    server = start_or_fail(DovecotServer(
        "new", "/", test_ca, inbox_prefix=False,
        special_use={"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash",
                     "Junk": "\\Junk", "Archive": "\\Archive"}))
    yield server
    server.cleanup()


def _user(request, domain: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"{name}-{next(_counter)}@{domain}"


@pytest.fixture
def old_account(old_host, request):
    return old_host.add_user(_user(request, "old.test"), "old-" + uuid.uuid4().hex[:12])


@pytest.fixture
def new_account(new_host, request):
    return new_host.add_user(_user(request, "new.test"), "new-" + uuid.uuid4().hex[:12])


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = f"mailmigrate_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {exc}", pytrace=False)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
