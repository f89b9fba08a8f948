"""The read-only witness itself: it must see a change, or its 'unchanged' proves nothing."""

import pytest

from tests.rig.mailgen import connect, fill, realistic_mailbox
from tests.rig.untouched import untouched


def test_witness_sees_a_flag_change_and_a_read_write_select(old_account):
    fill(old_account, realistic_mailbox(count=6, big=False))
    with untouched(imap=[old_account]):
        pass  # nothing happens: no failure
    with pytest.raises(AssertionError, match="imap changed"):
        with untouched(imap=[old_account]):
            client = connect(old_account)
            client.select_folder("INBOX")  # read-write SELECT clears \Recent
            client.add_flags(client.search("ALL")[:1], ["project-y"])
            client.logout()


def test_witness_sees_pop3_deletion_and_database_rows(old_account, tmp_path):
    import poplib
    import ssl

    from sqlalchemy import create_engine, text

    fill(old_account, realistic_mailbox(count=3, big=False))
    url = f"sqlite:///{tmp_path / 's.db'}"
    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text("create table t (x int)"))
    with pytest.raises(AssertionError, match="state changed"):
        with untouched(pop3=[old_account], state_url=url):
            with eng.begin() as c:
                c.execute(text("insert into t values (1)"))
    with pytest.raises(AssertionError, match="pop3 changed"):
        with untouched(pop3=[old_account]):
            ctx = ssl.create_default_context(cafile=str(old_account.server.ca_file))
            pop = poplib.POP3_SSL(old_account.host, old_account.server.ports["pop3s"],
                                  context=ctx)
            pop.user(old_account.username)
            pop.pass_(old_account.password)
            pop.dele(1)
            pop.quit()
