"""Config validation: every rule names the job, the key, what was expected, what to do."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from migrate import config as cfg
from migrate.errors import ConfigError


def base_job(**overrides) -> dict:
    job = {
        "name": "alice",
        "kind": "imap-copy",
        "source": {"host": "mail.old.example", "username": "alice@old.example",
                   "password_env": "ALICE_OLD"},
        "destination": {"host": "mail.new.example", "username": "alice@new.example",
                        "password_env": "ALICE_NEW"},
    }
    job.update(overrides)
    return job


def pop_job(**overrides) -> dict:
    job = {
        "name": "bob-archive",
        "kind": "pop3-archive",
        "source": {"host": "mail.old.example", "username": "bob@old.example",
                   "password": "x"},
        "archive": {"path": "archive/bob"},
    }
    job.update(overrides)
    return job


def parse(*jobs, **top):
    data = {"jobs": list(jobs), **top}
    return cfg.parse(data, base_dir=Path("/etc/mailmigrate"))


def problems(*jobs, **top) -> str:
    with pytest.raises(ConfigError) as info:
        parse(*jobs, **top)
    assert info.value.exit_code == 2
    return str(info.value)


def test_valid_config_gets_safe_defaults():
    c = parse(base_job(), pop_job())
    job = c.job("alice")
    assert job.source.security == "ssl" and job.source.port == 993
    assert job.destination.port == 993
    assert job.delete_after_verify is False
    assert job.folders.include == ("*",)
    pop = c.job("bob-archive")
    assert pop.source.port == 995 and pop.source.protocol == "pop3"
    assert pop.archive.path == Path("/etc/mailmigrate/archive/bob")
    assert c.state_url == "sqlite:////etc/mailmigrate/mailmigrate.db"


def test_starttls_defaults_to_the_plaintext_ports():
    job = base_job()
    job["source"]["security"] = "starttls"
    pop = pop_job()
    pop["source"]["security"] = "starttls"
    c = parse(job, pop)
    assert c.job("alice").source.port == 143
    assert c.job("bob-archive").source.port == 110


def test_relative_sqlite_url_is_relative_to_the_config_file():
    c = parse(base_job(), state={"url": "sqlite:///state/mm.db"})
    assert c.state_url == "sqlite:////etc/mailmigrate/state/mm.db"


def test_unknown_key_names_job_key_and_suggests_fix():
    job = base_job()
    job["source"]["hots"] = "typo"
    text = problems(job)
    assert "job 'alice', [jobs.source]: unknown key 'hots'; did you mean 'host'?" in text


def test_unknown_top_level_and_job_keys():
    text = problems(base_job(delete_after_verfy=True), stat={})
    assert "unknown key 'stat'; did you mean 'state'?" in text
    assert "unknown key 'delete_after_verfy'; did you mean 'delete_after_verify'?" in text


def test_missing_host_username_and_password_source():
    job = base_job()
    job["source"] = {"security": "ssl"}
    text = problems(job)
    assert "job 'alice', [jobs.source]: missing required key 'host'" in text
    assert "job 'alice', [jobs.source]: missing required key 'username'" in text
    assert ("job 'alice', [jobs.source]: no password source; set one of password_env, "
            "password_file, password_command or password") in text


def test_two_password_sources_refused():
    job = base_job()
    job["source"]["password"] = "x"
    text = problems(job)
    assert "password_env and password are all set; keep exactly one password source" in text


def test_duplicate_job_names():
    text = problems(base_job(), base_job())
    assert ("job 'alice' is defined twice (jobs #1 and #2); the name of each job must be "
            "unique") in text


def test_security_none_requires_allow_insecure():
    job = base_job()
    job["source"]["security"] = "none"
    text = problems(job)
    assert ("job 'alice', [jobs.source]: security = \"none\" sends the password and all "
            "mail unencrypted; use \"ssl\" (port 993) or \"starttls\" (port 143); set "
            "allow_insecure = true only for a trusted private network") in text
    job["source"]["allow_insecure"] = True
    assert parse(job).job("alice").source.port == 143


def test_implicit_tls_on_plaintext_port_refused():
    job = pop_job()
    job["source"]["port"] = 110
    text = problems(job)
    assert ("job 'bob-archive', [jobs.source]: port = 110 is the plaintext/STARTTLS port but "
            "security = \"ssl\" (implicit TLS); use port = 995, or security = \"starttls\"") \
        in text


def test_smtp_port_refused_even_with_allow_insecure():
    job = base_job()
    job["source"].update(port=25, security="none", allow_insecure=True)
    text = problems(job)
    assert ("port = 25 is an SMTP port (sending mail), not IMAP; IMAP uses 993 (SSL/TLS) "
            "or 143 (STARTTLS)") in text


def test_short_username_refused_unless_allowed():
    job = base_job()
    job["source"]["username"] = "alice"
    text = problems(job)
    assert ("job 'alice', [jobs.source]: username = 'alice' is not a full email address; "
            "mail servers almost always expect the full address") in text
    assert "set allow_short_username = true" in text
    job["source"]["allow_short_username"] = True
    assert parse(job).job("alice").source.username == "alice"


def test_same_mailbox_with_two_protocols_refused():
    imap = base_job()
    pop = pop_job()
    pop["source"]["username"] = "ALICE@old.example"  # same mailbox, other case
    text = problems(imap, pop)
    assert ("jobs 'alice' (IMAP) and 'bob-archive' (POP3) both read mailbox "
            "ALICE@old.example on mail.old.example (same [jobs.source] host and username); "
            "use one protocol per mailbox: a POP3 client deletes mail from the server that "
            "IMAP clients still expect") in text


def test_second_reader_of_a_mailbox_one_job_deletes_from_refused():
    keep = base_job()
    move = base_job(name="alice-move", delete_after_verify=True)
    text = problems(keep, move)
    assert ("jobs 'alice' and 'alice-move' both read mailbox alice@old.example on "
            "mail.old.example, and 'alice-move' deletes from it") in text
    parse(keep, base_job(name="alice-again"))  # two readers without deletion are fine


def test_kind_specific_tables():
    text = problems(base_job(archive={"path": "x"}),
                    pop_job(destination={"host": "h"}, folders={}))
    assert "[jobs.archive] is for pop3-archive jobs" in text
    assert "[jobs.destination] is for imap-copy jobs" in text
    assert "[jobs.folders] is for imap-copy jobs" in text


def test_leave_on_server_days_rules():
    text = problems(base_job(leave_on_server_days=30),
                    pop_job(leave_on_server_days=30, delete_after_verify=True))
    assert "leave_on_server_days applies to pop3-archive jobs only" in text
    assert "delete_after_verify = true and leave_on_server_days are both set; choose one" \
        in text
    assert parse(pop_job(leave_on_server_days=30)).jobs[0].leave_on_server_days == 30


def test_wrong_types_and_values():
    job = base_job(kind="imap-sync")
    text = problems(job)
    assert "kind = 'imap-sync'; expected \"imap-copy\" or \"pop3-archive\"" in text
    job = base_job(delete_after_verify="yes")
    job["source"]["port"] = "993"
    text = problems(job)
    assert "delete_after_verify = 'yes' has the wrong type; expected true or false" in text
    assert "port = '993' has the wrong type; expected an integer" in text


def test_missing_ca_file_is_reported():
    job = base_job()
    job["source"]["ca_file"] = "no/such/ca.pem"
    text = problems(job)
    assert "ca_file = 'no/such/ca.pem' does not exist" in text


def test_every_problem_is_reported_at_once():
    job = base_job()
    job["source"]["security"] = "none"
    job["destination"]["username"] = "bob"
    with pytest.raises(ConfigError) as info:
        parse(job)
    assert len(info.value.problems) == 2


def test_load_reports_toml_syntax_and_missing_file(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("[[jobs]\nname = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        cfg.load(bad)
    with pytest.raises(ConfigError, match="does not exist; copy config.example.toml"):
        cfg.load(tmp_path / "missing.toml")


def test_example_config_is_valid(monkeypatch):
    example = Path(__file__).parent.parent / "config.example.toml"
    c = cfg.load(example)
    assert {j.kind for j in c.jobs} == {"imap-copy", "pop3-archive"}


def test_passwords_are_lazy_and_never_shown(tmp_path, monkeypatch):
    secret_file = tmp_path / "pw"
    secret_file.write_text("s3cret-from-file\n")
    job = base_job()
    job["source"] = {"host": "h.example", "username": "a@b.example",
                     "password_file": str(secret_file)}
    job["destination"].pop("password_env")
    job["destination"]["password"] = "inline-s3cret"
    c = parse(job)
    j = c.job("alice")
    assert "s3cret" not in repr(c) and "s3cret" not in str(j.source.password)
    assert j.source.password.reveal() == "s3cret-from-file"
    assert j.destination.password.reveal() == "inline-s3cret"
    # A missing env var names the variable, and nothing else is read before use.
    monkeypatch.delenv("ALICE_OLD", raising=False)
    src = parse(base_job()).job("alice").source
    with pytest.raises(ConfigError, match="password_env = 'ALICE_OLD' but that environment "
                                          "variable is not set"):
        src.password.reveal()
    monkeypatch.setenv("ALICE_OLD", "from-env")
    assert src.password.reveal() == "from-env"


def test_password_command(tmp_path):
    job = base_job()
    job["source"].pop("password_env")
    job["source"]["password_command"] = ["printf", "cmd-secret\\nsecond line"]
    assert parse(job).job("alice").source.password.reveal() == "cmd-secret"
    job["source"]["password_command"] = ["sh", "-c", "echo leaked-secret; exit 3"]
    with pytest.raises(ConfigError) as info:
        parse(job).job("alice").source.password.reveal()
    assert "exited with status 3" in str(info.value)
    assert "leaked-secret" not in str(info.value)


def test_inline_password_not_echoed_in_errors():
    job = base_job()
    job["source"]["password"] = 12345
    job["source"].pop("password_env")
    text = problems(job)
    assert "password must be a non-empty string" in text and "12345" not in text


def test_config_error_exit_code_through_cli(tmp_path, capsys):
    from migrate.cli import main

    path = tmp_path / "c.toml"
    path.write_text('[[jobs]]\nname = "a"\nkind = "imap-copy"\n'
                    '[jobs.source]\nhost = "h.example"\nusername = "a"\npassword = "pw"\n')
    code = main(["run", "-c", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert "username = 'a' is not a full email address" in err
    assert "missing; add a [jobs.destination] table" in err
    assert os.path.exists(tmp_path / "mailmigrate.db") is False


# --- credentials in [state] url --------------------------------------------------------


@pytest.mark.parametrize("url", [
    "mysql://user:s3cret@db/x",                          # unsupported database
    "postgresql+psycopg://user:s3cret@db:notaport/x",    # does not parse
    "postgresql+psycopg://user:s3cret@db/x\n",           # control character
    "mysql://user:s3cret/x",                             # host forgotten: secret as port
    "mysql://user@db/x?password=s3cret",                 # libpq-style query parameter
    "mysql://user:p@ss:s3cret@db/x",                     # '@' and ':' inside the password
])
def test_state_url_password_never_shown(url):
    text = problems(base_job(), state={"url": url})
    assert "[state] url = " in text and "***" in text
    assert "s3cret" not in text


def test_redact_url_keeps_what_helps_and_hides_the_password():
    assert cfg.redact_url("postgresql+psycopg://mm:s3cret@db.example:5432/mailmigrate") \
        == "postgresql+psycopg://mm:***@db.example:5432/mailmigrate"
    assert cfg.redact_url("postgresql+psycopg://mm@db.example/mm?sslmode=require") \
        == "postgresql+psycopg://mm@db.example/mm?sslmode=require"
    assert cfg.redact_url("sqlite:////var/lib/mm.db") == "sqlite:////var/lib/mm.db"
    assert cfg.redact_url("postgresql://[::1]:5432/x") == "postgresql://[::1]:5432/x"


def test_state_url_not_a_string_is_not_echoed():
    text = problems(base_job(), state={"url": {"password": "s3cret"}})
    assert "[state] url is a table; expected an SQLAlchemy URL" in text
    assert "s3cret" not in text


def test_valid_state_urls_accepted():
    url = "postgresql+psycopg://mm:s3cret@db.example/mailmigrate"
    assert parse(base_job(), state={"url": url}).state_url == url
    assert parse(base_job(), state={"url": "sqlite:///:memory:"}).state_url \
        == "sqlite:///:memory:"


# --- other_namespaces ------------------------------------------------------------------


def test_other_namespaces_is_a_bool_for_imap_copy_jobs():
    assert parse(base_job()).job("alice").other_namespaces is False
    assert parse(base_job(other_namespaces=True)).job("alice").other_namespaces is True
    text = problems(base_job(other_namespaces="yes"))
    assert ("job 'alice': other_namespaces = 'yes' has the wrong type; expected true or "
            "false") in text
    text = problems(pop_job(other_namespaces=True))
    assert "job 'bob-archive': other_namespaces applies to imap-copy jobs only" in text


# --- values that used to crash or slip through (found by tests/test_config_fuzz.py) ------


def test_out_of_range_numbers_refused():
    job = base_job()
    job["source"]["timeout"] = 10**30  # float() of it raised OverflowError
    job["destination"]["timeout"] = float("nan")  # NaN <= 0 is false: NaN was accepted
    text = problems(job, pop_job(leave_on_server_days=10**12))
    assert ("job 'alice', [jobs.source]: timeout = 1000000000000000000000000000000; "
            "expected a positive number of seconds, at most 86400") in text
    assert "job 'alice', [jobs.destination]: timeout = nan; expected a positive" in text
    assert ("job 'bob-archive': leave_on_server_days = 1000000000000; expected 0 to 36500 "
            "days") in text
    job = base_job()
    job["source"]["timeout"] = float("inf")
    assert "timeout = inf; expected a positive number" in problems(job)


def test_unknown_home_directory_in_a_path():
    job = pop_job(archive={"path": "~no-such-user-here/mail"})  # expanduser: RuntimeError
    job["source"].pop("password")
    job["source"]["password_file"] = "~no-such-user-here/pw"
    text = problems(job)
    assert ("job 'bob-archive', [jobs.archive]: path = '~no-such-user-here/mail' starts "
            "with '~' but the home directory of 'no-such-user-here' is unknown; write the "
            "full path") in text
    assert "[jobs.source]: password_file = '~no-such-user-here/pw' starts with '~'" in text


def test_values_that_would_fail_later_refused_now():
    job = base_job(name="alice\n")  # '$' matched before a trailing newline
    text = problems(job)
    assert "job 'alice\\n': name may contain only letters" in text
    text = problems(pop_job(archive={"path": ""}))  # gave a job without an archive
    assert "job 'bob-archive', [jobs.archive]: path = ''; expected a file path" in text
    job = base_job()
    job["source"]["password_env"] = "A\x00B"
    job["destination"]["host"] = "mail.new.example\x00"
    text = problems(job)
    assert "[jobs.source]: password_env must be the name of an environment variable" in text
    assert "[jobs.destination]: host = 'mail.new.example\\x00'; expected a bare host" in text
    with pytest.raises(ConfigError, match="no jobs defined"):
        cfg.parse({"jobs": []}, base_dir=Path("/etc/mailmigrate"))


def test_inline_password_with_a_line_break_refused_without_echo():
    job = pop_job()
    job["source"]["password"] = "s3cret\nDELE 1"
    text = problems(job)
    assert "[jobs.source]: password contains a line break or NUL character" in text
    assert "s3cret" not in text


def test_kind_mismatch_names_kind():
    text = problems(pop_job(kind="imap-copy"))
    assert ("job 'bob-archive': [jobs.archive] is for pop3-archive jobs; with kind = "
            "\"imap-copy\" the job writes to [jobs.destination]") in text


@pytest.mark.parametrize("content, expected", [
    (b'[[jobs]]\nname = "a"\nkind = "imap-copy\n',
     "is not valid TOML: Illegal character '\\n' (at line 3, column 18), the line of key "
     "'kind'"),
    (b'[[jobs]]\nname = "a"\n[jobs.source\n',
     "(at line 3, column 13), the line of table [jobs.source]"),
    (b'[[jobs]]\nname = "a"\npassword = "s3cret\xff"\n',
     "is not UTF-8 text: byte 0xff on line 3, the line of key 'password'; save the file "
     "as UTF-8"),
    (b"[[jobs]]\nname = " + b"9" * 5000 + b"\n",
     "a number is too long on line 2, the line of key 'name'"),
    (b"[[jobs]]\nname = " + b"[" * 5000 + b"]" * 5000 + b"\n",
     "arrays or tables nested too deeply on line 2, the line of key 'name'"),
])
def test_unreadable_toml_names_line_and_key_never_the_value(tmp_path, content, expected):
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    assert expected in str(info.value)
    assert "s3cret" not in str(info.value)


# --- password sources at run time -------------------------------------------------------


def command_source(argv: list[str]):
    job = base_job()
    job["source"].pop("password_env")
    job["source"]["password_command"] = argv
    return parse(job).job("alice").source.password


def process_alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (killed, waiting for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_password_command_timeout_kills_command_and_children(tmp_path, monkeypatch):
    from migrate import secrets

    monkeypatch.setattr(secrets, "PASSWORD_COMMAND_TIMEOUT", 1.0)
    pids = tmp_path / "pids"
    source = command_source(
        ["sh", "-c", f"sleep 30 & echo $! > {pids}; echo $$ >> {pids}; echo partial-s3cret; "
                     "sleep 30"])
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        source.reveal()
    assert time.monotonic() - started < 10
    text = str(info.value)
    assert ("job 'alice', [jobs.source]: password_command 'sh' did not finish within 1 "
            "seconds and was stopped with every process it started; run it by hand") in text
    assert "does not exist" not in text and "partial-s3cret" not in text
    grandchild, child = (int(x) for x in pids.read_text().split())
    deadline = time.monotonic() + 10
    while any(process_alive(p) for p in (child, grandchild)):
        if time.monotonic() > deadline:
            pytest.fail(f"password_command processes still running: {child}, {grandchild}")
        time.sleep(0.05)


def test_password_command_missing_or_not_executable(tmp_path):
    with pytest.raises(ConfigError) as info:
        command_source(["no-such-password-program", "x"]).reveal()
    assert ("job 'alice', [jobs.source]: password_command 'no-such-password-program' does "
            "not exist; check the program name, or give its full path") in str(info.value)
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho pw\n")
    with pytest.raises(ConfigError, match="cannot be started \\(Permission denied\\)"):
        command_source([str(script)]).reveal()


def test_password_command_output_not_utf8_and_file_not_utf8(tmp_path):
    with pytest.raises(ConfigError, match="printed something that is not UTF-8 text"):
        command_source(["printf", "\\377secret"]).reveal()
    secret_file = tmp_path / "pw"
    secret_file.write_bytes(b"\xffsecret\n")
    job = base_job()
    job["source"] = {"host": "h.example", "username": "a@b.example",
                     "password_file": str(secret_file)}
    with pytest.raises(ConfigError, match="password_file .* is not UTF-8 text"):
        parse(job).job("alice").source.password.reveal()
