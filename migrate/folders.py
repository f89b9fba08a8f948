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
                 rules: Folders, other_namespaces: bool = False
                 ) -> tuple[list[FolderPlan], list[tuple[str, str]]]:
    """Which source folder goes where.  Returns the plans and the folders refused, as
    (source name, why): several source folders that would land in one destination
    folder are never merged silently - unless the admin mapped them there on purpose."""
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
        if not folder.personal and not other_namespaces:
            continue  # another user's or a public folder: only on request
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
                                and target.upper() != "INBOX", reason, folder.personal))
    return _refuse_collisions(plans)


def _refuse_collisions(plans: list[FolderPlan]
                       ) -> tuple[list[FolderPlan], list[tuple[str, str]]]:
    # Case-insensitive: many servers (and file systems under them) fold case, and
    # 'Work' + 'work' in one folder is a merge all the same.
    by_target: dict[str, list[FolderPlan]] = {}
    for p in plans:
        key = "INBOX" if p.destination.upper() == "INBOX" else p.destination.lower()
        by_target.setdefault(key, []).append(p)
    kept, refused = [], []
    for group in by_target.values():
        if len(group) == 1 or all(p.reason == "map" for p in group):
            kept.extend(group)
            continue
        names = " and ".join(repr(p.source) for p in group)
        for p in group:
            refused.append((p.source, (
                f"folders {names} would all be copied into {p.destination!r} "
                f"({', '.join(q.reason for q in group)}); refusing to merge them silently, "
                "so none of them is copied. Give each its own destination with "
                f'[jobs.folders] map, e.g. map = {{ "{group[-1].source}" = '
                f'"{group[-1].destination} (2)" }}, or exclude one; mapping them to the same '
                "folder on purpose merges them")))
    order = {p.source: i for i, p in enumerate(plans)}
    kept.sort(key=lambda p: order[p.source])
    return kept, refused
