"""Pure functions: folder planning, APPENDUID and Message-ID parsing, deletion gate."""

from __future__ import annotations

import pytest

from migrate.config import Folders
from migrate.endpoints.imap import (FolderInfo, copyable_flags, parse_appenduid,
                                    parse_message_id, parse_uid_set)
from migrate.errors import SafetyError
from migrate.folders import included, plan_folders, translate_name
from migrate.deletion import check_cap


def F(name, *flags, delim="."):
    return FolderInfo(name, delim, frozenset(flags))


@pytest.mark.parametrize("name,expected", [
    ("INBOX", "INBOX"),
    ("inbox", "INBOX"),
    ("INBOX.Archive", "Archive"),
    ("INBOX.Archive.2019", "Archive/2019"),
    ("INBOX.a/b", "a_b"),  # a '/' inside a name must not invent a level
    ("Shared.x", "Shared/x"),  # outside the personal prefix: separator still translated
])
def test_translate_dot_prefix_to_slash(name, expected):
    assert translate_name(name, ".", "INBOX.", "/", "") == expected


def test_translate_slash_to_dot_with_prefix():
    assert translate_name("Archive/2019", "/", "", ".", "INBOX.") == "INBOX.Archive.2019"
    assert translate_name("INBOX/Sub", "/", "", ".", "INBOX.") == "INBOX.Sub"
    assert translate_name("INBOX/Sub", "/", "", "/", "") == "INBOX/Sub"


def test_plan_uses_special_use_map_and_existing_case():
    src = [F("INBOX"), F("INBOX.Sent Messages", "\\Sent"), F("INBOX.Trash", "\\Trash"),
           F("INBOX.Projekte", "\\Noselect"), F("INBOX.Projekte.X"), F("INBOX.Junk", "\\Junk"),
           F("INBOX.Old")]
    dst = [F("INBOX", delim="/"), F("Sent Items", "\\Sent", delim="/"),
           F("Deleted", "\\Trash", delim="/"), F("old", delim="/")]
    rules = Folders(include=("*",), exclude=("INBOX.Junk",),
                    map={"INBOX.Trash": "Papierkorb"})
    plans = {p.source: p for p in plan_folders(src, ".", "INBOX.", dst, "/", "", rules)[0]}
    assert set(plans) == {"INBOX", "INBOX.Sent Messages", "INBOX.Trash", "INBOX.Projekte.X",
                          "INBOX.Old"}
    assert plans["INBOX.Sent Messages"].destination == "Sent Items"
    assert plans["INBOX.Sent Messages"].create is False
    assert plans["INBOX.Trash"].destination == "Papierkorb"  # explicit map wins
    assert plans["INBOX.Trash"].create is True
    assert plans["INBOX.Projekte.X"].destination == "Projekte/X"
    assert plans["INBOX.Old"].destination == "old"  # reuses the existing folder
    assert plans["INBOX"].create is False


def test_include_exclude_globs():
    rules = Folders(include=("INBOX*",), exclude=("INBOX.Spam*",))
    assert included("INBOX.Archive", rules)
    assert not included("INBOX.Spam.2020", rules)
    assert not included("Other", rules)


def test_uid_set_and_appenduid():
    assert parse_uid_set("5:7,9") == [5, 6, 7, 9]
    assert parse_uid_set(b"12") == [12]
    assert parse_appenduid(b"[APPENDUID 1795977597 5:9] Append completed.") == \
        (1795977597, [5, 6, 7, 8, 9])
    assert parse_appenduid([b"[APPENDUID 3 4]", b"ok"]) == (3, [4])
    assert parse_appenduid(b"Append completed.") is None


@pytest.mark.parametrize("block,expected", [
    (b"Message-ID: <a@b>\r\n\r\n", "<a@b>"),
    (b"message-id:\r\n  <folded@x.example>\r\n\r\n", "<folded@x.example>"),
    (b"Message-Id: no-brackets@x\r\n", "no-brackets@x"),
    (b"\r\n", None),
    (None, None),
])
def test_parse_message_id(block, expected):
    assert parse_message_id(block) == expected


def test_copyable_flags_drop_recent_and_deleted():
    assert copyable_flags([b"\\Seen", b"\\Recent", "\\Deleted", "$Label1"]) == \
        {"\\Seen", "$Label1"}


def test_max_delete_cap():
    check_cap("alice", 10, 10)
    check_cap("alice", 10, None)
    with pytest.raises(SafetyError, match="11 messages would be deleted from the source, more "
                                          "than --max-delete 10; nothing was deleted"):
        check_cap("alice", 11, 10)


def test_uid_set_text_compresses_runs():
    from migrate.endpoints.imap import uid_set_text

    assert uid_set_text([7, 1, 2, 3, 9, 10]) == "1:3,7,9:10"
    assert uid_set_text([5]) == "5"
    assert uid_set_text([]) == ""


def test_parse_body_fetch_finds_uid_before_or_after_the_literal():
    from migrate.endpoints.imap import parse_body_fetch

    data = [
        (b"1 (UID 10 BODY[] {3}", b"abc"), b")",
        (b"2 (BODY[] {2}", b"xy"), b" UID 11)",
        b"3 (FLAGS (\\Seen) UID 12)",  # unsolicited flag update: no body
        (b"4 (UID 13 BODY[HEADER] {1}", b"h"), b")",  # another section: ignored
    ]
    assert parse_body_fetch(data) == {10: b"abc", 11: b"xy"}


