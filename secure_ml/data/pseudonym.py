"""The PII pseudonym key: a key of its own, kept encrypted in the store, rotated on its own schedule.

    key_id, key = pseudonym_key(settings)          # created on first use; never logged
    key_id, key = rotate_pseudonym_key(settings)   # `secure-ml keys rotate-pseudonym`

The key is 32 random bytes sealed in the artifact store like any artifact (so KEK rotation,
``keys rotate`` and ``keys rotate --reencrypt``, re-wraps or re-encrypts it and pseudonyms stay
the same); ``$SECURE_ML_HOME/keys/pseudonym.json`` names its store digest (no key material).
Rotating it changes every pseudonym from then on: datasets validated before keep the old ones,
so joins between data pseudonymised before and after a rotation no longer match. Rotate it when
pseudonyms must stop being linkable (a leak of pseudonymised data together with the key), not on
the KEK's schedule. The previous digests are kept in the pointer file for the record.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import SHA256_HEX, atomic_write_bytes
from secure_ml.errors import IntegrityError

POINTER = "pseudonym.json"
KEY_BYTES = 32


def pseudonym_key_id(key: bytes) -> str:
    """A public, one-way identifier of the pseudonym key."""
    return "psk-" + hashlib.sha256(b"secure-ml pseudonym key id v1\0" + key).hexdigest()[:16]


@contextlib.contextmanager
def _locked(keys_dir: Path) -> Iterator[None]:
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(keys_dir / ".pseudonym.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pointer(settings: Any) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(settings.keys_dir) / POINTER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise IntegrityError(f"{POINTER} in {settings.keys_dir} is not readable JSON") from None
    if not isinstance(data, dict) or not SHA256_HEX.match(str(data.get("active", ""))):
        raise IntegrityError(f"{POINTER} in {settings.keys_dir} does not name a pseudonym key")
    return data


def pseudonym_key(settings: Any) -> tuple[str, bytes]:
    """(key id, key): the active pseudonym key, created on first use."""
    with _locked(Path(settings.keys_dir)):
        pointer = _pointer(settings)
        if pointer is None:
            return _new_key(settings, pointer, reason="first use")
        key = settings.artifact_store(actor="pii").get_bytes(pointer["active"])  # authenticated on the way out
    if len(key) != KEY_BYTES:
        raise IntegrityError("the stored pseudonym key is not a 256-bit key")
    return pseudonym_key_id(key), key


def rotate_pseudonym_key(settings: Any) -> tuple[str, bytes]:
    """Replace the pseudonym key: every pseudonym made from now on differs from the old ones."""
    with _locked(Path(settings.keys_dir)):
        return _new_key(settings, _pointer(settings), reason="rotation")


def _new_key(settings: Any, pointer: dict[str, Any] | None, *, reason: str) -> tuple[str, bytes]:
    key = os.urandom(KEY_BYTES)
    store = settings.artifact_store(actor="pii")
    ref = store.put_bytes(key, kind="pseudonym-key")
    previous = [] if pointer is None else [pointer["active"], *pointer.get("previous", [])]
    record = {"version": 1, "active": ref.sha256, "created": datetime.now(UTC).isoformat(), "previous": previous}
    atomic_write_bytes(Path(settings.keys_dir) / POINTER, json.dumps(record, indent=1).encode(), mode=0o600)
    key_id = pseudonym_key_id(key)
    settings.audit_log().record(settings.actor(), "pii.pseudonym_key.create", subject=key_id,
                                details={"reason": reason, "replaces": len(previous)})
    return key_id, key
