"""Streaming digests and atomic writes.

    digest = sha256_file(path)                     # hex, streamed, bounded memory
    tree = sha256_tree(model_dir)                  # {relative path: hex}, files hashed in parallel
    with atomic_write(path) as out:                # temp file, fsync, rename: all or nothing
        out.write(data)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from secure_ml.errors import BadInput


def sha256_file(path: Path | str) -> str:
    """SHA-256 of a file, streamed (hashlib releases the GIL, so threads hash in parallel)."""
    with open(path, "rb", buffering=0) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_tree(root: Path | str) -> list[str]:
    """Regular files under ``root`` as sorted POSIX relative paths; symlinks are refused."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"not a directory: {root}")
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath, name)
            if full.is_symlink():
                # A symlink could point a digest at a file outside the tree.
                raise BadInput(f"symbolic link in {root}: {full.relative_to(root)}")
        files.extend(Path(dirpath, f).relative_to(root).as_posix() for f in filenames)
    return sorted(files)


def sha256_tree(root: Path | str, *, workers: int | None = None) -> dict[str, str]:
    """SHA-256 of every file under ``root``, keyed by relative path, hashed in parallel."""
    root = Path(root)
    names = list_tree(root)
    workers = workers or min(8, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = pool.map(lambda n: sha256_file(root / n), names)
        return dict(zip(names, digests, strict=True))


def tree_digest(files: dict[str, str]) -> str:
    """One digest for a {path: sha256} manifest (order-independent, path-bound)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].encode() + b"\n")
    return h.hexdigest()


#: A streaming writer syncs and releases what it has written every this many bytes.
RELEASE_EVERY = 16 << 20


class _StreamingFile(io.FileIO):
    """A file written front to back that hands finished pages back to the OS as it goes.

    Every RELEASE_EVERY bytes it syncs what it wrote and drops it from the page cache, so a
    multi-gigabyte artifact neither floods memory with dirty pages nor makes the kernel find
    gigabytes of fresh page cache (which costs more CPU than the AES-GCM itself on a VM). It adds
    no disk work where the file is fsynced at the end anyway (atomic_write, the store).
    """

    _written = 0
    _released = 0

    def write(self, data: Any) -> int:
        written = super().write(data) or 0
        self._written += written
        if self._written - self._released >= RELEASE_EVERY:
            os.fdatasync(self.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fileno(), 0, self._written, os.POSIX_FADV_DONTNEED)
            self._released = self._written
        return written


def streaming_writer(fd: int) -> BinaryIO:
    """A buffered binary writer over ``fd`` (which it owns) that releases written pages as it goes."""
    return io.BufferedWriter(_StreamingFile(fd, "wb", closefd=True), buffer_size=1 << 16)  # type: ignore[return-value]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path | str, *, mode: int = 0o600, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Write ``path`` all-or-nothing: a temp file beside it, fsync, then rename over it.

    If the block raises (or the process dies), the temp file is removed (or left only under a
    ``.tmp-`` name) and ``path`` is untouched. With ``overwrite=False`` an existing ``path`` is
    an error and is never replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise BadInput(f"output exists: {path} (use --force to overwrite)")
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with streaming_writer(fd) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobber
            except FileExistsError:
                raise BadInput(f"output exists: {path} (use --force to overwrite)") from None
            tmp.unlink()
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int = 0o600) -> None:
    with atomic_write(path, mode=mode) as handle:
        handle.write(data)
