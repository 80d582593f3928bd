"""Streaming digests and atomic writes.

    digest = sha256_file(path)                     # hex, streamed, bounded memory
    tree = sha256_tree(model_dir)                  # {relative path: hex}, files hashed in parallel
    with atomic_write(path) as out:                # temp file, fsync, rename: all or nothing
        out.write(data)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import mmap
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from secure_ml.errors import BadInput


def sha256_file(path: Path | str) -> str:
    """SHA-256 of a file, streamed (hashlib releases the GIL, so threads hash in parallel)."""
    with open(path, "rb", buffering=0) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: A SHA-256 digest as we write it: 64 lowercase hex digits.
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def is_plain_relative_path(name: object) -> bool:
    """Whether ``name`` is a plain relative POSIX path: no ``..``, ``.``, empty or absolute parts,
    backslashes or NULs (what a manifest may name without escaping its directory)."""
    if not isinstance(name, str) or "\\" in name or "\0" in name:
        return False
    parts = PurePosixPath(name).parts
    return bool(parts) and name == "/".join(parts) and parts[0] != "/" and not {".", ".."} & set(parts)


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


#: A buffered (non-direct) streaming writer syncs and releases what it has written every this many bytes.
RELEASE_EVERY = 16 << 20
#: Direct I/O: bytes staged in an aligned buffer per write(2), and the alignment O_DIRECT needs.
STAGE_SIZE = 8 << 20
_ALIGN = 4096
#: Direct-I/O read stage: several 1 MiB chunks, plus the slack to re-read from an aligned offset.
READ_STAGE_SIZE = (16 << 20) + _ALIGN
#: Files with less than this left to read go through the page cache: O_DIRECT pays a disk read each
#: time, which only large streams win back (a small JSON record read direct costs ~3 ms, cached ~0.05 ms).
DIRECT_READ_MIN = 1 << 20


def _stage(size: int) -> mmap.mmap:
    """A page-aligned buffer for direct I/O: private anonymous memory (the default shared mapping
    is shmem, which gets no transparent huge pages), asked for huge pages (fewer pages to pin)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    stage = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    with contextlib.suppress(AttributeError, OSError):
        stage.madvise(mmap.MADV_HUGEPAGE)
    return stage


