"""The artifact store: every pipeline artifact encrypted at rest, content-addressed, verified on read.

    store = ArtifactStore(home / "artifacts", keys, audit, actor="alice")
    ref = store.put_dataframe(df)                    # Parquet, encrypted; ref.sha256 is the plaintext digest
    df = store.get_dataframe(ref.sha256)             # refuses bytes whose tag or digest do not match
    tree = store.put_tree(model_dir)                 # each file, plus a manifest naming them
    store.get_tree(tree.sha256, out_dir)             # all files verified before out_dir appears
    store.tree_files(tree.sha256)                    # {path: sha256} from the manifest, nothing decrypted

Objects live at ``objects/<aa>/<sha256>.smle``, named by the SHA-256 of their plaintext. A reader
always asks for a digest (never a path it was handed), and the store checks both the AES-GCM
tags and the plaintext digest before it returns a byte.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from secure_ml.custody import crypto
from secure_ml.custody.audit import AuditLog
from secure_ml.custody.integrity import (
    SHA256_HEX,
    atomic_write,
    atomic_write_bytes,
    is_plain_relative_path,
    list_tree,
    streaming_writer,
)
from secure_ml.custody.keys import KeyProvider
from secure_ml.errors import BadInput, ConfigurationError, Error, IntegrityError

_DIGEST = SHA256_HEX
SUFFIX = ".smle"


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact is and what it must hash to."""

    sha256: str
    size: int
    kind: str
    key_id: str
    location: str

    def metadata(self) -> dict[str, Any]:
        return asdict(self)


class _HashingReader(io.RawIOBase):
    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self.sha.update(data)
        return data

    def readinto(self, buffer: Any) -> int:
        """Read straight into the caller's buffer (the encryptor reuses one per chunk)."""
        readinto = getattr(self._src, "readinto", None)
        if readinto is None:
            data = self._src.read(len(buffer))
            buffer[: len(data)] = data
            got = len(data)
        else:
            got = readinto(buffer)
        if got:
            self.sha.update(memoryview(buffer)[:got])
        return got


class _HashingWriter(io.RawIOBase):
    def __init__(self, dst: BinaryIO | None) -> None:
        self._dst = dst
        self.sha = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sha.update(data)
        if self._dst is not None:
            self._dst.write(data)
        return len(data)


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise BadInput(f"not a SHA-256 digest: {str(digest)[:80]!r}")
    return digest


