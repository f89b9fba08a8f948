"""Config fuzzing: any config file gives a Config or a ConfigError naming the offending key,
never another exception, and through the CLI exit code 2 without a traceback.

Configs start from a valid one that sets every documented key; each example then changes
keys (random, absent or wrong-typed values, unknown keys, tables for scalars and back) or
corrupts the bytes of one line.  Bounded and derandomized so CI runs the same examples.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from migrate import config as cfg
from migrate.errors import ConfigError
from tests.rig.jobs import run_cli

IN_PROCESS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow])
THROUGH_CLI = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                       suppress_health_check=[HealthCheck.too_slow,
                                              HealthCheck.filter_too_much])

# Documented keys per kind of table (config.example.toml, migrate/config.py).
DOCUMENTED = {
    "top": {"state", "jobs", "workers"},
    "state": {"url"},
    "workers": set(cfg.WORKER_KEYS),
    "job": {"name", "kind", "delete_after_verify", "leave_on_server_days",
            "other_namespaces", "source", "destination", "archive", "folders", "accounts",
            "schedule"},
    "endpoint": set(cfg.ENDPOINT_KEYS),
    "archive": {"path", "format"},
    "folders": {"include", "exclude", "map"},
}
ALL_DOCUMENTED = set().union(*DOCUMENTED.values())
TABLE_KIND = {"state": "state", "source": "endpoint", "destination": "endpoint",
              "archive": "archive", "folders": "folders"}


def base_config() -> dict:
    """Valid, and between its endpoints it sets every documented key."""
    return {
        "state": {"url": "sqlite:///state.db"},
        "workers": {"heartbeat_seconds": 10, "stalled_after_seconds": 60, "retries": 2},
        "jobs": [
            {
                "name": "alice", "kind": "imap-copy", "delete_after_verify": False,
                "other_namespaces": False, "schedule": "*/30 * * * *",
                "source": {"host": "mail.old.example", "port": 993, "security": "ssl",
                           "username": "alice@old.example", "password_env": "ALICE_OLD",
                           "ca_file": "ca.pem", "allow_insecure": False,
                           "allow_short_username": False, "timeout": 60,
                           "max_connections": 4},
                "destination": {"host": "mail.new.example", "port": 143,
                                "security": "starttls", "username": "alice",
                                "allow_short_username": True, "timeout": 2.5,
                                "password_command": ["pass", "show", "mail/alice"]},
                "folders": {"include": ["*"], "exclude": ["INBOX.Trash"],
                            "map": {"INBOX.Sent Messages": "Sent"}},
            },
            {
                "name": "bob-archive", "kind": "pop3-archive", "leave_on_server_days": 30,
                "source": {"host": "pop.old.example", "port": 110, "security": "none",
                           "allow_insecure": True, "username": "bob@old.example",
                           "password": "inline-pw"},
                "archive": {"path": "archive/bob", "format": "maildir"},
            },
            {
                "name": "carol", "kind": "pop3-archive", "delete_after_verify": True,
                "source": {"host": "pop.old.example", "username": "carol@old.example",
                           "password_file": "secrets/carol"},
                "archive": {"path": "archive/carol"},
            },
            {
                "name": "dave", "kind": "imap-copy",
                "source": {"host": "mail.old.example", "username": "dave@old.example",
                           "auth": "admin", "admin_user": "admin@old.example",
                           "admin_password_env": "OLD_ADMIN",
                           "max_bytes_per_second": 2_000_000},
                "destination": {"host": "mail.new.example", "username": "dave@new.example",
                                "auth": "admin", "admin_user": "root",
                                "admin_password_file": "secrets/new-admin"},
            },
            {
                "name": "erin", "kind": "pop3-archive",
                "source": {"host": "pop.old.example", "username": "erin@old.example",
                           "auth": "admin", "admin_user": "admin@old.example",
                           "admin_password_command": ["pass", "show", "mail/old-admin"]},
                "archive": {"path": "archive/erin"},
            },
            {
                "name": "frank", "kind": "imap-copy",
                "source": {"host": "mail.old.example", "username": "frank@old.example",
                           "auth": "admin", "admin_user": "admin@old.example",
                           "admin_password": "inline-admin-pw"},
                "destination": {"host": "mail.new.example", "username": "frank@new.example",
                                "auth": "oauth2",
                                "oauth2_token_command": ["oauth2-token", "frank"]},
            },
            {
                "name": "staff", "kind": "imap-copy", "accounts": "accounts.csv",
                "source": {"host": "mail.old.example", "password_env": "STAFF_OLD"},
                "destination": {"host": "mail.new.example", "password_env": "STAFF_NEW"},
            },
        ],
    }


# --- TOML text from a dict ---------------------------------------------------------

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else toml_string(key)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(x) for x in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in value.items()) + "}"


def is_array_of_tables(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, dict) for x in value)


def dump_toml(data: dict) -> str:
    """[section] / [[array]] layout as people write it; inline values inside arrays."""
    lines: list[str] = []

    def table(prefix: tuple[str, ...], body: dict) -> None:
        for k, v in body.items():
            if not isinstance(v, dict) and not is_array_of_tables(v):
                lines.append(f"{toml_key(k)} = {toml_value(v)}")
        for k, v in body.items():
            header = ".".join(toml_key(p) for p in (*prefix, k))
            if isinstance(v, dict):
                lines.append(f"[{header}]")
                table((*prefix, k), v)
            elif is_array_of_tables(v):
                for item in v:
                    lines.append(f"[[{header}]]")
                    table((*prefix, k), item)

    table((), data)
    return "\n".join(lines) + "\n"


def normalized(value):
    """For comparing a dump's round trip: NaN equal to NaN, key order ignored."""
    if isinstance(value, dict):
        return sorted((k, normalized(v)) for k, v in value.items())
    if isinstance(value, list):
        return [normalized(x) for x in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return repr(value)


# --- strategies ----------------------------------------------------------------------

INTERESTING_STRINGS = [
    "", " ", "\x00", "a\x00b", "\n", "alice\n", "ssl", "starttls", "none", "imap-copy",
    "pop3-archive", "maildir", "mbox", "*", "~", "~no-such-user-here/x", ".", "/",
    "alice", "a@b.example", "mail.example.com", "http://mail.example.com", "ü@é.example",
    "mysql://user:s3cret@db/x", "postgresql+psycopg://user:s3cret@db:notaport/x",
    "sqlite:", "sqlite:///:memory:", "x" * 500,
]
INTERESTING_INTS = [0, -1, 1, 25, 110, 143, 465, 587, 993, 995, 64, 65, 65535, 65536,
                    36500, 36501, 86400, 2**63 - 1, -(2**63), 10**30, -(10**30), 10**4000]

INTERESTING_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-9, 0.5, 86400.5, 1e300]
edge_scalars = st.sampled_from(INTERESTING_STRINGS + INTERESTING_INTS + INTERESTING_FLOATS)
scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    edge_scalars,
    st.dates(),
    st.datetimes().map(lambda d: d.replace(fold=0)),  # TOML has no fold
    st.times().map(lambda t: t.replace(fold=0)),
)
keys = st.text(max_size=6)
toml_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(keys, children, max_size=3),
    max_leaves=6,
)