class _StreamingFile(io.FileIO):
    """A file written front to back that keeps its bytes out of the page cache.

    Page-cache writes cost more CPU than the AES-GCM itself on this VM (allocating, copying and
    later evicting every page), so where the file system allows it the file is written with
    O_DIRECT: ``write`` copies into a page-aligned STAGE_SIZE buffer and every full stage goes to
    disk in one aligned write(2) (no kernel copy, no page cache). The unaligned tail is written
    on ``drain`` (flush/close) after O_DIRECT is switched off, so ``flush`` + ``fsync`` is as
    durable as with any file. Where O_DIRECT is refused (or after a seek) it falls back to
    buffered writes that fdatasync and drop their pages every RELEASE_EVERY bytes, so a
    multi-gigabyte artifact never floods memory with dirty pages. Memory: one stage.
    """

    _written = 0  # bytes handed to the kernel
    _released = 0  # bytes known to be out of the page cache (written direct, or synced and dropped)

    def __init__(self, fd: int, mode: str = "wb", closefd: bool = True) -> None:
        super().__init__(fd, mode, closefd=closefd)
        self._stage: mmap.mmap | None = None
        self._staged = 0
        self._direct = False
        if hasattr(os, "O_DIRECT") and hasattr(fcntl, "F_SETFL") and os.lseek(fd, 0, os.SEEK_CUR) % _ALIGN == 0:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            except OSError:
                return
            self._stage = _stage(STAGE_SIZE)
            self._view = memoryview(self._stage)
            self._direct = True

    def write(self, data: Any) -> int:
        if not self._direct:
            return self._write_buffered(data)
        source = memoryview(data).cast("B")
        total = len(source)
        taken = 0
        while taken < total:
            room = STAGE_SIZE - self._staged
            if room == 0:
                self._write_stage(final=False)
                continue
            piece = min(room, total - taken)
            self._view[self._staged : self._staged + piece] = source[taken : taken + piece]
            self._staged += piece
            taken += piece
        return total

    def _write_buffered(self, data: Any) -> int:
        written = super().write(data) or 0
        self._written += written
        if self._written - self._released >= RELEASE_EVERY:
            os.fdatasync(self.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fileno(), 0, self._written, os.POSIX_FADV_DONTNEED)
            self._released = self._written
        return written

    def _write_stage(self, *, final: bool) -> None:
        """Write the aligned part of the stage direct; with ``final`` also the tail, buffered."""
        aligned = self._staged - self._staged % _ALIGN
        done = 0
        try:
            while done < aligned:
                done += os.write(self.fileno(), self._view[done:aligned])
        except OSError as exc:
            if exc.errno != errno.EINVAL or done % _ALIGN:
                raise
            self._leave_direct()  # the file system took the flag but not the I/O: go buffered
        self._written += done
        self._released += done
        rest = self._staged - done
        self._view[:rest] = self._view[done : self._staged]
        self._staged = rest
        if final or not self._direct:
            self._leave_direct()
            pending, self._staged = self._staged, 0
            if pending:
                self._write_all_buffered(self._view[:pending])

    def _write_all_buffered(self, data: memoryview) -> None:
        taken = 0
        while taken < len(data):
            taken += self._write_buffered(data[taken:])

    def _leave_direct(self) -> None:
        if self._direct:
            fcntl.fcntl(self.fileno(), fcntl.F_SETFL, fcntl.fcntl(self.fileno(), fcntl.F_GETFL) & ~os.O_DIRECT)
            self._direct = False

    def reserve(self, size: int) -> memoryview | None:
        """Room for ``size`` bytes in the stage, to be filled in place and then :meth:`commit`ted
        (saves a copy); None when not writing direct (then use ``write``)."""
        if not self._direct or size > STAGE_SIZE - _ALIGN:
            return None
        if STAGE_SIZE - self._staged < size:
            self._write_stage(final=False)
            if not self._direct:
                return None
        return self._view[self._staged : self._staged + size]

    def commit(self, size: int) -> None:
        """Count ``size`` bytes written in place at the start of the last :meth:`reserve`."""
        self._staged += size

    def drain(self) -> None:
        """Hand every staged byte to the kernel (after this, fsync covers all that was written)."""
        if self._staged or self._direct:
            self._write_stage(final=True)

    def tell(self) -> int:
        return super().tell() + self._staged

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.drain()
        return super().seek(pos, whence)

    def truncate(self, size: int | None = None) -> int:
        self.drain()
        return super().truncate(size)

    def close(self) -> None:
        try:
            if not self.closed:
                self.drain()
        finally:
            super().close()
            if self._stage is not None:
                with contextlib.suppress(BufferError):  # a caller still holds a view: GC frees it
                    self._view.release()
                    self._stage.close()
                self._stage = None


class _StreamingWriter(io.BufferedWriter):
    """BufferedWriter whose ``flush`` also drains the raw file's direct-I/O stage."""

    def flush(self) -> None:
        super().flush()
        if not self.raw.closed:
            self.raw.drain()  # type: ignore[attr-defined]

    def reserve(self, size: int) -> memoryview | None:
        """See _StreamingFile.reserve: bytes buffered here go to the stage first, in order."""
        super().flush()
        return self.raw.reserve(size)  # type: ignore[attr-defined,no-any-return]

    def commit(self, size: int) -> None:
        self.raw.commit(size)  # type: ignore[attr-defined]


def streaming_writer(fd: int) -> BinaryIO:
    """A buffered binary writer over ``fd`` (which it owns) that keeps written pages out of the
    page cache (direct I/O, or sync-and-drop); ``flush`` hands everything to the kernel."""
    return _StreamingWriter(_StreamingFile(fd, "wb", closefd=True), buffer_size=1 << 16)  # type: ignore[return-value]


