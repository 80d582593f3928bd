"""Taking a data drop from the landing area: safe path resolution, strict parsing, provenance.

    path = resolve_drop(landing_dir, "german_credit.csv")     # refuses traversal, links, partial files
    raw, source = read_drop_bytes(path)                        # the bytes, read once through O_NOFOLLOW
    frame = parse_drop(raw, source)                            # strict CSV/Parquet parsing; one clear error
    record = provenance(source, frame, actor="alice", approved=approved.summary(), dvc_version="md5:…")

``read_drop(path)`` does the last three in one call. Every malformed or hostile input is one
:class:`~secure_ml.errors.BadInput` whose message names the drop and what is wrong with it, never
a row of its (possibly confidential) contents. Nothing here writes anything: a drop that fails
here leaves no trace but the audit entry the caller writes.

CSV is parsed with pyarrow (strict: every row must have the header's number of fields, which
pandas' C parser does not enforce for short rows) and handed over as a pandas DataFrame with
pandas' usual dtypes; date and time columns stay text, as pandas would read them.
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import io
import os
import stat
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from secure_ml.custody.integrity import sha256_bytes
from secure_ml.errors import BadInput

SUFFIXES = (".csv", ".parquet")
MAX_DROP_BYTES = 2 << 30
#: The longest value a cell may hold; longer is not tabular data (and a memory hazard downstream).
MAX_FIELD_BYTES = 1 << 20
#: The longest CSV line (a row, or part of one with quoted newlines).
MAX_ROW_BYTES = 4 << 20
#: A Parquet drop may expand to at most this many bytes (decompression bombs).
MAX_PARQUET_EXPANDED_BYTES = 8 << 30
#: A drop modified this recently may still be being written; it is not taken yet.
SETTLE_SECONDS = 2.0
NUL = bytes(1)
PROVENANCE_FORMAT = "secure-ml-provenance/2"


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    sha256: str
    size: int
    format: str
    modified: str


def _candidates(landing: Path) -> list[Path]:
    return [p for p in landing.iterdir()
            if p.suffix.lower() in SUFFIXES and not p.name.startswith(".") and not p.is_symlink()]


def resolve_drop(landing: Path, name: str = "", *, settle_seconds: float = SETTLE_SECONDS) -> Path:
    """The drop ``name`` in ``landing`` (or the newest settled one), proven to be a plain file inside it."""
    landing = Path(landing).resolve()
    if not landing.is_dir():
        raise BadInput(f"landing area {landing} does not exist")
    if not name:
        now = time.time()
        settled = sorted((p for p in _candidates(landing) if now - p.lstat().st_mtime >= settle_seconds),
                         key=lambda p: p.lstat().st_mtime)
        if not settled:
            raise BadInput(f"no settled .csv or .parquet drop in the landing area {landing}")
        name = settled[-1].name
    if "/" in name or "\\" in name or name in {".", ".."} or "\0" in name or name.startswith("."):
        raise BadInput(f"drop name {name[:120]!r} is not a plain file name in the landing area "
                       "(path traversal refused)")
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
    if info.st_nlink > 1:
        # A hard link can make any file on the same file system appear inside the landing area.
        raise BadInput(f"drop {name!r} is a hard link ({info.st_nlink} names); land a copy instead")
    if path.suffix.lower() not in SUFFIXES:
        raise BadInput(f"drop {name!r} is neither .csv nor .parquet")
    if settle_seconds and time.time() - info.st_mtime < settle_seconds:
        raise BadInput(f"drop {name!r} was modified under {settle_seconds:g}s ago: it may still be being "
                       "written, and is taken once it has settled")
    if info.st_size > MAX_DROP_BYTES:
        raise BadInput(f"drop {name!r} is {info.st_size} bytes, over the {MAX_DROP_BYTES}-byte limit")
    return path


def read_drop_bytes(path: Path) -> tuple[bytes, Source]:
    """Read a resolved drop once, refusing a file swapped or still growing while it is read."""
    path = Path(path)
    before = path.lstat()
    try:
        # O_NOFOLLOW: a file replaced by a symlink after resolve_drop looked at it is not followed.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadInput(f"drop {path.name!r} cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        opened = os.fstat(handle.fileno())
        if (opened.st_ino, opened.st_dev) != (before.st_ino, before.st_dev) or not stat.S_ISREG(opened.st_mode):
            raise BadInput(f"drop {path.name!r} was replaced while it was being opened")
        if _open_for_writing(handle.fileno()):
            raise BadInput(f"drop {path.name!r} is still being written (another process has it open for writing)")
        data = handle.read(MAX_DROP_BYTES + 1)
        after = os.fstat(handle.fileno())
    if len(data) > MAX_DROP_BYTES:
        raise BadInput(f"drop {path.name!r} is over the {MAX_DROP_BYTES}-byte limit")
    if (after.st_size, after.st_mtime_ns) != (opened.st_size, opened.st_mtime_ns) or len(data) != after.st_size:
        raise BadInput(f"drop {path.name!r} changed while it was being read; it is still being written")
    fmt = "parquet" if path.suffix.lower() == ".parquet" else "csv"
    source = Source(name=path.name, path=str(path), sha256=sha256_bytes(data), size=len(data), format=fmt,
                    modified=datetime.fromtimestamp(after.st_mtime, UTC).isoformat())
    return data, source


def _open_for_writing(fd: int) -> bool:
    """Whether another process holds the file open for writing (Linux read leases); False if unknown.

    The kernel grants a read lease only when no one has the file open for writing, which catches a
    slow writer that the settle time alone would miss. Where leases are unavailable (not Linux, not
    the file's owner, a network file system) the settle time and the size check are the guard.
    """
    setlease = getattr(fcntl, "F_SETLEASE", None)
    if setlease is None:
        return False
    try:
        fcntl.fcntl(fd, setlease, fcntl.F_RDLCK)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EBUSY)
    fcntl.fcntl(fd, setlease, fcntl.F_UNLCK)
    return False


def parse_drop(data: bytes, source: Source) -> pd.DataFrame:
    """Parse a drop's bytes strictly into a DataFrame; every malformed input is one clear BadInput."""
    parse = _parse_parquet if source.format == "parquet" else _parse_csv
    # self_destruct frees each Arrow column once pandas has it: the drop is never held twice in full.
    return _check_table(parse(data, source.name), source.name).to_pandas(self_destruct=True, split_blocks=True)


def read_drop(path: Path) -> tuple[pd.DataFrame, Source]:
    """Read and parse a resolved drop in one call."""
    data, source = read_drop_bytes(path)
    return parse_drop(data, source), source


def _first_invalid_utf8(data: bytes, *, chunk: int = 1 << 24) -> int | None:
    """The offset of the first byte that is not valid UTF-8, or None; decoded a chunk at a time, so
    a large drop is never held a second time as text."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        pending = len(decoder.getstate()[0])  # bytes of a character split across the chunk boundary
        try:
            decoder.decode(view[start:start + chunk], final=start + chunk >= len(data))
        except UnicodeDecodeError as exc:
            return start - pending + exc.start
    return None


def _longest_line(data: bytes) -> tuple[int, int]:
    """(length, 1-based line number) of the longest line, computed without splitting the text."""
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    bounds = np.concatenate(([-1], newlines, [len(data)]))
    lengths = np.diff(bounds) - 1
    index = int(lengths.argmax())
    return int(lengths[index]), index + 1


def _parse_csv(data: bytes, name: str) -> pa.Table:
    if not data or data.isspace():
        raise BadInput(f"drop {name!r} is empty")
    if data.startswith(b"\xef\xbb\xbf"):
        raise BadInput(f"drop {name!r} starts with a UTF-8 byte-order mark; save it as UTF-8 without BOM")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise BadInput(f"drop {name!r} is UTF-16 encoded; re-encode it as UTF-8")
    if NUL in data:
        raise BadInput(f"drop {name!r} contains NUL bytes at offset {data.find(NUL)} "
                       "(binary data, or a wrong encoding such as UTF-16)")
    bad = _first_invalid_utf8(data)
    if bad is not None:
        raise BadInput(f"drop {name!r} is not valid UTF-8 (byte {bad} is 0x{data[bad]:02x}); "
                       "re-encode it as UTF-8")
    longest, line = _longest_line(data)
    if longest > MAX_ROW_BYTES:
        raise BadInput(f"drop {name!r} has a line of {longest} bytes (line {line}), over the "
                       f"{MAX_ROW_BYTES}-byte limit: a field this large is not tabular data")
    ragged: list[tuple[int, int]] = []

    def on_invalid_row(row: Any) -> str:
        ragged.append((row.expected_columns, row.actual_columns))
        return "error"

    try:
        table = pa_csv.read_csv(
            io.BytesIO(data),
            read_options=pa_csv.ReadOptions(block_size=2 * MAX_ROW_BYTES),
            # Without a quote character no value can hold a newline, and parsing is twice as fast.
            parse_options=pa_csv.ParseOptions(newlines_in_values=b'"' in data, invalid_row_handler=on_invalid_row),
        )
    except pa.ArrowInvalid as exc:
        if ragged:
            expected, actual = ragged[0]
            raise BadInput(f"drop {name!r} has ragged rows: a row has {actual} fields where the header "
                           f"has {expected}") from None
        if "straddl" in str(exc):
            raise BadInput(f"drop {name!r} has a row over {2 * MAX_ROW_BYTES} bytes "
                           "(a huge quoted field?)") from None
        # Arrow messages can quote the offending row: keep only the part before any data.
        raise BadInput(f"drop {name!r} could not be parsed as CSV: {str(exc).split(':')[0]}") from None
    for index, field in enumerate(table.schema):
        if pa.types.is_temporal(field.type):  # pandas reads dates as text; keep the two in step
            table = table.set_column(index, field.name, pc.cast(table.column(index), pa.string()))
    return table


def _parse_parquet(data: bytes, name: str) -> pa.Table:
    if not data:
        raise BadInput(f"drop {name!r} is empty")
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        metadata = parquet.metadata
        names = list(parquet.schema_arrow.names)
    except Exception as exc:  # pyarrow raises several unrelated types for a malformed file
        raise BadInput(f"drop {name!r} is not a readable Parquet file ({type(exc).__name__})") from None
    duplicates = sorted({c for c in names if names.count(c) > 1})
    if duplicates:
        raise BadInput(f"drop {name!r} has duplicate column names: {', '.join(duplicates)}")
    expanded = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if expanded > MAX_PARQUET_EXPANDED_BYTES:
        raise BadInput(f"drop {name!r} expands to {expanded} bytes, over the "
                       f"{MAX_PARQUET_EXPANDED_BYTES}-byte limit")
    try:
        return parquet.read()
    except Exception as exc:
        raise BadInput(f"drop {name!r} is not a readable Parquet file ({type(exc).__name__})") from None


def _check_table(table: pa.Table, name: str) -> pa.Table:
    """Checks that hold for every format: columns named and unique, rows present, cells bounded."""
    columns = [str(c) for c in table.column_names]
    if not columns:
        raise BadInput(f"drop {name!r} has no columns")
    blank = [i + 1 for i, c in enumerate(columns) if not c.strip()]
    if blank:
        raise BadInput(f"drop {name!r} has an empty column name (column {blank[0]})")
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise BadInput(f"drop {name!r} has duplicate column names: {', '.join(duplicates)}")
    if table.num_rows == 0:
        raise BadInput(f"drop {name!r} has a header but no rows")
    for column, field in zip(columns, table.schema, strict=True):
        values = table.column(column)
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            longest = pc.max(pc.utf8_length(values)).as_py() or 0
            what = "characters"
        elif pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            longest, what = pc.max(pc.binary_length(values)).as_py() or 0, "bytes"
        else:
            continue
        if longest > MAX_FIELD_BYTES:
            raise BadInput(f"drop {name!r} has a field of {longest} {what} in column {column!r}, over the "
                           f"{MAX_FIELD_BYTES}-byte limit")
        if pc.any(pc.match_substring(values.cast(pa.large_binary()), NUL)).as_py():
            raise BadInput(f"drop {name!r} has NUL characters in column {column!r}")
    return table


def provenance(source: Source, frame: pd.DataFrame, *, actor: str, artifact_sha256: str = "",
               approved: dict[str, Any] | None = None, dvc: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance record stored (encrypted) beside a dataset.

    ``approved`` is the approved source the drop matched (name, owner, classification);
    ``dvc`` where its ciphertext is versioned (``version``, ``path``, ``remote``).
    """
    return {
        "format": PROVENANCE_FORMAT,
        "source": asdict(source),
        "rows": int(len(frame)),
        "columns": [str(c) for c in frame.columns],
        "actor": actor,
        "ingested_at": datetime.now(UTC).isoformat(),
        "artifact_sha256": artifact_sha256,
        "approved_source": dict(approved or {}),
        "dvc_version": str((dvc or {}).get("version", "")),
        "dvc": dict(dvc or {}),
    }