def tables_of(data: dict) -> list[tuple[tuple, str]]:
    """(path, kind) of every table in a config dict built from base_config()."""
    found = [((), "top")]
    state = data.get("state")
    if isinstance(state, dict):
        found.append((("state",), "state"))
    if isinstance(data.get("workers"), dict):
        found.append((("workers",), "workers"))
    jobs = data.get("jobs")
    for i, job in enumerate(jobs if isinstance(jobs, list) else []):
        if not isinstance(job, dict):
            continue
        found.append((("jobs", i), "job"))
        for key, kind in TABLE_KIND.items():
            if key != "state" and isinstance(job.get(key), dict):
                found.append((("jobs", i, key), kind))
    return found


def at(data, path: tuple):
    for part in path:
        data = data[part]
    return data


def names_in(value) -> set[str]:
    """Keys inside a generated value: a table put in place of a key may be reported by
    the key inside it that is wrong."""
    if isinstance(value, dict):
        return set(value).union(*(names_in(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(names_in(v) for v in value))
    return set()


@st.composite
def mutation(draw, data: dict) -> set[str]:
    """Change data in place; return the names any resulting error must mention one of."""
    path, kind = draw(st.sampled_from(tables_of(data)))
    table = at(data, path)
    op = draw(st.sampled_from(["set", "set", "delete", "add_documented", "add_unknown"]))
    if op in ("set", "delete") and table:
        key = draw(st.sampled_from(sorted(table)))
        if op == "delete":
            del table[key]
            return {key}
    elif op == "add_unknown":
        key = draw(keys.filter(lambda k: k not in ALL_DOCUMENTED))
    else:
        key = draw(st.sampled_from(sorted(DOCUMENTED[kind])))
    value = draw(edge_scalars | toml_values)  # edge values straight on documented keys too
    table[key] = value
    return {key} | names_in(value)


@st.composite
def mutated_configs(draw, max_mutations: int = 1) -> tuple[dict, list[set[str]]]:
    data = base_config()
    count = draw(st.integers(min_value=1, max_value=max_mutations))
    return data, [draw(mutation(data)) for _ in range(count)]


# --- checks --------------------------------------------------------------------------


def names_key(text: str, key: str) -> bool:
    """The message mentions the key: as a word, or as the repr used for unknown keys."""
    if repr(key) in text:
        return True
    return bool(key) and re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", text) is not None


def load_text(directory: Path, content: str | bytes) -> cfg.Config | ConfigError:
    path = directory / "config.toml"
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    try:
        return cfg.load(path)
    except ConfigError as exc:
        assert exc.exit_code == 2
        return exc


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "ca.pem").write_text("not checked before connecting\n")
    (directory / "accounts.csv").write_text("source_user\ndan@old.example\n")
    return directory


def test_base_config_is_valid_and_covers_every_documented_key(config_dir):
    assert isinstance(load_text(config_dir, dump_toml(base_config())), cfg.Config)
    example = Path(__file__).parent.parent / "config.example.toml"
    text = example.read_text()
    documented = set(re.findall(r"^#? ?([a-z_]+) = ", text, re.M))
    for table in tables_of(tomllib.loads(text)):
        documented |= set(at(tomllib.loads(text), table[0]))
    missing = documented - ALL_DOCUMENTED
    assert not missing, f"keys of config.example.toml the fuzzer never sets: {missing}"
    used = set()
    for path, _ in tables_of(base_config()):
        used |= set(at(base_config(), path))
    assert ALL_DOCUMENTED - used == set()


@IN_PROCESS
@given(data=st.dictionaries(keys, toml_values, max_size=3) | toml_values.filter(
    lambda v: isinstance(v, dict)))
def test_toml_dump_round_trips(data):
    assert normalized(tomllib.loads(dump_toml(data))) == normalized(data)


@IN_PROCESS
@given(case=mutated_configs())
def test_one_changed_key_is_named_or_accepted(config_dir, case):
    data, (expected,) = case
    result = load_text(config_dir, dump_toml(data))
    if isinstance(result, ConfigError):
        assert any(names_key(str(result), k) for k in expected), (expected, str(result))


@IN_PROCESS
@given(case=mutated_configs(max_mutations=4))
def test_several_changed_keys_never_crash(config_dir, case):
    data, expected = case
    result = load_text(config_dir, dump_toml(data))
    if isinstance(result, ConfigError):
        assert any(names_key(str(result), k) for k in set().union(*expected)), str(result)


# Bytes that break the TOML or the UTF-8 of one line without running on to the next one
# (no '[', no triple quotes, no line break), so the error belongs to that line's key.
BROKEN_VALUES = [b'"unterminated', b"1 2", b"tru", b"0x", b"1__0", b"=", b"{ a = 1",
                 b'"bad \\q escape"', b'"raw \x01 control"', b'"\xff\xfe"', b"\xc3\x28",
                 b"\x80", b"", b"# only a comment", b"nan nan", b"1979-05-27T25:00:00"]
line_bytes = st.binary(max_size=12).filter(
    lambda b: b"\n" not in b and b"[" not in b and b'"""' not in b and b"'''" not in b)


@IN_PROCESS
@given(line=st.integers(min_value=0), value=st.sampled_from(BROKEN_VALUES) | line_bytes)
def test_broken_bytes_in_one_line_name_its_key(config_dir, line, value):
    lines = dump_toml(base_config()).encode().split(b"\n")
    settings_lines = [i for i, text in enumerate(lines) if b" = " in text]
    index = settings_lines[line % len(settings_lines)]
    key = lines[index].split(b" = ", 1)[0].decode()
    lines[index] = key.encode() + b" = " + value
    result = load_text(config_dir, b"\n".join(lines))
    if isinstance(result, ConfigError):
        assert names_key(str(result), key), (key, value, str(result))


@IN_PROCESS
@given(content=st.binary(max_size=200))
def test_random_bytes_are_a_config_error(config_dir, content):
    assert isinstance(load_text(config_dir, content), ConfigError)


@IN_PROCESS
@given(depth=st.integers(min_value=1, max_value=20000), opener=st.sampled_from("[{"))
def test_deep_nesting_and_long_numbers_are_config_errors(config_dir, depth, opener):
    closer = {"[": "]", "{": "}"}[opener]
    nested = (opener + ("a = " if opener == "{" else "")) * depth + "1" + closer * depth
    result = load_text(config_dir, f"deep = {nested}\nlong = {'9' * depth}\n")
    assert isinstance(result, ConfigError)
    assert names_key(str(result), "deep") or names_key(str(result), "long"), str(result)


@THROUGH_CLI
@given(case=mutated_configs())
def test_cli_exit_code_2_without_traceback(config_dir, case):
    data, (expected,) = case
    text = dump_toml(data)
    assume(isinstance(load_text(config_dir, text), ConfigError))
    path = config_dir / "cli.toml"
    path.write_text(text, encoding="utf-8")
    proc = run_cli("check-config", "-c", str(path), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert any(names_key(proc.stderr, k) for k in expected), (expected, proc.stderr)