class _DirectReader(io.RawIOBase):
    """Reads a regular file front to back with O_DIRECT through a page-aligned stage.

    Made by :func:`direct_reader`. The bytes come from the disk (DMA) into the stage: no
    page-cache pages to allocate, copy and evict. :meth:`chunk` hands out views of the stage
    itself (no copy); ``readinto`` copies out of it. A file that shrinks meanwhile only reads
    short (plain reads, no mmap of the file: no SIGBUS).
    """

    def __init__(self, fd: int, start: int) -> None:
        super().__init__()
        self._fd = fd
        self._stage = _stage(READ_STAGE_SIZE)
        self._view = memoryview(self._stage)
        self._offset = start - start % _ALIGN  # file offset of the stage's first byte
        self._begin = start % _ALIGN  # next unread byte in the stage
        self._end = 0  # valid bytes in the stage
        self._eof = False  # the stage holds the end of the file (the last read came back short)
        self._direct = True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        if self._begin >= self._end and not self._refill():
            return 0
        piece = min(len(target), self._end - self._begin)
        target[:piece] = self._view[self._begin : self._begin + piece]
        self._begin += piece
        return piece

    def holds(self, size: int) -> bool:
        """Whether :meth:`chunk` can serve chunks of ``size`` bytes (a chunk, one byte of look-ahead
        and the alignment slack must fit in the stage)."""
        return size + 1 + _ALIGN <= len(self._stage)

    def chunk(self, size: int) -> tuple[memoryview, bool]:
        """The next ``size`` bytes (fewer only where the file ends) as a view of the stage, without
        a copy, and whether the file ends right after them. The view is valid only until the next
        call: the stage is then refilled beneath it."""
        if not self.holds(size):
            raise ValueError(f"chunk of {size} bytes does not fit the read stage")
        if self._end - self._begin <= size and not self._eof:  # no byte after it yet: read on
            self._refill()
        start = self._begin
        self._begin = max(start, min(start + size, self._end))  # end < start: the file shrank
        return self._view[start : self._begin], self._eof and self._begin >= self._end

    def _refill(self) -> bool:
        """Read a stage from the aligned-down position of the next unread byte (unread bytes
        already in the stage are read again, so that the next chunk is contiguous)."""
        position = self._offset + self._begin
        aligned = position - position % _ALIGN
        got = self._pread(aligned)
        self._offset, self._begin, self._end = aligned, position - aligned, got
        self._eof = got < len(self._stage)  # a regular file reads short only at its end
        return self._begin < self._end

    def _pread(self, offset: int) -> int:
        try:
            return os.preadv(self._fd, [self._view], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct:
                raise
        # The file system took O_DIRECT at open but not the I/O: read through the page cache.
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False
        return os.preadv(self._fd, [self._view], offset)

    def position(self) -> int:
        return self._offset + self._begin

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            with contextlib.suppress(BufferError):  # a caller still holds a chunk: GC frees it
                self._view.release()
                self._stage.close()
        super().close()


def direct_reader(src: Any) -> _DirectReader | None:
    """An O_DIRECT reader over the rest of ``src`` when it is a plain regular file opened for
    reading with at least ``DIRECT_READ_MIN`` bytes left (its own position is left alone; see
    :func:`finish_direct_read`), else None."""
    if type(src) not in (io.BufferedReader, io.FileIO) or not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = src.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not src.seekable():
            return None
        start = src.tell()
        if os.fstat(fd).st_size - start < DIRECT_READ_MIN:
            return None
        direct = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    try:
        if not os.path.samestat(os.fstat(direct), os.fstat(fd)):
            os.close(direct)
            return None
        return _DirectReader(direct, start)
    except BaseException:
        os.close(direct)
        raise


def finish_direct_read(src: Any, reader: _DirectReader) -> None:
    """Move ``src`` to where ``reader`` stopped and release the reader."""
    with contextlib.suppress(OSError, ValueError):
        src.seek(reader.position())
    reader.close()


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
