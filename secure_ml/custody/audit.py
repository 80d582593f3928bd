"""A tamper-evident audit log: append-only JSON lines, each carrying the hash of the one before.

    log = AuditLog(home / "audit" / "audit.jsonl")
    log.record("alice", "store.write", subject="sha256:ab12...", outcome="ok", details={"kind": "parquet"})
    log.verify()        # raises VerificationError naming the first bad entry

Each entry holds ``seq``, ``time``, ``actor``, ``action``, ``subject``, ``outcome``, ``details``,
``prev`` (the previous entry's hash) and ``hash`` (SHA-256 over the canonical JSON of the rest).
A head file beside the log records the last sequence number, hash and byte length, so deleting
or truncating entries at the end is detected too; any edit, deletion or reordering in the middle
breaks the chain.

Appends from several threads or processes are serialised by an exclusive ``flock`` on the log.

Durability: by default an append is written to the OS (it survives the process dying, not a
power cut) at about 10^4 appends/s. With ``fsync=True`` (``SECURE_ML_AUDIT_FSYNC=1``) every
append is flushed to disk before it returns, at the disk's fsync rate.

Anchoring: someone who can rewrite both the log and its head can forge a whole new history, so
the head is also kept, signed, where the log's writer cannot reach (secure_ml.custody.anchor:
checkpoints in the Dagster event log with each run, and an optional witness file), and
``verify(checkpoint=...)`` or ``verify(expect=HASH)`` checks the log against it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import SHA256_HEX
from secure_ml.errors import BadInput, VerificationError

GENESIS = "0" * 64
_SECRET_FIELD = re.compile(r"secret|password|passwd|token|private|credential|material|api[_-]?key", re.I)
_HEAD_SIZE = 128


def _canonical(entry: dict[str, Any]) -> bytes:
    # default=str: a Path or datetime in details is recorded as text (and verifies as text).
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def redact(details: Any) -> Any:
    """Replace the value of any field whose name suggests a secret (defence in depth)."""
    if isinstance(details, dict):
        return {k: "[redacted]" if _SECRET_FIELD.search(str(k)) else redact(v) for k, v in details.items()}
    if isinstance(details, list | tuple):
        return [redact(v) for v in details]
    return details


@dataclass(frozen=True)
class VerifyReport:
    entries: int
    last_hash: str


class AuditLog:
    """Append-only, hash-chained JSON-lines log, safe for concurrent writers."""

    def __init__(self, path: Path | str, *, fsync: bool | None = None) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_suffix(self.path.suffix + ".head")
        self.fsync = os.environ.get("SECURE_ML_AUDIT_FSYNC") == "1" if fsync is None else fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._head_fd: int | None = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"

    def _open(self) -> tuple[int, int]:
        if self._pid != os.getpid():
            # A forked child shares the parent's open file description, and with it the parent's
            # flock: appends would no longer exclude each other. Reopen in the child.
            self._fd = self._head_fd = None
            self._pid = os.getpid()
        if self._fd is None or self._head_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            self._head_fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT, 0o600)
        return self._fd, self._head_fd

    def close(self) -> None:
        if self._pid == os.getpid():  # a forked child must not close its parent's descriptors
            for fd in (self._fd, self._head_fd):
                if fd is not None:
                    os.close(fd)
        self._fd = self._head_fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except OSError:
            pass

    def record(
        self,
        actor: str,
        action: str,
        *,
        subject: str = "",
        outcome: str = "ok",
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one entry and return it (with its ``seq`` and ``hash``)."""
        if not actor or not action:
            raise BadInput("an audit entry needs an actor and an action")
        if self._pid != os.getpid():
            self._lock = threading.Lock()  # it may have been held by another thread at fork time
        with self._lock:
            fd, head_fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                seq, prev, _ = self._tail(fd, head_fd)
                entry: dict[str, Any] = {
                    "seq": seq + 1,
                    "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                    "actor": actor,
                    "action": action,
                    "subject": subject,
                    "outcome": outcome,
                    "details": redact(details or {}),
                    "prev": prev,
                }
                entry["hash"] = entry_hash(entry)
                os.write(fd, _canonical(entry) + b"\n")
                end = os.fstat(fd).st_size
                head = f"{entry['seq']} {entry['hash']} {end}".encode().ljust(_HEAD_SIZE)
                os.pwrite(head_fd, head, 0)
                if self.fsync:
                    os.fsync(fd)
                    os.fsync(head_fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        return entry

    def _tail(self, fd: int, head_fd: int) -> tuple[int, str, int]:
        """(last seq, last hash, log length) from the head, falling back to the log's last line."""
        size = os.fstat(fd).st_size
        raw = os.pread(head_fd, _HEAD_SIZE, 0).decode(errors="replace").split()
        if len(raw) == 3 and raw[2].isdigit() and int(raw[2]) == size:
            return int(raw[0]), raw[1], size
        if size == 0:
            return 0, GENESIS, 0
        # The head lags (a writer died between the two writes) or is missing: read the last line.
        start = max(0, size - 65536)
        tail = os.pread(fd, size - start, start).rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            last = json.loads(tail)
            return int(last["seq"]), str(last["hash"]), size
        except (ValueError, KeyError, TypeError):
            # Keep appending; `audit verify` will name the damaged entry.
            return int(raw[0]) if raw and raw[0].isdigit() else 0, GENESIS, size

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every entry, oldest first (no verification: use :meth:`verify` for that)."""
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)

    def verify(self, *, checkpoint: Checkpoint | None = None, expect: str | None = None) -> VerifyReport:
        """Check the chain and the head; raise VerificationError at the first bad entry.

        ``checkpoint`` (a verified, signed head from somewhere this log's writer cannot reach): the
        log must still hold exactly the bytes it signed, so a cut tail, a replaced file or a
        recomputed chain is named even when the head beside the log was rewritten too. Only the
        entries after it are re-parsed: the rest is one SHA-256 pass. ``expect``: an entry hash kept
        elsewhere, which must be in the chain.
        """
        if expect is not None and not SHA256_HEX.match(expect):
            raise BadInput(f"--expect must be an entry hash (64 hex characters), not {expect!r}")
        if not self.path.exists():
            if checkpoint is not None:
                raise VerificationError(f"audit log {self.path} is gone, but the signed checkpoint of "
                                        f"{checkpoint.time} records {checkpoint.seq} entries")
            raise VerificationError(f"audit log {self.path} does not exist")
        start = (0, GENESIS, 0)
        if checkpoint is not None:
            self._check_checkpoint(checkpoint)
            start = (checkpoint.seq, checkpoint.hash, checkpoint.length)
        seq, prev, length = self._verify_chain(*start)
        self._check_head(seq, prev, length, anchored=checkpoint is not None)
        if expect is not None and not self._holds(expect):
            raise VerificationError(f"the head kept elsewhere ({expect[:16]}…) is not an entry of this log: "
                                    "its tail was cut, or the file was replaced or its chain recomputed")
        return VerifyReport(entries=seq, last_hash=prev)

    def _verify_chain(self, seq: int, prev: str, offset: int) -> tuple[int, str, int]:
        length = offset
        with self.path.open("rb") as handle:
            handle.seek(offset)
            for lineno, line in enumerate(handle, start=seq + 1):
                length += len(line)
                where = f"audit log entry {lineno} (line {lineno})"
                if not line.endswith(b"\n"):
                    raise VerificationError(f"{where} is incomplete: the log was truncated mid-entry")
                try:
                    entry = json.loads(line)
                    if not isinstance(entry, dict):
                        raise ValueError
                except ValueError:
                    raise VerificationError(f"{where} is not valid JSON: the log was edited") from None
                if entry.get("seq") != seq + 1:
                    raise VerificationError(
                        f"{where} has sequence {entry.get('seq')!r}, expected {seq + 1}: "
                        "an entry was deleted, duplicated or reordered"
                    )
                if entry.get("prev") != prev:
                    raise VerificationError(f"{where} does not chain to the entry before it: entries were removed or reordered")
                if entry.get("hash") != entry_hash(entry):
                    raise VerificationError(f"{where} ({entry.get('action')}) was modified after it was written")
                prev, seq = entry["hash"], seq + 1
        return seq, prev, length

    def _check_checkpoint(self, checkpoint: Checkpoint) -> None:
        size = self.path.stat().st_size
        if size < checkpoint.length:
            raise VerificationError(
                f"audit log is {size} bytes but the signed checkpoint of {checkpoint.time} records entry "
                f"{checkpoint.seq} at {checkpoint.length} bytes: its tail was cut")
        if prefix_sha256(self.path, checkpoint.length) == checkpoint.sha256:
            return
        try:  # name the first bad entry when the chain itself is broken
            seq, _, _ = self._verify_chain(0, GENESIS, 0)
        except VerificationError as exc:
            raise VerificationError(f"{exc} (and the log no longer matches its signed checkpoint)") from None
        if seq < checkpoint.seq:
            raise VerificationError(f"audit log ends at entry {seq} but the signed checkpoint of {checkpoint.time} "
                                    f"records entry {checkpoint.seq}: its tail was cut")
        raise VerificationError(
            f"audit log's first {checkpoint.seq} entries are not the ones signed at {checkpoint.time}: "
            "the file was replaced or its chain recomputed")

    def _check_head(self, seq: int, prev: str, length: int, *, anchored: bool) -> None:
        head = self.head_path.read_bytes().decode(errors="replace").split() if self.head_path.exists() else []
        if head and not (len(head) == 3 and head[0].isdigit() and head[2].isdigit()):
            raise VerificationError(f"audit log head {self.head_path} is malformed: it was edited")
        if not seq and len(head) == 3 and int(head[0]) > 0:
            raise VerificationError(
                f"audit log is empty but its head records entry {head[0]}: every entry was removed"
            )
        if seq and len(head) == 3:
            head_seq, head_hash, head_len = int(head[0]), head[1], int(head[2])
            if head_seq > seq:
                raise VerificationError(
                    f"audit log ends at entry {seq} but its head records entry {head_seq}: "
                    "entries were removed from the end"
                )
            if head_seq == seq and (head_hash != prev or head_len != length):
                raise VerificationError(
                    f"audit log entry {seq} (the last) is not the one its head records: the end was rewritten"
                )
        elif seq and not head and not anchored:
            raise VerificationError(f"audit log head {self.head_path} is missing")

    def _holds(self, entry_hash_hex: str) -> bool:
        needle = f'"hash":"{entry_hash_hex}"'.encode()
        with self.path.open("rb") as handle:
            for line in handle:
                if needle in line and json.loads(line).get("hash") == entry_hash_hex:
                    return True
        return False

    def head(self) -> tuple[int, str, int]:
        """(last seq, last hash, byte length) as the head records it, under the writers' lock."""
        with self._lock:
            fd, head_fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                return self._tail(fd, head_fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Checkpoint:
    """A head of the log: entry ``seq`` with ``hash`` ends at byte ``length``; ``sha256`` of those bytes."""

    seq: int
    hash: str
    length: int
    sha256: str
    time: str


def prefix_sha256(path: Path, length: int) -> str:
    """SHA-256 of the first ``length`` bytes of ``path`` (one streaming pass, no copy of the file)."""
    digest = hashlib.sha256()
    if length == 0:
        return digest.hexdigest()
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), length, access=mmap.ACCESS_READ) as view:
        digest.update(view)
    return digest.hexdigest()