def test_parse_part_fetch_knows_pieces_by_origin_not_by_place():
    from migrate.endpoints.imap import parse_part_fetch

    data = [
        (b"1 (UID 10 BODY[]<4> {3}", b"efg"), b")",  # a later FETCH answered first
        (b"1 (BODY[]<0> {4}", b"abcd"), b" UID 10)",
        (b"2 (UID 11 BODY[]<0> {2}", b"xy"), b")",  # another message: not ours
        b"1 (FLAGS (\\Seen) UID 10)",
        (b"1 (UID 10 BODY[] {2}", b"no"), b")",  # no origin said
    ]
    assert parse_part_fetch(data, 10) == {4: b"efg", 0: b"abcd", None: b"no"}


@pytest.mark.parametrize("buffer_size", [1, 2, 3, 5, 7, 64, 4096])
def test_pop3_multiline_reader_unstuffs_across_block_boundaries(buffer_size):
    import io
    import random

    from migrate.endpoints.pop3 import _read_multiline

    rng = random.Random(buffer_size)
    lines = [b"From: a@b", b"", b".", b"..two", b".leading dot", b"x" * 300, b"", b"."]
    lines += [bytes(rng.choice(b".ab\r") for _ in range(rng.randrange(6))).replace(b"\r", b"")
              for _ in range(200)]
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                       for line in lines)
    wire = stuffed + b".\r\n+OK next response\r\n"
    reader = io.BufferedReader(io.BytesIO(wire), buffer_size=buffer_size)
    got = []
    assert _read_multiline(reader, got.append) == len(message)
    assert b"".join(got) == message
    assert reader.read() == b"+OK next response\r\n"  # not a byte of the next response


def test_pop3_multiline_reader_empty_message_and_eof():
    import io

    from migrate.endpoints.pop3 import _read_multiline

    got = []
    assert _read_multiline(io.BufferedReader(io.BytesIO(b".\r\n")), got.append) == 0
    assert got == []
    with pytest.raises(EOFError):
        _read_multiline(io.BufferedReader(io.BytesIO(b"abc\r\n")), got.append)


def test_pop3_duplicate_uidls_get_distinct_keys():
    from migrate.endpoints.pop3 import listing_keys

    assert listing_keys([(1, "a"), (2, "b"), (3, "a"), (4, "a")]) == \
        {1: "a", 2: "b", 3: "a#1", 4: "a#2"}


def test_maildir_names_cannot_be_steered(tmp_path):
    from migrate.endpoints.maildir import file_name

    uidl, content = "../../etc/passwd:2,S", "ab" * 32
    name = file_name("job", uidl, content)
    assert "/" not in name and ":" not in name and not name.startswith(".")
    assert name == file_name("job", uidl, content)  # stable: no time, no host name
    assert name != file_name("other-job", uidl, content)
    assert name != file_name("job", uidl, "cd" * 32)  # another message, same UIDL


def test_every_command_and_option_is_documented():
    """README must mention each subcommand and each visible long option."""
    import argparse
    from pathlib import Path

    from migrate.cli import build_parser

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sub.choices.items():
        assert f"mailmigrate {name}" in readme, f"command {name!r} is not in README.md"
        for action in subparser._actions:
            if action.help == argparse.SUPPRESS:
                continue
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert opt in readme, f"{name} {opt} is not in README.md"


@pytest.mark.parametrize("sources,destination", [
    # special-use and a same-named folder
    ([F("INBOX.Sent", delim="."), F("INBOX.Sent Messages", "\\Sent")], "Sent"),
    # names that differ only in case
    ([F("INBOX.Work"), F("INBOX.work")], "Work"),
    # a '/' inside a name becomes '_' and meets a real 'a_b'
    ([F("INBOX.a_b"), F("INBOX.a/b")], "a_b"),
])
def test_folders_landing_in_one_destination_folder_are_refused_not_merged(sources,
                                                                          destination):
    dst = [F("INBOX", delim="/"), F("Sent", "\\Sent", delim="/")]
    plans, refused = plan_folders([F("INBOX")] + sources, ".", "INBOX.", dst, "/", "",
                                  Folders())
    assert [p.source for p in plans] == ["INBOX"]
    assert sorted(name for name, _ in refused) == sorted(f.name for f in sources)
    why = refused[0][1]
    assert f"would all be copied into {destination!r}".lower() in why.lower()
    assert "refusing to merge them silently" in why and "[jobs.folders] map" in why


def test_sub_and_inbox_sub_collide_on_a_prefix_destination():
    src = [F("Sub", delim="/"), F("INBOX/Sub", delim="/")]
    plans, refused = plan_folders(src, "/", "", [F("INBOX")], ".", "INBOX.", Folders())
    assert plans == [] and {n for n, _ in refused} == {"Sub", "INBOX/Sub"}


def test_folders_mapped_together_on_purpose_are_merged():
    src = [F("INBOX.Sent"), F("INBOX.Sent Messages", "\\Sent")]
    rules = Folders(map={"INBOX.Sent": "Sent", "INBOX.Sent Messages": "Sent"})
    plans, refused = plan_folders(src, ".", "INBOX.", [F("Sent", delim="/")], "/", "", rules)
    assert refused == [] and {p.destination for p in plans} == {"Sent"}


def test_other_users_and_public_folders_only_on_request():
    src = [F("INBOX", delim="/"), F("Other Users/bob/Stuff", delim="/"),
           F("Public/News", delim="/")]
    src = [FolderInfo(f.name, f.delimiter, f.flags, personal=(f.name == "INBOX"))
           for f in src]
    plans, _ = plan_folders(src, "/", "", [F("INBOX", delim="/")], "/", "", Folders())
    assert [p.source for p in plans] == ["INBOX"]
    plans, _ = plan_folders(src, "/", "", [F("INBOX", delim="/")], "/", "", Folders(),
                            other_namespaces=True)
    assert {p.source: p.personal for p in plans} == {
        "INBOX": True, "Other Users/bob/Stuff": False, "Public/News": False}
