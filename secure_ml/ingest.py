"""Taking a data drop from the landing area: safe path resolution, strict parsing, provenance.

    drop = resolve_drop(landing_dir, "german_credit.csv")     # refuses traversal, symlinks out, partial files
    frame, source = read_drop(drop)                            # strict CSV/Parquet parsing; one clear error
    record = provenance(source, frame, actor="alice")
"""

from __future__ import annotations

import io
import os
import stat
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from secure_ml.errors import BadInput
from secure_ml.integrity import sha256_bytes

SUFFIXES = (".csv", ".parquet")
MAX_DROP_BYTES = 2 << 30
MAX_FIELD_BYTES = 1 << 20
#: A drop modified this recently may still be being written; it is not taken yet.
SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    sha256: str
    size: int
    format: str
    modified: str


def resolve_drop(landing: Path, name: str = "", *, settle_seconds: float = SETTLE_SECONDS) -> Path:
    """The drop ``name`` in ``landing`` (or the newest complete one), proven to be inside it."""
    landing = Path(landing).resolve()
    if not landing.is_dir():
        raise BadInput(f"landing area {landing} does not exist")
    if not name:
        candidates = sorted(
            (p for p in landing.iterdir() if p.suffix.lower() in SUFFIXES and not p.name.startswith(".")),
            key=lambda p: p.lstat().st_mtime,
        )
        if not candidates:
            raise BadInput(f"no .csv or .parquet drop in the landing area {landing}")
        name = candidates[-1].name
    if "/" in name or "\\" in name or name in {".", ".."} or "\0" in name:
        raise BadInput(f"drop name {name!r} is not a plain file name (path traversal refused)")
    path = landing / name
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise BadInput(f"no drop named {name!r} in the landing area") from None
    if stat.S_ISLNK(info.st_mode):
        target = path.resolve()
        if landing not in target.parents:
            raise BadInput(f"drop {name!r} is a symlink pointing outside the landing area")
        raise BadInput(f"drop {name!r} is a symlink; drops must be regular files")
    if not stat.S_ISREG(info.st_mode):
        raise BadInput(f"drop {name!r} is not a regular file")
    if path.suffix.lower() not in SUFFIXES:
        raise BadInput(f"drop {name!r} is neither .csv nor .parquet")
    if settle_seconds and time.time() - info.st_mtime < settle_seconds:
        raise BadInput(f"drop {name!r} was modified under {settle_seconds:g}s ago and may still be being written")
    if info.st_size > MAX_DROP_BYTES:
        raise BadInput(f"drop {name!r} is {info.st_size} bytes, over the {MAX_DROP_BYTES}-byte limit")
    return path


def read_drop(path: Path) -> tuple[pd.DataFrame, Source]:
    """Parse a drop strictly; every malformed input is one clear BadInput."""
    data = Path(path).read_bytes()
    fmt = "parquet" if path.suffix.lower() == ".parquet" else "csv"
    frame = _parse_parquet(data, path.name) if fmt == "parquet" else _parse_csv(data, path.name)
    info = os.stat(path)
    source = Source(
        name=path.name, path=str(path), sha256=sha256_bytes(data), size=len(data), format=fmt,
        modified=datetime.fromtimestamp(info.st_mtime, UTC).isoformat(),
    )
    return frame, source


def _parse_csv(data: bytes, name: str) -> pd.DataFrame:
    if not data.strip():
        raise BadInput(f"drop {name!r} is empty")
    if data.startswith(b"\xef\xbb\xbf"):
        raise BadInput(f"drop {name!r} starts with a byte-order mark; save it as UTF-8 without BOM")
    if b"\0" in data:
        raise BadInput(f"drop {name!r} contains NUL bytes (binary data, or a wrong encoding such as UTF-16)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"drop {name!r} is not valid UTF-8 (byte {exc.start}); re-encode it as UTF-8") from None
    header = text.split("\n", 1)[0].rstrip("\r").split(",")
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:
        raise BadInput(f"drop {name!r} has duplicate column names: {', '.join(duplicates)}")
    longest = max((len(field) for line in text.splitlines() for field in line.split(",")), default=0)
    if longest > MAX_FIELD_BYTES:
        raise BadInput(f"drop {name!r} has a field of {longest} bytes, over the {MAX_FIELD_BYTES}-byte limit")
    try:
        frame = pd.read_csv(io.StringIO(text), engine="c", on_bad_lines="error")
    except pd.errors.ParserError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BadInput(f"drop {name!r} has ragged rows: {first}") from None
    except (pd.errors.EmptyDataError, ValueError) as exc:
        raise BadInput(f"drop {name!r} could not be parsed as CSV: {str(exc).splitlines()[0]}") from None
    if frame.empty:
        raise BadInput(f"drop {name!r} has a header but no rows")
    return frame


def _parse_parquet(data: bytes, name: str) -> pd.DataFrame:
    if not data:
        raise BadInput(f"drop {name!r} is empty")
    try:
        frame = pd.read_parquet(io.BytesIO(data), engine="pyarrow")
    except Exception as exc:  # pyarrow raises several unrelated types for a malformed file
        raise BadInput(f"drop {name!r} is not a readable Parquet file ({type(exc).__name__})") from None
    if frame.columns.duplicated().any():
        raise BadInput(f"drop {name!r} has duplicate column names")
    if frame.empty:
        raise BadInput(f"drop {name!r} has no rows")
    return frame


def provenance(source: Source, frame: pd.DataFrame, *, actor: str, artifact_sha256: str = "") -> dict[str, Any]:
    """The provenance record stored beside a dataset."""
    return {
        "format": "secure-ml-provenance/1",
        "source": asdict(source),
        "rows": int(len(frame)),
        "columns": [str(c) for c in frame.columns],
        "actor": actor,
        "ingested_at": datetime.now(UTC).isoformat(),
        "artifact_sha256": artifact_sha256,
    }
