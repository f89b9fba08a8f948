"""Which source folders go where: filtering, mapping, separator/namespace translation.

Pure functions over folder listings, so "what would happen" needs no connection.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .config import Folders
from .endpoints.imap import FolderInfo


@dataclass(frozen=True)
class FolderPlan:
    source: str
    destination: str
    create: bool  # the destination folder does not exist yet
    reason: str  # "map", "special-use \\Sent", "name"
    personal: bool = True  # in the user's personal namespace (others' folders: never deleted)


def included(name: str, rules: Folders) -> bool:
    if not any(fnmatch.fnmatchcase(name, p) for p in rules.include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in rules.exclude)


def translate_name(name: str, src_delim: str | None, src_prefix: str,
                   dst_delim: str, dst_prefix: str) -> str:
    """'INBOX.Archive.2019' ('.' + prefix 'INBOX.') → 'Archive/2019' ('/', no prefix).

    A destination separator inside a source name component would create a hierarchy
    level that was not there; it is replaced by '_'.
    """
    if name.upper() == "INBOX":
        return "INBOX"
    rest = name
    if src_prefix and rest.startswith(src_prefix):
        rest = rest[len(src_prefix):]
    parts = rest.split(src_delim) if src_delim else [rest]
    if (len(parts) > 1 and parts[0].upper() == "INBOX"
            and dst_prefix.upper() == f"INBOX{dst_delim}"):
        parts = parts[1:]  # 'INBOX/Sub' → 'INBOX.Sub', not 'INBOX.INBOX.Sub'
    if dst_delim:
        parts = [p.replace(dst_delim, "_") for p in parts]
    return dst_prefix + (dst_delim or "").join(parts)


def plan_folders(source: list[FolderInfo], src_delim: str | None, src_prefix: str,
                 destination: list[FolderInfo], dst_delim: str, dst_prefix: str,
                 rules: Folders) -> list[FolderPlan]:
    dest_names = {f.name for f in destination}
    dest_lower = {f.name.lower(): f.name for f in destination}
    dest_special = {}
    for f in destination:
        if f.special_use and f.special_use not in dest_special:
            dest_special[f.special_use] = f.name
    plans = []
    for folder in source:
        if not folder.selectable or not included(folder.name, rules):
            continue
        if folder.name in rules.map:
            target, reason = rules.map[folder.name], "map"
        elif folder.special_use and folder.special_use in dest_special:
            target = dest_special[folder.special_use]
            reason = f"special-use {folder.special_use}"
        else:
            target = translate_name(folder.name, folder.delimiter or src_delim, src_prefix,
                                    dst_delim, dst_prefix)
            # Reuse an existing folder that differs only in case (e.g. "Inbox").
            target = dest_lower.get(target.lower(), target) if target.upper() != "INBOX" \
                else "INBOX"
            reason = "name"
        plans.append(FolderPlan(folder.name, target, target not in dest_names
                                and target.upper() != "INBOX", reason))
    return plans
