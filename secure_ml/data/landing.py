"""Watching the landing area: which drops are complete and new, with a cursor that survives restarts.

    cursor = LandingCursor.loads(previous_text)            # "" on the first scan
    ready = scan(landing_dir, cursor, settle_seconds=2.0)  # complete drops never processed before
    for drop in ready: ...request a run for drop.name, keyed by drop.sha256...
    cursor.mark_done(drop)                                 # then store cursor.dumps()

A drop is *complete* only when it is a regular file (not a symlink, not hidden, not a temporary
``.part``/``.tmp`` name) with a ``.csv``/``.parquet`` suffix, whose size and modification time were
the same at two consecutive scans, and whose modification time is older than ``settle_seconds``.
A writer that is still appending changes the size or mtime between scans, so it is never taken
half-written. Nothing is processed twice: the cursor keeps ``name -> (size, mtime, sha256)`` of every
processed drop, and callers key their runs by the content digest, so the same bytes under a new
name do not run again either. Nothing is missed: a drop that is not complete yet stays pending in
the cursor and is looked at again on the next scan.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import sha256_file
from secure_ml.data.ingest import MAX_DROP_BYTES, SETTLE_SECONDS, SUFFIXES
from secure_ml.errors import BadInput

CURSOR_FORMAT = "secure-ml-landing-cursor/1"
#: Processed drops remembered by name; older ones are still deduplicated by their digest run key.
MAX_REMEMBERED = 5000
_TEMPORARY = (".part", ".tmp", ".partial", ".crdownload", "~")


@dataclass(frozen=True)
class Drop:
    """A complete drop, ready to become a dataset version."""

    name: str
    size: int
    mtime_ns: int
    sha256: str

    @property
    def run_key(self) -> str:
        return f"drop-{self.sha256}"


@dataclass
class LandingCursor:
    """What the last scan saw (``pending``) and what was already processed (``done``)."""

    pending: dict[str, list[int]] = field(default_factory=dict)   # name -> [size, mtime_ns]
    done: dict[str, list[Any]] = field(default_factory=dict)      # name -> [size, mtime_ns, sha256]

    @classmethod
    def loads(cls, text: str | None) -> LandingCursor:
        if not text:
            return cls()
        try:
            data = json.loads(text)
            if data.get("format") != CURSOR_FORMAT:
                raise ValueError
            return cls(pending=dict(data["pending"]), done=dict(data["done"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            # A cursor we cannot read must not make us re-run everything silently.
            raise BadInput("landing sensor cursor is not a secure-ml landing cursor; reset the sensor") from None

    def dumps(self) -> str:
        done = dict(list(self.done.items())[-MAX_REMEMBERED:])
        return json.dumps({"format": CURSOR_FORMAT, "pending": self.pending, "done": done},
                          sort_keys=True, separators=(",", ":"))

    def mark_done(self, drop: Drop) -> None:
        self.pending.pop(drop.name, None)
        self.done.pop(drop.name, None)  # re-insert so the newest stay when the list is trimmed
        self.done[drop.name] = [drop.size, drop.mtime_ns, drop.sha256]

    def processed_digests(self) -> set[str]:
        return {str(entry[2]) for entry in self.done.values()}


def candidate(path: Path) -> os.stat_result | None:
    """The lstat of ``path`` if it could be a drop at all (regular data file, not hidden or temporary)."""
    name = path.name
    if name.startswith(".") or name.lower().endswith(_TEMPORARY) or path.suffix.lower() not in SUFFIXES:
        return None
    try:
        info = path.lstat()
    except FileNotFoundError:  # removed between listing and looking
        return None
    # Symlinks could point anywhere (outside the landing area, at a device): never followed.
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0 or info.st_size > MAX_DROP_BYTES:
        return None
    return info


def scan(landing: Path, cursor: LandingCursor, *, settle_seconds: float = SETTLE_SECONDS,
         now: float | None = None) -> list[Drop]:
    """Complete drops in ``landing`` not yet processed, oldest first; updates ``cursor.pending``.

    The caller marks each drop done (``cursor.mark_done``) once its run is requested.
    """
    landing = Path(landing)
    if not landing.is_dir():
        return []
    now = time.time() if now is None else now
    seen: dict[str, list[int]] = {}
    ready: list[Drop] = []
    for path in sorted(landing.iterdir(), key=lambda p: p.name):
        info = candidate(path)
        if info is None:
            continue
        observed = [info.st_size, info.st_mtime_ns]
        previous = cursor.done.get(path.name)
        if previous is not None and list(previous[:2]) == observed:
            continue  # processed already, unchanged
        stable = cursor.pending.get(path.name) == observed
        settled = now - info.st_mtime_ns / 1e9 >= settle_seconds
        if not (stable and settled):
            seen[path.name] = observed  # look again next scan
            continue
        digest = sha256_file(path)
        if path.lstat().st_mtime_ns != info.st_mtime_ns or path.lstat().st_size != info.st_size:
            seen[path.name] = [path.lstat().st_size, path.lstat().st_mtime_ns]  # changed while hashing
            continue
        drop = Drop(name=path.name, size=info.st_size, mtime_ns=info.st_mtime_ns, sha256=digest)
        if digest in cursor.processed_digests():
            cursor.mark_done(drop)  # the same bytes under another name: already a dataset version
            continue
        ready.append(drop)
    cursor.pending = seen
    ready.sort(key=lambda d: (d.mtime_ns, d.name))
    return ready