@contextlib.contextmanager
def _flock(path: Path, operation: int, *, busy: str = "") -> Iterator[None]:
    """Hold an flock on ``path`` (created 0600); with LOCK_NB, ``busy`` is the error if it is held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            raise ConfigurationError(busy or f"{path} is locked by another process") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


class ArtifactStore:
    """Encrypted, content-addressed storage for pipeline artifacts."""

    def __init__(self, root: Path | str, keys: KeyProvider, audit: AuditLog, *, actor: str) -> None:
        self.root = Path(root)
        self.keys = keys
        self.audit = audit
        self.actor = actor

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    def path_for(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / "objects" / digest[:2] / f"{digest}{SUFFIX}"

    def exists(self, digest: str) -> bool:
        return self.path_for(digest).exists()

    def writers_lock(self, *, exclusive: bool = False) -> contextlib.AbstractContextManager[None]:
        """Writers share this lock while they seal an artifact; key rotation takes it exclusively
        before it retires old keys, so no artifact sealed under an old key lands after the sweep."""
        return _flock(self.root / ".writers.lock", fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    # -- writing ---------------------------------------------------------------------------
    def put_stream(self, src: BinaryIO, *, kind: str = "bytes", details: dict[str, Any] | None = None) -> ArtifactRef:
        """Encrypt a stream into the store; memory stays bounded by the chunk size."""
        staging = self.root / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        reader = _HashingReader(src)
        fd, tmp_name = tempfile.mkstemp(prefix=".incoming-", dir=staging)
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, 0o600)
            with self.writers_lock():
                with streaming_writer(fd) as out:
                    size = crypto.encrypt_stream(reader, out, self.keys)  # type: ignore[arg-type]
                    out.flush()
                    os.fsync(out.fileno())
                with tmp.open("rb") as sealed:
                    key_id = crypto.peek_key_id(sealed)
                digest = reader.sha.hexdigest()
                target = self.path_for(digest)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)  # same content, same name: a re-put is idempotent
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        ref = ArtifactRef(digest, size, kind, key_id, str(target.relative_to(self.root)))
        self.audit.record(self.actor, "store.write", subject=f"sha256:{digest}",
                          details={"kind": kind, "size": size, **(details or {})})
        return ref

    def put_file(self, path: Path | str, *, kind: str = "bytes", details: dict[str, Any] | None = None) -> ArtifactRef:
        with open(path, "rb") as src:
            return self.put_stream(src, kind=kind, details=details)

    def put_bytes(self, data: bytes, *, kind: str = "bytes", details: dict[str, Any] | None = None) -> ArtifactRef:
        return self.put_stream(io.BytesIO(data), kind=kind, details=details)

    def put_json(self, obj: Any, *, details: dict[str, Any] | None = None) -> ArtifactRef:
        data = json.dumps(obj, sort_keys=True, indent=1, allow_nan=False).encode()
        return self.put_bytes(data, kind="json", details=details)

    def put_dataframe(self, frame: Any, *, details: dict[str, Any] | None = None) -> ArtifactRef:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False, engine="pyarrow")
        buffer.seek(0)  # streamed from the buffer itself: no second copy of the Parquet bytes
        return self.put_stream(buffer, kind="parquet", details=details)

    def put_tree(self, directory: Path | str, *, details: dict[str, Any] | None = None) -> ArtifactRef:
        """Store each file of a directory, then a manifest of them; the manifest's ref names the tree."""
        directory = Path(directory)
        files = {name: self.put_file(directory / name, kind="file").sha256 for name in list_tree(directory)}
        return self.put_bytes(
            json.dumps({"format": "secure-ml-tree/1", "files": files}, sort_keys=True).encode(),
            kind="tree", details=details,
        )

    # -- reading ---------------------------------------------------------------------------
    def _fail(self, digest: str, error: Error) -> Error:
        self.audit.record(self.actor, "store.verify", subject=f"sha256:{digest}", outcome="fail",
                          details={"reason": error.explain()})
        return error

    def read_into(self, digest: str, dst: BinaryIO | None) -> int:
        """Decrypt into ``dst`` (or nowhere, to verify), checking tags and digest; returns size.

        ``dst`` receives plaintext as chunks authenticate: give it a temp file and discard it on
        error (get_file and get_bytes do).
        """
        path = self.path_for(digest)
        if not path.exists():
            raise self._fail(digest, IntegrityError(f"artifact sha256:{digest[:16]}… is missing from the store"))
        writer = _HashingWriter(dst)
        try:
            with path.open("rb") as src:
                size = crypto.decrypt_stream(src, writer, self.keys)  # type: ignore[arg-type]
        except Error as exc:
            raise self._fail(digest, type(exc)(f"artifact sha256:{digest[:16]}…: {exc}")) from None
        actual = writer.sha.hexdigest()
        if actual != digest:
            raise self._fail(digest, IntegrityError(
                f"artifact sha256:{digest[:16]}… decrypts to sha256:{actual[:16]}…: it was replaced"))
        return size

    def verify(self, digest: str) -> int:
        """Authenticate and digest-check an artifact without keeping the plaintext."""
        return self.read_into(digest, None)

    def get_bytes(self, digest: str) -> bytes:
        buffer = io.BytesIO()
        self.read_into(digest, buffer)
        return buffer.getvalue()

    def get_file(self, digest: str, dst: Path | str, *, overwrite: bool = True) -> int:
        with atomic_write(dst, overwrite=overwrite) as out:
            return self.read_into(digest, out)

    def get_json(self, digest: str) -> Any:
        try:
            return json.loads(self.get_bytes(digest))
        except ValueError:
            raise BadInput(f"artifact sha256:{digest[:16]}… is not JSON") from None

    def get_dataframe(self, digest: str) -> Any:
        """A stored Parquet artifact as a DataFrame (what pandas.read_parquet gives), held once at a time:
        the plaintext is let go once parsed, each Arrow column once pandas has it (10M rows: gigabytes)."""
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        self.read_into(digest, buffer)
        buffer.seek(0)
        table = pq.read_table(buffer)
        del buffer
        return table.to_pandas(self_destruct=True, split_blocks=True)

    def tree_files(self, digest: str) -> dict[str, str]:
        """A stored tree's ``{relative path: sha256}``, read from its (verified) manifest alone.

        The digests are the ones computed as each file was encrypted, and every read of a file
        checks them again; nothing is decrypted here.
        """
        manifest = self.get_json(digest)
        if not isinstance(manifest, dict) or manifest.get("format") != "secure-ml-tree/1":
            raise IntegrityError(f"artifact sha256:{digest[:16]}… is not a stored directory")
        return _manifest_files(manifest, digest)

    def get_tree(self, digest: str, dst: Path | str) -> dict[str, str]:
        """Decrypt a stored tree into ``dst`` (which must not exist); all or nothing."""
        dst = Path(dst)
        if dst.exists():
            raise BadInput(f"output exists: {dst}")
        files = self.tree_files(digest)
        dst.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}.", dir=dst.parent))
        try:
            for name, file_digest in files.items():
                target = staging.joinpath(*PurePosixPath(name).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                self.get_file(file_digest, target, overwrite=False)
            os.rename(staging, dst)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return files

    # -- maintenance -----------------------------------------------------------------------
    def objects(self) -> Iterator[Path]:
        yield from sorted((self.root / "objects").glob(f"*/*{SUFFIX}"))


def _manifest_files(manifest: dict[str, Any], digest: str) -> dict[str, str]:
    """The {relative path: digest} of a tree manifest, refusing any path that could escape.

    A manifest is authenticated, but it may have been written by anyone who could write the
    store: names must be plain relative POSIX paths (no ``..``, ``.``, empty or absolute parts,
    backslashes or NULs) and no name may be a directory of another.
    """
    files = manifest.get("files")
    where = f"stored directory sha256:{digest[:16]}…"
    if not isinstance(files, dict):
        raise IntegrityError(f"{where} has no file list")
    for name, file_digest in files.items():
        if not is_plain_relative_path(name):
            raise IntegrityError(f"{where} names a path outside itself or not a plain path: {str(name)[:80]!r}")
        if not isinstance(file_digest, str) or not _DIGEST.match(file_digest):
            raise IntegrityError(f"{where} gives {name!r} a malformed digest")
    names = set(files)
    for name in files:
        parents = PurePosixPath(name).parents
        clash = next((str(p) for p in parents if str(p) in names), None)
        if clash:
            raise IntegrityError(f"{where} names {clash!r} both as a file and as a directory")
    return dict(files)


def rotate_keys(store: ArtifactStore, keyring: Any, *, reencrypt: bool = False) -> dict[str, int]:
    """Re-wrap every artifact's data key under a new key-encryption key (no data re-encrypted);
    with ``reencrypt``, replace every data key too, re-encrypting the data (after a suspected leak:
    a data key or wrapped key captured earlier then opens nothing).

    Safe to interrupt: the new key is saved before any artifact changes, each artifact is
    replaced atomically, and old keys are dropped only once no artifact needs them. Running it
    again after an interruption finishes the same rotation (a re-encryption keeps a journal of
    the artifacts it finished, so none is left with an old data key; a plain rotation refuses to
    take over an unfinished re-encryption). Writers keep working meanwhile: a second sweep, with
    writers paused, catches artifacts sealed under the old key during the first, so none lands
    after the old key is gone. Two rotations at once are refused.
    """
    with _flock(store.root / ".rotate.lock", fcntl.LOCK_EX | fcntl.LOCK_NB,
                busy="another key rotation is running on this store"):
        journal = store.root / REENCRYPT_JOURNAL
        if journal.exists() and not reencrypt:
            raise ConfigurationError("a `keys rotate --reencrypt` was interrupted on this store: run "
                                     "`secure-ml keys rotate --reencrypt` to finish it")
        new_id, resumed = keyring.begin_rotation()
        done = _journal_open(journal, new_id) if reencrypt else None
        store.audit.record(store.actor, "keys.rotate.begin", subject=new_id,
                           details={"resumed": resumed, "reencrypt": reencrypt})
        counts = {"rewrapped": 0, "already_current": 0, "unreadable": 0, "reencrypted": 0}
        still_in_use: set[str] = set()
        _rewrap_all(store, new_id, counts, still_in_use, done)
        with store.writers_lock(exclusive=True):
            still_in_use.clear()
            final = {"rewrapped": 0, "already_current": 0, "unreadable": 0, "reencrypted": 0}
            _rewrap_all(store, new_id, final, still_in_use, done)
            counts["rewrapped"] += final["rewrapped"]
            counts["reencrypted"] += final["reencrypted"]
            counts["unreadable"] = final["unreadable"]
            dropped = keyring.finish_rotation(still_in_use)
            if done is not None and not counts["unreadable"]:
                journal.unlink(missing_ok=True)  # finished: every artifact has a data key made by this rotation
    store.audit.record(store.actor, "keys.rotate.finish", subject=new_id,
                       outcome="ok" if not counts["unreadable"] else "fail",
                       details={**counts, "retired": dropped})
    return {**counts, "retired": len(dropped)}


REENCRYPT_JOURNAL = ".reencrypt.journal"


def _journal_open(journal: Path, new_id: str) -> dict[str, Any]:
    """The re-encryption journal of the rotation to ``new_id``: names of artifacts done. A journal
    of another rotation is started over (its key is no longer the one being rotated to)."""
    names: set[str] = set()
    try:
        lines = journal.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    if lines[:1] == [f"kek {new_id}"]:
        names = set(lines[1:])
    else:
        atomic_write_bytes(journal, f"kek {new_id}\n".encode(), mode=0o600)
    return {"path": journal, "names": names}


def _journal_add(done: dict[str, Any], name: str) -> None:
    fd = os.open(done["path"], os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"{name}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    done["names"].add(name)


def _reencrypt(path: Path, dst: Any, keys: Any) -> None:
    """Decrypt ``path`` and encrypt it again under a fresh data key, streaming through a pipe:
    no plaintext touches the disk, memory stays bounded. Raises if any chunk fails to authenticate
    (the caller's atomic write then leaves the artifact as it was)."""
    read_end, write_end = os.pipe()
    failed: list[BaseException] = []

    def produce() -> None:
        try:
            with path.open("rb") as src, os.fdopen(write_end, "wb") as plain:
                crypto.decrypt_stream(src, plain, keys)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
            failed.append(exc)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        with os.fdopen(read_end, "rb") as plain:
            crypto.encrypt_stream(plain, dst, keys)
    finally:
        producer.join()
    if failed:
        raise failed[0]


def _rewrap_all(store: ArtifactStore, new_id: str, counts: dict[str, int], still_in_use: set[str],
                done: dict[str, Any] | None = None) -> None:
    for path in store.objects():
        if done is not None and path.name in done["names"]:
            counts["already_current"] += 1
            continue
        try:
            with path.open("rb") as src:
                old_id = crypto.peek_key_id(src)
        except Error as exc:  # not an artifact any key opens: it cannot hold a key back
            counts["unreadable"] += 1
            store.audit.record(store.actor, "keys.rotate.artifact", subject=path.name, outcome="fail",
                               details={"reason": exc.explain()})
            continue
        if old_id == new_id and done is None:
            counts["already_current"] += 1
            continue
        try:
            with atomic_write(path) as dst:
                if done is not None:
                    _reencrypt(path, dst, store.keys)
                else:
                    with path.open("rb") as src:
                        crypto.rewrap(src, dst, store.keys)
        except Error as exc:
            still_in_use.add(old_id)  # keep the key it needs; a later rotation retries
            counts["unreadable"] += 1
            store.audit.record(store.actor, "keys.rotate.artifact", subject=path.name, outcome="fail",
                               details={"reason": exc.explain()})
            continue
        if done is not None:
            _journal_add(done, path.name)  # after the atomic replace: a kill in between only redoes this one
            counts["reencrypted"] += 1
            continue
        counts["rewrapped"] += 1
