"""Signed checkpoints of the audit log's head, kept where the log's writer cannot reach.

    envelope = checkpoint(log, signer, previous=newest_known)   # verifies since `previous`, signs the head
    cp = verify_checkpoint(envelope, trusted_keys)               # Checkpoint(seq, hash, length, sha256, time)
    log.verify(checkpoint=newest([cp, ...]))                     # a cut tail or recomputed chain is named

Where checkpoints go: the Dagster event log, with each run (resources.custody records one on every
sealed output; PostgreSQL in production), and optionally a witness file (``Witness(path)``: an
append-only JSON-lines file on storage the pipeline's host cannot rewrite, e.g. a mounted
write-once bucket). The signer is the pipeline's identity; verification takes the trust policy's
pipeline keys. A checkpoint is only signed over a chain that verifies, so it never blesses damage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from secure_ml.custody.audit import AuditLog, Checkpoint, prefix_sha256
from secure_ml.custody.dsse import Key, Signer, canonical_json, sign_envelope, verify_envelope
from secure_ml.custody.integrity import SHA256_HEX
from secure_ml.errors import VerificationError

PAYLOAD_TYPE = "application/vnd.secure-ml.audit-checkpoint+json"
CHECKPOINT_TYPE = "https://secure-ml.dev/AuditCheckpoint/v1"
METADATA_KEY = "audit_checkpoint"

__all__ = ["checkpoint", "verify_checkpoint", "newest", "Witness", "METADATA_KEY"]


def checkpoint(log: AuditLog, signer: Signer, *, previous: Checkpoint | None = None) -> bytes:
    """Verify the log (from ``previous`` on) and sign its head: the envelope, as JSON bytes."""
    report = log.verify(checkpoint=previous)
    length = _length_through(log.path, report.entries, previous)
    body = {"_type": CHECKPOINT_TYPE, "log": log.path.name, "seq": report.entries, "hash": report.last_hash,
            "length": length, "sha256": prefix_sha256(log.path, length),
            "time": datetime.now(UTC).isoformat(timespec="microseconds")}
    return sign_envelope(canonical_json(body), PAYLOAD_TYPE, [signer])


def _length_through(path: Path, seq: int, previous: Checkpoint | None) -> int:
    """Bytes up to the end of entry ``seq`` (writers may have appended since verify returned)."""
    offset, at = (previous.length, previous.seq) if previous else (0, 0)
    with path.open("rb") as handle:
        handle.seek(offset)
        while at < seq:
            line = handle.readline()
            if not line.endswith(b"\n"):
                raise VerificationError("the audit log changed while it was being checkpointed")
            offset, at = offset + len(line), at + 1
    return offset


def verify_checkpoint(envelope: bytes | str, keys: Sequence[Key]) -> Checkpoint:
    """The checkpoint in a signed envelope; VerificationError unless a trusted key signed it."""
    verified = verify_envelope(envelope, keys, threshold=1, payload_type=PAYLOAD_TYPE, what="audit checkpoint")
    body = verified.json()
    try:
        cp = Checkpoint(seq=int(body["seq"]), hash=str(body["hash"]), length=int(body["length"]),
                        sha256=str(body["sha256"]), time=str(body["time"]))
    except (KeyError, TypeError, ValueError):
        raise VerificationError("the audit checkpoint is malformed") from None
    if body.get("_type") != CHECKPOINT_TYPE or not (SHA256_HEX.match(cp.hash) and SHA256_HEX.match(cp.sha256)):
        raise VerificationError("the audit checkpoint is not a secure-ml audit checkpoint v1")
    return cp


def newest(checkpoints: Iterable[Checkpoint]) -> Checkpoint | None:
    return max(checkpoints, key=lambda c: (c.seq, c.time), default=None)


class Witness:
    """An append-only file of checkpoint envelopes (one JSON object per line)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def append(self, envelope: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(json.loads(envelope), sort_keys=True, separators=(",", ":")).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def envelopes(self) -> list[bytes]:
        try:
            return [line for line in self.path.read_bytes().splitlines() if line.strip()]
        except FileNotFoundError:
            return []
