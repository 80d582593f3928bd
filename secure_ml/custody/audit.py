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

What this does not stop: someone who can rewrite both the log and its head can forge a whole new
history. Ship the head hash somewhere they cannot write (a ticket, a transparency log, object
storage with retention) when that matters.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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

    def verify(self) -> VerifyReport:
        """Check the whole chain and the head; raise VerificationError at the first bad entry."""
        if not self.path.exists():
            raise VerificationError(f"audit log {self.path} does not exist")
        prev = GENESIS
        seq = 0
        length = 0
        with self.path.open("rb") as handle:
            for lineno, line in enumerate(handle, start=1):
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
        elif seq and not head:
            raise VerificationError(f"audit log head {self.head_path} is missing")
        return VerifyReport(entries=seq, last_hash=prev)
