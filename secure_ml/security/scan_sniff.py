"""What a file's bytes say it is, whatever it is called.

    info = sniff(path)            # {"kinds": ["zip", ...], "zip_members": [...], "pickles_inside": [...]}
    looks_like_pickle(data)       # protocol 2+ by its PROTO opcode, 0/1 by parsing (never loading)
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path
from typing import Any

def _head(path: Path, size: int = 64) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def looks_like_pickle(data: bytes) -> bool:
    """A pickle stream: protocol 2+ starts with PROTO; protocol 0/1 is recognised by parsing it.

    Parsing (never loading) walks the opcodes (secure_ml.security.scan_pickle), executing none.
    """
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return True
    return data[:1] in _OPCODE_STARTS and _parses_as_pickle(data)


# First opcodes of protocol 0/1 pickles (MARK, GLOBAL, EMPTY_LIST/DICT, INT, STRING, ...).
_OPCODE_STARTS = {b"(", b"c", b"]", b"}", b"I", b"S", b"V", b"N", b"K", b"X", b"\x8c", b"G", b"F", b"L", b"U", b"T"}


def _parses_as_pickle(data: bytes) -> bool:
    from secure_ml.security.scan_pickle import UnreadablePickle, walk_pickle

    try:
        walk_pickle(data)
    except UnreadablePickle:
        return False
    return True


def _zip_members(path: Path) -> list[str] | None:
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, RuntimeError):
        return ["<unreadable zip>"]


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError):
        return False


_PARSE_LIMIT = 64 * 1024 * 1024


def sniff(path: Path) -> dict[str, Any]:
    """What a file's bytes say it is, independent of its name."""
    head = _head(path, 4096)
    members = _zip_members(path)
    kinds: list[str] = []
    # Protocol 0/1 pickles have no magic: they are recognised by parsing, which needs the whole
    # stream (up to a bound; a parse stops at the first byte that is not an opcode).
    if looks_like_pickle(head) or (head[:1] in _OPCODE_STARTS and len(head) == 4096
                                   and looks_like_pickle(_head(path, _PARSE_LIMIT))):
        kinds.append("pickle")
    if members is not None:
        kinds.append("zip")
    if _is_tar(path):
        kinds.append("tar")
    if head.startswith(b"\x93NUMPY"):
        kinds.append("npy")
    pickles_inside = [m for m in (members or []) if m.endswith((".pkl", ".pickle")) or m.endswith("/data.pkl")]
    return {"kinds": kinds, "zip_members": members or [], "pickles_inside": pickles_inside}
